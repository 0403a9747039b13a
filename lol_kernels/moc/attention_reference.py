"""PyTorch paths of ``moc_attention``: the dense masked reference and the CPU fast path.

Both see the same key set for query ``i`` (in query tile ``t = i // tile_size``) and head ``h``:

* every valid slot of the **mandatory** pages ``page_table[b]`` (sink and fast window),
* every valid slot of the pages ``chunk_pages[b, c]`` of the chunks ``c`` listed in
  ``routed[b, t, h]`` (``-1`` entries ignored),
* the block's own keys ``k_new`` (all of them, or ``j <= i`` when ``causal``).

:func:`moc_attention_reference` is the plain formula: every chunk of the pool is gathered, and a
dense ``[B, Hq, N, L]`` mask expresses the routing; run in float64 it is the ground truth of the
kernel tests. :func:`moc_attention_torch` is the CPU fast path: the mandatory part is one
:func:`paged_attention_torch` call; the routed part rotates the union of routed chunks once and
lets each head's tiles attend each chunk in place (no per-tile copy of keys or values); the
parts are merged by log-sum-exp (:func:`merge_lse`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from ..attention.reference import (
    _rotate_keys,
    gather_keys,
    paged_attention_reference,
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
    """``q [G, H, Nq, D]``, ``k, v [G, H, L, D]``, ``bias`` broadcastable to ``[G, H, Nq, L]``
    or ``None`` -> ``out [G, H, Nq, D]``, ``lse [G, H, Nq]`` (fp32; fp64 for fp64 inputs)."""
    if q.device.type == "cpu" and q.dtype != torch.float64:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=bias, scale=scale)
        return out, lse.float()
    s = (q @ k.transpose(-1, -2)).to(compute_dtype(q.dtype)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    lse = torch.logsumexp(s, dim=-1)
    return (torch.softmax(s, dim=-1).to(q.dtype) @ v), lse


def rope_phasor_tables(pos: torch.Tensor, table: RopeTable, dtype: torch.dtype):
    """Unit phasors ``exp(i angle)`` of ``pos [L, A]`` (complex of ``dtype``), per axis.

    Returns ``[(tab [H, U_a, n_a], inv [L])]`` over axes: token ``l`` rotates the pairs of
    axis ``a`` by ``tab[:, inv[l]]``. Same angles as ``rope_angles`` (float64 product reduced
    modulo ``2 pi``), formed once per distinct position value (frame index, patch row, patch
    column: few of each) instead of once per token and head.
    """
    out, j0 = [], 0
    L = pos.shape[0]
    for a, width in enumerate(table.axes):
        j1 = j0 + width // 2
        p_a = pos[:, a]
        lo, hi = (int(v) for v in torch.aminmax(p_a)) if L else (0, 0)
        if hi - lo < max(4096, L // 4):  # a dense range: index by offset, no sort
            u = torch.arange(lo, hi + 1, device=pos.device)
            inv = (p_a - lo).long()
        else:
            u, inv = torch.unique(p_a, return_inverse=True)
        ang = torch.remainder(u.to(torch.float64)[None, :, None] * table.freqs[:, None, j0:j1],
                              2.0 * math.pi).to(dtype)  # [H, U_a, n_a]
        out.append((torch.polar(torch.ones_like(ang), ang), inv))
        j0 = j1
    return out


def phasors(tabs, rows: slice) -> torch.Tensor:
    """``[H, n, D/2]`` phasors of the tokens ``rows`` from :func:`rope_phasor_tables`."""
    return torch.cat([tab[:, inv[rows]] for tab, inv in tabs], dim=-1)


def moc_attention_torch(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                        table: RopeTable, *, chunk_pages, routed, k_new=None, v_new=None,
                        causal=False, page_shift=None, chunk_shift=None, scale=None,
                        tile_size=128):
    """CPU fast path of :func:`lol_kernels.moc_attention`; same outputs as the reference.

    * mandatory pages and new keys: one :func:`paged_attention_torch` call (one flash call;
      the plain formula for fp16/bf16, so that low-precision rounding matches the reference);
    * routed chunks: the pages of every chunk some tile routes to (the union) are copied
      head-major once and rotated once per reading head (one complex multiply per pair,
      angles per distinct position value). Then, per head and chunk, the queries of the tiles
      that selected it attend the chunk's keys **in place** (a contiguous ``[Lc, D]`` block:
      no per-tile copy of keys or values, which costs as much memory traffic as the attention
      itself on a CPU); each (tile, slot) keeps its partial ``(out, lse)``;
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
    if Pc == 0 or used.numel() == 0:
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
        rows = [_chunk_rows(cache_k, cache_v, pid[b, w], contig[b][w], Lc) for w in range(U)]
        krc = torch.empty(Hkv, g, U, Lc, D // 2, dtype=cdt, device=dev)
        for w, (kw, _) in enumerate(rows):  # rotate keys chunk by chunk, written head-major
            z = torch.view_as_complex(kw.to(ct).reshape(Lc, Hkv, D // 2, 2))
            ph = phasors(tabs, slice(w * Lc, (w + 1) * Lc)).view(Hkv, g, Lc, D // 2)
            torch.mul(z.permute(1, 0, 2).unsqueeze(1), ph, out=krc[:, :, w])
        kr = torch.view_as_real(krc).view(Hq, U, Lc, D).to(dt)
        vrows = [v for _, v in rows]
        with _one_thread() as workers:
            list(_head_pool(workers).map(lambda h, vr=vrows, kr=kr, b=b: _routed_head(
                h, out_r, lse_r, b, qr, kr, vr, routed, lut, bias, has_hole, nonempty, scale, g,
                dt, ct), range(Hq)))
    out, lse = merge_lse(out_m, lse_m, out_r[:, :N], lse_r[..., :N])
    return out.to(dt), lse


def _chunk_rows(cache_k, cache_v, pages, contiguous: bool, Lc: int):
    """Keys and values ``[Lc, Hkv, D]`` of one chunk: views of the pool when its pages are
    consecutive, else one gather of its pages."""
    Hkv, D = cache_k.shape[2:]
    if contiguous:
        p0, n = int(pages[0]), pages.numel()
        return cache_k[p0:p0 + n].view(Lc, Hkv, D), cache_v[p0:p0 + n].view(Lc, Hkv, D)
    return cache_k[pages].view(Lc, Hkv, D), cache_v[pages].view(Lc, Hkv, D)


@contextmanager
def _one_thread():
    """Per-chunk kernels are small ([n * tile, Lc]): intra-op threads cost more in barriers
    than they gain (4-20x on a busy 2-core machine). Run them single-threaded and parallelize
    over heads instead; yields the number of head workers (the previous thread count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield n
    finally:
        torch.set_num_threads(n)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _head_pool(workers: int) -> ThreadPoolExecutor:
    """A persistent pool of ``workers`` threads whose OpenMP/BLAS calls are single-threaded
    (OpenMP's thread count is per thread: a fresh thread would use every core per call)."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="lk-moc",
                                             initializer=torch.set_num_threads, initargs=(1,))
    return _POOLS[workers]


def _routed_head(h, out_r, lse_r, b, qr, kr, vu, routed, lut, bias, has_hole, nonempty, scale,
                 g, dt, ct):
    """Routed part of batch row ``b`` and head ``h`` (see :func:`moc_attention_torch`): writes
    ``out_r[b, :, h]`` and ``lse_r[b, h]`` only, so heads can run concurrently."""
    T, tile_size, D = qr.shape[2:]
    K = routed.shape[3]
    dev = qr.device
    col = lut[routed[b, :, h].long().clamp(min=0)]  # [T, K] union column
    col = torch.where(routed[b, :, h] >= 0, col, -1).flatten()
    order = torch.argsort(col, stable=True)
    cols, counts = torch.unique_consecutive(col[order], return_counts=True)
    skip = int(counts[0]) if int(cols[0]) < 0 else 0  # -1 entries sort first
    nv = order.numel() - skip
    if nv == 0:
        return
    # partials in sorted-slot order (slice writes): out normalized per slot, and its lse
    o_s = torch.empty(nv, tile_size, D, dtype=ct, device=dev)
    l_s = torch.full((nv, tile_size), float("-inf"), dtype=ct, device=dev)
    start = 0
    for w, n in zip(cols.tolist(), counts.tolist(), strict=True):
        if w < 0:
            continue
        r0, start = start, start + n
        if not bool(nonempty[b, w]):
            o_s[r0:start] = 0.0
            continue
        qs = qr[b, h][order[skip + r0:skip + start] // K].view(n * tile_size, D)
        if dt == ct:  # fp32/fp64: q is pre-scaled; in-place softmax, P V into the buffer
            sc = torch.addmm(bias[b, w], qs, kr[h, w].t()) if bool(has_hole[b, w]) else \
                torch.mm(qs, kr[h, w].t())
            m = sc.amax(dim=-1, keepdim=True)
            p = sc.sub_(m).exp_()
            den = p.sum(dim=-1, keepdim=True)
            o = torch.mm(p, vu[w][:, h // g], out=o_s[r0:start].view(n * tile_size, D))
            o.div_(den)
            l_s[r0:start] = (m + torch.log(den)).view(n, tile_size)
        else:  # fp16/bf16: scores in the input dtype, scaled in fp32, as the reference
            sc = torch.mm(qs, kr[h, w].t()).to(ct).mul_(scale)
            if bool(has_hole[b, w]):
                sc += bias[b, w]
            l_s[r0:start] = torch.logsumexp(sc, dim=-1).view(n, tile_size)
            o_s[r0:start] = (torch.softmax(sc, dim=-1).to(dt) @ vu[w][:, h // g]).to(
                ct).view(n, tile_size, D)
    # merge the slots of each tile: lse over its slots, then one weighted index_add
    tile_of = order[skip:] // K  # [nv]
    lse = torch.full((T, tile_size), float("-inf"), dtype=ct, device=dev)
    lmax = lse.scatter_reduce(0, tile_of[:, None].expand(-1, tile_size), l_s, "amax")
    lmax = torch.where(torch.isfinite(lmax), lmax, 0.0)
    wgt = torch.exp(l_s - lmax[tile_of])
    den = torch.zeros(T, tile_size, dtype=ct, device=dev).index_add_(0, tile_of, wgt)
    acc = torch.zeros(T, tile_size, D, dtype=ct, device=dev)
    acc.index_add_(0, tile_of, o_s.mul_(wgt.unsqueeze(-1)))
    seen = den > 0
    out_r[b, :, h] = torch.where(seen.unsqueeze(-1), acc / torch.where(seen, den, 1.0)
                                 .unsqueeze(-1), 0.0).view(T * tile_size, D)
    lse_r[b, h] = torch.where(seen, lmax + torch.log(torch.where(seen, den, 1.0)),
                              float("-inf")).view(-1)
