"""Context Forcing's slow-fast memory on the paged cache, with MoC routing over slow memory.

Frames live in three groups (read order: sink, slow oldest to newest, fast oldest to newest):

* **sink**: the first ``sink_frames`` frames (default 3), pinned forever.
* **fast**: the ``window_frames`` most recent frames (default 6), FIFO: the base class' window
  (``fast_frames`` is a read-only alias).
* **slow**: at most ``slow_frames`` long-term keyframes (default 12; 256 or more when routed).

Promotion. A frame leaving the fast window is promoted to slow memory only if it is **novel**:
the cosine similarity of its key descriptor to the previous frame's (the frame just before it in
the stream, whether or not that one was kept; a sink frame for the first) is below ``tau``
(default 0.95); otherwise its pages are freed.

Descriptor. For each layer ``l`` in ``novelty_layers`` (default: all), the frame's per-head
mean un-rotated keys ``summary[l][fid]`` ``[B, Hkv, D]`` are flattened per batch row and L2
normalized; the similarity of two frames is the mean over those layers (and over batch rows,
since the streams share one frame structure) of the per-layer cosine. Each layer's key space is
its own, so cosines are averaged rather than keys (a layer-averaged key would mix spaces).

Eviction. When a promotion makes slow memory exceed its budget, the **most redundant** slow
frame is dropped: the one whose similarity to its predecessor in slow memory (the last sink
frame for the first) is highest; ties drop the older frame. This keeps the kept set spread
over distinct content instead of over time.

Reads. :meth:`SlowFastCache.read` builds a :class:`~lol_kernels.cache.CacheRead`. Without
routing every slow frame is in the page table (dense attention over sink + slow + fast). With
routing (``read.routed``) the page table holds sink + fast only (mandatory) and slow frames are
the routable chunks (``chunk_pages [B, C, ppf]``, ``C = slow_frames``, padded with ``-1`` and
``chunk_valid``), for :func:`lol_kernels.moc_route_tiles` and :func:`lol_kernels.moc_attention`.

Positions (``policy="bounded"``, default; Context Forcing bounds every position to ``[0, 20]``):
``L = limit`` (default ``sink + min(slow_frames, 12) + fast``: 21 for 3 + 12 + 6). Sink frame
``k`` reads at ``k``; the new block at ``[L - F, L)``; fast frames right-aligned just before it
(clamped to ``>= #sink``); slow frames fill ``[#sink, L - F - #fast)``: consecutive and
right-aligned when they fit, otherwise spread evenly (``#sink + floor(i * R / n)`` for slow
frame ``i`` of ``n`` and ``R`` free positions), so a large routed memory shares few positions.
``policy="absolute"`` reads stored positions. Memory is fixed: the base class gets
``extra_frames = slow_frames`` frame slots, whatever the stream length.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .._checks import POS_LIMIT, check_positions_fit
from .paged import Frame, PagedKVCache
from .read import CacheRead, build_read


class SlowFastCache(PagedKVCache):
    """Paged cache of sink + slow (novel keyframes, bounded) + fast (FIFO) frames.

    Args:
        sink_frames, window_frames: as in the module doc (the window is the fast memory).
        slow_frames: slow-memory budget in frames (memory is reserved for all of them).
        tau: novelty threshold on the cosine similarity (promote iff similarity < tau).
        novelty_layers: layers whose summaries form the descriptor (``None`` = all).
        routed: default of :meth:`read`'s ``routed``.
        **kw: the other :class:`PagedKVCache` arguments (layers, heads, frame_tokens, ...).
    """

    def __init__(self, *, sink_frames: int = 3, slow_frames: int = 12, window_frames: int = 6,
                 tau: float = 0.95, novelty_layers=None, routed: bool = False, **kw):
        if "extra_frames" in kw:
            raise ValueError("SlowFastCache sets extra_frames=slow_frames itself")
        if not isinstance(slow_frames, int) or slow_frames < 0:
            raise ValueError(f"slow_frames must be an int >= 0, got {slow_frames!r}")
        if not isinstance(tau, (int, float)) or not -1.0 <= tau <= 1.0:
            raise ValueError(f"tau must be a cosine threshold in [-1, 1], got {tau!r}")
        super().__init__(sink_frames=sink_frames, window_frames=window_frames,
                         extra_frames=slow_frames, **kw)
        layers = range(self.num_layers) if novelty_layers is None else novelty_layers
        self.novelty_layers = [int(x) for x in layers]
        if not self.novelty_layers or any(not 0 <= x < self.num_layers
                                          for x in self.novelty_layers):
            raise ValueError(f"novelty_layers must be layers in [0, {self.num_layers}), "
                             f"got {novelty_layers!r}")
        self.slow_frames, self.tau, self.routed = slow_frames, float(tau), routed

    @property
    def fast_frames(self) -> int:
        """Fast-memory size: the base class' ``window_frames``."""
        return self.window_frames

    def reset(self) -> None:
        super().reset()
        self.slow: list[Frame] = []
        self._slow_desc: list[torch.Tensor] = []
        self._prev_desc: torch.Tensor | None = None  # descriptor of the last frame to leave fast
        self._discard = False
        self.promoted = self.rejected = self.evicted = 0

    def frames(self) -> list[Frame]:
        """Cached frames in read order: sink, slow (oldest first), fast (oldest first)."""
        return self.sink + self.slow + list(self.window)

    @property
    def num_frames(self) -> int:
        return len(self.sink) + len(self.slow) + len(self.window)

    @property
    def max_read_pages(self) -> int:
        """Page-table width of a dense (non-routed) read: sink + slow + fast."""
        return (self.sink_frames + self.slow_frames + self.window_frames) * self.pages_per_frame

    # ----------------------------------------------------------------- novelty
    def descriptor(self, fid: int) -> torch.Tensor:
        """``[B, Lsel, Hkv * D]`` fp32 unit-norm per-layer mean keys of frame slot ``fid``."""
        d = torch.stack([self.summary[x][fid].flatten(1) for x in self.novelty_layers], dim=1)
        return torch.nn.functional.normalize(d, dim=-1)

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
        """Mean over batch rows and layers of the per-layer cosine of two descriptors."""
        return float((a * b).sum(-1).mean())

    def _free(self, fr: Frame) -> None:
        super()._evict(fr)

    def _evict(self, fr: Frame) -> None:
        """A frame leaves the fast window: promote it if novel, else free it."""
        desc = self.descriptor(fr.fid)
        prev = self._prev_desc
        if prev is None and self.sink:
            prev = self.descriptor(self.sink[-1].fid)
        self._prev_desc = desc
        novel = prev is None or self.similarity(desc, prev) < self.tau
        if self._discard or not novel or self.slow_frames == 0:
            self.rejected += 1
            self._free(fr)
            return
        self.promoted += 1
        self.slow.append(fr)
        self._slow_desc.append(desc)
        if len(self.slow) > self.slow_frames:
            i = self.most_redundant()
            self.evicted += 1
            self._free(self.slow.pop(i))
            self._slow_desc.pop(i)

    def redundancy(self) -> torch.Tensor:
        """``[len(slow)]`` similarity of each slow frame to its predecessor in slow memory (the
        last sink frame for the first one; ``-inf`` for it when there is no sink)."""
        d = torch.stack(self._slow_desc)  # [n, B, L, HD]
        head = self.descriptor(self.sink[-1].fid) if self.sink else None
        prev = torch.cat([(head if head is not None else d[0]).unsqueeze(0), d[:-1]])
        r = (d * prev).sum(-1).mean(dim=(1, 2))
        if head is None:
            r[0] = float("-inf")
        return r

    def most_redundant(self) -> int:
        r = self.redundancy()
        return int(torch.nonzero(r == r.max())[0, 0])  # first maximum = oldest frame on ties

    def drop_window(self, keep_last: int) -> list[Frame]:
        """Free all fast frames but the newest ``keep_last`` without promoting them (KV Flush at
        a prompt change); slow memory is kept (see :meth:`clear_slow`)."""
        self._discard = True
        try:
            gone = super().drop_window(keep_last)
        finally:
            self._discard = False
        self._prev_desc = None
        return gone

    def clear_slow(self) -> list[Frame]:
        """Free every slow frame; returns them."""
        gone, self.slow, self._slow_desc = self.slow, [], []
        for fr in gone:
            self._free(fr)
        return gone

    # ----------------------------------------------------------------- reads
    def read_positions(self, num_new: int, *, policy: str = "bounded", limit: int | None = None):
        """Temporal read positions of (sink, slow, fast) frames and of the new block."""
        ns, nl, nf = len(self.sink), len(self.slow), len(self.window)
        if policy == "absolute":
            t = lambda frs: torch.tensor([fr.t for fr in frs], dtype=torch.int64)  # noqa: E731
            return t(self.sink), t(self.slow), t(self.window), \
                torch.arange(num_new) + self.next_t
        if policy != "bounded":
            raise ValueError(f"policy must be 'bounded' or 'absolute', got {policy!r}")
        L = self.sink_frames + min(self.slow_frames, 12) + self.window_frames if limit is None \
            else limit
        if not isinstance(L, int) or L < ns + num_new + 1:
            raise ValueError(f"limit must leave room for sink, block and one more frame: "
                             f">= {ns + num_new + 1}, got {L}")
        if L - 1 > POS_LIMIT:  # the block's last frame is read at L - 1
            raise ValueError(f"limit must be <= {POS_LIMIT + 1} (frame times are int32 in the "
                             f"kernels), got {L}")
        fast_t = torch.clamp(torch.arange(L - num_new - nf, L - num_new), min=ns)
        lo = ns
        hi = max(lo, L - num_new - nf)  # slow frames use [lo, hi)
        R = hi - lo
        if nl == 0:
            slow_t = torch.zeros(0, dtype=torch.int64)
        elif R == 0:
            slow_t = torch.full((nl,), lo, dtype=torch.int64)
        elif nl <= R:
            slow_t = torch.arange(hi - nl, hi)
        else:
            slow_t = lo + torch.div(torch.arange(nl) * R, nl, rounding_mode="floor")
        return torch.arange(ns), slow_t, fast_t, torch.arange(L - num_new, L)

    def read(self, num_new: int, *, routed: bool | None = None, policy: str = "bounded",
             limit: int | None = None) -> CacheRead:
        """Build the read of the next block of ``num_new`` frames (valid until the next
        ``append_frames``). Shapes are fixed for the cache's lifetime: ``M`` is
        ``(sink + fast) * ppf`` routed, ``(sink + slow + fast) * ppf`` dense; ``C = slow``."""
        if not isinstance(num_new, int) or num_new < 1:
            raise ValueError(f"num_new must be an int >= 1, got {num_new!r}")
        routed = self.routed if routed is None else routed
        sink_t, slow_t, fast_t, q_t = self.read_positions(num_new, policy=policy, limit=limit)
        if not routed:
            return build_read(self, self.frames(), torch.cat([sink_t, slow_t, fast_t]), q_t)
        ppf, B, A = self.pages_per_frame, self.batch_size, self.num_axes
        rd = build_read(self, self.sink + list(self.window), torch.cat([sink_t, fast_t]), q_t,
                        width=(self.sink_frames + self.window_frames) * ppf)
        C, n = self.slow_frames, len(self.slow)
        # built on the host (frames' pages live there), moved in one copy each: no sync
        chunk_pages = torch.full((B, C, ppf), -1, dtype=torch.int32)
        chunk_shift = torch.zeros(B, C, A, dtype=torch.int32)
        valid = torch.zeros(B, C, dtype=torch.bool)
        if n:
            chunk_pages[:, :n] = torch.stack([fr.pages for fr in self.slow], 1).to(torch.int32)
            stored = torch.tensor([fr.t for fr in self.slow], dtype=torch.int64)
            d = slow_t - stored
            check_positions_fit("chunk shift (slow read t - stored t)", d, POS_LIMIT)  # int32
            chunk_shift[:, :n, 0] = d.to(torch.int32)
            valid[:, :n] = True
        any_shift = bool((chunk_shift != 0).any())
        dev = self.device
        return replace(rd, chunk_pages=chunk_pages.to(dev),
                       chunk_shift=chunk_shift.to(dev) if any_shift else None,
                       chunk_valid=valid.to(dev), chunk_ids=[fr.fid for fr in self.slow],
                       chunk_t=slow_t)

    def frame_positions(self, num_new: int, **read_kwargs) -> torch.Tensor:
        """``[n]`` int64 read position of each frame of :meth:`frames` (sink, slow, fast) for the
        next block; routing does not move positions."""
        return super().frame_positions(num_new, **{**read_kwargs, "routed": False})

    # ----------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The base state plus slow memory: ``slow.frames`` / ``slow.pages`` (oldest first),
        ``slow_desc`` ``[n, B, Lsel, Hkv * D]`` fp32 (each slow frame's descriptor when it was
        promoted), ``prev_desc`` ``[0 or 1, B, Lsel, Hkv * D]`` (the last frame to leave fast
        memory, if any) and the 0-d int64 counters ``promoted``, ``rejected``, ``evicted``."""
        B, Ls, HD = self.batch_size, len(self.novelty_layers), self.num_kv_heads * self.head_dim
        state = super().state_dict() | self._pack_frames("slow", self.slow)
        prev = [] if self._prev_desc is None else [self._prev_desc]
        for key, ds in (("slow_desc", self._slow_desc), ("prev_desc", prev)):
            state[key] = torch.stack(ds) if ds else \
                torch.zeros(0, B, Ls, HD, dtype=torch.float32, device=self.device)
        for name in ("promoted", "rejected", "evicted"):
            state[name] = torch.tensor(getattr(self, name), dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` output (see :meth:`PagedKVCache.load_state_dict`)."""
        self._check_state(state)
        n, got, prev = (state[k].shape[0] for k in ("slow.frames", "slow_desc", "prev_desc"))
        if got != n or prev > 1:
            raise ValueError(f"state_dict['slow_desc'] must hold one descriptor per slow frame "
                             f"({n}), got {got}; state_dict['prev_desc'] at most one, got {prev}")
        super().load_state_dict(state)
        self.slow = self._unpack_frames(state, "slow")
        descs = [d.clone() for d in state["slow_desc"].to(self.device)]
        self._slow_desc, self._discard = descs, False
        self._prev_desc = state["prev_desc"][0].to(self.device).clone() if prev else None
        self.promoted, self.rejected, self.evicted = (int(state[k]) for k in
                                                      ("promoted", "rejected", "evicted"))
