"""Prompt switch recache: LongLive's one pass (which frames, positions, prompt, sink) and the
block-causal option, against independent recomputations with the tiny model; checkpoints.

Upstream facts (LongLive 1.0 ``_recache_after_switch`` and ``CausalWanSelfAttention``'s
KV-cache branch), with ``S = 3`` sink frames, ``L = 12`` frames attended, blocks of ``F = 3``,
``cur`` frames generated: the newest ``min(L, cur)`` frames go through one forward at timestep 0
under the new prompt, each attending all of them; with ``global_sink`` and ``cur > L`` the sink
keeps its old K/V and the newest ``L - S`` frames are rewritten; without it the newest ``L``
frames are rewritten and their oldest ``S`` become the sink. Our cache keeps ``W = 6`` window
frames besides the block, so the oldest ``F`` of upstream's ``L - S`` are evicted here and only
lend their K/V to the pass.
"""

from contextlib import contextmanager

import pytest
import torch

from lol_kernels.cache import PagedKVCache, build_read, token_positions
from lol_model.streaming.checkpoint import resume_stream, save_stream
from lol_model.streaming.settings import StreamSettings
from lol_model.streaming.stream import advance, encode_text, new_stream, switch_prompt

S, W, F = 3, 6, 3
L = S + W + F  # LongLive's local_attn_size = 12


pytestmark = pytest.mark.usefixtures("one_thread")


def _stream(switch: int, *, recache="longlive", global_sink=True, prompt=None, blocks=16,
            cache="sink-window"):
    return new_stream(StreamSettings(blocks=blocks, cache=cache, sink_frames=S, window_frames=W,
                                     recache=recache, global_sink=global_sink, decode=False,
                                     prompt=prompt or f"a cat[{switch}] | a dog", seed=3))


def _until_switch(st, switch: int):
    """Generate ``switch`` blocks; returns every frame's clean latent ``[B, Cz, cur, h, w]``."""
    return torch.cat([advance(st) for _ in range(switch)], dim=2)


@contextmanager
def _capture_kv(model):
    """Every layer's un-rotated self-attention ``k, v [B, N, H, D]`` of the next forward."""
    got, hooks = {}, []
    H, D = model.cfg.num_heads, model.cfg.head_dim
    for i, blk in enumerate(model.blocks):
        for name, mod in (("k", blk.self_attn.norm_k), ("v", blk.self_attn.v)):
            hooks.append(mod.register_forward_hook(
                lambda m, a, out, key=(name, i): got.__setitem__(key, out.unflatten(-1, (H, D)))))
    try:
        yield got
    finally:
        for h in hooks:
            h.remove()


def _ref_kv(st, x, frame_t, text_kv, ctx=None):
    """Reference K/V ``{(name, layer): [B, n*Nf, H, D]}`` of frames ``x`` at ``frame_t``, each
    attending all of them (and ``ctx = (t, {(name, layer): K/V})``, old K/V of frames at ``t``)
    at timestep 0. Without context: dense ``forward_full``; with it: a fresh cache."""
    zeros = torch.zeros(x.shape[0], x.shape[2])
    with _capture_kv(st.model) as got:
        if ctx is None:
            st.model.forward_full(x, zeros, text_kv, frame_t=frame_t)
        else:
            t, kv = ctx
            gh, gw = st.model.grid(x.shape[3], x.shape[4])
            fresh = st.model.new_cache(frame_tokens=gh * gw, sink_frames=len(t),
                                       window_frames=L, block_frames=1)
            Nf = gh * gw
            for j, tj in enumerate(t):
                blk = fresh.append_frames(token_positions([tj], gh, gw))
                for layer in range(st.model.cfg.num_layers):
                    sl = slice(j * Nf, (j + 1) * Nf)
                    fresh.write(layer, blk, kv["k", layer][:, sl], kv["v", layer][:, sl])
            read = build_read(fresh, fresh.frames(), t, frame_t)
            st.model(x, zeros, text_kv, fresh, read)
    return dict(got)


def _cached_kv(cache, frames):
    """``{(name, layer): [B, n*Nf, H, D]}`` K/V the cache holds for ``frames``."""
    slots = cache.rewrite_block(frames).slots  # [B, n*Nf]
    P, Sz = cache.num_pages, cache.page_size
    out = {}
    for layer in range(cache.num_layers):
        for name, pool in (("k", cache.k[layer]), ("v", cache.v[layer])):
            flat = pool.view(P * Sz, cache.num_kv_heads, cache.head_dim)
            out[name, layer] = flat[slots.reshape(-1)].view(*slots.shape, *flat.shape[1:])
    return out


def _frames_of(kv, idx, Nf):
    """The tokens of chunk frames ``idx`` of a ``{key: [B, n*Nf, H, D]}`` dict."""
    rows = torch.cat([torch.arange(i * Nf, (i + 1) * Nf) for i in idx])
    return {k: v[:, rows] for k, v in kv.items()}


def _close(a, b):
    return all(torch.allclose(a[k], b[k], rtol=1e-4, atol=2e-5) for k in a)


def _differ(a, b):
    """Differ under another prompt: every layer past the first (layer 0's K/V see no text)."""
    return all((a[k] - b[k]).abs().max() > 1e-3 for k in a if k[1] > 0)


# (cur blocks, global_sink) -> recomputed frames (generation order, = their positions), the
# frames written back (read order: sink, window), the sink after the switch
CASES = {
    (10, True): (range(21, 30), [0, 1, 2, *range(24, 30)], [0, 1, 2]),
    (10, False): (range(18, 30), [18, 19, 20, *range(24, 30)], [18, 19, 20]),
    (2, True): (range(0, 6), list(range(6)), [0, 1, 2]),
    (2, False): (range(0, 6), list(range(6)), [0, 1, 2]),
    (4, True): (range(0, 12), [0, 1, 2, *range(6, 12)], [0, 1, 2]),  # cur = L: 3..5 evicted
    (4, False): (range(0, 12), [0, 1, 2, *range(6, 12)], [0, 1, 2]),
}


@pytest.mark.parametrize("switch, global_sink", list(CASES),
                         ids=[f"cur{3 * b}-{'global' if g else 'local'}" for b, g in CASES])
def test_longlive_recache_frames_positions_prompt(switch, global_sink):
    st = _stream(switch, global_sink=global_sink)
    x = _until_switch(st, switch)
    Nf = st.cache.frame_tokens
    before = _cached_kv(st.cache, st.cache.sink)
    old_text = st.text_kv
    switch_prompt(st)
    assert st.segment == 1
    redo, written, sink = CASES[switch, global_sink]
    frames = st.cache.frames()
    assert [fr.serial for fr in frames] == written and [fr.t for fr in frames] == written
    assert [fr.serial for fr in st.cache.sink] == sink
    for fr in frames:  # stored positions of every token follow the frame (a refilled sink too)
        slots = st.cache.rewrite_block([fr]).slots.reshape(-1)
        assert (st.cache.pos.view(-1, 3)[slots, 0] == fr.t).all()

    redo = list(redo)
    ctx = None
    if redo[0] > 0 and global_sink:  # the old sink is attended with its old K/V
        ctx = ([0, 1, 2], before)
    want = {s: redo.index(s) for s in written if s in redo}
    new_ref = _ref_kv(st, x[:, :, redo], redo, st.text_kv, ctx)
    old_ref = _ref_kv(st, x[:, :, redo], redo, old_text, ctx)
    rewritten = [fr for fr in frames if fr.serial in want]
    got = _cached_kv(st.cache, rewritten)
    idx = [want[fr.serial] for fr in rewritten]
    assert _close(got, _frames_of(new_ref, idx, Nf))  # the new prompt, these frames, one pass
    assert _differ(got, _frames_of(old_ref, idx, Nf))  # not the old prompt

    sink_now = _cached_kv(st.cache, st.cache.sink)
    assert all(v.abs().amax() > 0 for v in sink_now.values())  # never zeroed
    if ctx is not None:
        assert all(torch.equal(sink_now[k], before[k]) for k in before)  # global sink kept
    else:  # recomputed under the new prompt; layer 0's K/V see only latents and timestep
        assert not any(torch.equal(sink_now[k], before[k]) for k in before if k[1] > 0)

    # the next block attends the sink, the window and itself, then evicts the F oldest
    read = st.cache_cfg.read(st.cache, F)
    assert read.frame_t.tolist() == written and read.q_t.tolist() == [3 * switch + i
                                                                       for i in range(F)]
    advance(st)
    assert [fr.t for fr in st.cache.frames()] == sink + [t for t in written[len(sink):]
                                                         if t >= 3 * switch - W + F] + \
        [3 * switch + i for i in range(F)]


def test_recache_history_is_bounded_and_follows_the_span():
    st = _stream(20)
    for _ in range(7):
        advance(st)
    assert [s for s, _, _ in st.recent] == list(range(21 - L, 21))
    assert st.cache_cfg.recache_span(st.cache) == L
    bc = _stream(20, recache="block-causal")
    advance(bc)
    assert bc.recent == []  # only the LongLive recache keeps evicted frames


def test_block_causal_recache_still_recomputes_block_by_block():
    st = _stream(10, recache="block-causal")
    x = _until_switch(st, 10)
    frames = st.cache.frames()
    t = [fr.t for fr in frames]
    switch_prompt(st)
    assert [fr.t for fr in st.cache.frames()] == t == [0, 1, 2, *range(24, 30)]
    zeros = torch.zeros(1, len(t))
    with _capture_kv(st.model) as ref:  # read order, F frames a chunk, block-causal
        st.model.forward_full(x[:, :, t], zeros, st.text_kv, frame_t=t, block_frames=F)
    assert _close(_cached_kv(st.cache, frames), dict(ref))


def test_longlive_after_a_hard_cut_restarts_from_the_kept_frames():
    st = _stream(0, prompt="a cat[6] | a dog[3#] | a bird")
    for _ in range(7):
        advance(st)  # the cut at block 6 kept the sink and frames 16, 17
    assert [s for s, _, _ in st.recent] == [0, 1, 2, 16, 17, 18, 19, 20]
    for _ in range(2):
        advance(st)
    assert [s for s, _, _ in st.recent] == [2, 16, 17, *range(18, 27)]  # the newest L
    sink = _cached_kv(st.cache, st.cache.sink)
    t = [fr.t for fr in st.cache.frames()]
    switch_prompt(st)  # soft switch at block 9: sink kept, frames 18..26 recomputed in one pass
    assert st.segment == 2 and [fr.serial for fr in st.cache.sink] == [0, 1, 2]
    assert [fr.t for fr in st.cache.frames()] == t
    now = _cached_kv(st.cache, st.cache.sink)
    assert all(torch.equal(now[k], sink[k]) for k in sink)


def test_longlive_refuses_slow_memory():
    st = new_stream(StreamSettings(blocks=4, cache="slow-fast", window_frames=2,
                                   recache="longlive", prompt="a cat[2] | a dog", decode=False))
    for _ in range(2):
        advance(st)
    with pytest.raises(ValueError, match="block-causal"):
        advance(st)


@pytest.mark.parametrize("global_sink", [True, False], ids=["global", "local"])
def test_resume_across_longlive_switches_is_bit_exact(tmp_path, global_sink):
    prompt = "a cat[10] | a dog[2] | a bird"  # switches at blocks 10 and 12
    full = _stream(0, global_sink=global_sink, prompt=prompt, blocks=14)
    want = [advance(full) for _ in range(14)]
    part = _stream(0, global_sink=global_sink, prompt=prompt, blocks=14)
    got = [advance(part) for _ in range(9)]
    for stop in (11, 14):  # checkpoints before and right after the first switch
        save_stream(part, str(tmp_path / "ck"))
        del part
        part = _stream(0, global_sink=global_sink, prompt=prompt, blocks=14)
        resume_stream(part, str(tmp_path / "ck"))
        assert len(part.recent) == L
        got += [advance(part) for _ in range(stop - part.block)]
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert [fr.serial for fr in part.cache.sink] == ([0, 1, 2] if global_sink else [24, 25, 26])


def test_reassign_moves_frames_and_refuses_stale_blocks():
    c = PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=8, frame_tokens=4, sink_frames=2,
                     window_frames=2, block_frames=2, page_size=16)
    old = c.append_frames(token_positions([0, 1], 2, 2))
    c.append_frames(token_positions([2, 3], 2, 2))
    c.append_frames(token_positions([4, 5], 2, 2))  # frames 2, 3 leave the window
    with pytest.raises(ValueError, match="held by other"):
        c.reassign(c.sink, [4, 5], [4, 9])  # serial 4 is a window frame
    blk = c.reassign(c.sink, [2, 3], [2, 3])
    assert [(fr.serial, fr.t) for fr in c.frames()] == [(2, 2), (3, 3), (4, 4), (5, 5)]
    assert all(fr.sink for fr in c.sink)
    assert [fr.fid for fr in c.sink] == [fr.fid for fr in old.frames]  # same slots and pages
    assert (c.pos.view(-1, 3)[blk.slots.reshape(-1), 0] == torch.tensor([2] * 4 + [3] * 4)).all()
    k = torch.randn(1, 8, 1, 8)
    c.write(0, blk, k, k)
    with pytest.raises(ValueError, match="stale"):
        c.write(0, old, k, k)  # the old sink's block names frames that are gone
    d = PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=8, frame_tokens=4, sink_frames=2,
                     window_frames=2, block_frames=2, page_size=16)
    d.load_state_dict(c.state_dict())
    assert [(fr.serial, fr.t, fr.sink) for fr in d.frames()] == \
        [(fr.serial, fr.t, fr.sink) for fr in c.frames()]
    with pytest.raises(ValueError, match="one value per frame"):
        c.reassign(c.sink, [2], [2, 3])


def test_model_write_names_the_last_frames_of_x():
    st = _stream(4)
    advance(st)
    blk = st.cache.rewrite_block(st.cache.frames()[:2])
    x = torch.randn(1, st.model.cfg.in_channels, 1, 8, 8)
    with pytest.raises(ValueError, match="write must name"):
        st.model(x, torch.zeros(1, 1), encode_text(st, 0), st.cache,
                 build_read(st.cache, [], [], [5]), write=blk)
