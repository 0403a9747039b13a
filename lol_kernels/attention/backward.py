"""Backward of the attention ops (torch path): FA-style formulas, with RoPE undone by rotating
the gradients back.

Given un-rotated ``q [B, N, Hq, D]`` and keys ``k, v [B, Nk, Hkv, D]``, the op computes
``qr = R(q_pos) q`` and, per query head ``h``, ``kr_h = R_h(k_pos) k_{h // g}`` (``g = Hq //
Hkv``), ``p = softmax(scale * qr . kr_h)`` and ``out = p v``. Its backward is

    dp = dO v^T,  delta = rowsum(dO * out),  ds = p * (dp - delta + dlse),
    dqr = scale * ds kr,  dkr = scale * ds^T qr,  dv_h = p^T dO,

un-rotated with the transpose of each rotation (``R(-angle)``): ``dq = R^T dqr``; with GQA and
per-head jitter every query head's ``dkr_h`` is un-rotated with **its own** frequencies before
the group's heads are summed into ``dk`` (and ``dv``). Two implementations:

* :func:`rope_attention_backward_torch` (``rope_attention``, fp16/bf16/fp32 on the CPU): the
  forward's saved ``out`` and ``lse``, the rotations recomputed, and torch's fused CPU
  flash-attention backward on the rotated tensors: memory ``O((N + Nk) Hq D)``, no
  ``[N, Nk]`` matrix. The ``lse`` gradient rides in the same call: with one zero column
  appended to ``q, k, v``, a column of ones to ``dO`` and ``-dlse`` to ``out``, the kernel's
  ``delta`` becomes ``delta - dlse`` and nothing else changes.
* :func:`attention_backward` (every other case: fp64, other devices, the paged and MoC ops with
  their masks): the scores recomputed in fp32 (fp64 for fp64, with their own ``lse``: no
  saved fp32 ``lse`` limits a float64 gradcheck), one block of query rows at a time, so memory
  is ``[B, Hq, T, Nk]`` for ``T`` rows of a block, not ``[B, Hq, N, Nk]``.
"""

from __future__ import annotations

import torch

from ..rope.reference import compute_dtype, rope_cos_sin, rotate_pairs
from ..rope.rope_cpu import rope_factors, rotate_
from ..rope.table import RopeTable
from .reference import page_fill

#: elements of one ``[B, Hq, T, Nk]`` score block of :func:`attention_backward` (fp32: 16 MB)
SCORE_BLOCK = 1 << 22
#: zero columns appended to q/k/v for the ``lse`` gradient (even: pairs stay complex-viewable)
LSE_PAD = 8


def attention_backward(grad_out, grad_lse, q, q_pos, k, v, k_pos, table: RopeTable, mask,
                       scale: float, n_const: int = 0):
    """Gradients of ``out, lse = attention(RoPE(q), RoPE(k), v)`` for q, k and v, by recompute.

    Args:
        grad_out: ``[B, N, Hq, D]`` incoming gradient of ``out`` (or ``None``).
        grad_lse: ``[B, Hq, N]`` incoming gradient of ``lse`` (or ``None``).
        q: ``[B, N, Hq, D]`` un-rotated queries at ``q_pos [B, N, A]``.
        k, v: ``[B, Nk, Hkv, D]`` un-rotated keys/values at ``k_pos [B, Nk, A]``.
        table: :class:`RopeTable` with ``Hq`` rows. mask: bool visibility ``[N, Nk]``,
            ``[B, N, Nk]`` or (per head) ``[B, Hq, N, Nk]``, or ``None`` (all visible).
        scale: softmax scale.
        n_const: the first ``n_const`` keys are constants (a cache): no gradient is formed.

    Returns ``dq`` like q and ``dk, dv [B, Nk - n_const, Hkv, D]`` in k's dtype. The scores
    are formed :data:`SCORE_BLOCK` elements (whole query rows) at a time; a row that sees no
    key gets zero gradients.
    """
    B, N, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    ct = compute_dtype(q.dtype)
    table = table.to(q.device)
    cos_q, sin_q = rope_cos_sin(q_pos, table, ct)
    cos_k, sin_k = rope_cos_sin(k_pos, table, ct)  # [B, Nk, Hq, D/2]: each query head's own
    qr = rotate_pairs(q.to(ct), cos_q, sin_q)
    kr = rotate_pairs(k.to(ct).repeat_interleave(g, dim=2), cos_k, sin_k)
    vv = v.to(ct).repeat_interleave(g, dim=2)
    do = None if grad_out is None else grad_out.to(ct)
    dl = None if grad_lse is None else grad_lse.to(ct)
    if mask is not None and mask.dim() == 3:
        mask = mask.unsqueeze(1)  # [B, 1, N, Nk]: the same for every head
    dqr = torch.zeros_like(qr)
    dkr = qr.new_zeros(B, Nk - n_const, Hq, D)
    dvv = torch.zeros_like(dkr)
    rows = max(1, SCORE_BLOCK // max(1, B * Hq * Nk))
    for i0 in range(0, N, rows):
        i1 = min(N, i0 + rows)
        qc = qr[:, i0:i1]
        s = torch.einsum("bqhd,bkhd->bhqk", qc, kr) * scale
        if mask is not None:
            s = s.masked_fill(~mask[..., i0:i1, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        p = torch.where(torch.isfinite(lse), torch.exp(s - lse), 0.0)  # a row seeing no key: 0
        ds = torch.zeros_like(p)
        if do is not None:
            dp = torch.einsum("bqhd,bkhd->bhqk", do[:, i0:i1], vv)
            ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
            dvv += torch.einsum("bhqk,bqhd->bkhd", p[..., n_const:], do[:, i0:i1])
        if dl is not None:  # d lse / d s = p
            ds = ds + p * dl[:, :, i0:i1].unsqueeze(-1)
        dqr[:, i0:i1] = torch.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
        dkr += torch.einsum("bhqk,bqhd->bkhd", ds[..., n_const:], qc) * scale
    dq = rotate_pairs(dqr, cos_q, -sin_q)
    dk = rotate_pairs(dkr, cos_k[:, n_const:], -sin_k[:, n_const:])  # un-rotate per query head
    dk = dk.unflatten(2, (Hkv, g)).sum(dim=3)
    dv = dvv.unflatten(2, (Hkv, g)).sum(dim=3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def fused_backward_supported(q: torch.Tensor) -> bool:
    """Whether :func:`rope_attention_backward_torch` runs torch's fused CPU backward for ``q``
    (fp16/bf16/fp32 on the CPU); otherwise it runs :func:`attention_backward`."""
    return q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def token_factors(pos, table: RopeTable, dtype):
    """Rotation of ``pos [B, L, A]`` for a token-major ``[B, L, Hq, D]`` tensor, as
    :func:`rotate_tokens` takes it.

    Eagerly: :func:`~lol_kernels.rope.rope_cpu.rope_factors` (one complex factor per distinct
    position of each axis, few in a video; the angles of
    :func:`~lol_kernels.rope.reference.rope_angles`). While ``torch.compile`` traces
    (``torch.unique`` has a data-dependent size): a ``(cos, sin)`` tuple per token.
    """
    if torch.compiler.is_compiling():
        return rope_cos_sin(pos, table, dtype)
    return rope_factors(pos, table, dtype)


def inverse_factors(factors):
    """The inverse rotation (``-angle``) of :func:`token_factors`."""
    if isinstance(factors, tuple):
        return factors[0], -factors[1]
    return [(i, j, f.conj().resolve_conj()) for i, j, f in factors]  # resolved once, not per use


def rotate_tokens(x, factors) -> torch.Tensor:
    """``x [B, L, Hq, >= D]`` with its first ``D`` channels rotated by :func:`token_factors`,
    in place (``x`` is returned; out of place into ``x`` while compiling)."""
    if isinstance(factors, tuple):
        D = 2 * factors[0].shape[-1]
        x[..., :D] = rotate_pairs(x[..., :D], *factors)
        return x
    rotate_(x[..., :2 * sum(j - i for i, j, _ in factors)], factors)
    return x


def expand_heads(x, Hq: int, dtype, pad: int = 0) -> torch.Tensor:
    """``x [B, L, Hx, D]`` as a fresh ``[B, L, Hq, D + pad]`` tensor in ``dtype``: head ``h``
    holds ``x``'s head ``h // (Hq // Hx)``; the ``pad`` extra channels are zeros."""
    B, L, Hx, D = x.shape
    buf = x.new_empty((B, L, Hq, D + pad), dtype=dtype)
    buf[..., :D].unflatten(2, (Hx, Hq // Hx)).copy_(x.unsqueeze(3))
    if pad:
        buf[..., D:] = 0
    return buf


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same memory the same way (no value is read)."""
    if a is b:
        return True
    if torch.compiler.is_compiling():
        return False
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


def group_sum(d: torch.Tensor, Hx: int, dtype) -> torch.Tensor:
    """``d [B, L, Hq, D]`` summed over each group of ``Hq // Hx`` heads: contiguous
    ``[B, L, Hx, D]`` in ``dtype``."""
    if d.shape[2] != Hx:
        d = d.unflatten(2, (Hx, d.shape[2] // Hx)).sum(dim=3)
    return d.to(dtype).contiguous()


def rotated_qk(q, k, q_pos, k_pos, table: RopeTable, pad: int = 0):
    """The rotated operands of the dense torch path, formed one way for its forward and its
    backward (so the backward recomputes exactly what the forward attended): ``qr, kr
    [B, L, Hq, D + pad]`` in q's dtype (token-major memory, RoPE in fp32 / fp64, key head
    ``h // g`` rotated with query head ``h``'s frequencies, ``pad`` zero channels) and the
    factors ``fq, fk`` (:func:`token_factors`; ``fk is fq`` when the positions are the same
    tensor). ``table`` on q's device."""
    Hq, dt, ct = q.shape[2], q.dtype, compute_dtype(q.dtype)
    fq = token_factors(q_pos, table, ct)
    fk = fq if same_tensor(q_pos, k_pos) else token_factors(k_pos, table, ct)
    qr = rotate_tokens(expand_heads(q, Hq, ct, pad), fq).to(dt)
    kr = rotate_tokens(expand_heads(k, Hq, ct, pad), fk).to(dt)
    return qr, kr, fq, fk


def rope_attention_backward_torch(grad_out, grad_lse, q, k, v, q_pos, k_pos, table: RopeTable,
                                  out, lse, *, causal: bool, scale: float):
    """Gradients of :func:`lol_kernels.rope_attention` for ``q``, ``k`` and ``v``.

    Args:
        grad_out: ``[B, N, Hq, D]`` incoming gradient of ``out``, or ``None``.
        grad_lse: ``[B, Hq, N]`` incoming gradient of ``lse``, or ``None``.
        q: ``[B, N, Hq, D]`` un-rotated queries at ``q_pos [B, N, A]``.
        k, v: ``[B, Nk, Hkv, D]`` un-rotated keys and values at ``k_pos [B, Nk, A]``.
        table: :class:`RopeTable` with ``Hq`` rows.
        out: ``[B, N, Hq, D]`` the forward's output; lse: ``[B, Hq, N]`` fp32, its log-sum-exp.
        causal: query ``i`` sees keys ``j <= i`` (top-left aligned, as the forward).
        scale: softmax scale.

    Returns ``dq [B, N, Hq, D]``, ``dk, dv [B, Nk, Hkv, D]``, contiguous, in the inputs' dtype.

    fp16/bf16/fp32 on the CPU: rotations recomputed in fp32, one fused CPU flash-attention
    backward (``aten._scaled_dot_product_flash_attention_for_cpu_backward``, fed ``[B, N, H,
    D]`` memory seen head-major, as SDPA feeds it) in the input dtype, gradients un-rotated in
    fp32; no ``[N, Nk]`` matrix is formed. Anything else runs :func:`attention_backward`.
    With ``Nk = 0`` (rows that see no key) the gradients are zero.
    """
    B, N, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    if not fused_backward_supported(q):
        mask = causal_mask(N, Nk, q.device) if causal else None
        return attention_backward(grad_out, grad_lse, q, q_pos, k, v, k_pos, table, mask, scale)
    if q.numel() == 0 or Nk == 0 or (grad_out is None and grad_lse is None):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dt, ct = q.dtype, compute_dtype(q.dtype)
    table = table.to(q.device)
    pad = 0 if grad_lse is None else LSE_PAD
    qr, kr, fq, fk = rotated_qk(q, k, q_pos, k_pos, table, pad)
    vv = v if Hq == Hkv and not pad else expand_heads(v, Hq, dt, pad)
    do = q.new_zeros(B, N, Hq, D) if grad_out is None else grad_out.to(dt)
    o = out.to(dt)
    if pad:  # delta - dlse: a ones column in dO against -dlse in out, zero columns elsewhere
        do, o = expand_heads(do, Hq, dt, pad), expand_heads(o, Hq, dt, pad)
        do[..., D] = 1
        o[..., D] = -grad_lse.to(dt).transpose(1, 2)
    dqr, dkr, dvv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *(t.transpose(1, 2) for t in (do, qr, kr, vv, o)), lse.float(), 0.0, causal,
        scale=scale)
    # the gradients come back in the inputs' [B, L, H, D] memory: un-rotate them in place
    iq = inverse_factors(fq)
    ik = iq if fk is fq else inverse_factors(fk)
    dq = rotate_tokens(dqr.transpose(1, 2).to(ct), iq)[..., :D]
    dk = rotate_tokens(dkr.transpose(1, 2).to(ct), ik)[..., :D]
    return (group_sum(dq, Hq, dt), group_sum(dk, Hkv, k.dtype),
            group_sum(dvv.transpose(1, 2)[..., :D], Hkv, v.dtype))


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
