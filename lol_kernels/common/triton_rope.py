"""Exact RoPE in registers: the Triton pieces of every kernel that rotates (paged and MoC
attention, apply_rope).

Exact RoPE angles without libdevice
-----------------------------------
A rotation angle is ``pos * omega``. Instead of forming it in float32 (error ``~pos * 2^-24``
rad: 0.01 rad at 172,800, up to 1 rad at 2^24), the kernels work in **turns** held as a
32-bit fixed-point fraction:

* host side, :func:`rope_turns` stores each frequency as the 64-bit integer
  ``F = round(omega / 2 pi * 2^64) mod 2^64`` (two's complement in an int64);
* in the kernel, :func:`rope_phase` forms bits 32..63 of the 64-bit product ``pos * F`` with
  wrapping 32-bit integer arithmetic. Wrap-around is exactly the reduction modulo one turn, so
  the phase is the angle in units of ``2 pi / 2^32`` with an error below ``2^-32`` turn plus the
  float64 rounding of ``omega`` itself: the same accuracy as the float64 reference, for any
  ``|pos| < 2^31`` (stored position + page_shift must fit int32);
* attention kernels form every phase *relative* (``RELATIVE=True``): positions biased by
  ``2^31`` so that all of them are unsigned, which drops the per-pair sign fix-up; the bias
  adds the same angle to a pair of a query and of a key, so ``q . k`` is unchanged;
* :func:`sincos_phase` splits the phase into a quadrant (two exact integer bits) and a
  remainder ``|x| <= pi/4`` and evaluates short Taylor polynomials in float32 (error < 1e-7).

No ``tl.sin``/``tl.cos``: they lower to libdevice ``__nv_sinf``, whose Payne-Hanek slow path
uses local memory on the GPU, and libdevice does not run under ``TRITON_INTERPRET=1``. The
exact integer phase makes range reduction free, so two back ends remain (``FAST_TRIG``): plain
integer/float polynomials (the interpreter, tested on the CPU; also compiles for sm_90) and the
hardware ``sin.approx``/``cos.approx`` on a reduced argument (GPU launches; ~6x fewer
instructions per pair, which matters because every key tile is rotated once per query tile).

Interleaved pairs
-----------------
Pair ``j`` of a head is channels ``(2j, 2j+1)``. :func:`rope_rotate` loads a full ``[R, D]``
tile (vectorised loads), splits it into even/odd halves ``[R, D/2]`` in registers and rotates
them; attention then uses two ``K = D/2`` dot products (``q_e.k_e + q_o.k_o`` is the same sum
as the interleaved ``q.k``), so the tile never has to be re-interleaved. :func:`interleave`
rebuilds ``[R, D]`` for kernels that store rotated tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

TWO_PI = 2.0 * math.pi
#: int32 sign bit: ``x ^ SIGN_BIT`` adds 2^31 modulo 2^32 (an int32 literal: no int64 promotion)
SIGN_BIT = tl.constexpr(-2**31)


def rope_turns(freqs: torch.Tensor) -> torch.Tensor:
    """Frequencies as 64-bit fixed-point turns, the table :func:`rope_phase` reads.

    Args:
        freqs: ``[H, D // 2]`` float64 angular frequencies (rad per position step).

    Returns:
        ``[H, D // 2]`` int64 ``round(frac(omega / 2 pi) * 2^64)`` stored modulo ``2^64`` in
        two's complement (values of ``frac >= 1/2`` become negative), contiguous.
    """
    f = torch.remainder(freqs.to(torch.float64) / TWO_PI, 1.0)
    f = torch.where(f >= 0.5, f - 1.0, f)  # exact (Sterbenz); same value modulo one turn
    return torch.round(f * 2.0**64).to(torch.int64).contiguous()


def rope_kernel_tables(table, device) -> tuple[torch.Tensor, torch.Tensor]:
    """What a RoPE kernel reads of a RopeTable: ``turns [H, D/2]`` int64 (:func:`rope_turns`)
    and ``pair_axis [D/2]`` int32 (the position axis of each channel pair), on ``device``."""
    t = table.to(device)
    return rope_turns(t.freqs), t.pair_axis.to(torch.int32)


@triton.jit
def split_turns(turns):
    """Split :func:`rope_turns` values (int64) into their high and low 32-bit words (uint32)."""
    hi = ((turns >> 32) & 0xFFFFFFFF).to(tl.uint32)
    lo = (turns & 0xFFFFFFFF).to(tl.uint32)
    return hi, lo


@triton.jit
def rope_phase(pos, turns_hi, turns_lo, RELATIVE: tl.constexpr = False):
    """Angle ``pos * omega`` as a uint32 phase (units of ``2 pi / 2^32``), exact modulo 2^32.

    Bits 32..63 of the 64-bit product ``pos * F`` from 32-bit pieces, all wrapping uint32:
    ``pos * F_hi + umulhi(pos, F_lo)``, minus ``F_lo`` when ``pos < 0`` (the unsigned view of a
    negative ``pos`` is ``pos + 2^32``). 32-bit arithmetic keeps register pressure at half of
    the int64 product.

    ``RELATIVE=True``: ``pos`` holds ``position + 2^31`` (wrapped, :func:`load_pair_positions`),
    an unsigned value for every int32 position, so no sign fix-up per pair; the phase is then
    the true phase plus ``phase(2^31)``, a constant of the pair that cancels in ``q . k`` when
    queries and keys are both formed this way (within 2 units of ``2^-32`` turn). Attention
    kernels only; ``apply_rope`` needs the absolute angle.

    Args:
        pos: int32 tensor, ``|pos| < 2^31``.
        turns_hi, turns_lo: uint32 words of :func:`rope_turns` (:func:`split_turns`),
            broadcastable against ``pos``.
    """
    p = pos.to(tl.uint32, bitcast=True)
    ph = p * turns_hi + tl.umulhi(p, turns_lo)
    if not RELATIVE:
        ph = ph - tl.where(pos < 0, turns_lo, 0)
    return ph


@triton.jit
def sincos_phase(phase, FAST_TRIG: tl.constexpr = False):
    """``cos, sin`` (float32) of the angle ``2 pi * phase / 2^32``, ``phase`` uint32.

    ``FAST_TRIG=False`` (portable, the interpreter's path): the quadrant ``k`` is the phase
    rounded to a multiple of ``2^30`` (exact integer bits), the remainder ``x`` lies in
    ``[-pi/4, pi/4)``; Taylor polynomials of degree 9 (sin) and 10 (cos) are accurate to 2e-9
    there, so float32 rounding (~6e-8) dominates. About 25 FMA/integer instructions a pair.

    ``FAST_TRIG=True`` (GPU only: inline PTX): the phase as a signed angle in ``[-pi, pi)`` goes
    to the MUFU ``sin.approx.f32`` / ``cos.approx.f32`` (absolute error about 2^-20.5 on that
    range by the PTX ISA, ~7e-7, below the fp32 rounding of a rotated O(1) value times 3):
    4 instructions a pair, on the special-function unit beside the softmax ``exp2``.
    """
    if FAST_TRIG:
        x = phase.to(tl.int32, bitcast=True).to(tl.float32) * 1.4629180792671596e-09
        sin = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [x],
                                        dtype=tl.float32, is_pure=True, pack=1)
        cos = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [x],
                                        dtype=tl.float32, is_pure=True, pack=1)
        return cos, sin
    k = (phase + 0x20000000) >> 30
    x = (phase - (k << 30)).to(tl.int32, bitcast=True).to(tl.float32) * 1.4629180792671596e-09
    x2 = x * x
    s = x + x * x2 * (-0.16666666666666666 + x2 * (0.008333333333333333 + x2 * (
        -0.0001984126984126984 + x2 * 2.7557319223985893e-06)))
    c = 1.0 + x2 * (-0.5 + x2 * (0.041666666666666664 + x2 * (-0.001388888888888889 + x2 * (
        2.48015873015873e-05 - x2 * 2.755731922398589e-07))))
    # angle = k pi/2 + x: k = 1 -> (-sin, cos), k = 2 -> (-cos, -sin), k = 3 -> (sin, -cos)
    swap = (k & 1) != 0
    cos = tl.where(swap, s, c)
    sin = tl.where(swap, c, s)
    cos = tl.where(((k + 1) & 2) != 0, -cos, cos)
    sin = tl.where((k & 2) != 0, -sin, sin)
    return cos, sin


@triton.jit
def rope_cos_sin(pos, turns_hi, turns_lo, FAST_TRIG: tl.constexpr = False,
                 RELATIVE: tl.constexpr = False):
    """``cos, sin`` float32 of ``pos * omega``; ``pos`` int32 ``[R, D/2]``, turns uint32.
    ``FAST_TRIG``: see :func:`sincos_phase` (pass ``triton_utils.fast_trig`` of the kernel);
    ``RELATIVE``: see :func:`rope_phase`."""
    return sincos_phase(rope_phase(pos, turns_hi, turns_lo, RELATIVE), FAST_TRIG)


@triton.jit
def _row_positions(ptrs, mask, shift_ptrs, shift_mask, axis, HAS_SHIFT: tl.constexpr,
                   RELATIVE: tl.constexpr):
    """Positions ``[R]`` of one axis: stored + shift, ``+ 2^31`` (wrapping) when relative."""
    p = tl.load(ptrs + axis, mask=mask, other=0).to(tl.int32)
    if HAS_SHIFT:
        if shift_mask is None:  # one shift for all rows: a scalar load
            p += tl.load(shift_ptrs + axis).to(tl.int32)
        else:
            p += tl.load(shift_ptrs + axis, mask=shift_mask, other=0).to(tl.int32)
    if RELATIVE:
        p = p ^ SIGN_BIT
    return p


@triton.jit
def load_pair_positions(ptrs, mask, pair_axis, NUM_AXES: tl.constexpr, shift_ptrs=None,
                        shift_mask=None, HAS_SHIFT: tl.constexpr = False,
                        RELATIVE: tl.constexpr = False):
    """Per-pair positions ``[R, D/2]`` int32 of ``R`` rows whose ``A`` positions start at ``ptrs``.

    Shifts and the relative bias are added per row and axis before the rows are spread over
    the pairs (one select per pair and extra axis is all the per-pair work).

    Args:
        ptrs: ``[R]`` pointers to the first axis of each row's positions (axes contiguous).
        mask: ``[R]`` rows to load (others read 0).
        pair_axis: ``[D/2]`` int, the axis that drives each channel pair.
        NUM_AXES: ``A``, axes stored per row.
        shift_ptrs: ``[R]`` pointers to ``A`` shifts added to each row (``HAS_SHIFT``), or
            one scalar pointer (shift_mask ``None``): the same shifts for every row.
        shift_mask: ``[R]`` rows whose shifts are loaded (others add 0).
        RELATIVE: bias by ``2^31`` for :func:`rope_phase` ``RELATIVE=True``.
    """
    # pair_axis < NUM_AXES (validated), so the last axis is the default: NUM_AXES - 1 selects
    p_last = _row_positions(ptrs, mask, shift_ptrs, shift_mask, NUM_AXES - 1, HAS_SHIFT,
                            RELATIVE)
    pos = tl.broadcast_to(p_last[:, None], (ptrs.shape[0], pair_axis.shape[0]))
    for a in tl.static_range(NUM_AXES - 1):
        p_a = _row_positions(ptrs, mask, shift_ptrs, shift_mask, a, HAS_SHIFT, RELATIVE)
        pos = tl.where(pair_axis[None, :] == a, p_a[:, None], pos)
    return pos


@triton.jit
def rope_rotate(x, cos, sin):
    """Rotate the interleaved pairs of ``x [R, D]`` by ``cos/sin [R, D/2]``.

    Returns the rotated even and odd channels ``(x_e', x_o')``, each ``[R, D/2]`` float32:
    ``x_e' = x_e cos - x_o sin``, ``x_o' = x_e sin + x_o cos``.
    """
    xe, xo = tl.split(tl.reshape(x.to(tl.float32), (x.shape[0], x.shape[1] // 2, 2)))
    return xe * cos - xo * sin, xe * sin + xo * cos


@triton.jit
def interleave(xe, xo):
    """Inverse of the split in :func:`rope_rotate`: ``[R, D/2] x 2 -> [R, D]`` interleaved."""
    return tl.reshape(tl.join(xe, xo), (xe.shape[0], 2 * xe.shape[1]))



@triton.jit
def load_head_rope(Turns, PairAxis, i_h, HALF: tl.constexpr):
    """Head ``i_h``'s RoPE constants: the pair axes ``[D/2]`` int32 and the high and low words
    ``[D/2]`` uint32 of its :func:`rope_turns` row (``HALF = D/2``)."""
    o_j = tl.arange(0, HALF)
    b_axis = tl.load(PairAxis + o_j)
    b_thi, b_tlo = split_turns(tl.load(Turns + i_h * HALF + o_j))
    return b_axis, b_thi, b_tlo


@triton.jit
def rotate_tile(x, pos, turns_hi, turns_lo, FAST_TRIG: tl.constexpr = False,
                RELATIVE: tl.constexpr = False):
    """``x [R, D]`` rotated at the per-pair positions ``pos [R, D/2]`` with one head's words
    ``turns_hi, turns_lo [D/2]`` (:func:`load_head_rope`): ``[R, D]`` float32, the pairs back
    in place (a register relabeling). ``FAST_TRIG``, ``RELATIVE``: see :func:`rope_cos_sin`."""
    cos, sin = rope_cos_sin(pos, turns_hi[None, :], turns_lo[None, :], FAST_TRIG, RELATIVE)
    xe, xo = rope_rotate(x, cos, sin)
    return interleave(xe, xo)


__all__ = ["SIGN_BIT", "TWO_PI", "interleave", "load_head_rope", "load_pair_positions",
           "rope_cos_sin", "rope_kernel_tables", "rope_phase", "rope_rotate", "rope_turns",
           "rotate_tile", "sincos_phase", "split_turns"]
