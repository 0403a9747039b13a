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
block to a far temporal position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .paged import PagedKVCache


@dataclass
class CacheRead:
    """What a block needs to attend the cache.

    Attributes:
        page_table: ``[B, M]`` int32 page ids (``-1`` = empty entry).
        page_shift: ``[B, M, A]`` int32 added to stored positions, or ``None``.
        q_t: ``[F]`` int64 temporal position of each of the new block's frames.
        frame_ids: ``fid`` of each frame read, in read order (the router's chunk order).
        frame_t: ``[n]`` int64 temporal position each cached frame is read at.
        entry_frame: ``[M]`` int64 index into ``frame_ids`` of each entry (-1 for padding).
    """

    page_table: torch.Tensor
    page_shift: torch.Tensor | None
    q_t: torch.Tensor
    frame_ids: list[int]
    frame_t: torch.Tensor
    entry_frame: torch.Tensor


def build_read(cache: PagedKVCache, frames, read_t, q_t, *, fixed_shape: bool = True) -> CacheRead:
    """Page table of ``frames`` (in order) read at temporal positions ``read_t``.

    ``page_shift`` is ``read_t - stored t`` on axis 0 (``None`` when all shifts are zero).
    With ``fixed_shape`` the table is padded with ``-1`` to ``cache.max_read_pages`` (or more if
    the frames need it) so that the op sees one shape for the whole stream.
    """
    B, ppf, dev = cache.batch_size, cache.pages_per_frame, cache.device
    n = len(frames)
    read_t = torch.as_tensor(read_t, dtype=torch.int64).reshape(n)
    M = n * ppf
    width = max(M, cache.max_read_pages) if fixed_shape else M
    table = torch.full((B, width), -1, dtype=torch.int32, device=dev)
    shift = torch.zeros(B, width, cache.num_axes, dtype=torch.int32, device=dev)
    entry = torch.full((width,), -1, dtype=torch.int64)
    if n:
        table[:, :M] = torch.cat([fr.pages for fr in frames], dim=1).to(torch.int32)
        stored = torch.tensor([fr.t for fr in frames], dtype=torch.int64)
        d = (read_t - stored).repeat_interleave(ppf)
        shift[:, :M, 0] = d.to(torch.int32).to(dev)
        entry[:M] = torch.arange(n).repeat_interleave(ppf)
    any_shift = bool((shift != 0).any())
    return CacheRead(table, shift if any_shift else None,
                     torch.as_tensor(q_t, dtype=torch.int64).reshape(-1),
                     [fr.fid for fr in frames], read_t, entry)


def absolute(cache: PagedKVCache, num_new: int, **kw) -> CacheRead:
    """Stored positions as written; the block continues at ``cache.next_t``."""
    frames = cache.frames()
    return build_read(cache, frames, [fr.t for fr in frames],
                      torch.arange(num_new) + cache.next_t, **kw)


def relativistic(cache: PagedKVCache, num_new: int, *, max_frames: int | None = None,
                 **kw) -> CacheRead:
    """Infinity-RoPE Block-Relativistic RoPE: cached frames at ``0..n-1`` in read order, the
    block at ``[n_max - F, n_max)`` (``n_max = max_frames``, default ``n + F``; must be
    ``>= n + F`` so the block stays after the cache)."""
    frames = cache.frames()
    n = len(frames)
    n_max = n + num_new if max_frames is None else max_frames
    if n_max < n + num_new:
        raise ValueError(f"max_frames must be >= cached frames + new frames = {n + num_new}, "
                         f"got {max_frames}")
    return build_read(cache, frames, torch.arange(n), torch.arange(n_max - num_new, n_max), **kw)


def bounded(cache: PagedKVCache, num_new: int, *, limit: int | None = None, **kw) -> CacheRead:
    """Context Forcing: every position in ``[0, L - 1]``, ``L = limit`` (default
    ``sink_frames + window_frames``). Sink frame ``k`` reads at ``k``; the block sits at
    ``[L - F, L)``; window frames are right-aligned just before it (newest at ``L - F - 1``),
    and older window frames that would fall below the sink clamp to ``#sink``."""
    L = cache.sink_frames + cache.window_frames if limit is None else limit
    ns = len(cache.sink)
    if L < ns + num_new + 1:
        raise ValueError(f"limit must leave room for sink, block and one window frame: "
                         f">= {ns + num_new + 1}, got {L}")
    nw = len(cache.window)
    win_t = torch.clamp(torch.arange(L - num_new - nw, L - num_new), min=ns)
    read_t = torch.cat([torch.arange(ns), win_t])
    return build_read(cache, cache.frames(), read_t, torch.arange(L - num_new, L), **kw)


def flush(cache: PagedKVCache, *, keep_last: int = 2) -> list:
    """Infinity-RoPE KV Flush (at a prompt change): keep the sink frame(s) and the newest
    ``keep_last`` window frames, free the rest. Returns the evicted frames."""
    return cache.drop_window(keep_last)


def cut(read: CacheRead, *, start: int = 45) -> CacheRead:
    """Infinity-RoPE RoPE Cut: move the block's frames to ``start + [0, F)`` (default 45..47 for
    a 3-frame block), a jump forward in time that makes a hard scene change. ``start`` must lie
    after every position the read attends. Writing the block at these positions makes later
    absolute reads continue from there."""
    top = int(read.frame_t.max()) if read.frame_t.numel() else -1
    if not isinstance(start, int) or start <= top:
        raise ValueError(f"start must be an int after every cached position (> {top}), "
                         f"got {start!r}")
    F = read.q_t.numel()
    return CacheRead(read.page_table, read.page_shift, torch.arange(start, start + F),
                     read.frame_ids, read.frame_t, read.entry_frame)


POLICIES = {"absolute": absolute, "relativistic": relativistic, "bounded": bounded}


def read_cache(cache: PagedKVCache, num_new: int, policy: str = "absolute", **kw) -> CacheRead:
    """Build the read of ``policy`` (one of :data:`POLICIES`)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
    if not isinstance(num_new, int) or num_new < 1:
        raise ValueError(f"num_new must be an int >= 1, got {num_new!r}")
    return POLICIES[policy](cache, num_new, **kw)


def token_positions(frame_t, grid_h: int, grid_w: int, batch_size: int = 1) -> torch.Tensor:
    """Positions ``[B, F * grid_h * grid_w, 3]`` int32 of the patch tokens of frames at
    temporal positions ``frame_t [F]``: ``(t, row, col)``, frame-major then row-major (the
    order of Wan's patch embedding)."""
    t = torch.as_tensor(frame_t, dtype=torch.int64).reshape(-1)
    F = t.numel()
    tt = t.view(F, 1, 1).expand(F, grid_h, grid_w)
    hh = torch.arange(grid_h).view(1, grid_h, 1).expand(F, grid_h, grid_w)
    ww = torch.arange(grid_w).view(1, 1, grid_w).expand(F, grid_h, grid_w)
    pos = torch.stack([tt, hh, ww], dim=-1).reshape(1, F * grid_h * grid_w, 3)
    return pos.expand(batch_size, -1, -1).to(torch.int32).contiguous()
