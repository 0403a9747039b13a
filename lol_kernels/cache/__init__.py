"""Paged sink + window KV cache, its position policies, and the one read type they return."""

from .paged import Frame, FrameBlock, PagedKVCache, write_frames
from .policies import (
    POLICIES,
    absolute,
    bounded,
    cut,
    flush,
    read_cache,
    relativistic,
    token_positions,
)
from .read import CacheRead, build_read
from .slowfast import SlowFastCache

__all__ = ["POLICIES", "CacheRead", "Frame", "FrameBlock", "PagedKVCache", "SlowFastCache",
           "absolute", "bounded", "build_read", "cut", "flush", "read_cache", "relativistic",
           "token_positions", "write_frames"]
