"""Few-step flow-matching sampling of one block, as Self-Forcing / CausVid / LongLive sample.

Timesteps. The base sigmas of ``n`` steps are ``1, 1 - 1/n, ..., 1/n`` (``1, .75, .5, .25`` for 4
steps) and are warped by the flow-matching shift ``s' = shift * s / (1 + (shift - 1) * s)``.
With ``shift = 5``::

    s = 1.00 -> 5 / 5        = 1.0       t = 1000
    s = 0.75 -> 3.75 / 4     = 0.9375    t =  937.5
    s = 0.50 -> 2.5 / 3      = 0.8333..  t =  833.33
    s = 0.25 -> 1.25 / 2     = 0.625     t =  625

and the model is conditioned on ``t = 1000 * s'``.

One block::

    x = noise                                    # sigma_0 = 1
    for each step i:
        pred = model(x, t_i)                     # flow prediction: noise - x0
        x0 = x - sigma_i * pred                  # since x_t = (1 - sigma) x0 + sigma noise
        x = (1 - sigma_{i+1}) x0 + sigma_{i+1} * fresh_noise    # re-noise, not an ODE step
    model(x0, t = 0, write=block)                # clean pass: writes the block's K/V

so a block costs ``steps + 1`` forwards. All noise comes from one CPU ``torch.Generator`` so a
run is reproducible (and resumable bit for bit) whatever the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lol_kernels.cache import CacheRead, PagedKVCache, token_positions

from ..model.transformer import TextKV
from .interfaces import CacheForward

SHIFT = 5.0
NUM_STEPS = 4


def shift_sigma(sigma, shift: float = SHIFT):
    """Flow-matching timestep shift ``shift * s / (1 + (shift - 1) * s)`` (identity at 1)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sampling_sigmas(steps: int = NUM_STEPS, shift: float = SHIFT) -> list[float]:
    """Warped sigmas of ``steps`` denoising steps, from 1 down (``[1, .9375, .8333, .625]``)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    return [float(shift_sigma(1 - i / steps, shift)) for i in range(steps)]


def sigmas_from_timesteps(timesteps: Sequence[float]) -> list[float]:
    """Sigmas ``t / 1000`` of explicit timesteps (strictly decreasing, in ``(0, 1000]``)."""
    ts = [float(t) for t in timesteps]
    if not ts or any(not 0 < t <= 1000 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing values in (0, 1000], got {ts}")
    return [t / 1000.0 for t in ts]


def randn(shape, generator: torch.Generator, *, dtype, device) -> torch.Tensor:
    """Standard normal noise drawn on the CPU generator (device-independent), then moved."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device,
                                                                           dtype=dtype)


def denoise_block(model: CacheForward, shape, text_kv: TextKV, cache: PagedKVCache,
                  read: CacheRead, sigmas, generator: torch.Generator, *, dtype,
                  device) -> torch.Tensor:
    """Sample the clean latents ``x0 [B, Cz, F, H, W]`` of one block against ``read``.

    ``model`` is a :class:`~lol_model.model.CausalWanModel` or anything called like one on a
    cache (:class:`~lol_model.streaming.interfaces.CacheForward`: compiled or captured forwards,
    the head-parallel model). The cache is only read here; :func:`write_block` stores the
    block's K/V afterwards.
    """
    B, _, F = shape[:3]
    x = randn(shape, generator, dtype=dtype, device=device)
    x0 = x
    for i, s in enumerate(sigmas):
        t = torch.full((B, F), 1000.0 * s, dtype=torch.float32, device=device)
        pred = model(x, t, text_kv, cache, read)
        x0 = x - s * pred
        if i + 1 < len(sigmas):
            s_next = sigmas[i + 1]
            x = (1 - s_next) * x0 + s_next * randn(shape, generator, dtype=dtype, device=device)
    return x0


def write_block(model: CacheForward, x0: torch.Tensor, text_kv: TextKV, cache: PagedKVCache,
                read: CacheRead, q_t: torch.Tensor | None = None):
    """Clean pass at ``t = 0``: append the block's frames at ``q_t`` (default ``read.q_t``) and
    write their K/V (``model`` as in :func:`denoise_block`). Returns the
    :class:`~lol_kernels.cache.FrameBlock`."""
    B, _, F, H, W = x0.shape
    gh, gw = H // model.cfg.patch_size[1], W // model.cfg.patch_size[2]
    q_t = read.q_t if q_t is None else q_t
    blk = cache.append_frames(token_positions(q_t, gh, gw, B))  # host positions: no sync
    t0 = torch.zeros(B, F, dtype=torch.float32, device=x0.device)
    model(x0, t0, text_kv, cache, read, write=blk)
    return blk
