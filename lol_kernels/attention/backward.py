"""Backward of the attention ops (torch path, every backend): recompute, then the FA-style
formulas, with RoPE undone by rotating the gradients back.

Given un-rotated ``q [B, N, Hq, D]`` and keys ``k, v [B, Nk, Hkv, D]``, the op computes
``qr = R(q_pos) q`` and, per query head ``h``, ``kr_h = R_h(k_pos) k_{h // g}`` (``g = Hq //
Hkv``), ``p = softmax(scale * qr . kr_h)`` and ``out = p v``. The backward recomputes ``p`` in
the compute dtype (fp32, fp64 for fp64: no saved fp32 ``lse`` limits a float64 gradcheck), then

    dp = dO v^T,  ds = p * (dp - rowsum(p * dp) + dlse),
    dqr = scale * ds kr,  dkr = scale * ds^T qr,  dv_h = p^T dO,

and un-rotates with the transpose of each rotation (``R(-angle)``): ``dq = R^T dqr``; with GQA
and per-head jitter every query head's ``dkr_h`` is un-rotated with **its own** frequencies
before the group's heads are summed into ``dk`` (and ``dv``). The scores are materialized
``[B, Hq, N, Nk]``: memory grows with ``N * Nk`` until the fused Triton backward lands (issue 17).
"""

from __future__ import annotations

import torch

from ..rope.reference import compute_dtype, rope_cos_sin, rotate_pairs
from ..rope.table import RopeTable
from .reference import page_fill


def attention_backward(grad_out, grad_lse, q, q_pos, k, v, k_pos, table: RopeTable, mask,
                       scale: float, n_const: int = 0):
    """Gradients of ``out, lse = attention(RoPE(q), RoPE(k), v)`` for q, k and v.

    Args:
        grad_out: ``[B, N, Hq, D]`` incoming gradient of ``out`` (or ``None``).
        grad_lse: ``[B, Hq, N]`` incoming gradient of ``lse`` (or ``None``).
        q: ``[B, N, Hq, D]`` un-rotated queries at ``q_pos [B, N, A]``.
        k, v: ``[B, Nk, Hkv, D]`` un-rotated keys/values at ``k_pos [B, Nk, A]``.
        table: :class:`RopeTable` with ``Hq`` rows. mask: ``[B, N, Nk]`` or (per head)
            ``[B, Hq, N, Nk]`` bool visibility, or ``None`` (all visible). scale: softmax scale.
        n_const: the first ``n_const`` keys are constants (a cache): no gradient is formed.

    Returns ``dq`` like q and ``dk, dv [B, Nk - n_const, Hkv, D]`` in k's dtype.
    """
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    ct = compute_dtype(q.dtype)
    table = table.to(q.device)
    cos_q, sin_q = rope_cos_sin(q_pos, table, ct)
    cos_k, sin_k = rope_cos_sin(k_pos, table, ct)  # [B, Nk, Hq, D/2]: each query head's own
    qr = rotate_pairs(q.to(ct), cos_q, sin_q)
    kr = rotate_pairs(k.to(ct).repeat_interleave(g, dim=2), cos_k, sin_k)
    vv = v.to(ct).repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qr, kr) * scale
    if mask is not None:
        s = s.masked_fill(~(mask.unsqueeze(1) if mask.dim() == 3 else mask), float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.where(torch.isfinite(lse), torch.exp(s - lse), 0.0)  # a row seeing no key: 0
    ds = torch.zeros_like(p)
    dvv = None
    if grad_out is not None:
        do = grad_out.to(ct)
        dp = torch.einsum("bqhd,bkhd->bhqk", do, vv)
        ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
        dvv = torch.einsum("bhqk,bqhd->bkhd", p[..., n_const:], do)
    if grad_lse is not None:  # d lse / d s = p
        ds = ds + p * grad_lse.to(ct).unsqueeze(-1)
    dq = rotate_pairs(torch.einsum("bhqk,bkhd->bqhd", ds, kr) * scale, cos_q, -sin_q)
    dkr = torch.einsum("bhqk,bqhd->bkhd", ds[..., n_const:], qr) * scale
    dk = rotate_pairs(dkr, cos_k[:, n_const:], -sin_k[:, n_const:])  # un-rotate per query head
    dk = dk.unflatten(2, (Hkv, g)).sum(dim=3)
    dv = torch.zeros_like(dk) if dvv is None else dvv.unflatten(2, (Hkv, g)).sum(dim=3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def causal_mask(N: int, Nk: int, device) -> torch.Tensor:
    """``[N, Nk]`` bool: query ``i`` sees keys ``j <= i`` (top-left aligned, as SDPA)."""
    return torch.ones(N, Nk, dtype=torch.bool, device=device).tril()


def paged_keys(cache_k, cache_v, cache_pos, page_len, page_table, page_shift):
    """Every slot of every page-table entry, padded to ``L = M * S`` (static shapes, no host
    sync, so the backward traces under ``torch.compile``).

    Returns ``k, v [B, L, Hkv, D]`` (detached: the pools are constants), ``pos [B, L, A]``
    int64 with ``page_shift`` added, and ``ok [B, L]`` bool (slot filled and entry not -1).
    """
    P, S, Hkv, D = cache_k.shape
    A = cache_pos.shape[2]
    B, M = page_table.shape
    if P * S == 0:  # an empty pool: no cached key
        empty = cache_k.new_zeros(B, 0, Hkv, D)
        return (empty, empty, cache_pos.new_zeros(B, 0, A, dtype=torch.long),
                torch.zeros(B, 0, dtype=torch.bool, device=cache_k.device))
    pt = page_table.long()
    ids = pt.clamp(min=0)
    slots = torch.arange(S, device=pt.device)
    ok = ((pt >= 0).unsqueeze(-1) & (slots < page_fill(page_len)[ids].unsqueeze(-1)))
    flat = (ids.unsqueeze(-1) * S + slots).reshape(B, M * S)
    pos = cache_pos.reshape(P * S, A)[flat].long()
    if page_shift is not None:
        pos = pos + page_shift.long().repeat_interleave(S, dim=1)
    k = cache_k.detach().reshape(P * S, Hkv, D)[flat]
    v = cache_v.detach().reshape(P * S, Hkv, D)[flat]
    return k, v, pos, ok.reshape(B, M * S)


def paged_attention_backward(grad_out, grad_lse, q, q_pos, cache_k, cache_v, cache_pos,
                             page_len, page_table, table, k_new, v_new, causal, page_shift,
                             scale):
    """Gradients of :func:`lol_kernels.paged_attention` for ``q``, ``k_new`` and ``v_new``
    (``None`` when the block has no new keys); the cached pools are constants."""
    B, N = q.shape[:2]
    k, v, kpos, ok = paged_keys(cache_k, cache_v, cache_pos, page_len, page_table, page_shift)
    L = k.shape[1]
    mask = ok.unsqueeze(1).expand(B, N, L)
    if k_new is not None:
        k = torch.cat([k, k_new.detach()], dim=1)
        v = torch.cat([v, v_new.detach()], dim=1)
        kpos = torch.cat([kpos, q_pos.long()], dim=1)
        new = causal_mask(N, N, q.device) if causal else torch.ones(
            N, N, dtype=torch.bool, device=q.device)
        mask = torch.cat([mask, new.expand(B, N, N)], dim=2)
    dq, dk, dv = attention_backward(grad_out, grad_lse, q, q_pos, k, v, kpos, table, mask,
                                    scale, n_const=L)
    return (dq, None, None) if k_new is None else (dq, dk, dv)


def check_func_transform(name: str, *tensors) -> None:
    """Refuse ``torch.func.grad``/``vjp``/``jacrev`` over op ``name`` clearly: its backward is a
    ``torch.library`` autograd formula, which torch.func cannot transform (torch would fail
    with a message about ``setup_context``). ``.backward()``, ``torch.autograd.grad`` and
    ``torch.compile`` work."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return
    if torch._C._are_functorch_transforms_active() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{name} does not support torch.func transforms (grad, vjp, jacrev): use "
            f"torch.autograd.grad or .backward() instead, which {name} supports")
