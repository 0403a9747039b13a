"""Cache presets speak upstream's language.

For every preset, 16 blocks of 3 frames: the frames each block attends (cached frames in read
order, then its own), the temporal position each is read at, and the order frames leave the
cache. ``longlive``, ``lol``, ``sink-window``, ``self-forcing`` and ``self-forcing-rolling`` are
compared with :func:`upstream_blocks`, a replay of the index arithmetic of LongLive 1.0 and
Self-Forcing's ``CausalWanSelfAttention`` (rolling buffer, sink protection, attention budget)
written from reading that code; the other presets with the rules their docstrings state.
Then that a default stream attends what LongLive attends (the command line's options:
tests/cli/test_presets.py).
"""

from __future__ import annotations

import pytest
import torch

from lol_kernels.cache import token_positions
from lol_model.model.config import ModelConfig
from lol_model.model.transformer import CausalWanModel
from lol_model.streaming.presets import CACHES, get_cache_config
from lol_model.streaming.settings import StreamSettings
from lol_model.streaming.stream import advance, new_stream

F = 3  # frames a block (upstream's num_frame_per_block)
BLOCKS = 16
GLOBAL_FRAMES = 21  # Self-Forcing's global buffer: 32760 tokens / 1560 tokens a frame


# --------------------------------------------------------------------------- upstream replay
def upstream_blocks(sink: int, local_attn: int, blocks: int, block: int = F):
    """Replay upstream's KV-cache index arithmetic in frames, block by block.

    ``local_attn = -1`` is the global cache: a buffer of ``GLOBAL_FRAMES`` frames that never
    rolls (``OverflowError`` once a block no longer fits, where upstream's slice assignment
    fails). Otherwise the buffer holds ``local_attn`` frames; the first forward of a block that
    does not fit evicts ``block + local_end - local_attn`` frames just after the sink and shifts
    the rest left; the block is written at ``[local_end - block, local_end)``. The block
    attends the sink region ``[0, sink)`` plus ``[max(sink, local_end - (budget - sink)),
    local_end)`` (LongLive; with no sink, ``[max(0, local_end - budget), local_end)``, which is
    Self-Forcing's rule for every sink), ``budget`` being ``max_attention_size`` in frames.
    The block's later forwards (same ``current_end``) rewrite the same slots and move nothing.

    Returns per block ``(attended, evicted)``: frame indices in buffer order (the block's own
    last) and the frames evicted when the block started. Keys are rotated at their absolute
    frame index, so a frame's read position is its index.
    """
    if sink > block:
        raise ValueError("with sink > block upstream attends unwritten (zero) sink slots")
    rolling = local_attn != -1
    cap = local_attn if rolling else GLOBAL_FRAMES
    budget = cap
    buf: list[int | None] = [None] * cap
    local_end = global_end = 0
    out = []
    for b in range(blocks):
        current_end = (b + 1) * block
        evicted: list[int] = []
        if rolling and current_end > global_end and block + local_end > cap:
            n_evict = block + local_end - cap
            n_roll = local_end - n_evict - sink
            evicted = buf[sink : sink + n_evict]
            buf[sink : sink + n_roll] = buf[sink + n_evict : sink + n_evict + n_roll]
            local_end = local_end + current_end - global_end - n_evict
        else:
            local_end = local_end + current_end - global_end
        if local_end > cap:
            raise OverflowError(f"block {b} does not fit the {cap}-frame global cache")
        buf[local_end - block : local_end] = range(b * block, current_end)
        global_end = current_end
        if sink > 0:
            lo = max(sink, local_end - (budget - sink))
            attended = buf[:sink] + buf[lo:local_end]
        else:
            attended = buf[max(0, local_end - budget) : local_end]
        assert None not in attended
        out.append((attended, evicted))
    return out


# --------------------------------------------------------------------------- rules of our own
def own_blocks(sink: int, window: int, blocks: int, *, policy: str, slow: int = 0,
               block: int = F):
    """The other presets' documented rules: the first ``sink`` frames pinned, ``window``
    frames kept besides the block (oldest leaves first), frames leaving the window enter a
    FIFO slow memory of ``slow`` frames (with nothing written every frame is novel and every
    redundancy tie drops the oldest). Returns per block ``(cached, slow_frames, read positions
    of cached + slow, q positions, evicted)`` with positions by ``policy``."""
    sink_f, win, slow_f = [], [], []
    out, gone = [], []
    for b in range(blocks):
        ns, nl, nw = len(sink_f), len(slow_f), len(win)
        if policy == "absolute":
            pos = sink_f + slow_f + win
            q = list(range(b * block, (b + 1) * block))
        elif policy == "relativistic":
            pos = list(range(ns + nw))
            q = list(range(ns + nw, ns + nw + block))
        else:  # bounded to [0, L), L = sink + min(slow, 12) + window
            L = sink + min(slow, 12) + window
            fast = [max(ns, t) for t in range(L - block - nw, L - block)]
            hi = max(ns, L - block - nw)
            R = hi - ns
            if nl <= R:
                slow_t = list(range(hi - nl, hi))
            else:
                slow_t = [ns + i * R // nl for i in range(nl)]
            pos = list(range(ns)) + slow_t + fast
            q = list(range(L - block, L))
        out.append((sink_f + win, list(slow_f), pos, q, gone))
        gone = []
        for f in range(b * block, (b + 1) * block):
            (sink_f if len(sink_f) < sink else win).append(f)
        while len(win) > window:
            f = win.pop(0)
            if slow:
                slow_f.append(f)
                if len(slow_f) > slow:
                    gone.append(slow_f.pop(0))
            else:
                gone.append(f)
    return out


# --------------------------------------------------------------------------- our cache
@pytest.fixture(scope="module")
def model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CausalWanModel(ModelConfig.preset("tiny")).eval()


def drive(cfg, model, blocks: int = BLOCKS):
    """Run ``blocks`` block reads + appends on ``cfg``'s cache (no K/V written). Per block:
    ``(attended, positions, chunks, chunk positions, evicted after it)``: frames by write
    order (``Frame.serial``), cached in read order, then the block's own."""
    cache = cfg.new_cache(model, frame_tokens=4, block_frames=F)
    out = []
    for b in range(blocks):
        read = cfg.read(cache, F)
        serial = {fr.fid: fr.serial for fr in cache.frames()}
        before = set(serial.values())
        if not read.routed:
            assert read.frame_ids == [fr.fid for fr in cache.frames()]  # read order
        new = list(range(b * F, (b + 1) * F))
        attended = [serial[f] for f in read.frame_ids] + new
        chunks = [serial[f] for f in read.chunk_ids] if read.routed else []
        chunk_t = read.chunk_t.tolist() if read.routed else []
        positions = read.frame_t.tolist() + read.q_t.tolist()
        cache.append_frames(token_positions(read.q_t, 2, 2))
        evicted = sorted((before | set(new)) - {fr.serial for fr in cache.frames()})
        out.append((attended, positions, chunks, chunk_t, evicted))
    return out


UPSTREAM = {  # preset: (sink_size, local_attn_size) of the upstream configuration it equals
    "longlive": (3, 12), "lol": (3, 12), "sink-window": (3, 12),
    "self-forcing-rolling": (0, 9),
}


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_preset_attends_what_upstream_attends(name, model):
    sink, local = UPSTREAM[name]
    cfg = get_cache_config(name)
    assert (cfg.sink_frames, cfg.local_attn_size, cfg.policy) == (sink, local, "absolute")
    ours, up = drive(cfg, model), upstream_blocks(sink, local, BLOCKS)
    for b, ((att, pos, _, _, evicted), (up_att, _)) in enumerate(zip(ours, up)):
        assert att == up_att, f"block {b}"
        assert pos == up_att, f"block {b}: keys are read at their absolute frame index"
        assert len(att) == min(local, (b + 1) * F)
        if b + 1 < BLOCKS:
            assert evicted == up[b + 1][1], f"frames evicted before block {b + 1}"
    # oldest first, the sink never: all but the sink and the newest local - F frames are gone
    gone = [f for o in ours for f in o[4]]
    assert gone == list(range(sink, sink + BLOCKS * F - (local - F)))


def test_longlive_in_numbers(model):
    """3 sink + 6 cached + 3 new, spelled out (docs/design.md, LongLive's yaml)."""
    ours = drive(get_cache_config("longlive"), model, 6)
    assert [o[0] for o in ours] == [
        [0, 1, 2], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7, 8],
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14],
        [0, 1, 2, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    assert [o[4] for o in ours][:5] == [[], [], [], [3, 4, 5], [6, 7, 8]]


def test_self_forcing_is_the_global_cache_then_rolls(model):
    """Identical to Self-Forcing's global cache (``local_attn_size=-1``) while upstream can
    run (21 frames = 7 blocks); upstream's buffer is then full, and the preset rolls as
    Self-Forcing's rolling cache of ``local_attn_size=21``."""
    cfg = get_cache_config("self-forcing")
    assert (cfg.sink_frames, cfg.local_attn_size, cfg.window_for(F)) == (0, 21, 18)
    ours = drive(cfg, model)
    glob = upstream_blocks(0, -1, GLOBAL_FRAMES // F)
    with pytest.raises(OverflowError):
        upstream_blocks(0, -1, GLOBAL_FRAMES // F + 1)
    for b, (att, _) in enumerate(glob):
        assert ours[b][0] == ours[b][1] == att == list(range((b + 1) * F))
    rolling = upstream_blocks(0, 21, BLOCKS)
    assert [o[0] for o in ours] == [o[1] for o in ours] == [a for a, _ in rolling]
    assert [o[4] for o in ours[:-1]] == [e for _, e in rolling[1:]]
    assert ours[-1][0] == list(range(BLOCKS * F - 21, BLOCKS * F))


@pytest.mark.parametrize("name, sink, window, policy, slow", [
    ("relativistic", 1, 6, "relativistic", 0),
    ("growing", 0, 10**9, "absolute", 0),
    ("slow-fast", 3, 6, "bounded", 12),
    ("moc", 3, 6, "bounded", 64),
])
def test_own_presets_follow_their_rules(name, sink, window, policy, slow, model):
    cfg = get_cache_config(name)
    ours = drive(cfg, model)
    rules = own_blocks(sink, window, BLOCKS, policy=policy, slow=slow)
    routed = name == "moc"
    for b, ((att, pos, chunks, chunk_t, _), (cached, slow_f, rpos, q, _)) in \
            enumerate(zip(ours, rules)):
        new = list(range(b * F, (b + 1) * F))
        ns = min(len(cached), sink)
        if routed:  # mandatory sink + fast in the page table, slow frames routable chunks
            assert att == cached + new and chunks == slow_f, f"block {b}"
            assert pos == rpos[:ns] + rpos[ns + len(slow_f):] + q
            assert chunk_t == rpos[ns : ns + len(slow_f)]
        else:
            assert att == cached[:ns] + slow_f + cached[ns:] + new, f"block {b}"
            assert pos == rpos + q, f"block {b}"
    assert [o[4] for o in ours[:-1]] == [r[4] for r in rules[1:]]
    # the last block: relativistic 1 + 6 + 3, slow-fast 3 + 12 + 6 + 3; moc's 64-frame slow
    # memory and growing still hold every one of the 48 frames
    attended = len(ours[-1][0]) + len(ours[-1][2])
    assert attended == {"relativistic": 10, "slow-fast": 24, "moc": 48, "growing": 48}[name]
    assert attended == min(cfg.attended_frames(F) or BLOCKS * F, BLOCKS * F)


def test_attended_frame_counts_of_the_table():
    """The counts of the caches.py / README table (frames attended, block of 3 included)."""
    want = {"longlive": 12, "lol": 12, "sink-window": 12, "self-forcing": 21,
            "self-forcing-rolling": 9, "relativistic": 10, "slow-fast": 24, "moc": 76,
            "growing": None}
    assert set(want) <= set(CACHES)  # tests may register more; these are the built-ins
    assert {n: get_cache_config(n).attended_frames(F) for n in want} == want
    assert get_cache_config("longlive").window_for(F) == 6
    assert get_cache_config("self-forcing-rolling", local_attn_size=12).window_for(F) == 9
    # a sink override keeps local_attn_size: the window shrinks
    assert get_cache_config("longlive", sink_size=1).window_for(F) == 8


def test_preset_semantics_fields():
    ll, lol = get_cache_config("longlive"), get_cache_config("lol")
    assert (ll.recache, ll.global_sink, ll.jitter_sigma) == ("longlive", True, 0.0)
    assert (lol.recache, lol.global_sink, lol.jitter_sigma) == ("longlive", True, 0.8)
    assert (lol.sink_frames, lol.local_attn_size) == (3, 12)
    assert get_cache_config("sink-window").recache == "block-causal"
    c = get_cache_config("longlive", recache="block-causal", global_sink=False)
    assert (c.recache, c.global_sink) == ("block-causal", False)


@pytest.mark.parametrize("kw, match", [
    (dict(local_attn_size=6), "local_attn_size=6 .* >= sink_size 3 \\+ block 3 \\+ 1"),
    (dict(local_attn_size=-1), "local_attn_size=-1 .*self-forcing"),
    (dict(local_attn_size=3), "local_attn_size must be an int > sink_size=3"),
    (dict(local_attn_size=12, window_frames=6), "exclude each other"),
    (dict(sink_size=2, sink_frames=3), "sink_size=2 and sink_frames=3"),
    (dict(recache="nope"), "recache must be one of"),
])
def test_bad_sizes_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        get_cache_config("longlive", **kw).window_for(F)


def test_window_override_replaces_local_attn_size():
    c = get_cache_config("longlive", window_frames=9)
    assert (c.local_attn_size, c.window_for(F), c.attended_frames(F)) == (None, 9, 15)
    with pytest.raises(ValueError, match="keeps every frame"):
        get_cache_config("growing", local_attn_size=12)


# --------------------------------------------------------------------------- streams
def test_default_stream_attends_what_longlive_attends():
    """``StreamSettings()`` (``lol generate``'s default: tests/cli/test_presets.py) is LongLive:
    3 sink + 6 cached + 3."""
    st = new_stream(StreamSettings(blocks=7, decode=False))
    assert st.cache_cfg.name == "longlive" and st.cache.window_frames == 6
    up = upstream_blocks(3, 12, 7)
    for b in range(7):
        read = st.cache_cfg.read(st.cache, F)
        serial = [fr.serial for fr in st.cache.frames()]
        assert serial + list(range(b * F, (b + 1) * F)) == up[b][0]
        assert read.frame_t.tolist() + read.q_t.tolist() == up[b][0]
        advance(st)
