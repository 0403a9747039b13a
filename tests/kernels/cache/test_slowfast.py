"""SlowFastCache: promotion by novelty, redundancy eviction, reads and positions, fixed memory,
and MoC attention over the slow memory."""

import math

import pytest
import torch

import lol_kernels as lk
from lol_kernels.cache import SlowFastCache, token_positions
from tests.support import max_err
from tests.support.cache_checks import assert_same_read, assert_same_state

GH, GW = 2, 2  # 4 tokens per frame
NF = GH * GW


def make_cache(**kw):
    opts = dict(num_layers=2, num_kv_heads=2, head_dim=8, frame_tokens=NF, page_size=16,
                sink_frames=2, slow_frames=3, window_frames=2, block_frames=3)
    opts.update(kw)
    return SlowFastCache(**opts)


def push(cache, dirs, noise=0.1):
    """Append one frame whose keys are ``dirs[layer]`` ([Hkv, D]) at every token (so its
    summary is exactly that direction) plus zero-mean noise; values random."""
    t = cache.next_t
    blk = cache.append_frames(token_positions([t], GH, GW, cache.batch_size))
    for layer in range(cache.num_layers):
        z = torch.randn(cache.batch_size, NF, *dirs[layer].shape)
        z = z - z.mean(1, keepdim=True)
        k = dirs[layer].expand(cache.batch_size, NF, *dirs[layer].shape) + noise * z
        cache.write(layer, blk, k, torch.randn_like(k))
    return blk.frames[0]


def with_cos(u, c):
    """A unit vector whose cosine with unit ``u`` (flattened) is exactly ``c``."""
    w = torch.randn_like(u)
    w = w - (w * u).sum() * u
    w = w / w.norm()
    return c * u + math.sqrt(1 - c * c) * w


def unit(shape):
    v = torch.randn(shape)
    return v / v.norm()


def simulate(descs, sink, tau, budget):
    """Pure-Python model of the documented rules over flattened unit descriptors (one layer).

    Frames ``0..sink-1`` are sink frames; every later frame leaves fast memory in order.
    Returns the stream indices kept in slow memory."""
    slow, prev = [], descs[sink - 1] if sink else None
    for i in range(sink, len(descs)):
        d = descs[i]
        novel = prev is None or float(d @ prev) < tau
        prev = d
        if not novel:
            continue
        slow.append(i)
        if len(slow) > budget:
            red = []
            for j, s in enumerate(slow):
                p = descs[slow[j - 1]] if j else (descs[sink - 1] if sink else None)
                red.append(-math.inf if p is None else float(descs[s] @ p))
            slow.pop(red.index(max(red)))  # first maximum = oldest
    return slow


def test_promotion_only_of_novel_frames():
    cache = make_cache(num_layers=1, slow_frames=10, window_frames=2)
    a, b, c = (unit((2, 8)) for _ in range(3))
    b = with_cos(a.flatten(), 0.94).view(2, 8)  # novel w.r.t. a (0.94 < 0.95)
    c = with_cos(b.flatten(), 0.96).view(2, 8)  # redundant w.r.t. b
    seq = [a, a, a, a, b, c, c, a, a, b]
    frames = [push(cache, [d]) for d in seq]
    # frames 2.. leave fast in order; the last 2 are still in fast memory
    want = [i for i in range(2, len(seq) - 2)
            if float(seq[i].flatten() @ seq[i - 1].flatten()) < 0.95]
    assert want == [4, 7]
    assert [fr.serial for fr in cache.slow] == want
    assert cache.promoted == 2 and cache.rejected == 4
    assert [fr.serial for fr in cache.window] == [8, 9]
    assert cache.frames() == cache.sink + cache.slow + list(cache.window)
    assert frames[0] is cache.sink[0]


def test_descriptor_layers():
    """novelty_layers=[1]: a change in layer 0 alone is not novel; the default averages the
    per-layer cosines (1 and 0 -> 0.5 < tau: novel)."""
    a0, a1, b0 = unit((2, 8)), unit((2, 8)), unit((2, 8))
    for layers, promoted in ((None, 1), ([1], 0)):
        cache = make_cache(novelty_layers=layers, sink_frames=1, window_frames=1)
        push(cache, [a0, a1])
        push(cache, [b0, a1])
        push(cache, [b0, a1])  # pushes the second frame out of fast memory
        assert cache.promoted == promoted
    fid = cache.slow[0].fid if cache.slow else cache.sink[0].fid
    d = cache.descriptor(fid)
    assert d.shape == (1, 1, 16) and torch.allclose(d.norm(dim=-1), torch.ones(1, 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eviction_drops_most_redundant(seed):
    g = torch.Generator().manual_seed(seed)
    budget, sink = 4, 2
    cache = make_cache(num_layers=1, sink_frames=sink, slow_frames=budget, window_frames=2)
    # a stream of always-novel frames (cos to the previous frame < tau) with graded redundancy
    # to older content: some frames revisit a few base directions
    base = [unit((2, 8)).flatten() for _ in range(4)]
    descs = []
    for i in range(30):
        if i and torch.rand((), generator=g) < 0.5:
            d = with_cos(base[int(torch.randint(0, 4, (), generator=g))],
                         float(torch.rand((), generator=g)) * 0.9)
        else:
            d = unit((16,))
        if descs and float(d @ descs[-1]) >= 0.9:
            d = unit((16,))
        descs.append(d)
    for d in descs:
        push(cache, [d.view(2, 8)])
    got = [fr.serial for fr in cache.slow]
    # the model uses the cache's own (noise-free) descriptors: summaries are exact means
    real = {fr.serial: cache.descriptor(fr.fid)[0, 0] for fr in cache.sink + cache.slow}
    for i, d in enumerate(descs):
        assert i not in real or torch.allclose(real[i], d / d.norm(), atol=1e-5)
    want = simulate([d / d.norm() for d in descs[:-2]], sink, 0.95, budget)
    assert got == want
    assert len(cache.slow) == budget and cache.evicted == cache.promoted - budget


def test_eviction_tie_drops_older():
    cache = make_cache(num_layers=1, sink_frames=1, slow_frames=2, window_frames=1)
    a, b = torch.zeros(2, 8), torch.zeros(2, 8)
    a[0, 0], b[0, 0], b[0, 1] = 1.0, 0.6, 0.8  # exact cosines 0.6 (no noise: exact ties)
    for d in [a, b, a, b, a]:  # slow gets b(1), a(2), b(3): redundancies 0.6, 0.6, 0.6
        push(cache, [d], noise=0.0)
    assert [fr.serial for fr in cache.slow] == [2, 3]
    assert cache.evicted == 1


def test_drop_window_does_not_promote():
    cache = make_cache(num_layers=1, sink_frames=1, window_frames=3)
    for _ in range(4):
        push(cache, [unit((2, 8))])
    gone = cache.drop_window(1)
    assert len(gone) == 2 and cache.slow == [] and len(cache.window) == 1
    assert len(cache.clear_slow()) == 0


def test_memory_constant_over_10000_frames():
    cache = make_cache(num_layers=2, sink_frames=3, slow_frames=12, window_frames=6,
                       tau=0.5)
    mem0 = cache.memory_bytes()
    ptrs = [t.data_ptr() for t in cache.k + cache.v + cache.summary]
    shapes = set()
    kk = torch.randn(4, 1, 3 * NF, 2, 8)
    for i in range(0, 10_000, 3):
        blk = cache.append_frames(token_positions(torch.arange(i, i + 3), GH, GW))
        for layer in range(2):
            # odd blocks hold three identical frames: both promotions and rejections happen
            k = kk[(i // 3) % 4]
            if (i // 3) % 2:
                k = k[:, :NF].repeat(1, 3, 1, 1)
            cache.write(layer, blk, k, k)
        if i % 999 == 0:
            rd = cache.read(3, routed=True)
            dense = cache.read(3)
            shapes.add((tuple(rd.page_table.shape), tuple(rd.chunk_pages.shape),
                        tuple(dense.page_table.shape)))
            used = [p for fr in cache.frames() for p in fr.pages.flatten().tolist()]
            assert len(used) == len(set(used))
            assert len(used) + len(cache.free_pages) == cache.num_pages
            assert len({fr.fid for fr in cache.frames()}) == cache.num_frames
    assert cache.frames_written == 10_002
    assert cache.memory_bytes() == mem0
    assert [t.data_ptr() for t in cache.k + cache.v + cache.summary] == ptrs
    assert len(shapes) == 1
    assert len(cache.slow) == 12 and cache.promoted > 12 and cache.rejected > 0
    assert cache.num_pages == (3 + 12 + 6 + 3) * cache.pages_per_frame


def fill(cache, n):
    for _ in range(n):
        push(cache, [unit((cache.num_kv_heads, cache.head_dim))
                     for _ in range(cache.num_layers)])


def test_bounded_positions():
    cache = make_cache(sink_frames=3, slow_frames=12, window_frames=6)
    fill(cache, 40)
    assert len(cache.slow) == 12
    sink_t, slow_t, fast_t, q_t = cache.read_positions(3)
    assert sink_t.tolist() == [0, 1, 2]
    assert q_t.tolist() == [18, 19, 20]  # L = 3 + 12 + 6 = 21: Context Forcing's [0, 20]
    assert fast_t.tolist() == [12, 13, 14, 15, 16, 17]
    assert slow_t.min() >= 3 and slow_t.max() < 12 and (slow_t.diff() >= 0).all()
    assert len(set(slow_t.tolist())) == 9  # 12 frames spread over the 9 free positions
    # few slow frames: consecutive and right-aligned before the fast frames
    small = make_cache(sink_frames=1, slow_frames=12, window_frames=2)
    fill(small, 5)
    s, sl, f, q = small.read_positions(1)
    assert sl.tolist() == [10, 11] and f.tolist() == [12, 13] and q.tolist() == [14]
    ab = small.read_positions(1, policy="absolute")
    assert ab[1].tolist() == [fr.t for fr in small.slow] and ab[3].tolist() == [5]
    with pytest.raises(ValueError, match="policy"):
        small.read_positions(1, policy="relativistic")


def test_routed_read_layout():
    cache = make_cache(sink_frames=2, slow_frames=4, window_frames=2)
    fill(cache, 6)
    n = len(cache.slow)
    assert n == 2
    rd = cache.read(2, routed=True)
    ppf = cache.pages_per_frame
    assert rd.page_table.shape == (1, 4 * ppf) and rd.chunk_pages.shape == (1, 4, ppf)
    mand = torch.cat([fr.pages for fr in cache.sink + list(cache.window)], 1)
    assert torch.equal(rd.page_table[:, : mand.shape[1]].long(), mand)
    assert rd.chunk_valid.tolist() == [[True] * n + [False] * (4 - n)]
    assert (rd.chunk_pages[:, n:] == -1).all()
    assert rd.routed and not cache.read(2).routed
    assert rd.chunk_ids == [fr.fid for fr in cache.slow]
    assert rd.chunk_t.tolist() == cache.read_positions(2)[1].tolist()
    assert rd.frame_ids == [fr.fid for fr in cache.sink + list(cache.window)]
    cm = rd.chunk_mean(cache, 1)
    assert torch.equal(cm[0, :n], torch.stack([cache.summary[1][fr.fid][0] for fr in cache.slow]))
    assert (cm[0, n:] == 0).all()
    dense = cache.read(2)
    assert dense.page_table.shape == (1, cache.max_read_pages)
    assert dense.frame_ids == [fr.fid for fr in cache.frames()]
    with pytest.raises(ValueError, match="routed"):
        dense.chunk_mean(cache, 0)


@pytest.mark.parametrize("policy", ["bounded", "absolute"])
def test_routing_everything_equals_dense_read(policy):
    """moc_attention over a routed read with a routing that selects every valid slow frame ==
    paged_attention over the dense read (same positions)."""
    torch.manual_seed(0)
    cache = make_cache(num_layers=1, num_kv_heads=1, head_dim=16, sink_frames=1, slow_frames=5,
                       window_frames=2, tau=0.95)
    fill(cache, 9)
    n = len(cache.slow)
    assert n >= 2
    Hq = 2
    tab = lk.rope_frequencies(16, Hq, axes=(8, 4, 4), jitter_sigma=0.6)
    rd = cache.read(1, routed=True, policy=policy)
    dense = cache.read(1, policy=policy)
    N = NF
    q = torch.randn(1, N, Hq, 16)
    q_pos = token_positions(rd.q_t, GH, GW)
    kn, vn = torch.randn(1, N, 1, 16), torch.randn(1, N, 1, 16)
    idx = lk.moc_route_tiles(q, rd.chunk_mean(cache, 0), cache.slow_frames, tile_size=16,
                             chunk_valid=rd.chunk_valid, backend="torch")
    assert (idx >= 0).sum() == n * Hq
    out, lse = lk.moc_attention(q, q_pos, cache.k[0], cache.v[0], cache.pos, cache.page_len,
                                rd.page_table, tab, chunk_pages=rd.chunk_pages, routed=idx,
                                page_shift=rd.page_shift, chunk_shift=rd.chunk_shift,
                                k_new=kn, v_new=vn, tile_size=16, backend="torch")
    ref, ref_lse = lk.paged_attention(q, q_pos, cache.k[0], cache.v[0], cache.pos,
                                      cache.page_len, dense.page_table, tab, k_new=kn,
                                      v_new=vn, page_shift=dense.page_shift, backend="torch")
    assert max_err(out, ref) < 1e-5 and max_err(lse, ref_lse) < 1e-5


@pytest.mark.parametrize("routed", [False, True], ids=["dense", "routed"])
def test_state_dict_round_trip_mid_stream(routed):
    """Slow memory, descriptors, the previous frame's descriptor and the counters come back:
    a copy restored mid-stream promotes, evicts and reads exactly as the original."""
    def make():
        return make_cache(sink_frames=1, slow_frames=3, window_frames=2, tau=0.9)

    fresh = make()
    fresh.load_state_dict(make().state_dict())  # empty slow memory, no previous descriptor
    torch.manual_seed(0)
    dirs = [[unit((2, 8)) for _ in range(2)] for _ in range(16)]
    a, b = make(), make()
    for d in dirs[:9]:
        push(a, d)
    assert len(a.slow) == 3 and a.evicted > 0
    b.load_state_dict(a.state_dict())
    assert_same_state(a, b)
    for i, d in enumerate(dirs[9:]):
        assert_same_read(a.read(1, routed=routed), b.read(1, routed=routed))
        assert torch.equal(a.frame_positions(1, routed=routed), b.read(1).frame_t)
        for c in (a, b):
            torch.manual_seed(i)
            push(c, d)
    assert (a.promoted, a.rejected, a.evicted) == (b.promoted, b.rejected, b.evicted)
    assert_same_state(a, b)
    with pytest.raises(ValueError, match=r"'slow_desc'\] must hold one descriptor per slow "
                                         r"frame \(3\), got 2"):
        b.load_state_dict({**a.state_dict(), "slow_desc": a.state_dict()["slow_desc"][:2]})
    with pytest.raises(ValueError, match=r"'slow_desc'\] is torch.float32 \[3, 1, 2, 16\]; this "
                                         r"SlowFastCache needs torch.float32 \['n', 1, 1, 16\]"):
        make_cache(sink_frames=1, slow_frames=3, window_frames=2,
                   novelty_layers=[0]).load_state_dict(a.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="extra_frames"):
        make_cache(extra_frames=3)
    with pytest.raises(ValueError, match="tau"):
        make_cache(tau=1.5)
    with pytest.raises(ValueError, match="slow_frames"):
        make_cache(slow_frames=-1)
    with pytest.raises(ValueError, match="novelty_layers"):
        make_cache(novelty_layers=[5])
    cache = make_cache()
    with pytest.raises(ValueError, match="num_new"):
        cache.read(0)
    with pytest.raises(ValueError, match="limit"):
        cache.read(3, limit=2)
