"""Per-head jittered 3D RoPE: tables, the float64 reference, the CPU path and ``apply_rope``."""

from .._checks import SEED_RANGE, check_seed
from .reference import apply_rope_reference, rope_angles, rope_naive_fp32
from .rope_cpu import apply_rope_torch
from .rope_op import apply_rope, check_table
from .table import RopeTable, rope_frequencies, wan_axes

__all__ = ["SEED_RANGE", "RopeTable", "apply_rope", "apply_rope_reference", "apply_rope_torch", "check_seed", "check_table",
           "rope_angles", "rope_frequencies", "rope_naive_fp32", "wan_axes"]
