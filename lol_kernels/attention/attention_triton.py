"""Fused Triton kernel: per-head jittered RoPE in registers + paged sink/window attention.

One program owns ``BLOCK_M`` queries of one query head ``h`` and one split-KV part of their keys
(grid ``[cdiv(N, BLOCK_M), B*Hq, splits]``, :mod:`.attention_triton_split`; one part by default
off-GPU):

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
fixed-point turns (see :mod:`lol_kernels.common.triton_rope`), so positions up to 2^30 are
as accurate as the float64 reference. A row that sees no key gets ``out = 0``, ``lse = -inf``.
The per-tile steps (tile loads, rotated scores, online softmax, epilogue) are shared with the
MoC kernel: :mod:`lol_kernels.common.triton_attention`.

The same launcher serves the dense :func:`lol_kernels.rope_attention`: there the cache is empty
and the "new" keys are the dense K/V at ``k_pos`` (``N_new`` may differ from ``N``), zero-copy.

Cost model (sm_90 compile, ``benchmarks/kernel_report.py``): rotating keys in registers means
every query tile re-rotates every key tile it reads (``BLOCK_N * D / 2`` pairs: two selects
for the pair's axis, a 32-bit phase product, I2F, MUFU sin/cos, four FMAs, unpack/pack), so
the loop is bound by instruction issue, not by the tensor cores. What keeps the common path
short (``BLOCK_M = 128, BLOCK_N = 64``, D = 128: 1004 -> 685 SASS instructions per thread and
key tile; with two split-KV parts the prediction went 402 -> 633 TFLOP/s with perfect overlap,
445 if the softmax never overlaps a product, against 560 for the 70% goal):

* relative phases (``RELATIVE`` in :func:`lol_kernels.common.triton_rope.rope_phase`):
  positions biased by 2^31 per row, no sign fix-up per pair; page shifts added per row, not
  per pair;
* the rotated pairs re-interleaved in registers: one ``K = D`` product instead of two;
* one-page tiles address K/V/positions from a scalar base plus loop-invariant offsets;
* the partial-tile mask only on partial tiles (paged) or in a second loop (diagonal, last
  tile of the block's own keys);
* a lazy running max (``RESCALE_SLACK``): the accumulator is rescaled only when a row max
  grows by more than 2^8, a few tiles of a long stream.

Larger query tiles would amortize the rotation further but spill next to the
``[BLOCK_M, D]`` fp32 accumulator (M256 with 8 or 16 warps: 264-304 bytes of stack).

Rotate once (:mod:`.attention_triton_rotate`, the default when more than one query tile reads the
keys): a prologue rotates and packs every valid key once per call and query head (the same
operands, bit for bit), then a standard attention loop reads them: no RoPE MUFU, 361 / 373
SASS instructions a key tile at M128-N64-w8 / M64-N64-w4 (11.3 / 11.7 per query-key pair
against 21.4 / 34.0 here), 3 / 2 CTA-wide barriers against 5 / 5. The launcher's
``rope_keys`` option picks the path (:func:`launch_rope_attention`); this kernel stays for one
query tile, a scratch too large, and as the MoC kernel's per-tile steps.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._dispatch import kernel_input_error, launch_device
from ..common import triton_attention as ta
from ..common.triton_utils import (
    attention_outputs,
    is_interpreted,
    kernel_supports,
    last_contig,
    stride_args,
)
from .attention_triton_rotate import (
    choose_rope_keys,
    launch_rotated,
    paged_attn_rotated_fwd_tuned,
    rotate_keys,
    scratch_rows,
)
from .attention_triton_split import (
    combine_splits,
    device_sms,
    num_splits_for,
    split_buffers,
    store_part,
)

# ---------------------------------------------------------------------------------------------
# jit kernels (configs and steps: lol_kernels.common.triton_attention, shared with MoC)
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "N_new", "M", "stride_qpb", "stride_npb",
                               "stride_lb", "stride_lh", "stride_ptb", "stride_psb",
                               "num_splits"])
def paged_rope_attn_fwd(
    Q, QPos, K, V, KPos, PageLen, PageTable, PageShift, KNew, VNew, NewPos, Turns, PairAxis,
    Out, Lse, OutPart, LsePart,
    stride_qb, stride_qn, stride_qh, stride_qpb, stride_qpn,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_cpp, stride_cps,
    stride_ptb, stride_psb, stride_psm,
    stride_knb, stride_knn, stride_knh, stride_vnb, stride_vnn, stride_vnh, stride_npb,
    stride_npn,
    stride_ob, stride_on, stride_oh, stride_lb, stride_lh,
    N, N_new, M, Hq, qk_scale, num_splits,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, NUM_AXES: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_NEW: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr, FAST_TRIG: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_bh, i_b, i_h, i_kvh = ta.program_heads(Hq, GROUP)
    i_m, o_m, o_n, o_d, m_m = ta.program_tile(N, BLOCK_M, BLOCK_N, HEAD_DIM)
    b_axis, b_thi, b_tlo, b_q, m_i, l_i, acc = ta.start_program(
        Q, QPos, Turns, PairAxis, i_b, i_h, o_m, m_m, o_d, stride_qb, stride_qn, stride_qh,
        stride_qpb, stride_qpn, NUM_AXES, FAST_TRIG)

    # this part's key tiles [t_lo, t_hi): cached tiles first, then the block's own keys
    n_cached = tl.cdiv(M * PAGE_SIZE, BLOCK_N)
    n_tiles = n_cached
    if HAS_NEW:
        hi_new, _ = ta.new_key_end(N_new, i_m, IS_CAUSAL, BLOCK_M)
        n_tiles += tl.cdiv(hi_new, BLOCK_N)
    i_sp = tl.program_id(2)
    per = tl.cdiv(n_tiles, num_splits)
    t_lo = i_sp * per
    t_hi = tl.minimum(t_lo + per, n_tiles)

    # cached keys: the entries' pages laid end to end, PAGE_SIZE slots each
    for start in range(tl.minimum(t_lo, n_cached) * BLOCK_N, tl.minimum(t_hi, n_cached) * BLOCK_N,
                       BLOCK_N):
        acc, m_i, l_i = ta.attend_page_tile(
            acc, m_i, l_i, b_q, start, PageTable + i_b * stride_ptb, M,
            PageShift + i_b * stride_psb, stride_psm, K, V, KPos, PageLen, stride_kp, stride_ks,
            stride_kh, stride_vp, stride_vs, stride_vh, stride_cpp, stride_cps, i_kvh, o_n, o_d,
            b_axis, b_thi, b_tlo, qk_scale, NUM_AXES, HAS_SHIFT, PAGE_SIZE, DOT_PREC, FAST_TRIG,
            BLOCK_N)

    if HAS_NEW:
        acc, m_i, l_i = ta.attend_new_keys(
            acc, m_i, l_i, b_q, KNew, VNew, NewPos, i_b, i_kvh, i_m, o_m, o_n, o_d, N_new,
            stride_knb, stride_knn, stride_knh, stride_vnb, stride_vnn, stride_vnh, stride_npb,
            stride_npn, b_axis, b_thi, b_tlo, qk_scale, t_lo - n_cached, t_hi - n_cached,
            NUM_AXES, IS_CAUSAL, DOT_PREC, FAST_TRIG, BLOCK_M, BLOCK_N)
    if num_splits == 1:
        ta.store_out(Out, Lse, acc, m_i, l_i, i_b, i_h, o_m, o_d, m_m, stride_ob, stride_on,
                     stride_oh, stride_lb, stride_lh)
    else:
        store_part(OutPart, LsePart, acc, m_i, l_i, i_sp, i_bh, o_m, o_d, m_m, N, HEAD_DIM)


paged_rope_attn_fwd_tuned = ta.autotuned(paged_rope_attn_fwd)
#: the names the GPU check (shared/gpu-check, gc_bench.py / gc_sweep.py) reads off this module;
#: the tuned alias is the kernel a default launch at the Wan shape runs (keys rotated once)
CONFIGS = ta.CONFIGS
_paged_rope_attn_fwd_tuned = paged_attn_rotated_fwd_tuned


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


def launch_rope_attention(q, q_pos, table, *, cache=None, new=None, causal=False, scale=None,
                          out=None, lse=None, config=None):
    """Allocate outputs, build the grid and launch :func:`paged_rope_attn_fwd`.

    Args:
        q: ``[B, N, Hq, D]``; q_pos ``[B, N, A]`` int; table: RopeTable with ``Hq`` rows.
        cache: ``None`` or ``(cache_k, cache_v, cache_pos, page_len, page_table, page_shift,
            S)``: pools ``[P, S, Hkv, D]``, positions ``[P, S, A]``, ``page_len [P]``,
            ``page_table [B, M]``, ``page_shift [B, M, A]`` or ``None``, and the page size
            ``S`` (a shape constant: part of the autotune key).
        new: ``None`` or ``(k_new, v_new, new_pos)``: ``[B, N_new, Hkv, D]`` and ``[B, N_new, A]``.
        out, lse: optional preallocated outputs ``[B, N, Hq, D]`` q.dtype / ``[B, Hq, N]`` fp32
            on q's device, any strides with a unit last one (tests pass NaN-filled buffers;
            anything else raises ``ValueError``/``TypeError`` naming the buffer).
            config: ``{"BLOCK_M", "BLOCK_N"[, "num_warps", "num_stages"]}`` skips autotuning;
            ``{"num_splits": s}`` (alone or with tiles) sets the split-KV parts
            (:mod:`.attention_triton_split`; default: :func:`num_splits_for` on a GPU, 1
            elsewhere);
            ``{"rope_keys": "once" | "fused" | "auto"}`` rotates the keys once into a scratch
            before a plain paged loop (:mod:`.attention_triton_rotate`) or in the key loop
            (this kernel); ``"auto"`` (default):
            :func:`.attention_triton_rotate.choose_rope_keys`.

    Returns:
        ``(out, lse)``.
    """
    B, N, Hq, _ = q.shape
    out, lse = attention_outputs(q, out, lse)
    if B * N * Hq == 0:
        return out, lse
    with launch_device(q):
        launch_paged(q, q_pos, table, cache, new, causal, scale, out, lse, config)
    return out, lse


def launch_paged(q, q_pos, table, cache, new, causal, scale, out, lse, config):
    """The launch of :func:`launch_rope_attention` (arguments as there; outputs allocated),
    on the current device."""
    B, N, Hq, D = q.shape
    A = q_pos.shape[-1]
    dev = q.device
    consts = ta.launch_constants(paged_rope_attn_fwd, q, table, scale)
    q, q_pos = last_contig(q), last_contig(q_pos)

    if cache is not None:
        cache_k, cache_v, cache_pos, page_len, page_table, page_shift, page_size = cache
        cache_k, cache_v = ta.same_strides(cache_k, cache_v)
        cache_pos = last_contig(cache_pos)
        page_len, page_table = page_len.contiguous(), last_contig(page_table)
        page_shift = last_contig(page_shift)
        M = page_table.shape[1]
        Hkv = cache_k.shape[2]
    else:
        cache_k = cache_v = cache_pos = page_len = page_table = page_shift = None
        page_size, M = 16, 0  # no cache: any page size, the loop runs 0 times
    if new is not None:
        k_new, v_new, new_pos = map(last_contig, new)
        N_new = k_new.shape[1]
        Hkv = k_new.shape[2]
    else:
        k_new = v_new = new_pos = None
        N_new = 0
    if cache is None and new is None:
        Hkv = Hq
    dummy = q  # pointer for absent tensors; never dereferenced (loops run zero times)

    args = dict(
        Q=q, QPos=q_pos, K=cache_k if cache_k is not None else dummy,
        V=cache_v if cache_v is not None else dummy,
        KPos=cache_pos if cache_pos is not None else q_pos,
        PageLen=page_len if page_len is not None else q_pos,
        PageTable=page_table if page_table is not None else q_pos,
        PageShift=page_shift if page_shift is not None else q_pos,
        KNew=k_new if k_new is not None else dummy, VNew=v_new if v_new is not None else dummy,
        NewPos=new_pos if new_pos is not None else q_pos, Out=out, Lse=lse,
    )
    strides = stride_args(
        (q, "stride_qb stride_qn stride_qh"), (q_pos, "stride_qpb stride_qpn"),
        (cache_k, "stride_kp stride_ks stride_kh"), (cache_v, "stride_vp stride_vs stride_vh"),
        (cache_pos, "stride_cpp stride_cps"), (page_table, "stride_ptb"),
        (page_shift, "stride_psb stride_psm"), (k_new, "stride_knb stride_knn stride_knh"),
        (v_new, "stride_vnb stride_vnn stride_vnh"), (new_pos, "stride_npb stride_npn"),
        (out, "stride_ob stride_on stride_oh"), (lse, "stride_lb stride_lh"))
    meta = dict(
        N=N, N_new=N_new, M=M, Hq=Hq, PAGE_SIZE=page_size, GROUP=Hq // Hkv, NUM_AXES=A,
        HAS_SHIFT=page_shift is not None, HAS_NEW=new is not None, IS_CAUSAL=bool(causal),
        **consts,
    )
    cfg = dict(config) if config is not None else {}
    splits = cfg.pop("num_splits", None)
    Lc, L = scratch_rows(M, page_size, N_new)
    mode = choose_rope_keys(cfg.pop("rope_keys", "auto"), N, B, Hq, L, D, q.element_size())
    if not cfg and is_interpreted(paged_rope_attn_fwd):
        cfg = dict(ta.INTERPRET_CONFIG)
    if splits is None:  # sized for the largest tiles; smaller ones only add programs
        key_tiles = triton.cdiv(M * page_size, 64) + triton.cdiv(N_new, 64)
        splits = num_splits_for(triton.cdiv(N, 128) * B * Hq, key_tiles, device_sms(dev))
    part = split_buffers(splits, B, Hq, N, D, dev) if splits > 1 else (lse, lse)
    args.update(OutPart=part[0], LsePart=part[1])
    meta["num_splits"] = splits
    if cfg:
        grid = (triton.cdiv(N, cfg["BLOCK_M"]), B * Hq, splits)
    else:
        def grid(meta_):
            return (triton.cdiv(N, meta_["BLOCK_M"]), B * Hq, splits)
    if mode == "once":  # RoPE out of the key loop: one rotation per key and query head
        rotated = rotate_keys(args, strides, meta, B, Hq, Lc, L, page_len, page_table)
        launch_rotated(args, strides, meta, cfg, grid, rotated)
    elif cfg:
        paged_rope_attn_fwd[grid](**args, **strides, **meta, **cfg)
    else:
        paged_rope_attn_fwd_tuned[grid](**args, **strides, **meta)
    if splits > 1:
        combine_splits(part[0], part[1], out, lse)


# ---------------------------------------------------------------------------------------------
# public wrappers (validated by lol_kernels.attention.paged_attention_op / .rope_attention_op)
# ---------------------------------------------------------------------------------------------


def paged_attention_triton(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, table, *,
                           k_new=None, v_new=None, causal=False, page_shift=None, scale=None,
                           out=None, lse=None, config=None):
    """Triton backend of :func:`lol_kernels.paged_attention` (same arguments and outputs).

    Inputs are assumed validated (``validate_paged_inputs``) and supported by the kernel:
    fp16/bf16/fp32 with a power-of-two head dim in [16, 256] (:func:`kernel_supports`; the
    public op sends anything else to the torch path, a direct call raises). Extra
    keyword-only arguments: ``out``/``lse`` preallocated outputs and ``config`` fixed tiles,
    see :func:`launch_rope_attention`.

    Returns:
        ``out [B, N, Hq, D]`` in q.dtype, ``lse [B, Hq, N]`` fp32.
    """
    if not kernel_supports(q.dtype, q.shape[-1]):
        raise kernel_input_error("paged_attention", "q", q)
    cache = (cache_k, cache_v, cache_pos, page_len, page_table, page_shift, cache_k.shape[1])
    new = None if k_new is None else (k_new, v_new, q_pos)
    return launch_rope_attention(q, q_pos, table, cache=cache, new=new, causal=causal,
                                 scale=scale, out=out, lse=lse, config=config)


def rope_attention_triton(q, k, v, q_pos, k_pos, table, *, causal=False, scale=None, out=None,
                          lse=None, config=None):
    """Triton backend of :func:`lol_kernels.rope_attention` (dense K/V, no copy).

    The dense keys are the kernel's "new key" stream at ``k_pos``; ``causal`` means query ``i``
    sees keys ``j <= i`` (top-left aligned, as ``scaled_dot_product_attention(is_causal=True)``).
    Inputs as :func:`paged_attention_triton` (validated, supported by the kernel).
    """
    if not kernel_supports(q.dtype, q.shape[-1]):
        raise kernel_input_error("rope_attention", "q", q)
    return launch_rope_attention(q, q_pos, table, new=(k, v, k_pos), causal=causal, scale=scale,
                                 out=out, lse=lse, config=config)


__all__ = ["launch_rope_attention", "paged_attention_triton", "paged_rope_attn_fwd",
           "paged_rope_attn_fwd_tuned", "rope_attention_triton"]
