"""Fused Triton backward of the dense :func:`lol_kernels.rope_attention`: FA2-style kernels with
the per-head jittered RoPE applied in registers, never written rotated.

Forward (per query head ``h``, KV head ``h // GROUP``): ``qr = R_h(q_pos) q``,
``kr = R_h(k_pos) k``, ``p = softmax(scale * qr . kr)`` (top-left causal mask optional),
``out = p v``, ``lse`` the natural log of the softmax denominator. Backward:

    delta = rowsum(dO * out) - dlse                     (:func:`rope_attn_bwd_preprocess`)
    p = exp2(qk_scale * qr . kr - lse * log2 e)          (recomputed from the forward's lse)
    dp = dO v^T,  ds = p * (dp - delta)                 (absorbs the lse gradient: d lse/ds = p)
    dq = scale * R_h^T (ds kr),  dk = scale * sum_h R_h^T (ds^T qr),  dv = sum_h p^T dO

* :func:`rope_attn_bwd_dq`: one program per ``BLOCK_M`` queries of one query head; the query
  tile is rotated once, every key tile is rotated with the query head's frequencies (as in
  the forward), ``dq`` is accumulated rotated in fp32 and un-rotated once at the end (the
  transpose of a rotation: the angle negated).
* :func:`rope_attn_bwd_dkdv`: one program per ``BLOCK_N`` keys and one *query* head ``h``;
  it rotates its key tile with head ``h``'s frequencies, accumulates ``dkr_h`` (and ``dv_h``)
  over the query tiles and un-rotates ``dkr_h`` with the same head's frequencies. With jitter
  inside a GQA group the heads' rotations differ, so the group is summed only after that:
  without GQA the program writes ``dk, dv`` directly; with GQA it writes fp32 parts
  ``[B, Nk, Hq, D]`` that the launcher sums over the group (a program looping over the
  group's heads must hold a second fp32 ``[BLOCK_N, D]`` accumulator and spills 440-1000 B
  at sm_90, whatever the tiles).

Angles are the forward's exact fixed-point phases (:mod:`lol_kernels.common.triton_rope`,
relative phases: the constant bias of every pair cancels in ``q . k`` and in ``R^T R``), with
the MUFU sin/cos on a GPU and the portable polynomials under ``TRITON_INTERPRET=1``. Causal
tiles that straddle the diagonal go through a masked loop of their own. Products take the
input dtype (fp32: 3xTF32), accumulation is fp32, every output element is written.

sm_90 compile (:mod:`.rope_attention_aot`, GQA 3, causal): fp16/bf16 at D = 64 and 128 spill
nothing in any offered config under Triton 3.6 and 3.9. bf16 D = 128 (3.9 / 3.6): dq
``M128-N32-w8`` 255 / 255 registers, 97 KB shared; dk/dv ``M16-N64-w8-s2`` 224 / 253
registers, 49 KB. The lean configs of fp32 and of D = 256
(:data:`LEAN_CONFIGS`) spill, as the forward's do; fp32 at D = 256 is refused.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_out_buffer
from .._dispatch import kernel_input_error, launch_device
from ..common.triton_attention import launch_constants, program_heads, program_tile
from ..common.triton_rope import (
    interleave,
    load_head_rope,
    load_pair_positions,
    rope_cos_sin,
    rope_rotate,
)
from ..common.triton_utils import (
    is_interpreted,
    kernel_supports,
    last_contig,
    stride_args,
)

# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

#: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the dq kernel: a wide query tile (rotated
#: once, held with the fp32 dq accumulator and dO), narrow key tiles streamed. Spill-free at
#: bf16 D = 128 under Triton 3.6 and 3.9 (M64-N64 spills 128 B under 3.6, one warpgroup
#: spills under both)
DQ_CONFIGS = [(128, 32, 8, 2), (64, 32, 8, 2)]
#: of the dk/dv kernel: the key tile (rotated once; fp32 dkr and dv accumulators), query
#: tiles of 16 streamed, two warpgroups. M32-N64 spills 32 B under Triton 3.6 (none under
#: 3.9), one warpgroup or 128 keys spill under both, 32 keys take no HGMMA
DKDV_CONFIGS = [(16, 64, 8, 2), (16, 64, 8, 3)]
#: rows of the delta/lse preprocess kernel per program
PRE_BLOCK_M = 64
#: tiles under TRITON_INTERPRET=1 (no autotuning there)
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}
#: shape constants the autotuned kernels are keyed on (never a token count)
AUTOTUNE_KEY = ["HEAD_DIM", "GROUP", "NUM_AXES", "IS_CAUSAL", "HAS_DO", "DOT_PREC"]
#: the configs where the lists above do not fit: fp32 (3xTF32 keeps split operands in
#: registers and shared memory) and D = 256. The fewest spills among those that fit sm_90's
#: shared memory (sm_90 compile, Triton 3.9; fp32 at D = 256 fits none: refused)
LEAN_CONFIGS = {
    ("fp32", 64): {"dq": [(128, 32, 8, 2)], "dkdv": [(32, 64, 8, 2)]},
    ("fp32", 128): {"dq": [(64, 32, 4, 1)], "dkdv": [(32, 64, 8, 2)]},
    ("fp32", 256): {"dq": [], "dkdv": []},
    ("half", 256): {"dq": [(64, 64, 8, 2)], "dkdv": [(32, 64, 8, 2)]},
}


def backward_configs(kernel: str, dtype: torch.dtype, head_dim: int) -> list[tuple]:
    """The configs the autotuner may pick for ``kernel`` (``"dq"`` or ``"dkdv"``) at ``dtype``
    and ``head_dim``: :data:`DQ_CONFIGS` / :data:`DKDV_CONFIGS` for fp16/bf16 at D <= 128
    (none spills at sm_90), :data:`LEAN_CONFIGS` otherwise (they spill: fp32 at D = 64
    0 / 152 B of stack, at D = 128 808 / 1160 B; fp16/bf16 at D = 256 320 / 624 B), nothing
    for fp32 at D = 256 (no config fits 227 KB of shared memory)."""
    kind = "fp32" if dtype == torch.float32 else "half"
    lean = LEAN_CONFIGS.get((kind, head_dim))
    if lean is not None:
        return list(lean[kernel])
    if kind == "fp32" and head_dim < 64:
        return list(LEAN_CONFIGS[("fp32", 64)][kernel])
    return list(DQ_CONFIGS if kernel == "dq" else DKDV_CONFIGS)


def backward_launchable(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the fused backward can launch for ``dtype`` inputs of ``head_dim`` on sm_90:
    a kernel-supported input (:func:`kernel_supports`) with configs that fit (not fp32 at
    D = 256, which the forward refuses too)."""
    return kernel_supports(dtype, head_dim) and bool(backward_configs("dq", dtype, head_dim))


def all_configs(kernel: str) -> list[tuple]:
    """Every config of ``kernel`` any dtype and head dim may use (the autotune list)."""
    main = DQ_CONFIGS if kernel == "dq" else DKDV_CONFIGS
    lean = [c for v in LEAN_CONFIGS.values() for c in v[kernel] if c not in main]
    return main + sorted(set(lean))


def _prune(kernel):
    """The autotuner's early pruning for ``kernel``: :func:`backward_configs` of the launch."""
    def prune(configs, named_args, **kwargs):
        args = {**kwargs, **named_args}
        keep = set(backward_configs(kernel, args["Q"].dtype, args["HEAD_DIM"]))
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                       c.num_stages) in keep]
    return prune


def _autotuned(kernel, configs, name):
    """``kernel`` autotuned over ``configs``, pruned per dtype and head dim, keyed on shape
    constants (:data:`AUTOTUNE_KEY`)."""
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                 for m, n, w, s in configs],
        key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune(name)})(kernel)


# ---------------------------------------------------------------------------------------------
# jit steps
# ---------------------------------------------------------------------------------------------


@triton.jit
def load_rows(X, i_b, i_h, o_r, m_r, o_d, stride_b, stride_n, stride_h):
    """Rows ``o_r`` (mask ``m_r``; others 0) of head ``i_h`` of ``X [B, R, H, D]``."""
    p_x = X + i_b * stride_b + o_r[:, None].to(tl.int64) * stride_n + i_h * stride_h \
        + o_d[None, :]
    return tl.load(p_x, mask=m_r[:, None], other=0.0)


@triton.jit
def row_cos_sin(XPos, i_b, o_r, m_r, stride_pb, stride_pn, b_axis, b_thi, b_tlo,
                NUM_AXES: tl.constexpr, FAST_TRIG: tl.constexpr):
    """``cos, sin [R, D/2]`` fp32 of rows ``o_r`` at their positions, one head's words
    ``b_thi, b_tlo [D/2]`` (relative phases, as the forward)."""
    b_pos = load_pair_positions(XPos + i_b * stride_pb + o_r * stride_pn, m_r, b_axis,
                                NUM_AXES, RELATIVE=True)
    return rope_cos_sin(b_pos, b_thi[None, :], b_tlo[None, :], FAST_TRIG, True)


@triton.jit
def load_rotated(X, XPos, i_b, i_h, o_r, m_r, o_d, stride_b, stride_n, stride_h, stride_pb,
                 stride_pn, b_axis, b_thi, b_tlo, NUM_AXES: tl.constexpr,
                 FAST_TRIG: tl.constexpr):
    """Rows of head ``i_h`` of ``X`` rotated with the words ``b_thi, b_tlo`` (those of the
    query head that reads them), in X's dtype for the tensor cores: ``[R, D]``."""
    b_x = load_rows(X, i_b, i_h, o_r, m_r, o_d, stride_b, stride_n, stride_h)
    cos, sin = row_cos_sin(XPos, i_b, o_r, m_r, stride_pb, stride_pn, b_axis, b_thi, b_tlo,
                           NUM_AXES, FAST_TRIG)
    xe, xo = rope_rotate(b_x, cos, sin)
    return interleave(xe, xo).to(X.dtype.element_ty)


@triton.jit
def unrotate_rows(x, XPos, i_b, o_r, m_r, stride_pb, stride_pn, b_axis, b_thi, b_tlo,
                  NUM_AXES: tl.constexpr, FAST_TRIG: tl.constexpr):
    """``R^T x`` for an fp32 gradient ``x [R, D]`` of rotated rows: the rotation by the
    negated angle, with the same phases as :func:`load_rotated`."""
    cos, sin = row_cos_sin(XPos, i_b, o_r, m_r, stride_pb, stride_pn, b_axis, b_thi, b_tlo,
                           NUM_AXES, FAST_TRIG)
    xe, xo = rope_rotate(x, cos, -sin)
    return interleave(xe, xo)


@triton.jit
def dq_tile(acc, b_qr, b_do, b_lse2, b_delta, K, V, KPos, i_b, i_kvh, start, o_m, o_n, o_d,
            Nk, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_kpb,
            stride_kpn, b_axis, b_thi, b_tlo, qk_scale, NUM_AXES: tl.constexpr,
            IS_CAUSAL: tl.constexpr, HAS_DO: tl.constexpr, MASKED: tl.constexpr,
            DOT_PREC: tl.constexpr, FAST_TRIG: tl.constexpr):
    """Fold key tile ``start`` into the rotated ``dq`` accumulator ``[BLOCK_M, D]`` fp32."""
    o_t = start + o_n
    m_t = o_t < Nk
    b_kr = load_rotated(K, KPos, i_b, i_kvh, o_t, m_t, o_d, stride_kb, stride_kn, stride_kh,
                        stride_kpb, stride_kpn, b_axis, b_thi, b_tlo, NUM_AXES, FAST_TRIG)
    b_s = tl.dot(b_qr, tl.trans(b_kr), input_precision=DOT_PREC)
    b_p = tl.exp2(b_s * qk_scale - b_lse2[:, None])  # padded rows: lse2 = +inf -> 0
    if MASKED:
        if IS_CAUSAL:  # j <= i and j < Nk in one compare
            m_vis = o_t[None, :] <= tl.minimum(o_m, Nk - 1)[:, None]
        else:
            m_vis = m_t[None, :]
        b_p = tl.where(m_vis, b_p, 0.0)
    if HAS_DO:
        b_v = load_rows(V, i_b, i_kvh, o_t, m_t, o_d, stride_vb, stride_vn, stride_vh)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
    else:
        b_ds = -b_p * b_delta[:, None]
    return tl.dot(b_ds.to(b_kr.dtype), b_kr, acc, input_precision=DOT_PREC)


@triton.jit
def dkdv_tile(dkr, dv, b_kr, b_v, Q, QPos, DOut, Lse2, Delta, i_b, i_h, row0, start, o_m0,
              o_t, o_d, N, stride_qb, stride_qn, stride_qh, stride_qpb, stride_qpn, stride_dob,
              stride_don, stride_doh, b_axis, b_thi, b_tlo, qk_scale, NUM_AXES: tl.constexpr,
              HAS_DO: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
              FAST_TRIG: tl.constexpr):
    """Fold query tile ``start`` of head ``i_h`` into its rotated ``dkr`` and into ``dv``
    (both ``[BLOCK_N, D]`` fp32); ``MASKED``: the tile straddles the causal diagonal."""
    o_m = start + o_m0
    m_m = o_m < N
    b_qr = load_rotated(Q, QPos, i_b, i_h, o_m, m_m, o_d, stride_qb, stride_qn, stride_qh,
                        stride_qpb, stride_qpn, b_axis, b_thi, b_tlo, NUM_AXES, FAST_TRIG)
    b_lse2 = tl.load(Lse2 + row0 + o_m, mask=m_m, other=float("inf"))
    b_delta = tl.load(Delta + row0 + o_m, mask=m_m, other=0.0)
    b_st = tl.dot(b_kr, tl.trans(b_qr), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
    b_pt = tl.exp2(b_st * qk_scale - b_lse2[None, :])
    if MASKED:
        b_pt = tl.where(o_t[:, None] <= o_m[None, :], b_pt, 0.0)
    if HAS_DO:
        b_do = load_rows(DOut, i_b, i_h, o_m, m_m, o_d, stride_dob, stride_don, stride_doh)
        dv = tl.dot(b_pt.to(b_do.dtype), b_do, dv, input_precision=DOT_PREC)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
    else:
        b_dst = -b_pt * b_delta[None, :]
    dkr = tl.dot(b_dst.to(b_qr.dtype), b_qr, dkr, input_precision=DOT_PREC)
    return dkr, dv


# ---------------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "stride_dlb", "stride_dlh", "stride_lb", "stride_lh"])
def rope_attn_bwd_preprocess(
    Out, DOut, DLse, Lse, Delta, Lse2,
    stride_ob, stride_on, stride_oh, stride_dob, stride_don, stride_doh,
    stride_dlb, stride_dlh, stride_lb, stride_lh,
    N, Hq,
    HEAD_DIM: tl.constexpr, HAS_DO: tl.constexpr, HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``Delta = rowsum(dO * out) - dlse`` and ``Lse2 = lse * log2 e`` (``+inf`` for rows
    that saw no key, so every recomputed ``p`` of theirs is 0), both ``[B * Hq, N]`` fp32."""
    i_bh, i_b, i_h, _ = program_heads(Hq, 1)
    _, o_m, _, o_d, m_m = program_tile(N, BLOCK_M, BLOCK_M, HEAD_DIM)
    b_delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_DO:
        b_o = load_rows(Out, i_b, i_h, o_m, m_m, o_d, stride_ob, stride_on, stride_oh)
        b_do = load_rows(DOut, i_b, i_h, o_m, m_m, o_d, stride_dob, stride_don, stride_doh)
        b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    if HAS_DLSE:
        b_delta -= tl.load(DLse + i_b * stride_dlb + i_h * stride_dlh + o_m, mask=m_m,
                           other=0.0).to(tl.float32)
    b_lse = tl.load(Lse + i_b * stride_lb + i_h * stride_lh + o_m, mask=m_m, other=0.0)
    b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
    row0 = i_bh.to(tl.int64) * N
    tl.store(Delta + row0 + o_m, b_delta, mask=m_m)
    tl.store(Lse2 + row0 + o_m, b_lse2, mask=m_m)


@triton.jit(do_not_specialize=["N", "Nk", "stride_qpb", "stride_kpb"])
def rope_attn_bwd_dq(
    Q, K, V, QPos, KPos, DOut, Lse2, Delta, Turns, PairAxis, DQ,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
    stride_vh, stride_qpb, stride_qpn, stride_kpb, stride_kpn, stride_dob, stride_don,
    stride_doh, stride_dqb, stride_dqn, stride_dqh,
    N, Nk, Hq, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, NUM_AXES: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DO: tl.constexpr, DOT_PREC: tl.constexpr,
    FAST_TRIG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dq`` of ``BLOCK_M`` queries of one query head (grid ``[cdiv(N, BLOCK_M), B * Hq]``)."""
    i_bh, i_b, i_h, i_kvh = program_heads(Hq, GROUP)
    i_m, o_m, o_n, o_d, m_m = program_tile(N, BLOCK_M, BLOCK_N, HEAD_DIM)
    b_axis, b_thi, b_tlo = load_head_rope(Turns, PairAxis, i_h, HEAD_DIM // 2)
    b_qr = load_rotated(Q, QPos, i_b, i_h, o_m, m_m, o_d, stride_qb, stride_qn, stride_qh,
                        stride_qpb, stride_qpn, b_axis, b_thi, b_tlo, NUM_AXES, FAST_TRIG)
    row0 = i_bh.to(tl.int64) * N
    b_lse2 = tl.load(Lse2 + row0 + o_m, mask=m_m, other=float("inf"))
    b_delta = tl.load(Delta + row0 + o_m, mask=m_m, other=0.0)
    if HAS_DO:
        b_do = load_rows(DOut, i_b, i_h, o_m, m_m, o_d, stride_dob, stride_don, stride_doh)
    else:
        b_do = tl.zeros([BLOCK_M, HEAD_DIM], dtype=Q.dtype.element_ty)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # keys [0, hi) are read; tiles below full_end are seen whole by every row (no mask)
    hi = Nk
    full_end = Nk
    if IS_CAUSAL:
        hi = tl.minimum(Nk, (i_m + 1) * BLOCK_M)
        full_end = tl.minimum(Nk, i_m * BLOCK_M + 1)
    n_full = (full_end // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc = dq_tile(acc, b_qr, b_do, b_lse2, b_delta, K, V, KPos, i_b, i_kvh, start, o_m,
                      o_n, o_d, Nk, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                      stride_vh, stride_kpb, stride_kpn, b_axis, b_thi, b_tlo, qk_scale,
                      NUM_AXES, IS_CAUSAL, HAS_DO, False, DOT_PREC, FAST_TRIG)
    for start in range(n_full, hi, BLOCK_N):
        acc = dq_tile(acc, b_qr, b_do, b_lse2, b_delta, K, V, KPos, i_b, i_kvh, start, o_m,
                      o_n, o_d, Nk, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                      stride_vh, stride_kpb, stride_kpn, b_axis, b_thi, b_tlo, qk_scale,
                      NUM_AXES, IS_CAUSAL, HAS_DO, True, DOT_PREC, FAST_TRIG)

    b_dq = unrotate_rows(acc, QPos, i_b, o_m, m_m, stride_qpb, stride_qpn, b_axis, b_thi,
                         b_tlo, NUM_AXES, FAST_TRIG) * sm_scale
    tl.store(DQ + i_b * stride_dqb + o_m[:, None].to(tl.int64) * stride_dqn + i_h * stride_dqh
             + o_d[None, :], b_dq.to(DQ.dtype.element_ty), mask=m_m[:, None])


@triton.jit(do_not_specialize=["N", "Nk", "stride_qpb", "stride_kpb"])
def rope_attn_bwd_dkdv(
    Q, K, V, QPos, KPos, DOut, Lse2, Delta, Turns, PairAxis, DK, DV,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
    stride_vh, stride_qpb, stride_qpn, stride_kpb, stride_kpn, stride_dob, stride_don,
    stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    N, Nk, Hq, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, NUM_AXES: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DO: tl.constexpr, DOT_PREC: tl.constexpr,
    FAST_TRIG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query head's share of ``dk, dv`` for ``BLOCK_N`` keys of its KV head (grid
    ``[cdiv(Nk, BLOCK_N), B * Hq]``): the key tile rotated with head ``h``'s frequencies,
    ``dkr`` accumulated over the query tiles and un-rotated with the same frequencies.
    ``GROUP == 1``: ``DK, DV`` are the outputs; otherwise fp32 parts ``[B, Nk, Hq, D]``
    that the launcher sums over the group (one program per KV head looping over its query
    heads holds a second fp32 accumulator and spills at sm_90)."""
    i_bh, i_b, i_h, i_kvh = program_heads(Hq, GROUP)
    i_n, o_t, o_m0, o_d, m_t = program_tile(Nk, BLOCK_N, BLOCK_M, HEAD_DIM)
    b_axis, b_thi, b_tlo = load_head_rope(Turns, PairAxis, i_h, HEAD_DIM // 2)
    b_kr = load_rotated(K, KPos, i_b, i_kvh, o_t, m_t, o_d, stride_kb, stride_kn, stride_kh,
                        stride_kpb, stride_kpn, b_axis, b_thi, b_tlo, NUM_AXES, FAST_TRIG)
    b_v = load_rows(V, i_b, i_kvh, o_t, m_t, o_d, stride_vb, stride_vn, stride_vh)
    dkr = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # causal: query tiles from the one holding row i_n * BLOCK_N; those below `mid` straddle
    # the diagonal (some row i < some key j of the tile) and are masked
    lo = 0
    mid = 0
    if IS_CAUSAL:
        lo = (i_n * BLOCK_N // BLOCK_M) * BLOCK_M
        mid = lo + tl.cdiv(i_n * BLOCK_N + BLOCK_N - 1 - lo, BLOCK_M) * BLOCK_M
    row0 = i_bh.to(tl.int64) * N
    for start in range(lo, tl.minimum(mid, N), BLOCK_M):
        dkr, dv = dkdv_tile(dkr, dv, b_kr, b_v, Q, QPos, DOut, Lse2, Delta, i_b, i_h, row0,
                            start, o_m0, o_t, o_d, N, stride_qb, stride_qn, stride_qh,
                            stride_qpb, stride_qpn, stride_dob, stride_don, stride_doh, b_axis,
                            b_thi, b_tlo, qk_scale, NUM_AXES, HAS_DO, True, DOT_PREC,
                            FAST_TRIG)
    for start in range(mid, N, BLOCK_M):
        dkr, dv = dkdv_tile(dkr, dv, b_kr, b_v, Q, QPos, DOut, Lse2, Delta, i_b, i_h, row0,
                            start, o_m0, o_t, o_d, N, stride_qb, stride_qn, stride_qh,
                            stride_qpb, stride_qpn, stride_dob, stride_don, stride_doh, b_axis,
                            b_thi, b_tlo, qk_scale, NUM_AXES, HAS_DO, False, DOT_PREC,
                            FAST_TRIG)

    # un-rotated with this head's own frequencies before the group is summed
    dk = unrotate_rows(dkr, KPos, i_b, o_t, m_t, stride_kpb, stride_kpn, b_axis, b_thi, b_tlo,
                       NUM_AXES, FAST_TRIG) * sm_scale
    i_oh = i_h if GROUP > 1 else i_kvh  # a part per query head, or the output itself
    o_row = o_t[:, None].to(tl.int64)
    tl.store(DK + i_b * stride_dkb + o_row * stride_dkn + i_oh * stride_dkh + o_d[None, :],
             dk.to(DK.dtype.element_ty), mask=m_t[:, None])
    tl.store(DV + i_b * stride_dvb + o_row * stride_dvn + i_oh * stride_dvh + o_d[None, :],
             dv.to(DV.dtype.element_ty), mask=m_t[:, None])


rope_attn_bwd_dq_tuned = _autotuned(rope_attn_bwd_dq, all_configs("dq"), "dq")
rope_attn_bwd_dkdv_tuned = _autotuned(rope_attn_bwd_dkdv, all_configs("dkdv"), "dkdv")


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


def _launch(kernel, tuned, grid_rows, rows_key, args, meta, config):
    """Launch ``kernel`` with fixed tiles (``config``, or the interpreter's) or ``tuned``;
    grid ``[cdiv(grid_rows, tile), programs]`` with ``tile`` the ``rows_key`` block."""
    rows, programs = grid_rows
    cfg = dict(config) if config else {}
    if not cfg and is_interpreted(kernel):
        cfg = dict(INTERPRET_CONFIG)
    if cfg:
        kernel[(triton.cdiv(rows, cfg[rows_key]), programs)](**args, **meta, **cfg)
    else:
        tuned[lambda m: (triton.cdiv(rows, m[rows_key]), programs)](**args, **meta)


def launch_backward(grad_out, grad_lse, q, k, v, q_pos, k_pos, table, out, lse, causal, scale,
                    dq, dk, dv, config=None):
    """Preprocess, then the dk/dv and dq kernels, on the current device (arguments as
    :func:`rope_attention_backward_triton`; ``dq, dk, dv`` allocated, written whole)."""
    B, N, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    dev = q.device
    const = launch_constants(rope_attn_bwd_dq, q, table, scale)  # RoPE words, qk_scale, ...
    turns, pair_axis = const.pop("Turns"), const.pop("PairAxis")
    q, k, v, q_pos, k_pos = map(last_contig, (q, k, v, q_pos, k_pos))
    has_do = grad_out is not None
    grad_out = last_contig(grad_out.to(q.dtype)) if has_do else None
    out = last_contig(out) if has_do else lse  # no dO: out is never read
    lse, grad_lse = last_contig(lse), last_contig(grad_lse)  # rows read with unit stride
    delta = torch.empty(B * Hq, N, dtype=torch.float32, device=dev)
    lse2 = torch.empty(B * Hq, N, dtype=torch.float32, device=dev)
    rope_attn_bwd_preprocess[(triton.cdiv(N, PRE_BLOCK_M), B * Hq)](
        out, grad_out if has_do else out, grad_lse if grad_lse is not None else lse, lse, delta,
        lse2,
        **stride_args((out, "stride_ob stride_on stride_oh"),
                      (grad_out, "stride_dob stride_don stride_doh"),
                      (grad_lse, "stride_dlb stride_dlh"), (lse, "stride_lb stride_lh")),
        N=N, Hq=Hq, HEAD_DIM=D, HAS_DO=has_do, HAS_DLSE=grad_lse is not None,
        BLOCK_M=PRE_BLOCK_M)

    args = dict(Q=q, K=k, V=v, QPos=q_pos, KPos=k_pos, DOut=grad_out if has_do else q,
                Lse2=lse2, Delta=delta, Turns=turns, PairAxis=pair_axis)
    strides = stride_args(
        (q, "stride_qb stride_qn stride_qh"), (k, "stride_kb stride_kn stride_kh"),
        (v, "stride_vb stride_vn stride_vh"), (q_pos, "stride_qpb stride_qpn"),
        (k_pos, "stride_kpb stride_kpn"), (grad_out, "stride_dob stride_don stride_doh"))
    meta = dict(N=N, Nk=Nk, Hq=Hq, sm_scale=scale, GROUP=Hq // Hkv, NUM_AXES=q_pos.shape[-1],
                IS_CAUSAL=bool(causal), HAS_DO=has_do, **const)
    if Nk:
        g = Hq // Hkv
        # GQA: each query head's share in fp32, summed over the group here
        dk_h, dv_h = (dk, dv) if g == 1 else (
            torch.empty(B, Nk, Hq, D, dtype=torch.float32, device=dev) for _ in range(2))
        _launch(rope_attn_bwd_dkdv, rope_attn_bwd_dkdv_tuned, (Nk, B * Hq), "BLOCK_N",
                dict(args, DK=dk_h, DV=dv_h, **strides,
                     **stride_args((dk_h, "stride_dkb stride_dkn stride_dkh"),
                                   (dv_h, "stride_dvb stride_dvn stride_dvh"))), meta, config)
        if g > 1:
            dk.copy_(dk_h.view(B, Nk, Hkv, g, D).sum(dim=3))
            dv.copy_(dv_h.view(B, Nk, Hkv, g, D).sum(dim=3))
    _launch(rope_attn_bwd_dq, rope_attn_bwd_dq_tuned, (N, B * Hq), "BLOCK_M",
            dict(args, DQ=dq, **strides, **stride_args((dq, "stride_dqb stride_dqn stride_dqh"))),
            meta, config)


# ---------------------------------------------------------------------------------------------
# public wrapper
# ---------------------------------------------------------------------------------------------


def _check_like(name, x, shape, dtype=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")


def rope_attention_backward_triton(grad_out, grad_lse, q, k, v, q_pos, k_pos, table, out, lse,
                                   *, causal=False, scale=None, dq=None, dk=None, dv=None,
                                   config=None):
    """Gradients of the dense :func:`lol_kernels.rope_attention` for ``q``, ``k`` and ``v``
    from the fused Triton kernels (recompute of ``p`` from the forward's ``lse``; module
    docstring for the formulas).

    Args:
        grad_out: ``[B, N, Hq, D]`` incoming gradient of ``out`` (cast to q's dtype), or
            ``None``.
        grad_lse: ``[B, Hq, N]`` fp32 incoming gradient of ``lse``, or ``None``.
        q: ``[B, N, Hq, D]`` un-rotated queries, fp16/bf16/fp32, a power-of-two D in [16, 256].
        k, v: ``[B, Nk, Hkv, D]`` un-rotated keys and values, q's dtype; query head ``h`` reads
            KV head ``h // (Hq // Hkv)``, its key rotated with head ``h``'s frequencies.
        q_pos: ``[B, N, A]`` int positions; k_pos: ``[B, Nk, A]`` int positions.
        table: :class:`~lol_kernels.rope.RopeTable` with ``Hq`` rows.
        out: ``[B, N, Hq, D]`` the forward's output (unused, may be ``None``, when
            ``grad_out`` is ``None``); lse: ``[B, Hq, N]`` fp32 its natural-log softmax
            denominator (``-inf`` for a row that sees no key).
        causal: query ``i`` sees keys ``j <= i`` (top-left aligned, as the forward).
        scale: softmax scale, default ``D ** -0.5``.
        dq, dk, dv: optional preallocated outputs (like q / like k; tests pass NaN-filled
            buffers); config: ``{"BLOCK_M", "BLOCK_N"[, "num_warps", "num_stages"]}`` fixed
            tiles for both kernels instead of autotuning.

    Returns:
        ``(dq, dk, dv)``: ``dq [B, N, Hq, D]`` in q's dtype, ``dk, dv [B, Nk, Hkv, D]`` in k's
        dtype; zeros where no gradient flows (``Nk = 0``, both incoming gradients ``None``).

    Example:
        >>> out, lse = rope_attention_triton(q, k, v, pos, pos, table)
        >>> dq, dk, dv = rope_attention_backward_triton(g, None, q, k, v, pos, pos, table,
        ...                                             out, lse, causal=False)
    """
    if not isinstance(q, torch.Tensor) or not backward_launchable(q.dtype, q.shape[-1]):
        if isinstance(q, torch.Tensor) and kernel_supports(q.dtype, q.shape[-1]):
            raise ValueError(f"q: no backward config fits sm_90's shared memory for {q.dtype} "
                             f"with D={q.shape[-1]} (run the torch-path backward)")
        raise kernel_input_error("rope_attention", "q", q)
    B, N, Hq, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != D or Hq % max(k.shape[2], 1):
        raise ValueError(f"k must be [B, Nk, Hkv, D] with Hq % Hkv == 0 for q {list(q.shape)},"
                         f" got {list(k.shape)}")
    _check_like("k", k, k.shape, q.dtype)
    _check_like("v", v, k.shape, q.dtype)
    if grad_out is not None:  # out only feeds delta = rowsum(dO * out)
        _check_like("out", out, q.shape, q.dtype)
    _check_like("lse", lse, (B, Hq, N), torch.float32)
    if grad_out is not None:
        _check_like("grad_out", grad_out, q.shape)
    if grad_lse is not None:
        _check_like("grad_lse", grad_lse, (B, Hq, N), torch.float32)
    dev = q.device
    check_out_buffer("dq", dq, q.shape, q.dtype, dev)
    check_out_buffer("dk", dk, k.shape, k.dtype, dev)
    check_out_buffer("dv", dv, k.shape, k.dtype, dev)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if dq is None else dq
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if dk is None else dk
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if dv is None else dv
    scale = D**-0.5 if scale is None else float(scale)
    if grad_out is None and grad_lse is None or B * Hq * D == 0 or N == 0:
        # nothing flows (or nothing to read): zeros, no launch
        return dq.zero_(), dk.zero_(), dv.zero_()
    with launch_device(q):
        launch_backward(grad_out, grad_lse, q, k, v, q_pos, k_pos, table, out, lse, causal,
                        scale, dq, dk, dv, config)
    return dq, dk, dv


__all__ = ["DKDV_CONFIGS", "DQ_CONFIGS", "INTERPRET_CONFIG", "LEAN_CONFIGS", "all_configs",
           "backward_configs", "backward_launchable", "launch_backward",
           "rope_attention_backward_triton", "rope_attn_bwd_dkdv", "rope_attn_bwd_dkdv_tuned",
           "rope_attn_bwd_dq", "rope_attn_bwd_dq_tuned", "rope_attn_bwd_preprocess"]
