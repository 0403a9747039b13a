"""``rope_attention``: dense RoPE + attention in one call (drop-in for ``rope -> SDPA``).

For models without a paged cache, and for training (forward and backward). The Triton backend
is the paged kernel with an empty cache whose "new key" stream is the dense ``k``/``v`` at
``k_pos``; the torch backend (:func:`~lol_kernels.attention.attention_cpu.rope_attention_torch`) rotates
``q`` and ``k`` and runs one fused attention call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._dispatch import resolve_backend
from ..rope.table import RopeTable
from .attention_cpu import rope_attention_torch
from .backward import check_func_transform, rope_attention_backward_torch
from .paged_attention_op import fake_attention, run_attention, validate_dense_inputs


@torch.library.custom_op("lol::rope_attention", mutates_args=())
def _rope_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                       k_pos: torch.Tensor, freqs: torch.Tensor, pair_axis: torch.Tensor,
                       causal: bool, scale: float, backend: str,
                       axes: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return run_attention("rope_attention", backend, rope_attention_torch, q,
                         (k, v, q_pos, k_pos), freqs, pair_axis, axes, causal=causal,
                         scale=scale)


@_rope_attention_op.register_fake
def _(q, k, v, q_pos, k_pos, freqs, pair_axis, causal, scale, backend, axes=None):
    return fake_attention(q)


def _setup_context(ctx, inputs, output):
    q, k, v, q_pos, k_pos, freqs, pair_axis, causal, scale, backend, axes = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, q_pos, k_pos, freqs, pair_axis, out, lse)
    ctx.causal, ctx.scale, ctx.axes, ctx.n_inputs = causal, scale, axes, len(inputs)
    ctx.backend = backend
    ctx.set_materialize_grads(False)  # an unused output's gradient is None, not zeros


@torch.library.custom_op("lol::rope_attention_backward", mutates_args=())
def _rope_attention_backward_op(
        grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None, q: torch.Tensor,
        k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
        freqs: torch.Tensor, pair_axis: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        causal: bool, scale: float, backend: str,
        axes: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # an op of its own: torch.compile traces the backward through its fake, never into Triton
    table = RopeTable.from_tensors(freqs, pair_axis, axes)
    backward = rope_attention_backward_torch
    if backend == "triton":
        from .rope_attention_triton_backward import (
            backward_launchable,
            rope_attention_backward_triton,
        )
        if backward_launchable(q.dtype, q.shape[-1]):  # else the forward ran torch too
            backward = rope_attention_backward_triton
    dq, dk, dv = backward(grad_out, grad_lse, q, k, v, q_pos, k_pos, table, out, lse,
                          causal=causal, scale=scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_rope_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, q_pos, k_pos, freqs, pair_axis, out, lse, causal, scale,
      backend, axes=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _backward(ctx, grad_out, grad_lse):
    # grad_out or grad_lse is None when that output was not used (never both); Triton
    # backend: the fused Triton backward; otherwise the torch path (fused CPU flash backward
    # on the CPU, a blockwise recompute elsewhere)
    q, k, v, q_pos, k_pos, freqs, pair_axis, out, lse = ctx.saved_tensors
    dq, dk, dv = _rope_attention_backward_op(grad_out, grad_lse, q, k, v, q_pos, k_pos, freqs,
                                             pair_axis, out, lse, ctx.causal, ctx.scale,
                                             ctx.backend, ctx.axes)
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)  # positions, table, options: none


_rope_attention_op.register_autograd(_backward, setup_context=_setup_context)


def rope_attention(q, k, v, q_pos, k_pos, table, *, causal=False, scale=None, backend="auto",
                   return_lse=False, validate=None):
    """RoPE (per-head, optionally jittered, 3D) and attention in one call over dense K/V.

    Replaces ``scaled_dot_product_attention(apply_rope(q), apply_rope(k), v)`` in a model: the
    keys are rotated in registers, never written rotated. Key head ``h // (Hq // Hkv)`` is
    rotated with the frequencies of the query head ``h`` that reads it.

    Args:
        q: ``[B, N, Hq, D]`` un-rotated queries, fp16/bf16/fp32/fp64.
        k, v: ``[B, Nk, Hkv, D]`` un-rotated keys and values, q's dtype; ``Hq % Hkv == 0``.
        q_pos: ``[B, N, A]`` int positions; k_pos: ``[B, Nk, A]`` int positions.
        table: :class:`RopeTable` with ``Hq`` rows.
        causal: query ``i`` sees keys ``j <= i`` (top-left aligned like SDPA's ``is_causal``;
            with ``N < Nk`` the last keys are seen by no query). Default: all keys visible.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"``, ``"triton"`` (fp64
            and head dims the kernel lacks run the torch path; docs/design.md §3).
        return_lse: also return ``lse [B, Hq, N]`` fp32 (natural-log softmax denominator).
        validate: also check that positions fit the kernels' int32 (a host sync); ``None``:
            when ``LOL_VALIDATE=1`` (as :func:`lol_kernels.paged_attention`).

    Returns:
        ``out [B, N, Hq, D]`` in q's dtype (and ``lse`` if asked); with ``Nk = 0`` zeros and
        ``lse = -inf``.

    Gradients: ``.backward()`` / ``torch.autograd.grad`` (and ``torch.compile``, which traces
    forward and backward) give ``q``, ``k`` and ``v`` their gradients, through ``out`` and
    ``lse``; positions and the table get none. With GQA, ``dk`` and ``dv`` sum the group's
    query heads, each un-rotated with its own head's frequencies. The backward reuses the
    saved ``out`` and ``lse`` and forms no ``[N, Nk]`` matrix: the Triton backend runs the
    fused FA2-style Triton kernels with RoPE in registers
    (:mod:`lol_kernels.attention.rope_attention_triton_backward`); the torch backend one fused CPU
    flash-attention backward on the re-rotated inputs, and elsewhere (and in fp64) a
    recompute of the scores a block of query rows at a time
    (:mod:`lol_kernels.attention.backward`).
    ``torch.func`` transforms (``grad``, ``vjp``) raise ``RuntimeError``: not supported.

    Example:
        >>> table = lk.rope_frequencies(128, 12, jitter_sigma=0.8)
        >>> out = lk.rope_attention(q, k, v, pos, pos, table)  # q, k, v: [1, 4680, 12, 128]
    """
    scale = validate_dense_inputs(q, k, v, q_pos, k_pos, table, causal, scale, validate)
    backend = resolve_backend("rope_attention", backend, q)
    t = table.to(q.device)
    check_func_transform("lol::rope_attention", q, k, v)
    out, lse = _rope_attention_op(q, k, v, q_pos, k_pos, t.freqs, t.pair_axis, causal, scale,
                                  backend, list(t.axes))
    return (out, lse) if return_lse else out
