"""Paged sink + window cache: fixed memory, eviction order, policies' exact positions, state."""


import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lol_kernels as lk
from lol_kernels.cache import PagedKVCache, bounded, cut, flush, read_cache, token_positions
from lol_kernels.rope.reference import apply_rope_reference
from tests.support import max_err
from tests.support.cache_checks import assert_same_read, assert_same_state


def small_cache(**kw):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=16, frame_tokens=40, sink_frames=2,
                window_frames=4, block_frames=2, page_size=16)
    return PagedKVCache(**(args | kw))


def push(cache, t0, F, kv=True):
    blk = cache.append_frames(token_positions(torch.arange(t0, t0 + F), 5, 8,
                                              cache.batch_size))
    if kv:
        for layer in range(cache.num_layers):
            shape = (cache.batch_size, F * cache.frame_tokens, cache.num_kv_heads,
                     cache.head_dim)
            cache.write(layer, blk, torch.randn(shape), torch.randn(shape))
    return blk


def test_layout_and_frame_spanning_pages():
    c = small_cache(batch_size=2)
    assert c.pages_per_frame == 3  # 40 tokens on pages of 16: 16 + 16 + 8
    assert c.num_pages == (2 + 4 + 2) * 2 * 3
    blk = push(c, 0, 2)
    fr = blk.frames[0]
    assert fr.pages.shape == (2, 3)
    assert c.page_len[fr.pages[0]].tolist() == [16, 16, 8]
    # every token's stored position is (t, row, col) of its frame
    pos = c.pos.view(-1, 3)[blk.slots[1]]
    assert torch.equal(pos, token_positions(torch.arange(2), 5, 8)[0].to(torch.int32))


def test_write_roundtrip_and_summary():
    c = small_cache()
    blk = c.append_frames(token_positions(torch.tensor([0, 1]), 5, 8))
    k = torch.randn(1, 80, 2, 16)
    v = torch.randn(1, 80, 2, 16)
    c.write(1, blk, k, v)
    assert torch.equal(c.k[1].view(-1, 2, 16)[blk.slots[0]], k[0])
    assert torch.equal(c.v[1].view(-1, 2, 16)[blk.slots[0]], v[0])
    for f, fr in enumerate(blk.frames):
        want = k[:, 40 * f:40 * (f + 1)].mean(dim=1)
        assert torch.allclose(c.summary[1][fr.fid], want, atol=1e-6)


def test_ten_thousand_frames_constant_memory_sink_pinned_oldest_evicted():
    c = small_cache(num_layers=1, frame_tokens=20, sink_frames=3, window_frames=5,
                    block_frames=3)
    ptrs = [t.data_ptr() for t in c.k + c.v + c.summary + [c.pos, c.page_len]]
    shapes = [t.shape for t in c.k + c.v + c.summary + [c.pos, c.page_len]]
    mem = c.memory_bytes()
    sink_pages = None
    t = 0
    while t < 10_000:
        F = 1 + (t % 3)
        before = [fr.serial for fr in c.window]
        blk = c.append_frames(token_positions(torch.arange(t, t + F), 4, 5))
        t += F
        if sink_pages is None and len(c.sink) == 3:
            sink_pages = [fr.pages.clone() for fr in c.sink]
        assert len(c.sink) == min(3, t) and len(c.window) <= 5
        # the window holds exactly the newest frames, in order: eviction took the oldest
        after = [fr.serial for fr in c.frames()]
        assert after == sorted(after) and after[-1] == c.frames_written - 1
        gone = set(before) - set(after)
        assert all(s < min(fr.serial for fr in c.window) for s in gone)
        assert len(c.free_pages) + sum(fr.pages.numel() for fr in c.frames()) == c.num_pages
        assert blk.frames[-1].t == t - 1
    assert [fr.t for fr in c.sink] == [0, 1, 2]
    assert all(torch.equal(a, fr.pages) for a, fr in zip(sink_pages, c.sink))
    assert [fr.t for fr in c.window] == list(range(t - 5, t))
    assert [x.data_ptr() for x in c.k + c.v + c.summary + [c.pos, c.page_len]] == ptrs
    assert [x.shape for x in c.k + c.v + c.summary + [c.pos, c.page_len]] == shapes
    assert c.memory_bytes() == mem


def test_read_stays_valid_through_write_pass():
    """Pages evicted by append_frames are reused only by the next append."""
    c = small_cache()
    t = 0
    for _ in range(6):
        push(c, t, 2)
        t += 2
    read = read_cache(c, 2, "absolute")
    snapshot = c.k[0][read.page_table[0][read.page_table[0] >= 0].long()].clone()
    push(c, t, 2)  # evicts two window frames, writes the new block
    after = c.k[0][read.page_table[0][read.page_table[0] >= 0].long()]
    assert torch.equal(snapshot, after)


def test_absolute_positions():
    c = small_cache()
    for t0 in (0, 2, 4, 6, 8):
        push(c, t0, 2, kv=False)
    r = read_cache(c, 2, "absolute")
    assert r.frame_t.tolist() == [0, 1, 6, 7, 8, 9]  # sink 0,1 + window of 4
    assert r.q_t.tolist() == [10, 11]
    assert r.page_shift is None
    assert r.page_table.shape == (1, c.max_read_pages)


def test_relativistic_positions():
    c = small_cache()
    for t0 in (0, 2, 4, 6, 8):
        push(c, t0, 2, kv=False)
    r = read_cache(c, 2, "relativistic")
    assert r.frame_t.tolist() == [0, 1, 2, 3, 4, 5]
    assert r.q_t.tolist() == [6, 7]
    # page_shift re-bases each page: stored t + shift = read t, on axis 0 only
    stored = [0, 1, 6, 7, 8, 9]
    want = torch.tensor([rt - st for rt, st in zip(range(6), stored)]).repeat_interleave(3)
    assert torch.equal(r.page_shift[0, :18, 0].long(), want)
    assert torch.all(r.page_shift[..., 1:] == 0)
    r = read_cache(c, 2, "relativistic", max_frames=21)
    assert r.frame_t.tolist() == [0, 1, 2, 3, 4, 5] and r.q_t.tolist() == [19, 20]
    with pytest.raises(ValueError, match="max_frames"):
        read_cache(c, 2, "relativistic", max_frames=7)


def test_bounded_positions():
    c = small_cache(sink_frames=2, window_frames=6)
    for t0 in range(0, 16, 2):
        push(c, t0, 2, kv=False)
    r = bounded(c, 2)  # L = 8: sink 0,1; block 6,7; window right-aligned before 6, clamped at 2
    assert r.q_t.tolist() == [6, 7]
    assert r.frame_t.tolist() == [0, 1, 2, 2, 2, 3, 4, 5]
    r = bounded(c, 2, limit=21)
    assert r.frame_t.tolist() == [0, 1, 13, 14, 15, 16, 17, 18] and r.q_t.tolist() == [19, 20]
    assert int(r.frame_t.max()) < 21


def test_flush_keeps_sink_and_last_two():
    c = small_cache(window_frames=6)
    for t0 in (0, 2, 4, 6):
        push(c, t0, 2, kv=False)
    free_before = len(c.free_pages)
    gone = flush(c)
    assert [fr.t for fr in c.sink] == [0, 1] and [fr.t for fr in c.window] == [6, 7]
    assert [fr.t for fr in gone] == [2, 3, 4, 5]
    assert len(c.free_pages) == free_before + 4 * c.pages_per_frame


def test_cut_positions():
    c = small_cache()
    for t0 in (0, 2, 4):
        push(c, t0, 2, kv=False)
    r = cut(read_cache(c, 3, "relativistic"))
    assert r.q_t.tolist() == [45, 46, 47]
    with pytest.raises(ValueError, match="start"):
        cut(read_cache(c, 3, "absolute"), start=3)


@pytest.mark.parametrize("policy", ["absolute", "relativistic", "bounded"])
def test_state_dict_round_trip_mid_stream(policy):
    """A copy restored mid-stream (in place: same storage) streams on bit-identically."""
    a, b = small_cache(batch_size=2, window_frames=3), small_cache(batch_size=2, window_frames=3)
    for i in range(5):
        torch.manual_seed(i)
        push(a, 2 * i, 2)
    pools = [(x.data_ptr(), x.shape) for x in b.k + b.v + b.summary + [b.pos, b.page_len]]
    b.load_state_dict(a.state_dict())
    assert [(x.data_ptr(), x.shape) for x in b.k + b.v + b.summary + [b.pos, b.page_len]] == pools
    assert_same_state(a, b)
    assert [fr.serial for fr in b.frames()] == [0, 1, 7, 8, 9]
    for i in range(5, 9):
        ra, rb = a.read(2, policy=policy), b.read(2, policy=policy)
        assert_same_read(ra, rb)
        assert torch.equal(a.frame_positions(2, policy=policy), ra.frame_t)
        for c in (a, b):
            torch.manual_seed(i)
            push(c, 2 * i, 2)
    assert_same_state(a, b)


def test_load_state_dict_rejects_what_does_not_fit():
    a = small_cache()
    push(a, 0, 2)
    state = a.state_dict()
    b = small_cache()
    with pytest.raises(ValueError, match=r"state_dict\['k\.0'\] is torch.float32 \[\d+, 16, 2, "
                                         r"16\]; this PagedKVCache needs torch.float32 \[\d+, 16, "
                                         r"2, 8\]"):
        small_cache(head_dim=8).load_state_dict(state)
    with pytest.raises(ValueError, match=r"'k\.0'\] is torch.float32 .*needs torch.float64"):
        small_cache(dtype=torch.float64).load_state_dict(state)
    with pytest.raises(ValueError, match=r"'sink\.pages'\] is torch.int64 \[2, 1, 2\]; this "
                                         r"PagedKVCache needs torch.int64 \['n', 1, 3\]"):
        b.load_state_dict({**state, "sink.pages": state["sink.pages"][..., :2]})
    with pytest.raises(ValueError, match=r"missing keys \['next_t'\], unexpected keys \['x'\]"):
        b.load_state_dict({**{k: v for k, v in state.items() if k != "next_t"}, "x": state["pos"]})
    with pytest.raises(ValueError, match="share out the cache's 24 pages exactly once"):
        b.load_state_dict({**state, "free_pages": state["free_pages"][1:]})
    with pytest.raises(TypeError, match=r"state_dict\['next_t'\] must be a tensor"):
        b.load_state_dict({**state, "next_t": 2})
    assert b.num_frames == 0 and not b.k[0].any()  # failed loads change nothing
    b.load_state_dict(state)
    assert_same_state(a, b)


def test_cache_read_attention_equals_dense():
    """Attention through the cache (with a relativistic read) equals dense attention on the
    same keys rotated at the read positions."""
    c = small_cache(num_layers=1, batch_size=2)
    H, D = 4, 16
    table = lk.rope_frequencies(D, H, jitter_sigma=0.7)
    ks, vs = [], []
    for t0 in (0, 2, 4, 6, 8):
        blk = c.append_frames(token_positions(torch.arange(t0, t0 + 2), 5, 8, 2))
        k, v = torch.randn(2, 80, 2, D), torch.randn(2, 80, 2, D)
        c.write(0, blk, k, v)
        ks.append(k), vs.append(v)
    r = read_cache(c, 2, "relativistic")
    q = torch.randn(2, 80, H, D, dtype=torch.float64)
    qp = token_positions(r.q_t, 5, 8, 2)
    out, lse = lk.paged_attention(q, qp, c.k[0].double(), c.v[0].double(), c.pos, c.page_len,
                                  r.page_table, table, page_shift=r.page_shift)
    # dense: frames kept = sink (block 0) + window (blocks 3, 4), read at t = 0..5
    K = torch.cat([ks[0], ks[3], ks[4]], 1).double().repeat_interleave(2, dim=2)
    V = torch.cat([vs[0], vs[3], vs[4]], 1).double().repeat_interleave(2, dim=2)
    kp = token_positions(torch.arange(6), 5, 8, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", apply_rope_reference(q, qp, table),
                     apply_rope_reference(K, kp, table)) * D**-0.5
    want = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), V)
    assert max_err(out, want) < 1e-10
    assert max_err(lse, s.logsumexp(-1)) < 1e-5


@pytest.mark.parametrize("kw,exc,needle", [
    (dict(page_size=24), ValueError, "page_size"), (dict(page_size=8), ValueError, "page_size"),
    (dict(window_frames=0), ValueError, "window_frames"), (dict(num_layers=0), ValueError, "num_layers"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
])
def test_cache_rejects_config(kw, exc, needle):
    with pytest.raises(exc, match=needle):
        small_cache(**kw)


def test_cache_rejects_appends_and_writes():
    c = small_cache()
    with pytest.raises(ValueError, match="pos must have shape"):
        c.append_frames(torch.zeros(1, 41, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="frames"):
        c.append_frames(token_positions(torch.arange(3), 5, 8))
    with pytest.raises(TypeError, match="pos must be an integer"):
        c.append_frames(token_positions(torch.arange(1), 5, 8).float())
    bad = token_positions(torch.arange(1), 5, 8).clone()
    bad[0, 3, 0] = 7
    with pytest.raises(ValueError, match="one temporal position per frame"):
        c.append_frames(bad)
    blk = c.append_frames(token_positions(torch.arange(1), 5, 8))
    with pytest.raises(ValueError, match="k must have shape"):
        c.write(0, blk, torch.randn(1, 39, 2, 16), torch.randn(1, 40, 2, 16))
    with pytest.raises(ValueError, match="layer"):
        c.write(5, blk, torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16))
    with pytest.raises(ValueError, match="policy"):
        read_cache(c, 1, "sliding")
    with pytest.raises(ValueError, match="keep_last"):
        flush(c, keep_last=-1)


@settings(max_examples=20, deadline=None)
@given(sink=st.integers(0, 2), window=st.integers(1, 4), block=st.integers(1, 3),
       page=st.sampled_from([16, 32]), grid=st.sampled_from([(3, 5), (4, 9)]),
       steps=st.integers(1, 6), policy=st.sampled_from(["absolute", "relativistic", "bounded"]),
       seed=st.integers(0, 2**16))
def test_property_policy_reads_match_dense_float64(sink, window, block, page, grid, steps,
                                                   policy, seed):
    """Any stream, any policy: attention through the read equals float64 dense attention over
    the kept frames' keys rotated at the read's positions."""
    torch.manual_seed(seed)
    gh, gw = grid
    Nf, H, D = gh * gw, 2, 16
    c = PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=D, frame_tokens=Nf,
                     sink_frames=sink, window_frames=window, block_frames=block, page_size=page)
    keys, vals, t = {}, {}, 0
    for _ in range(steps):
        blk = c.append_frames(token_positions(torch.arange(t, t + block), gh, gw))
        k, v = torch.randn(1, block * Nf, 1, D), torch.randn(1, block * Nf, 1, D)
        c.write(0, blk, k, v)
        for f, fr in enumerate(blk.frames):
            keys[fr.serial], vals[fr.serial] = k[:, f * Nf:(f + 1) * Nf], v[:, f * Nf:(f + 1) * Nf]
        t += block
    # a bounded read needs room for sink, block and one window frame (else it is rejected)
    assume(policy != "bounded" or c.sink_frames + c.window_frames >= len(c.sink) + block + 1)
    r = read_cache(c, block, policy)
    table = lk.rope_frequencies(D, H, axes=(8, 4, 4), jitter_sigma=0.5, seed=seed)
    q = torch.randn(1, block * Nf, H, D, dtype=torch.float64)
    qp = token_positions(r.q_t, gh, gw)
    out, _ = lk.paged_attention(q, qp, c.k[0].double(), c.v[0].double(), c.pos, c.page_len,
                                r.page_table, table, page_shift=r.page_shift)
    frames = c.frames()
    assert [fr.fid for fr in frames] == r.frame_ids
    K = torch.cat([keys[fr.serial] for fr in frames], 1).double().expand(-1, -1, H, -1)
    V = torch.cat([vals[fr.serial] for fr in frames], 1).double().expand(-1, -1, H, -1)
    kp = token_positions(r.frame_t, gh, gw)
    s = torch.einsum("bqhd,bkhd->bhqk", apply_rope_reference(q, qp, table),
                     apply_rope_reference(K, kp, table)) * D**-0.5
    want = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), V)
    assert max_err(out, want) < 1e-10
