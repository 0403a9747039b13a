"""A running stream and the functions that advance it by one block.

One block (:func:`advance`)::

    switch_prompt(stream)        # at a schedule boundary: new text K/V, then KV Flush + RoPE Cut
                                 # ("#") or a LongLive recache of the cached frames
    x0 = sample_block(stream)    # steps forwards against the cache read, then the write pass
    emit(stream, x0)             # streaming VAE decode -> mp4 segment; latents (optional)

:class:`Stream` holds everything that changes; the step functions are small and explicit.
Randomness: one CPU ``torch.Generator`` seeded with ``seed`` draws all noise, so the latents
depend only on the settings, and a resumed run reproduces an uninterrupted one bit for bit.
The loop that runs blocks, checkpoints and outputs is :mod:`lol_model.streaming.driver`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lol_kernels.cache import PagedKVCache
from lol_kernels.rope import check_seed

from ..errors import GenerationError
from ..model.config import ModelConfig
from ..model.text import encode_prompt, load_text_encoder
from ..model.transformer import CausalWanModel, TextKV
from ..model.vae import to_uint8_frames
from ..model.weights import load_model
from .forward import BlockForward
from .interfaces import Decoder, FrameSink, LatentSink, PromptEncoder, StreamModel
from .presets import CacheConfig
from .prompts import PromptSchedule, parse_schedule
from .sampling import denoise_block, sampling_sigmas, sigmas_from_timesteps, write_block
from .settings import StreamSettings


@dataclass
class Stream:
    """Mutable state of a running stream."""

    settings: StreamSettings
    model: StreamModel
    cache_cfg: CacheConfig
    cache: PagedKVCache
    schedule: PromptSchedule
    text_encoder: PromptEncoder
    sigmas: list[float]
    generator: torch.Generator
    dtype: torch.dtype
    device: torch.device
    block: int = 0  # blocks finished
    segment: int = 0  # schedule segment whose prompt text_kv encodes
    text_kv: TextKV | None = None
    latents: dict[int, torch.Tensor] = field(default_factory=dict)  # fid -> [B, Cz, 1, h, w]
    # (serial, t, clean latent) of the newest generated frames, at most recache_span (LongLive
    # recache only): it recomputes frames the cache has already evicted
    recent: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)
    pending_cut: bool = False
    decoder: Decoder | None = None
    video: FrameSink | None = None
    latent_writer: LatentSink | None = None
    frames_out: int = 0  # video frames written
    forward: BlockForward | None = None  # the block's forwards over ``model``

    @property
    def latent_shape(self) -> tuple[int, ...]:
        s = self.settings
        return (s.batch_size, self.model.cfg.in_channels, s.block_frames, s.latent_height,
                s.latent_width)


def build_model(s: StreamSettings, dtype, device) -> CausalWanModel:
    """The transformer: weights from ``s.checkpoint``, or random (seeded) for the tiny default;
    its RoPE table holds the settings' jitter (:meth:`StreamSettings.resolved_jitter_sigma`)."""
    if s.checkpoint:
        model = load_model(s.checkpoint, s.preset, lora=s.lora, lora_alpha=s.lora_alpha,
                           ema=s.ema, dtype=dtype, device=device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            model = CausalWanModel(ModelConfig.preset(s.preset))
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.configure_rope(jitter_sigma=s.resolved_jitter_sigma(), seed=s.jitter_seed)
    return model


def new_stream(s: StreamSettings, *, model: StreamModel | None = None,
               text_encoder: PromptEncoder | None = None) -> Stream:
    """Build a stream at block 0 (model, cache, text encoder, noise generator); outputs are
    attached apart (:func:`lol_model.streaming.outputs.attach_outputs`)."""
    dtype = s.torch_dtype()
    if not isinstance(s.blocks, int) or s.blocks < 1:
        raise ValueError(f"blocks must be an int >= 1, got {s.blocks!r}")
    check_seed("seed", s.seed)
    check_seed("jitter_seed", s.jitter_seed)
    device = torch.device(s.device)
    schedule = parse_schedule(s.prompt, block_frames=s.block_frames)
    model = model if model is not None else build_model(s, dtype, device)
    gh, gw = model.grid(s.latent_height, s.latent_width)
    cache_cfg = s.cache_config()
    cache = cache_cfg.new_cache(model, frame_tokens=gh * gw, block_frames=s.block_frames,
                                batch_size=s.batch_size, dtype=dtype, device=device)
    if text_encoder is None:
        text_encoder = load_text_encoder(s.text_encoder, text_dim=model.cfg.text_dim,
                                         text_len=model.cfg.text_len, seed=s.seed, device=device,
                                         dtype=dtype)
    sigmas = sigmas_from_timesteps(s.timesteps) if s.timesteps else \
        sampling_sigmas(s.steps, s.shift)
    gen = torch.Generator().manual_seed(s.seed)
    st = Stream(s, model, cache_cfg, cache, schedule, text_encoder, sigmas, gen, dtype, device)
    st.forward = block_forward(s, model, cache)
    st.text_kv = encode_text(st, 0)
    return st


def block_forward(s: StreamSettings, model: StreamModel, cache: PagedKVCache) -> BlockForward:
    """The :class:`~lol_model.streaming.forward.BlockForward` of ``s.compile`` / ``s.cuda_graphs``;
    ``ValueError`` naming the option when the stream cannot be compiled or captured."""
    if (s.compile or s.cuda_graphs) and cache.max_read_pages == 0:
        raise ValueError(f"--compile / --cuda-graphs need a cache of fixed size; cache "
                         f"{s.cache!r} grows every block (its shapes change)")
    if s.cuda_graphs and model.device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs --device cuda, got {s.device!r}")
    if s.compile is not None and not (isinstance(s.compile, str) and s.compile):
        raise ValueError(f"--compile must name a torch.compile backend, got {s.compile!r}")
    return BlockForward(model, compile=s.compile, cuda_graphs=s.cuda_graphs)


@torch.no_grad()
def encode_text(st: Stream, segment: int) -> TextKV:
    """The text K/V of schedule segment ``segment``'s prompt."""
    prompt = st.schedule.segments[segment].prompt
    ctx = encode_prompt(st.text_encoder, prompt, batch_size=st.settings.batch_size, index=segment)
    return st.model.encode_text(ctx)


def _keep_latents(st: Stream, blk, x0: torch.Tensor) -> None:
    """Remember each written frame's clean latent by frame slot; forget evicted frames. With
    the LongLive recache also keep the newest ``recache_span`` frames, evicted or not."""
    for f, fr in enumerate(blk.frames):
        st.latents[fr.fid] = x0[:, :, f : f + 1].clone()
        if st.cache_cfg.recache == "longlive":
            st.recent.append((fr.serial, fr.t, st.latents[fr.fid]))
    del st.recent[: max(0, len(st.recent) - st.cache_cfg.recache_span(st.cache))]
    live = {fr.fid for fr in st.cache.frames()}
    for fid in [k for k in st.latents if k not in live]:
        del st.latents[fid]


@torch.no_grad()
def recache(st: Stream) -> None:
    """Recompute the cached frames' K/V under the current prompt (``st.text_kv``) from their
    clean latents at timestep 0, as ``st.cache_cfg.recache`` says:

    * ``"longlive"``: LongLive's one pass over the newest ``recache_span`` frames, evicted ones
      included, sink kept or refilled per ``global_sink``
      (:meth:`~lol_model.streaming.presets.CacheConfig.longlive_replay`);
    * ``"block-causal"``: every cached frame (sink included), in read order, ``block_frames``
      at a time, each chunk attending the already recomputed frames before it, all at their
      current read positions.
    """
    F = st.settings.block_frames
    if st.cache_cfg.recache == "longlive":
        order, read, blk = st.cache_cfg.longlive_replay(
            st.cache, [(s, t) for s, t, _ in st.recent], F)
        x0 = torch.cat([st.recent[i][2] for i in order], dim=2)
        t0 = torch.zeros(x0.shape[0], x0.shape[2], dtype=torch.float32, device=st.device)
        st.model(x0, t0, st.text_kv, st.cache, read, write=blk)
        z = {s: latent for s, _, latent in st.recent}
        st.latents.update({fr.fid: z[fr.serial] for fr in blk.frames})  # a refilled sink
        return
    frames = st.cache.frames()
    frame_t = st.cache_cfg.frame_positions(st.cache, F)
    for i in range(0, len(frames), F):
        read, blk = st.cache_cfg.replay(st.cache, i, F, frame_t)
        x0 = torch.cat([st.latents[fr.fid] for fr in blk.frames], dim=2)
        t0 = torch.zeros(x0.shape[0], x0.shape[2], dtype=torch.float32, device=st.device)
        st.model(x0, t0, st.text_kv, st.cache, read, write=blk)


def switch_prompt(st: Stream) -> None:
    """Apply a schedule boundary at block ``st.block``: new text K/V, then KV Flush + RoPE Cut
    (``#``) or a recache of the cached frames with the new prompt."""
    seg = st.schedule.segment_index(st.block)
    if seg == st.segment:
        return
    st.segment = seg
    st.text_kv = encode_text(st, seg)
    if st.schedule.segments[seg].cut:
        st.cache_cfg.flush(st.cache)
        live = {fr.fid for fr in st.cache.frames()}
        st.latents = {k: v for k, v in st.latents.items() if k in live}
        if st.cache_cfg.recache == "longlive":  # the history restarts from the kept frames
            st.recent = [(fr.serial, fr.t, st.latents[fr.fid]) for fr in st.cache.frames()]
        st.pending_cut = True
    elif st.cache.num_frames:
        recache(st)


@torch.no_grad()
def sample_block(st: Stream) -> torch.Tensor:
    """Denoise the next block against the cache and write its K/V; returns ``x0``."""
    F = st.settings.block_frames
    read = st.cache_cfg.cut_read(st.cache, F) if st.pending_cut else st.cache_cfg.read(st.cache, F)
    st.pending_cut = False
    x0 = denoise_block(st.forward, st.latent_shape, st.text_kv, st.cache, read, st.sigmas,
                       st.generator, dtype=st.dtype, device=st.device)
    check_finite(st, x0, st.block + 1, "sampled latents", "NaN/inf weights in --checkpoint, "
                 "--lora or --text-encoder, or an extreme --shift/--timesteps")
    blk = write_block(st.forward, x0, st.text_kv, st.cache, read)
    _keep_latents(st, blk, x0)
    st.block += 1
    return x0


def check_finite(st: Stream, x: torch.Tensor, block: int, what: str, causes: str) -> None:
    """Raise :class:`~lol_model.errors.GenerationError` if ``x`` holds NaN or inf, naming
    ``block`` (1-based). One reduction and one host sync per call: once a block, not a forward."""
    if not bool(torch.isfinite(x).all()):
        if st.dtype in (torch.float16, torch.bfloat16):
            causes += f", or overflow in {st.settings.dtype} (try --dtype float32)"
        raise GenerationError(f"block {block} of {st.settings.blocks}: the {what} hold NaN or "
                              f"inf (likely causes: {causes}); stopped before writing it",
                              block=block)


def emit(st: Stream, x0: torch.Tensor) -> None:
    """Decode the block (sample 0) into the mp4 and queue its latents, if enabled."""
    frames = None
    if st.decoder is not None:
        video = st.decoder.decode(x0[:1])
        check_finite(st, video, st.block, "decoded frames", "NaN/inf weights in --vae")
        frames = to_uint8_frames(video)[0]
    if st.latent_writer is not None:
        st.latent_writer.append(x0)
    if frames is not None:
        if st.video is not None:
            st.video.append(frames)
        st.frames_out += frames.shape[0]


def advance(st: Stream) -> torch.Tensor:
    """One block: prompt switch, sampling, output. Returns the block's clean latents."""
    switch_prompt(st)
    x0 = sample_block(st)
    emit(st, x0)
    return x0
