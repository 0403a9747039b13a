"""lol-kernels: per-head jittered 3D RoPE in-register over a paged sink + window KV cache.

Public API (docs/design.md §4): :func:`rope_frequencies`, :func:`apply_rope`,
:func:`paged_attention`, the paged cache (:class:`PagedKVCache`) and its position policies.
"""

from . import cache, diagnostics
from .attention import paged_attention, rope_attention
from .cache import CacheRead, PagedKVCache, read_cache, token_positions
from .moc import moc_attention, moc_route, moc_route_tiles
from .rope import RopeTable, apply_rope, rope_frequencies

__version__ = "0.1.0"

__all__ = ["CacheRead", "PagedKVCache", "RopeTable", "apply_rope", "cache", "diagnostics",
           "moc_attention", "moc_route", "moc_route_tiles", "paged_attention",
           "read_cache", "rope_attention", "rope_frequencies", "token_positions"]
