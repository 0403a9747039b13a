"""The one read type every cache returns: what a block needs to attend the cache.

A read is a page table over the cache's pools plus the positions the pages are read at. A
*routed* read (Mixture of Contexts over slow memory) also carries routable chunks: pages the
router may add per query tile, described by the chunk summaries the cache keeps. The model
tells the two apart by :attr:`CacheRead.routed`, never by the read's type.

A read stays valid until the cache's next ``append_frames`` (see :mod:`lol_kernels.cache.paged`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import POS_LIMIT, check_frame_times, check_positions_fit


@dataclass
class CacheRead:
    """What a block needs to attend a cache (every cache class returns this type).

    Attributes:
        page_table: ``[B, M]`` int32 page ids always attended (``-1`` = empty entry).
        page_shift: ``[B, M, A]`` int32 added to stored positions, or ``None`` (all zero).
        q_t: ``[F]`` int64 temporal position of each of the new block's frames.
        frame_ids: ``fid`` of each frame in ``page_table``, in read order.
        frame_t: ``[n]`` int64 temporal position each of those frames is read at.
        entry_frame: ``[M]`` int64 index into ``frame_ids`` of each entry (``-1`` for padding).
        chunk_pages: routed reads: ``[B, C, ppf]`` int32 pages of each routable chunk
            (``-1`` padded); ``None`` for a plain read.
        chunk_shift: routed reads: ``[B, C, A]`` int32 or ``None`` (all zero).
        chunk_valid: routed reads: ``[B, C]`` bool, ``False`` for padding chunks.
        chunk_ids: routed reads: ``fid`` of each valid chunk, in chunk order.
        chunk_t: routed reads: ``[len(chunk_ids)]`` int64 temporal position each valid chunk
            is read at.
    """

    page_table: torch.Tensor
    page_shift: torch.Tensor | None
    q_t: torch.Tensor
    frame_ids: list[int]
    frame_t: torch.Tensor
    entry_frame: torch.Tensor
    chunk_pages: torch.Tensor | None = None
    chunk_shift: torch.Tensor | None = None
    chunk_valid: torch.Tensor | None = None
    chunk_ids: list[int] | None = None
    chunk_t: torch.Tensor | None = None

    @property
    def routed(self) -> bool:
        """``True`` when the read has routable chunks (attend it with ``moc_attention``)."""
        return self.chunk_pages is not None

    def chunk_mean(self, cache, layer: int) -> torch.Tensor:
        """``[B, C, Hkv, D]`` fp32 mean un-rotated key of each chunk of this read (zeros for
        padding), from ``cache.summary[layer]`` (``cache`` is the cache that built the read)."""
        if not self.routed:
            raise ValueError("chunk_mean needs a routed read (read(..., routed=True))")
        summ = cache.summary[layer]  # [F_max, B, Hkv, D]
        C = self.chunk_pages.shape[1]
        out = summ.new_zeros(summ.shape[1], C, *summ.shape[2:])
        if self.chunk_ids:
            out[:, : len(self.chunk_ids)] = summ[self.chunk_ids].transpose(0, 1)
        return out


def build_read(cache, frames, read_t, q_t, *, width: int | None = None) -> CacheRead:
    """Plain read of ``frames`` (in order) of ``cache`` at temporal positions ``read_t [n]``.

    ``page_shift`` is ``read_t - stored t`` on axis 0 (``None`` when all shifts are zero). The
    table is padded with ``-1`` to ``width`` entries (default ``cache.max_read_pages``, so that
    the op sees one shape for the whole stream; ``0``: exactly the frames' pages), or more if
    the frames need it. ``read_t``, ``q_t`` and the shifts must lie within ``+-2^30`` (int32
    in the kernels): a ``ValueError`` naming them otherwise.
    """
    B, ppf, dev = cache.batch_size, cache.pages_per_frame, cache.device
    n = len(frames)
    read_t = check_frame_times("read_t", read_t).reshape(n)
    q_t = check_frame_times("q_t", q_t).reshape(-1)
    M = n * ppf
    width = max(M, cache.max_read_pages if width is None else width)
    # built on the host (frames' pages live there), moved in one copy each: no sync
    table = torch.full((B, width), -1, dtype=torch.int32)
    shift = torch.zeros(B, width, cache.num_axes, dtype=torch.int32)
    entry = torch.full((width,), -1, dtype=torch.int64)
    if n:
        table[:, :M] = torch.cat([fr.pages for fr in frames], dim=1).to(torch.int32)
        stored = torch.tensor([fr.t for fr in frames], dtype=torch.int64)
        d = (read_t - stored).repeat_interleave(ppf)
        check_positions_fit("page shift (read_t - stored t)", d, POS_LIMIT)  # before int32
        shift[:, :M, 0] = d.to(torch.int32)
        entry[:M] = torch.arange(n).repeat_interleave(ppf)
    any_shift = bool((shift != 0).any())
    return CacheRead(table.to(dev), shift.to(dev) if any_shift else None, q_t,
                     [fr.fid for fr in frames], read_t, entry)
