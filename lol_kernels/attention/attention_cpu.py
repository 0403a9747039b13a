"""The CPU paths of ``paged_attention`` and ``rope_attention`` (what ``backend="torch"`` runs).

Same outputs as :func:`~lol_kernels.attention.reference.paged_attention_reference`, but built
for speed: keys are gathered by whole token rows and rotated in cache-sized chunks with complex
factors formed once per distinct position (:mod:`lol_kernels.rope.rope_cpu`), keys and values
land in contiguous head-major ``[B, Hq, Nk, D]`` buffers, and one fused flash-attention call
that also returns the log-sum-exp (``aten._scaled_dot_product_flash_attention_for_cpu``)
attends them.

Thread safety: the large temporaries live in scratch buffers owned by the calling thread
(:func:`scratch`), never returned and never shared between threads; nothing else is kept
between calls, and torch's thread settings are left alone. Several Python threads may call
these functions at once.
"""

from __future__ import annotations

import threading

import torch

from ..rope.reference import compute_dtype
from ..rope.rope_cpu import rope_factors, rotate_
from ..rope.table import RopeTable
from .backward import causal_mask, expand_heads, rotated_qk
from .reference import gather_index

_SCRATCH = threading.local()  # per-thread scratch buffers: .buffers maps a role to a tensor
GATHER_CHUNK_BYTES = 6 << 20  # rows gathered and rotated together: well inside a server L3


def scratch(role: str, shape, dtype, device) -> torch.Tensor:
    """A scratch tensor for the temporaries of one call, owned by the calling thread.

    Large fresh allocations are returned to the OS when freed (mmap), so every call would pay
    page faults on tens of MB (10 % of a paged call at the benchmark shape); one buffer per role
    and thread avoids that. Callers never return it, and another thread never sees it.
    """
    n = 1
    for d in shape:
        n *= d
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    key = (role, dtype, str(device))
    buf = buffers.get(key)
    if buf is None or buf.numel() < n:
        buf = buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def attention_with_lse(qr, kr, vv, bias, scale, causal: bool = False):
    """Softmax attention that also returns the log-sum-exp.

    ``qr [B, H, N, D]``, ``kr, vv [B, H, Nk, D]`` (already rotated, same heads), ``bias``
    additive ``[..., N, Nk]`` in q's dtype or ``None``; ``causal``: query ``i`` also sees only
    keys ``j <= i`` (top-left, as SDPA). On the CPU one fused flash call; elsewhere the plain
    formula with an fp32 softmax (fp64 for fp64). Returns ``out [B, H, N, D]`` and
    ``lse [B, H, N]``.
    """
    if qr.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qr, kr, vv, is_causal=causal, attn_mask=bias, scale=scale)
    if causal:
        N, Nk = qr.shape[-2], kr.shape[-2]
        causal_bias = torch.zeros(N, Nk, dtype=qr.dtype, device=qr.device).masked_fill_(
            ~causal_mask(N, Nk, qr.device), float("-inf"))
        bias = causal_bias if bias is None else bias + causal_bias
    s = (qr @ kr.transpose(-1, -2)).to(compute_dtype(qr.dtype)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    lse = torch.logsumexp(s, dim=-1)
    return torch.softmax(s, dim=-1).to(qr.dtype) @ vv, lse


def empty_result(q: torch.Tensor):
    """What a block that sees no key returns: zeros ``[B, N, Hq, D]`` and ``lse = -inf``."""
    B, N, Hq, _ = q.shape
    return q.new_zeros(q.shape), q.new_full((B, Hq, N), float("-inf"), dtype=torch.float32)


def gather_heads(pool, idx, new, kpos, table, Hq, ct, rotate, role):
    """Keys/values a block reads, as one contiguous head-major ``[B, Hq, L + N, D]``
    :func:`scratch` buffer in ``ct`` (cache slots, then the block's own keys).

    The fused attention call reads contiguous head-major K/V fastest: through the strides of a
    token-major buffer it runs about 15 % slower (fp32, D = 128, 5850 keys, AVX-512). Values
    (``rotate`` false) are gathered straight into that layout, one ``index_select`` per query
    head from KV head ``h // g``. Keys are gathered by whole token rows into a token-major chunk
    that stays in the last-level cache, rotated there in place by the token-major
    :func:`rope_factors` of ``kpos [B, L + N, A]`` and copied head-major: one trip to memory.
    """
    B, L = idx.shape
    P, S, Hkv, D = pool.shape
    g = Hq // Hkv
    Nn = 0 if new is None else new.shape[1]
    buf = scratch(role, (B, Hq, L + Nn, D), ct, pool.device)
    flat = pool.reshape(P * S, Hkv, D)
    if not rotate:
        for b in range(B):
            for h in range(Hq):
                if pool.dtype == ct:
                    torch.index_select(flat[:, h // g], 0, idx[b], out=buf[b, h, :L])
                else:
                    buf[b, h, :L] = flat[:, h // g].index_select(0, idx[b])
        if Nn:
            buf[:, :, L:].unflatten(1, (Hkv, g)).copy_(new.transpose(1, 2).unsqueeze(2))
        return buf
    factors = rope_factors(kpos, table, ct)
    step = max(1, GATHER_CHUNK_BYTES // (Hq * D * buf.element_size()))
    for b in range(B):
        for r0 in range(0, L, step):
            r1 = min(L, r0 + step)
            rows = scratch(role + "_rows", (r1 - r0, Hq, D), ct, pool.device)
            if g == 1 and pool.dtype == ct:
                torch.index_select(flat, 0, idx[b, r0:r1], out=rows)
            else:
                rows.unflatten(1, (Hkv, g)).copy_(flat.index_select(0, idx[b, r0:r1]).unsqueeze(2))
            rotate_(rows, [(i, j, f[b, r0:r1]) for i, j, f in factors])
            buf[b, :, r0:r1].copy_(rows.transpose(0, 1))
    if Nn:
        rows = scratch(role + "_rows", (B, Nn, Hq, D), ct, pool.device)
        rows.unflatten(2, (Hkv, g)).copy_(new.unsqueeze(3))
        rotate_(rows, [(i, j, f[:, L:]) for i, j, f in factors])
        buf[:, :, L:].copy_(rows.transpose(1, 2))
    return buf


def paged_attention_torch(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                          table: RopeTable, *, k_new=None, v_new=None, causal=False,
                          page_shift=None, scale=None):
    """CPU path of :func:`lol_kernels.paged_attention`: one chunked gather-and-rotate pass, one
    fused flash call. Shapes, dtypes and outputs as there.

    Keys are gathered by token rows (cache slots, then the block's own keys) and rotated chunk
    by chunk with per-axis complex factors computed once per distinct position
    (:func:`rope_factors`); the fused call reads contiguous head-major queries, keys and values
    (:func:`gather_heads`), as a plain SDPA call does.
    """
    B, N, Hq, D = q.shape
    dt = q.dtype
    ct = compute_dtype(dt)
    scale = D**-0.5 if scale is None else scale
    table = table.to(q.device)
    idx, _, kpos, valid = gather_index(cache_pos, page_len, page_table, page_shift)
    L = idx.shape[1]
    Nk = L + (0 if k_new is None else N)
    if Nk == 0:
        return empty_result(q)
    if k_new is not None:
        kpos = torch.cat([kpos, q_pos.long()], dim=1)
    kr = gather_heads(cache_k, idx, k_new, kpos, table, Hq, ct, True, "k").to(dt)
    vv = gather_heads(cache_v, idx, v_new, kpos, table, Hq, dt, False, "v")
    qr = scratch("q", (B, Hq, N, D), ct, q.device)  # head-major: the fused call reads it faster
    qr.copy_(q.transpose(1, 2))
    qr = rotate_(qr, rope_factors(q_pos, table, ct, head_major=True)).to(dt)
    mask = None
    if valid is not None or causal:
        mask = torch.ones(B, N, Nk, dtype=torch.bool, device=q.device)
        if valid is not None:
            mask[:, :, :L] = valid.unsqueeze(1)
        if causal:
            mask[:, :, L:] = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=dt, device=q.device)
        bias = bias.masked_fill_(~mask, float("-inf")).unsqueeze(1)
    out, lse = attention_with_lse(qr, kr, vv, bias, scale)
    out = out.transpose(1, 2)
    lse = lse.float()
    if mask is not None:  # a row with no visible key: zeros and lse = -inf (the kernel gives 0)
        empty = ~mask.any(dim=-1)  # [B, N]
        if bool(empty.any()):
            out = out.masked_fill(empty[:, :, None, None], 0.0)
            lse = lse.masked_fill(empty[:, None, :], float("-inf"))
    return out.to(dt), lse


def rope_attention_torch(q, k, v, q_pos, k_pos, table: RopeTable, *, causal=False, scale=None):
    """CPU path of :func:`lol_kernels.rope_attention`: RoPE in fp32 (fp64 for fp64), then one
    fused attention call.

    q and k are expanded to ``Hq`` heads in token-major memory, rotated in place with complex
    factors formed once per distinct position, and read head-major by the fused call (as SDPA
    reads them); causal is the call's own ``is_causal``, not a bias matrix. The backward
    (:func:`~lol_kernels.attention.backward.rope_attention_backward_torch`) recomputes exactly
    these rotated operands.

    Returns ``out [B, N, Hq, D]`` in q.dtype and ``lse [B, Hq, N]`` fp32.
    """
    B, N, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    dt = q.dtype
    scale = D**-0.5 if scale is None else scale
    if Nk == 0:
        return empty_result(q)
    table = table.to(q.device)
    qr, kr, _, _ = rotated_qk(q, k, q_pos, k_pos, table)
    qr, kr = qr.transpose(1, 2), kr.transpose(1, 2)
    vv = (v if Hq == Hkv else expand_heads(v, Hq, dt)).transpose(1, 2)
    out, lse = attention_with_lse(qr, kr, vv, None, scale, causal)
    return out.transpose(1, 2).to(dt), lse.float()
