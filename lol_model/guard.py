"""Checks that run before any work: argument types, devices, output paths, and the run lock.

Every check raises ``ValueError`` (or ``argparse.ArgumentTypeError`` for option types) with a
one-line message naming the option or file, which ``lol`` prints as ``lol: error: ...`` and
exits 2.

:class:`RunLock` holds an exclusive ``fcntl.flock`` on ``<path>.lock`` for the output and state
folders of one run, so a second run with the same ``--out`` (or ``--checkpoint-dir``) fails at
once instead of mixing its segments into the first run's. The kernel releases a flock when its
process dies, so a killed run never leaves a lock that blocks the next one.

:func:`check_memory` refuses a run whose cache, weights and activations cannot fit the device
(an estimate from the settings alone, made before anything is allocated).

Failures during a run are :class:`GenerationError` (``lol`` exits 1; :class:`SegmentError` when
an output segment could not be written), and a Ctrl-C is :class:`Interrupted` (exit 130); both
say what was kept.
"""

from __future__ import annotations

import argparse
import math
import os

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_LATENT_FRAMES = 2**30  # frame times must stay far inside int32 (RoPE cuts jump ahead)
MAX_STEPS = 1000  # denoising steps a block may take: the scheduler's 1000 timesteps


class GenerationError(RuntimeError):
    """A run stopped because its output went wrong (non-finite latents); ``lol`` exits 1.

    ``block``: the 1-based block that went wrong (blocks before it were written), if known.
    """

    def __init__(self, message: str, *, block: int | None = None):
        super().__init__(message)
        self.block = block


class SegmentError(GenerationError):
    """An mp4 or latent segment could not be written or closed (ffmpeg died, disk full), or the
    final join failed. The broken segment was discarded and never recorded, so no checkpoint
    refers to it; ``--resume`` regenerates it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with a message saying at which block and what was kept."""


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False):
    """argparse type: a finite float in the given range (``inf``, ``nan``, ``1e999`` refused)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if (lo is not None and (v < lo or (lo_open and v == lo))) or \
                (hi is not None and (v > hi or (hi_open and v == hi))):
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if lo_open else '['}{lo if lo is not None else '-inf'}, "
                f"{hi if hi is not None else 'inf'}{')' if hi_open else ']'}, got {text!r}")
        return v
    return parse


def bounded_int(lo: int | None = None, hi: int | None = None):
    """argparse type: an int in ``[lo, hi]`` (either bound optional)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(
                f"must be in [{lo if lo is not None else '-inf'}, "
                f"{hi if hi is not None else 'inf'}], got {text!r}")
        return v
    return parse


def check_device(spec: str) -> None:
    """``ValueError`` naming ``--device`` unless ``spec`` is a usable cpu / cuda[:N] / mps."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {spec!r} is not a device (use cpu, cuda, cuda:N or mps)") \
            from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {spec}: this machine has {n} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {spec}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ValueError(f"--device {spec!r} is not supported (use cpu, cuda, cuda:N or mps)")
    elif dev.index not in (None, 0):
        raise ValueError(f"--device {spec}: the CPU is one device (use cpu)")


def check_writable_file(option: str, path: str) -> None:
    """``ValueError`` naming ``option`` if ``path`` cannot be created or replaced as a file."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a directory; give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path} is not writable")
    check_writable_dir(option, os.path.dirname(os.path.abspath(path)))


def check_writable_dir(option: str, path: str) -> None:
    """``ValueError`` naming ``option`` if folder ``path`` cannot be used or created."""
    d = os.path.abspath(path)
    while not os.path.exists(d):  # the nearest existing ancestor decides
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise ValueError(f"{option} {path}: {d} is a file, not a folder")
    if not os.access(d, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: folder {d} is not writable")


def check_input_path(option: str, path: str | None) -> None:
    """``ValueError`` naming ``option`` if an input file or folder does not exist."""
    if path in (None, "", "tiny"):
        return
    if not os.path.exists(path):
        raise ValueError(f"{option} {path} does not exist")
    if not (os.path.isfile(path) or os.path.isdir(path)):  # /dev/null, a fifo, a socket
        raise ValueError(f"{option} {path} is not a regular file or folder")


class RunLock:
    """Exclusive locks on ``<path>.lock`` for each path, held until :meth:`release`.

    ``acquire`` never waits: a path locked by a live process raises ``ValueError`` naming it
    and the holder's pid. The lock files are removed on release (and re-checked after locking,
    so a file unlinked by a releasing holder is never trusted).
    """

    def __init__(self, paths):
        self.paths = sorted({os.path.abspath(p) + ".lock" for p in paths})
        self._fds: list[tuple[str, int]] = []

    def acquire(self) -> RunLock:
        try:
            for path in self.paths:
                self._fds.append((path, self._lock(path)))
        except BaseException:
            self.release()
            raise
        return self

    @staticmethod
    def _lock(path: str) -> int:
        import fcntl

        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise ValueError(f"{path[:-5]} is in use by another lol run (pid {holder}; "
                                 f"lock {path}); wait for it, or use another --out / "
                                 f"--checkpoint-dir") from None
            try:  # the holder we waited on may have unlinked the file: lock the live one
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                return fd
            os.close(fd)

    def release(self) -> None:
        for path, fd in reversed(self._fds):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fds = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- memory
def available_memory(device: str) -> tuple[int, str] | None:
    """``(bytes, where)`` free for new allocations on ``device``: ``MemAvailable`` of
    ``/proc/meminfo`` for the CPU, ``torch.cuda.mem_get_info`` for CUDA; ``None`` if unknown."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0], f"free on {device}"
    if dev.type == "cpu":
        from lol_kernels.diagnostics.cli import available_memory as host_memory

        return host_memory(), "available in RAM"
    return None


def stream_cache_config(s):
    """The cache configuration of settings ``s`` (its cache name with the size overrides it
    has: ``sink_frames``, ``window_frames``, ``local_attn_size``)."""
    from .caches import get_cache_config

    sizes = ("sink_frames", "window_frames", "local_attn_size")
    return get_cache_config(s.cache, **{k: getattr(s, k) for k in sizes if hasattr(s, k)})


def estimate_memory(s, dtype) -> dict[str, int]:
    """Bytes a stream with settings ``s`` (a ``StreamSettings``) needs at least, by part, with
    weights and cache in the torch ``dtype`` (``s.dtype`` resolved by the caller).

    ``cache``: K/V pages, positions and summaries of every frame the cache holds (sink + window +
    block + slow frames; every frame of the run for a cache that never evicts), plus the kept
    clean latents. ``weights``: the transformer's linear layers.
    ``activations``: one block's widest layer (FFN hidden and q/k/v/o of every query token) and
    the K/V gathered for its read. A lower bound: the VAE, the text encoder and the allocator's
    slack come on top, so a run that is refused would certainly not fit.
    """
    from .caches import GrowingKVCache, default_page_size
    from .config import ModelConfig

    m = ModelConfig.preset(s.preset)
    c = stream_cache_config(s)
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


def check_memory(s, dtype) -> None:
    """``ValueError`` naming the options that size the run when :func:`estimate_memory` exceeds
    the memory available on ``s.device`` (checked before anything is built)."""
    have = available_memory(s.device)
    if have is None:
        return
    need = estimate_memory(s, dtype)
    total = sum(need.values())
    if total <= have[0]:
        return
    from .caches import GrowingKVCache

    c = stream_cache_config(s)
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
