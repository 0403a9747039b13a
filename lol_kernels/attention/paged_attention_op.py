"""Public ``paged_attention`` (validation, backend dispatch, ``lol::paged_attention`` custom op)
and the input checks of both attention ops (:func:`validate_paged_inputs`, also used by the MoC
op and the page-mass diagnostic, and :func:`validate_dense_inputs`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._checks import (
    POS_LIMIT,
    check_host_positions,
    check_keys_values,
    check_page_ids,
    check_positions_fit,
    check_same_device,
    check_same_dtype,
    check_scale,
    check_shape,
    check_shifted_fit,
    check_tensor,
    value_checks_enabled,
)
from .._dispatch import resolve_backend, triton_kernel
from ..rope.rope_op import check_table
from ..rope.table import RopeTable
from .attention_cpu import empty_result, paged_attention_torch
from .backward import check_func_transform, paged_attention_backward


def run_attention(op: str, backend: str, torch_fn, q: torch.Tensor, args: tuple,
                  freqs: torch.Tensor, pair_axis: torch.Tensor, axes: Sequence[int] | None,
                  **kw):
    """The body of the attention custom ops (paged, dense, MoC): ``fn(q, *args, table, **kw)``
    of the resolved ``backend``, the table rebuilt from its tensors and ``axes`` without reading
    them. An empty query block (B, N or Hq is 0) returns its empty result first (torch's CPU
    flash kernel dies on 0 queries). Outputs are contiguous, the layouts the fake
    implementations promise (:func:`fake_attention`)."""
    if q.numel() == 0:
        return empty_result(q)
    table = RopeTable.from_tensors(freqs, pair_axis, axes)
    fn = triton_kernel(op) if backend == "triton" else torch_fn
    out, lse = fn(q, *args, table, **kw)
    return out.contiguous(), lse.float().contiguous()


@torch.library.custom_op("lol::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, q_pos: torch.Tensor, cache_k: torch.Tensor,
                        cache_v: torch.Tensor, cache_pos: torch.Tensor, page_len: torch.Tensor,
                        page_table: torch.Tensor, freqs: torch.Tensor, pair_axis: torch.Tensor,
                        k_new: torch.Tensor | None, v_new: torch.Tensor | None, causal: bool,
                        page_shift: torch.Tensor | None, scale: float, backend: str,
                        axes: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return run_attention("paged_attention", backend, paged_attention_torch, q,
                         (q_pos, cache_k, cache_v, cache_pos, page_len, page_table), freqs,
                         pair_axis, axes, k_new=k_new, v_new=v_new, causal=causal,
                         page_shift=page_shift, scale=scale)


def fake_attention(q: torch.Tensor):
    """What every attention op returns, as the fake implementations promise it: a contiguous
    ``out`` shaped like ``q [B, N, Hq, D]`` (whatever q's strides) and ``lse [B, Hq, N]``
    fp32."""
    B, N, Hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, Hq, N), dtype=torch.float32)


@_paged_attention_op.register_fake
def _(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, freqs, pair_axis, k_new,
      v_new, causal, page_shift, scale, backend, axes=None):
    return fake_attention(q)


def _setup_context(ctx, inputs, output):
    (q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, freqs, pair_axis, k_new, v_new,
     causal, page_shift, scale, backend, axes) = inputs
    ctx.save_for_backward(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, freqs,
                          pair_axis, k_new, v_new, page_shift)
    ctx.causal, ctx.scale, ctx.axes, ctx.n_inputs = causal, scale, axes, len(inputs)


def _backward(ctx, grad_out, grad_lse):
    # every backend: the torch-path backward (recompute); the cached pools are constants
    (q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, freqs, pair_axis, k_new, v_new,
     page_shift) = ctx.saved_tensors
    table = RopeTable.from_tensors(freqs, pair_axis, ctx.axes)
    dq, dk, dv = paged_attention_backward(grad_out, grad_lse, q, q_pos, cache_k, cache_v,
                                          cache_pos, page_len, page_table, table, k_new, v_new,
                                          ctx.causal, page_shift, ctx.scale)
    grads = [None] * ctx.n_inputs  # positions, pools, tables, options: no gradient
    grads[0], grads[9], grads[10] = dq, dk, dv  # q, k_new, v_new (the op's argument order)
    return tuple(grads)


_paged_attention_op.register_autograd(_backward, setup_context=_setup_context)


def validate_paged_inputs(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, table,
                          k_new, v_new, causal, page_shift, scale, validate=None):
    """All the checks of :func:`paged_attention` (shared with the MoC op). Returns the scale.

    Shapes, dtypes and devices are always checked (no sync); ids, fills and positions only
    when :func:`~lol_kernels._checks.value_checks_enabled` (``validate``)."""
    check_tensor("q", q, ndim=4, kind="float")
    B, N, Hq, D = q.shape
    check_tensor("q_pos", q_pos, ndim=3, kind="int")
    check_shape("q_pos", q_pos, (B, N, None), "[B, N, A]")
    A = q_pos.shape[2]
    check_tensor("cache_k", cache_k, ndim=4, kind="float")
    P, S, Hkv, Dk = cache_k.shape
    if Dk != D:
        raise ValueError(f"cache_k must have head dim D={D} like q, got {Dk}")
    check_keys_values(q, "cache_k", cache_k, "cache_v", cache_v)
    check_tensor("cache_pos", cache_pos, ndim=3, kind="int")
    check_shape("cache_pos", cache_pos, (P, S, A), "[P, S, A] with A like q_pos")
    check_tensor("page_len", page_len, ndim=1, kind="int")
    check_shape("page_len", page_len, (P,), "[P]")
    check_tensor("page_table", page_table, ndim=2, kind="int")
    if page_table.shape[0] != B:
        raise ValueError(f"page_table must have shape [B={B}, M], got {list(page_table.shape)}")
    M = page_table.shape[1]
    if page_shift is not None:
        check_tensor("page_shift", page_shift, ndim=3, kind="int")
        check_shape("page_shift", page_shift, (B, M, A), "[B, M, A]")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    if k_new is not None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            check_tensor(name, t, ndim=4, kind="float")
            check_shape(name, t, (B, N, Hkv, D), "[B, N, Hkv, D]")
        check_same_dtype("q", q, k_new=k_new, v_new=v_new)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and k_new is None:
        raise ValueError("causal=True needs k_new/v_new (it masks the block's own keys)")
    check_same_device("q", q, q_pos=q_pos, cache_k=cache_k, cache_v=cache_v, cache_pos=cache_pos,
                      page_len=page_len, page_table=page_table, page_shift=page_shift,
                      k_new=k_new, v_new=v_new)
    check_table(table, Hq, D, A, heads_name="q")
    scale = check_scale(scale, D)
    if not value_checks_enabled(validate):
        check_host_positions("q_pos", q_pos, POS_LIMIT)
        check_host_positions("cache_pos", cache_pos, POS_LIMIT)
        if page_shift is not None:
            check_host_positions("page_shift", page_shift, POS_LIMIT)
        return scale
    check_page_ids("page_table", page_table, P)
    if page_len.numel():
        lo, hi = torch.stack(torch.aminmax(page_len)).tolist()  # one host sync
        if lo < 0 or hi > S:
            raise ValueError(f"page_len must be in [0, S={S}], got [{lo}, {hi}]")
    check_positions_fit("q_pos", q_pos, POS_LIMIT)
    stored = check_positions_fit("cache_pos", cache_pos, POS_LIMIT)
    if page_shift is not None:
        shift = check_positions_fit("page_shift", page_shift, POS_LIMIT)
        check_shifted_fit("cache_pos", stored, "page_shift", shift)
    return scale


def validate_dense_inputs(q, k, v, q_pos, k_pos, table, causal, scale, validate=None):
    """All the checks of :func:`lol_kernels.rope_attention` (positions only when
    ``validate``, as :func:`validate_paged_inputs`). Returns the scale."""
    check_tensor("q", q, ndim=4, kind="float")
    B, N, Hq, D = q.shape
    check_tensor("k", k, ndim=4, kind="float")
    Nk = k.shape[1]
    check_shape("k", k, (B, None, None, D), "[B, Nk, Hkv, D] like q")
    check_keys_values(q, "k", k, "v", v)
    check_tensor("q_pos", q_pos, ndim=3, kind="int")
    check_shape("q_pos", q_pos, (B, N, None), "[B, N, A]")
    check_tensor("k_pos", k_pos, ndim=3, kind="int")
    check_shape("k_pos", k_pos, (B, Nk, q_pos.shape[2]), "[B, Nk, A] with A like q_pos")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_same_device("q", q, k=k, v=v, q_pos=q_pos, k_pos=k_pos)
    check_table(table, Hq, D, q_pos.shape[2], heads_name="q")
    scale = check_scale(scale, D)
    if value_checks_enabled(validate):
        check_positions_fit("q_pos", q_pos, POS_LIMIT)
        check_positions_fit("k_pos", k_pos, POS_LIMIT)
    else:
        check_host_positions("q_pos", q_pos, POS_LIMIT)
        check_host_positions("k_pos", k_pos, POS_LIMIT)
    return scale


def paged_attention(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, table, *,
                    k_new=None, v_new=None, causal=False, page_shift=None, scale=None,
                    backend="auto", validate=None):
    """Attention of a block of queries over a paged sink + window cache, RoPE applied at read.

    Keys live un-rotated in the pool; each key is rotated at read time with its stored position
    plus the ``page_shift`` of its page-table entry, using the frequencies of the **query head
    that reads it** (so GQA with per-head jitter stays exactly relative).

    Args:
        q: ``[B, N, Hq, D]`` un-rotated queries of the current block (fp16/bf16/fp32/fp64).
        q_pos: ``[B, N, A]`` int positions of the queries (``t, h, w``).
        cache_k, cache_v: ``[P, S, Hkv, D]`` pools of ``P`` pages of ``S`` slots, q's dtype.
            Query head ``h`` reads KV head ``h // (Hq // Hkv)``.
        cache_pos: ``[P, S, A]`` int stored positions. page_len: ``[P]`` int filled slots.
        page_table: ``[B, M]`` int page ids to read, any order, ``-1`` = empty entry.
        table: :class:`RopeTable` with ``Hq`` rows.
        k_new, v_new: ``[B, N, Hkv, D]`` the block's own keys/values at ``q_pos`` (optional).
        causal: ``False``: every query sees every new key (block-causal video); ``True``: query
            ``i`` sees new keys ``j <= i`` (token-causal). Cached keys are always all visible.
        page_shift: ``[B, M, A]`` int added to the stored positions of that entry's page.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"``, ``"triton"`` (fp64
            and head dims the kernel lacks run the torch path; docs/design.md §3).
        validate: also check the values (page ids, ``page_len``, positions): one host sync.
            ``None``: only when the environment sets ``LOL_VALIDATE=1``. Shapes, dtypes and
            devices are always checked.

    Returns:
        ``out [B, N, Hq, D]`` (contiguous) in q's dtype and ``lse [B, Hq, N]`` fp32: the
        natural-log softmax denominator of the scaled scores, ``log sum_k exp(scale * q.k)``.
        A query row that sees no key returns zeros and ``lse = -inf``. Empty ``B``, ``N`` or
        ``Hq`` give empty outputs; an empty pool, table or ``S`` leaves only the new keys.

    Raises ``ValueError`` on bad input: a shape, device or ``scale`` (finite, positive) that
    does not fit; with ``validate``, also page ids outside ``[-1, P)`` or listed twice in a
    row, positions beyond ``+-2^30`` or ``|cache_pos| + |page_shift| >= 2^31`` (int32 in the
    kernels). Value checks read the tensors on the host, so they run only when asked and never
    under ``torch.compile``: an unchecked bad page id fails inside the backend (a raw
    ``IndexError`` on the CPU) or reads the wrong page, so build tables with
    :meth:`~lol_kernels.PagedKVCache.read`, which checks what it creates.

    Gradients: ``.backward()`` / ``torch.autograd.grad`` (and ``torch.compile``) give ``q``,
    ``k_new`` and ``v_new`` (the block being trained) their gradients, through ``out`` and
    ``lse``. The cached pools ``cache_k``/``cache_v`` are constants: they get no gradient even
    when they require one (``.grad`` stays ``None``; ``torch.autograd.grad`` on them raises
    unless ``allow_unused=True``, then gives ``None``); positions and tables get none either.
    Triton forward, torch backward until the fused backward lands: the backward recomputes
    the scores over every slot of the table's pages in the torch path (no host sync).
    ``torch.func`` transforms (``grad``, ``vjp``) raise ``RuntimeError``: not supported.

    Example:
        >>> out, lse = lk.paged_attention(q, q_pos, cache.k[layer], cache.v[layer], cache.pos,
        ...                               cache.page_len, read.page_table, table,
        ...                               k_new=k, v_new=v, page_shift=read.page_shift)
    """
    scale = validate_paged_inputs(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                                  table, k_new, v_new, causal, page_shift, scale, validate)
    backend = resolve_backend("paged_attention", backend, q)
    t = table.to(q.device)
    check_func_transform("lol::paged_attention", q, cache_k, cache_v, k_new, v_new)
    return _paged_attention_op(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                               t.freqs, t.pair_axis, k_new, v_new, causal, page_shift, scale,
                               backend, list(t.axes))
