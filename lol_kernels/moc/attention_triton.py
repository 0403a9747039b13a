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
no spills, like the paged kernel (``tests/test_moc_attention.py::test_sm90_compile...``).

Every key tile goes through the shared steps of the paged kernel (``_load_page_tile``,
``_rotated_scores``, ``_online_softmax``: fp32 state in base 2, exact fixed-point RoPE angles from
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
    check_kernel_device,
    fast_trig,
    is_interpreted,
    kernel_supports,
    rope_turns,
)
from ..attention.triton_kernel import (
    CONFIGS,
    LOG2E,
    _attend_new_keys,
    _into,
    _last_contig,
    _load_page_tile,
    _online_softmax,
    _prune_configs,
    _rotated_scores,
    _same_strides,
    _start_program,
    _store_out,
)

# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

#: tiles used under TRITON_INTERPRET=1 (BLOCK_M is lowered to 16 when tile_size % 32 != 0)
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}
AUTOTUNE_KEY = ["HEAD_DIM", "PAGE_SIZE", "GROUP", "NUM_AXES", "HAS_SHIFT", "HAS_NEW",
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


@triton.jit(do_not_specialize=["N", "T", "stride_qpb", "stride_lb", "stride_lh",
                               "stride_eb", "stride_et", "stride_sb", "stride_st"])
def _moc_attn_fwd(
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
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // Hq).to(tl.int64)
    i_h = i_bh % Hq
    i_kvh = i_h // GROUP
    i_t = (i_m * BLOCK_M) // TILE

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    m_m = o_m < N
    b_axis, b_thi, b_tlo, b_q, m_i, l_i, acc = _start_program(
        Q, QPos, Turns, PairAxis, i_b, i_h, o_m, m_m, o_d, stride_qb, stride_qn, stride_qh,
        stride_qpb, stride_qpn, NUM_AXES, FAST_TRIG)

    # this (tile, head)'s page list: mandatory pages then the pages of its routed chunks,
    # -1 entries compacted away by the launcher; laid end to end, S slots each, every key
    # tile gathering its rows from whatever pages they fall in (as the paged kernel does)
    p_e = EntryPages + i_b * stride_eb + i_t * stride_et + i_h * stride_eh
    p_s = EntryShift + i_b * stride_sb + i_t * stride_st + i_h * stride_sh
    n_e = tl.load(EntryLen + (i_b * T + i_t) * Hq + i_h)  # [B, T, Hq] contiguous
    for start in range(0, n_e * PAGE_SIZE, BLOCK_N):
        b_k, b_v, b_kpos, m_n, partial = _load_page_tile(
            start, p_e, n_e, p_s, stride_se, K, V, KPos, PageLen, stride_kp, stride_ks,
            stride_kh, stride_vp, stride_vs, stride_vh, stride_cpp, stride_cps, i_kvh, o_n, o_d,
            b_axis, NUM_AXES, HAS_SHIFT, PAGE_SIZE, BLOCK_N)
        b_qk = _rotated_scores(b_q, b_k, b_kpos, b_thi, b_tlo, DOT_PREC, FAST_TRIG)
        if partial:  # full tiles skip the select
            b_qk = tl.where(m_n[None, :], b_qk, float("-inf"))
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, b_qk, b_v, qk_scale, DOT_PREC)

    if HAS_NEW:  # the block's own keys sit at the query positions
        acc, m_i, l_i = _attend_new_keys(
            acc, m_i, l_i, b_q, KNew, VNew, QPos, i_b, i_kvh, i_m, o_m, o_n, o_d, N,
            stride_knb, stride_knn, stride_knh, stride_vnb, stride_vnn, stride_vnh, stride_qpb,
            stride_qpn, b_axis, b_thi, b_tlo, qk_scale, 0, tl.cdiv(N, BLOCK_N), NUM_AXES,
            IS_CAUSAL, DOT_PREC, FAST_TRIG, BLOCK_M, BLOCK_N, False)
    _store_out(Out, Lse, acc, m_i, l_i, i_b, i_h, o_m, o_d, m_m, stride_ob, stride_on, stride_oh,
               stride_lb, stride_lh)


_moc_attn_fwd_tuned = triton.autotune(
    configs=autotune_configs(), key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune})(_moc_attn_fwd)


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
    :func:`_moc_attn_fwd`.

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
    q, q_pos, cache_pos, k_new, v_new = map(_last_contig, (q, q_pos, cache_pos, k_new, v_new))
    cache_k, cache_v = _same_strides(cache_k, cache_v)
    page_len = page_len.contiguous()
    pages, count, shift = entry_tables(page_table, page_shift, chunk_pages, chunk_shift, routed)
    Hkv, S, T = cache_k.shape[2], cache_k.shape[1], routed.shape[1]

    def st(x, *dims):
        return [x.stride(d) if x is not None else 0 for d in dims]

    args = dict(
        Q=q, QPos=q_pos, K=cache_k, V=cache_v, KPos=cache_pos, PageLen=page_len,
        EntryPages=pages, EntryLen=count, EntryShift=shift if shift is not None else pages,
        KNew=k_new if k_new is not None else q, VNew=v_new if v_new is not None else q,
        Turns=turns, PairAxis=pair_axis, Out=out, Lse=lse)
    names = ["stride_qb", "stride_qn", "stride_qh", "stride_qpb", "stride_qpn",
             "stride_kp", "stride_ks", "stride_kh", "stride_vp", "stride_vs", "stride_vh",
             "stride_cpp", "stride_cps", "stride_eb", "stride_et", "stride_eh", "stride_sb",
             "stride_st", "stride_sh", "stride_se", "stride_knb", "stride_knn", "stride_knh",
             "stride_vnb", "stride_vnn", "stride_vnh", "stride_ob", "stride_on", "stride_oh",
             "stride_lb", "stride_lh"]
    vals = (st(q, 0, 1, 2) + st(q_pos, 0, 1) + st(cache_k, 0, 1, 2) + st(cache_v, 0, 1, 2)
            + st(cache_pos, 0, 1) + st(pages, 0, 1, 2) + st(shift, 0, 1, 2, 3)
            + st(k_new, 0, 1, 2) + st(v_new, 0, 1, 2) + st(out, 0, 1, 2) + st(lse, 0, 1))
    strides = dict(zip(names, vals, strict=True))
    meta = dict(
        N=N, T=T, Hq=Hq, qk_scale=scale * LOG2E, HEAD_DIM=D, PAGE_SIZE=S, GROUP=Hq // Hkv,
        NUM_AXES=A, HAS_SHIFT=shift is not None, HAS_NEW=k_new is not None,
        IS_CAUSAL=bool(causal), TILE=int(tile_size), FAST_TRIG=fast_trig(_moc_attn_fwd),
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

    fp64 inputs and head dims that are not a power of two in [16, 256] take the torch path
    (``kernel_supports``); a compiled kernel given CPU tensors raises a clear error.

    Returns:
        ``out [B, N, Hq, D]`` in q.dtype, ``lse [B, Hq, N]`` fp32.
    """
    if not kernel_supports(q.dtype, q.shape[-1]):
        from .attention_reference import moc_attention_torch
        return _into(moc_attention_torch(q, q_pos, cache_k, cache_v, cache_pos, page_len,
                                         page_table, table, chunk_pages=chunk_pages,
                                         routed=routed, k_new=k_new, v_new=v_new, causal=causal,
                                         page_shift=page_shift, chunk_shift=chunk_shift,
                                         scale=scale, tile_size=tile_size), out, lse)
    check_kernel_device(_moc_attn_fwd, q)
    return launch_moc_attention(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                                table, chunk_pages=chunk_pages, routed=routed, k_new=k_new,
                                v_new=v_new, causal=causal, page_shift=page_shift,
                                chunk_shift=chunk_shift, scale=scale, tile_size=tile_size,
                                out=out, lse=lse, config=config)


# ---------------------------------------------------------------------------------------------
# ahead-of-time sm_90 compile (DESIGN.md §5 "GPU"), no GPU needed
# ---------------------------------------------------------------------------------------------

_AOT_SCALARS = {"N", "T", "Hq"}
_AOT_ALIGNED = {"stride_qb", "stride_qn", "stride_kp", "stride_ks", "stride_vp", "stride_vs",
                "stride_knb", "stride_knn", "stride_vnb", "stride_vnn", "stride_ob", "stride_on"}
_AOT_HEAD = {"stride_qh", "stride_kh", "stride_vh", "stride_knh", "stride_vnh", "stride_oh"}


def compile_sm90_config(dtype: str, head_dim: int, config, *, tile: int = 128,
                        page_size: int = 256, causal: bool = False, group: int = 3) -> dict:
    """Compile one ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` config of :func:`_moc_attn_fwd`
    for sm_90 and report registers, shared/stack/local memory and SASS counts.

    Must run in a process whose kernels were decorated with ``TRITON_INTERPRET=0`` (see
    :func:`sm90_report`, which spawns such processes)."""
    from ..attention import triton_aot as aot

    t = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}[dtype]
    bm, bn, warps, stages = config
    ptr = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "KNew": f"*{t}", "VNew": f"*{t}",
           "Out": f"*{t}", "Lse": "*fp32", "Turns": "*i64"}
    const = {"HEAD_DIM": head_dim, "PAGE_SIZE": page_size, "GROUP": group, "NUM_AXES": 3,
             "HAS_SHIFT": True, "HAS_NEW": True, "IS_CAUSAL": causal, "TILE": tile,
             "FAST_TRIG": True,
             "DOT_PREC": "ieee" if dtype == "fp32" else "tf32", "BLOCK_M": bm, "BLOCK_N": bn}
    sig, attrs = {}, {}
    for i, name in enumerate(_moc_attn_fwd.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif name in _AOT_SCALARS or name.startswith("stride"):
            sig[name] = "i32"
            if name in _AOT_ALIGNED or (name in _AOT_HEAD and head_dim % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = ptr.get(name, "*i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
    ck = aot.compile_sm90(_moc_attn_fwd, sig, const, attrs, num_warps=warps, num_stages=stages)
    cubin = ck.asm["cubin"]
    res = aot.resource_usage(cubin)
    res["shared"] += int(ck.metadata.shared)
    return {"kernel": "moc_attn_fwd", "dtype": dtype, "head_dim": head_dim, "BLOCK_M": bm,
            "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, **res,
            **aot.sass_summary(cubin)}


def _aot_job(job):
    return compile_sm90_config(*job)


def sm90_report(dtypes=("fp16", "bf16"), head_dims=(64, 128), configs=None,
                workers: int | None = None) -> list[dict]:
    """Compile every autotune config for each dtype and head dim in fresh ``spawn`` processes
    started with ``TRITON_INTERPRET=0`` (a process that decorated kernels in interpreter mode
    cannot compile them for a GPU)."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    from ..attention.triton_aot import _interpret

    configs = CONFIGS if configs is None else configs
    jobs = [(dt, d, c) for dt in dtypes for d in head_dims for c in configs]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    with _interpret("0"), ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(_aot_job, jobs))


__all__ = ["compile_sm90_config", "entry_tables", "launch_moc_attention", "moc_attention_triton",
           "sm90_report"]
