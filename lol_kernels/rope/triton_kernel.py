"""Fused Triton ``apply_rope``: per-head jittered 3D RoPE with exact fixed-point angles.

One program rotates ``BLOCK_R`` rows of one head (grid ``[cdiv(R, BLOCK_R), H]`` over the
flattened rows ``R = prod(leading dims) * N``): load the ``[BLOCK_R, D]`` tile, form the
per-pair positions from ``pos``, compute exact angles (:mod:`lol_kernels._triton_common`),
rotate the interleaved pairs in fp32, store in the input dtype.
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

# configs: a memory-bound elementwise op; one tile size is enough
BLOCK_R = 32
NUM_WARPS = 4


@triton.jit(do_not_specialize=["R"])
def _apply_rope_fwd(X, Pos, Turns, PairAxis, Y, R, stride_xr, stride_xh, stride_pr, stride_yr,
                    stride_yh, HEAD_DIM: tl.constexpr, NUM_AXES: tl.constexpr,
                    FAST_TRIG: tl.constexpr, BLOCK_R: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    i_r = tl.program_id(0)
    i_h = tl.program_id(1)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_d = tl.arange(0, HEAD_DIM)
    o_j = tl.arange(0, HALF)
    m_r = o_r < R
    b_axis = tl.load(PairAxis + o_j)
    b_thi, b_tlo = split_turns(tl.load(Turns + i_h * HALF + o_j))
    b_x = tl.load(X + o_r[:, None].to(tl.int64) * stride_xr + i_h * stride_xh + o_d[None, :],
                  mask=m_r[:, None], other=0.0)
    b_pos = load_pair_positions(Pos + o_r.to(tl.int64) * stride_pr, m_r, b_axis, NUM_AXES)
    b_c, b_s = rope_cos_sin(b_pos, b_thi[None, :], b_tlo[None, :], FAST_TRIG)
    b_e, b_o = rope_rotate(b_x, b_c, b_s)
    b_y = interleave(b_e, b_o)
    tl.store(Y + o_r[:, None].to(tl.int64) * stride_yr + i_h * stride_yh + o_d[None, :],
             b_y.to(Y.dtype.element_ty), mask=m_r[:, None])


def apply_rope_triton(x: torch.Tensor, pos: torch.Tensor, table, *, out=None) -> torch.Tensor:
    """Triton backend of :func:`lol_kernels.apply_rope` (inputs validated there).

    Args:
        x: ``[..., N, H, D]`` fp16/bf16/fp32; fp64 and head dims that are not a power of two
            in [16, 256] take the torch path (:func:`kernel_supports`).
        pos: ``[..., N, A]`` int positions. table: RopeTable with ``H`` rows.
        out: optional preallocated ``[..., N, H, D]`` contiguous output (tests poison it).

    Returns:
        ``x`` rotated, same shape and dtype.
    """
    if not kernel_supports(x.dtype, x.shape[-1]):
        from .reference import apply_rope_torch
        y = apply_rope_torch(x, pos, table)
        return y if out is None else out.copy_(y)
    *lead, H, D = x.shape
    A = pos.shape[-1]
    xr = x.reshape(-1, H, D)
    if xr.stride(-1) != 1:
        xr = xr.contiguous()
    pr = pos.reshape(-1, A)
    if pr.stride(-1) != 1:
        pr = pr.contiguous()
    R = xr.shape[0]
    if out is None:
        out = torch.empty_like(x)  # x's layout, as the custom op's fake implementation promises
    y = out if out.is_contiguous() else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    yr = y.view(-1, H, D)
    if R == 0:
        return out
    check_kernel_device(_apply_rope_fwd, x)
    t = table.to(x.device)
    turns = rope_turns(t.freqs)
    pair_axis = t.pair_axis.to(torch.int32)
    grid = (triton.cdiv(R, BLOCK_R), H)
    kwargs = {} if is_interpreted(_apply_rope_fwd) else {"num_warps": NUM_WARPS}
    _apply_rope_fwd[grid](X=xr, Pos=pr, Turns=turns, PairAxis=pair_axis, Y=yr, R=R,
                          stride_xr=xr.stride(0), stride_xh=xr.stride(1), stride_pr=pr.stride(0),
                          stride_yr=yr.stride(0), stride_yh=yr.stride(1), HEAD_DIM=D,
                          NUM_AXES=A, FAST_TRIG=fast_trig(_apply_rope_fwd), BLOCK_R=BLOCK_R,
                          **kwargs)
    return out if y is out else out.copy_(y)
