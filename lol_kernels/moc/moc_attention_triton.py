"""Fused Triton kernel of ``moc_attention``: RoPE in registers + block-sparse paged attention.

One program owns ``BLOCK_M`` queries of one query head ``h`` of one batch row (grid
``[cdiv(N, BLOCK_M), B * Hq]``). ``tile_size % BLOCK_M == 0``, so all its rows lie in one
routing tile ``t = i_m * BLOCK_M // tile_size`` and share one key list:

1. load the query tile, rotate it in registers with head ``h``'s frequencies at ``q_pos``;
2. read this (tile, head)'s **page list**: the mandatory pages ``page_table[b]`` then the
   ``Pc`` pages ``chunk_pages[b, c]`` of each routed chunk ``c = routed[b, t, h, j]``, with
   each page's shift (``page_shift`` or its chunk's ``chunk_shift``). The launcher builds
   these lists (:func:`entry_tables`: ``B * T * Hq * (M + k * Pc)`` int32, ``-1`` entries
   compacted to the end and not visited) with a few tensor ops, so the kernel's key loop is
   exactly the paged kernel's: pages laid end to end, ``PAGE_SIZE`` slots each, one scalar
   page lookup per key tile when ``PAGE_SIZE % BLOCK_N == 0``, keys rotated at read;
3. the block's own keys ``k_new`` (all, or ``j <= i`` when causal).

Resolving chunk -> page inside the loop instead (a three-level chain of dependent loads per
key row) spilled registers at sm_90 (104-1048 bytes of stack); with the lists it compiles with
no spills, like the paged kernel
(``tests/kernels/moc/test_moc_attention.py::test_sm90_compile_no_spills_hgmma``).

Every key tile goes through the steps the paged kernel uses (``load_page_tile``,
``rotated_scores``, ``online_softmax`` of :mod:`lol_kernels.common.triton_attention`: fp32
state in base 2, exact fixed-point RoPE angles from :mod:`lol_kernels.common.triton_rope`), with
the same autotune list and fp32 product precision, so a routing that selects every chunk
computes exactly what ``paged_attention`` computes over the concatenated page table. Work per
program is ``(M + k * Pc) * S + N`` keys instead of ``(M + C * Pc) * S + N``: the sparsity is
the fraction of chunks not routed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import kernel_input_error, launch_device
from ..common import triton_attention as ta
from ..common.triton_utils import (
    attention_outputs,
    check_kernel_device,
    is_interpreted,
    kernel_supports,
    last_contig,
    stride_args,
)

# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

# the shared list (lol_kernels.common.triton_attention), keyed on the routing tile too; under
# TRITON_INTERPRET=1 its INTERPRET_CONFIG, with BLOCK_M lowered to 16 when tile_size % 32 != 0


def _prune(configs, named_args, **kwargs):
    """The shared pruning (shared memory, fp32 tiles), plus: a query block never spans two
    routing tiles."""
    tile = named_args.get("TILE", kwargs.get("TILE", 128))
    keep = [c for c in ta.prune_configs(configs, named_args, **kwargs)
            if tile % c.kwargs["BLOCK_M"] == 0]
    return keep or [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=2)]


# ---------------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "T", "stride_qpb", "stride_lb", "stride_lh",
                               "stride_eb", "stride_et", "stride_sb", "stride_st"])
def moc_attn_fwd(
    Q, QPos, K, V, KPos, PageLen, EntryPages, EntryLen, EntryShift, KNew, VNew, Turns, PairAxis,
    Out, Lse,
    stride_qb, stride_qn, stride_qh, stride_qpb, stride_qpn,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_cpp, stride_cps,
    stride_eb, stride_et, stride_eh, stride_sb, stride_st, stride_sh, stride_se,
    stride_knb, stride_knn, stride_knh, stride_vnb, stride_vnn, stride_vnh,
    stride_ob, stride_on, stride_oh, stride_lb, stride_lh,
    N, T, Hq, qk_scale,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr,
    NUM_AXES: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_NEW: tl.constexpr,
    IS_CAUSAL: tl.constexpr, TILE: tl.constexpr, DOT_PREC: tl.constexpr,
    FAST_TRIG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    _, i_b, i_h, i_kvh = ta.program_heads(Hq, GROUP)
    i_m, o_m, o_n, o_d, m_m = ta.program_tile(N, BLOCK_M, BLOCK_N, HEAD_DIM)
    i_t = (i_m * BLOCK_M) // TILE  # the routing tile of every row of this program
    b_axis, b_thi, b_tlo, b_q, m_i, l_i, acc = ta.start_program(
        Q, QPos, Turns, PairAxis, i_b, i_h, o_m, m_m, o_d, stride_qb, stride_qn, stride_qh,
        stride_qpb, stride_qpn, NUM_AXES, FAST_TRIG)

    # this (tile, head)'s page list: mandatory pages then the pages of its routed chunks,
    # -1 entries compacted away by the launcher; laid end to end, S slots each, every key
    # tile gathering its rows from whatever pages they fall in (as the paged kernel does)
    p_e = EntryPages + i_b * stride_eb + i_t * stride_et + i_h * stride_eh
    p_s = EntryShift + i_b * stride_sb + i_t * stride_st + i_h * stride_sh
    n_e = tl.load(EntryLen + (i_b * T + i_t) * Hq + i_h)  # [B, T, Hq] contiguous
    for start in range(0, n_e * PAGE_SIZE, BLOCK_N):
        acc, m_i, l_i = ta.attend_page_tile(
            acc, m_i, l_i, b_q, start, p_e, n_e, p_s, stride_se, K, V, KPos, PageLen, stride_kp,
            stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_cpp, stride_cps, i_kvh,
            o_n, o_d, b_axis, b_thi, b_tlo, qk_scale, NUM_AXES, HAS_SHIFT, PAGE_SIZE, DOT_PREC,
            FAST_TRIG, BLOCK_N)

    if HAS_NEW:  # the block's own keys sit at the query positions
        acc, m_i, l_i = ta.attend_new_keys(
            acc, m_i, l_i, b_q, KNew, VNew, QPos, i_b, i_kvh, i_m, o_m, o_n, o_d, N,
            stride_knb, stride_knn, stride_knh, stride_vnb, stride_vnn, stride_vnh, stride_qpb,
            stride_qpn, b_axis, b_thi, b_tlo, qk_scale, 0, tl.cdiv(N, BLOCK_N), NUM_AXES,
            IS_CAUSAL, DOT_PREC, FAST_TRIG, BLOCK_M, BLOCK_N, False)
    ta.store_out(Out, Lse, acc, m_i, l_i, i_b, i_h, o_m, o_d, m_m, stride_ob, stride_on,
                 stride_oh, stride_lb, stride_lh)


moc_attn_fwd_tuned = ta.autotuned(moc_attn_fwd, key=["TILE"], prune=_prune)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


def entry_tables(page_table, page_shift, chunk_pages, chunk_shift, routed):
    """Expand the routing into one page list per (batch row, tile, head).

    Returns ``pages [B, T, Hq, E]`` int32 (``E = M + k * Pc``: the mandatory pages, then the
    pages of the routed chunks, ``-1`` entries moved to the end), ``count [B, T, Hq]`` int32
    (entries before the first ``-1``) and ``shift [B, T, Hq, E, A]`` int32 (the page's
    ``page_shift`` or its chunk's ``chunk_shift``) or ``None``. A few hundred KB for the Wan
    shape; the kernel's inner loop is then exactly the paged kernel's.
    """
    B, T, Hq, K = routed.shape
    M, (C, Pc) = page_table.shape[1], chunk_pages.shape[1:]
    if C == 0:  # nothing routable (routed is all -1): one empty chunk keeps the gathers valid
        chunk_pages = chunk_pages.new_full((B, 1, Pc), -1)
        chunk_shift = None
    r = routed.long()
    ok = r >= 0
    bi = torch.arange(B, device=r.device).view(B, 1, 1, 1)
    pg = chunk_pages.long()[bi, r.clamp(min=0)]  # [B, T, Hq, K, Pc]
    pg = torch.where(ok.unsqueeze(-1), pg, -1).flatten(3)
    pages = torch.cat([page_table.long()[:, None, None, :].expand(B, T, Hq, M), pg], -1)
    shift = None
    if page_shift is not None or chunk_shift is not None:
        A = (page_shift if page_shift is not None else chunk_shift).shape[-1]
        ms = (page_shift.long() if page_shift is not None else
              torch.zeros(B, M, A, dtype=torch.long, device=r.device))
        cs = (chunk_shift.long()[bi, r.clamp(min=0)] if chunk_shift is not None else
              torch.zeros(B, T, Hq, K, A, dtype=torch.long, device=r.device))
        shift = torch.cat([ms[:, None, None].expand(B, T, Hq, M, A),
                           cs.unsqueeze(4).expand(B, T, Hq, K, Pc, A).flatten(3, 4)], 3)
    # compact: valid entries first (stable), so -1 entries cost no key tile
    order = torch.argsort((pages < 0).to(torch.int8), dim=-1, stable=True)
    pages = torch.gather(pages, -1, order)
    count = (pages >= 0).sum(-1)
    if shift is not None:
        shift = torch.gather(shift, 3, order.unsqueeze(-1).expand_as(shift))
        shift = shift.to(torch.int32).contiguous()
    return pages.to(torch.int32).contiguous(), count.to(torch.int32).contiguous(), shift


def launch_moc_attention(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, table, *,
                         chunk_pages, routed, k_new=None, v_new=None, causal=False,
                         page_shift=None, chunk_shift=None, scale=None, tile_size=128,
                         out=None, lse=None, config=None):
    """Expand the routing (:func:`entry_tables`), allocate outputs, launch
    :func:`moc_attn_fwd`.

    Arguments as :func:`lol_kernels.moc_attention` (validated); ``out``/``lse`` optional
    preallocated outputs ``[B, N, Hq, D]`` q.dtype / ``[B, Hq, N]`` fp32 on q's device with a
    unit last stride (tests pass NaN-filled ones; anything else raises); ``config``
    ``{"BLOCK_M", "BLOCK_N"[, "num_warps", "num_stages"]}`` skips autotuning (``tile_size %
    BLOCK_M`` must be 0).
    """
    B, N, Hq, D = q.shape
    out, lse = attention_outputs(q, out, lse)
    if B * N * Hq == 0:
        return out, lse
    with launch_device(q):
        launch_moc(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, table,
                   chunk_pages, routed, k_new, v_new, causal, page_shift, chunk_shift, scale,
                   tile_size, out, lse, config)
    return out, lse


def launch_moc(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, table, chunk_pages,
               routed, k_new, v_new, causal, page_shift, chunk_shift, scale, tile_size, out,
               lse, config):
    """The launch of :func:`launch_moc_attention` (outputs allocated), on the current device."""
    B, N, Hq, D = q.shape
    A = q_pos.shape[-1]
    consts = ta.launch_constants(moc_attn_fwd, q, table, scale)
    q, q_pos, cache_pos, k_new, v_new = map(last_contig, (q, q_pos, cache_pos, k_new, v_new))
    cache_k, cache_v = ta.same_strides(cache_k, cache_v)
    page_len = page_len.contiguous()
    pages, count, shift = entry_tables(page_table, page_shift, chunk_pages, chunk_shift, routed)
    Hkv, S, T = cache_k.shape[2], cache_k.shape[1], routed.shape[1]

    args = dict(
        Q=q, QPos=q_pos, K=cache_k, V=cache_v, KPos=cache_pos, PageLen=page_len,
        EntryPages=pages, EntryLen=count, EntryShift=shift if shift is not None else pages,
        KNew=k_new if k_new is not None else q, VNew=v_new if v_new is not None else q,
        Out=out, Lse=lse)
    strides = stride_args(
        (q, "stride_qb stride_qn stride_qh"), (q_pos, "stride_qpb stride_qpn"),
        (cache_k, "stride_kp stride_ks stride_kh"), (cache_v, "stride_vp stride_vs stride_vh"),
        (cache_pos, "stride_cpp stride_cps"), (pages, "stride_eb stride_et stride_eh"),
        (shift, "stride_sb stride_st stride_sh stride_se"),
        (k_new, "stride_knb stride_knn stride_knh"), (v_new, "stride_vnb stride_vnn stride_vnh"),
        (out, "stride_ob stride_on stride_oh"), (lse, "stride_lb stride_lh"))
    meta = dict(
        N=N, T=T, Hq=Hq, PAGE_SIZE=S, GROUP=Hq // Hkv, NUM_AXES=A, HAS_SHIFT=shift is not None,
        HAS_NEW=k_new is not None, IS_CAUSAL=bool(causal), TILE=int(tile_size), **consts)
    if config is None and is_interpreted(moc_attn_fwd):
        config = dict(ta.INTERPRET_CONFIG)
        if tile_size % config["BLOCK_M"]:
            config["BLOCK_M"] = 16
    if config is not None:
        cfg = dict(config)
        if tile_size % cfg["BLOCK_M"]:
            raise ValueError(f"config BLOCK_M={cfg['BLOCK_M']} must divide tile_size={tile_size}")
        grid = (triton.cdiv(N, cfg["BLOCK_M"]), B * Hq)
        moc_attn_fwd[grid](**args, **strides, **meta, **cfg)
    else:
        def grid(meta_):
            return (triton.cdiv(N, meta_["BLOCK_M"]), B * Hq)
        moc_attn_fwd_tuned[grid](**args, **strides, **meta)


# ---------------------------------------------------------------------------------------------
# public wrapper (validated by lol_kernels.moc.moc_attention_op)
# ---------------------------------------------------------------------------------------------


def moc_attention_triton(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, table, *,
                         chunk_pages, routed, k_new=None, v_new=None, causal=False,
                         page_shift=None, chunk_shift=None, scale=None, tile_size=128,
                         out=None, lse=None, config=None):
    """Triton backend of :func:`lol_kernels.moc_attention` (same arguments and outputs).

    Inputs are assumed validated and supported by the kernel: fp16/bf16/fp32 with a
    power-of-two head dim in [16, 256] (``kernel_supports``; the public op sends anything else
    to the torch path, a direct call raises). A compiled kernel given CPU tensors raises a
    clear error.

    Returns:
        ``out [B, N, Hq, D]`` in q.dtype, ``lse [B, Hq, N]`` fp32.
    """
    if not kernel_supports(q.dtype, q.shape[-1]):
        raise kernel_input_error("moc_attention", "q", q)
    check_kernel_device(moc_attn_fwd, q)
    return launch_moc_attention(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                                table, chunk_pages=chunk_pages, routed=routed, k_new=k_new,
                                v_new=v_new, causal=causal, page_shift=page_shift,
                                chunk_shift=chunk_shift, scale=scale, tile_size=tile_size,
                                out=out, lse=lse, config=config)


__all__ = ["entry_tables", "launch_moc_attention", "moc_attention_triton", "moc_attn_fwd",
           "moc_attn_fwd_tuned"]
