"""``lol generate``: stream a video block by block, from the command line.

Options are checked before any work (:func:`check_args`: one ``lol: error: ...`` line naming the
option, exit 2); the run locks ``--out`` and ``--checkpoint-dir`` (:class:`~.lock.RunLock`),
then streams through :func:`lol_model.streaming.driver.run_to_outputs`, on one process, on the
ranks it spawns (``--nproc``) or on torchrun's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import math
import os
import shutil
import sys
import threading
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..errors import GenerationError, Interrupted
from ..model.config import ModelConfig
from ..parallel import runner
from ..parallel.liveness import spawn_ranks
from ..parallel.ulysses import DEFAULT_TIMEOUT_S, check_degree
from ..streaming.checkpoint import FILE, resume_stream
from ..streaming.driver import interrupted, run_to_outputs
from ..streaming.memory import check_memory
from ..streaming.outputs import attach_outputs, latents_folder
from ..streaming.presets import get_cache_config
from ..streaming.prompts import LATENT_FPS, parse_schedule
from ..streaming.sampling import sigmas_from_timesteps
from ..streaming.settings import (
    DEFAULT_BLOCKS,
    MAX_LATENT_FRAMES,
    MAX_STEPS,
    SEED_RANGE,
    StreamSettings,
)
from ..streaming.stream import new_stream
from .lock import RunLock
from .options import (
    bounded_int,
    check_device,
    check_input_path,
    check_writable_dir,
    check_writable_file,
    finite_float,
    frame_size,
    named,
    timestep_list,
)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="stream a video block by block",
                       description="Stream video from a causal Wan model in constant memory. "
                                   "Defaults run a tiny random model on the CPU in about a "
                                   "minute.")
    p.add_argument("--prompt", default="a red fox running through fresh snow, cinematic",
                   help="prompt or schedule, e.g. 'a cat[10s] | a dog[20s#]' ('#': KV flush + "
                        "RoPE cut; otherwise the window is recached with the new prompt)")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--blocks", type=bounded_int(1),
                   help=f"blocks to generate (default: the schedule's length, else "
                        f"{DEFAULT_BLOCKS})")
    n.add_argument("--seconds", type=finite_float(0, lo_open=True),
                   help="seconds of video (4 latent frames a second, rounded up to whole "
                        "blocks)")
    p.add_argument("--out", default="outputs/lol.mp4", help="output mp4 (default %(default)s)")
    p.add_argument("--checkpoint", help="model weights (diffusers or Wan/Self-Forcing/LongLive "
                                        "layout); default: a random model of --preset")
    p.add_argument("--preset", default=None, help="model preset (tiny, wan-1.3b, ...; default "
                                                  "tiny, or wan-1.3b with --checkpoint)")
    p.add_argument("--lora", help="LoRA weights merged into --checkpoint (LongLive)")
    p.add_argument("--lora-alpha", type=finite_float(0, lo_open=True),
                   help="LoRA alpha (scale = alpha / rank); default: the file's, else the rank "
                        "(LongLive: 256 = rank)")
    p.add_argument("--ema", action="store_true",
                   help="load the checkpoint's EMA weights ('generator_ema', Self-Forcing / "
                        "LongLive trainer checkpoints)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bf16, fp16 or float64")
    p.add_argument("--cache", default="longlive",
                   help="cache preset (README table): longlive (default: 3 sink + 6 cached + "
                        "the 3-frame block), lol (longlive + jitter 0.8), self-forcing, "
                        "self-forcing-rolling, sink-window, relativistic, slow-fast, moc, "
                        "growing")
    p.add_argument("--sink-size", "--sink-frames", dest="sink_frames", type=bounded_int(0),
                   help="upstream's sink_size: the first frames, kept forever")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--local-attn-size", type=bounded_int(-1),
                   help="upstream's local_attn_size: frames a block attends INCLUDING its own "
                        "(longlive: 12 = 3 sink + 6 cached + 3 new); -1 is refused (use "
                        "--cache self-forcing or growing)")
    w.add_argument("--window-frames", type=bounded_int(0),
                   help="low-level: recent frames kept BESIDES the block (= local_attn_size - "
                        "sink_size - 3)")
    p.add_argument("--recache", choices=["longlive", "block-causal"],
                   help="soft prompt switch: longlive (one pass, LongLive's) or block-causal "
                        "(block by block); default: the cache preset's")
    p.add_argument("--no-global-sink", action="store_true",
                   help="recompute the sink under the new prompt too at a switch (LongLive "
                        "global_sink: false)")
    p.add_argument("--jitter-sigma", type=finite_float(0, 1, hi_open=True), default=None,
                   help="LoL multi-head RoPE jitter sigma in [0, 1) (paper: 0.8); default: "
                        "the cache preset's (0.8 for lol, else 0)")
    p.add_argument("--jitter-seed", type=bounded_int(*SEED_RANGE), default=0,
                   help="seed of the per-head jitter draw")
    p.add_argument("--size", type=frame_size, default=(128, 128),
                   help="video WIDTHxHEIGHT (default 128x128; Wan: 832x480)")
    p.add_argument("--steps", type=bounded_int(1), default=4, help="denoising steps per block")
    p.add_argument("--shift", type=finite_float(0, lo_open=True), default=5.0,
                   help="flow-matching timestep shift")
    p.add_argument("--timesteps", type=timestep_list,
                   help="explicit timesteps, e.g. 1000,937.5,833.33,625 (overrides --steps)")
    p.add_argument("--seed", type=bounded_int(*SEED_RANGE), default=0,
                   help="noise seed, in [-2**63, 2**64 - 1]")
    p.add_argument("--text-encoder", help="umT5 folder or prompt-embedding file "
                                          "(.safetensors/.pt); default: tiny random umT5")
    p.add_argument("--vae", help="diffusers AutoencoderKLWan folder; default: tiny random VAE")
    p.add_argument("--no-decode", action="store_true", help="latents only, no mp4")
    p.add_argument("--save-latents", action="store_true",
                   help="also save clean latents to <out>.latents/seg_*.safetensors")
    p.add_argument("--checkpoint-every", type=bounded_int(0), default=0,
                   help="save the stream state every N blocks (0: never). The mp4 is "
                        "written as segments in <out>.segments/ closed at every checkpoint "
                        "(every 25 blocks without checkpoints), so what was written stays "
                        "playable if the process is killed; they are joined into --out at "
                        "the end")
    p.add_argument("--checkpoint-dir", help="state folder (default <out>.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even though --out holds a previous run's checkpoint or "
                        "segments (they are deleted); without it such a run is refused")
    p.add_argument("--threads", type=bounded_int(0),
                   help="torch CPU threads (default or 0: 1 for the tiny preset on the CPU, "
                        "whose ops are too small to gain from threads; else torch's default)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="compile each block's forwards whole with torch.compile(fullgraph="
                        "True): two graphs a stream, no recompiles (BACKEND default inductor; "
                        "aot_eager or eager to debug); the first block pays the compile")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the block's forwards as CUDA graphs once and replay them "
                        "every block (needs --device cuda; combines with --compile)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=bounded_int(1), default=None,
                   help="head-parallel (Ulysses) processes: spawns them itself (gloo on the "
                        "CPU, nccl on CUDA); must divide the model's heads and the tokens of a "
                        "latent frame. Under torchrun the world size is torchrun's")
    p.add_argument("--dist-timeout", type=finite_float(0, lo_open=True), default=None,
                   metavar="SECONDS",
                   help="with --nproc / torchrun: a rank that stops responding for this long "
                        "fails the run, named in the error (default 300; a rank that dies is "
                        "named at once)")
    p.set_defaults(func=run_command)
    return p


def settings_from_args(args: argparse.Namespace) -> StreamSettings:
    """The :class:`~lol_model.streaming.settings.StreamSettings` of parsed options."""
    w, h = args.size
    block_frames = 3
    blocks = args.blocks
    if args.seconds is not None:
        if not math.isfinite(args.seconds) or args.seconds <= 0:
            raise ValueError(f"--seconds must be a finite number > 0, got {args.seconds}")
        blocks = max(1, math.ceil(args.seconds * LATENT_FPS / block_frames))
    if blocks is None:
        blocks = named("--prompt", parse_schedule, args.prompt,
                       block_frames=block_frames).total_blocks or DEFAULT_BLOCKS
    preset = args.preset or ("wan-1.3b" if args.checkpoint else "tiny")
    check_step_options(args)
    return StreamSettings(
        prompt=args.prompt, blocks=blocks, preset=preset, checkpoint=args.checkpoint,
        lora=args.lora, lora_alpha=args.lora_alpha, ema=args.ema, cache=args.cache,
        sink_frames=args.sink_frames,
        local_attn_size=args.local_attn_size, window_frames=args.window_frames,
        recache=args.recache, global_sink=False if args.no_global_sink else None,
        jitter_sigma=args.jitter_sigma,
        jitter_seed=args.jitter_seed, latent_height=h // 8, latent_width=w // 8,
        block_frames=block_frames, steps=args.steps, shift=args.shift, timesteps=args.timesteps,
        seed=args.seed, dtype=args.dtype, device=args.device, text_encoder=args.text_encoder,
        vae=args.vae, decode=not args.no_decode, compile=args.compile,
        cuda_graphs=args.cuda_graphs)


def check_step_options(args) -> None:
    """``--compile`` names a torch.compile backend; ``--cuda-graphs`` runs on CUDA."""
    if args.cuda_graphs and not str(args.device).startswith("cuda"):
        raise ValueError(f"--cuda-graphs needs --device cuda, got --device {args.device}")
    if args.compile is not None:
        names = torch._dynamo.list_backends(exclude_tags=())
        if args.compile not in names:
            raise ValueError(f"--compile: unknown torch.compile backend {args.compile!r}; "
                             f"one of {', '.join(sorted(names))}")


def check_generate_args(args, s, ckpt: str) -> None:
    """Every check that needs no model: refuse bad options before any work starts."""
    dtype = named("--dtype", s.torch_dtype)
    check_device(s.device)
    if args.lora and not args.checkpoint:
        raise ValueError("--lora needs --checkpoint (the LoRA is merged into its weights)")
    if args.lora_alpha is not None and not args.lora:
        raise ValueError("--lora-alpha needs --lora (the alpha of the LoRA to merge)")
    if args.ema and not args.checkpoint:
        raise ValueError("--ema needs --checkpoint (a trainer checkpoint with 'generator_ema')")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    for option, path in (("--checkpoint", args.checkpoint), ("--lora", args.lora),
                         ("--text-encoder", args.text_encoder), ("--vae", args.vae)):
        check_input_path(option, path)
    named("--prompt", parse_schedule, s.prompt, block_frames=s.block_frames)
    named("--preset", ModelConfig.preset, s.preset)
    named("--cache", get_cache_config, s.cache)
    size = "--local-attn-size" if s.local_attn_size is not None else \
        "--window-frames" if s.window_frames is not None else "--sink-size"
    cache_cfg = named(size, s.cache_config)
    named(size, cache_cfg.window_for, s.block_frames)
    if s.timesteps:
        named("--timesteps", sigmas_from_timesteps, s.timesteps)
    if s.blocks * s.block_frames > MAX_LATENT_FRAMES:
        raise ValueError(f"--blocks/--seconds/--prompt durations ask for {s.blocks:.3g} "
                         f"blocks; at most {MAX_LATENT_FRAMES // s.block_frames} fit the "
                         f"frame-time range")
    if s.decode and not args.out.endswith(".mp4"):
        raise ValueError(f"--out must end in .mp4 (or pass --no-decode), got {args.out!r}")
    check_writable_file("--out", args.out)
    if os.path.isfile(ckpt) and (args.checkpoint_every or not args.resume):
        raise ValueError(f"--checkpoint-dir {ckpt} is a file, not a folder")
    check_writable_dir("--checkpoint-dir", ckpt)
    if s.steps > MAX_STEPS:  # the sigma list alone would not fit; each step is a forward
        raise ValueError(f"--steps {s.steps}: at most {MAX_STEPS} (Wan's timestep grid)")
    cores = os.cpu_count() or 1
    if args.threads and args.threads > 4 * cores:  # OpenMP aborts or crashes on absurd counts
        raise ValueError(f"--threads {args.threads}: this machine has {cores} CPU cores; use "
                         f"at most {4 * cores}")
    check_memory(s, dtype)  # last: it needs every size option validated


def previous_run(args, ckpt: str) -> list[str]:
    """Paths of an earlier run's data that a fresh run onto ``--out`` would replace or mix."""
    found = [p for p in [os.path.join(ckpt, FILE)] if os.path.isfile(p)]
    if glob.glob(os.path.join(args.out + ".segments", "seg_*.mp4")):
        found.append(args.out + ".segments")
    lat = latents_folder(args.out)
    if args.save_latents and glob.glob(os.path.join(lat, "seg_*.safetensors")):
        found.append(lat)
    return found


def remove_previous_run(args, ckpt: str) -> None:
    """``--overwrite``: delete the checkpoint files and the segment folders of ``--out``."""
    for name in (FILE, "stream.json"):
        if os.path.isfile(os.path.join(ckpt, name)):
            os.remove(os.path.join(ckpt, name))
    for folder in (args.out + ".segments", latents_folder(args.out)):
        shutil.rmtree(folder, ignore_errors=True)


def run_command(args: argparse.Namespace) -> dict:
    """``lol generate``: check, lock, then stream on this process, on ``--nproc`` spawned ranks
    or on this torchrun rank. Returns ``{"blocks", "seconds", "out"}``."""
    ckpt = args.checkpoint_dir or args.out + ".ckpt"
    s = settings_from_args(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # > 1 under torchrun / --nproc workers
    nproc = getattr(args, "nproc", None)
    if world > 1 and nproc not in (None, world):
        raise ValueError(f"--nproc {nproc} disagrees with torchrun's world size {world}")
    if world > 1 and int(os.environ.get("RANK", "0")) != 0:
        return on_rank(args, s, ckpt)  # rank 0 checks and locks the outputs
    check_generate_args(args, s, ckpt)
    with RunLock([args.out, ckpt]):
        if not args.resume:
            found = previous_run(args, ckpt)
            if found and not args.overwrite:
                how = "continue it with --resume" if found[0].endswith(".safetensors") else \
                    "move it away (no checkpoint: --resume cannot continue it)"
                raise ValueError(f"--out {args.out} holds a previous run ({', '.join(found)}); "
                                 f"{how}, or pass --overwrite to replace it")
            if found:
                remove_previous_run(args, ckpt)
        if world == 1 and (nproc or 1) > 1:
            return spawn(args, s, ckpt, nproc)
        return (stream_to_outputs if world == 1 else on_rank)(args, s, ckpt)


def dist_timeout(args: argparse.Namespace) -> float:
    """``--dist-timeout`` in seconds (default
    :data:`lol_model.parallel.ulysses.DEFAULT_TIMEOUT_S`)."""
    return getattr(args, "dist_timeout", None) or DEFAULT_TIMEOUT_S


def on_rank(args: argparse.Namespace, s: StreamSettings, ckpt: str, store=None) -> dict:
    """:func:`stream_to_outputs` on one rank of several, inside the process group
    (:func:`lol_model.parallel.runner.on_rank`; rendezvous on ``store`` when given, else
    torchrun's environment)."""
    return runner.on_rank(lambda: stream_to_outputs(args, s, ckpt), device=s.device,
                          timeout_s=dist_timeout(args), store=store)


def spawned_rank(rank: int, world: int, port: int, args: argparse.Namespace,
                 s: StreamSettings, ckpt: str) -> None:
    """One ``lol generate --nproc`` worker: the torchrun environment, a client of the parent's
    store on ``port``, then :func:`on_rank`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    tqdm.set_lock(threading.RLock())  # tqdm's default process lock leaks when a rank is killed
    store = dist.TCPStore("127.0.0.1", port, is_master=False,
                          timeout=datetime.timedelta(seconds=dist_timeout(args)))
    on_rank(args, s, ckpt, store)


def spawn(args: argparse.Namespace, s: StreamSettings, ckpt: str, nproc: int) -> dict:
    """``--nproc``: run :func:`spawned_rank` in ``nproc`` processes; this one hosts their store
    and names the rank that died or hung (and kills the rest)."""
    cfg = ModelConfig.preset(s.preset)
    check_degree(cfg.num_heads, nproc)
    tokens = (s.latent_height // cfg.patch_size[1]) * (s.latent_width // cfg.patch_size[2])
    if tokens % nproc:
        raise ValueError(f"--nproc {nproc} must divide the {tokens} tokens of a latent frame "
                         f"(--size)")
    t0 = time.perf_counter()
    try:
        spawn_ranks(spawned_rank, nproc, (args, s, ckpt), timeout_s=dist_timeout(args))
    except RuntimeError as e:
        raise GenerationError(str(e)) from None
    return {"blocks": s.blocks, "seconds": time.perf_counter() - t0, "out": args.out}


def stream_to_outputs(args: argparse.Namespace, s: StreamSettings, ckpt: str) -> dict:
    """Build (or resume) the stream and run it to its outputs on this process; rank 0 of a
    head-parallel run alone writes the outputs and reports."""
    threads = args.threads or (1 if s.preset == "tiny" and s.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t0 = time.perf_counter()
    every = args.checkpoint_every
    st = None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # head-parallel (joined by on_rank)
        s = dataclasses.replace(s, device=runner.rank_device(s.device))
    main = runner.is_main()
    try:
        st = new_stream(s) if world == 1 else runner.parallel_stream(s)
        if main:
            attach_outputs(st, args.out, save_latents=args.save_latents)
        if args.resume:
            (resume_stream if world == 1 else runner.resume_parallel)(st, ckpt)
            if main:
                print(f"resumed at block {st.block} from {ckpt}", file=sys.stderr)
    except KeyboardInterrupt:
        if st is None:
            raise Interrupted("interrupted before the first block; nothing was written") \
                from None
        raise interrupted(st, ckpt if every else None) from None
    start = st.block
    out = run_to_outputs(st, checkpoint_dir=ckpt, checkpoint_every=every,
                         progress=not args.quiet and main,
                         save=runner.save_parallel if world > 1 else None)
    dt = time.perf_counter() - t0
    if main:
        print(f"{st.block - start} blocks ({st.block * s.block_frames} latent frames total, "
              f"{st.frames_out} video frames) in {dt:.1f} s -> {out or '(latents only)'}",
              file=sys.stderr)
    return {"blocks": st.block, "seconds": dt, "out": out}
