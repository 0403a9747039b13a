"""Split-KV for the fused attention kernels: more programs when the grid is a few waves.

The paged kernel's grid is ``cdiv(N, BLOCK_M) * B * Hq`` programs of one CTA per SM (the
``[BLOCK_M, D]`` fp32 accumulator plus an in-register key rotation fill the register file).
At the Wan shape that is 444 programs on 132 SMs: 3.36 waves, so the last wave runs a third
full (wave efficiency 0.84); one latent frame per block (1560 queries) gives 156 programs,
1.18 waves (0.59). Splitting every program's key range in ``s`` parts (the programs of one
query tile then write ``s`` partial results) evens the waves out; :func:`combine_splits`
merges the parts afterwards.

Partial results: ``out_s`` normalized within its part (fp32) and its natural-log
``lse_s``; the merge is ``lse = log sum_s exp(lse_s)``, ``out = sum_s exp(lse_s - lse) out_s``.
A part that saw no key (``lse_s = -inf``) weighs 0; a row no part saw gets ``out = 0``,
``lse = -inf`` as without splits.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..common.triton_attention import normalize_rows
from ..common.triton_utils import is_interpreted

# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

#: rows merged per program; the merge is memory-bound
BLOCK_R = 32
NUM_WARPS = 4
#: every part keeps at least this many key tiles, and splits stop at MAX_SPLITS
MIN_TILES_PER_SPLIT = 8
MAX_SPLITS = 8
#: cost model of :func:`num_splits_for`, in units of one key tile on one SM: the per-part
#: fixed work of a program (query rotation, epilogue, pipeline fill), and the memory traffic
#: of one program's part (fp32 partial out written, then read by the merge): BLOCK_M * D * 8
#: bytes at 3 TB/s against a BLOCK_M * 64 * D * 4-FLOP tile at 800/132 TFLOP/s per SM
PART_FIXED_TILES = 2.0
PART_MERGE_TILES = 8.0


def num_splits_for(programs: int, key_tiles: int, sms: int, per_sm: int = 1) -> int:
    """Parts per key range that minimize the modelled time of the grid plus the merge.

    ``time(s) = ceil(programs * s / slots) * (key_tiles / s + PART_FIXED_TILES)
    + [s > 1] * programs * s * PART_MERGE_TILES / slots`` (``slots = sms * per_sm``), over
    ``s = 1..MAX_SPLITS`` with at least ``MIN_TILES_PER_SPLIT`` tiles a part. The Wan block
    (444 programs of 367 tiles on 132 SMs) gets 2 parts (modelled time -8%), one latent
    frame per block (156 programs, 318 tiles) 5 parts (-31%), a grid of whole waves 1.

    Args:
        programs: grid size without splits (query tiles x batch x heads).
        key_tiles: key tiles of one program (cached + new).
        sms: streaming multiprocessors (0: no GPU, 1 part); per_sm: resident programs per SM.
    """
    if programs <= 0 or sms <= 0:
        return 1
    slots = sms * per_sm

    def cost(s):
        merge = programs * s * PART_MERGE_TILES / slots if s > 1 else 0.0
        return math.ceil(programs * s / slots) * (key_tiles / s + PART_FIXED_TILES) + merge

    cands = [s for s in range(1, MAX_SPLITS + 1) if s == 1 or key_tiles >= s * MIN_TILES_PER_SPLIT]
    return min(cands, key=lambda s: (cost(s), s))


# ---------------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def store_part(OutPart, LsePart, acc, m_i, l_i, i_sp, i_bh, o_m, o_d, m_m, N,
               HEAD_DIM: tl.constexpr):
    """Epilogue of one part: ``out_s [BLOCK_M, D]`` fp32 and ``lse_s`` (natural log) into the
    ``[s, B*Hq, N, (D)]`` part buffers; rows that saw no key: 0 and ``-inf``."""
    b_o, b_lse = normalize_rows(acc, m_i, l_i)
    row = (i_sp * tl.num_programs(1) + i_bh).to(tl.int64) * N + o_m
    tl.store(OutPart + row[:, None] * HEAD_DIM + o_d[None, :], b_o, mask=m_m[:, None])
    tl.store(LsePart + row, b_lse, mask=m_m)


@triton.jit(do_not_specialize=["N", "num_splits"])
def combine_splits_kernel(OutPart, LsePart, Out, Lse, N, Hq, num_splits, stride_ob,
                          stride_on, stride_oh, stride_lb, stride_lh, HEAD_DIM: tl.constexpr,
                          BLOCK_R: tl.constexpr):
    """Merge the ``num_splits`` parts of :func:`store_part` for ``BLOCK_R`` rows of one
    (batch row, head): ``lse = log sum_s exp(lse_s)``, ``out = sum_s exp(lse_s - lse) out_s``."""
    i_r = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // Hq).to(tl.int64)
    i_h = i_bh % Hq
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_d = tl.arange(0, HEAD_DIM)
    m_r = o_r < N
    BH = tl.num_programs(1)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(LsePart + (s * BH + i_bh).to(tl.int64) * N + o_r, mask=m_r,
                                  other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    for s in range(num_splits):
        row = (s * BH + i_bh).to(tl.int64) * N + o_r
        w = tl.exp2((tl.load(LsePart + row, mask=m_r, other=float("-inf")) - m_safe)
                    * 1.4426950408889634)
        den += w
        acc += w[:, None] * tl.load(OutPart + row[:, None] * HEAD_DIM + o_d[None, :],
                                    mask=m_r[:, None], other=0.0)
    seen = den > 0.0
    d_safe = tl.where(seen, den, 1.0)
    tl.store(Out + i_b * stride_ob + o_r[:, None].to(tl.int64) * stride_on + i_h * stride_oh
             + o_d[None, :], (acc / d_safe[:, None]).to(Out.dtype.element_ty),
             mask=m_r[:, None])
    tl.store(Lse + i_b * stride_lb + i_h * stride_lh + o_r,
             tl.where(seen, m_safe + tl.log2(d_safe) * 0.6931471805599453, float("-inf")),
             mask=m_r)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


def split_buffers(num_splits: int, B: int, Hq: int, N: int, D: int, device):
    """Part buffers ``out [s, B*Hq, N, D]`` and ``lse [s, B*Hq, N]`` fp32 (every entry a
    valid row is written by its part; nothing else is read)."""
    return (torch.empty((num_splits, B * Hq, N, D), dtype=torch.float32, device=device),
            torch.empty((num_splits, B * Hq, N), dtype=torch.float32, device=device))


def combine_splits(out_part, lse_part, out, lse):
    """Merge the parts of :func:`store_part` into ``out [B, N, Hq, D]`` (its dtype) and
    ``lse [B, Hq, N]`` fp32, in place; returns ``(out, lse)``."""
    s, _, N, D = out_part.shape
    B, _, Hq, _ = out.shape
    kwargs = {} if is_interpreted(combine_splits_kernel) else {"num_warps": NUM_WARPS}
    combine_splits_kernel[(triton.cdiv(N, BLOCK_R), B * Hq)](
        out_part, lse_part, out, lse, N, Hq, s, out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), HEAD_DIM=D, BLOCK_R=BLOCK_R, **kwargs)
    return out, lse


def device_sms(device) -> int:
    """SM count of a CUDA device (0 elsewhere: no split)."""
    if torch.device(device).type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


__all__ = ["combine_splits", "combine_splits_kernel", "device_sms", "num_splits_for",
           "split_buffers", "store_part"]
