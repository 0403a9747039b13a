"""Fused Triton ``apply_rope``: per-head jittered 3D RoPE with exact fixed-point angles.

One program rotates ``BLOCK_R`` rows of one head (grid ``[cdiv(R, BLOCK_R), H]`` over the
flattened rows ``R = prod(leading dims) * N``): load the ``[BLOCK_R, D]`` tile, form the
per-pair positions from ``pos``, compute exact angles (:mod:`lol_kernels.common.triton_rope`),
rotate the interleaved pairs in fp32, store in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_out_buffer
from .._dispatch import kernel_input_error, launch_device
from ..common.triton_rope import (
    load_head_rope,
    load_pair_positions,
    rope_kernel_tables,
    rotate_tile,
)
from ..common.triton_utils import (
    check_kernel_device,
    fast_trig,
    is_interpreted,
    kernel_supports,
    last_contig,
)

# ---------------------------------------------------------------------------------------------
# configs: a memory-bound elementwise op; one tile size is enough
# ---------------------------------------------------------------------------------------------

BLOCK_R = 32
NUM_WARPS = 4

# ---------------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["R"])
def apply_rope_fwd(X, Pos, Turns, PairAxis, Y, R, stride_xr, stride_xh, stride_pr, stride_yr,
                   stride_yh, HEAD_DIM: tl.constexpr, NUM_AXES: tl.constexpr,
                   FAST_TRIG: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rotate rows ``[BLOCK_R, D]`` of ``X`` (one head) at their positions into ``Y``."""
    i_r = tl.program_id(0)
    i_h = tl.program_id(1)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_d = tl.arange(0, HEAD_DIM)
    m_r = o_r < R
    b_axis, b_thi, b_tlo = load_head_rope(Turns, PairAxis, i_h, HEAD_DIM // 2)
    b_x = tl.load(X + o_r[:, None].to(tl.int64) * stride_xr + i_h * stride_xh + o_d[None, :],
                  mask=m_r[:, None], other=0.0)
    b_pos = load_pair_positions(Pos + o_r.to(tl.int64) * stride_pr, m_r, b_axis, NUM_AXES)
    b_y = rotate_tile(b_x, b_pos, b_thi, b_tlo, FAST_TRIG)
    tl.store(Y + o_r[:, None].to(tl.int64) * stride_yr + i_h * stride_yh + o_d[None, :],
             b_y.to(Y.dtype.element_ty), mask=m_r[:, None])


# ---------------------------------------------------------------------------------------------
# launcher and wrapper (validated by lol_kernels.rope.rope_op)
# ---------------------------------------------------------------------------------------------


def apply_rope_triton(x: torch.Tensor, pos: torch.Tensor, table, *, out=None) -> torch.Tensor:
    """Triton backend of :func:`lol_kernels.apply_rope` (inputs validated there).

    Args:
        x: ``[..., N, H, D]`` fp16/bf16/fp32, a power-of-two ``D`` in [16, 256]
            (:func:`kernel_supports`; ``lk.apply_rope`` sends anything else to the torch path,
            a direct call raises).
        pos: ``[..., N, A]`` int positions. table: RopeTable with ``H`` rows.
        out: optional preallocated ``[..., N, H, D]`` output in x's dtype on x's device, any
            layout (tests poison it; anything else raises).

    Returns:
        ``x`` rotated, same shape and dtype (contiguous unless ``out`` is given).
    """
    if not kernel_supports(x.dtype, x.shape[-1]):
        raise kernel_input_error("apply_rope", "x", x)
    *lead, H, D = x.shape
    A = pos.shape[-1]
    xr = last_contig(x.reshape(-1, H, D))
    pr = last_contig(pos.reshape(-1, A))
    R = xr.shape[0]
    check_out_buffer("out", out, x.shape, x.dtype, x.device, unit_last=False)  # copied back
    if out is None:  # contiguous, as the custom op's fake implementation promises
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = out if out.is_contiguous() else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    yr = y.view(-1, H, D)
    if R == 0:
        return out
    check_kernel_device(apply_rope_fwd, x)
    turns, pair_axis = rope_kernel_tables(table, x.device)
    grid = (triton.cdiv(R, BLOCK_R), H)
    kwargs = {} if is_interpreted(apply_rope_fwd) else {"num_warps": NUM_WARPS}
    with launch_device(x):
        launch_rope(grid, xr, pr, turns, pair_axis, yr, R, D, A, kwargs)
    return out if y is out else out.copy_(y)


def launch_rope(grid, xr, pr, turns, pair_axis, yr, R, D, A, kwargs):
    """The launch of :func:`apply_rope_triton` on the current device: ``xr, yr [R, H, D]``,
    ``pr [R, A]``."""
    apply_rope_fwd[grid](X=xr, Pos=pr, Turns=turns, PairAxis=pair_axis, Y=yr, R=R,
                         stride_xr=xr.stride(0), stride_xh=xr.stride(1), stride_pr=pr.stride(0),
                         stride_yr=yr.stride(0), stride_yh=yr.stride(1), HEAD_DIM=D,
                         NUM_AXES=A, FAST_TRIG=fast_trig(apply_rope_fwd), BLOCK_R=BLOCK_R,
                         **kwargs)


__all__ = ["BLOCK_R", "NUM_WARPS", "apply_rope_fwd", "apply_rope_triton"]
