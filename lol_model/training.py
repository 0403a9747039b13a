"""Training forward of :class:`~lol_model.model.CausalWanModel`: teacher forcing and diffusion
forcing over a clip, on the attention op streaming uses, with the frames a cache configuration
lets each block see.

A clip of ``F`` latent frames is cut into blocks of ``F_b`` frames (block ``i`` = frames
``[i F_b, (i + 1) F_b)``). Block ``i`` attends the **context** the streaming cache holds when it
is generated (the frames written before it: the sink, i.e. the first ``sink_frames``, then the
newest ``window`` of the others, oldest first) followed by its own frames, every frame at its
absolute index as temporal RoPE position (the ``absolute`` policy)::

    mode="teacher"    x = [clean clip | noisy clip]     (2F frames, one forward)
        clean block i -> context_i of the clean clip + clean block i   (the write pass)
        noisy block i -> context_i of the clean clip + noisy block i   (a denoising step)
    mode="diffusion"  x = noisy clip, each block at its own noise level
        block i       -> context_i of the noisy clip + block i          (block-causal)

Each block is one :func:`lol_kernels.rope_attention` call (RoPE with the model's jittered table
inside the op, differentiable in ``q``, ``k``, ``v``) over exactly the keys it sees, so the
cost is what streaming pays and no mask is built. Teacher forcing with clean context
(``context_timestep=0``) reproduces, block for block, what the streaming generator predicts
after writing the clean blocks (tests/training/test_training.py).

Flow matching as :mod:`lol_model.streaming.sampling`: ``x_t = (1 - sigma) x0 + sigma noise`` with
``sigma = t / 1000``; the model predicts the flow ``noise - x0`` (:func:`flow_matching_loss`).

Example::

    model.configure_rope(jitter_sigma=0.8)
    tk = model.encode_text(context)
    loss = training_loss(model, clean, tk, block_frames=3, cache="longlive", generator=g)
    loss.backward()
"""

from __future__ import annotations

import torch

import lol_kernels as lk
from lol_kernels.cache import PagedKVCache, SlowFastCache

from .model.transformer import frame_timesteps
from .streaming.presets import CacheConfig, GrowingKVCache, get_cache_config
from .streaming.sampling import randn, shift_sigma

MODES = ("teacher", "diffusion")


# --------------------------------------------------------------------------- which frames
def resolve_cache(cache) -> CacheConfig | None:
    """``cache`` as a :class:`CacheConfig` (a registered name is looked up; ``None`` stays:
    every earlier frame is seen). ``ValueError`` naming ``cache`` for a configuration training
    does not express: its positions are not absolute frame indices, or it has slow memory."""
    if cache is None:
        return None
    if isinstance(cache, str):
        cache = get_cache_config(cache)
    if not isinstance(cache, CacheConfig):
        raise TypeError(f"cache must be None, a cache name or a CacheConfig, got "
                        f"{type(cache).__name__}")
    if cache.policy != "absolute" or not issubclass(cache.cache_cls, PagedKVCache) \
            or issubclass(cache.cache_cls, SlowFastCache) or cache.policy_kwargs:
        raise ValueError(f"cache {cache.name!r} is not supported in training: only sink + window "
                         f"caches read at absolute positions (longlive, lol, sink-window, "
                         f"self-forcing, self-forcing-rolling, growing); got policy "
                         f"{cache.policy!r}, {cache.cache_cls.__name__}")
    return cache


def block_context(num_frames: int, block_frames: int, cache=None) -> list[list[int]]:
    """The earlier frames each block attends, in the cache's read order.

    Args:
        num_frames: ``F`` frames of the clip, a multiple of ``block_frames``.
        block_frames: ``F_b`` frames per block.
        cache: ``None`` (every earlier frame), or a cache name / :class:`CacheConfig` accepted
            by :func:`resolve_cache`: the sink (first ``sink_frames`` frames) then the newest
            ``window_for(block_frames)`` other frames written before the block.

    Returns:
        ``F / F_b`` lists of frame indices (block 0's is empty).
    """
    if not isinstance(block_frames, int) or block_frames < 1:
        raise ValueError(f"block_frames must be an int >= 1, got {block_frames!r}")
    if not isinstance(num_frames, int) or num_frames < 1 or num_frames % block_frames:
        raise ValueError(f"block_frames={block_frames} must split the clip's {num_frames} "
                         f"frames into whole blocks")
    cfg = resolve_cache(cache)
    sink, window = 0, None  # None: keep every frame
    if cfg is not None and not issubclass(cfg.cache_cls, GrowingKVCache):
        sink, window = cfg.sink_frames, cfg.window_for(block_frames)
    out = []
    for start in range(0, num_frames, block_frames):
        pinned = list(range(min(sink, start)))
        rest = list(range(len(pinned), start))
        out.append(pinned + (rest if window is None else rest[max(0, len(rest) - window):]))
    return out


# --------------------------------------------------------------------------- attention
def block_keys(t: torch.Tensor, context: torch.Tensor, own: slice) -> torch.Tensor:
    """Keys (or values) one block attends in every stream: ``t [B, streams, F, Nf, H, D]``,
    frames ``context [n]`` int64 of stream 0, then each stream's own frames ``own``. Returns
    ``[streams * B, (n + |own|) * Nf, H, D]`` (stream-major on the batch axis)."""
    B, streams, _, _, H, D = t.shape
    ctx = t[:, 0].index_select(1, context)  # one copy in all: the streams share the context
    return torch.cat([ctx.expand(streams, *ctx.shape), t[:, :, own].transpose(0, 1)], 2
                     ).reshape(streams * B, -1, H, D)


def block_attention(table, context: list[list[int]], block_frames: int, streams: int,
                    grid: tuple[int, int], *, device=None, backend: str = "auto"):
    """The ``attend(layer, q, k, v)`` of :meth:`CausalWanModel.forward_attend` for a clip of
    ``streams`` copies (teacher: clean, then noisy; diffusion: one) of ``F`` frames.

    ``q, k, v [B, streams * F * Nf, H, D]`` (stream-major, then frames, ``Nf = gh * gw``).
    Block ``i`` of every stream attends the keys of frames ``context[i]`` of stream 0, then its
    own block's keys, at absolute frame positions: one :func:`lol_kernels.rope_attention` call
    per block, the streams stacked on the batch axis. Returns ``[B, N, H, D]``.
    """
    gh, gw = grid
    Nf, Fb = gh * gw, block_frames
    plan = []
    for i, ctx in enumerate(context):
        own = list(range(i * Fb, (i + 1) * Fb))
        q_t, k_t = torch.tensor(own), torch.tensor(ctx + own)
        plan.append((torch.tensor(ctx, dtype=torch.int64, device=device), q_t, k_t))
    pos = {}  # (B, block) -> positions on the device, built once per batch size

    def attend(layer, q, k, v):
        B, _, H, D = q.shape
        Fr = len(plan) * Fb
        q, k, v = (t.view(B, streams, Fr, Nf, H, D) for t in (q, k, v))
        outs = []
        for i, (idx, q_t, k_t) in enumerate(plan):
            if (B, i) not in pos:
                pos[B, i] = tuple(lk.token_positions(t, gh, gw, streams * B).to(q.device)
                                  for t in (q_t, k_t))
            qp, kp = pos[B, i]
            own = slice(i * Fb, (i + 1) * Fb)
            qi = q[:, :, own].transpose(0, 1).reshape(streams * B, Fb * Nf, H, D)
            o = lk.rope_attention(qi, block_keys(k, idx, own), block_keys(v, idx, own), qp, kp,
                                  table, backend=backend)
            outs.append(o.view(streams, B, Fb, Nf, H, D))
        return torch.cat(outs, 2).transpose(0, 1).reshape(B, streams * Fr * Nf, H, D)

    return attend


# --------------------------------------------------------------------------- forward
def training_forward(model, clean: torch.Tensor | None, noisy: torch.Tensor, timesteps,
                     text_kv, *, block_frames: int, mode: str = "teacher", cache=None,
                     context_timestep=0.0, backend: str = "auto") -> torch.Tensor:
    """Flow prediction (``noise - x0``) of every noisy frame of a clip, in one forward.

    Args:
        model: a :class:`~lol_model.model.CausalWanModel` (its ``rope_table``, jitter
            included, positions the frames).
        clean: teacher forcing: ``[B, Cz, F, H, W]`` clean context clip (noised by the caller
            for context noise, then give ``context_timestep``); diffusion forcing: ``None``.
        noisy: ``[B, Cz, F, H, W]`` noisy clip ``x_t``.
        timesteps: ``[B, F]`` float in ``[0, 1000]`` of the noisy frames (one level per block
            from :func:`sample_block_timesteps`; ``[B]`` or a scalar broadcast).
        text_kv: :class:`~lol_model.model.TextKV` of the prompts (batch ``B`` or 1).
        block_frames: ``F_b`` frames per block; must divide ``F``.
        mode: ``"teacher"`` (noisy block ``i`` sees the clean blocks before it, within the
            cache's window, and itself; the clean blocks are block-causal among themselves) or
            ``"diffusion"`` (the noisy clip block-causal over itself).
        cache: which earlier frames a block sees: ``None`` (all), or a cache name /
            :class:`~lol_model.streaming.presets.CacheConfig` with absolute positions (see
            :func:`resolve_cache`); its ``jitter_sigma`` is not applied (the model's table is).
        context_timestep: teacher only: timestep of the clean clip (scalar, ``[B]`` or
            ``[B, F]``; 0 = clean, what the streaming write pass uses).
        backend: of :func:`lol_kernels.rope_attention`.

    Returns:
        ``[B, Cz_out, F, H, W]`` in ``noisy.dtype``, differentiable in the model's parameters
        (and ``text_kv`` when it was computed with grad).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if not isinstance(noisy, torch.Tensor) or noisy.dim() != 5 or not noisy.is_floating_point():
        got = tuple(noisy.shape) if isinstance(noisy, torch.Tensor) else type(noisy).__name__
        raise ValueError(f"noisy must be a float tensor [B, Cz, F, H, W], got {got}")
    B, _, Fr, H, W = noisy.shape
    if mode == "teacher":
        if not isinstance(clean, torch.Tensor) or clean.shape != noisy.shape:
            got = tuple(clean.shape) if isinstance(clean, torch.Tensor) else clean
            raise ValueError(f"clean must be a tensor shaped like noisy {tuple(noisy.shape)} in "
                             f"teacher forcing, got {got}")
    elif clean is not None:
        raise ValueError("clean must be None in diffusion forcing (the noisy clip is its own "
                         "context); use mode='teacher' for a clean context")
    context = block_context(Fr, block_frames, cache)
    dev = model.device
    t = frame_timesteps(timesteps, B, Fr, dev, "timesteps").float()
    x, streams = noisy, 1
    if mode == "teacher":
        t = torch.cat([frame_timesteps(context_timestep, B, Fr, dev, "context_timestep").float(), t], 1)
        x, streams = torch.cat([clean.to(noisy.dtype), noisy], 2), 2
    attend = block_attention(model.rope_table, context, block_frames, streams,
                             model.grid(H, W), device=dev, backend=backend)
    return model.forward_attend(x, t, text_kv, attend)[:, :, -Fr:]


# --------------------------------------------------------------------------- flow matching
def sample_block_timesteps(batch_size: int, num_frames: int, block_frames: int, *,
                           generator: torch.Generator | None = None, min_t: float = 20.0,
                           max_t: float = 980.0, shift: float = 1.0, uniform: bool = False,
                           device=None) -> torch.Tensor:
    """Per-block noise levels ``[B, F]`` float32: one timestep per block (every frame of a block
    shares it; ``uniform``: one per clip), drawn uniformly in ``[min_t, max_t)`` on the CPU
    ``generator``, then warped by the flow-matching ``shift`` (as
    :func:`~lol_model.streaming.sampling.shift_sigma`; 1 = none) and clamped back into the range
    (Self-Forcing / CausVid's diffusion-forcing sampler, in continuous time)."""
    if not isinstance(block_frames, int) or block_frames < 1 or num_frames % block_frames:
        raise ValueError(f"block_frames={block_frames!r} must split num_frames={num_frames}")
    if not 0 <= min_t < max_t <= 1000:
        raise ValueError(f"min_t < max_t must lie in [0, 1000], got {min_t}, {max_t}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    n = 1 if uniform else num_frames // block_frames
    u = torch.rand(batch_size, n, generator=generator, dtype=torch.float64)
    t = 1000.0 * shift_sigma((min_t + (max_t - min_t) * u) / 1000.0, shift)
    t = t.clamp(min_t, max_t).repeat_interleave(num_frames // n, dim=1)
    return t.to(device=device, dtype=torch.float32)


def add_noise(clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) x0 + sigma noise``, ``sigma = t / 1000`` per frame: ``clean, noise
    [B, Cz, F, H, W]``, ``timesteps [B, F]``; computed in fp32, returned in ``clean.dtype``."""
    s = (timesteps.float() / 1000.0)[:, None, :, None, None]
    return ((1 - s) * clean.float() + s * noise.float()).to(clean.dtype)


def flow_matching_loss(pred: torch.Tensor, clean: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the flow prediction ``pred`` against ``noise - clean`` (all
    ``[B, Cz, F, H, W]``), in fp32: a 0-d fp32 tensor."""
    return torch.mean((pred.float() - (noise.float() - clean.float())) ** 2)


def training_loss(model, clean: torch.Tensor, text_kv, *, block_frames: int,
                  mode: str = "teacher", cache=None, generator: torch.Generator | None = None,
                  shift: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """One flow-matching loss of ``clean [B, Cz, F, H, W]``: per-block timesteps
    (:func:`sample_block_timesteps`) and noise drawn on the CPU ``generator``, the noisy clip
    predicted by :func:`training_forward` (teacher: against the clean clip at ``t = 0``;
    diffusion: against itself). Returns a 0-d fp32 tensor."""
    B, _, Fr = clean.shape[:3]
    t = sample_block_timesteps(B, Fr, block_frames, generator=generator, shift=shift,
                               device=model.device)
    noise = randn(clean.shape, generator, dtype=clean.dtype, device=clean.device)
    noisy = add_noise(clean, noise, t)
    pred = training_forward(model, clean if mode == "teacher" else None, noisy, t, text_kv,
                            block_frames=block_frames, mode=mode, cache=cache, backend=backend)
    return flow_matching_loss(pred, clean, noise)
