"""Cache configurations by name: frame budget, position policy, scene-cut behaviour.

==============  ============================  ==========================  ==================
name            frames kept                   positions (policy)          source
==============  ============================  ==========================  ==================
sink-window     3 sink + 9 window (12)        absolute                    LongLive, LoL
relativistic    1 sink + 6 window             block-relativistic          Infinity-RoPE
slow-fast       3 sink + 12 slow + 6 fast     bounded to [0, 20]          Context Forcing
moc             3 sink + 64 slow + 6 fast,    bounded; slow memory        Context Forcing +
                slow frames routed top-k      spread over the range       MoC routing
growing         every frame (no eviction)     absolute                    benchmark baseline
==============  ============================  ==========================  ==================

At a hard cut (``#`` in the prompt schedule) every configuration does a KV Flush (sink + the
newest ``flush_keep`` window frames stay; slow memory stays too); the RoPE Cut (a forward jump
of the next block's temporal position) applies to the policies whose positions are not bounded.

Every configuration composes with the model's RoPE jitter (``--jitter-sigma``, LoL's
multi-head jitter lives in the model's RoPE table, not in the cache). A new configuration is one
entry; the cache class decides its reads (``cache.read(num_new, policy=..., **policy_kwargs)``)::

    register_cache("slow-fast", lambda **kw: CacheConfig(
        "slow-fast", sink_frames=3, window_frames=6, policy="bounded",
        cache_cls=SlowFastCache, cache_kwargs={"slow_frames": 12, "tau": 0.95}, **kw))

``growing`` is a :class:`GrowingKVCache`: pools that grow by one block of pages at every append
(what a naive ``torch.cat`` cache does), so its time and memory grow with the stream.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lol_kernels.cache import (
    CacheRead,
    PagedKVCache,
    SlowFastCache,
    build_read,
    cut,
    flush,
)


class GrowingKVCache(PagedKVCache):
    """A cache that never evicts: its pools grow by the needed pages at every append.

    Only for baselines: memory and per-block time grow linearly with the stream length.
    """

    def __init__(self, **kw):
        kw["window_frames"] = 1
        super().__init__(**kw)
        self.window_frames = 2**62  # never evict

    @property
    def max_read_pages(self) -> int:
        return 0  # page tables are exactly as wide as the frames they read

    def _grow(self, frames: int) -> None:
        P0, F0 = self.num_pages, self.max_frames
        add_p = frames * self.batch_size * self.pages_per_frame

        def more(t, n):
            return torch.cat([t, t.new_zeros((n, *t.shape[1:]))])

        self.k = [more(t, add_p) for t in self.k]
        self.v = [more(t, add_p) for t in self.v]
        self.pos, self.page_len = more(self.pos, add_p), more(self.page_len, add_p)
        self.summary = [more(t, frames) for t in self.summary]
        self.num_pages, self.max_frames = P0 + add_p, F0 + frames
        self.free_pages.extend(range(P0, P0 + add_p))
        self.free_fids.extend(range(F0, F0 + frames))

    def append_frames(self, pos: torch.Tensor):
        F = pos.shape[1] // self.frame_tokens if pos.dim() == 3 else 0
        need = max(F - len(self.free_fids),
                   math.ceil((F * self.batch_size * self.pages_per_frame - len(self.free_pages))
                             / (self.batch_size * self.pages_per_frame)))
        if need > 0:
            self._grow(need)
        return super().append_frames(pos)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """As :meth:`PagedKVCache.load_state_dict`, after growing the pools to the saved size
        (a failed load may leave them grown)."""
        saved = state.get("page_len")
        if isinstance(saved, torch.Tensor) and saved.dim() == 1:
            more = (saved.shape[0] - self.num_pages) // (self.batch_size * self.pages_per_frame)
            if more > 0:
                self._grow(more)
        super().load_state_dict(state)


@dataclass(frozen=True)
class CacheConfig:
    """How a stream caches frames and positions them.

    Attributes:
        name: registry name.
        sink_frames, window_frames: frame budget of the cache (see PagedKVCache).
        policy: position policy, passed to the cache's ``read(num_new, policy=...)``
            (``absolute``, ``relativistic``, ``bounded``; a ``SlowFastCache`` reads ``bounded``
            or ``absolute`` with its own slow-memory layout).
        policy_kwargs: extra arguments of the read (e.g. ``max_frames``, ``limit``).
        cache_cls, cache_kwargs: cache class and its extra constructor arguments.
        flush_keep: window frames kept by a KV Flush at a hard cut (Infinity-RoPE: 2).
        cut_start: temporal position of the first frame after a RoPE Cut; ``None``: the next
            position plus ``cut_gap``. Infinity-RoPE puts it at 45 (relative positions).
    """

    name: str
    sink_frames: int
    window_frames: int
    policy: str = "absolute"
    policy_kwargs: dict = field(default_factory=dict)
    cache_cls: type = PagedKVCache
    cache_kwargs: dict = field(default_factory=dict)
    flush_keep: int = 2
    cut_start: int | None = None
    cut_gap: int = 24
    rope_cut: bool = True

    def new_cache(self, model, *, frame_tokens: int, block_frames: int, batch_size: int = 1,
                  page_size: int | None = None, dtype=None, device=None):
        """Allocate this configuration's cache for ``model``: the model supplies layers, heads,
        head_dim (and by default dtype and device), this configuration the rest."""
        return model.new_cache(cache_cls=self.cache_cls, frame_tokens=frame_tokens,
                               sink_frames=self.sink_frames, window_frames=self.window_frames,
                               block_frames=block_frames, batch_size=batch_size,
                               page_size=page_size, dtype=dtype, device=device,
                               **self.cache_kwargs)

    def read(self, cache: PagedKVCache, num_new: int) -> CacheRead:
        """The read a new block of ``num_new`` frames denoises against."""
        return cache.read(num_new, policy=self.policy, **self.policy_kwargs)

    def frame_positions(self, cache: PagedKVCache, num_new: int) -> torch.Tensor:
        """``[n]`` temporal position each cached frame (read order) is read at by the next
        block of ``num_new`` frames."""
        return cache.frame_positions(num_new, policy=self.policy, **self.policy_kwargs)

    def replay(self, cache: PagedKVCache, start: int, num: int, frame_t: torch.Tensor):
        """Read and in-place :class:`~lol_kernels.cache.FrameBlock` to recompute the K/V of
        cached frames ``[start, start + num)`` (read order) against the frames before them,
        every frame at its current read position ``frame_t`` (LongLive recache)."""
        frames = cache.frames()
        read = build_read(cache, frames[:start], frame_t[:start], frame_t[start : start + num])
        return read, cache.rewrite_block(frames[start : start + num])

    def flush(self, cache: PagedKVCache) -> None:
        """KV Flush: keep the sink and the newest ``flush_keep`` window frames."""
        flush(cache, keep_last=self.flush_keep)

    def cut_read(self, cache: PagedKVCache, num_new: int) -> CacheRead:
        """RoPE Cut: the read of the first block after a hard cut (block moved forward); the
        plain read where positions are bounded (``rope_cut=False``)."""
        read = self.read(cache, num_new)
        if not self.rope_cut:
            return read
        top = int(read.frame_t.max()) if read.frame_t.numel() else -1
        start = self.cut_start
        if start is None or start <= top:  # a fixed start must still lie after the cache
            start = int(read.q_t[0]) + self.cut_gap
        return cut(read, start=start)


def default_page_size(frame_tokens: int) -> int:
    """256 slots (the Triton tile), or the next power of two >= 16 for tiny frames."""
    return 256 if frame_tokens >= 256 else max(16, 1 << (frame_tokens - 1).bit_length())


CACHES: dict[str, Callable[..., CacheConfig]] = {}


def register_cache(name: str, factory: Callable[..., CacheConfig]) -> None:
    """Add a configuration: ``factory(**overrides) -> CacheConfig``."""
    CACHES[name] = factory


register_cache("sink-window", lambda **kw: CacheConfig(
    "sink-window", **{"sink_frames": 3, "window_frames": 9, "policy": "absolute", **kw}))
register_cache("relativistic", lambda **kw: CacheConfig(
    "relativistic", **{"sink_frames": 1, "window_frames": 6, "policy": "relativistic",
                       "cut_start": 45, **kw}))
register_cache("slow-fast", lambda **kw: CacheConfig(
    "slow-fast", **{"sink_frames": 3, "window_frames": 6, "policy": "bounded",
                    "cache_cls": SlowFastCache, "rope_cut": False,
                    "cache_kwargs": {"slow_frames": 12, "tau": 0.95, "routed": False}, **kw}))
register_cache("moc", lambda **kw: CacheConfig(
    "moc", **{"sink_frames": 3, "window_frames": 6, "policy": "bounded",
              "cache_cls": SlowFastCache, "rope_cut": False,
              "cache_kwargs": {"slow_frames": 64, "tau": 0.95, "routed": True}, **kw}))
register_cache("growing", lambda **kw: CacheConfig(
    "growing", **{"sink_frames": 0, "window_frames": 1, "policy": "absolute",
                  "cache_cls": GrowingKVCache, **kw}))


def get_cache_config(name: str, **overrides) -> CacheConfig:
    """The configuration registered as ``name``, with fields overridden (``window_frames=...``)."""
    if name not in CACHES:
        raise ValueError(f"cache must be one of {sorted(CACHES)}, got {name!r}")
    bad = set(overrides) - {f.name for f in dataclasses.fields(CacheConfig)}
    if bad:
        raise ValueError(f"unknown cache option(s) {sorted(bad)}")
    return CACHES[name](**{k: v for k, v in overrides.items() if v is not None})
