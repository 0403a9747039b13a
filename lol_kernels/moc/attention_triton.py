"""Fused Triton kernel of ``moc_attention``: RoPE in registers + block-sparse paged attention.

One program owns ``BLOCK_M`` queries of one query head ``h`` of one batch row (grid
``[cdiv(N, BLOCK_M), B * Hq]``). ``tile_size % BLOCK_M == 0``, so all its rows lie in one
routing tile ``t = i_m * BLOCK_M // tile_size`` and share one key list:

1. load the query tile, rotate it in registers with head ``h``'s frequencies at ``q_pos``;
2. the **mandatory** pages ``page_table[b]`` laid end to end (``S`` slots each), each key tile
   gathered from the pages its rows fall in, rotated at ``cache_pos + page_shift[entry]``;
3. for each routed chunk ``c = routed[b, t, h, j] >= 0``: its pages ``chunk_pages[b, c]`` laid
   end to end the same way, rotated at ``cache_pos + chunk_shift[b, c]``; ``-1`` entries cost
   one scalar load and an empty loop;
4. the block's own keys ``k_new`` (all, or ``j <= i`` when causal).

Every key tile goes through the shared online-softmax step (``_attend_tile`` of the paged
kernel: fp32 state in base 2, exact fixed-point RoPE angles from
:mod:`lol_kernels._triton_common`), so a routing that selects every chunk computes exactly what
``paged_attention`` computes over the concatenated page table. Work per program is
``(M + k * Pc) * S + N`` keys instead of ``(M + C * Pc) * S + N``: the sparsity is the
fraction of chunks not routed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_common import (
    is_interpreted,
    load_pair_positions,
    rope_cos_sin,
    rope_rotate,
    rope_turns,
    split_turns,
)
from ..attention.triton_kernel import CONFIGS, LOG2E, _attend_tile, _last_contig, _prune_configs

# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

#: tiles used under TRITON_INTERPRET=1 (BLOCK_M is lowered to 16 when tile_size % 32 != 0)
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}
AUTOTUNE_KEY = ["HEAD_DIM", "GROUP", "NUM_AXES", "HAS_SHIFT", "HAS_CSHIFT", "HAS_NEW",
                "IS_CAUSAL", "TILE", "DOT_PREC"]


def _prune(configs, named_args, **kwargs):
    """The paged kernel's shared-memory pruning, plus: a query block never spans two tiles."""
    tile = named_args.get("TILE", kwargs.get("TILE", 128))
    keep = [c for c in _prune_configs(configs, named_args, **kwargs)
            if tile % c.kwargs["BLOCK_M"] == 0]
    return keep or [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=2)]


def autotune_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in CONFIGS]


# ---------------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attend_pages(acc, m_i, l_i, b_qe, b_qo, b_axis, b_thi, b_tlo, qk_scale, p_table, n_slots, p_shift,
                  stride_se, K, V, KPos, PageLen, kv_off_k, kv_off_v, stride_kp, stride_ks,
                  stride_vp, stride_vs, stride_cpp, stride_cps, S,
                  HEAD_DIM: tl.constexpr, NUM_AXES: tl.constexpr, HAS_SHIFT: tl.constexpr,
                  DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold the pages listed at ``p_table`` (``n_slots = entries * S`` slots laid end to end)
    into the softmax state. Entry ``e``'s positions get the shift at ``p_shift + e*stride_se``
    (``stride_se = 0``: one shift for every entry, as for a chunk)."""
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    for start in range(0, n_slots, BLOCK_N):
        o_v = start + o_n
        o_e = o_v // S
        o_s = o_v - o_e * S
        m_e = o_v < n_slots
        b_page = tl.load(p_table + o_e, mask=m_e, other=-1)
        b_len = tl.load(PageLen + b_page, mask=b_page >= 0, other=0)
        m_n = o_s < b_len
        o_pg = tl.where(m_n, b_page, 0).to(tl.int64)
        b_k = tl.load(K + kv_off_k + o_pg[:, None] * stride_kp + o_s[:, None] * stride_ks
                      + o_d[None, :], mask=m_n[:, None], other=0.0)
        b_v = tl.load(V + kv_off_v + o_pg[:, None] * stride_vp + o_s[:, None] * stride_vs
                      + o_d[None, :], mask=m_n[:, None], other=0.0)
        b_kpos = load_pair_positions(KPos + o_pg * stride_cpp + o_s * stride_cps, m_n, b_axis,
                                     NUM_AXES)
        if HAS_SHIFT:
            b_kpos += load_pair_positions(p_shift + o_e * stride_se, m_n, b_axis, NUM_AXES)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, b_qe, b_qo, b_k, b_v, b_kpos,
                                     m_n[None, :], b_thi, b_tlo, qk_scale, DOT_PREC)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["N", "M", "C", "Pc", "K_SEL", "S", "stride_qpb", "stride_lb",
                               "stride_lh", "stride_ptb", "stride_psb", "stride_cpb",
                               "stride_csb", "stride_rb", "stride_rt"])
def _moc_attn_fwd(
    Q, QPos, K, V, KPos, PageLen, PageTable, PageShift, ChunkPages, ChunkShift, Routed,
    KNew, VNew, Turns, PairAxis, Out, Lse,
    stride_qb, stride_qn, stride_qh, stride_qpb, stride_qpn,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_cpp, stride_cps,
    stride_ptb, stride_psb, stride_psm, stride_cpb, stride_cpc, stride_csb, stride_csc,
    stride_rb, stride_rt, stride_rh,
    stride_knb, stride_knn, stride_knh, stride_vnb, stride_vnn, stride_vnh,
    stride_ob, stride_on, stride_oh, stride_lb, stride_lh,
    N, M, C, Pc, K_SEL, S, Hq, qk_scale,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, NUM_AXES: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_CSHIFT: tl.constexpr, HAS_NEW: tl.constexpr,
    IS_CAUSAL: tl.constexpr, TILE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // Hq).to(tl.int64)
    i_h = i_bh % Hq
    i_kvh = i_h // GROUP
    i_t = (i_m * BLOCK_M) // TILE

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    o_j = tl.arange(0, HALF)
    m_m = o_m < N
    b_axis = tl.load(PairAxis + o_j)
    b_thi, b_tlo = split_turns(tl.load(Turns + i_h * HALF + o_j))

    p_q = Q + i_b * stride_qb + o_m[:, None].to(tl.int64) * stride_qn + i_h * stride_qh \
        + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    b_qpos = load_pair_positions(QPos + i_b * stride_qpb + o_m * stride_qpn, m_m, b_axis,
                                 NUM_AXES)
    b_c, b_s = rope_cos_sin(b_qpos, b_thi[None, :], b_tlo[None, :])
    b_qe, b_qo = rope_rotate(b_q, b_c, b_s)
    b_qe = b_qe.to(Q.dtype.element_ty)
    b_qo = b_qo.to(Q.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    kv_off_k = i_kvh * stride_kh
    kv_off_v = i_kvh * stride_vh

    # mandatory pages (sink, fast window)
    acc, m_i, l_i = _attend_pages(
        acc, m_i, l_i, b_qe, b_qo, b_axis, b_thi, b_tlo, qk_scale, PageTable + i_b * stride_ptb,
        M * S, PageShift + i_b * stride_psb, stride_psm, K, V, KPos, PageLen, kv_off_k,
        kv_off_v, stride_kp, stride_ks, stride_vp, stride_vs, stride_cpp, stride_cps, S,
        HEAD_DIM, NUM_AXES, HAS_SHIFT, DOT_PREC, BLOCK_N)

    # routed chunks of this tile and head; -1 = none (an empty loop)
    p_r = Routed + i_b * stride_rb + i_t * stride_rt + i_h * stride_rh
    for j in range(0, K_SEL):
        c = tl.load(p_r + j)
        ok = c >= 0
        c64 = tl.where(ok, c, 0).to(tl.int64)
        acc, m_i, l_i = _attend_pages(
            acc, m_i, l_i, b_qe, b_qo, b_axis, b_thi, b_tlo, qk_scale,
            ChunkPages + i_b * stride_cpb + c64 * stride_cpc, tl.where(ok, Pc * S, 0),
            ChunkShift + i_b * stride_csb + c64 * stride_csc, 0, K, V, KPos, PageLen,
            kv_off_k, kv_off_v, stride_kp, stride_ks, stride_vp, stride_vs, stride_cpp,
            stride_cps, S, HEAD_DIM, NUM_AXES, HAS_CSHIFT, DOT_PREC, BLOCK_N)

    # the block's own keys: all visible, or j <= i when causal
    if HAS_NEW:
        hi = N
        if IS_CAUSAL:
            hi = tl.minimum(N, (i_m + 1) * BLOCK_M)
        for start in range(0, hi, BLOCK_N):
            o_t = start + o_n
            m_t = o_t < N
            p_k = KNew + i_b * stride_knb + o_t[:, None].to(tl.int64) * stride_knn \
                + i_kvh * stride_knh + o_d[None, :]
            p_v = VNew + i_b * stride_vnb + o_t[:, None].to(tl.int64) * stride_vnn \
                + i_kvh * stride_vnh + o_d[None, :]
            b_k = tl.load(p_k, mask=m_t[:, None], other=0.0)
            b_v = tl.load(p_v, mask=m_t[:, None], other=0.0)
            b_kpos = load_pair_positions(QPos + i_b * stride_qpb + o_t * stride_qpn, m_t,
                                         b_axis, NUM_AXES)
            m_vis = m_t[None, :]
            if IS_CAUSAL:
                m_vis = m_vis & (o_t[None, :] <= o_m[:, None])
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, b_qe, b_qo, b_k, b_v, b_kpos, m_vis,
                                         b_thi, b_tlo, qk_scale, DOT_PREC)

    # rows that saw no key: out 0, lse -inf
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    b_o = acc / l_safe[:, None]
    b_lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    p_o = Out + i_b * stride_ob + o_m[:, None].to(tl.int64) * stride_on + i_h * stride_oh \
        + o_d[None, :]
    tl.store(p_o, b_o.to(Out.dtype.element_ty), mask=m_m[:, None])
    tl.store(Lse + i_b * stride_lb + i_h * stride_lh + o_m, b_lse, mask=m_m)


_moc_attn_fwd_tuned = triton.autotune(
    configs=autotune_configs(), key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune})(_moc_attn_fwd)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


def launch_moc_attention(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, table, *,
                         chunk_pages, routed, k_new=None, v_new=None, causal=False,
                         page_shift=None, chunk_shift=None, scale=None, tile_size=128,
                         out=None, lse=None, config=None):
    """Allocate outputs, build the grid and launch :func:`_moc_attn_fwd`.

    Arguments as :func:`lol_kernels.moc_attention` (validated); ``out``/``lse`` optional
    preallocated outputs (tests pass NaN-filled ones); ``config`` ``{"BLOCK_M", "BLOCK_N"[,
    "num_warps", "num_stages"]}`` skips autotuning (``tile_size % BLOCK_M`` must be 0).
    """
    B, N, Hq, D = q.shape
    A = q_pos.shape[-1]
    dev = q.device
    scale = D**-0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if lse is None:
        lse = torch.empty((B, Hq, N), dtype=torch.float32, device=dev)
    if B * N * Hq == 0:
        return out, lse
    t = table.to(dev)
    turns = rope_turns(t.freqs)
    pair_axis = t.pair_axis.to(torch.int32)
    q, q_pos, cache_k, cache_v, cache_pos = map(_last_contig, (q, q_pos, cache_k, cache_v,
                                                               cache_pos))
    page_len = page_len.contiguous()
    page_table, page_shift, chunk_pages, chunk_shift, routed, k_new, v_new = map(
        _last_contig, (page_table, page_shift, chunk_pages, chunk_shift, routed, k_new, v_new))
    Hkv = cache_k.shape[2]
    P, S = cache_k.shape[:2]
    M, (C, Pc), K_SEL = page_table.shape[1], chunk_pages.shape[1:], routed.shape[3]

    def st(x, *dims):
        return [x.stride(d) if x is not None else 0 for d in dims]

    args = dict(
        Q=q, QPos=q_pos, K=cache_k, V=cache_v, KPos=cache_pos, PageLen=page_len,
        PageTable=page_table, PageShift=page_shift if page_shift is not None else q_pos,
        ChunkPages=chunk_pages, ChunkShift=chunk_shift if chunk_shift is not None else q_pos,
        Routed=routed, KNew=k_new if k_new is not None else q,
        VNew=v_new if v_new is not None else q, Turns=turns, PairAxis=pair_axis, Out=out,
        Lse=lse)
    names = ["stride_qb", "stride_qn", "stride_qh", "stride_qpb", "stride_qpn",
             "stride_kp", "stride_ks", "stride_kh", "stride_vp", "stride_vs", "stride_vh",
             "stride_cpp", "stride_cps", "stride_ptb", "stride_psb", "stride_psm",
             "stride_cpb", "stride_cpc", "stride_csb", "stride_csc", "stride_rb", "stride_rt",
             "stride_rh", "stride_knb", "stride_knn", "stride_knh", "stride_vnb", "stride_vnn",
             "stride_vnh", "stride_ob", "stride_on", "stride_oh", "stride_lb", "stride_lh"]
    vals = (st(q, 0, 1, 2) + st(q_pos, 0, 1) + st(cache_k, 0, 1, 2) + st(cache_v, 0, 1, 2)
            + st(cache_pos, 0, 1) + st(page_table, 0) + st(page_shift, 0, 1)
            + st(chunk_pages, 0, 1) + st(chunk_shift, 0, 1) + st(routed, 0, 1, 2)
            + st(k_new, 0, 1, 2) + st(v_new, 0, 1, 2) + st(out, 0, 1, 2) + st(lse, 0, 1))
    strides = dict(zip(names, vals, strict=True))
    meta = dict(
        N=N, M=M, C=C, Pc=Pc, K_SEL=K_SEL, S=S, Hq=Hq, qk_scale=scale * LOG2E,
        HEAD_DIM=D, GROUP=Hq // Hkv, NUM_AXES=A, HAS_SHIFT=page_shift is not None,
        HAS_CSHIFT=chunk_shift is not None, HAS_NEW=k_new is not None,
        IS_CAUSAL=bool(causal), TILE=int(tile_size),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    if config is None and is_interpreted(_moc_attn_fwd):
        config = dict(INTERPRET_CONFIG)
        if tile_size % config["BLOCK_M"]:
            config["BLOCK_M"] = 16
    if config is not None:
        cfg = dict(config)
        if tile_size % cfg["BLOCK_M"]:
            raise ValueError(f"config BLOCK_M={cfg['BLOCK_M']} must divide tile_size={tile_size}")
        grid = (triton.cdiv(N, cfg["BLOCK_M"]), B * Hq)
        _moc_attn_fwd[grid](**args, **strides, **meta, **cfg)
    else:
        def grid(meta_):
            return (triton.cdiv(N, meta_["BLOCK_M"]), B * Hq)
        _moc_attn_fwd_tuned[grid](**args, **strides, **meta)
    return out, lse


# ---------------------------------------------------------------------------------------------
# public wrapper (validated by lol_kernels.moc.attention)
# ---------------------------------------------------------------------------------------------


def moc_attention_triton(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, table, *,
                         chunk_pages, routed, k_new=None, v_new=None, causal=False,
                         page_shift=None, chunk_shift=None, scale=None, tile_size=128,
                         out=None, lse=None, config=None):
    """Triton backend of :func:`lol_kernels.moc_attention` (same arguments and outputs).

    fp64 inputs take the torch path (the kernel's products are fp32).

    Returns:
        ``out [B, N, Hq, D]`` in q.dtype, ``lse [B, Hq, N]`` fp32.
    """
    if q.dtype == torch.float64:
        from .attention_reference import moc_attention_torch
        return moc_attention_torch(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                                   table, chunk_pages=chunk_pages, routed=routed, k_new=k_new,
                                   v_new=v_new, causal=causal, page_shift=page_shift,
                                   chunk_shift=chunk_shift, scale=scale, tile_size=tile_size)
    return launch_moc_attention(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                                table, chunk_pages=chunk_pages, routed=routed, k_new=k_new,
                                v_new=v_new, causal=causal, page_shift=page_shift,
                                chunk_shift=chunk_shift, scale=scale, tile_size=tile_size,
                                out=out, lse=lse, config=config)


__all__ = ["launch_moc_attention", "moc_attention_triton"]
