"""Streaming generator: block after block in constant memory, decoded and written as it goes.

Loop (one iteration = one block of ``block_frames`` latent frames)::

    switch_prompt(stream)        # at a schedule boundary: new text K/V, then KV Flush + RoPE Cut
                                 # ("#") or a LongLive recache of the cached frames
    x0 = sample_block(stream)    # steps forwards against the cache read, then the write pass
    emit(stream, x0)             # streaming VAE decode -> mp4 segment; latents (optional)
    checkpoint(stream)           # every N blocks: close segments, save the state atomically

:class:`Stream` holds everything that changes; the step functions are small and explicit.
Randomness: one CPU ``torch.Generator`` seeded with ``seed`` draws all noise, so the latents
depend only on the settings, and a resumed run reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch

from .caches import CacheConfig, get_cache_config
from .config import ModelConfig
from .guard import GenerationError
from .model import CausalWanModel
from .sampling import (
    SHIFT,
    denoise_block,
    sampling_sigmas,
    sigmas_from_timesteps,
    write_block,
)
from .schedule import PromptSchedule, parse_schedule
from .step import BlockForward
from .text import encode_prompt, load_text_encoder

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64, "fp64": torch.float64}


@dataclass
class StreamSettings:
    """Everything that defines a stream (the checkpoint fingerprint is built from it).

    ``latent_height/width`` are latent sizes (video = 8x); ``blocks`` may grow on resume.
    """

    # what to generate, with which weights
    prompt: str = "a red fox running through fresh snow, cinematic"
    blocks: int = 8
    preset: str = "tiny"
    checkpoint: str | None = None
    lora: str | None = None
    lora_alpha: float | None = None  # None: the LoRA file's alpha, else its rank
    ema: bool = False  # the checkpoint's 'generator_ema' weights
    # cache configuration (lol_model.caches; None keeps the configuration's value):
    # sink_frames is upstream's sink_size; local_attn_size counts the frames a block attends
    # including its own (upstream's); window_frames (frames kept besides the block) excludes it
    cache: str = "longlive"
    sink_frames: int | None = None
    local_attn_size: int | None = None
    window_frames: int | None = None
    recache: str | None = None  # None: the cache configuration's (lol_model.caches)
    global_sink: bool | None = None
    jitter_sigma: float | None = None  # LoL multi-head RoPE jitter; None: the cache's (lol 0.8)
    jitter_seed: int = 0
    # latent grid and sampling (explicit ``timesteps`` override ``steps`` and ``shift``)
    latent_height: int = 8
    latent_width: int = 8
    block_frames: int = 3
    timesteps: tuple[float, ...] | None = None
    steps: int = 4
    shift: float = SHIFT
    seed: int = 0
    batch_size: int = 1
    # encoders, numerics and output
    text_encoder: str | None = None
    vae: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    decode: bool = True
    fps: float = 16.0
    # how the block's forwards run (lol_model.step): a torch.compile backend, CUDA graphs
    compile: str | None = None
    cuda_graphs: bool = False

    def fingerprint(self) -> dict:
        """Settings a resumed run must share with its checkpoint (not blocks, device, nor how
        the forwards run)."""
        d = asdict(self)
        for k in ("blocks", "device", "compile", "cuda_graphs"):
            d.pop(k)
        d["timesteps"] = list(self.timesteps) if self.timesteps else None
        d["jitter_sigma"] = self.resolved_jitter_sigma()  # implied and explicit match
        return d

    def resolved_jitter_sigma(self) -> float:
        """``jitter_sigma``, or the cache configuration's default when it is ``None``."""
        return get_cache_config(self.cache).jitter_sigma if self.jitter_sigma is None \
            else self.jitter_sigma


@dataclass
class Stream:
    """Mutable state of a running stream."""

    settings: StreamSettings
    model: CausalWanModel
    cache_cfg: CacheConfig
    cache: object
    schedule: PromptSchedule
    text_encoder: object
    sigmas: list[float]
    generator: torch.Generator
    dtype: torch.dtype
    device: torch.device
    block: int = 0  # blocks finished
    segment: int = 0  # schedule segment whose prompt text_kv encodes
    text_kv: object = None
    latents: dict = field(default_factory=dict)  # fid -> clean latent [B, Cz, 1, h, w]
    # (serial, t, clean latent) of the newest generated frames, at most recache_span (LongLive
    # recache only): it recomputes frames the cache has already evicted
    recent: list = field(default_factory=list)
    pending_cut: bool = False
    decoder: object = None
    video: object = None
    latent_writer: object = None
    frames_out: int = 0  # video frames written
    forward: object = None  # the block's forwards: a lol_model.step.BlockForward over model

    @property
    def latent_shape(self) -> tuple[int, ...]:
        s = self.settings
        return (s.batch_size, self.model.cfg.in_channels, s.block_frames, s.latent_height,
                s.latent_width)


# --------------------------------------------------------------------------- building
def build_model(s: StreamSettings, dtype, device) -> CausalWanModel:
    """The transformer: weights from ``s.checkpoint``, or random (seeded) for the tiny default."""
    if s.checkpoint:
        from .weights import load_model

        model = load_model(s.checkpoint, s.preset, lora=s.lora, lora_alpha=s.lora_alpha,
                           ema=s.ema, dtype=dtype, device=device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            model = CausalWanModel(ModelConfig.preset(s.preset))
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.configure_rope(jitter_sigma=s.resolved_jitter_sigma(), seed=s.jitter_seed)
    return model


def new_stream(s: StreamSettings, *, model: CausalWanModel | None = None,
               text_encoder=None) -> Stream:
    """Build a stream at block 0 (model, cache, text encoder, noise generator, decoder)."""
    if s.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {s.dtype!r}")
    if not isinstance(s.blocks, int) or s.blocks < 1:
        raise ValueError(f"blocks must be an int >= 1, got {s.blocks!r}")
    dtype, device = DTYPES[s.dtype], torch.device(s.device)
    schedule = parse_schedule(s.prompt, block_frames=s.block_frames)
    model = model if model is not None else build_model(s, dtype, device)
    gh, gw = model.grid(s.latent_height, s.latent_width)
    cache_cfg = get_cache_config(s.cache, sink_frames=s.sink_frames,
                                 local_attn_size=s.local_attn_size,
                                 window_frames=s.window_frames, recache=s.recache,
                                 global_sink=s.global_sink)
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


def block_forward(s: StreamSettings, model: CausalWanModel, cache) -> BlockForward:
    """The :class:`~lol_model.step.BlockForward` of ``s.compile`` / ``s.cuda_graphs``;
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
def encode_text(st: Stream, segment: int):
    prompt = st.schedule.segments[segment].prompt
    ctx = encode_prompt(st.text_encoder, prompt, batch_size=st.settings.batch_size, index=segment)
    return st.model.encode_text(ctx)


# --------------------------------------------------------------------------- step functions
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
      (:meth:`~lol_model.caches.CacheConfig.longlive_replay`);
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
    """Raise :class:`~lol_model.guard.GenerationError` if ``x`` holds NaN or inf, naming
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
        from .vae import to_uint8_frames

        video = st.decoder.decode(x0[:1])
        check_finite(st, video, st.block, "decoded frames", "NaN/inf weights in --vae")
        frames = to_uint8_frames(video)[0]
    if st.latent_writer is not None:
        st.latent_writer.append(x0)
    if frames is not None:
        if st.video is not None:
            st.video.append(frames)
        st.frames_out += frames.shape[0]


def step(st: Stream) -> torch.Tensor:
    """One block: prompt switch, sampling, output. Returns the block's clean latents."""
    switch_prompt(st)
    x0 = sample_block(st)
    emit(st, x0)
    return x0


# --------------------------------------------------------------------------- outputs
def attach_outputs(st: Stream, out: str | None, *, save_latents: bool = False) -> None:
    """Streaming decoder + segmented mp4 at ``out`` (no video when ``out`` is ``None`` or
    ``settings.decode`` is off); with ``save_latents`` latents go to ``<out stem>.latents/``."""
    if out is not None and st.settings.decode:
        from .vae import StreamingDecoder, load_vae
        from .video import SegmentedVideoWriter

        vae = load_vae(st.settings.vae, seed=st.settings.seed, device=st.device)
        st.decoder = StreamingDecoder(vae)
        st.video = SegmentedVideoWriter(out, fps=st.settings.fps)
    if save_latents:
        from .video import LatentWriter

        st.latent_writer = LatentWriter(latents_folder(out))


def latents_folder(out: str | None) -> str:
    """Where ``--save-latents`` writes: ``<out without .mp4>.latents``."""
    return (os.path.splitext(out)[0] if out else "latents") + ".latents"


def close_segments(st: Stream) -> None:
    """Close the open mp4 and latent segments; :class:`~lol_model.guard.SegmentError` if one
    cannot be closed (it is discarded and not recorded)."""
    if st.video is not None:
        st.video.close_segment()
    if st.latent_writer is not None:
        st.latent_writer.close_segment()


def keep_written(st: Stream, checkpoint_dir: str | None) -> str:
    """After a failed or interrupted block: close the open segments so what was written stays
    playable / loadable; returns a sentence saying what was kept, where, and whether the last
    checkpoint (which ``--resume`` continues from) is intact."""
    from .files import first_line

    said, lost = [], []
    for writer, what in ((st.video, "video"), (st.latent_writer, "latent")):
        if writer is None:
            continue
        try:
            writer.close_segment()
        except Exception as e:  # keep the first error; report that the open segment was lost
            lost.append(f"the open {what} segment was lost ({first_line(e, 120)})")
    if st.video is not None and st.video.segments:
        said.append(f"{st.video.frames} video frames in {st.video.seg_dir} (ffmpeg concat "
                    f"list: list.txt)")
    if st.latent_writer is not None and st.latent_writer.segments:
        said.append(f"{st.latent_writer.frames} latent frames in {st.latent_writer.folder}")
    if checkpoint_dir:
        from .state import FILE

        if os.path.isfile(os.path.join(checkpoint_dir, FILE)):
            said.append(f"the last good checkpoint{saved_block(checkpoint_dir)} in "
                        f"{checkpoint_dir} is intact (--resume continues from it)")
    text = ("kept: " + "; ".join(said)) if said else "nothing was written"
    return "; ".join([text, *lost])


def saved_block(checkpoint_dir: str) -> str:
    """``" (block N)"`` from the checkpoint's readable copy ``stream.json``; ``""`` if unknown."""
    import json

    try:
        with open(os.path.join(checkpoint_dir, "stream.json")) as f:
            return f" (block {int(json.load(f)['block'])})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def finish(st: Stream, *, keep_segments: bool = False) -> str | None:
    """Close outputs; join the mp4 segments into the final file (see
    :meth:`~lol_model.video.SegmentedVideoWriter.finalize` for ``keep_segments``)."""
    if st.latent_writer is not None:
        st.latent_writer.close_segment()
    if st.video is None:
        return None
    return st.video.finalize(keep_segments=keep_segments)


# --------------------------------------------------------------------------- checkpoints
def save_stream(st: Stream, folder: str) -> str:
    """Close the output segments, then atomically save the stream state to ``folder`` (in this
    order: a segment that fails to close raises before anything is saved, so the checkpoint
    never records a broken segment)."""
    from .state import cache_state, save_checkpoint

    close_segments(st)
    cmeta, tensors = cache_state(st.cache)
    tensors["rng.noise"] = st.generator.get_state()
    for fid, z in st.latents.items():
        tensors[f"latents.{fid}"] = z
    for i, (_, _, z) in enumerate(st.recent):
        tensors[f"recent.{i}"] = z
    meta = {"fingerprint": st.settings.fingerprint(), "block": st.block, "segment": st.segment,
            "pending_cut": st.pending_cut, "cache": cmeta, "frames_out": st.frames_out,
            "latent_fids": sorted(st.latents), "recent": [[s, t] for s, t, _ in st.recent],
            "video_segments": list(st.video.segments) if st.video is not None else None,
            "latent_segments": list(st.latent_writer.segments)
            if st.latent_writer is not None else None}
    if st.decoder is not None:
        dmeta, dt = st.decoder.state()
        meta["decoder"] = dmeta
        tensors.update(dt)
    return save_checkpoint(folder, meta, tensors)


def resume_stream(st: Stream, folder: str) -> None:
    """Load a checkpoint into a freshly built stream with the same settings."""
    from .state import check_fingerprint, load_cache_state, load_checkpoint

    meta, tensors = load_checkpoint(folder)
    check_fingerprint(meta["fingerprint"], st.settings.fingerprint())
    load_cache_state(st.cache, meta["cache"], tensors)
    st.generator.set_state(tensors["rng.noise"])
    st.latents = {fid: tensors[f"latents.{fid}"].to(st.device) for fid in meta["latent_fids"]}
    st.recent = [(s, t, tensors[f"recent.{i}"].to(st.device))
                 for i, (s, t) in enumerate(meta.get("recent", []))]
    st.block, st.pending_cut, st.frames_out = meta["block"], meta["pending_cut"], meta["frames_out"]
    if meta["segment"] != st.segment:
        st.segment = meta["segment"]
        st.text_kv = encode_text(st, st.segment)
    if (meta.get("decoder") is None) != (st.decoder is None):
        raise ValueError("cannot resume: the checkpoint and this run disagree on whether video "
                         "is decoded (--out / --no-decode)")
    if st.decoder is not None:
        st.decoder.load_state(meta["decoder"], tensors)
        st.video.truncate(meta["video_segments"])
    if st.latent_writer is not None:
        if meta["latent_segments"] is None:
            raise ValueError("cannot resume with --save-latents: the checkpoint saved none")
        st.latent_writer.truncate(meta["latent_segments"])


# --------------------------------------------------------------------------- driver
def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def run(st: Stream, *, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
        segment_blocks: int = 25, progress: bool = True, on_block=None,
        save=None) -> Stream:
    """Generate until ``settings.blocks`` blocks exist, checkpointing every ``checkpoint_every``
    blocks into ``checkpoint_dir`` (mp4 segments close at checkpoints, or every
    ``segment_blocks`` blocks without checkpoints) with ``save(st, folder)`` (default
    :func:`save_stream`; :func:`lol_model.parallel.save_parallel` on every rank)."""
    save = save_stream if save is None else save
    from tqdm import tqdm

    total = st.settings.blocks
    if checkpoint_every and not checkpoint_dir:
        raise ValueError("checkpoint_every needs a checkpoint_dir")
    every = checkpoint_every or segment_blocks
    bar = tqdm(total=total, initial=st.block, unit="block", disable=not progress,
               dynamic_ncols=True)
    t0, b0 = time.perf_counter(), st.block
    while st.block < total:
        x0 = step(st)
        if on_block is not None:
            on_block(st, x0)
        if st.block % every == 0 and st.block < total:
            if checkpoint_every:
                save(st, checkpoint_dir)
            else:
                close_segments(st)
        dt = max(time.perf_counter() - t0, 1e-9)
        fps = (st.block - b0) * st.settings.block_frames * 4 / dt  # video frames per second
        mem = torch.cuda.max_memory_allocated() if st.device.type == "cuda" else rss_bytes()
        bar.set_postfix_str(f"{fps:.1f} frames/s, mem {mem / 2**20:.0f} MiB")
        bar.update(1)
    bar.close()
    if checkpoint_every:
        save(st, checkpoint_dir)
    return st
