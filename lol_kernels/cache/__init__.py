"""Paged sink + window KV cache and its position policies."""

from .paged import Frame, FrameBlock, PagedKVCache
from .policies import (
    POLICIES,
    CacheRead,
    absolute,
    bounded,
    build_read,
    cut,
    flush,
    read_cache,
    relativistic,
    token_positions,
)
from .slowfast import SlowFastCache, SlowFastRead

__all__ = ["POLICIES", "CacheRead", "Frame", "FrameBlock", "PagedKVCache", "absolute", "bounded",
           "build_read", "cut", "flush", "read_cache", "relativistic", "token_positions"]
__all__ += ["SlowFastCache", "SlowFastRead"]
