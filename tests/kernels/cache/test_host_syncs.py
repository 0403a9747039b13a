"""A cache write makes no host sync (the counter of tests/support/host_syncs.py), so a block
step can be compiled whole and captured as a CUDA graph; and the tables the cache builds pass
the ops' value checks (what the ops check only when asked, the cache guarantees where it
creates it)."""

import pytest
import torch

import lol_kernels as lk
from lol_kernels.cache import SlowFastCache
from tests.support.host_syncs import D, count_syncs


def tiny_cache(**kw):
    kw = dict(num_layers=2, num_kv_heads=2, head_dim=D, frame_tokens=20, sink_frames=1,
              window_frames=2, block_frames=2, page_size=16) | kw
    return lk.PagedKVCache(**kw)


@pytest.mark.parametrize("cls", ["paged", "slowfast"])
def test_cache_write_makes_no_host_sync(cls):
    cache = tiny_cache() if cls == "paged" else SlowFastCache(
        num_layers=2, num_kv_heads=2, head_dim=D, frame_tokens=20, sink_frames=1,
        window_frames=2, slow_frames=2, block_frames=2, page_size=16, routed=True)
    for i in range(4):
        blk = cache.append_frames(lk.token_positions(torch.arange(2) + 2 * i, 4, 5))
        k, v = torch.randn(1, 40, 2, D), torch.randn(1, 40, 2, D)
        _, c = count_syncs(cache.write, 0, blk, k, v)
        assert c.total == 0, dict(c.events)
        cache.write(1, blk, k, v)


@pytest.mark.parametrize("cls", ["paged", "slowfast"])
def test_tables_the_cache_builds_pass_validation(cls):
    """What the ops check only when asked, the cache guarantees where it creates it."""
    kw = dict(num_layers=1, num_kv_heads=2, head_dim=D, frame_tokens=20, sink_frames=1,
              window_frames=2, block_frames=2, page_size=16)
    cache = lk.PagedKVCache(**kw) if cls == "paged" else SlowFastCache(slow_frames=3, tau=1.0,
                                                                        routed=True, **kw)
    table = lk.rope_frequencies(D, 4)
    for _ in range(8):
        rd = cache.read(2)
        q = torch.randn(1, 40, 4, D)
        pos = lk.token_positions(rd.q_t, 4, 5)
        args = (q, pos, cache.k[0], cache.v[0], cache.pos, cache.page_len, rd.page_table, table)
        if rd.routed:
            routed = torch.full((1, 3, 4, 2), -1, dtype=torch.int32)
            routed[..., : min(2, len(rd.chunk_ids))] = torch.arange(min(2, len(rd.chunk_ids)),
                                                                    dtype=torch.int32)
            lk.moc_attention(*args, chunk_pages=rd.chunk_pages, routed=routed,
                             page_shift=rd.page_shift, chunk_shift=rd.chunk_shift, tile_size=16,
                             validate=True)
        else:
            lk.paged_attention(*args, page_shift=rd.page_shift, validate=True)
        blk = cache.append_frames(lk.token_positions(rd.q_t, 4, 5))
        cache.write(0, blk, torch.randn(1, 40, 2, D), torch.randn(1, 40, 2, D))
    assert cache.frames_written == 16
