"""The checks ``lol`` makes before any work: option types for argparse, devices, input and
output paths.

Every check raises ``ValueError`` (or ``argparse.ArgumentTypeError`` for option types) with a
one-line message naming the option or file, which ``lol`` prints as ``lol: error: ...`` and
exits 2.
"""

from __future__ import annotations

import argparse
import math
import os


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


def frame_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise argparse.ArgumentTypeError(f"size must be positive multiples of 16 (VAE stride 8 "
                                         f"x patch 2), got {text!r}")
    return w, h


def timestep_list(text: str) -> tuple[float, ...]:
    try:
        ts = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"timesteps must be comma-separated numbers, got "
                                         f"{text!r}") from None
    if not all(math.isfinite(t) for t in ts):
        raise argparse.ArgumentTypeError(f"timesteps must be finite, got {text!r}")
    return ts


def named(option: str, check, *a, **kw):
    """Run ``check``; a ``ValueError`` it raises is re-raised naming ``option``."""
    try:
        return check(*a, **kw)
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None


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
