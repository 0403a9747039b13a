"""The CPU path of ``moc_attention`` (what ``backend="torch"`` runs); same key sets and
outputs as :func:`~lol_kernels.moc.reference.moc_attention_reference`.

The mandatory part is one :func:`~lol_kernels.attention.attention_cpu.paged_attention_torch`
call. The routed part rotates the union of routed chunks once, then the tiles of each head that
chose a chunk attend it with fused flash calls (:func:`routed_part`); the parts merge by
log-sum-exp (:func:`~lol_kernels.moc.reference.merge_lse`).

Every buffer belongs to one call and torch's thread settings are left alone, so several Python
threads may call :func:`moc_attention_torch` at once.
"""

from __future__ import annotations

import torch

from ..attention.attention_cpu import attention_with_lse, paged_attention_torch
from ..attention.reference import paged_attention_reference
from ..rope.reference import compute_dtype, rope_cos_sin, rotate_pairs
from ..rope.rope_cpu import phasors, rope_phasor_tables
from ..rope.table import RopeTable
from .reference import merge_lse

# query rows from which groups of one size are batched into one call: the CPU flash kernel
# then works in blocks of 256 rows, which one call a group would leave unevenly spread
BATCH_ROWS = 768


def moc_attention_torch(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                        table: RopeTable, *, chunk_pages, routed, k_new=None, v_new=None,
                        causal=False, page_shift=None, chunk_shift=None, scale=None,
                        tile_size=128):
    """CPU path of :func:`lol_kernels.moc_attention`; same outputs as the reference.

    * mandatory pages and new keys: one :func:`paged_attention_torch` call (one flash call;
      the plain formula for fp16/bf16, so that low-precision rounding matches the reference);
    * routed chunks: the pages of every chunk some tile routes to (the union) are copied
      head-major once and rotated once per reading head (one complex multiply per pair,
      angles per distinct position value). Then, per head and chunk, the queries of the tiles
      that selected it attend the chunk's keys and values (:func:`routed_part`: no per-tile
      copy of keys or values, which would cost as much memory traffic as the attention itself
      on a CPU); each (tile, slot) keeps its partial ``(out, lse)``;
    * the partials and the mandatory part merge by log-sum-exp.
    """
    B, N, Hq, D = q.shape
    dt, ct = q.dtype, compute_dtype(q.dtype)
    scale = D**-0.5 if scale is None else scale
    table = table.to(q.device)
    dev = q.device
    # fp16/bf16 on the CPU are a correctness path: the mandatory part then uses the plain
    # formula, whose rounding (scores rounded to the input dtype) is the reference's
    mand = paged_attention_torch if dt in (torch.float32, torch.float64) or q.is_cuda else \
        paged_attention_reference
    out_m, lse_m = mand(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, table,
                        k_new=k_new, v_new=v_new, causal=causal, page_shift=page_shift,
                        scale=scale)
    P, S, Hkv, _ = cache_k.shape
    C, Pc = chunk_pages.shape[1:]
    used = torch.unique(routed[routed >= 0].long())
    if Pc == 0 or P == 0 or used.numel() == 0:  # no routed key (an empty pool has no page)
        return out_m, lse_m
    U, Lc, g, A = used.numel(), Pc * S, Hq // Hkv, cache_pos.shape[-1]
    T = routed.shape[1]
    lut = torch.full((C,), -1, dtype=torch.long, device=dev)
    lut[used] = torch.arange(U, device=dev)
    pages = chunk_pages[:, used].long()  # [B, U, Pc]
    pid = pages.clamp(min=0)
    slots = torch.arange(S, device=dev)
    valid = ((pages >= 0).unsqueeze(-1) & (slots < page_len.long()[pid].unsqueeze(-1)))
    valid = valid.view(B, U, Lc)
    bias = torch.zeros(B, U, Lc, dtype=ct, device=dev).masked_fill_(~valid, float("-inf"))
    has_hole = ~valid.all(dim=-1)  # [B, U]
    nonempty = valid.any(dim=-1)
    cos, sin = rope_cos_sin(q_pos, table, ct)
    qr = rotate_pairs(q.to(ct), cos, sin)
    qr = (qr * scale if dt == ct else qr).to(dt)  # fp32/fp64: the scale folded into q
    qr = torch.nn.functional.pad(qr, (0, 0, 0, 0, 0, T * tile_size - N))
    qr = qr.view(B, T, tile_size, Hq, D).permute(0, 3, 1, 2, 4).contiguous()  # [B,Hq,T,tile,D]
    out_r = torch.zeros(B, T * tile_size, Hq, D, dtype=ct, device=dev)
    lse_r = torch.full((B, Hq, T * tile_size), float("-inf"), dtype=ct, device=dev)
    # a chunk whose pages are consecutive in the pool is read in place (a view), else copied
    first = pages[..., :1]
    contig = ((pages == first + torch.arange(Pc, device=dev)) & (first >= 0)).all(-1).tolist()
    cdt = torch.complex128 if ct == torch.float64 else torch.complex64
    for b in range(B):
        kpos = cache_pos[pid[b]].long().view(U, Lc, A)
        if chunk_shift is not None:
            kpos = kpos + chunk_shift[b, used].long().unsqueeze(1)
        tabs = rope_phasor_tables(kpos.view(U * Lc, A), table, ct)
        rows = [chunk_rows(cache_k, cache_v, pid[b, w], contig[b][w], Lc) for w in range(U)]
        krc = torch.empty(Hkv, g, U, Lc, D // 2, dtype=cdt, device=dev)
        for w, (kw, _) in enumerate(rows):  # rotate keys chunk by chunk, written head-major
            z = torch.view_as_complex(kw.to(ct).reshape(Lc, Hkv, D // 2, 2))
            ph = phasors(tabs, slice(w * Lc, (w + 1) * Lc)).view(Hkv, g, Lc, D // 2)
            torch.mul(z.permute(1, 0, 2).unsqueeze(1), ph, out=krc[:, :, w])
        kr = torch.view_as_real(krc).view(Hq, U, Lc, D).to(dt)
        o, lse = routed_part(qr[b], kr, [v for _, v in rows], routed[b], lut, bias[b],
                             has_hole[b], nonempty[b], scale, g, dt, ct)
        out_r[b] = o.view(Hq, T * tile_size, D).transpose(0, 1)
        lse_r[b] = lse.view(Hq, T * tile_size)
    out, lse = merge_lse(out_m, lse_m, out_r[:, :N], lse_r[..., :N])
    return out.to(dt), lse


def chunk_rows(cache_k, cache_v, pages, contiguous: bool, Lc: int):
    """Keys and values ``[Lc, Hkv, D]`` of one chunk: views of the pool when its pages are
    consecutive, else one gather of its pages."""
    Hkv, D = cache_k.shape[2:]
    if contiguous:
        p0, n = int(pages[0]), pages.numel()
        return cache_k[p0:p0 + n].view(Lc, Hkv, D), cache_v[p0:p0 + n].view(Lc, Hkv, D)
    return cache_k[pages].view(Lc, Hkv, D), cache_v[pages].view(Lc, Hkv, D)


def attend(q, k, v, mask, scale, dt, ct):
    """Attention of ``q [G, 1, N, D]`` over ``k, v [G, 1, Lc, D]`` with an additive ``mask``
    broadcastable to ``[G, 1, N, Lc]`` (or ``None``); returns ``out`` and ``lse``.

    fp32/fp64: ``q`` is pre-scaled, one fused call. fp16/bf16 (a correctness path): scores in
    the input dtype, scaled in fp32, as the reference rounds them.
    """
    if dt == ct:
        return attention_with_lse(q, k, v, mask, 1.0)
    sc = (q @ k.transpose(-1, -2)).to(ct).mul_(scale)
    if mask is not None:
        sc += mask
    return torch.softmax(sc, dim=-1).to(dt) @ v, torch.logsumexp(sc, dim=-1)


def routed_part(qr, kr, vrows, routed, lut, bias, has_hole, nonempty, scale, g, dt, ct):
    """Routed part of one batch row (see :func:`moc_attention_torch`).

    The (tile, slot) pairs are grouped by (head, chunk): a group is the ``n`` tiles of one head
    that chose one chunk, and attends it with one fused call, reading the chunk's keys and
    values in place. Groups of ``n * tile >= BATCH_ROWS`` query rows and equal ``n`` are
    batched into one call instead (queries ``[G, 1, n * tile, D]`` against their chunks'
    ``[G, 1, Lc, D]`` keys and values, copied once per group: small beside ``n`` tiles of
    attention), so that the kernel's 256-row query blocks spread evenly over the cores.

    Args:
        qr: ``[Hq, T, tile, D]`` rotated queries in ``dt`` (pre-scaled for fp32/fp64).
        kr: ``[Hq, U, Lc, D]`` rotated keys of the ``U`` routed chunks, per reading head.
        vrows: ``U`` values ``[Lc, Hkv, D]`` (views of the pool where possible).
        routed: ``[T, Hq, K]`` chunk ids, ``-1`` = none; lut: ``[C]`` chunk -> column ``< U``.
        bias: ``[U, Lc]`` additive mask of empty slots; has_hole, nonempty: ``[U]`` bool.

    Returns:
        ``out [Hq, T, tile, D]`` and ``lse [Hq, T, tile]`` in ``ct`` (``-inf``: no key).
    """
    Hq, T, tile, D = qr.shape
    U, Lc = kr.shape[1:3]
    K = routed.shape[-1]
    dev = qr.device
    r = routed.permute(1, 0, 2).long()  # [Hq, T, K]
    col = lut[r.clamp(min=0)]
    head = torch.arange(Hq, device=dev).view(Hq, 1, 1)
    # (tile, slot) pairs that read a non-empty chunk, keyed by group h * U + column
    group = torch.where((r >= 0) & nonempty[col], head * U + col, -1).flatten()
    order = torch.argsort(group, stable=True)
    gid, n = torch.unique_consecutive(group[order], return_counts=True)
    order, n = order[(group < 0).sum():], n[gid >= 0]  # -1 (no chunk) sorts first
    gid = gid[gid >= 0]
    row = order // K  # [pairs] the row h * T + t of each pair, grouped by gid
    out = torch.zeros(Hq * T, tile, D, dtype=ct, device=dev)
    lse = torch.full((Hq * T, tile), float("-inf"), dtype=ct, device=dev)
    if not gid.numel():
        return out.view(Hq, T, tile, D), lse.view(Hq, T, tile)
    # buckets of equal n: the pairs of their groups, in group order within the bucket
    by_n = torch.argsort(n, stable=True)
    first = torch.cumsum(n, 0) - n  # start of each group in ``row``
    sizes, counts = torch.unique_consecutive(n[by_n], return_counts=True)
    qflat, kflat = qr.reshape(Hq * T, tile, D), kr.view(Hq * U, Lc, D)
    hv = [v.transpose(0, 1) for v in vrows]  # [Hkv, Lc, D] views
    holes = has_hole.tolist()
    parts, g0 = [], 0
    for size, count in zip(sizes.tolist(), counts.tolist(), strict=True):
        grp = by_n[g0:g0 + count]
        g0 += count
        rows = row[(first[grp, None] + torch.arange(size, device=dev)).flatten()]
        ids = gid[grp]
        heads, cols = (ids // U).tolist(), (ids % U).tolist()
        qb = qflat[rows].view(count, 1, size * tile, D)
        if size * tile < BATCH_ROWS:  # one call a group, its chunk read in place
            for i, (h, w) in enumerate(zip(heads, cols, strict=True)):
                mask = bias[w].view(1, 1, 1, Lc) if holes[w] else None
                o, ls = attend(qb[i:i + 1], kflat[h * U + w][None, None],
                               hv[w][h // g][None, None], mask, scale, dt, ct)
                parts.append((rows[i * size:(i + 1) * size], o, ls))
            continue
        kb = kflat[ids].view(count, 1, Lc, D)
        vb = torch.stack([hv[w][h // g] for h, w in zip(heads, cols, strict=True)])
        w = ids % U
        mask = bias[w].view(count, 1, 1, Lc) if bool(has_hole[w].any()) else None
        parts.append((rows, *attend(qb, kb, vb.view(count, 1, Lc, D), mask, scale, dt, ct)))
    # merge the partials of each row h * T + t: out = sum_s exp(lse_s - lse) out_s
    rows = torch.cat([p[0] for p in parts])
    l_s = torch.cat([p[2].reshape(-1, tile) for p in parts]).to(ct)
    lmax = lse.scatter_reduce(0, rows[:, None].expand(-1, tile), l_s, "amax")
    lmax = torch.where(torch.isfinite(lmax), lmax, 0.0)
    wgt = torch.exp(l_s - lmax[rows])
    den = torch.zeros(Hq * T, tile, dtype=ct, device=dev).index_add_(0, rows, wgt)
    seen = den > 0
    den = torch.where(seen, den, 1.0)
    lse = torch.where(seen, lmax + torch.log(den), float("-inf"))
    wgt = (wgt / den[rows]).unsqueeze(-1)
    start = 0
    for rows_b, o, _ in parts:  # in place of one concatenated copy of every partial
        r0, start = start, start + rows_b.numel()
        out.index_add_(0, rows_b, o.to(ct).view(-1, tile, D).mul_(wgt[r0:start]))
    return out.view(Hq, T, tile, D), lse.view(Hq, T, tile)
