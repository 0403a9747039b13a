"""The paged and slow-fast caches on hostile-but-realistic input:

* attention over a fresh (empty) cache, a routed read with no slow frames, and an append of no
  frame, on every backend (each case in a forked child, so a regression that kills the process
  fails one case instead of the session);
* stale or foreign ``FrameBlock`` handles are refused by ``write``; live ones still write;
* positions the kernels cannot represent in int32 are refused by ``append_frames``.
"""

import pytest
import torch

import lol_kernels as lk
from tests.support.reliability import D, S, check_every_empty_dimension, empty_cases


@pytest.mark.parametrize(("op", "dim", "backend"), empty_cases("cache"))
def test_every_empty_dimension(op, dim, backend):
    check_every_empty_dimension(op, dim, backend)


# --------------------------------------------------------------------- stale or foreign blocks
def small_cache(cls=lk.PagedKVCache, **kw):
    """A small cache; a SlowFastCache keeps no slow frame unless ``slow_frames`` is given (a
    frame leaving its window is then freed, as in the base cache)."""
    args = dict(num_layers=1, num_kv_heads=1, head_dim=D, frame_tokens=8, page_size=S,
                sink_frames=1, window_frames=2, block_frames=2)
    if cls is lk.cache.SlowFastCache:
        args["slow_frames"] = 0
    return cls(**(args | kw))


def append(c, F=1):
    t = torch.arange(c.next_t, c.next_t + F)
    return c.append_frames(lk.token_positions(t, 2, 4, c.batch_size))


def kv(c, blk):
    return torch.randn(c.batch_size, blk.slots.shape[1], c.num_kv_heads, c.head_dim)


def stale_after_reuse(c):
    blk = append(c)  # the sink frame: never evicted
    blk = append(c)
    for _ in range(4):  # its slot is evicted and handed to a newer frame
        append(c)
    return blk


def stale_after_reset(c):
    blk = append(c)
    c.reset()
    append(c)  # the same slot, serial 0 again
    return blk


def stale_after_load(c):
    state = {n: t.clone() for n, t in c.state_dict().items()}
    blk = append(c)
    c.load_state_dict(state)
    return blk


BAD_BLOCKS = {  # how a caller ends up with a block write() must refuse -> words of the error
    "evicted-and-reused": (stale_after_reuse, "stale"),
    "before-reset": (stale_after_reset, "stale"),
    "before-load_state_dict": (stale_after_load, "stale"),
    "another-cache": (lambda c: append(small_cache()), "not made by this cache"),
    "another-cache-rewrite": (lambda c: small_cache_rewrite(), "not made by this cache"),
    "built-by-hand": (lambda c: lk.cache.FrameBlock(append(c).frames, append(c).slots),
                      "not made by this cache"),
}


def small_cache_rewrite():
    other = small_cache()
    append(other)
    return other.rewrite_block(other.frames())


@pytest.mark.parametrize("cls", [lk.PagedKVCache, lk.cache.SlowFastCache])
@pytest.mark.parametrize("how", list(BAD_BLOCKS))
def test_write_refuses_stale_and_foreign_blocks(how, cls):
    c = small_cache(cls)
    make, words = BAD_BLOCKS[how]
    blk = make(c)
    before = [t.clone() for t in (c.k[0], c.v[0], c.summary[0])]
    with pytest.raises(ValueError, match=words):
        c.write(0, blk, kv(c, blk), kv(c, blk))
    assert all(torch.equal(a, b) for a, b in zip(before, (c.k[0], c.v[0], c.summary[0])))


@pytest.mark.parametrize("cls", [lk.PagedKVCache, lk.cache.SlowFastCache])
def test_rewrite_block_refuses_frames_not_cached_here(cls):
    c = small_cache(cls)
    append(c)
    gone = append(c).frames[0]
    for _ in range(4):
        append(c)
    with pytest.raises(ValueError, match="frames must be frames cached here"):
        c.rewrite_block([gone])


@pytest.mark.parametrize("cls", [lk.PagedKVCache, lk.cache.SlowFastCache])
def test_live_blocks_still_write(cls):
    """Recache of live frames (slow ones included), a reloaded cache, and a block whose frame
    left the window in its own append (pages still free) all write."""
    slow = {"slow_frames": 2} if cls is lk.cache.SlowFastCache else {}
    c = small_cache(cls, window_frames=1, block_frames=2, **slow)
    for _ in range(5):
        blk = append(c, 2)  # the first frame of the block is evicted by its own append
        c.write(0, blk, kv(c, blk), kv(c, blk))
    live = c.frames()
    blk = c.rewrite_block(live)
    c.write(0, blk, kv(c, blk), kv(c, blk))
    if slow:
        assert c.slow, "a slow frame to recache"
    c2 = small_cache(cls, window_frames=1, block_frames=2, **slow)
    c2.load_state_dict(c.state_dict())
    blk = c2.rewrite_block(c2.frames())
    c2.write(0, blk, kv(c2, blk), kv(c2, blk))
    blk = append(c2)
    c2.write(0, blk, kv(c2, blk), kv(c2, blk))


# --------------------------------------------------------------------- int32 positions
@pytest.mark.parametrize("t", [2**32 + 5, -(2**32), 2**30 + 1, -(2**30) - 1, 2**62])
def test_append_frames_refuses_positions_beyond_int32_kernels(t):
    c = small_cache()
    pos = lk.token_positions(torch.tensor([0]), 2, 4, 1).long()
    pos[..., 0] = t
    with pytest.raises(ValueError, match="pos must hold positions"):
        c.append_frames(pos)
    assert c.num_frames == 0


def test_append_frames_keeps_the_largest_position():
    c = small_cache()
    pos = lk.token_positions(torch.tensor([2**30]), 2, 4, 1).long()
    assert c.append_frames(pos).frames[0].t == 2**30
