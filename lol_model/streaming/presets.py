"""Cache configurations by name: frame budget, position policy, scene-cut behaviour.

Sizes speak upstream's language: ``sink_size`` ``S`` (the first frames ever written, pinned) and
``local_attn_size`` ``L``, the frames a block attends **including its own** ``F`` frames (LongLive
1.0 and Self-Forcing's ``model_kwargs``). The paged cache keeps ``window_frames`` ``W`` recent
frames *besides* the block, so ``W = L - S - F`` (derived in :meth:`CacheConfig.new_cache`, which
knows ``F``). Upstream sizes its buffer in tokens with 1560 tokens a frame hard-coded (480x832);
we count frames, so ``L`` means the same frames at every resolution. Frames attended below are
for ``F = 3``, sink + cached + new:

====================  ===  ===  ===  ===========================  =============  ====================
name                  S    L    W    frames attended              positions      source
====================  ===  ===  ===  ===========================  =============  ====================
longlive (default)    3    12   6    12 = 3 + 6 + 3               absolute       LongLive 1.0
lol                   3    12   6    12 = 3 + 6 + 3               absolute       LongLive + LoL jitter
                                                                                 sigma 0.8, all heads
sink-window           3    12   6    12 = 3 + 6 + 3               absolute       generic sink/window
self-forcing          0    21   18   all <= 21, then 21 = 18 + 3  absolute       Self-Forcing global
self-forcing-rolling  0    9    6    9 = 6 + 3                    absolute       Self-Forcing rolling
relativistic          1    10   6    10 = 1 + 6 + 3               block-relat.   Infinity-RoPE
slow-fast             3    --   6    <= 24 = 3 + 12 slow + 6 + 3  bounded [0,20] Context Forcing
moc                   3    --   6    12 = 3 + 6 + 3, plus top-k   bounded        Context Forcing +
                                     of <= 64 routed slow frames                 MoC routing
growing               0    -1   --   every frame written          absolute       benchmark baseline
====================  ===  ===  ===  ===========================  =============  ====================

``longlive`` and ``lol`` recache the window LongLive's way at a soft prompt switch
(``recache="longlive"``, ``global_sink=True``); ``sink-window`` is the same budget with the
block-causal recache and no jitter. ``self-forcing`` equals Self-Forcing's global cache
(``local_attn_size=-1``: 32760 tokens = 21 frames, no roll) for the 21 frames upstream can make;
after that upstream stops (its buffer is full) and this preset rolls as Self-Forcing's rolling cache
with ``local_attn_size=21`` would. ``relativistic``, ``slow-fast`` and ``moc`` keep their
sources' ``window_frames`` (``local_attn_size`` may still size them: ``W = L - S - F``; slow
memory comes on top). ``local_attn_size=-1`` (upstream's global attention, bounded only by its
32760-token buffer) is refused with a ``ValueError``: use ``self-forcing`` (what that buffer holds
at 480x832) or ``growing`` (every frame, memory grows).

At a hard cut (``#`` in the prompt schedule) every configuration does a KV Flush (sink + the
newest ``flush_keep`` window frames stay; slow memory stays too); the RoPE Cut (a forward jump
of the next block's temporal position) applies to the policies whose positions are not bounded.

Every configuration composes with the model's RoPE jitter (``--jitter-sigma``; LoL's multi-head
jitter lives in the model's RoPE table, not in the cache; ``jitter_sigma`` here is only the
default a stream uses when none is given). A new configuration is one entry; the cache class
decides its reads (``cache.read(num_new, policy=..., **policy_kwargs)``)::

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

RECACHES = ("longlive", "block-causal")  # soft prompt switch: see CacheConfig.recache


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
        sink_frames: upstream's ``sink_size``: the first frames written, pinned forever.
        window_frames: recent frames kept *besides* the block being generated (see
            PagedKVCache); ``None`` when ``local_attn_size`` sizes the window.
        local_attn_size: upstream's ``local_attn_size``: frames a block attends *including its
            own* ``F`` frames; the window is ``local_attn_size - sink_frames - F``
            (:meth:`window_for`). Exactly one of ``window_frames`` and ``local_attn_size`` is
            set. ``-1`` (upstream's global attention) is refused: use ``self-forcing`` (21
            frames) or ``growing``.
        policy: position policy, passed to the cache's ``read(num_new, policy=...)``
            (``absolute``, ``relativistic``, ``bounded``; a ``SlowFastCache`` reads ``bounded``
            or ``absolute`` with its own slow-memory layout).
        policy_kwargs: extra arguments of the read (e.g. ``max_frames``, ``limit``).
        cache_cls, cache_kwargs: cache class and its extra constructor arguments.
        flush_keep: window frames kept by a KV Flush at a hard cut (Infinity-RoPE: 2).
        cut_start: temporal position of the first frame after a RoPE Cut; ``None``: the next
            position plus ``cut_gap``. Infinity-RoPE puts it at 45 (relative positions).
        recache: how a soft prompt switch recomputes the cached frames: ``"longlive"`` (one
            pass, LongLive's interactive pipeline) or ``"block-causal"`` (block by block).
        global_sink: LongLive's ``global_sink``: the sink keeps its K/V across a switch
            (``False``: the sink is recomputed under the new prompt too).
        jitter_sigma: default LoL RoPE jitter of a stream using this configuration (the
            model's table; an explicit ``jitter_sigma`` of the stream wins). ``lol``: 0.8.
    """

    name: str
    sink_frames: int
    window_frames: int | None = None
    local_attn_size: int | None = None
    policy: str = "absolute"
    policy_kwargs: dict = field(default_factory=dict)
    cache_cls: type = PagedKVCache
    cache_kwargs: dict = field(default_factory=dict)
    flush_keep: int = 2
    cut_start: int | None = None
    cut_gap: int = 24
    rope_cut: bool = True
    recache: str = "block-causal"
    global_sink: bool = True
    jitter_sigma: float = 0.0

    def __post_init__(self):
        if not isinstance(self.sink_frames, int) or self.sink_frames < 0:
            raise ValueError(f"sink_frames (sink_size) must be an int >= 0, got {self.sink_frames!r}")
        if (self.window_frames is None) == (self.local_attn_size is None):
            raise ValueError(f"give exactly one of window_frames and local_attn_size, got "
                             f"{self.window_frames!r} and {self.local_attn_size!r}")
        L = self.local_attn_size
        if L == -1:
            raise ValueError("local_attn_size=-1 (upstream's global attention) is not a window: "
                             "use cache 'self-forcing' (its 21-frame global cache) or 'growing' "
                             "(every frame, memory grows)")
        if L is not None and (not isinstance(L, int) or L <= self.sink_frames):
            raise ValueError(f"local_attn_size must be an int > sink_size={self.sink_frames} "
                             f"(frames attended, including the block), got {L!r}")
        if self.window_frames is not None and (not isinstance(self.window_frames, int)
                                               or self.window_frames < 1):
            raise ValueError(f"window_frames must be an int >= 1, got {self.window_frames!r}")
        if self.recache not in RECACHES:
            raise ValueError(f"recache must be one of {list(RECACHES)}, got {self.recache!r}")

    def window_for(self, block_frames: int) -> int:
        """Window frames kept besides a block of ``block_frames``: ``window_frames``, or
        ``local_attn_size - sink_frames - block_frames``. ``ValueError`` naming
        ``local_attn_size`` when that leaves no cached frame (the paged cache keeps at least one
        window frame; upstream's ``L = S + F``, a block seeing only the sink and itself, is
        not supported)."""
        if self.local_attn_size is None:
            return self.window_frames
        window = self.local_attn_size - self.sink_frames - block_frames
        if window < 1:
            raise ValueError(f"local_attn_size={self.local_attn_size} counts the frames a block "
                             f"attends, including its own: it must be >= sink_size "
                             f"{self.sink_frames} + block {block_frames} + 1 cached frame = "
                             f"{self.sink_frames + block_frames + 1}")
        return window

    def attended_frames(self, block_frames: int) -> int | None:
        """Most frames a block of ``block_frames`` attends, its own included (slow memory
        counted whole, routed or not); ``None`` for a cache that never evicts."""
        if issubclass(self.cache_cls, GrowingKVCache):
            return None
        slow = self.cache_kwargs.get("slow_frames", 0)
        return self.sink_frames + slow + self.window_for(block_frames) + block_frames

    def new_cache(self, model, *, frame_tokens: int, block_frames: int, batch_size: int = 1,
                  page_size: int | None = None, dtype=None, device=None):
        """Allocate this configuration's cache for ``model``: the model supplies layers, heads,
        head_dim (and by default dtype and device), this configuration the rest (the window
        from :meth:`window_for`)."""
        return model.new_cache(cache_cls=self.cache_cls, frame_tokens=frame_tokens,
                               sink_frames=self.sink_frames,
                               window_frames=self.window_for(block_frames),
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
        every frame at its current read position ``frame_t`` (``recache="block-causal"``)."""
        frames = cache.frames()
        read = build_read(cache, frames[:start], frame_t[:start], frame_t[start : start + num])
        return read, cache.rewrite_block(frames[start : start + num])

    @staticmethod
    def recache_span(cache: PagedKVCache) -> int:
        """``L = sink + window + block`` frames of ``cache``: what LongLive's buffer holds
        (``local_attn_size``), so the newest frames a ``"longlive"`` recache may recompute."""
        return cache.sink_frames + cache.window_frames + cache.block_frames

    def longlive_replay(self, cache: PagedKVCache, recent, num_new: int):
        """Plan LongLive's recache at a soft prompt switch: one pass at timestep 0 under the new
        prompt, every recomputed frame attending all the others (LongLive sets a block mask but
        its KV-cache path does not use it).

        Args:
            cache: a sink + window cache (no slow memory).
            recent: ``(serial, t)`` of the newest generated frames, oldest first, the last
                :meth:`recache_span` of which count (a KV Flush restarts it from the frames
                it keeps).
            num_new: frames of the next block.

        Returns:
            ``(order, read, block)``: the pass is the chunk ``recent[i] for i in order``;
            ``read`` what it attends besides itself; ``block`` the cached frames whose K/V it
            writes: the chunk's last ``len(block.frames)`` frames (see ``CausalWanModel``'s
            ``write``).

        With ``S`` sink frames and ``L = recache_span``, the recomputed frames are:

        * every frame of ``recent`` when the whole sink is among them (at most ``L`` frames so
          far): the sink is recomputed too, whatever ``global_sink``;
        * else with ``global_sink``: the newest ``L - S``, attending the sink's old K/V;
        * else the newest ``L``; their oldest ``S`` become the sink (done here, by
          :meth:`~lol_kernels.cache.PagedKVCache.reassign`), the old sink is gone.

        Frames of the chunk the cache already evicted (the oldest ``F`` of LongLive's ``L - S``)
        only lend their K/V to the pass; they come first in the chunk. Positions: under the
        ``absolute`` policy each frame at its own stored position (LongLive's); other policies
        have no position for evicted frames, so those are left out and the cached frames are
        read where the next block reads them.
        """
        if isinstance(cache, SlowFastCache):
            raise ValueError("recache='longlive' needs a sink + window cache; slow memory "
                             "(slow-fast, moc) recaches with recache='block-causal'")
        S, L = cache.sink_frames, self.recache_span(cache)
        recent = [(int(s), int(t)) for s, t in recent]
        if not recent:
            raise ValueError("recent must name the newest generated frames, got none")
        skip = max(0, len(recent) - L)  # older frames than the span: not LongLive's
        recent = recent[skip:]
        serials = [s for s, _ in recent]
        if all(fr.serial in serials for fr in cache.sink):
            pick = range(len(recent))
        elif self.global_sink:
            pick = range(max(0, len(recent) - (L - S)), len(recent))
        else:  # the oldest frames of the span take the sink's slots and pages
            pick = range(len(recent))
            sink = recent[: len(cache.sink)]
            cache.reassign(cache.sink, [t for _, t in sink], [s for s, _ in sink])
        frames = cache.frames()
        at = dict(zip([fr.serial for fr in frames], self.frame_positions(cache, num_new).tolist()))
        chosen = {serials[i] for i in pick}
        gone = [i for i in pick if serials[i] not in at] if self.policy == "absolute" else []
        redo = [fr for fr in frames if fr.serial in chosen]
        keep = [fr for fr in frames if fr.serial not in chosen]
        index = {s: i for i, s in enumerate(serials)}
        q_t = [recent[i][1] for i in gone] + [at[fr.serial] for fr in redo]
        read = build_read(cache, keep, [at[fr.serial] for fr in keep], q_t)
        order = [skip + i for i in [*gone, *(index[fr.serial] for fr in redo)]]
        return order, read, cache.rewrite_block(redo)

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


CACHES: dict[str, Callable[..., CacheConfig]] = {}


def register_cache(name: str, factory: Callable[..., CacheConfig]) -> None:
    """Add a configuration: ``factory(**overrides) -> CacheConfig``."""
    CACHES[name] = factory


def _preset(name: str, **fields) -> Callable[..., CacheConfig]:
    """A factory of ``CacheConfig(name, **fields)`` with its fields overridden."""
    return lambda **kw: CacheConfig(name, **{**fields, **kw})


# configs/longlive_inference.yaml: model_kwargs.sink_size 3, local_attn_size 12
LONGLIVE = {"sink_frames": 3, "local_attn_size": 12, "policy": "absolute"}
register_cache("longlive", _preset("longlive", **LONGLIVE, recache="longlive", global_sink=True))
register_cache("lol", _preset("lol", **LONGLIVE, recache="longlive", global_sink=True,
                              jitter_sigma=0.8))
register_cache("sink-window", _preset("sink-window", **LONGLIVE))
# Self-Forcing's global cache: 32760 tokens / 1560 a frame = 21 frames, never rolled
register_cache("self-forcing", _preset("self-forcing", sink_frames=0, local_attn_size=21))
register_cache("self-forcing-rolling", _preset("self-forcing-rolling", sink_frames=0,
                                               local_attn_size=9))
register_cache("relativistic", _preset("relativistic", sink_frames=1, window_frames=6,
                                       policy="relativistic", cut_start=45))
register_cache("slow-fast", _preset("slow-fast", sink_frames=3, window_frames=6, policy="bounded",
                                    cache_cls=SlowFastCache, rope_cut=False,
                                    cache_kwargs={"slow_frames": 12, "tau": 0.95,
                                                  "routed": False}))
register_cache("moc", _preset("moc", sink_frames=3, window_frames=6, policy="bounded",
                              cache_cls=SlowFastCache, rope_cut=False,
                              cache_kwargs={"slow_frames": 64, "tau": 0.95, "routed": True}))
register_cache("growing", _preset("growing", sink_frames=0, window_frames=1, policy="absolute",
                                  cache_cls=GrowingKVCache))


def get_cache_config(name: str, *, sink_size: int | None = None, **overrides) -> CacheConfig:
    """The configuration registered as ``name`` with fields overridden; ``None`` keeps a field.

    ``sink_size`` is upstream's name of ``sink_frames``. ``local_attn_size`` (frames attended,
    including the block) and ``window_frames`` (frames kept besides the block) each replace the
    preset's window size and exclude each other. ``ValueError`` names the option at fault.

    Example: ``get_cache_config("self-forcing-rolling", local_attn_size=12)``.
    """
    if name not in CACHES:
        raise ValueError(f"cache must be one of {sorted(CACHES)}, got {name!r}")
    bad = set(overrides) - {f.name for f in dataclasses.fields(CacheConfig)}
    if bad:
        raise ValueError(f"unknown cache option(s) {sorted(bad)}")
    kw = {k: v for k, v in overrides.items() if v is not None}
    if sink_size is not None:
        if kw.setdefault("sink_frames", sink_size) != sink_size:
            raise ValueError(f"sink_size={sink_size} and sink_frames={kw['sink_frames']} name "
                             f"the same frames; give one")
    if "window_frames" in kw and "local_attn_size" in kw:
        raise ValueError("local_attn_size (frames attended, including the block) and "
                         "window_frames (frames kept besides it) exclude each other; give one")
    if CACHES[name]().cache_cls is GrowingKVCache and {"window_frames", "local_attn_size"} & \
            set(kw):
        raise ValueError(f"cache {name!r} keeps every frame: local_attn_size and window_frames "
                         f"do not apply")
    if "window_frames" in kw:
        kw["local_attn_size"] = None
    elif "local_attn_size" in kw:
        kw["window_frames"] = None
    return CACHES[name](**kw)
