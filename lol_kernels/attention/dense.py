"""``rope_attention``: dense RoPE + attention in one call (drop-in for ``rope -> SDPA``).

For models without a paged cache. The Triton backend is the paged kernel with an empty cache
whose "new key" stream is the dense ``k``/``v`` at ``k_pos`` (no copy, no rotated K in memory);
the torch backend rotates ``q`` and ``k`` and runs one fused attention call.
"""

from __future__ import annotations

import torch

from .._checks import (
    check_backend,
    check_positions_fit,
    check_same_device,
    check_shape,
    check_tensor,
)
from ..rope.op import check_table
from ..rope.reference import compute_dtype, rope_cos_sin, rotate_pairs
from ..rope.table import RopeTable
from .op import POS_LIMIT, triton_available
from .reference import _rotate_keys, attention_with_lse


def rope_attention_torch(q, k, v, q_pos, k_pos, table: RopeTable, *, causal=False, scale=None):
    """PyTorch path of :func:`rope_attention`: RoPE in fp32 (fp64 for fp64), then attention.

    Returns ``out [B, Nq, Hq, D]`` in q.dtype and ``lse [B, Hq, Nq]`` fp32.
    """
    B, Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    dt, ct = q.dtype, compute_dtype(q.dtype)
    scale = D**-0.5 if scale is None else scale
    if Nk == 0:
        return q.new_zeros(q.shape), q.new_full((B, Hq, Nq), float("-inf"), dtype=torch.float32)
    table = table.to(q.device)
    cos, sin = rope_cos_sin(q_pos, table, ct)
    qr = rotate_pairs(q.to(ct), cos, sin).to(dt).transpose(1, 2)
    kr = _rotate_keys(k, k_pos, table, Hq, ct).to(dt).transpose(1, 2)
    vv = v.repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2)
    bias = None
    if causal:  # query i sees keys j <= i (top-left, as SDPA's is_causal)
        vis = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril()
        bias = torch.zeros(Nq, Nk, dtype=dt, device=q.device).masked_fill_(~vis, float("-inf"))
    out, lse = attention_with_lse(qr, kr, vv, bias, scale)
    return out.transpose(1, 2).to(dt), lse.float()


def _triton_impl():
    from .triton_kernel import rope_attention_triton
    return rope_attention_triton


@torch.library.custom_op("lol::rope_attention", mutates_args=())
def _rope_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                       k_pos: torch.Tensor, freqs: torch.Tensor, pair_axis: torch.Tensor,
                       causal: bool, scale: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = RopeTable.from_tensors(freqs, pair_axis)
    fn = _triton_impl() if backend == "triton" else rope_attention_torch
    out, lse = fn(q, k, v, q_pos, k_pos, table, causal=causal, scale=scale)
    return out.contiguous(), lse.float().contiguous()  # the layouts the fake impl promises


@_rope_attention_op.register_fake
def _(q, k, v, q_pos, k_pos, freqs, pair_axis, causal, scale, backend):
    B, Nq, Hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, Hq, Nq), dtype=torch.float32)


def _validate(q, k, v, q_pos, k_pos, table, causal, scale):
    check_tensor("q", q, ndim=4, kind="float")
    B, Nq, Hq, D = q.shape
    check_tensor("k", k, ndim=4, kind="float")
    Nk, Hkv = k.shape[1], k.shape[2]
    check_shape("k", k, (B, None, None, D), "[B, Nk, Hkv, D] like q")
    if Hq % Hkv:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of k heads Hkv={Hkv} (GQA)")
    check_tensor("v", v, ndim=4, kind="float")
    check_shape("v", v, (B, Nk, Hkv, D), "like k")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    check_tensor("q_pos", q_pos, ndim=3, kind="int")
    check_shape("q_pos", q_pos, (B, Nq, None), "[B, Nq, A]")
    check_tensor("k_pos", k_pos, ndim=3, kind="int")
    check_shape("k_pos", k_pos, (B, Nk, q_pos.shape[2]), "[B, Nk, A] with A like q_pos")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_same_device("q", q, k=k, v=v, q_pos=q_pos, k_pos=k_pos)
    check_table(table, Hq, D, q_pos.shape[2], heads_name="q")
    check_positions_fit("q_pos", q_pos, POS_LIMIT)
    check_positions_fit("k_pos", k_pos, POS_LIMIT)
    if scale is None:
        return D**-0.5
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return float(scale)


def rope_attention(q, k, v, q_pos, k_pos, table, *, causal=False, scale=None, backend="auto",
                   return_lse=False):
    """RoPE (per-head, optionally jittered, 3D) and attention in one call over dense K/V.

    Replaces ``scaled_dot_product_attention(apply_rope(q), apply_rope(k), v)`` in a model: the
    keys are rotated in registers, never written rotated. Key head ``h // (Hq // Hkv)`` is
    rotated with the frequencies of the query head ``h`` that reads it.

    Args:
        q: ``[B, Nq, Hq, D]`` un-rotated queries, fp16/bf16/fp32/fp64.
        k, v: ``[B, Nk, Hkv, D]`` un-rotated keys and values, q's dtype; ``Hq % Hkv == 0``.
        q_pos: ``[B, Nq, A]`` int positions; k_pos: ``[B, Nk, A]`` int positions.
        table: :class:`RopeTable` with ``Hq`` rows.
        causal: query ``i`` sees keys ``j <= i`` (top-left aligned like SDPA's ``is_causal``;
            with ``Nq < Nk`` the last keys are seen by no query). Default: all keys visible.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"``, ``"triton"``.
        return_lse: also return ``lse [B, Hq, Nq]`` fp32 (natural-log softmax denominator).

    Returns:
        ``out [B, Nq, Hq, D]`` in q's dtype (and ``lse`` if asked).

    Example:
        >>> table = lk.rope_frequencies(128, 12, jitter_sigma=0.8)
        >>> out = lk.rope_attention(q, k, v, pos, pos, table)  # q, k, v: [1, 4680, 12, 128]
    """
    scale = _validate(q, k, v, q_pos, k_pos, table, causal, scale)
    check_backend(backend, ("auto", "torch", "triton"))
    if backend == "auto":
        backend = "triton" if q.is_cuda and triton_available() else "torch"
    t = table.to(q.device)
    out, lse = _rope_attention_op(q, k, v, q_pos, k_pos, t.freqs, t.pair_axis, causal, scale,
                                  backend)
    return (out, lse) if return_lse else out
