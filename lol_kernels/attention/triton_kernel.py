"""Fused Triton kernel: per-head jittered RoPE in registers + paged sink/window attention.

One program owns ``BLOCK_M`` queries of one query head ``h`` and one split-KV part of their keys
(grid ``[cdiv(Nq, BLOCK_M), B*Hq, splits]``, :mod:`.triton_split`; one part by default off-GPU):

1. load the query tile, rotate it in registers with head ``h``'s frequencies at ``q_pos``;
2. stream the cached keys: the page-table entries are laid end to end, ``S`` slots each. When
   ``S`` is a multiple of ``BLOCK_N`` a tile lies in one page (one scalar page-table lookup);
   otherwise each row of the tile gathers its own page (pages smaller than the tile). Row
   ``r`` is valid when its entry is not ``-1`` and its slot is ``< page_len``. The un-rotated
   K tile is rotated in registers with head ``h``'s frequencies at ``stored position +
   page_shift[entry]``, then an online softmax (base 2, fp32 state) accumulates ``P V``;
3. stream the block's own keys ``k_new`` at their positions, all visible or ``j <= i``.

GQA: query head ``h`` reads KV head ``h // GROUP``. The key tile is rotated with the *query*
head's frequencies, so jitter inside a GQA group stays exactly relative. Angles are exact
fixed-point turns (see :mod:`lol_kernels._triton_common`), so positions up to 2^30 are as
accurate as the float64 reference. A row that sees no key gets ``out = 0``, ``lse = -inf``.

The same launcher serves the dense :func:`lol_kernels.rope_attention`: there the cache is empty
and the "new" keys are the dense K/V at ``k_pos`` (``N_new`` may differ from ``Nq``), zero-copy.

Cost model (sm_90 compile, ``benchmarks/kernel_report.py``): rotating keys in registers means
every query tile re-rotates every key tile it reads (``BLOCK_N * D / 2`` pairs: two selects
for the pair's axis, a 32-bit phase product, I2F, MUFU sin/cos, four FMAs, unpack/pack), so
the loop is bound by instruction issue, not by the tensor cores. What keeps the common path
short (``BLOCK_M = 128, BLOCK_N = 64``, D = 128: 1004 -> 685 SASS instructions per thread and
key tile; with two split-KV parts the prediction went 402 -> 633 TFLOP/s with perfect overlap,
445 if the softmax never overlaps a product, against 560 for the 70% goal):

* relative phases (``RELATIVE`` in :func:`lol_kernels._triton_common.rope_phase`): positions
  biased by 2^31 per row, no sign fix-up per pair; page shifts added per row, not per pair;
* the rotated pairs re-interleaved in registers: one ``K = D`` product instead of two;
* one-page tiles address K/V/positions from a scalar base plus loop-invariant offsets;
* the partial-tile mask only on partial tiles (paged) or in a second loop (diagonal, last
  tile of the block's own keys);
* a lazy running max (``RESCALE_SLACK``): the accumulator is rescaled only when a row max
  grows by more than 2^8, a few tiles of a long stream.

Larger query tiles would amortize the rotation further but spill next to the
``[BLOCK_M, D]`` fp32 accumulator (M256 with 8 or 16 warps: 264-304 bytes of stack).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_common import (
    check_kernel_device,
    fast_trig,
    interleave,
    is_interpreted,
    kernel_supports,
    load_pair_positions,
    rope_cos_sin,
    rope_rotate,
    rope_turns,
    split_turns,
)
from .triton_split import (
    combine_splits,
    device_sms,
    normalize_rows,
    num_splits_for,
    split_buffers,
    store_part,
)

# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
#: base-2 headroom of the lazy running max (:func:`_online_softmax`): p <= 2^8 between moves
RESCALE_SLACK = tl.constexpr(8.0)
#: start of the running max: finite, so no -inf - -inf to guard; below any real score, and
#: exp2(M_INIT - m) underflows to 0 when the first visible key moves it
M_INIT = tl.constexpr(-1.0e30)

#: (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may pick on a GPU (sm_90 compile,
#: tests/test_triton_aot.py: none spills). M128 with two warpgroups rotates each key tile once
#: for 128 queries (the fewest instructions per FLOP); M64 with one warpgroup fits two CTAs per
#: SM, whose softmax and tensor-core phases can interleave (more instructions per FLOP, less
#: idle issue: only a GPU run can rank them). BLOCK_N = 128 or 3 stages at BLOCK_M = 128 spill.
#: fp32 inputs (3xTF32 products) keep the BLOCK_N = 32 configs (the accuracy path).
CONFIGS = [
    (128, 64, 8, 2),
    (128, 32, 8, 2),
    (64, 64, 8, 2),
    (64, 64, 4, 2),
]
#: tiles used under TRITON_INTERPRET=1 (no autotuning there: it would time every config)
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}
AUTOTUNE_KEY = ["HEAD_DIM", "PAGE_SIZE", "GROUP", "NUM_AXES", "HAS_SHIFT", "HAS_NEW",
                "IS_CAUSAL", "DOT_PREC"]


def _smem_bytes(bm: int, bn: int, stages: int, head_dim: int, elem: int = 2) -> int:
    """Rough shared memory of a config: the Q tile, pipelined K/V tiles, the rotated K tile."""
    return (bm * head_dim + (2 * stages + 1) * bn * head_dim) * elem


def _prune_configs(configs, named_args, **kwargs):
    """Keep configs whose shared memory fits the device; fp32 inputs and D = 256 keep only
    narrow key tiles (3xTF32 products hold split operands in registers)."""
    args = {**kwargs, **named_args}  # the launcher passes everything by keyword
    d = args.get("HEAD_DIM", 128)
    q = args.get("Q")
    elem = q.element_size() if q is not None else 2
    try:
        dev = torch.cuda.current_device()
        limit = triton.runtime.driver.active.utils.get_device_properties(dev)["max_shared_mem"]
    except Exception:  # no device to ask: keep Hopper's 227 KiB
        limit = 232448
    keep = [c for c in configs
            if _smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, d, elem)
            <= limit and ((d <= 128 and elem == 2) or c.kwargs["BLOCK_N"] <= 32)]
    return keep or configs[-1:]


def autotune_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in CONFIGS]


# ---------------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rotated_scores(b_q, b_k, b_pos, b_thi, b_tlo, DOT_PREC: tl.constexpr,
                    FAST_TRIG: tl.constexpr):
    """Rotate one un-rotated key tile ``b_k [BLOCK_N, D]`` in registers at its per-pair
    positions ``b_pos`` and return the raw scores ``q . k`` ``[BLOCK_M, BLOCK_N]`` fp32.
    ``b_q``: the rotated query tile (input dtype, relative phases: :func:`rope_phase`)."""
    b_c, b_s = rope_cos_sin(b_pos, b_thi[None, :], b_tlo[None, :], FAST_TRIG, True)
    b_ke, b_ko = rope_rotate(b_k, b_c, b_s)
    # rotated pairs back in place (a register relabeling): one K = D product
    b_kr = interleave(b_ke, b_ko).to(b_q.dtype)
    return tl.dot(b_q, tl.trans(b_kr), input_precision=DOT_PREC)


@triton.jit
def _online_softmax(acc, m_i, l_i, b_qk, b_v, qk_scale, DOT_PREC: tl.constexpr):
    """Fold masked scores ``b_qk`` (``-inf`` = invisible) and their values into the online
    softmax state: ``m_i`` running max and ``l_i`` running sum in base 2, ``acc`` fp32.

    The running max moves only when some row's tile max exceeds it by more than
    ``RESCALE_SLACK``; in between ``p <= 2^RESCALE_SLACK`` and the ``[BLOCK_M, D]``
    accumulator is not rescaled (most tiles). ``lse = m + log2(l)`` holds either way."""
    # scale > 0 commutes with max, so the scale folds into the exponent's FMA; m_i starts at
    # M_INIT (finite): a row's first visible key always moves it, invisible keys never do
    m_ij = tl.max(b_qk, 1) * qk_scale
    if tl.max((m_ij > m_i + RESCALE_SLACK).to(tl.int32), 0) > 0:
        m_new = tl.maximum(m_i, m_ij)
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    b_p = tl.exp2(b_qk * qk_scale - m_i[:, None])
    l_i += tl.sum(b_p, 1)
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _start_program(Q, QPos, Turns, PairAxis, i_b, i_h, o_m, m_m, o_d, stride_qb, stride_qn,
                   stride_qh, stride_qpb, stride_qpn, NUM_AXES: tl.constexpr,
                   FAST_TRIG: tl.constexpr):
    """Prologue shared by the paged and MoC kernels: head ``h``'s pair axes ``[D/2]`` and
    frequency words, its ``[BLOCK_M, D]`` query tile rotated once (relative phases, input
    dtype for the tensor cores), and the empty online-softmax state ``m_i, l_i, acc``."""
    HALF: tl.constexpr = o_d.shape[0] // 2
    o_j = tl.arange(0, HALF)
    b_axis = tl.load(PairAxis + o_j)
    b_thi, b_tlo = split_turns(tl.load(Turns + i_h * HALF + o_j))
    p_q = Q + i_b * stride_qb + o_m[:, None].to(tl.int64) * stride_qn + i_h * stride_qh \
        + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    b_qpos = load_pair_positions(QPos + i_b * stride_qpb + o_m * stride_qpn, m_m, b_axis,
                                 NUM_AXES, RELATIVE=True)
    b_c, b_s = rope_cos_sin(b_qpos, b_thi[None, :], b_tlo[None, :], FAST_TRIG, True)
    b_qe, b_qo = rope_rotate(b_q, b_c, b_s)
    b_q = interleave(b_qe, b_qo).to(Q.dtype.element_ty)
    m_i = tl.full([o_m.shape[0]], M_INIT, dtype=tl.float32)
    l_i = tl.zeros([o_m.shape[0]], dtype=tl.float32)
    acc = tl.zeros([o_m.shape[0], o_d.shape[0]], dtype=tl.float32)
    return b_axis, b_thi, b_tlo, b_q, m_i, l_i, acc


@triton.jit
def _load_page_tile(start, Entries, n_entries, Shifts, stride_se, K, V, KPos, PageLen,
                    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                    stride_cpp, stride_cps, i_kvh, o_n, o_d, b_axis, NUM_AXES: tl.constexpr,
                    HAS_SHIFT: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tile ``start`` of the pages listed at ``Entries`` (``n_entries`` of them, laid end
    to end, ``PAGE_SIZE`` slots each; shared by the paged and MoC kernels).

    Row ``r`` is valid when its entry is not ``-1`` and its slot is below the page's length.
    When ``PAGE_SIZE`` is a multiple of ``BLOCK_N`` the tile lies in one page (one scalar
    lookup); otherwise each row gathers its own page.

    Returns:
        ``b_k, b_v [BLOCK_N, D]`` (invalid rows 0), per-pair key positions ``[BLOCK_N, D/2]``
        (stored + the entry's shift, relative bias), the row mask ``m_n [BLOCK_N]`` and
        ``partial``: whether any row is invalid.
    """
    if PAGE_SIZE % BLOCK_N == 0:  # one page: scalar bases, loop-invariant row offsets
        i_e = start // PAGE_SIZE
        i_page = tl.load(Entries + i_e)
        i_len = tl.load(PageLen + tl.maximum(i_page, 0), mask=i_page >= 0, other=0)
        i_s = start % PAGE_SIZE
        m_n = i_s + o_n < i_len
        partial = i_s + BLOCK_N > i_len
        i_pg = tl.maximum(i_page, 0).to(tl.int64)
        o_row = o_n[:, None] * stride_ks + o_d[None, :]  # K and V pools share strides
        p_k = K + (i_pg * stride_kp + i_s * stride_ks + i_kvh * stride_kh) + o_row
        p_v = V + (i_pg * stride_kp + i_s * stride_ks + i_kvh * stride_kh) + o_row
        p_pos = KPos + (i_pg * stride_cpp + i_s * stride_cps) + o_n * stride_cps
        p_sh = Shifts + i_e * stride_se  # the entry's shift: one scalar load per axis
        m_sh = None
    else:  # pages smaller than the tile: each row gathers its own page
        o_v = start + o_n
        o_e = o_v // PAGE_SIZE
        o_s = o_v % PAGE_SIZE
        b_page = tl.load(Entries + o_e, mask=o_e < n_entries, other=-1)
        b_len = tl.load(PageLen + b_page, mask=b_page >= 0, other=0)
        m_n = o_s < b_len
        partial = tl.min(m_n.to(tl.int32), 0) == 0
        o_pg = tl.where(m_n, b_page, 0).to(tl.int64)
        p_k = K + o_pg[:, None] * stride_kp + o_s[:, None] * stride_ks + i_kvh * stride_kh \
            + o_d[None, :]
        p_v = V + o_pg[:, None] * stride_vp + o_s[:, None] * stride_vs + i_kvh * stride_vh \
            + o_d[None, :]
        p_pos = KPos + o_pg * stride_cpp + o_s * stride_cps
        p_sh = Shifts + o_e * stride_se
        m_sh = m_n
    b_k = tl.load(p_k, mask=m_n[:, None], other=0.0)
    b_v = tl.load(p_v, mask=m_n[:, None], other=0.0)
    b_pos = load_pair_positions(p_pos, m_n, b_axis, NUM_AXES, p_sh, m_sh, HAS_SHIFT, True)
    return b_k, b_v, b_pos, m_n, partial


@triton.jit
def _new_tile_scores(b_q, KNew, VNew, NewPos, i_b, i_kvh, start, o_n, o_d, N_new, stride_knb,
                     stride_knn, stride_knh, stride_vnb, stride_vnn, stride_vnh, stride_npb,
                     stride_npn, b_axis, b_thi, b_tlo, NUM_AXES: tl.constexpr,
                     DOT_PREC: tl.constexpr, FAST_TRIG: tl.constexpr):
    """Key tile ``start`` of the block's own keys: raw scores ``[BLOCK_M, BLOCK_N]`` against
    the rotated keys, ``b_v [BLOCK_N, D]`` (rows past ``N_new`` read 0) and the row mask."""
    o_t = start + o_n
    m_t = o_t < N_new
    p_k = KNew + i_b * stride_knb + o_t[:, None].to(tl.int64) * stride_knn + i_kvh * stride_knh \
        + o_d[None, :]
    p_v = VNew + i_b * stride_vnb + o_t[:, None].to(tl.int64) * stride_vnn + i_kvh * stride_vnh \
        + o_d[None, :]
    b_k = tl.load(p_k, mask=m_t[:, None], other=0.0)
    b_v = tl.load(p_v, mask=m_t[:, None], other=0.0)
    b_pos = load_pair_positions(NewPos + i_b * stride_npb + o_t * stride_npn, m_t, b_axis,
                                NUM_AXES, RELATIVE=True)
    return _rotated_scores(b_q, b_k, b_pos, b_thi, b_tlo, DOT_PREC, FAST_TRIG), b_v, m_t


@triton.jit
def _new_key_end(N_new, i_m, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """``(hi, full_end)``: the block's own keys a query tile reads (``[0, hi)``) and the end of
    those it sees whole (all its rows see them: no mask)."""
    hi = N_new
    full_end = N_new
    if IS_CAUSAL:  # keys past the tile's last query are masked for all of its rows
        hi = tl.minimum(N_new, (i_m + 1) * BLOCK_M)
        full_end = tl.minimum(N_new, i_m * BLOCK_M + 1)
    return hi, full_end


@triton.jit
def _attend_new_keys(acc, m_i, l_i, b_q, KNew, VNew, NewPos, i_b, i_kvh, i_m, o_m, o_n,
                     o_d, N_new, stride_knb, stride_knn, stride_knh, stride_vnb, stride_vnn,
                     stride_vnh, stride_npb, stride_npn, b_axis, b_thi, b_tlo, qk_scale, t_lo,
                     t_hi, NUM_AXES: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     DOT_PREC: tl.constexpr, FAST_TRIG: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, UNMASKED_LOOP: tl.constexpr = True):
    """The block's own keys (shared by the paged and MoC kernels): all visible, or
    ``j <= i`` (top-left aligned) when causal; key tiles ``[t_lo, t_hi)`` of them only (a
    split-KV part; clipped to the tiles there are). ``UNMASKED_LOOP``: the tiles every row
    sees whole go through a loop of their own, without mask work (the MoC kernel, three
    loops long, spills at sm_90 with it and masks every tile instead)."""
    hi, full_end = _new_key_end(N_new, i_m, IS_CAUSAL, BLOCK_M)
    n_full = full_end // BLOCK_N
    if not UNMASKED_LOOP:  # one loop, masked throughout (fewer registers live)
        n_full = 0
    # two loops, the unmasked one first: no per-tile mask work on the common path
    for start in range(tl.maximum(t_lo, 0) * BLOCK_N, tl.minimum(t_hi, n_full) * BLOCK_N,
                       BLOCK_N):
        b_qk, b_v, m_t = _new_tile_scores(
            b_q, KNew, VNew, NewPos, i_b, i_kvh, start, o_n, o_d, N_new, stride_knb, stride_knn,
            stride_knh, stride_vnb, stride_vnn, stride_vnh, stride_npb, stride_npn, b_axis, b_thi,
            b_tlo, NUM_AXES, DOT_PREC, FAST_TRIG)
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, b_qk, b_v, qk_scale, DOT_PREC)
    for start in range(tl.maximum(t_lo, n_full) * BLOCK_N,
                       tl.minimum(t_hi * BLOCK_N, hi), BLOCK_N):
        b_qk, b_v, m_t = _new_tile_scores(
            b_q, KNew, VNew, NewPos, i_b, i_kvh, start, o_n, o_d, N_new, stride_knb, stride_knn,
            stride_knh, stride_vnb, stride_vnn, stride_vnh, stride_npb, stride_npn, b_axis, b_thi,
            b_tlo, NUM_AXES, DOT_PREC, FAST_TRIG)
        if IS_CAUSAL:  # j <= i and j < N_new in one compare
            m_vis = (start + o_n)[None, :] <= tl.minimum(o_m, N_new - 1)[:, None]
        else:
            m_vis = m_t[None, :]
        b_qk = tl.where(m_vis, b_qk, float("-inf"))
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, b_qk, b_v, qk_scale, DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _store_out(Out, Lse, acc, m_i, l_i, i_b, i_h, o_m, o_d, m_m, stride_ob, stride_on,
               stride_oh, stride_lb, stride_lh):
    """Epilogue: normalize and store ``out`` and the natural-log ``lse``; rows that saw no key
    have ``l_i = 0`` and ``acc = 0`` -> out 0, lse -inf."""
    b_o, b_lse = normalize_rows(acc, m_i, l_i)
    p_o = Out + i_b * stride_ob + o_m[:, None].to(tl.int64) * stride_on + i_h * stride_oh \
        + o_d[None, :]
    tl.store(p_o, b_o.to(Out.dtype.element_ty), mask=m_m[:, None])
    tl.store(Lse + i_b * stride_lb + i_h * stride_lh + o_m, b_lse, mask=m_m)


@triton.jit(do_not_specialize=["Nq", "N_new", "M", "stride_qpb", "stride_npb",
                               "stride_lb", "stride_lh", "stride_ptb", "stride_psb",
                               "num_splits"])
def _paged_rope_attn_fwd(
    Q, QPos, K, V, KPos, PageLen, PageTable, PageShift, KNew, VNew, NewPos, Turns, PairAxis,
    Out, Lse, OutPart, LsePart,
    stride_qb, stride_qn, stride_qh, stride_qpb, stride_qpn,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_cpp, stride_cps,
    stride_ptb, stride_psb, stride_psm,
    stride_knb, stride_knn, stride_knh, stride_vnb, stride_vnn, stride_vnh, stride_npb,
    stride_npn,
    stride_ob, stride_on, stride_oh, stride_lb, stride_lh,
    Nq, N_new, M, Hq, qk_scale, num_splits,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, NUM_AXES: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_NEW: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr, FAST_TRIG: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_sp = tl.program_id(2)
    i_b = (i_bh // Hq).to(tl.int64)
    i_h = i_bh % Hq
    i_kvh = i_h // GROUP

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    m_m = o_m < Nq
    b_axis, b_thi, b_tlo, b_q, m_i, l_i, acc = _start_program(
        Q, QPos, Turns, PairAxis, i_b, i_h, o_m, m_m, o_d, stride_qb, stride_qn, stride_qh,
        stride_qpb, stride_qpn, NUM_AXES, FAST_TRIG)

    # this part's key tiles [t_lo, t_hi): cached tiles first, then the block's own keys
    n_cached = tl.cdiv(M * PAGE_SIZE, BLOCK_N)
    n_tiles = n_cached
    if HAS_NEW:
        hi_new, _ = _new_key_end(N_new, i_m, IS_CAUSAL, BLOCK_M)
        n_tiles += tl.cdiv(hi_new, BLOCK_N)
    per = tl.cdiv(n_tiles, num_splits)
    t_lo = i_sp * per
    t_hi = tl.minimum(t_lo + per, n_tiles)

    # cached keys: the entries' pages laid end to end, PAGE_SIZE slots each
    for start in range(tl.minimum(t_lo, n_cached) * BLOCK_N, tl.minimum(t_hi, n_cached) * BLOCK_N,
                       BLOCK_N):
        b_k, b_v, b_kpos, m_n, partial = _load_page_tile(
            start, PageTable + i_b * stride_ptb, M, PageShift + i_b * stride_psb, stride_psm,
            K, V, KPos, PageLen, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs,
            stride_vh, stride_cpp, stride_cps, i_kvh, o_n, o_d, b_axis, NUM_AXES, HAS_SHIFT,
            PAGE_SIZE, BLOCK_N)
        b_qk = _rotated_scores(b_q, b_k, b_kpos, b_thi, b_tlo, DOT_PREC, FAST_TRIG)
        if partial:  # full tiles skip the select
            b_qk = tl.where(m_n[None, :], b_qk, float("-inf"))
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, b_qk, b_v, qk_scale, DOT_PREC)

    if HAS_NEW:
        acc, m_i, l_i = _attend_new_keys(
            acc, m_i, l_i, b_q, KNew, VNew, NewPos, i_b, i_kvh, i_m, o_m, o_n, o_d, N_new,
            stride_knb, stride_knn, stride_knh, stride_vnb, stride_vnn, stride_vnh, stride_npb,
            stride_npn, b_axis, b_thi, b_tlo, qk_scale, t_lo - n_cached, t_hi - n_cached,
            NUM_AXES, IS_CAUSAL, DOT_PREC, FAST_TRIG, BLOCK_M, BLOCK_N)
    if num_splits == 1:
        _store_out(Out, Lse, acc, m_i, l_i, i_b, i_h, o_m, o_d, m_m, stride_ob, stride_on,
                   stride_oh, stride_lb, stride_lh)
    else:
        store_part(OutPart, LsePart, acc, m_i, l_i, i_sp, i_bh, o_m, o_d, m_m, Nq, HEAD_DIM)


_paged_rope_attn_fwd_tuned = triton.autotune(
    configs=autotune_configs(), key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_configs})(_paged_rope_attn_fwd)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


def _last_contig(x: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels index the last dim with stride 1 (vectorised loads)."""
    if x is None or x.stride(-1) == 1:
        return x
    return x.contiguous()


def _same_strides(k: torch.Tensor, v: torch.Tensor):
    """The one-page key tiles address K and V with one set of row offsets (fewer registers
    held across the loop): pools with different layouts are made contiguous (a copy; the
    cache's pools are allocated alike, so this does not happen in the generator)."""
    k, v = _last_contig(k), _last_contig(v)
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return k, v


def launch_rope_attention(q, q_pos, table, *, cache=None, new=None, causal=False, scale=None,
                          out=None, lse=None, config=None):
    """Allocate outputs, build the grid and launch :func:`_paged_rope_attn_fwd`.

    Args:
        q: ``[B, Nq, Hq, D]``; q_pos ``[B, Nq, A]`` int; table: RopeTable with ``Hq`` rows.
        cache: ``None`` or ``(cache_k, cache_v, cache_pos, page_len, page_table, page_shift,
            S)``: pools ``[P, S, Hkv, D]``, positions ``[P, S, A]``, ``page_len [P]``,
            ``page_table [B, M]``, ``page_shift [B, M, A]`` or ``None``, and the page size
            ``S`` (a shape constant: part of the autotune key).
        new: ``None`` or ``(k_new, v_new, new_pos)``: ``[B, N_new, Hkv, D]`` and ``[B, N_new, A]``.
        out, lse: optional preallocated outputs ``[B, Nq, Hq, D]`` q.dtype / ``[B, Hq, Nq]`` fp32
            (tests pass NaN-filled buffers). config: ``{"BLOCK_M", "BLOCK_N"[, "num_warps",
            "num_stages"]}`` skips autotuning; ``{"num_splits": s}`` (alone or with tiles) sets
            the split-KV parts (:mod:`.triton_split`; default: :func:`num_splits_for` on a GPU,
            1 elsewhere).

    Returns:
        ``(out, lse)``.
    """
    B, Nq, Hq, D = q.shape
    A = q_pos.shape[-1]
    dev = q.device
    scale = D**-0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty_like(q)  # q's layout, as the custom op's fake implementation promises
        if out.stride(-1) != 1:
            out = torch.empty(q.shape, dtype=q.dtype, device=dev)
    if lse is None:
        lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=dev)
    if B * Nq * Hq == 0:
        return out, lse
    check_kernel_device(_paged_rope_attn_fwd, q)
    t = table.to(dev)
    turns = rope_turns(t.freqs)
    pair_axis = t.pair_axis.to(torch.int32)
    q, q_pos = _last_contig(q), _last_contig(q_pos)

    if cache is not None:
        cache_k, cache_v, cache_pos, page_len, page_table, page_shift, page_size = cache
        cache_k, cache_v = _same_strides(cache_k, cache_v)
        cache_pos = _last_contig(cache_pos)
        page_len, page_table = page_len.contiguous(), _last_contig(page_table)
        page_shift = _last_contig(page_shift)
        M = page_table.shape[1]
        Hkv = cache_k.shape[2]
    else:
        cache_k = cache_v = cache_pos = page_len = page_table = page_shift = None
        page_size, M = 16, 0  # no cache: any page size, the loop runs 0 times
    if new is not None:
        k_new, v_new, new_pos = map(_last_contig, new)
        N_new = k_new.shape[1]
        Hkv = k_new.shape[2]
    else:
        k_new = v_new = new_pos = None
        N_new = 0
    if cache is None and new is None:
        Hkv = Hq
    dummy = q  # pointer for absent tensors; never dereferenced (loops run zero times)

    def st(x, *dims):
        return [x.stride(d) if x is not None else 0 for d in dims]

    args = dict(
        Q=q, QPos=q_pos, K=cache_k if cache_k is not None else dummy,
        V=cache_v if cache_v is not None else dummy,
        KPos=cache_pos if cache_pos is not None else q_pos,
        PageLen=page_len if page_len is not None else q_pos,
        PageTable=page_table if page_table is not None else q_pos,
        PageShift=page_shift if page_shift is not None else q_pos,
        KNew=k_new if k_new is not None else dummy, VNew=v_new if v_new is not None else dummy,
        NewPos=new_pos if new_pos is not None else q_pos, Turns=turns, PairAxis=pair_axis,
        Out=out, Lse=lse,
    )
    strides = dict(zip(
        ["stride_qb", "stride_qn", "stride_qh", "stride_qpb", "stride_qpn",
         "stride_kp", "stride_ks", "stride_kh", "stride_vp", "stride_vs", "stride_vh",
         "stride_cpp", "stride_cps", "stride_ptb", "stride_psb", "stride_psm",
         "stride_knb", "stride_knn", "stride_knh", "stride_vnb", "stride_vnn", "stride_vnh",
         "stride_npb", "stride_npn", "stride_ob", "stride_on", "stride_oh", "stride_lb",
         "stride_lh"],
        st(q, 0, 1, 2) + st(q_pos, 0, 1) + st(cache_k, 0, 1, 2) + st(cache_v, 0, 1, 2)
        + st(cache_pos, 0, 1) + st(page_table, 0) + st(page_shift, 0, 1)
        + st(k_new, 0, 1, 2) + st(v_new, 0, 1, 2) + st(new_pos, 0, 1) + st(out, 0, 1, 2)
        + st(lse, 0, 1)))
    meta = dict(
        Nq=Nq, N_new=N_new, M=M, Hq=Hq, qk_scale=scale * LOG2E,
        HEAD_DIM=D, PAGE_SIZE=page_size, GROUP=Hq // Hkv, NUM_AXES=A,
        HAS_SHIFT=page_shift is not None,
        HAS_NEW=new is not None, IS_CAUSAL=bool(causal),
        # fp32: 3xTF32 tensor-core products, fp32-level accuracy ("ieee" FMA products spill)
        DOT_PREC="tf32x3" if q.dtype == torch.float32 else "tf32",
        FAST_TRIG=fast_trig(_paged_rope_attn_fwd),
    )
    cfg = dict(config) if config is not None else {}
    splits = cfg.pop("num_splits", None)
    if not cfg and is_interpreted(_paged_rope_attn_fwd):
        cfg = dict(INTERPRET_CONFIG)
    if splits is None:  # sized for the largest tiles; smaller ones only add programs
        key_tiles = triton.cdiv(M * page_size, 64) + triton.cdiv(N_new, 64)
        splits = num_splits_for(triton.cdiv(Nq, 128) * B * Hq, key_tiles, device_sms(dev))
    part = split_buffers(splits, B, Hq, Nq, D, dev) if splits > 1 else (lse, lse)
    args.update(OutPart=part[0], LsePart=part[1])
    meta["num_splits"] = splits
    if cfg:
        grid = (triton.cdiv(Nq, cfg["BLOCK_M"]), B * Hq, splits)
        _paged_rope_attn_fwd[grid](**args, **strides, **meta, **cfg)
    else:
        def grid(meta_):
            return (triton.cdiv(Nq, meta_["BLOCK_M"]), B * Hq, splits)
        _paged_rope_attn_fwd_tuned[grid](**args, **strides, **meta)
    if splits > 1:
        combine_splits(part[0], part[1], out, lse)
    return out, lse


# ---------------------------------------------------------------------------------------------
# public wrappers (validated by lol_kernels.attention.op / .dense)
# ---------------------------------------------------------------------------------------------


def _into(res, out, lse):
    """Copy a torch-path result into the caller's preallocated outputs, if any."""
    o, l = res
    if out is not None:
        o = out.copy_(o)
    if lse is not None:
        l = lse.copy_(l)
    return o, l


def paged_attention_triton(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, table, *,
                           k_new=None, v_new=None, causal=False, page_shift=None, scale=None,
                           out=None, lse=None, config=None):
    """Triton backend of :func:`lol_kernels.paged_attention` (same arguments and outputs).

    Inputs are assumed validated (``validate_paged_inputs``). fp64 inputs and head dims that
    are not a power of two in [16, 256] take the torch path (:func:`kernel_supports`). Extra
    keyword-only arguments: ``out``/``lse`` preallocated outputs and ``config`` fixed tiles,
    see :func:`launch_rope_attention`.

    Returns:
        ``out [B, Nq, Hq, D]`` in q.dtype, ``lse [B, Hq, Nq]`` fp32.
    """
    if not kernel_supports(q.dtype, q.shape[-1]):
        from .reference import paged_attention_torch
        return _into(paged_attention_torch(q, q_pos, cache_k, cache_v, cache_pos, page_len,
                                           page_table, table, k_new=k_new, v_new=v_new,
                                           causal=causal, page_shift=page_shift, scale=scale),
                     out, lse)
    cache = (cache_k, cache_v, cache_pos, page_len, page_table, page_shift, cache_k.shape[1])
    new = None if k_new is None else (k_new, v_new, q_pos)
    return launch_rope_attention(q, q_pos, table, cache=cache, new=new, causal=causal,
                                 scale=scale, out=out, lse=lse, config=config)


def rope_attention_triton(q, k, v, q_pos, k_pos, table, *, causal=False, scale=None, out=None,
                          lse=None, config=None):
    """Triton backend of :func:`lol_kernels.rope_attention` (dense K/V, no copy).

    The dense keys are the kernel's "new key" stream at ``k_pos``; ``causal`` means query ``i``
    sees keys ``j <= i`` (top-left aligned, as ``scaled_dot_product_attention(is_causal=True)``).
    """
    if not kernel_supports(q.dtype, q.shape[-1]):
        from .dense import rope_attention_torch
        return _into(rope_attention_torch(q, k, v, q_pos, k_pos, table, causal=causal,
                                          scale=scale), out, lse)
    return launch_rope_attention(q, q_pos, table, new=(k, v, k_pos), causal=causal, scale=scale,
                                 out=out, lse=lse, config=config)


def flops(Nq: int, Nk: int, Hq: int, D: int, B: int = 1) -> float:
    """Matmul FLOPs of one forward (``QK^T`` and ``PV``), as FlashAttention counts them."""
    return 4.0 * B * Hq * Nq * Nk * D


__all__ = ["CONFIGS", "flops", "launch_rope_attention", "paged_attention_triton",
           "rope_attention_triton"]
