"""Plain RoPE formulas: angles, the pair rotation, the float64 reference and the naive one.

No state and no fast-path tricks; the CPU path (:mod:`.rope_cpu`) is tested against these.
Precision (docs/design.md §5): at temporal position ``p ~ 2^24`` a float32 product ``p * omega``
has an absolute error of about ``p * 2^-24`` rad, i.e. up to 1 rad; at 172,800 (12 h of latent
frames) about 0.01 rad. Every path therefore forms ``p * omega`` in float64 (exact to ~1e-9
rad for ``p < 2^24``), reduces it modulo ``2 pi`` there, and only then drops to the compute
dtype for ``cos``/``sin`` and the rotation. :func:`rope_naive_fp32` is kept only so tests can
show the failure it avoids.
"""

from __future__ import annotations

import math

import torch

from .table import RopeTable

TWO_PI = 2.0 * math.pi


def rope_angles(pos: torch.Tensor, table: RopeTable) -> torch.Tensor:
    """Angles ``pos[..., axis(j)] * freqs[h, j]`` reduced to ``[0, 2 pi)``.

    Args:
        pos: ``[..., N, A]`` integer positions.
        table: RoPE table with ``H`` heads.

    Returns:
        ``[..., N, H, D // 2]`` float64.
    """
    t = table.to(pos.device)
    p = pos.to(torch.float64).index_select(-1, t.pair_axis)  # [..., N, D/2]
    ang = p.unsqueeze(-2) * t.freqs  # [..., N, H, D/2]
    return torch.remainder(ang, TWO_PI)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x [..., D]`` by ``cos/sin [..., D // 2]``."""
    x2 = x.unflatten(-1, (-1, 2))
    a, b = x2[..., 0], x2[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def rope_cos_sin(pos: torch.Tensor, table: RopeTable, dtype: torch.dtype):
    """``cos, sin`` of :func:`rope_angles` in ``dtype`` (fp32 for half inputs)."""
    ang = rope_angles(pos, table)
    ang = ang.to(dtype)
    return torch.cos(ang), torch.sin(ang)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """RoPE is computed in fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_rope_reference(x: torch.Tensor, pos: torch.Tensor, table: RopeTable) -> torch.Tensor:
    """Float64 ground truth: ``x [..., N, H, D]`` rotated, returned in float64."""
    cos, sin = rope_cos_sin(pos, table, torch.float64)
    return rotate_pairs(x.to(torch.float64), cos, sin)


def rope_naive_fp32(x: torch.Tensor, pos: torch.Tensor, table: RopeTable) -> torch.Tensor:
    """What most code does: ``pos * omega`` in float32. Loses accuracy at large positions."""
    t = table.to(pos.device)
    p = pos.to(torch.float32).index_select(-1, t.pair_axis)
    ang = p.unsqueeze(-2) * t.freqs.to(torch.float32)
    return rotate_pairs(x.float(), torch.cos(ang), torch.sin(ang)).to(x.dtype)
