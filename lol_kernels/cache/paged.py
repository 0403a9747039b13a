"""Paged sink + window KV cache with un-rotated keys and per-frame chunk summaries.

Layout (all fixed at creation, never grown):

* ``k[layer], v[layer]``: ``[P, S, Hkv, D]`` pools, one per layer, sharing one page allocator.
* ``pos``: ``[P, S, A]`` int32 stored positions of every slot (the same for every layer).
* ``page_len``: ``[P]`` int32 filled slots of each page.
* ``summary[layer]``: ``[F_max, B, Hkv, D]`` fp32 mean un-rotated key of each frame slot (the
  chunk summary the MoC router reads), indexed by ``Frame.fid``.

A frame of ``Nf`` tokens of batch row ``b`` occupies ``ceil(Nf / S)`` fresh pages (a frame always
starts on a new page; only its last page may be partial). ``P = F_max * B * ceil(Nf / S)`` with
``F_max = sink + window + block`` frame slots: the block of headroom is what lets a new block be
written while the window it was denoised against is still intact.

Life of a block (see :mod:`lol_kernels.cache.policies` for the position policies)::

    read = cache.read(F)                        # a CacheRead of the frames before the block
    ... denoise with paged_attention(..., read.page_table, k_new=..., v_new=...)
    blk = cache.append_frames(pos)              # allocate F frames, evict the oldest window frames
    for layer: cache.write(layer, blk, k, v)    # write the clean block's un-rotated K/V

Pages freed by an eviction go to the back of the free list and are only reused by the *next*
``append_frames``, so a read built before ``append_frames`` stays valid through the write pass.

State. :meth:`PagedKVCache.state_dict` holds exactly what defines the cache (pools, frame lists,
free lists, counters) as tensors; :meth:`~PagedKVCache.load_state_dict` copies it back in place.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from .._checks import (
    POS_LIMIT,
    check_frame_times,
    check_positions_fit,
    check_shape,
    check_tensor,
)
from .policies import read_cache
from .read import CacheRead


@dataclass
class Frame:
    """One cached latent frame: slot ``fid``, stored temporal position ``t``, pages ``[B, n]``
    int64 **on the host** (bookkeeping: the device sees page ids through reads and
    :attr:`FrameBlock.slots`, so allocating and evicting never waits for the device)."""

    fid: int
    t: int
    pages: torch.Tensor
    serial: int
    sink: bool = False


@dataclass
class FrameBlock:
    """Frames allocated by one :meth:`PagedKVCache.append_frames` call (or named by
    :meth:`~PagedKVCache.rewrite_block`), ready to be written; only ``owner`` accepts it."""

    frames: list[Frame]
    slots: torch.Tensor  # [B, F * Nf] flat slot index (page * S + slot) of every token
    owner: object = field(default=None, repr=False, compare=False)  # the cache that made it
    epoch: int = -1  # the owner's epoch when made (reset and load_state_dict start a new one)
    fids: torch.Tensor | None = None  # [F] int64 frame slot of each frame, on slots' device

    def __post_init__(self):
        if self.fids is None:
            self.fids = torch.tensor([fr.fid for fr in self.frames], dtype=torch.int64,
                                     device=self.slots.device)


def write_frames(k_pool: torch.Tensor, v_pool: torch.Tensor, summary: torch.Tensor,
                 slots: torch.Tensor, fids: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> None:
    """Write the un-rotated ``k, v [B, F * Nf, Hkv, D]`` of ``F`` frames into one layer's pools
    ``[P, S, Hkv, D]`` at flat ``slots [B, F * Nf]`` and each frame's mean key (fp32) into
    ``summary [F_max, B, Hkv, D]`` at frame slots ``fids [F]``, all in place.

    Tensors only, no check and no host sync: what :meth:`PagedKVCache.write` runs after its
    checks, and what a compiled block step calls (its slots come from a checked
    :class:`FrameBlock`)."""
    P, S, Hkv, D = k_pool.shape
    idx = slots.reshape(-1)
    k_pool.view(P * S, Hkv, D)[idx] = k.reshape(-1, Hkv, D).to(k_pool.dtype)
    v_pool.view(P * S, Hkv, D)[idx] = v.reshape(-1, Hkv, D).to(v_pool.dtype)
    B, F = slots.shape[0], fids.shape[0]
    means = k.float().reshape(B, F, -1, Hkv, D).mean(dim=2)  # [B, F, Hkv, D]
    summary[fids] = means.transpose(0, 1)


class PagedKVCache:
    """Fixed-memory paged KV cache of ``sink`` pinned frames plus a ``window`` of recent frames.

    Args:
        num_layers: layers sharing the allocator (each gets its own K/V pool).
        num_kv_heads: ``Hkv``. head_dim: ``D``.
        frame_tokens: ``Nf`` tokens per latent frame (1560 for Wan at 480x832).
        sink_frames: frames pinned forever (the first ones written).
        window_frames: most recent non-sink frames kept; the oldest is evicted first.
        block_frames: frames per generated block (headroom; at most this many per append).
        page_size: ``S`` slots per page, a power of two >= 16 (what the Triton kernel tiles).
        batch_size: ``B`` streams, generated in lockstep.
        num_axes: ``A`` position axes (3 for ``t, h, w``).
        extra_frames: additional frame slots for subclasses (slow memory).
        dtype, device: of the K/V pools.
    """

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, frame_tokens: int,
                 sink_frames: int = 3, window_frames: int = 9, block_frames: int = 3,
                 page_size: int = 256, batch_size: int = 1, num_axes: int = 3,
                 extra_frames: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
        for name, val, lo in (("num_layers", num_layers, 1), ("num_kv_heads", num_kv_heads, 1),
                              ("head_dim", head_dim, 1), ("frame_tokens", frame_tokens, 1),
                              ("sink_frames", sink_frames, 0), ("window_frames", window_frames, 1),
                              ("block_frames", block_frames, 1), ("batch_size", batch_size, 1),
                              ("num_axes", num_axes, 1), ("extra_frames", extra_frames, 0)):
            if not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
        if not isinstance(page_size, int) or page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 16, got {page_size!r}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.frame_tokens, self.page_size, self.batch_size = frame_tokens, page_size, batch_size
        self.sink_frames, self.window_frames, self.block_frames = sink_frames, window_frames, block_frames
        self.num_axes, self.dtype, self.device = num_axes, dtype, torch.device(device)
        self.pages_per_frame = math.ceil(frame_tokens / page_size)
        self.max_frames = sink_frames + window_frames + block_frames + extra_frames
        self.num_pages = self.max_frames * batch_size * self.pages_per_frame
        P, S = self.num_pages, page_size
        self.k = [torch.zeros(P, S, num_kv_heads, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.v = [torch.zeros_like(self.k[0]) for _ in range(num_layers)]
        self.pos = torch.zeros(P, S, num_axes, dtype=torch.int32, device=device)
        self.page_len = torch.zeros(P, dtype=torch.int32, device=device)
        self.summary = [torch.zeros(self.max_frames, batch_size, num_kv_heads, head_dim,
                                    dtype=torch.float32, device=device) for _ in range(num_layers)]
        # token n of a frame lives on page n // S of that frame, slot n % S (host bookkeeping)
        n = torch.arange(frame_tokens)
        self._tok_page, self._tok_slot = n // S, n % S
        self._last_fill = frame_tokens - (self.pages_per_frame - 1) * S
        self.epoch = -1  # reset() starts epoch 0
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget every frame (pools are kept; nothing is reallocated)."""
        self.free_pages: deque[int] = deque(range(self.num_pages))
        self.free_fids: deque[int] = deque(range(self.max_frames))
        self.sink: list[Frame] = []
        self.window: deque[Frame] = deque()
        self.frames_written = 0
        self.next_t = 0
        self.page_len.zero_()
        self.slot_serial: dict[int, int] | None = {}
        self.epoch += 1

    def frames(self) -> list[Frame]:
        """Cached frames in read order: sink frames, then window frames oldest to newest."""
        return self.sink + list(self.window)

    @property
    def num_frames(self) -> int:
        return len(self.sink) + len(self.window)

    @property
    def max_read_pages(self) -> int:
        """Page-table width ``M`` of a full read (sink + window), for fixed-shape reads."""
        return (self.sink_frames + self.window_frames) * self.pages_per_frame

    def memory_bytes(self) -> int:
        """Bytes held by the cache's tensors (constant for the cache's lifetime)."""
        return sum(t.numel() * t.element_size() for t in self._pools().values())

    def _pools(self) -> dict[str, torch.Tensor]:
        """The fixed-size tensors, by state key."""
        out = {"pos": self.pos, "page_len": self.page_len}
        for layer in range(self.num_layers):
            out |= {f"k.{layer}": self.k[layer], f"v.{layer}": self.v[layer],
                    f"summary.{layer}": self.summary[layer]}
        return out

    # ----------------------------------------------------------------- reads
    def read(self, num_new: int, *, policy: str = "absolute", **policy_kwargs) -> CacheRead:
        """The :class:`CacheRead` the next block of ``num_new`` frames attends, under position
        ``policy`` (one of :data:`~lol_kernels.cache.POLICIES`; ``policy_kwargs`` such as
        ``max_frames`` or ``limit`` go to it). Valid until the next :meth:`append_frames`."""
        return read_cache(self, num_new, policy, **policy_kwargs)

    def frame_positions(self, num_new: int, **read_kwargs) -> torch.Tensor:
        """``[n]`` int64 temporal position each frame of :meth:`frames` is read at by the next
        block of ``num_new`` frames (``read_kwargs`` as for :meth:`read`)."""
        return self.read(num_new, **read_kwargs).frame_t

    def rewrite_block(self, frames) -> FrameBlock:
        """A :class:`FrameBlock` over cached ``frames``: :meth:`write` with it recomputes their
        K/V in place (LongLive recache); their pages and positions are kept. ``ValueError`` if a
        frame is not cached here (evicted, or another cache's)."""
        live = {(fr.fid, fr.serial): fr for fr in self.frames()}
        own = []
        for fr in frames:
            key = (getattr(fr, "fid", None), getattr(fr, "serial", None))
            if key not in live:
                raise ValueError(f"frames must be frames cached here (cache.frames()); frame slot "
                                 f"{key[0]} serial {key[1]} is not (evicted, or another cache's)")
            own.append(live[key])  # this cache's record: its pages, not the caller's copy
        if not own:
            raise ValueError("frames must name at least one cached frame")
        return self._block(own)

    def reassign(self, frames, t, serials) -> FrameBlock:
        """Make cached ``frames`` hold other frames of the stream (LongLive's recache without a
        global sink refills the sink with later frames): ``frames[i]`` keeps its slot, pages and
        group (sink or window) but becomes the frame of serial ``serials[i]`` at temporal
        position ``t[i]`` (its tokens' stored ``pos[..., 0]`` is rewritten). Their K/V are stale
        until :meth:`write` with the returned :class:`FrameBlock`; blocks made before for the
        old frames are refused from now on. ``ValueError`` if a frame is not cached here, a
        serial is repeated or held by another cached frame, or a ``t`` lies outside ``+-2^30``."""
        old = self.rewrite_block(frames).frames  # checks that every frame is cached here
        t = check_frame_times("t", t).reshape(-1).tolist()
        serials = [int(x) for x in serials]
        if len(t) != len(old) or len(serials) != len(old):
            raise ValueError(f"t and serials must give one value per frame ({len(old)}), got "
                             f"{len(t)} and {len(serials)}")
        if len({fr.fid for fr in old}) != len(old):
            raise ValueError("frames must be distinct")
        where = {id(g): (group, i) for group in (self.sink, self.window) for i, g in
                 enumerate(group)}
        if any(id(fr) not in where for fr in old):
            raise ValueError("frames must be sink or window frames")
        others = {fr.serial for fr in self.frames()} - {fr.serial for fr in old}
        if len(set(serials)) != len(serials) or others & set(serials):
            raise ValueError(f"serials must be distinct and not held by other cached frames, "
                             f"got {serials}")
        new = []
        for fr, ti, si in zip(old, t, serials):
            nf = Frame(fr.fid, ti, fr.pages, si, fr.sink)
            group, i = where[id(fr)]
            group[i] = nf
            slots = self._token_slots(fr.pages).reshape(-1).to(self.device)
            self.pos.view(-1, self.num_axes)[slots, 0] = ti
            self.claim_slot(nf)
            self.next_t = max(self.next_t, ti + 1)
            new.append(nf)
        return self.rewrite_block(new)

    def check_block(self, block) -> None:
        """Refuse a :class:`FrameBlock` that :meth:`write` must not write: one made by another
        cache, or a stale one, some frame slot of which was reallocated since (its pages now
        hold a newer frame). A frame evicted whose slot is still free may still be written."""
        if not isinstance(block, FrameBlock):
            raise TypeError(f"block must be a FrameBlock (append_frames / rewrite_block), got "
                            f"{type(block).__name__}")
        if block.owner is not self:
            raise ValueError("block was not made by this cache (append_frames / rewrite_block "
                             "of another cache, or built by hand); it would overwrite our pages")
        if block.epoch != self.epoch:
            raise ValueError("block is stale: it was made before the cache was reset or loaded "
                             "(load_state_dict); its frames are gone")
        owners = self.slot_owners()
        for fr in block.frames:
            if owners.get(fr.fid, -1) != fr.serial:
                raise ValueError(f"block is stale: frame {fr.serial} (slot {fr.fid}, t={fr.t}) "
                                 f"was evicted and its pages now hold frame "
                                 f"{owners.get(fr.fid, -1)}; write a block right after its "
                                 f"append_frames, or use rewrite_block(cache.frames()[...])")

    def _token_slots(self, pages: torch.Tensor) -> torch.Tensor:
        """``[B, Nf]`` flat slot (``page * S + slot``, on the host) of every token of a frame on
        host ``pages``."""
        return pages[:, self._tok_page] * self.page_size + self._tok_slot

    def _block(self, frames: list[Frame]) -> FrameBlock:
        """A :class:`FrameBlock` of ``frames`` (theirs, in order): slots and frame slots built
        on the host and moved to the device in one copy each."""
        slots = torch.cat([self._token_slots(fr.pages) for fr in frames], 1)
        fids = torch.tensor([fr.fid for fr in frames], dtype=torch.int64)
        return FrameBlock(frames, slots.to(self.device), self, self.epoch, fids.to(self.device))

    # ----------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that defines the cache's state, as tensors (pools by reference):

        * ``k.{l}``, ``v.{l}`` ``[P, S, Hkv, D]``, ``summary.{l}`` ``[F_max, B, Hkv, D]`` fp32,
          ``pos`` ``[P, S, A]`` int32, ``page_len`` ``[P]`` int32: the pools;
        * ``{group}.frames`` ``[n, 4]`` int64 rows ``(fid, t, serial, sink)`` and
          ``{group}.pages`` ``[n, B, ppf]`` int64, for the frame groups ``sink`` and ``window``
          (read order);
        * ``free_pages``, ``free_fids`` ``[n]`` int64 in allocation order; ``frames_written``,
          ``next_t`` 0-d int64.

        Sizes, dtype and device are the constructor's, not state.
        """
        state = dict(self._pools())
        state |= self._pack_frames("sink", self.sink) | self._pack_frames("window", self.window)
        state["free_pages"] = torch.tensor(list(self.free_pages), dtype=torch.int64)
        state["free_fids"] = torch.tensor(list(self.free_fids), dtype=torch.int64)
        state["frames_written"] = torch.tensor(self.frames_written, dtype=torch.int64)
        state["next_t"] = torch.tensor(self.next_t, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` output: pools are copied in place (same storage, constant
        memory). ``ValueError`` naming the key when a key is missing or unexpected or a tensor's
        dtype or shape does not fit this cache (the cache is then left unchanged)."""
        self._check_state(state)
        for key, pool in self._pools().items():
            pool.copy_(state[key])
        self.sink = self._unpack_frames(state, "sink")
        self.window = deque(self._unpack_frames(state, "window"))
        self.free_pages = deque(state["free_pages"].tolist())
        self.free_fids = deque(state["free_fids"].tolist())
        self.frames_written, self.next_t = int(state["frames_written"]), int(state["next_t"])
        self.slot_serial = None  # rebuilt from the frames on first use (subclasses add groups)
        self.epoch += 1

    def _pack_frames(self, group: str, frames) -> dict[str, torch.Tensor]:
        rows = [[fr.fid, fr.t, fr.serial, int(fr.sink)] for fr in frames]
        pages = [fr.pages.cpu() for fr in frames]
        empty = torch.zeros(0, self.batch_size, self.pages_per_frame, dtype=torch.int64)
        return {f"{group}.frames": torch.tensor(rows, dtype=torch.int64).reshape(-1, 4),
                f"{group}.pages": torch.stack(pages) if pages else empty}

    def _unpack_frames(self, state, group: str) -> list[Frame]:
        pages = state[f"{group}.pages"].cpu()
        return [Frame(fid, t, pages[i].clone(), serial, bool(sink))
                for i, (fid, t, serial, sink) in enumerate(state[f"{group}.frames"].tolist())]

    def _check_state(self, state) -> None:
        """Raise before anything changes if ``state`` does not fit this cache."""
        own, name = self.state_dict(), type(self).__name__
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise ValueError(f"state_dict does not fit a {name}: missing keys {missing}, "
                             f"unexpected keys {extra}")
        fixed = set(self._pools())
        for key, want in own.items():
            got = state[key]
            if not isinstance(got, torch.Tensor):
                raise TypeError(f"state_dict[{key!r}] must be a tensor, got {type(got).__name__}")
            fits = got.shape == want.shape if key in fixed or not want.dim() else \
                got.dim() == want.dim() and got.shape[1:] == want.shape[1:]
            if got.dtype != want.dtype or not fits:
                shape = list(want.shape) if key in fixed or not want.dim() else \
                    ["n", *want.shape[1:]]
                raise ValueError(f"state_dict[{key!r}] is {got.dtype} {list(got.shape)}; this "
                                 f"{name} needs {want.dtype} {shape}")
        groups = [key[: -len(".pages")] for key in own if key.endswith(".pages")]
        for g in groups:
            if state[f"{g}.frames"].shape[0] != state[f"{g}.pages"].shape[0]:
                raise ValueError(f"state_dict['{g}.frames'] and state_dict['{g}.pages'] hold "
                                 f"different frame counts")
        # every page and frame slot is free or held by exactly one cached frame
        pages = [state["free_pages"]] + [state[f"{g}.pages"].reshape(-1) for g in groups]
        fids = [state["free_fids"]] + [state[f"{g}.frames"][:, 0] for g in groups]
        for what, ids, n in (("pages", pages, self.num_pages), ("frame slots", fids,
                                                                 self.max_frames)):
            if not torch.equal(torch.cat([i.cpu() for i in ids]).sort().values, torch.arange(n)):
                raise ValueError(f"state_dict's frame and free lists do not share out the "
                                 f"cache's {n} {what} exactly once each")

    # ----------------------------------------------------------------- writes
    def append_frames(self, pos: torch.Tensor) -> FrameBlock:
        """Allocate pages for ``F`` new frames, record their positions, then evict.

        Args:
            pos: ``[B, F * Nf, A]`` int positions of the new tokens, frame-major; all tokens of a
                frame share one temporal position ``pos[..., 0]``. Each within ``+-2^30``
                (stored int32; the ops add a page shift of the same range in int32).

        Returns:
            :class:`FrameBlock` to pass to :meth:`write` for every layer.
        """
        check_tensor("pos", pos, ndim=3, kind="int")
        B, Nf, A = self.batch_size, self.frame_tokens, self.num_axes
        if pos.shape[1] % Nf or pos.shape[0] != B or pos.shape[2] != A:
            raise ValueError(f"pos must have shape [B={B}, F*{Nf}, A={A}], got {list(pos.shape)}")
        F = pos.shape[1] // Nf
        if not 1 <= F <= self.block_frames:
            raise ValueError(f"pos holds {F} frames; append 1..block_frames={self.block_frames}")
        # the invariants the ops rely on are checked here, on the host (positions come from
        # the host; a device pos costs one copy a block, never a sync per forward)
        host = pos if pos.device.type == "cpu" else pos.cpu()
        check_positions_fit("pos", host, POS_LIMIT)  # before the int32 cast would wrap them
        host = host.to(torch.int32).view(B, F, Nf, A)
        t = host[..., 0]
        if bool((t != t[:, :, :1]).any()) or bool((t[:, :, 0] != t[:1, :, 0]).any()):
            raise ValueError("pos[..., 0] must be one temporal position per frame, equal across B")
        ppf, S = self.pages_per_frame, self.page_size
        if len(self.free_pages) < F * B * ppf or len(self.free_fids) < F:
            raise RuntimeError("cache is out of pages: append at most block_frames frames "
                               "between evictions")
        frames = []
        for t_f in t[0, :, 0].tolist():
            pages = torch.tensor([self.free_pages.popleft() for _ in range(B * ppf)],
                                 dtype=torch.int64).view(B, ppf)
            fr = Frame(self.free_fids.popleft(), t_f, pages, self.frames_written,
                       sink=len(self.sink) < self.sink_frames)
            self.frames_written += 1
            self.claim_slot(fr)
            (self.sink if fr.sink else self.window).append(fr)
            frames.append(fr)
            self.next_t = max(self.next_t, fr.t + 1)
        block = self._block(frames)
        # the new frames' positions and fills, written in place with one copy each
        self.pos.view(-1, A)[block.slots.reshape(-1)] = host.to(self.device).reshape(-1, A)
        fill = torch.full((F, B, ppf), S, dtype=torch.int32)
        fill[..., -1] = self._last_fill
        pages = torch.stack([fr.pages for fr in frames]).reshape(-1)
        self.page_len[pages.to(self.device)] = fill.reshape(-1).to(self.device)
        while len(self.window) > self.window_frames:
            self._evict(self.window.popleft())
        return block

    def claim_slot(self, fr: Frame) -> None:
        """Record ``fr`` as the owner of its frame slot (and so of its pages: slots and pages
        are handed out and freed together, one frame's worth at a time)."""
        self.slot_owners()[fr.fid] = fr.serial

    def slot_owners(self) -> dict[int, int]:
        """Frame slot -> serial of the frame it was last given to (absent: never), the
        generation counter that tells a stale :class:`FrameBlock` from a live one."""
        if self.slot_serial is None:  # after load_state_dict: the slot owners are the frames
            self.slot_serial = {fr.fid: fr.serial for fr in self.frames()}
        return self.slot_serial

    def write(self, layer: int, block: FrameBlock, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the un-rotated ``k, v [B, F * Nf, Hkv, D]`` of ``block`` into ``layer``'s pool
        and update each frame's chunk summary (mean key per head, fp32)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        self.check_block(block)
        n = block.slots.shape[1]
        want = (self.batch_size, n, self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, ndim=4, kind="float")
            check_shape(name, t, want, "[B, F*Nf, Hkv, D] of the block")
        write_frames(self.k[layer], self.v[layer], self.summary[layer], block.slots,
                     block.fids, k, v)

    # ----------------------------------------------------------------- eviction
    def _evict(self, fr: Frame) -> None:
        """Return a frame's pages and slot to the free lists (subclasses may promote instead)."""
        self.free_pages.extend(fr.pages.reshape(-1).tolist())
        self.free_fids.append(fr.fid)

    def drop_window(self, keep_last: int) -> list[Frame]:
        """Evict all window frames but the newest ``keep_last``; returns the evicted frames."""
        if not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"keep_last must be an int >= 0, got {keep_last!r}")
        gone = []
        while len(self.window) > keep_last:
            fr = self.window.popleft()
            self._evict(fr)
            gone.append(fr)
        return gone
