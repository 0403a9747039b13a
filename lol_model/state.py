"""Checkpoint and resume of a stream: one atomic safetensors file with a JSON header.

A checkpoint is ``<dir>/stream.safetensors``: the tensors (the cache's own
``state_dict()`` under ``cache.<key>``, the kept clean latents of the cached frames, the
decoder's causal feature cache, the noise generator's state) and, in the safetensors metadata
under ``"lol"``, a JSON document with the rest (format version, the cache's class, block and
frame counters, prompt-schedule position, mp4 / latent segment counts, and the run's
fingerprint). It is written to ``stream.safetensors.tmp``, fsynced, then ``os.replace``-d over
the old one, so a kill at any moment leaves either the previous or the new checkpoint, never
half of one. ``stream.json`` beside it is a readable copy of the JSON (informational only).

Format versions:

* ``lol-stream/2`` (written and read): the cache is saved through its ``state_dict()`` and
  restored in place by ``load_state_dict()``.
* ``lol-stream/1`` (not readable): the cache's private attributes were saved as they were; they
  no longer exist, so such a checkpoint is refused with an error that names its version.
"""

from __future__ import annotations

import json
import os

import torch

from .files import first_line

FORMAT = "lol-stream/2"
READABLE = (FORMAT,)  # formats load_checkpoint accepts
FILE = "stream.safetensors"
CACHE = "cache."  # prefix of the cache's state_dict keys among the checkpoint's tensors


def cache_state(cache) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(json, tensors)`` of ``cache``: its class name and its ``state_dict()``."""
    tensors = {CACHE + k: v.contiguous() for k, v in cache.state_dict().items()}
    return {"class": type(cache).__name__}, tensors


def load_cache_state(cache, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore :func:`cache_state` output into ``cache`` (built with the same configuration)."""
    name = type(cache).__name__
    if meta.get("class") != name:
        raise ValueError(f"checkpoint holds a {meta.get('class')} cache; this run's cache is a "
                         f"{name}")
    state = {k[len(CACHE):]: v for k, v in tensors.items() if k.startswith(CACHE)}
    try:
        cache.load_state_dict(state)
    except ValueError as e:
        raise ValueError(f"checkpoint cache state does not fit this run's cache (different "
                         f"model, cache or latent size?): {e}") from None


def save_checkpoint(folder: str, meta: dict, tensors: dict[str, torch.Tensor]) -> str:
    """Atomically write ``meta`` (JSON-able) and ``tensors`` to ``folder/stream.safetensors``."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, FILE)
    doc = json.dumps({"format": FORMAT, **meta})
    cpu, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        cpu[k] = v.clone() if ptr in seen else v  # safetensors refuses shared storage
        seen.add(ptr)
    tmp = path + ".tmp"
    save_file(cpu, tmp, metadata={"lol": doc})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with open(os.path.join(folder, "stream.json.tmp"), "w") as f:
        json.dump({"format": FORMAT, **meta}, f, indent=1)
    os.replace(os.path.join(folder, "stream.json.tmp"), os.path.join(folder, "stream.json"))
    return path


def load_checkpoint(folder: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a checkpoint folder; ``ValueError`` if absent or not a stream
    checkpoint of a readable format (:data:`READABLE`)."""
    from safetensors import safe_open

    path = os.path.join(folder, FILE) if os.path.isdir(folder) else folder
    if not os.path.isfile(path):
        raise ValueError(f"no stream checkpoint at {path!r} (expected {FILE} written by "
                         f"--checkpoint-every)")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {first_line(e)}") \
            from None
    if "lol" not in header:
        raise ValueError(f"{path} is a safetensors file but not a lol stream checkpoint "
                         f"(no 'lol' metadata)")
    try:
        meta = json.loads(header["lol"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt checkpoint metadata: {e}") from None
    if meta.get("format") not in READABLE:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r} is not readable by "
                         f"this version (readable: {', '.join(READABLE)}); resume it with the "
                         f"version that wrote it, or start the stream again")
    return meta, tensors


def check_fingerprint(saved: dict, current: dict) -> None:
    """``ValueError`` listing every setting that differs between a checkpoint and this run."""
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        raise ValueError("cannot resume: the run's settings differ from the checkpoint's:\n  "
                         + "\n  ".join(diff))
