"""Checkpoint and resume of a stream: one atomic safetensors file with a JSON header.

A checkpoint is ``<dir>/stream.safetensors``: the tensors (every cache pool, positions, page
lengths and chunk summaries, the kept clean latents of the cached frames, the decoder's causal
feature cache, the noise generator's state) and, in the safetensors metadata under ``"lol"``,
a JSON document with the rest (frame lists and free lists of the cache, block and frame
counters, prompt-schedule position, mp4 / latent segment counts, and the run's fingerprint).
It is written to ``stream.safetensors.tmp``, fsynced, then ``os.replace``-d over the old one, so
a kill at any moment leaves either the previous or the new checkpoint, never half of one.
``stream.json`` beside it is a readable copy of the JSON (informational only).

The cache is serialized generically from its attributes: tensors and lists of tensors, deques
and lists of ints or of :class:`~lol_kernels.cache.Frame`, and plain numbers. A cache subclass
with another kind of state fails loudly at save time instead of resuming wrongly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import deque

import torch

from lol_kernels.cache import Frame

FORMAT = "lol-stream/1"
FILE = "stream.safetensors"
_SKIP = {"device", "dtype"}  # fixed by construction; checked through the fingerprint


def _frame_to_json(fr: Frame) -> dict:
    d = {f.name: getattr(fr, f.name) for f in dataclasses.fields(fr)}
    d["pages"] = fr.pages.tolist()
    return d


def _frame_from_json(d: dict, device) -> Frame:
    d = dict(d)
    d["pages"] = torch.tensor(d["pages"], dtype=torch.int64, device=device)
    return Frame(**d)


def _is_frames(x) -> bool:
    return isinstance(x, (list, deque)) and len(x) > 0 and isinstance(x[0], Frame)


def cache_state(cache) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(json, tensors)`` describing every attribute of ``cache``."""
    meta, tensors = {}, {}
    for name, val in vars(cache).items():
        if name in _SKIP:
            continue
        key = f"cache.{name}"
        if isinstance(val, torch.Tensor):
            tensors[key] = val.contiguous()
            meta[name] = {"kind": "tensor"}
        elif isinstance(val, list) and val and all(isinstance(t, torch.Tensor) for t in val):
            for i, t in enumerate(val):
                tensors[f"{key}.{i}"] = t.contiguous()
            meta[name] = {"kind": "tensors", "n": len(val)}
        elif _is_frames(val) or (isinstance(val, (list, deque)) and not val):
            meta[name] = {"kind": "frames" if val else "empty",
                          "type": type(val).__name__, "items": [_frame_to_json(f) for f in val]}
        elif isinstance(val, (list, deque)) and all(isinstance(v, int) for v in val):
            meta[name] = {"kind": "ints", "type": type(val).__name__, "items": list(val)}
        elif isinstance(val, (bool, int, float, str)) or val is None:
            meta[name] = {"kind": "value", "value": val}
        else:
            raise TypeError(f"cannot checkpoint cache attribute {name!r} of type "
                            f"{type(val).__name__}; teach lol_model.state.cache_state about it")
    return meta, tensors


def _restore_tensor(cache, name: str, cur, new: torch.Tensor):
    if not isinstance(cur, torch.Tensor):
        return new.to(cache.device)  # optional state (e.g. a descriptor that was None)
    if cur.shape == new.shape and cur.dtype == new.dtype:
        cur.copy_(new)  # in place: the cache keeps its storage (constant memory, same pointers)
        return cur
    if getattr(cache, "growable", False) and cur.dtype == new.dtype:
        return new.to(cur.device)
    raise ValueError(f"checkpoint tensor cache.{name} is {new.dtype} {list(new.shape)}; this "
                     f"run's cache has {cur.dtype} {list(cur.shape)} (different model, cache "
                     f"or latent size?)")


def load_cache_state(cache, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore :func:`cache_state` output into ``cache`` (built with the same configuration)."""
    dev = cache.device
    for name, m in meta.items():
        kind, key = m["kind"], f"cache.{name}"
        cur = getattr(cache, name, None)
        try:
            if kind == "tensor":
                setattr(cache, name, _restore_tensor(cache, name, cur, tensors[key]))
            elif kind == "tensors":
                new = [tensors[f"{key}.{i}"] for i in range(m["n"])]
                if name in ("k", "v", "summary") and len(cur) != len(new):
                    raise ValueError(f"checkpoint has {len(new)} layers of cache.{name}; this "
                                     f"run's cache has {len(cur)}")
                if isinstance(cur, list) and len(cur) == len(new):
                    new = [_restore_tensor(cache, f"{name}.{i}", c, t)
                           for i, (c, t) in enumerate(zip(cur, new))]
                else:  # variable-length state (e.g. slow-memory descriptors)
                    new = [t.to(dev) for t in new]
                setattr(cache, name, new)
            elif kind in ("frames", "empty", "ints"):
                items = m["items"]
                if kind == "frames":
                    items = [_frame_from_json(d, dev) for d in items]
                setattr(cache, name, deque(items) if m["type"] == "deque" else list(items))
            elif kind == "value":
                setattr(cache, name, m["value"])
            else:
                raise ValueError(f"unknown entry kind {kind!r}")
        except KeyError as e:
            raise ValueError(f"checkpoint is missing tensor {e.args[0]!r}") from None


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
    checkpoint of this format."""
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
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {e}") from None
    if "lol" not in header:
        raise ValueError(f"{path} is a safetensors file but not a lol stream checkpoint "
                         f"(no 'lol' metadata)")
    try:
        meta = json.loads(header["lol"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt checkpoint metadata: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta, tensors


def check_fingerprint(saved: dict, current: dict) -> None:
    """``ValueError`` listing every setting that differs between a checkpoint and this run."""
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        raise ValueError("cannot resume: the run's settings differ from the checkpoint's:\n  "
                         + "\n  ".join(diff))
