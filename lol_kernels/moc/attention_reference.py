"""PyTorch paths of ``moc_attention``: the dense masked reference and the CPU fast path.

Both see the same key set for query ``i`` (in query tile ``t = i // tile_size``) and head ``h``:

* every valid slot of the **mandatory** pages ``page_table[b]`` (sink and fast window),
* every valid slot of the pages ``chunk_pages[b, c]`` of the chunks ``c`` listed in
  ``routed[b, t, h]`` (``-1`` entries ignored),
* the block's own keys ``k_new`` (all of them, or ``j <= i`` when ``causal``).

:func:`moc_attention_reference` is the plain formula: every chunk of the pool is gathered, and a
dense ``[B, Hq, N, L]`` mask expresses the routing; run in float64 it is the ground truth of the
kernel tests. :func:`moc_attention_torch` is the CPU fast path: the mandatory part is one
:func:`paged_attention_torch` call, the routed part gathers only the selected chunks of each
(tile, head) and runs one fused flash call per tile; the two parts are merged by log-sum-exp.
"""

from __future__ import annotations

import torch

from ..attention.reference import (
    _rotate_keys,
    gather_keys,
    paged_attention_torch,
)
from ..rope.reference import compute_dtype, rope_cos_sin, rotate_pairs
from ..rope.table import RopeTable


def gather_chunks(cache_k, cache_v, cache_pos, page_len, chunk_pages, chunk_shift):
    """Gather the slots of every chunk, padded to ``Lc = Pc * S`` slots per chunk.

    Args:
        cache_k, cache_v: ``[P, S, Hkv, D]``. cache_pos: ``[P, S, A]`` int. page_len: ``[P]``.
        chunk_pages: ``[B, C, Pc]`` page ids of each chunk, ``-1`` = no page.
        chunk_shift: ``[B, C, A]`` int added to the stored positions of the chunk, or ``None``.

    Returns:
        ``k, v [B, C, Lc, Hkv, D]``, ``pos [B, C, Lc, A]`` int64 and ``valid [B, C, Lc]`` bool
        (slot ``s`` of page ``p`` is valid iff ``p >= 0`` and ``s < page_len[p]``).
    """
    P, S, Hkv, D = cache_k.shape
    B, C, Pc = chunk_pages.shape
    A = cache_pos.shape[-1]
    cp = chunk_pages.long()
    ids = cp.clamp(min=0)
    slots = torch.arange(S, device=cp.device)
    fill = page_len.long()[ids]  # [B, C, Pc]
    valid = ((cp >= 0).unsqueeze(-1) & (slots < fill.unsqueeze(-1))).reshape(B, C, Pc * S)
    flat = (ids.unsqueeze(-1) * S + slots).reshape(B, C, Pc * S)
    k = cache_k.reshape(P * S, Hkv, D)[flat]
    v = cache_v.reshape(P * S, Hkv, D)[flat]
    pos = cache_pos.reshape(P * S, A)[flat].long()
    if chunk_shift is not None:
        pos = pos + chunk_shift.long().unsqueeze(2)
    return k, v, pos, valid


def routed_chunk_mask(routed: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """``routed [B, T, H, k]`` chunk ids (``-1`` = none) -> ``[B, T, H, C]`` bool selection."""
    B, T, H, _ = routed.shape
    sel = torch.zeros(B, T, H, num_chunks + 1, dtype=torch.bool, device=routed.device)
    idx = torch.where(routed >= 0, routed.long(), num_chunks)  # -1 goes to a dropped column
    sel.scatter_(-1, idx, True)
    return sel[..., :num_chunks]


def moc_dense_mask(routed, chunk_valid_slots, mand_valid, N, Lm, tile_size, causal, has_new):
    """The routing as a dense ``[B, Hq, N, L]`` mask over the reference's key order
    (mandatory slots, then every chunk's ``Lc`` slots, then the ``N`` new keys)."""
    B, T, Hq, _ = routed.shape
    C, Lc = chunk_valid_slots.shape[1:]
    dev = routed.device
    tile = torch.arange(N, device=dev) // tile_size
    sel = routed_chunk_mask(routed, C)[:, tile]  # [B, N, Hq, C]
    m_chunk = sel.permute(0, 2, 1, 3).repeat_interleave(Lc, dim=-1)
    m_chunk = m_chunk & chunk_valid_slots.reshape(B, 1, 1, C * Lc)
    if mand_valid is None:
        mand_valid = torch.ones(B, Lm, dtype=torch.bool, device=dev)
    parts = [mand_valid[:, None, None, :].expand(B, Hq, N, Lm), m_chunk]
    if has_new:
        new = torch.ones(N, N, dtype=torch.bool, device=dev)
        parts.append((new.tril() if causal else new).expand(B, Hq, N, N))
    return torch.cat(parts, dim=-1)


def moc_attention_reference(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                            table: RopeTable, *, chunk_pages, routed, k_new=None, v_new=None,
                            causal=False, page_shift=None, chunk_shift=None, scale=None,
                            tile_size=128):
    """Dense masked MoC attention (plain formula); shapes as :func:`lol_kernels.moc_attention`.

    Computes in ``q.dtype`` (RoPE in fp32, fp64 for fp64 inputs), softmax in fp32 (fp64).
    Returns ``out [B, N, Hq, D]`` in ``q.dtype`` and ``lse [B, Hq, N]``; rows that see no key
    give zeros and ``-inf``.
    """
    B, N, Hq, D = q.shape
    dt, ct = q.dtype, compute_dtype(q.dtype)
    scale = D**-0.5 if scale is None else scale
    table = table.to(q.device)
    mk, mv, mpos, mvalid = gather_keys(cache_k, cache_v, cache_pos, page_len, page_table,
                                       page_shift)
    ck, cv, cpos, cvalid = gather_chunks(cache_k, cache_v, cache_pos, page_len, chunk_pages,
                                         chunk_shift)
    C, Lc = cvalid.shape[1:]
    Hkv = cache_k.shape[2]
    ks = [mk, ck.reshape(B, C * Lc, Hkv, D)]
    vs = [mv, cv.reshape(B, C * Lc, Hkv, D)]
    ps = [mpos, cpos.reshape(B, C * Lc, -1)]
    if k_new is not None:
        ks.append(k_new)
        vs.append(v_new)
        ps.append(q_pos.long())
    k, v, kpos = torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(ps, 1)
    mask = moc_dense_mask(routed, cvalid, mvalid, N, mk.shape[1], tile_size, causal,
                          k_new is not None)
    g = Hq // Hkv
    cos, sin = rope_cos_sin(q_pos, table, ct)
    qr = rotate_pairs(q.to(ct), cos, sin).to(dt)
    kr = _rotate_keys(k, kpos, table, Hq, ct).to(dt)
    s = torch.einsum("bqhd,bkhd->bhqk", qr, kr).to(ct) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    seen = torch.isfinite(lse)
    p = torch.where(seen.unsqueeze(-1), torch.exp(s - lse.unsqueeze(-1)), 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(dt), v.repeat_interleave(g, dim=2).to(dt))
    return out.to(dt), lse


def merge_lse(out_a, lse_a, out_b, lse_b):
    """Merge two partial softmax results over disjoint key sets.

    ``out_* [B, N, H, D]`` (normalized within their part), ``lse_* [B, H, N]`` fp32/fp64
    (``-inf`` = the part saw no key). Returns the merged ``out`` (fp32/fp64) and ``lse``.
    """
    ct = torch.promote_types(torch.promote_types(lse_a.dtype, lse_b.dtype),
                             compute_dtype(out_a.dtype))
    lse_a, lse_b = lse_a.to(ct), lse_b.to(ct)
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    wa = torch.exp(lse_a - safe).transpose(1, 2).unsqueeze(-1)  # exp(-inf) = 0 for empty parts
    wb = torch.exp(lse_b - safe).transpose(1, 2).unsqueeze(-1)
    return wa * out_a.to(ct) + wb * out_b.to(ct), lse


def _flash(q, k, v, bias, scale):
    """``q [H, Nq, D]``, ``k, v [H, L, D]`` -> ``out [H, Nq, D]``, ``lse [H, Nq]`` fp32."""
    if q.device.type == "cpu" and q.dtype != torch.float64:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=bias, scale=scale)
        return out[0], lse[0].float()
    s = (q @ k.transpose(-1, -2)).to(compute_dtype(q.dtype)) * scale
    if bias is not None:
        s = s + bias[0].to(s.dtype)
    lse = torch.logsumexp(s, dim=-1)
    return (torch.softmax(s, dim=-1).to(q.dtype) @ v), lse


def moc_attention_torch(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                        table: RopeTable, *, chunk_pages, routed, k_new=None, v_new=None,
                        causal=False, page_shift=None, chunk_shift=None, scale=None,
                        tile_size=128):
    """CPU fast path of :func:`lol_kernels.moc_attention`; same outputs as the reference.

    Cost: the mandatory part costs what :func:`paged_attention_torch` costs; the routed part
    rotates each selected chunk once per reading head (the union over tiles) and runs one flash
    call per (batch row, tile) over the ``k * Lc`` keys each head of that tile selected.
    """
    B, N, Hq, D = q.shape
    dt, ct = q.dtype, compute_dtype(q.dtype)
    scale = D**-0.5 if scale is None else scale
    table = table.to(q.device)
    out_m, lse_m = paged_attention_torch(q, q_pos, cache_k, cache_v, cache_pos, page_len,
                                         page_table, table, k_new=k_new, v_new=v_new,
                                         causal=causal, page_shift=page_shift, scale=scale)
    used = torch.unique(routed[routed >= 0].long())
    if used.numel() == 0:
        return out_m, lse_m.float()
    # gather and rotate only the chunks some tile routes to (the union over the batch)
    C = chunk_pages.shape[1]
    lut = torch.full((C,), -1, dtype=torch.long, device=q.device)
    lut[used] = torch.arange(used.numel(), device=q.device)
    shift = None if chunk_shift is None else chunk_shift[:, used]
    ck, cv, cpos, cvalid = gather_chunks(cache_k, cache_v, cache_pos, page_len,
                                         chunk_pages[:, used], shift)
    U, Lc, Hkv = ck.shape[1], ck.shape[2], ck.shape[3]
    g = Hq // Hkv
    kr = _rotate_keys(ck.reshape(B, U * Lc, Hkv, D), cpos.reshape(B, U * Lc, -1), table, Hq,
                      ct).to(dt)
    kr = kr.view(B, U, Lc, Hq, D).permute(0, 3, 1, 2, 4)  # [B, Hq, U, Lc, D]
    vv = cv.permute(0, 3, 1, 2, 4)  # [B, Hkv, U, Lc, D]; head h reads KV head h // g
    cos, sin = rope_cos_sin(q_pos, table, ct)
    qr = rotate_pairs(q.to(ct), cos, sin).to(dt).transpose(1, 2)  # [B, Hq, N, D]
    T = routed.shape[1]
    kv_head = torch.arange(Hq, device=q.device) // g
    hh = torch.arange(Hq, device=q.device)[:, None]
    out_r = torch.zeros(B, N, Hq, D, dtype=dt, device=q.device)
    lse_r = torch.full((B, Hq, N), float("-inf"), dtype=lse_m.dtype, device=q.device)
    for b in range(B):
        for t in range(T):
            sel = lut[routed[b, t].long().clamp(min=0)]  # [Hq, k]
            ok = routed[b, t] >= 0
            if not bool(ok.any()):
                continue
            # drop columns no head uses so short routings do not pay for -1 entries
            keep = ok.any(dim=0)
            sel, ok = sel[:, keep].clamp(min=0), ok[:, keep]
            kk = kr[b][hh, sel].flatten(1, 2)  # [Hq, k * Lc, D]
            vk = vv[b][kv_head[:, None], sel].flatten(1, 2)
            slot_ok = (cvalid[b][sel] & ok.unsqueeze(-1)).flatten(1, 2)  # [Hq, k * Lc]
            q0, q1 = t * tile_size, min(N, (t + 1) * tile_size)
            bias = None
            if not bool(slot_ok.all()):
                bias = torch.zeros(slot_ok.shape, dtype=dt, device=q.device)
                bias = bias.masked_fill_(~slot_ok, float("-inf"))[None, :, None, :]
                bias = bias.expand(1, Hq, q1 - q0, -1)
            o, lse = _flash(qr[b, :, q0:q1], kk, vk, bias, scale)
            empty = ~slot_ok.any(dim=-1)  # a head whose routed chunks hold no valid slot
            if bool(empty.any()):
                o = o.masked_fill(empty[:, None, None], 0.0)
                lse = lse.masked_fill(empty[:, None], float("-inf"))
            out_r[b, q0:q1] = o.transpose(0, 1).to(dt)
            lse_r[b, :, q0:q1] = lse.to(lse_r.dtype)
    out, lse = merge_lse(out_m, lse_m, out_r, lse_r)
    return out.to(dt), lse
