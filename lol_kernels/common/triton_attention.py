"""The key-tile steps of the RoPE attention kernels (paged and MoC), their configs and precision.

Both kernels own ``BLOCK_M`` queries of one query head and stream key tiles through the same
steps, so a routing that selects every MoC chunk computes exactly what the paged kernel does:

* :func:`program_heads` / :func:`program_tile`: the program's batch row and heads, its row
  block and offsets (the backward kernels' too);
* :func:`start_program`: the head's frequency words, its query tile rotated once in registers
  (relative phases, :func:`lol_kernels.common.triton_rope.rope_phase`), the empty state;
* :func:`load_page_tile`: one key tile of a list of pages laid end to end (``PAGE_SIZE``
  slots each; one scalar page lookup when the tile lies in one page);
* :func:`rotated_scores`: the un-rotated key tile rotated in registers, raw ``q . k``;
* :func:`online_softmax`: base-2 online softmax with fp32 state and a lazy running max;
* :func:`attend_new_keys`: the block's own keys (all, or ``j <= i`` when causal);
* :func:`attend_page_tile`: the three above on one cached key tile (the paged loop's body);
* :func:`store_out` / :func:`normalize_rows`: the epilogue, ``out`` and the natural-log ``lse``.

One autotune list (:data:`CONFIGS`, :func:`autotuned`), one shared-memory estimate
(:func:`shared_memory_bytes`) behind the configs offered per dtype and head dim
(:func:`offered_configs`, the autotune pruning) and the refusal of inputs no config fits
(:func:`kernel_launchable`: the torch path runs them, with a warning), one fp32 product
precision (:func:`dot_precision`) and one set of launch constants (:func:`launch_constants`)
serve both kernels; the kernel files use them as ``triton_attention.<name>``.
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl

from .triton_rope import load_head_rope, load_pair_positions, rope_kernel_tables, rotate_tile
from .triton_utils import check_kernel_device, fast_trig, last_contig

# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634
#: base-2 headroom of the lazy running max (:func:`online_softmax`): p <= 2^8 between moves
RESCALE_SLACK = tl.constexpr(8.0)
#: start of the running max: finite, so no -inf - -inf to guard; below any real score, and
#: exp2(M_INIT - m) underflows to 0 when the first visible key moves it
M_INIT = tl.constexpr(-1.0e30)

#: (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may pick on a GPU (sm_90 compile,
#: tests/kernels/common/test_triton_aot.py). M128 with two warpgroups rotates each key tile
#: once for 128 queries (the fewest instructions per FLOP); M64 with one warpgroup fits two CTAs
#: per SM, whose softmax and tensor-core phases can interleave (more instructions per FLOP, less
#: idle issue: only a GPU run can rank them). BLOCK_N = 128 or 3 stages at BLOCK_M = 128 spill.
#: :func:`offered_configs` picks the ones a dtype and head dim may use.
CONFIGS = [
    (128, 64, 8, 2),
    (128, 32, 8, 2),
    (64, 64, 8, 2),
    (64, 64, 4, 2),
]
#: tiles used under TRITON_INTERPRET=1 (no autotuning there: it would time every config)
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}
#: shape constants an autotuned kernel is keyed on (never a token count); MoC adds its TILE
AUTOTUNE_KEY = ["HEAD_DIM", "PAGE_SIZE", "GROUP", "NUM_AXES", "HAS_SHIFT", "HAS_NEW",
                "IS_CAUSAL", "DOT_PREC"]
#: shared memory one CTA may use on sm_90 (H100/H200: 227 KiB), the limit without a device
SM90_SHARED_MEMORY = 232448
#: position bytes a key row takes in shared memory (three int32 axes)
POS_BYTES = 12
#: fixed shared memory of every config (reduction and barrier scratch; sm_90 compile)
SCRATCH_BYTES = 1060
#: the Triton ops whose kernels use these configs (``apply_rope`` has its own small tiles)
ATTENTION_OPS = ("paged_attention", "rope_attention", "moc_attention")


class KernelFallbackWarning(RuntimeWarning):
    """An attention input the Triton kernels cannot launch for (no config fits the device's
    shared memory) runs on the torch path instead."""


def shared_memory_bytes(block_m: int, block_n: int, num_stages: int, head_dim: int,
                        elem: int) -> int:
    """Shared memory of one CTA of the attention kernels (paged and MoC alike), in bytes, for
    inputs of ``elem`` bytes: the query tile (fp32 keeps it twice: the low half of the 3xTF32
    split), ``num_stages`` K and V tiles with their positions, and fixed scratch.

    The one estimate behind :func:`offered_configs`, the autotune pruning and the dispatcher's
    refusal (:func:`launch_refusal`). It equals what the sm_90 compile reports for every
    offered config (Triton 3.6 and 3.9; ``tests/kernels/common/test_triton_aot.py`` records the
    agreement) and errs high on the few others checked (``num_stages = 1``)."""
    q = block_m * head_dim * (2 * elem if elem == 4 else elem)
    kv = block_n * (2 * num_stages * head_dim * elem + POS_BYTES)
    return q + kv + SCRATCH_BYTES


def accumulator_words(config, head_dim: int) -> int:
    """fp32 words of the ``[BLOCK_M, D]`` accumulator each thread holds."""
    return config[0] * head_dim // (32 * config[2])


@functools.cache
def offered_configs(dtype: torch.dtype, head_dim: int,
                    shared_limit: int = SM90_SHARED_MEMORY) -> tuple[tuple[int, ...], ...]:
    """The :data:`CONFIGS` the autotuner may pick for ``dtype`` inputs of ``head_dim``: those
    whose :func:`shared_memory_bytes` fit ``shared_limit``; of these, the register-lean ones
    when any: for fp32, narrow key tiles (``BLOCK_N <= 32``: 3xTF32 holds split operands in
    registers); for fp16/bf16, an accumulator of at most 64 words a thread or narrow key tiles.
    Empty: nothing can launch (:func:`launch_refusal`). Cached: the dispatcher asks per call.

    At sm_90 this keeps every config for fp16/bf16 at D <= 128 (none spills), two at D = 256
    (stack bytes of the paged kernel, Triton 3.6 / 3.9: ``M128-N32-w8`` 240 / 168,
    ``M64-N64-w8`` 392 / 0; the other two spill 400-1800), ``M128-N32-w8`` for fp32 at
    D <= 128, and nothing for fp32 at D = 256 (every config needs 395-526 KB of shared
    memory). fp32 at D = 128 spills, 255 registers and 128-192 bytes of stack (3.9 / 3.6; MoC
    160 / 144): every tile, warp and stage count tried spills 80-784 bytes
    (``tests/kernels/common/test_triton_aot.py`` pins it). fp32 is the accuracy path, not the
    fast one."""
    elem = dtype.itemsize
    fits = [c for c in CONFIGS
            if shared_memory_bytes(c[0], c[1], c[3], head_dim, elem) <= shared_limit]
    lean = [c for c in fits if c[1] <= 32
            or (elem < 4 and accumulator_words(c, head_dim) <= 64)]
    return tuple(lean or fits)


def shared_memory_limit(device=None) -> int:
    """Shared memory a CTA may use on ``device`` (a CUDA device: asked of the driver once);
    :data:`SM90_SHARED_MEMORY` elsewhere, so the interpreter refuses what sm_90 would."""
    if device is None or torch.device(device).type != "cuda":
        return SM90_SHARED_MEMORY
    index = torch.device(device).index
    return device_shared_memory(torch.cuda.current_device() if index is None else index)


@functools.cache
def device_shared_memory(index: int) -> int:
    """The driver's opt-in shared memory limit of CUDA device ``index`` (cached: no sync)."""
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def launch_refusal(dtype: torch.dtype, head_dim: int, device=None) -> str | None:
    """Why the attention kernels cannot launch for ``dtype`` inputs of ``head_dim`` on
    ``device`` (no config fits its shared memory), or ``None`` when they can."""
    limit = shared_memory_limit(device)
    if offered_configs(dtype, head_dim, limit):
        return None
    elem = dtype.itemsize
    need = min(shared_memory_bytes(c[0], c[1], c[3], head_dim, elem) for c in CONFIGS)
    return (f"{str(dtype).replace('torch.', '')} inputs with head dim {head_dim} need at least "
            f"{need} bytes of shared memory per CTA, the device allows {limit}")


@torch.compiler.assume_constant_result
def kernel_launchable(op: str, dtype: torch.dtype, head_dim: int, device) -> bool:
    """Whether ``op``'s Triton kernel can launch for ``dtype`` inputs of ``head_dim`` on
    ``device`` (always, for ops outside :data:`ATTENTION_OPS`); when it cannot, one
    :class:`KernelFallbackWarning` per op and reason says the torch path runs instead. The
    dispatcher asks before choosing Triton (once per graph under ``torch.compile``)."""
    why = launch_refusal(dtype, head_dim, device) if op in ATTENTION_OPS else None
    if why is not None:
        warn_kernel_fallback(op, why)
    return why is None


@functools.cache
def warn_kernel_fallback(op: str, reason: str) -> None:
    """One warning per process, op and reason."""
    warnings.warn(f"lk.{op}: the Triton kernel cannot launch here ({reason}); running the "
                  f"torch path instead", KernelFallbackWarning, stacklevel=5)


def prune_configs(configs, named_args, **kwargs):
    """The autotuner's early pruning: keep the configs :func:`offered_configs` offers for the
    launch's ``Q`` dtype and ``HEAD_DIM`` on its device. Raises ``ValueError`` (before any
    launch, never Triton's OutOfResources) when none can launch: the public ops never get
    here with such inputs (:func:`kernel_launchable`), a direct kernel call can."""
    args = {**kwargs, **named_args}  # the launcher passes everything by keyword
    d = args.get("HEAD_DIM", 128)
    q = args.get("Q")
    dtype = q.dtype if q is not None else torch.float16
    limit = shared_memory_limit(q.device if q is not None else None)
    offered = set(offered_configs(dtype, d, limit))
    keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                   c.num_stages) in offered]
    if not keep:
        why = launch_refusal(dtype, d, q.device if q is not None else None)
        raise ValueError(f"the attention kernel cannot launch: {why or 'no offered config'}")
    return keep


def autotune_configs() -> list[triton.Config]:
    """:data:`CONFIGS` as ``triton.Config`` objects (``BLOCK_M``, ``BLOCK_N`` tiles)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in CONFIGS]


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' products for inputs of ``dtype``: fp32 takes
    3xTF32 tensor-core products (fp32-level accuracy; "ieee" FMA products spill at sm_90),
    fp16/bf16 the native tensor-core product ("tf32" is ignored for them)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# jit steps
# ---------------------------------------------------------------------------------------------


@triton.jit
def rotated_scores(b_q, b_k, b_pos, b_thi, b_tlo, DOT_PREC: tl.constexpr,
                   FAST_TRIG: tl.constexpr):
    """Rotate one un-rotated key tile ``b_k [BLOCK_N, D]`` in registers at its per-pair
    positions ``b_pos`` and return the raw scores ``q . k`` ``[BLOCK_M, BLOCK_N]`` fp32.
    ``b_q``: the rotated query tile (input dtype, relative phases: :func:`rope_phase`)."""
    # rotated pairs back in place (a register relabeling): one K = D product
    b_kr = rotate_tile(b_k, b_pos, b_thi, b_tlo, FAST_TRIG, True).to(b_q.dtype)
    return tl.dot(b_q, tl.trans(b_kr), input_precision=DOT_PREC)


@triton.jit
def online_softmax(acc, m_i, l_i, b_qk, b_v, qk_scale, DOT_PREC: tl.constexpr):
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
def program_heads(Hq, GROUP: tl.constexpr):
    """The heads of this program (grid axis 1 runs over ``B * Hq``): ``i_bh``, its batch row
    ``i_b`` (int64, for pointer offsets), query head ``i_h`` and KV head ``i_kvh``."""
    i_bh = tl.program_id(1)
    i_b = (i_bh // Hq).to(tl.int64)
    i_h = i_bh % Hq
    return i_bh, i_b, i_h, i_h // GROUP


@triton.jit
def program_tile(N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Row block ``i_m`` of this program (grid axis 0) and its offsets: its rows ``o_m
    [BLOCK_M]`` (mask ``m_m``: rows < ``N``), the rows ``o_n [BLOCK_N]`` of a tile of the
    other operand and the channels ``o_d [HEAD_DIM]``."""
    i_m = tl.program_id(0)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return i_m, o_m, tl.arange(0, BLOCK_N), tl.arange(0, HEAD_DIM), o_m < N


@triton.jit
def start_program(Q, QPos, Turns, PairAxis, i_b, i_h, o_m, m_m, o_d, stride_qb, stride_qn,
                  stride_qh, stride_qpb, stride_qpn, NUM_AXES: tl.constexpr,
                  FAST_TRIG: tl.constexpr):
    """Prologue shared by the paged and MoC kernels: head ``h``'s pair axes ``[D/2]`` and
    frequency words, its ``[BLOCK_M, D]`` query tile rotated once (relative phases, input
    dtype for the tensor cores), and the empty online-softmax state ``m_i, l_i, acc``."""
    HALF: tl.constexpr = o_d.shape[0] // 2
    b_axis, b_thi, b_tlo = load_head_rope(Turns, PairAxis, i_h, HALF)
    p_q = Q + i_b * stride_qb + o_m[:, None].to(tl.int64) * stride_qn + i_h * stride_qh \
        + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    b_qpos = load_pair_positions(QPos + i_b * stride_qpb + o_m * stride_qpn, m_m, b_axis,
                                 NUM_AXES, RELATIVE=True)
    b_q = rotate_tile(b_q, b_qpos, b_thi, b_tlo, FAST_TRIG, True).to(Q.dtype.element_ty)
    m_i = tl.full([o_m.shape[0]], M_INIT, dtype=tl.float32)
    l_i = tl.zeros([o_m.shape[0]], dtype=tl.float32)
    acc = tl.zeros([o_m.shape[0], o_d.shape[0]], dtype=tl.float32)
    return b_axis, b_thi, b_tlo, b_q, m_i, l_i, acc


@triton.jit
def load_page_tile(start, Entries, n_entries, Shifts, stride_se, K, V, KPos, PageLen,
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
def attend_page_tile(acc, m_i, l_i, b_q, start, Entries, n_entries, Shifts, stride_se, K, V,
                     KPos, PageLen, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs,
                     stride_vh, stride_cpp, stride_cps, i_kvh, o_n, o_d, b_axis, b_thi, b_tlo,
                     qk_scale, NUM_AXES: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     PAGE_SIZE: tl.constexpr, DOT_PREC: tl.constexpr, FAST_TRIG: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Fold key tile ``start`` of a page list (:func:`load_page_tile`, same arguments) into
    the online softmax state: rotated scores, the row mask on partial tiles only, softmax."""
    b_k, b_v, b_kpos, m_n, partial = load_page_tile(
        start, Entries, n_entries, Shifts, stride_se, K, V, KPos, PageLen, stride_kp, stride_ks,
        stride_kh, stride_vp, stride_vs, stride_vh, stride_cpp, stride_cps, i_kvh, o_n, o_d,
        b_axis, NUM_AXES, HAS_SHIFT, PAGE_SIZE, BLOCK_N)
    b_qk = rotated_scores(b_q, b_k, b_kpos, b_thi, b_tlo, DOT_PREC, FAST_TRIG)
    if partial:  # full tiles skip the select
        b_qk = tl.where(m_n[None, :], b_qk, float("-inf"))
    return online_softmax(acc, m_i, l_i, b_qk, b_v, qk_scale, DOT_PREC)


@triton.jit
def new_tile_scores(b_q, KNew, VNew, NewPos, i_b, i_kvh, start, o_n, o_d, N_new, stride_knb,
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
    return rotated_scores(b_q, b_k, b_pos, b_thi, b_tlo, DOT_PREC, FAST_TRIG), b_v, m_t


@triton.jit
def new_key_end(N_new, i_m, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """``(hi, full_end)``: the block's own keys a query tile reads (``[0, hi)``) and the end of
    those it sees whole (all its rows see them: no mask)."""
    hi = N_new
    full_end = N_new
    if IS_CAUSAL:  # keys past the tile's last query are masked for all of its rows
        hi = tl.minimum(N_new, (i_m + 1) * BLOCK_M)
        full_end = tl.minimum(N_new, i_m * BLOCK_M + 1)
    return hi, full_end


@triton.jit
def attend_new_keys(acc, m_i, l_i, b_q, KNew, VNew, NewPos, i_b, i_kvh, i_m, o_m, o_n,
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
    hi, full_end = new_key_end(N_new, i_m, IS_CAUSAL, BLOCK_M)
    n_full = full_end // BLOCK_N
    if not UNMASKED_LOOP:  # one loop, masked throughout (fewer registers live)
        n_full = 0
    # two loops, the unmasked one first: no per-tile mask work on the common path
    for start in range(tl.maximum(t_lo, 0) * BLOCK_N, tl.minimum(t_hi, n_full) * BLOCK_N,
                       BLOCK_N):
        b_qk, b_v, m_t = new_tile_scores(
            b_q, KNew, VNew, NewPos, i_b, i_kvh, start, o_n, o_d, N_new, stride_knb, stride_knn,
            stride_knh, stride_vnb, stride_vnn, stride_vnh, stride_npb, stride_npn, b_axis, b_thi,
            b_tlo, NUM_AXES, DOT_PREC, FAST_TRIG)
        acc, m_i, l_i = online_softmax(acc, m_i, l_i, b_qk, b_v, qk_scale, DOT_PREC)
    for start in range(tl.maximum(t_lo, n_full) * BLOCK_N,
                       tl.minimum(t_hi * BLOCK_N, hi), BLOCK_N):
        b_qk, b_v, m_t = new_tile_scores(
            b_q, KNew, VNew, NewPos, i_b, i_kvh, start, o_n, o_d, N_new, stride_knb, stride_knn,
            stride_knh, stride_vnb, stride_vnn, stride_vnh, stride_npb, stride_npn, b_axis, b_thi,
            b_tlo, NUM_AXES, DOT_PREC, FAST_TRIG)
        if IS_CAUSAL:  # j <= i and j < N_new in one compare
            m_vis = (start + o_n)[None, :] <= tl.minimum(o_m, N_new - 1)[:, None]
        else:
            m_vis = m_t[None, :]
        b_qk = tl.where(m_vis, b_qk, float("-inf"))
        acc, m_i, l_i = online_softmax(acc, m_i, l_i, b_qk, b_v, qk_scale, DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def normalize_rows(acc, m_i, l_i):
    """``out = acc / l`` (fp32) and the natural-log ``lse = (m + log2 l) ln 2`` of the online
    softmax state (base-2 ``m_i``); rows that saw no key (``l = 0``, ``acc = 0``) give 0 and
    ``-inf``. Shared by :func:`store_out` and the split-KV parts' epilogue."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    return (acc / l_safe[:, None],
            tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf")))


@triton.jit
def store_out(Out, Lse, acc, m_i, l_i, i_b, i_h, o_m, o_d, m_m, stride_ob, stride_on,
              stride_oh, stride_lb, stride_lh):
    """Epilogue: normalize and store ``out`` and the natural-log ``lse``; rows that saw no key
    have ``l_i = 0`` and ``acc = 0`` -> out 0, lse -inf."""
    b_o, b_lse = normalize_rows(acc, m_i, l_i)
    p_o = Out + i_b * stride_ob + o_m[:, None].to(tl.int64) * stride_on + i_h * stride_oh \
        + o_d[None, :]
    tl.store(p_o, b_o.to(Out.dtype.element_ty), mask=m_m[:, None])
    tl.store(Lse + i_b * stride_lb + i_h * stride_lh + o_m, b_lse, mask=m_m)


# ---------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------


def autotuned(kernel, *, key=(), prune=prune_configs):
    """``kernel`` autotuned over :data:`CONFIGS` (pruned by ``prune``), keyed on
    :data:`AUTOTUNE_KEY` plus the kernel's own shape constants ``key``."""
    return triton.autotune(configs=autotune_configs(), key=AUTOTUNE_KEY + list(key),
                           prune_configs_by={"early_config_prune": prune})(kernel)


def launch_constants(kernel, q: torch.Tensor, table, scale: float | None) -> dict:
    """Keyword arguments every attention launch passes alike, for ``q [B, N, Hq, D]``:
    ``Turns [Hq, D/2]`` int64 and ``PairAxis [D/2]`` int32 of the RopeTable ``table``,
    ``qk_scale`` (``scale``, default ``D**-0.5``, times log2 e: the softmax runs in base 2),
    ``HEAD_DIM``, ``DOT_PREC`` (:func:`dot_precision`) and ``FAST_TRIG``. Raises RuntimeError
    when a GPU-compiled ``kernel`` is given CPU tensors."""
    check_kernel_device(kernel, q)
    D = q.shape[-1]
    turns, pair_axis = rope_kernel_tables(table, q.device)
    scale = D**-0.5 if scale is None else float(scale)
    return dict(Turns=turns, PairAxis=pair_axis, qk_scale=scale * LOG2E, HEAD_DIM=D,
                DOT_PREC=dot_precision(q.dtype), FAST_TRIG=fast_trig(kernel))


def same_strides(k: torch.Tensor, v: torch.Tensor):
    """The one-page key tiles address K and V with one set of row offsets (fewer registers
    held across the loop): pools with different layouts are made contiguous (a copy; the
    cache's pools are allocated alike, so this does not happen in the generator)."""
    k, v = last_contig(k), last_contig(v)
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return k, v


__all__ = ["ATTENTION_OPS", "AUTOTUNE_KEY", "CONFIGS", "INTERPRET_CONFIG", "LOG2E", "M_INIT",
           "POS_BYTES", "RESCALE_SLACK", "SCRATCH_BYTES", "SM90_SHARED_MEMORY",
           "KernelFallbackWarning", "accumulator_words", "attend_new_keys", "attend_page_tile",
           "autotune_configs", "autotuned", "device_shared_memory", "dot_precision",
           "kernel_launchable", "launch_constants", "launch_refusal", "load_page_tile",
           "new_key_end", "new_tile_scores", "normalize_rows", "offered_configs",
           "online_softmax", "program_heads", "program_tile", "prune_configs",
           "rotated_scores", "same_strides", "shared_memory_bytes", "shared_memory_limit",
           "start_program", "store_out", "warn_kernel_fallback"]
