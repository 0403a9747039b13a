"""Public ``moc_attention`` (block-sparse paged attention over routed chunks) and
``moc_route_tiles``: validation, backend dispatch, the ``lol::moc_attention`` custom op.

Query tiles. Routing is per **query tile** of ``tile_size`` consecutive query tokens (default
128) and per query head, not per token as in MoBA: every query of a tile reads the same key
pages, so one kernel program (a query block of ``BLOCK_M`` rows, ``tile_size % BLOCK_M == 0``)
loops over one page list with dense tensor-core tiles instead of a per-row gather. 128 tokens
are about 2.5 patch rows of a Wan frame (30 x 52 patches): spatially coherent, so the tile's mean
query is a meaningful summary; a 4680-token block has ``T = 37`` tiles, and routing costs
``T * C * H * D`` MACs (14.5 M for 256 chunks and 12 heads of 128), nothing beside the attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import (
    POS_LIMIT,
    check_host_positions,
    check_page_ids,
    check_positions_fit,
    check_shape,
    check_shifted_fit,
    check_tensor,
    value_checks_enabled,
)
from .._dispatch import resolve_backend
from ..attention.backward import attention_backward, check_func_transform, paged_keys
from ..attention.paged_attention_op import fake_attention, run_attention, validate_paged_inputs
from ..rope.table import RopeTable
from .moc_attention_cpu import moc_attention_torch
from .moc_route_op import moc_route
from .reference import gather_chunks, moc_dense_mask

TILE_MULTIPLE = 16  # smallest query block of the kernel (tl.dot needs >= 16 rows)


@torch.library.custom_op("lol::moc_attention", mutates_args=())
def _moc_attention_op(q: torch.Tensor, q_pos: torch.Tensor, cache_k: torch.Tensor,
                      cache_v: torch.Tensor, cache_pos: torch.Tensor, page_len: torch.Tensor,
                      page_table: torch.Tensor, freqs: torch.Tensor, pair_axis: torch.Tensor,
                      chunk_pages: torch.Tensor, routed: torch.Tensor, k_new: torch.Tensor | None,
                      v_new: torch.Tensor | None, causal: bool, page_shift: torch.Tensor | None,
                      chunk_shift: torch.Tensor | None, scale: float, tile_size: int,
                      backend: str,
                      axes: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return run_attention("moc_attention", backend, moc_attention_torch, q,
                         (q_pos, cache_k, cache_v, cache_pos, page_len, page_table), freqs,
                         pair_axis, axes, chunk_pages=chunk_pages, routed=routed, k_new=k_new,
                         v_new=v_new, causal=causal, page_shift=page_shift,
                         chunk_shift=chunk_shift, scale=scale, tile_size=tile_size)


@_moc_attention_op.register_fake
def _(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, freqs, pair_axis, chunk_pages,
      routed, k_new, v_new, causal, page_shift, chunk_shift, scale, tile_size, backend,
      axes=None):
    return fake_attention(q)


def moc_attention_backward(grad_out, grad_lse, q, q_pos, cache_k, cache_v, cache_pos, page_len,
                           page_table, table, chunk_pages, routed, k_new, v_new, causal,
                           page_shift, chunk_shift, scale, tile_size):
    """Gradients of :func:`moc_attention` for ``q``, ``k_new`` and ``v_new`` (``None`` without
    new keys): the torch-path recompute of :func:`~lol_kernels.attention.backward.
    attention_backward` over every mandatory and chunk slot, with the routing as a per-head
    mask. The pools and the routing are constants; no host sync."""
    B, N = q.shape[:2]
    mk, mv, mpos, mok = paged_keys(cache_k, cache_v, cache_pos, page_len, page_table, page_shift)
    ck, cv, cpos, cok = gather_chunks(cache_k.detach(), cache_v.detach(), cache_pos, page_len,
                                      chunk_pages, chunk_shift)
    C, Lc = cok.shape[1:]
    Hkv, D = cache_k.shape[2:]
    ks, vs = [mk, ck.reshape(B, C * Lc, Hkv, D)], [mv, cv.reshape(B, C * Lc, Hkv, D)]
    ps = [mpos, cpos.reshape(B, C * Lc, cache_pos.shape[-1])]
    if k_new is not None:
        ks, vs, ps = ks + [k_new.detach()], vs + [v_new.detach()], ps + [q_pos.long()]
    mask = moc_dense_mask(routed, cok, mok, N, mk.shape[1], tile_size, causal, k_new is not None)
    dq, dk, dv = attention_backward(grad_out, grad_lse, q, q_pos, torch.cat(ks, 1),
                                    torch.cat(vs, 1), torch.cat(ps, 1), table, mask, scale,
                                    n_const=mk.shape[1] + C * Lc)
    return (dq, None, None) if k_new is None else (dq, dk, dv)


def _setup_context(ctx, inputs, output):
    (q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, freqs, pair_axis, chunk_pages,
     routed, k_new, v_new, causal, page_shift, chunk_shift, scale, tile_size, backend,
     axes) = inputs
    ctx.save_for_backward(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, freqs,
                          pair_axis, chunk_pages, routed, k_new, v_new, page_shift, chunk_shift)
    ctx.causal, ctx.scale, ctx.tile_size, ctx.axes = causal, scale, tile_size, axes
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad_out, grad_lse):
    # every backend: the torch-path backward (recompute); pools and routing are constants
    (q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, freqs, pair_axis, chunk_pages,
     routed, k_new, v_new, page_shift, chunk_shift) = ctx.saved_tensors
    table = RopeTable.from_tensors(freqs, pair_axis, ctx.axes)
    dq, dk, dv = moc_attention_backward(grad_out, grad_lse, q, q_pos, cache_k, cache_v,
                                        cache_pos, page_len, page_table, table, chunk_pages,
                                        routed, k_new, v_new, ctx.causal, page_shift,
                                        chunk_shift, ctx.scale, ctx.tile_size)
    grads = [None] * ctx.n_inputs  # positions, pools, tables, routing, options: no gradient
    grads[0], grads[11], grads[12] = dq, dk, dv  # q, k_new, v_new (the op's argument order)
    return tuple(grads)


_moc_attention_op.register_autograd(_backward, setup_context=_setup_context)


def check_tile_size(tile_size) -> int:
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < TILE_MULTIPLE \
            or tile_size % TILE_MULTIPLE:
        raise ValueError(f"tile_size must be a positive multiple of {TILE_MULTIPLE} (the kernel's "
                         f"query block), got {tile_size!r}")
    return tile_size


def validate_moc_inputs(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, table,
                        chunk_pages, routed, k_new, v_new, causal, page_shift, chunk_shift,
                        scale, tile_size, validate=None):
    """All the checks of :func:`moc_attention` (values only when ``validate``, as
    :func:`~lol_kernels.attention.validate_paged_inputs`). Returns the scale."""
    scale = validate_paged_inputs(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                                  table, k_new, v_new, causal, page_shift, scale, validate)
    values = value_checks_enabled(validate)
    check_tile_size(tile_size)
    B, N, Hq, _ = q.shape
    P, A = cache_k.shape[0], q_pos.shape[2]
    check_tensor("chunk_pages", chunk_pages, ndim=3, kind="int")
    if chunk_pages.shape[0] != B:
        raise ValueError(f"chunk_pages must have shape [B={B}, C, Pc], got "
                         f"{list(chunk_pages.shape)}")
    C = chunk_pages.shape[1]
    if values:  # ids in [-1, P) and no page in two chunks of a row (attended twice)
        check_page_ids("chunk_pages", chunk_pages.reshape(B, C * chunk_pages.shape[2]), P)
    if chunk_shift is not None:
        check_tensor("chunk_shift", chunk_shift, ndim=3, kind="int")
        check_shape("chunk_shift", chunk_shift, (B, C, A), "[B, C, A]")
    if chunk_shift is not None and not values:
        check_host_positions("chunk_shift", chunk_shift, POS_LIMIT)
    if chunk_shift is not None and values:
        shift = check_positions_fit("chunk_shift", chunk_shift, POS_LIMIT)
        stored = check_positions_fit("cache_pos", cache_pos, POS_LIMIT)
        check_shifted_fit("cache_pos", stored, "chunk_shift", shift)
    check_tensor("routed", routed, ndim=4, kind="int")
    T = math.ceil(N / tile_size)
    check_shape("routed", routed, (B, T, Hq, None),
                f"[B, T = ceil(N / tile_size) = {T}, Hq, k]")
    for name, t in (("chunk_pages", chunk_pages), ("chunk_shift", chunk_shift),
                    ("routed", routed)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on {q.device} like q, got {t.device}")
    if values and routed.numel():
        lo, hi = torch.stack(torch.aminmax(routed)).tolist()  # one host sync
        if lo < -1 or hi >= C:
            raise ValueError(f"routed holds chunk ids in [{lo}, {hi}]; expected -1 (none) or a "
                             f"chunk in [0, C={C})")
        srt = routed.sort(dim=-1).values
        if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
            raise ValueError("routed lists a chunk twice for one (tile, head); each chunk may be "
                             "selected once (lk.moc_route never repeats a chunk)")
    if values and chunk_pages.numel() and page_table.numel():
        for b in range(B):  # a page both mandatory and routed would be attended twice
            cp = chunk_pages[b][chunk_pages[b] >= 0]
            if bool(torch.isin(cp, page_table[b][page_table[b] >= 0]).any()):
                raise ValueError(f"chunk_pages[{b}] shares pages with page_table[{b}]; routed "
                                 f"chunks must be disjoint from the mandatory pages")
    return scale


def moc_attention(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, table, *,
                  chunk_pages, routed, k_new=None, v_new=None, causal=False, page_shift=None,
                  chunk_shift=None, scale=None, tile_size=128, backend="auto", validate=None):
    """Block-sparse paged attention: mandatory pages + the routed chunks of each query tile.

    Query ``i`` of head ``h`` belongs to tile ``t = i // tile_size`` and attends the union of

    * the **mandatory** pages ``page_table[b]`` (sink and fast window), all slots
      ``s < page_len[page]``, positions ``cache_pos + page_shift[b, entry]``;
    * the pages of the chunks ``routed[b, t, h, :]`` (``-1`` = no chunk), chunk ``c`` being the
      pages ``chunk_pages[b, c, :]`` (``-1`` = no page) read at ``cache_pos + chunk_shift[b, c]``;
    * the block's own keys ``k_new`` (all, or ``j <= i`` with ``causal=True``).

    This equals dense attention over the mandatory pages, every chunk and the new keys with the
    mask "chunk ``c`` is visible to tile ``t`` and head ``h`` iff ``c in routed[b, t, h]``".
    Keys are un-rotated in the pool and rotated at read time with the frequencies of the query
    head that reads them, exactly as :func:`lol_kernels.paged_attention`.

    Args:
        q: ``[B, N, Hq, D]`` un-rotated queries (fp16/bf16/fp32/fp64).
        q_pos: ``[B, N, A]`` int positions of the queries.
        cache_k, cache_v: ``[P, S, Hkv, D]`` page pools in q's dtype; query head ``h`` reads KV
            head ``h // (Hq // Hkv)``.
        cache_pos: ``[P, S, A]`` int stored positions. page_len: ``[P]`` int filled slots.
        page_table: ``[B, M]`` int mandatory page ids, ``-1`` = empty entry.
        table: :class:`RopeTable` with ``Hq`` rows.
        chunk_pages: ``[B, C, Pc]`` int page ids of each routable chunk (a slow-memory frame is
            one chunk of ``ceil(Nf / S)`` pages), ``-1`` = no page. Must not share pages with
            ``page_table`` (a shared page would be counted twice; this raises).
        routed: ``[B, T, Hq, k]`` int chunk ids per query tile and head, ``T = ceil(N /
            tile_size)``, ``-1`` = none, no chunk twice in a row (:func:`moc_route_tiles` /
            ``lk.moc_route`` output). Its chunk order does not matter.
        k_new, v_new: ``[B, N, Hkv, D]`` the block's own keys/values at ``q_pos`` (optional).
        causal: ``True``: query ``i`` sees new keys ``j <= i``; cached keys are all visible.
        page_shift: ``[B, M, A]`` int added to the stored positions of a mandatory entry.
        chunk_shift: ``[B, C, A]`` int added to the stored positions of every page of chunk
            ``c`` (a chunk is read at one shift, as a frame is under every position policy).
        scale: softmax scale, default ``D ** -0.5``.
        tile_size: query tokens per routing tile, a multiple of 16 (default 128; module doc).
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"``, ``"triton"`` (fp64
            and head dims the kernel lacks run the torch path; docs/design.md §3).
        validate: also check the values (as :func:`lol_kernels.paged_attention`, plus the
            chunk ids of ``routed`` and the pages of ``chunk_pages``); ``None``: when
            ``LOL_VALIDATE=1``.

    Returns:
        ``out [B, N, Hq, D]`` in q's dtype and ``lse [B, Hq, N]`` fp32, the natural-log softmax
        denominator ``log sum_k exp(scale * q.k)`` over the keys the row sees. A row that sees
        no key returns zeros and ``lse = -inf``.

    Raises ``ValueError`` as :func:`lol_kernels.paged_attention`; with ``validate`` also for a
    page in two chunks or shared with ``page_table``, a routed chunk out of range or twice, and
    ``|cache_pos| + |chunk_shift| >= 2^31``. Without it (and always under ``torch.compile``)
    only tables built by the cache are safe.

    Gradients: ``.backward()`` / ``torch.autograd.grad`` (and ``torch.compile``) give ``q``,
    ``k_new`` and ``v_new`` their gradients, through ``out`` and ``lse``; the pools, the routing
    and the tables are constants (no gradient, as :func:`lol_kernels.paged_attention`). Triton
    forward, torch backward until the fused backward lands: the backward recomputes dense
    masked scores over every mandatory and chunk slot in the torch path. ``torch.func``
    transforms raise ``RuntimeError``: not supported.

    Example:
        >>> rd = cache.read(3, routed=True)
        >>> idx = lk.moc_route_tiles(q, rd.chunk_mean(layer), 8, chunk_valid=rd.chunk_valid)
        >>> out, lse = lk.moc_attention(q, q_pos, cache.k[layer], cache.v[layer], cache.pos,
        ...                             cache.page_len, rd.page_table, table,
        ...                             chunk_pages=rd.chunk_pages, routed=idx,
        ...                             page_shift=rd.page_shift, chunk_shift=rd.chunk_shift,
        ...                             k_new=k, v_new=v)
    """
    scale = validate_moc_inputs(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                                table, chunk_pages, routed, k_new, v_new, causal, page_shift,
                                chunk_shift, scale, tile_size, validate)
    backend = resolve_backend("moc_attention", backend, q)
    t = table.to(q.device)
    check_func_transform("lol::moc_attention", q, cache_k, cache_v, k_new, v_new)
    return _moc_attention_op(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                             t.freqs, t.pair_axis, chunk_pages, routed, k_new, v_new, causal,
                             page_shift, chunk_shift, scale, tile_size, backend, list(t.axes))


def tile_means(q: torch.Tensor, tile_size: int = 128) -> torch.Tensor:
    """Mean of each query tile: ``q [B, N, H, D]`` -> ``[B, T, H, D]`` fp32, ``T = ceil(N /
    tile_size)``; the last tile averages only its ``N - (T - 1) * tile_size`` real tokens."""
    check_tensor("q", q, ndim=4, kind="float")
    check_tile_size(tile_size)
    B, N, H, D = q.shape
    T = math.ceil(N / tile_size)
    pad = T * tile_size - N
    qf = torch.nn.functional.pad(q.float(), (0, 0, 0, 0, 0, pad))
    sums = qf.view(B, T, tile_size, H, D).sum(dim=2)
    count = (N - tile_size * torch.arange(T, device=q.device)).clamp(max=tile_size).float()
    return sums / count.view(1, T, 1, 1)


def moc_route_tiles(q, chunk_mean, k, *, tile_size=128, chunk_valid=None, causal_limit=None,
                    backend="auto"):
    """Route each query tile and head to its top-``k`` chunks (MoC's parameter-free router).

    Args:
        q: ``[B, N, Hq, D]`` **un-rotated** queries (the cache's chunk means are of un-rotated
            keys, so routing compares content, not positions).
        chunk_mean: ``[B, C, Hc, D]`` mean key of each chunk (``cache.summary[layer]`` gathered
            in chunk order), ``Hc = Hq`` or ``Hkv`` with ``Hq % Hkv == 0`` (then query head
            ``h`` is scored against KV head ``h // (Hq // Hkv)``, as attention reads it).
        k: chunks per tile and head.
        tile_size: as in :func:`moc_attention`; chunk_valid ``[B, C]`` bool; causal_limit
            ``[B, T]`` int (chunk ``c`` eligible for tile ``t`` iff ``c < causal_limit``).
        backend: passed to ``lk.moc_route``.

    Returns:
        ``idx [B, T, Hq, k]`` int32, ascending chunk ids, ``-1`` where fewer are eligible.
    """
    qm = tile_means(q, tile_size)
    check_tensor("chunk_mean", chunk_mean, ndim=4, kind="float")
    B, T, Hq, D = qm.shape
    Hc = chunk_mean.shape[2]
    if chunk_mean.shape[0] != B or chunk_mean.shape[3] != D or Hc == 0 or Hq % Hc:
        raise ValueError(f"chunk_mean must have shape [B={B}, C, Hc, D={D}] with Hq={Hq} a "
                         f"multiple of Hc >= 1, got {list(chunk_mean.shape)}")
    cm = chunk_mean.float().repeat_interleave(Hq // Hc, dim=2)
    return moc_route(qm, cm, k, chunk_valid=chunk_valid, causal_limit=causal_limit,
                     backend=backend)
