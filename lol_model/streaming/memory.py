"""The memory a stream needs, estimated from its settings alone before anything is allocated,
and the memory in use (:func:`rss_bytes`).

:func:`check_memory` refuses a run whose cache, weights and activations cannot fit the device.
"""

from __future__ import annotations

import os

import torch

from lol_kernels.diagnostics.cli import available_memory as host_memory

from ..model.config import ModelConfig
from ..model.transformer import default_page_size
from .presets import GrowingKVCache
from .settings import StreamSettings


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def available_memory(device: str) -> tuple[int, str] | None:
    """``(bytes, where)`` free for new allocations on ``device``: ``MemAvailable`` of
    ``/proc/meminfo`` for the CPU, ``torch.cuda.mem_get_info`` for CUDA; ``None`` if unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0], f"free on {device}"
    if dev.type == "cpu":
        return host_memory(), "available in RAM"
    return None


def estimate_memory(s: StreamSettings, dtype: torch.dtype) -> dict[str, int]:
    """Bytes a stream with settings ``s`` (a ``StreamSettings``) needs at least, by part, with
    weights and cache in the torch ``dtype`` (``s.dtype`` resolved by the caller).

    ``cache``: K/V pages, positions and summaries of every frame the cache holds (sink + window +
    block + slow frames; every frame of the run for a cache that never evicts), plus the kept
    clean latents. ``weights``: the transformer's linear layers.
    ``activations``: one block's widest layer (FFN hidden and q/k/v/o of every query token) and
    the K/V gathered for its read. A lower bound: the VAE, the text encoder and the allocator's
    slack come on top, so a run that is refused would certainly not fit.
    """
    m = ModelConfig.preset(s.preset)
    c = s.cache_config()
    elem, B, F = dtype.itemsize, s.batch_size, s.block_frames
    _, ph, pw = m.patch_size
    tokens = (s.latent_height // ph) * (s.latent_width // pw)  # per frame
    page = default_page_size(tokens)
    slots = -(-tokens // page) * page  # a frame fills whole pages
    frames = c.sink_frames + c.window_for(F) + F + c.cache_kwargs.get("slow_frames", 0)
    if issubclass(c.cache_cls, GrowingKVCache):
        frames = c.sink_frames + (s.blocks + 1) * F
    kv = 2 * m.num_layers * frames * B * slots * m.dim * elem
    extra = frames * B * slots * 3 * 4 + m.num_layers * frames * B * m.dim * 4  # pos, summary
    latents = frames * B * m.in_channels * s.latent_height * s.latent_width * elem
    weights = m.num_layers * (8 * m.dim * m.dim + 2 * m.dim * m.ffn_dim) * elem
    q = B * F * tokens
    act = q * (m.ffn_dim + 4 * m.dim) * elem + 2 * B * frames * slots * m.dim * elem
    return {"cache": kv + extra + latents, "weights": weights, "activations": act}


def check_memory(s: StreamSettings, dtype: torch.dtype) -> None:
    """``ValueError`` naming the options that size the run when :func:`estimate_memory` exceeds
    the memory available on ``s.device`` (checked before anything is built)."""
    have = available_memory(s.device)
    if have is None:
        return
    need = estimate_memory(s, dtype)
    total = sum(need.values())
    if total <= have[0]:
        return
    c = s.cache_config()
    grows = issubclass(c.cache_cls, GrowingKVCache)
    w, h = 8 * s.latent_width, 8 * s.latent_height
    gib = 2**30
    parts = ", ".join(f"{k} {v / gib:.1f}" for k, v in need.items())
    lower = "--blocks/--seconds (the growing cache keeps every frame)" if grows else \
        "--sink-size, --local-attn-size/--window-frames"
    window = c.window_for(s.block_frames)
    raise ValueError(
        f"--size {w}x{h} with --cache {s.cache} ({c.sink_frames} sink + {window} window "
        f"frames{f', {s.blocks} blocks' if grows else ''}), --preset {s.preset} and "
        f"--dtype {s.dtype} need at least {total / gib:.1f} GiB ({parts} GiB); "
        f"{have[0] / gib:.1f} GiB is {have[1]}: lower --size, {lower}, or use a smaller "
        f"--dtype")
