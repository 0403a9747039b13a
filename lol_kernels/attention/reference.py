"""PyTorch paths of ``paged_attention``: the plain reference and the CPU fast path.

Both read the paged pool the same way (:func:`gather_keys`): one gather of the valid slots of the
page-table entries (in table order, ``page_shift`` added to the stored positions), then RoPE on
the gathered un-rotated keys with the frequencies of the query head that reads them.

* :func:`paged_attention_reference` is the plain formula (rotated scores, softmax, weighted sum)
  in the input dtype with an fp32 softmax; run on float64 inputs it is the ground truth of every
  kernel test, run on fp16 it is the "same-dtype PyTorch reference" of the DESIGN.md §5 rule.
* :func:`paged_attention_torch` is the CPU fast path: the same gather, one RoPE pass, and one
  fused flash-attention call (``aten._scaled_dot_product_flash_attention_for_cpu``) that also
  returns the log-sum-exp.
"""

from __future__ import annotations

import torch

from ..rope.reference import compute_dtype, rope_cos_sin, rope_factors, rotate_, rotate_pairs
from ..rope.table import RopeTable


def gather_keys(cache_k, cache_v, cache_pos, page_len, page_table, page_shift):
    """Gather the valid slots of every page-table entry, in table order.

    Args:
        cache_k, cache_v: ``[P, S, Hkv, D]`` pools. cache_pos: ``[P, S, A]`` int.
        page_len: ``[P]`` filled slots per page. page_table: ``[B, M]`` page ids, -1 = empty.
        page_shift: ``[B, M, A]`` int or ``None``, added to the positions of that entry.

    Returns:
        ``k, v [B, L, Hkv, D]``, ``pos [B, L, A]`` int64 and ``valid [B, L]`` bool (``None``
        when every batch row has the same number ``L`` of valid slots, so no padding exists).
    """
    P, S, Hkv, D = cache_k.shape
    idx, pos, valid = gather_index(cache_pos, page_len, page_table, page_shift)
    k = cache_k.reshape(P * S, Hkv, D)[idx]
    v = cache_v.reshape(P * S, Hkv, D)[idx]
    return k, v, pos, valid


def gather_index(cache_pos, page_len, page_table, page_shift):
    """Flat slot index ``[B, L]`` of the valid slots in table order, their positions
    ``[B, L, A]`` (int64, ``page_shift`` added) and the padding mask (``None`` if no padding)."""
    P, S, A = cache_pos.shape
    B, M = page_table.shape
    pt = page_table.long()
    ent_ok = pt >= 0
    ids = pt.clamp(min=0)
    slots = torch.arange(S, device=pt.device)
    fill = page_len.long()[ids]  # [B, M]
    ok = (ent_ok.unsqueeze(-1) & (slots < fill.unsqueeze(-1))).reshape(B, M * S)
    flat = (ids.unsqueeze(-1) * S + slots).reshape(B, M * S)
    counts = ok.sum(dim=1)
    L = int(counts.max().item()) if B else 0
    if bool((counts == L).all()):
        idx = flat[ok].view(B, L)
        entry = torch.arange(M, device=pt.device).repeat_interleave(S).expand(B, -1)[ok].view(B, L)
        valid = None
    else:  # pad rows with fewer valid slots; padding points at slot 0 and is masked out
        order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)[:, :L]
        valid = torch.gather(ok, 1, order)
        idx = torch.where(valid, torch.gather(flat, 1, order), 0)
        entry = order // S
    pos = cache_pos.reshape(P * S, A)[idx].long()
    if page_shift is not None:
        pos = pos + torch.gather(page_shift.long(), 1, entry.unsqueeze(-1).expand(-1, -1, A))
    return idx, pos, valid


def _keys_and_mask(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, k_new, v_new,
                   causal, page_shift):
    """All keys a block sees (cache then new) with positions and a ``[B, Nq, Nk]`` mask."""
    k, v, kpos, valid = gather_keys(cache_k, cache_v, cache_pos, page_len, page_table, page_shift)
    B, Nq = q.shape[:2]
    L = k.shape[1]
    mask = None
    if valid is not None:
        mask = valid.unsqueeze(1).expand(B, Nq, L)
    if k_new is not None:
        k = torch.cat([k, k_new], dim=1)
        v = torch.cat([v, v_new], dim=1)
        kpos = torch.cat([kpos, q_pos.long()], dim=1)
        if causal or mask is not None:
            new = torch.ones(Nq, Nq, dtype=torch.bool, device=q.device)
            if causal:
                new = new.tril()
            old = mask if mask is not None else torch.ones(B, Nq, L, dtype=torch.bool,
                                                           device=q.device)
            mask = torch.cat([old, new.expand(B, Nq, Nq)], dim=2)
    return k, v, kpos, mask


def _rotate_keys(k, kpos, table: RopeTable, Hq: int, dtype):
    """Rotate ``k [B, L, Hkv, D]`` per reading query head; returns ``[B, L, Hq, D]``."""
    Hkv = k.shape[2]
    g = Hq // Hkv
    if table.heads_share_freqs(g):  # no jitter inside a GQA group: rotate once per KV head
        sub = RopeTable(table.freqs[::g], table.pair_axis, table.axes)
        cos, sin = rope_cos_sin(kpos, sub, dtype)
        return rotate_pairs(k.to(dtype), cos, sin).repeat_interleave(g, dim=2)
    cos, sin = rope_cos_sin(kpos, table, dtype)
    return rotate_pairs(k.to(dtype).repeat_interleave(g, dim=2), cos, sin)


def paged_attention_reference(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                              table: RopeTable, *, k_new=None, v_new=None, causal=False,
                              page_shift=None, scale=None):
    """Plain-formula paged attention; shapes as :func:`lol_kernels.paged_attention`.

    Computes in ``q.dtype`` (RoPE in fp32 or fp64, then cast back, as a model would), softmax in
    fp32 (fp64 for fp64 inputs). Returns ``out [B, Nq, Hq, D]`` in ``q.dtype`` and
    ``lse [B, Hq, Nq]`` in fp32 (fp64 for fp64 inputs); rows that see no key give 0 and -inf.
    """
    B, Nq, Hq, D = q.shape
    dt = q.dtype
    ct = compute_dtype(dt)
    scale = D**-0.5 if scale is None else scale
    table = table.to(q.device)
    k, v, kpos, mask = _keys_and_mask(q, q_pos, cache_k, cache_v, cache_pos, page_len,
                                      page_table, k_new, v_new, causal, page_shift)
    g = Hq // k.shape[2]
    cos, sin = rope_cos_sin(q_pos, table, ct)
    qr = rotate_pairs(q.to(ct), cos, sin).to(dt)
    kr = _rotate_keys(k, kpos, table, Hq, ct).to(dt)
    vv = v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qr, kr).to(ct) * scale
    if mask is not None:
        s = s.masked_fill(~mask.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, Hq, Nq]
    seen = torch.isfinite(lse)
    p = torch.where(seen.unsqueeze(-1), torch.exp(s - lse.unsqueeze(-1)), 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(dt), vv.to(dt))
    return out.to(dt), lse


_WORKSPACE: dict = {}


def workspace(name: str, shape, dtype, device) -> torch.Tensor:
    """A reusable scratch tensor for internal temporaries of the CPU path.

    Large fresh allocations are returned to the OS on free (mmap), so every call would pay
    page faults on tens of MB; keeping one buffer per role avoids that. Never returned to
    callers, so reuse across calls is safe (one call at a time per process).
    """
    n = 1
    for s in shape:
        n *= s
    key = (name, dtype, str(device))
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype, device=device)
        _WORKSPACE[key] = buf
    return buf[:n].view(shape)


def _gather_heads(pool, idx, new, kpos, table, Hq, ct, rotate, name):
    """Keys/values a block reads, as one ``[B, Hq, L + Nq, D]`` buffer in ``ct``.

    Gathered straight into the head-major layout the fused attention call reads best (one
    ``index_select`` per query head from KV head ``h // g``: GQA needs no separate expand),
    the block's own keys appended, then rotated in place when ``rotate``.
    """
    B, L = idx.shape
    P, S, Hkv, D = pool.shape
    g = Hq // Hkv
    Nn = 0 if new is None else new.shape[1]
    buf = workspace(name, (B, Hq, L + Nn, D), ct, pool.device)
    flat = pool.reshape(P * S, Hkv, D)
    for b in range(B):
        for h in range(Hq):
            if pool.dtype == ct:
                torch.index_select(flat[:, h // g], 0, idx[b], out=buf[b, h, :L])
            else:
                buf[b, h, :L] = flat[:, h // g].index_select(0, idx[b])
    if Nn:
        buf[:, :, L:] = new.repeat_interleave(g, dim=2).transpose(1, 2)
    if rotate:
        rotate_(buf, rope_factors(kpos, table, ct, head_major=True))
    return buf


def attention_with_lse(qr, kr, vv, bias, scale):
    """Softmax attention that also returns the log-sum-exp.

    ``qr [B, H, Nq, D]``, ``kr, vv [B, H, Nk, D]`` (already rotated, same heads), ``bias``
    additive ``[..., Nq, Nk]`` in q's dtype or ``None``. On the CPU one fused flash call; elsewhere
    the plain formula with an fp32 softmax. Returns ``out [B, H, Nq, D]`` and ``lse [B, H, Nq]``.
    """
    if qr.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qr, kr, vv, attn_mask=bias, scale=scale)
    s = (qr @ kr.transpose(-1, -2)).float() * scale
    if bias is not None:
        s = s + bias.float()
    lse = torch.logsumexp(s, dim=-1)
    return torch.softmax(s, dim=-1).to(qr.dtype) @ vv, lse


def paged_attention_torch(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                          table: RopeTable, *, k_new=None, v_new=None, causal=False,
                          page_shift=None, scale=None):
    """CPU fast path: one gather, one in-place RoPE pass, one fused flash call.

    Same outputs as :func:`paged_attention_reference`. Keys are gathered straight into one
    head-major workspace buffer (cache slots, then the block's own keys) and rotated in place
    with per-axis complex factors computed once per distinct position (:func:`rope_factors`);
    the fused call then reads contiguous ``[B, H, N, D]`` tensors like a plain SDPA call.
    """
    B, Nq, Hq, D = q.shape
    dt = q.dtype
    ct = compute_dtype(dt)
    scale = D**-0.5 if scale is None else scale
    table = table.to(q.device)
    idx, kpos, valid = gather_index(cache_pos, page_len, page_table, page_shift)
    L = idx.shape[1]
    Nk = L + (0 if k_new is None else Nq)
    if Nk == 0:
        return q.new_zeros(q.shape), q.new_full((B, Hq, Nq), float("-inf"), dtype=torch.float32)
    if k_new is not None:
        kpos = torch.cat([kpos, q_pos.long()], dim=1)
    kr = _gather_heads(cache_k, idx, k_new, kpos, table, Hq, ct, True, "k").to(dt)
    vv = _gather_heads(cache_v, idx, v_new, kpos, table, Hq, dt, False, "v")
    qr = workspace("q", (B, Hq, Nq, D), ct, q.device)
    qr.copy_(q.transpose(1, 2))
    qr = rotate_(qr, rope_factors(q_pos, table, ct, head_major=True)).to(dt)
    mask = None
    if valid is not None or causal:
        mask = torch.ones(B, Nq, Nk, dtype=torch.bool, device=q.device)
        if valid is not None:
            mask[:, :, :L] = valid.unsqueeze(1)
        if causal:
            mask[:, :, L:] = torch.ones(Nq, Nq, dtype=torch.bool, device=q.device).tril()
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=dt, device=q.device)
        bias = bias.masked_fill_(~mask, float("-inf")).unsqueeze(1)
    out, lse = attention_with_lse(qr, kr, vv, bias, scale)
    out = out.transpose(1, 2)
    lse = lse.float()
    if mask is not None:  # a row with no visible key: zeros and lse = -inf (the kernel gives 0)
        empty = ~mask.any(dim=-1)  # [B, Nq]
        if bool(empty.any()):
            out = out.masked_fill(empty[:, :, None, None], 0.0)
            lse = lse.masked_fill(empty[:, None, :], float("-inf"))
    return out.to(dt), lse
