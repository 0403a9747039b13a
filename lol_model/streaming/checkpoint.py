"""Checkpoint and resume of a stream: one atomic safetensors file with a JSON header.

A checkpoint is ``<dir>/stream.safetensors``: the tensors (the cache's own
``state_dict()`` under ``cache.<key>``, the kept clean latents of the cached frames, the
decoder's causal feature cache, the noise generator's state) and, in the safetensors metadata
under ``"lol"``, a JSON document with the rest (format version, the cache's class, block and
frame counters, prompt-schedule position, the closed mp4 / latent segments, and the run's
fingerprint). It is written to ``stream.safetensors.tmp``, fsynced, then ``os.replace``-d over
the old one, so a kill at any moment leaves either the previous or the new checkpoint, never
half of one. ``stream.json`` beside it is a readable copy of the JSON (informational only).

Checksums: the JSON holds ``"sha256"``, the SHA-256 of every tensor (of its dtype, shape and
bytes, by name), and the metadata key ``"lol.sha256"`` the SHA-256 of the JSON text itself. So a
changed byte anywhere in the file is refused: in the safetensors header or offsets by
safetensors, in the JSON by its digest, in a tensor by that tensor's digest (the error names
it). Each closed segment is recorded as ``{"file", "sha256", "frames"}`` (see
:mod:`lol_model.streaming.video`), so ``--resume`` refuses a segment changed since the checkpoint.

Format versions:

* ``lol-stream/3`` (written and read): checksums as above; ``video_segments`` and
  ``latent_segments`` are lists of segment records.
* ``lol-stream/2`` (read, without checksums): nothing is verified; segments were recorded as a
  count (``latent_segments``: ``[count, frames]``), so ``--resume`` keeps that many segments as
  they are and measures them. The next checkpoint is written as ``lol-stream/3``.
* ``lol-stream/1`` (not readable): it holds the cache's private attributes as they were, which
  this version's caches do not have, so such a checkpoint is refused with an error that names
  its version.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from ..errors import first_line
from .outputs import close_segments
from .stream import Stream, encode_text

FORMAT = "lol-stream/3"
UNCHECKED = "lol-stream/2"  # readable, but written before checksums
READABLE = (FORMAT, UNCHECKED)  # formats load_checkpoint accepts
DIGEST = "lol.sha256"  # metadata key of the JSON document's SHA-256
FILE = "stream.safetensors"
CACHE = "cache."  # prefix of the cache's state_dict keys among the checkpoint's tensors


def tensor_sha256(t: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's dtype, shape and bytes (any dtype, any device)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype} {list(t.shape)}\n".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def sha256_text(text: str) -> str:
    """Hex SHA-256 of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode()).hexdigest()


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
    """Atomically write ``meta`` (JSON-able) and ``tensors`` to ``folder/stream.safetensors``;
    ``OSError`` (the previous checkpoint left as it was) if the file cannot be written."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, FILE)
    cpu, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        cpu[k] = v.clone() if ptr in seen else v  # safetensors refuses shared storage
        seen.add(ptr)
    sums = {k: tensor_sha256(v) for k, v in sorted(cpu.items())}
    doc = json.dumps({"format": FORMAT, **meta, "sha256": sums})
    tmp = path + ".tmp"
    try:
        save_file(cpu, tmp, metadata={"lol": doc, DIGEST: sha256_text(doc)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except Exception as e:  # a full disk: safetensors raises its own error type
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"cannot write the checkpoint {path} (the previous one is intact): "
                      f"{first_line(e)}") from None
    os.replace(tmp, path)
    with open(os.path.join(folder, "stream.json.tmp"), "w") as f:
        json.dump({"format": FORMAT, **meta}, f, indent=1)
    os.replace(os.path.join(folder, "stream.json.tmp"), os.path.join(folder, "stream.json"))
    return path


def load_checkpoint(folder: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a checkpoint folder; ``ValueError`` if absent, corrupt (a
    checksum differs) or not a stream checkpoint of a readable format (:data:`READABLE`).
    ``lol-stream/2`` metadata is returned in the current layout (segment counts for records)."""
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
    fix = "restore the file from a copy, or start the stream again with --overwrite"
    doc = header["lol"]
    if DIGEST in header and sha256_text(doc) != header[DIGEST]:
        raise ValueError(f"{path} is corrupt: its metadata does not match its checksum; {fix}")
    try:
        meta = json.loads(doc)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt checkpoint metadata ({e}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: checkpoint format {got!r} is not readable by this version "
                         f"(readable: {', '.join(READABLE)}); resume it with the version that "
                         f"wrote it, or start the stream again")
    if meta["format"] == UNCHECKED:
        return upgrade_unchecked(meta), tensors
    sums = meta.pop("sha256", None)
    if DIGEST not in header or not isinstance(sums, dict):
        raise ValueError(f"{path} is corrupt: a {FORMAT} checkpoint without its checksums; {fix}")
    if set(sums) != set(tensors):
        diff = sorted(set(sums) ^ set(tensors))
        raise ValueError(f"{path} is corrupt: its tensors {diff[:4]} differ from those its "
                         f"checksums list; {fix}")
    for name in sorted(tensors):
        got = tensor_sha256(tensors[name])
        if got != sums[name]:
            raise ValueError(f"{path} is corrupt: tensor {name!r} does not match its checksum "
                             f"(sha256 {sums[name][:12]}... saved, {got[:12]}... read); {fix}")
    return meta, tensors


def upgrade_unchecked(meta: dict) -> dict:
    """A ``lol-stream/2`` document in the current layout: ``latent_segments`` ``[count,
    frames]`` becomes the count (the writers measure count-only segments on resume)."""
    lat = meta.get("latent_segments")
    if isinstance(lat, list) and len(lat) == 2 and all(isinstance(x, int) for x in lat):
        meta = {**meta, "latent_segments": lat[0]}
    return meta


def check_fingerprint(saved: dict, current: dict) -> None:
    """``ValueError`` listing every setting that differs between a checkpoint and this run."""
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        raise ValueError("cannot resume: the run's settings differ from the checkpoint's:\n  "
                         + "\n  ".join(diff))


def save_stream(st: Stream, folder: str) -> str:
    """Close the output segments, then atomically save the stream state to ``folder`` (in this
    order: a segment that fails to close raises before anything is saved, so the checkpoint
    never records a broken segment)."""
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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(v) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


def _records(v) -> bool:
    return isinstance(v, list) and all(
        isinstance(r, dict) and set(r) == {"file", "sha256", "frames"}
        and isinstance(r["file"], str) and isinstance(r["sha256"], str) and _is_int(r["frames"])
        and r["frames"] >= 0 for r in v)


# key -> (check, what it must be); "decoder" is present exactly when video is decoded
SCHEMA = {
    "format": (lambda v: v in READABLE, f"one of {list(READABLE)}"),
    "fingerprint": (lambda v: isinstance(v, dict), "an object of settings"),
    "block": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "segment": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "pending_cut": (lambda v: isinstance(v, bool), "true or false"),
    "cache": (lambda v: isinstance(v, dict) and set(v) == {"class"}
              and isinstance(v["class"], str), 'an object {"class": name}'),
    "frames_out": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "latent_fids": (lambda v: _int_list(v) and len(set(v)) == len(v) and min(v, default=0) >= 0,
                    "a list of distinct ints >= 0"),
    "recent": (lambda v: isinstance(v, list) and all(_int_list(p) and len(p) == 2 for p in v),
               "a list of [serial, t] pairs of ints"),
    "video_segments": (lambda v: v is None or _records(v) or (_is_int(v) and v >= 0),
                       "null or a list of segment records"),
    "latent_segments": (lambda v: v is None or _records(v) or (_is_int(v) and v >= 0),
                        "null or a list of segment records"),
    "decoder": (lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("feat"), list)
                                        and _is_int(v.get("frames_in"))),
                "null or the decoder's state"),
}
OPTIONAL = {"decoder"}


def check_meta(meta: dict, tensors: dict[str, torch.Tensor], st: Stream, where: str) -> None:
    """``ValueError`` naming the field unless the checkpoint document ``meta`` has exactly the
    keys of :data:`SCHEMA`, each of its type, was written by a run with ``st``'s settings
    (:func:`check_fingerprint`), and its counters agree with each other, with the tensors they
    describe and with the stream ``st`` it is loaded into. Checked before anything
    is loaded, so a document edited (and re-signed) into nonsense is refused, not half-applied.
    """
    bad = f"{where}: cannot resume from this checkpoint:"
    missing = sorted(set(SCHEMA) - OPTIONAL - set(meta))
    unknown = sorted(set(meta) - set(SCHEMA))
    if missing or unknown:
        raise ValueError(f"{bad} its document lacks {missing} / has unknown keys {unknown}")
    for key, value in meta.items():
        check, what = SCHEMA[key]
        if not check(value):
            raise ValueError(f"{bad} {key!r} must be {what}, got {value!r:.80}")
    check_fingerprint(meta["fingerprint"], st.settings.fingerprint())
    s, F = st.settings, st.settings.block_frames
    block = meta["block"]
    for key in ("video_segments", "latent_segments"):  # a count: unchecked lol-stream/2 only
        n = meta[key]
        if _is_int(n) and (meta["format"] != UNCHECKED or n > block):
            raise ValueError(f"{bad} {key!r} must be a list of segment records, got {n!r:.80}"
                             if meta["format"] != UNCHECKED else
                             f"{bad} {key!r} counts {n} segments for {block} blocks")
    written = tensors.get(CACHE + "frames_written")
    written = int(written) if isinstance(written, torch.Tensor) and written.numel() == 1 else None
    if block * F != written:
        raise ValueError(f"{bad} 'block' {block} x {F} frames disagrees with the {written} frames "
                         f"its cache has written")
    want = st.schedule.segment_index(block - 1)
    if meta["segment"] != want:
        raise ValueError(f"{bad} 'segment' {meta['segment']} is not the prompt segment of block "
                         f"{block} ({want}) in the run's schedule")
    fids = [f"latents.{fid}" for fid in meta["latent_fids"]]
    lost = [k for k in fids if k not in tensors]
    cached = {int(r[0]) for g in ("sink", "window", "slow")
              for r in tensors.get(f"{CACHE}{g}.frames", torch.zeros(0, 4)).tolist()}
    if lost or set(meta["latent_fids"]) != cached:
        raise ValueError(f"{bad} 'latent_fids' {meta['latent_fids']} must name the cached frames "
                         f"{sorted(cached)}, each with its latent tensor (missing: {lost})")
    rec = meta["recent"]
    if any(f"recent.{i}" not in tensors for i in range(len(rec))) or \
            any(not 0 <= sr < block * F for sr, _ in rec):
        raise ValueError(f"{bad} 'recent' {rec!r:.80} names frames the stream has not written "
                         f"or that have no latent tensor")
    if "rng.noise" not in tensors:
        raise ValueError(f"{bad} it holds no noise generator state ('rng.noise')")
    decoded = meta.get("decoder") is not None
    if decoded != (meta["video_segments"] is not None):
        raise ValueError(f"{bad} 'decoder' and 'video_segments' disagree on whether video was "
                         f"decoded")
    video = meta["video_segments"]
    if isinstance(video, list) and sum(r["frames"] for r in video) != meta["frames_out"]:
        raise ValueError(f"{bad} 'frames_out' {meta['frames_out']} is not the "
                         f"{sum(r['frames'] for r in video)} frames its 'video_segments' hold")
    lat = meta["latent_segments"]
    if isinstance(lat, list) and sum(r["frames"] for r in lat) != block * F:
        raise ValueError(f"{bad} its 'latent_segments' hold {sum(r['frames'] for r in lat)} "
                         f"frames; {block} blocks make {block * F}")
    if block > s.blocks:
        raise ValueError(f"{where} holds {block} blocks, more than the {s.blocks} this run asks "
                         f"for; resume it with at least --blocks {block + 1} to continue it")


def resume_stream(st: Stream, folder: str) -> None:
    """Load a checkpoint into a freshly built stream with the same settings. ``ValueError``
    before anything changes when the checkpoint does not describe a state of this run
    (:func:`check_meta`), or holds more blocks than the run asks for."""
    meta, tensors = load_checkpoint(folder)
    check_meta({"format": FORMAT, **meta}, tensors, st,
               os.path.join(folder, FILE) if os.path.isdir(folder) else folder)
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
