"""Rotate once per call: RoPE taken out of the paged kernel's key loop.

The fused kernel (:mod:`.attention_triton`) rotates every key tile in registers for every query
tile that reads it: ``cdiv(N, BLOCK_M)`` times per key and query head, with MUFU sin/cos and a
dozen integer/float instructions per pair inside the key loop. Here the keys are rotated once:

1. :func:`rotate_keys_fwd` walks the page table (and the block's own keys) once. Every valid
   cached key goes rotated into a scratch ``k_rot [B, Hq, L, D]`` in the input dtype, packed:
   entry ``e``'s slots land at row ``row_off[b, e]`` (prefix sums of the entries' lengths,
   :func:`packed_rows`), so rows ``[0, n_valid[b])`` hold exactly the cached keys a batch
   row sees, in page-table order, and the ``N_new`` new keys follow; the values go to
   ``v_rot [B, Hkv, L, D]`` at the same rows; rows past them (to ``L``, padded to
   :data:`ROW_ALIGN`) are zeroed. A key is rotated exactly as the fused kernel rotates it in
   registers (relative phases of ``stored + page_shift`` biased by 2^31, the *query head's*
   frequencies, fp32 rotation cast to the input dtype), so the products' operands are
   bit-identical;
2. :func:`paged_attn_rotated_fwd` is then a standard attention loop over one packed sequence
   per batch row: no positions, no page table, no trigonometry; unmasked K/V tile loads, the
   score mask only on the last tiles (the end of the keys; the diagonal of the block's own
   keys when causal: a causal mask aligned ``n_valid`` keys down), and an online softmax
   whose lazy rescale is decided per row (:func:`online_softmax_rows`: no CTA-wide
   reduction).

One key copy per query head because the frequencies are per query head (jitter inside a GQA
group stays exactly relative). Extra traffic at the Wan shape: K and V read once more and
written packed (4 x ~58 MB, 78 us at 3 TB/s against ~0.8 ms of attention). The launcher
(:func:`.attention_triton.launch_paged`) picks this path when more than one query tile reads every
key (``N >= ONCE_MIN_QUERIES``) and the scratch stays under :data:`SCRATCH_LIMIT`
(:func:`choose_rope_keys`); the fused path stays for a single query tile and for the MoC
kernel, whose routed chunks differ per query tile. ``benchmarks/kernel_report.py`` compares
both with the static sm_90 model (sm_90, bf16, D = 128: 11.3 / 11.7 instructions per query-key
pair at M128-N64-w8 / M64-N64-w4 against the fused 21.4, MUFU only for the softmax's exp2,
3 / 2 CTA-wide barriers a key tile against 5).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import triton_attention as ta
from ..common.triton_rope import load_head_rope, load_pair_positions, rotate_tile
from .attention_triton_split import store_part

#: scratch rows are padded to a multiple of this: every key tile (``BLOCK_N`` divides it)
#: reads written rows (zeros past the keys), so K/V loads need no mask
ROW_ALIGN = 128
#: warps of :func:`rotate_keys_fwd`; its rows per program: :func:`rotate_rows`
NUM_WARPS = 4
#: largest rotated-key scratch (bytes) the launcher allocates; beyond it the fused path runs
SCRATCH_LIMIT = 1 << 31
#: query tiles a key must be read by for the rotate-once path to pay (largest BLOCK_M)
ONCE_MIN_QUERIES = 129
ROPE_KEYS = ("auto", "once", "fused")


def rotated_shared_memory_bytes(block_m: int, block_n: int, num_stages: int, num_warps: int,
                                head_dim: int, elem: int) -> int:
    """Shared memory of one CTA of :func:`paged_attn_rotated_fwd`, in bytes (equal to the sm_90
    compile for every config of ``tests/kernels/common/test_triton_aot.py``): the query tile
    (twice for fp32: the low half of 3xTF32), ``num_stages`` K and V tiles (no positions, unlike
    :func:`lol_kernels.common.triton_attention.shared_memory_bytes`), the ``P`` tile when two
    warpgroups share 64 query rows (``P V`` then takes P from shared memory), 1 KiB scratch."""
    q = block_m * head_dim * (2 * elem if elem == 4 else elem)
    kv = 2 * num_stages * block_n * head_dim * elem
    p = block_m * block_n * elem if num_warps // 4 > block_m // 64 else 0
    return q + kv + p + 1024


def prune_rotated(configs, named_args, **kwargs):
    """The autotuner's pruning for :func:`paged_attn_rotated_fwd`: the configs
    :func:`lol_kernels.common.triton_attention.prune_configs` offers whose
    :func:`rotated_shared_memory_bytes` fit the device too (all of them at sm_90 today)."""
    keep = ta.prune_configs(configs, named_args, **kwargs)
    args = {**kwargs, **named_args}
    q = args.get("Q")
    elem = q.dtype.itemsize if q is not None else 2
    limit = ta.shared_memory_limit(q.device if q is not None else None)
    fits = [c for c in keep if rotated_shared_memory_bytes(
        c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, c.num_warps,
        args.get("HEAD_DIM", 128), elem) <= limit]
    return fits or keep[-1:]


def rotate_rows(head_dim: int, elem: int) -> int:
    """Rows per program of :func:`rotate_keys_fwd` for ``elem``-byte inputs: ``4096 / (D *
    max(elem, 2))`` in ``[8, 32]`` (16 for bf16 at D = 128: 156 registers at sm_90, no
    spill; 32 rows spill there)."""
    return min(32, max(8, 4096 // (head_dim * max(elem, 2))))


def scratch_rows(M: int, page_size: int, N_new: int) -> tuple[int, int]:
    """``(Lc, L)``: the cached slots ``M * S`` (source rows ``[0, Lc)`` of the prologue, the
    new keys after them) and the scratch rows, ``Lc + N_new`` padded to :data:`ROW_ALIGN`."""
    lc = M * page_size
    return lc, triton.cdiv(lc + N_new, ROW_ALIGN) * ROW_ALIGN


def choose_rope_keys(rope_keys: str, N: int, B: int, Hq: int, L: int, D: int, elem: int) -> str:
    """``"once"`` or ``"fused"`` for a launch of ``N`` queries over ``L`` scratch rows:
    ``rope_keys`` unless ``"auto"``; auto rotates once when more than one query tile reads
    every key (``N >= ONCE_MIN_QUERIES``) and ``[B, Hq, L, D]`` fits :data:`SCRATCH_LIMIT`.
    Raises ``ValueError`` naming ``rope_keys`` for any other value."""
    if rope_keys not in ROPE_KEYS:
        raise ValueError(f"rope_keys must be one of {ROPE_KEYS}, got {rope_keys!r}")
    if rope_keys != "auto":
        return rope_keys
    small = B * Hq * L * D * elem <= SCRATCH_LIMIT
    return "once" if N >= ONCE_MIN_QUERIES and small and L > 0 else "fused"


# ---------------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M", "N_new", "Lc", "stride_npb", "stride_rb", "stride_wb",
                               "stride_rob"])
def rotate_keys_fwd(
    K, V, KPos, PageLen, PageTable, PageShift, RowOff, NValid, KNew, VNew, NewPos, Turns,
    PairAxis, KRot, VRot,
    stride_kp, stride_ks, stride_kh, stride_cpp, stride_cps, stride_ptb, stride_psb, stride_psm,
    stride_rob, stride_knb, stride_knn, stride_knh, stride_vnb, stride_vnn, stride_vnh,
    stride_npb, stride_npn, stride_rb, stride_rh,
    stride_wb, stride_wh,
    M, N_new, Lc, Hq,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr,
    NUM_AXES: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_NEW: tl.constexpr,
    FAST_TRIG: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Source rows ``[i_r * BLOCK_R, +BLOCK_R)`` of batch row ``b`` for query head ``h``
    (grid ``[L / BLOCK_R, B * Hq]``): row ``r < Lc = M * S`` is entry ``r // S``'s slot
    ``r % S``; a valid one goes rotated to ``KRot[b, h, RowOff[b, e] + r % S]`` (its value to
    ``VRot[b, h // GROUP]`` at the same row, from the group's first head); row ``r >= Lc`` is
    new key ``t = r - Lc``, packed at ``NValid[b] + t``; rows ``r`` past all keys are
    zeroed."""
    i_r = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // Hq).to(tl.int64)
    i_h = i_bh % Hq
    i_kvh = i_h // GROUP
    HALF: tl.constexpr = HEAD_DIM // 2
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_d = tl.arange(0, HEAD_DIM)
    b_axis, b_thi, b_tlo = load_head_rope(Turns, PairAxis, i_h, HALF)
    p_kr = KRot + i_b * stride_rb + i_h * stride_rh + o_d[None, :]

    # cached slots: the same validity, addresses and positions as ta.load_page_tile
    o_e = o_r // PAGE_SIZE
    o_s = o_r % PAGE_SIZE
    m_e = o_e < M
    b_page = tl.load(PageTable + i_b * stride_ptb + o_e, mask=m_e, other=-1)
    b_len = tl.load(PageLen + b_page, mask=b_page >= 0, other=0)
    m_n = o_s < b_len
    o_pg = tl.where(m_n, b_page, 0).to(tl.int64)
    o_kv = o_pg[:, None] * stride_kp + o_s[:, None] * stride_ks + i_kvh * stride_kh \
        + o_d[None, :]
    b_k = tl.load(K + o_kv, mask=m_n[:, None], other=0.0)
    b_pos = load_pair_positions(KPos + o_pg * stride_cpp + o_s * stride_cps, m_n, b_axis,
                                NUM_AXES, PageShift + i_b * stride_psb + o_e * stride_psm, m_n,
                                HAS_SHIFT, True)
    b_kr = rotate_tile(b_k, b_pos, b_thi, b_tlo, FAST_TRIG, True).to(KRot.dtype.element_ty)
    o_dst = (tl.load(RowOff + i_b * stride_rob + o_e, mask=m_n, other=0) + o_s).to(tl.int64)
    tl.store(p_kr + o_dst[:, None] * HEAD_DIM, b_kr, mask=m_n[:, None])
    i_valid = tl.load(NValid + i_b)
    p_vr = VRot + i_b * stride_wb + i_kvh * stride_wh + o_d[None, :]
    if i_h % GROUP == 0:  # one value copy per KV head
        b_v = tl.load(V + o_kv, mask=m_n[:, None], other=0.0)
        tl.store(p_vr + o_dst[:, None] * HEAD_DIM, b_v, mask=m_n[:, None])
    n_keys = i_valid
    if HAS_NEW:  # the block's own keys at their positions (as ta.new_tile_scores), packed next
        o_t = o_r - Lc
        m_t = (o_t >= 0) & (o_t < N_new)
        o_tl = o_t[:, None].to(tl.int64)
        p_kn = KNew + i_b * stride_knb + o_tl * stride_knn + i_kvh * stride_knh + o_d[None, :]
        b_kn = tl.load(p_kn, mask=m_t[:, None], other=0.0)
        b_pn = load_pair_positions(NewPos + i_b * stride_npb + o_t * stride_npn, m_t, b_axis,
                                   NUM_AXES, RELATIVE=True)
        b_kr = rotate_tile(b_kn, b_pn, b_thi, b_tlo, FAST_TRIG, True).to(KRot.dtype.element_ty)
        o_new = (i_valid + o_t).to(tl.int64)
        tl.store(p_kr + o_new[:, None] * HEAD_DIM, b_kr, mask=m_t[:, None])
        if i_h % GROUP == 0:
            p_vn = VNew + i_b * stride_vnb + o_tl * stride_vnn + i_kvh * stride_vnh \
                + o_d[None, :]
            b_vn = tl.load(p_vn, mask=m_t[:, None], other=0.0)
            tl.store(p_vr + o_new[:, None] * HEAD_DIM, b_vn, mask=m_t[:, None])
        n_keys += N_new
    # rows past the keys read 0 (the last key tile of the loop reads them unmasked)
    m_z = o_r >= n_keys
    zero = tl.zeros([BLOCK_R, HEAD_DIM], dtype=KRot.dtype.element_ty)
    tl.store(p_kr + o_r[:, None].to(tl.int64) * HEAD_DIM, zero, mask=m_z[:, None])
    if i_h % GROUP == 0:
        tl.store(p_vr + o_r[:, None].to(tl.int64) * HEAD_DIM, zero, mask=m_z[:, None])


@triton.jit
def online_softmax_rows(acc, m_i, l_i, b_qk, b_v, qk_scale, DOT_PREC: tl.constexpr):
    """:func:`lol_kernels.common.triton_attention.online_softmax` with the lazy running max
    decided per row instead of per CTA: a row's max moves only when its tile max exceeds it by
    more than ``RESCALE_SLACK`` (``p <= 2^8`` in between, as there), and the accumulator is
    multiplied by the row's factor (1 when it did not move) on every tile. No CTA-wide
    reduction (a barrier pair per key tile); sm_90, M128-N64: 23 fewer instructions."""
    m_ij = tl.max(b_qk, 1) * qk_scale
    m_new = tl.where(m_ij > m_i + ta.RESCALE_SLACK, m_ij, m_i)
    alpha = tl.exp2(m_i - m_new)
    b_p = tl.exp2(b_qk * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(b_p, 1)
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def attend_rotated_keys(acc, m_i, l_i, b_q, KRot, VRot, o_m, o_n, o_d, n_keys, vis_end,
                        full_end, qk_scale, t_lo, t_hi, DOT_PREC: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Key tiles ``[t_lo, t_hi)`` of the packed rows of ``KRot``/``VRot [L, D]``: unmasked
    loads (rows past ``n_keys`` are 0); the tiles past ``full_end`` (keys some query row does
    not see) mask row ``i``'s scores to keys ``< vis_end[i]``."""
    HEAD_DIM: tl.constexpr = o_d.shape[0]
    p_k = KRot + o_n[:, None] * HEAD_DIM + o_d[None, :]
    p_v = VRot + o_n[:, None] * HEAD_DIM + o_d[None, :]
    for start in range(t_lo * BLOCK_N, t_hi * BLOCK_N, BLOCK_N):
        b_k = tl.load(p_k + start * HEAD_DIM)
        b_v = tl.load(p_v + start * HEAD_DIM)
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
        if start + BLOCK_N > full_end:  # the last tiles only: a scalar test on the others
            b_qk = tl.where((start + o_n)[None, :] < vis_end[:, None], b_qk, float("-inf"))
        acc, m_i, l_i = online_softmax_rows(acc, m_i, l_i, b_qk, b_v, qk_scale, DOT_PREC)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["N", "N_new", "M", "stride_qpb", "stride_rb", "stride_wb",
                               "stride_lb", "stride_lh", "num_splits"])
def paged_attn_rotated_fwd(
    Q, QPos, KRot, VRot, NValid, Turns, PairAxis,
    Out, Lse, OutPart, LsePart,
    stride_qb, stride_qn, stride_qh, stride_qpb, stride_qpn, stride_rb, stride_rh,
    stride_wb, stride_wh, stride_ob, stride_on, stride_oh, stride_lb, stride_lh,
    N, N_new, M, Hq, qk_scale, num_splits,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, NUM_AXES: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_NEW: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr, FAST_TRIG: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Attention over the keys :func:`rotate_keys_fwd` rotated and packed: the fused kernel's
    grid, split-KV parts and epilogue, the query tile rotated once in the prologue, then a
    plain key loop (no positions, no page table, no trigonometry). ``PAGE_SIZE`` and
    ``HAS_SHIFT`` are unused here (autotune keys shared with the fused kernel)."""
    i_bh, i_b, i_h, i_kvh = ta.program_heads(Hq, GROUP)
    i_m, o_m, o_n, o_d, m_m = ta.program_tile(N, BLOCK_M, BLOCK_N, HEAD_DIM)
    b_axis, b_thi, b_tlo, b_q, m_i, l_i, acc = ta.start_program(
        Q, QPos, Turns, PairAxis, i_b, i_h, o_m, m_m, o_d, stride_qb, stride_qn, stride_qh,
        stride_qpb, stride_qpn, NUM_AXES, FAST_TRIG)
    # the packed keys: n_valid cached ones, then N_new own ones (j <= i when causal: the
    # diagonal runs n_valid rows down, as a bottom-right aligned causal mask per batch row)
    n_valid = tl.load(NValid + i_b, mask=M > 0, other=0)
    n_keys = n_valid
    vis_end = tl.full([BLOCK_M], 0, tl.int32) + n_keys
    if HAS_NEW:
        n_keys += N_new
        vis_end = tl.full([BLOCK_M], 0, tl.int32) + n_keys
        hi = n_keys
        full_end = n_keys
        if IS_CAUSAL:
            hi = n_valid + tl.minimum(N_new, (i_m + 1) * BLOCK_M)
            full_end = n_valid + tl.minimum(N_new, i_m * BLOCK_M + 1)
            vis_end = n_valid + tl.minimum(o_m, N_new - 1) + 1
    else:
        hi = n_keys
        full_end = n_keys
    n_tiles = tl.cdiv(hi, BLOCK_N)
    i_sp = tl.program_id(2)
    per = tl.cdiv(n_tiles, num_splits)
    t_lo = i_sp * per
    t_hi = tl.minimum(t_lo + per, n_tiles)
    acc, m_i, l_i = attend_rotated_keys(
        acc, m_i, l_i, b_q, KRot + i_b * stride_rb + i_h * stride_rh,
        VRot + i_b * stride_wb + i_kvh * stride_wh, o_m, o_n, o_d, n_keys, vis_end, full_end,
        qk_scale, t_lo, t_hi, DOT_PREC, BLOCK_N)
    if num_splits == 1:
        ta.store_out(Out, Lse, acc, m_i, l_i, i_b, i_h, o_m, o_d, m_m, stride_ob, stride_on,
                     stride_oh, stride_lb, stride_lh)
    else:
        store_part(OutPart, LsePart, acc, m_i, l_i, i_sp, i_bh, o_m, o_d, m_m, N, HEAD_DIM)


paged_attn_rotated_fwd_tuned = ta.autotuned(paged_attn_rotated_fwd, prune=prune_rotated)


# ---------------------------------------------------------------------------------------------
# launcher pieces (called by lol_kernels.attention.attention_triton.launch_paged)
# ---------------------------------------------------------------------------------------------


def packed_rows(page_len, page_table, B: int, device):
    """Where each entry's valid slots land in the packed scratch: ``row_off [B, M]`` int32
    (exclusive prefix sum of the entries' lengths; an empty entry ``-1`` counts 0) and
    ``n_valid [B]`` int32. Device ops only (no host sync)."""
    if page_table is None or page_table.shape[1] == 0:
        z = torch.zeros((B, 1), dtype=torch.int32, device=device)
        return z, z[:, 0]
    lens = torch.where(page_table >= 0, page_len[page_table.clamp(min=0).long()], 0)
    lens = lens.to(torch.int32)
    ends = torch.cumsum(lens, 1, dtype=torch.int32)
    return (ends - lens).contiguous(), ends[:, -1].contiguous()


def rotate_keys(args: dict, strides: dict, meta: dict, B: int, Hq: int, Lc: int, L: int,
                page_len, page_table):
    """Launch :func:`rotate_keys_fwd` with the fused launch's keyword arguments (``args``,
    ``strides``, ``meta``: tensors, strides, constants); ``page_len [P]``, ``page_table
    [B, M]``: the cache's, or ``None`` without a cache. Returns ``k_rot [B, Hq, L, D]`` (keys
    rotated and packed), ``v_rot [B, Hkv, L, D]`` (values packed; both Q's dtype, contiguous)
    and ``n_valid [B]`` int32 (the valid cached keys, the new ones follow)."""
    q = args["Q"]
    D = meta["HEAD_DIM"]
    Hkv = Hq // meta["GROUP"]
    row_off, n_valid = packed_rows(page_len, page_table, B, q.device)
    k_rot = torch.empty((B, Hq, L, D), dtype=q.dtype, device=q.device)
    v_rot = torch.empty((B, Hkv, L, D), dtype=q.dtype, device=q.device)
    names = ("K", "V", "KPos", "PageLen", "PageTable", "PageShift", "KNew", "VNew", "NewPos")
    snames = ("stride_kp", "stride_ks", "stride_kh", "stride_cpp", "stride_cps", "stride_ptb",
              "stride_psb", "stride_psm", "stride_knb", "stride_knn", "stride_knh", "stride_vnb",
              "stride_vnn", "stride_vnh", "stride_npb", "stride_npn")
    consts = ("Turns", "PairAxis", "HEAD_DIM", "PAGE_SIZE", "GROUP", "NUM_AXES", "HAS_SHIFT",
              "HAS_NEW", "FAST_TRIG")
    block_r = rotate_rows(D, q.element_size())
    rotate_keys_fwd[(L // block_r, B * Hq)](
        **{n: args[n] for n in names}, RowOff=row_off, NValid=n_valid, KRot=k_rot, VRot=v_rot,
        **{n: strides[n] for n in snames}, stride_rob=row_off.stride(0),
        stride_rb=k_rot.stride(0), stride_rh=k_rot.stride(1), stride_wb=v_rot.stride(0),
        stride_wh=v_rot.stride(1), M=meta["M"], N_new=meta["N_new"], Lc=Lc, Hq=Hq,
        **{n: meta[n] for n in consts}, BLOCK_R=block_r, num_warps=NUM_WARPS)
    return k_rot, v_rot, n_valid


def launch_rotated(args: dict, strides: dict, meta: dict, cfg: dict, grid, rotated):
    """Launch :func:`paged_attn_rotated_fwd` (``cfg``: fixed tiles, or empty to autotune) with
    the fused launch's keyword arguments on ``rotated`` (:func:`rotate_keys`'s result)."""
    k_rot, v_rot, n_valid = rotated
    if cfg.get("BLOCK_N", 0) > ROW_ALIGN:  # tiles past the padded scratch
        raise ValueError(f"config: BLOCK_N must be at most {ROW_ALIGN} with rope_keys='once', "
                         f"got {cfg['BLOCK_N']}")
    names = ("Q", "QPos", "Out", "Lse", "OutPart", "LsePart")
    snames = ("stride_qb", "stride_qn", "stride_qh", "stride_qpb", "stride_qpn", "stride_ob",
              "stride_on", "stride_oh", "stride_lb", "stride_lh")
    kw = dict(**{n: args[n] for n in names}, KRot=k_rot,
              VRot=v_rot, NValid=n_valid, **{n: strides[n] for n in snames},
              stride_rb=k_rot.stride(0), stride_rh=k_rot.stride(1), stride_wb=v_rot.stride(0),
              stride_wh=v_rot.stride(1), **meta)
    kernel = paged_attn_rotated_fwd if cfg else paged_attn_rotated_fwd_tuned
    kernel[grid](**kw, **cfg)


__all__ = ["NUM_WARPS", "ONCE_MIN_QUERIES", "ROPE_KEYS", "ROW_ALIGN", "SCRATCH_LIMIT",
           "attend_rotated_keys", "choose_rope_keys", "launch_rotated", "online_softmax_rows",
           "packed_rows", "paged_attn_rotated_fwd", "paged_attn_rotated_fwd_tuned",
           "prune_rotated", "rotate_keys", "rotate_keys_fwd", "rotate_rows",
           "rotated_shared_memory_bytes", "scratch_rows"]
