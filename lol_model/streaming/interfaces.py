"""The seams of a stream, as ``typing.Protocol`` s: what may stand in for the model, the
forwards of a block, the prompt encoder, the decoder and the output sinks.

Implementations in the package: :class:`StreamModel` is met by
:class:`~lol_model.model.CausalWanModel` and the head-parallel
:class:`~lol_model.parallel.ulysses.UlyssesModel`; :class:`CacheForward` by both and by
:class:`~lol_model.streaming.forward.BlockForward` (eager, compiled or captured forwards);
:class:`FrameSink` by :class:`~lol_model.streaming.video.SegmentedVideoWriter` and
:class:`~lol_model.streaming.outputs.FrameCollector`; :class:`LatentSink` by
:class:`~lol_model.streaming.video.LatentWriter`; :class:`Decoder` by
:class:`~lol_model.model.vae.StreamingDecoder`; :class:`PromptEncoder` by
:class:`~lol_model.model.text.TextEncoder` and :class:`~lol_model.model.text.PrecomputedText`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from lol_kernels.cache import CacheRead, FrameBlock, PagedKVCache

from ..model.config import ModelConfig
from ..model.transformer import StepInputs, TextKV


@runtime_checkable
class CacheForward(Protocol):
    """One forward of a block's latents against a cache read, called as the model is.

    ``x [B, Cz, F, h, w]``, ``timestep [B, F]`` float32 (0..1000) -> the flow prediction
    ``[B, Cz, F, h, w]`` in ``x``'s dtype; with ``write`` the block's K/V go into the cache.
    """

    cfg: ModelConfig

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, text_kv: TextKV,
                 cache: PagedKVCache, read: CacheRead, *,
                 write: FrameBlock | None = None) -> torch.Tensor: ...


@runtime_checkable
class StreamModel(CacheForward, Protocol):
    """What a stream runs: the full model on one process or its head-parallel stand-in."""

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def rope_table(self): ...

    def grid(self, height: int, width: int) -> tuple[int, int]: ...

    def encode_text(self, context: torch.Tensor) -> TextKV: ...

    def new_cache(self, *, frame_tokens: int, page_size: int | None = None, dtype=None,
                  device=None, cache_cls=None, **cache_kwargs) -> PagedKVCache: ...

    def prepare(self, x: torch.Tensor, text_kv: TextKV, cache: PagedKVCache, read: CacheRead,
                *, write: FrameBlock | None = None) -> StepInputs: ...

    def step(self, x: torch.Tensor, timestep: torch.Tensor, text_k: list, text_v: list,
             pools: tuple, inputs: StepInputs, **opts) -> torch.Tensor: ...


@runtime_checkable
class PromptEncoder(Protocol):
    """Prompts -> context ``[B, text_len, text_dim]`` (:func:`~lol_model.model.text.encode_prompt`
    passes ``index``, the schedule segment, to encoders that take it)."""

    def __call__(self, prompts: list[str], *args, **kwargs) -> torch.Tensor: ...


@runtime_checkable
class Decoder(Protocol):
    """Latents ``[1, Cz, F, h, w]`` -> video ``[1, 3, Fv, H, W]`` in [-1, 1], block after block,
    with a causal state that a checkpoint saves and restores."""

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]: ...

    def load_state(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None: ...


@runtime_checkable
class FrameSink(Protocol):
    """Where decoded frames go: ``append(uint8 [Fv, H, W, 3])``; ``close_segment`` at every
    checkpoint; ``finalize`` at the end (returns the output path, if any)."""

    def append(self, frames: torch.Tensor) -> None: ...

    def close_segment(self) -> None: ...

    def finalize(self, *, keep_segments: bool = False) -> str | None: ...


@runtime_checkable
class LatentSink(Protocol):
    """Where clean latents go, in segments that checkpoints record and resume truncates to."""

    segments: list

    def append(self, z: torch.Tensor) -> None: ...

    def close_segment(self) -> None: ...

    def truncate(self, kept) -> None: ...
