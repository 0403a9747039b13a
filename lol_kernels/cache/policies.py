"""Position policies: how a block reads the cache (page table, page shift, query positions).

Every policy is a small pure function of the cache's frames. Only the temporal axis (0) is ever
re-based; ``h, w`` stay as stored. A read is valid until the next ``append_frames``.

With ``n`` cached frames in read order (sink frames, then window frames oldest to newest; their
stored temporal positions ``t_k``) and a new block of ``F`` frames:

==============  ==========================================  ================================
policy          temporal position of cached frame ``k``     new block's frames
==============  ==========================================  ================================
absolute        ``t_k`` as written (LoL streaming)          ``cache.next_t + [0, F)``
relativistic    ``k`` (sink at 0, then window order)        ``[n_max - F, n_max)``,
                                                            ``n_max = n + F`` by default
bounded         sink ``k``; window right-aligned before the ``[L - F, L)``,
                block, clamped to ``>= #sink``             ``L = sink + window`` (Context Forcing)
==============  ==========================================  ================================

``flush`` (KV Flush) is an operation on the cache, and ``cut`` (RoPE Cut) moves a read's
block to a far temporal position. ``cache`` is a :class:`~lol_kernels.cache.PagedKVCache`
everywhere; :meth:`PagedKVCache.read <lol_kernels.cache.PagedKVCache.read>` is
:func:`read_cache` on itself.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .._checks import POS_LIMIT, check_frame_times
from .read import CacheRead, build_read


def absolute(cache, num_new: int, **kw) -> CacheRead:
    """Stored positions as written; the block continues at ``cache.next_t``."""
    frames = cache.frames()
    return build_read(cache, frames, [fr.t for fr in frames],
                      torch.arange(num_new) + cache.next_t, **kw)


def relativistic(cache, num_new: int, *, max_frames: int | None = None,
                 **kw) -> CacheRead:
    """Infinity-RoPE Block-Relativistic RoPE: cached frames at ``0..n-1`` in read order, the
    block at ``[n_max - F, n_max)`` (``n_max = max_frames``, default ``n + F``; must be
    ``>= n + F`` so the block stays after the cache)."""
    frames = cache.frames()
    n = len(frames)
    n_max = n + num_new if max_frames is None else max_frames
    if max_frames is not None and not isinstance(max_frames, int):
        raise ValueError(f"max_frames must be an int, got {max_frames!r}")
    if n_max - 1 > POS_LIMIT:  # the block's last frame is read at n_max - 1
        raise ValueError(f"max_frames must be <= {POS_LIMIT + 1} (frame times are int32 in the "
                         f"kernels), got {n_max}")
    if n_max < n + num_new:
        raise ValueError(f"max_frames must be >= cached frames + new frames = {n + num_new}, "
                         f"got {max_frames}")
    return build_read(cache, frames, torch.arange(n), torch.arange(n_max - num_new, n_max), **kw)


def bounded(cache, num_new: int, *, limit: int | None = None, **kw) -> CacheRead:
    """Context Forcing: every position in ``[0, L - 1]``, ``L = limit`` (default
    ``sink_frames + window_frames``). Sink frame ``k`` reads at ``k``; the block sits at
    ``[L - F, L)``; window frames are right-aligned just before it (newest at ``L - F - 1``),
    and older window frames that would fall below the sink clamp to ``#sink``."""
    L = cache.sink_frames + cache.window_frames if limit is None else limit
    if not isinstance(L, int) or L - 1 > POS_LIMIT:  # the block's last frame is read at L - 1
        raise ValueError(f"limit must be an int <= {POS_LIMIT + 1} (frame times are int32 in "
                         f"the kernels), got {limit!r}")
    ns = len(cache.sink)
    if L < ns + num_new + 1:
        raise ValueError(f"limit must leave room for sink, block and one window frame: "
                         f">= {ns + num_new + 1}, got {L}")
    nw = len(cache.window)
    win_t = torch.clamp(torch.arange(L - num_new - nw, L - num_new), min=ns)
    read_t = torch.cat([torch.arange(ns), win_t])
    return build_read(cache, cache.frames(), read_t, torch.arange(L - num_new, L), **kw)


def flush(cache, *, keep_last: int = 2) -> list:
    """Infinity-RoPE KV Flush (at a prompt change): keep the sink frame(s) and the newest
    ``keep_last`` window frames, free the rest. Returns the evicted frames."""
    return cache.drop_window(keep_last)


def cut(read: CacheRead, *, start: int = 45) -> CacheRead:
    """Infinity-RoPE RoPE Cut: move the block's frames to ``start + [0, F)`` (default 45..47 for
    a 3-frame block), a jump forward in time that makes a hard scene change. ``start`` must lie
    after every position the read attends. Writing the block at these positions makes later
    absolute reads continue from there."""
    read_t = read.frame_t if read.chunk_t is None else torch.cat([read.frame_t, read.chunk_t])
    top = int(read_t.max()) if read_t.numel() else -1
    if not isinstance(start, int) or start <= top:
        raise ValueError(f"start must be an int after every cached position (> {top}), "
                         f"got {start!r}")
    if start + read.q_t.numel() - 1 > POS_LIMIT:
        raise ValueError(f"start must leave the block's frames within {POS_LIMIT} (frame times "
                         f"are int32 in the kernels), got {start}")
    return replace(read, q_t=torch.arange(start, start + read.q_t.numel()))


POLICIES = {"absolute": absolute, "relativistic": relativistic, "bounded": bounded}


def read_cache(cache, num_new: int, policy: str = "absolute", **kw) -> CacheRead:
    """Build the read of ``policy`` (one of :data:`POLICIES`)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
    if not isinstance(num_new, int) or num_new < 1:
        raise ValueError(f"num_new must be an int >= 1, got {num_new!r}")
    return POLICIES[policy](cache, num_new, **kw)


def token_positions(frame_t, grid_h: int, grid_w: int, batch_size: int = 1) -> torch.Tensor:
    """Positions ``[B, F * grid_h * grid_w, 3]`` int32 of the patch tokens of frames at
    temporal positions ``frame_t [F]``: ``(t, row, col)``, frame-major then row-major (the
    order of Wan's patch embedding). Each ``frame_t`` within ``+-2^30`` (int32 in the
    kernels; ``ValueError`` naming ``frame_t`` otherwise)."""
    t = check_frame_times("frame_t", frame_t).reshape(-1)  # before the int32 cast below
    F = t.numel()
    tt = t.view(F, 1, 1).expand(F, grid_h, grid_w)
    hh = torch.arange(grid_h).view(1, grid_h, 1).expand(F, grid_h, grid_w)
    ww = torch.arange(grid_w).view(1, 1, grid_w).expand(F, grid_h, grid_w)
    pos = torch.stack([tt, hh, ww], dim=-1).reshape(1, F * grid_h * grid_w, 3)
    return pos.expand(batch_size, -1, -1).to(torch.int32).contiguous()
