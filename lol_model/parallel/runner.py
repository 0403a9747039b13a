"""Running a stream on several processes: joining and leaving the process group, the
head-parallel stream, and its checkpoints.

Example (every rank runs this)::

    init_distributed()                          # torchrun / lol generate --nproc env vars
    st = parallel_stream(StreamSettings(...))   # UlyssesModel over the default group
    run(st, progress=is_main(), save=save_parallel)

Checkpoints (:func:`save_parallel`): each rank saves its stream (cache shard included) under
``<dir>/slot<k>/rank<r>``, two slots in turn; after a barrier rank 0 atomically writes the
manifest ``<dir>/parallel.json`` naming the slot, the world size and the head split. A crash
at any time leaves the previous manifest and its slot intact. Resuming with another world size
is refused with a ``ValueError`` naming both sizes (no re-sharding).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from ..streaming.checkpoint import resume_stream, save_stream
from ..streaming.settings import StreamSettings
from ..streaming.stream import Stream, build_model, new_stream
from . import liveness
from .ulysses import DEFAULT_TIMEOUT_S, UlyssesModel, checked, head_split

T = TypeVar("T")
MANIFEST = "parallel.json"


MANIFEST_FORMAT = "lol-parallel/1"


def init_distributed(*, backend: str | None = None, device: str = "cpu",
                     timeout_s: float = DEFAULT_TIMEOUT_S, store=None) -> tuple[int, int]:
    """Join the default process group and start this rank's liveness record
    (:mod:`lol_model.parallel.liveness`). The rank and world size come from the ``torchrun``
    environment (``RANK``, ``WORLD_SIZE``), the store from ``store`` (a client of a launcher's
    store, as :func:`lol_model.parallel.liveness.spawn_ranks` gives) or else ``env://``
    (``MASTER_ADDR``, ``MASTER_PORT``: rank 0 hosts it, or torchrun's agent). ``backend`` defaults to nccl for a
    CUDA ``device`` and gloo otherwise. A collective waiting longer than ``timeout_s`` fails,
    naming the rank that stopped responding. Returns ``(rank, world_size)``."""
    if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if not dist.is_initialized():
        backend = backend or ("nccl" if str(device).startswith("cuda") else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            host = None if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else 0
        else:
            rank, world, host = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store),
                                rank=rank, world_size=world, timeout=timeout)
        if world > 1:
            liveness.start(store, rank, world, timeout_s=timeout_s, store_host=host)
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed(error: BaseException | None = None) -> None:
    """Leave the process group; ``error``: this rank's own failure, recorded for the others
    (:func:`lol_model.parallel.liveness.record_failure`) before it goes."""
    if error is not None:
        liveness.record_failure(error)
    liveness.stop(None if error is not None else "exited")  # keep what the error recorded
    if dist.is_initialized():
        dist.destroy_process_group()


def on_rank(fn: Callable[[], T], *, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S,
            store=None) -> T:
    """``fn()`` on this rank of a head-parallel run: joins the process group
    (:func:`init_distributed`), records its own failure for the others' error messages, and
    leaves the group either way (:func:`shutdown_distributed`)."""
    init_distributed(device=device, timeout_s=timeout_s, store=store)
    try:
        out = fn()
    except BaseException as e:
        shutdown_distributed(e)
        raise
    shutdown_distributed()
    return out


def is_main() -> bool:
    """True on rank 0, or without ``torch.distributed``."""
    return not dist.is_initialized() or dist.get_rank() == 0


def rank_device(device: str) -> str:
    """``cuda`` -> ``cuda:<LOCAL_RANK>`` under torchrun; other devices unchanged."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def parallel_stream(s: StreamSettings, *, process_group=None, mesh=None,
                    text_encoder=None) -> Stream:
    """:func:`lol_model.streaming.stream.new_stream` with a :class:`UlyssesModel` over
    ``process_group`` or a 1-D ``mesh`` (every rank calls it with the same settings).
    ``ValueError`` for ``compile`` / ``cuda_graphs`` (eager only)."""
    if s.compile or s.cuda_graphs:
        raise ValueError("--compile / --cuda-graphs are not supported with --nproc > 1")
    model = UlyssesModel(build_model(s, s.torch_dtype(), torch.device(s.device)),
                         process_group=process_group, mesh=mesh)
    return new_stream(s, model=model, text_encoder=text_encoder)


def read_manifest(folder: str) -> dict | None:
    """The manifest of a parallel checkpoint in ``folder``, or ``None``."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def save_parallel(st, folder: str, *, process_group=None) -> str:
    """Every rank saves its stream (its cache shard) to the next slot; then rank 0 atomically
    points the manifest at it. Call on every rank; returns the manifest's path."""
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    old = read_manifest(folder) if rank == 0 else None
    slot = 0 if old is None else 1 - int(old["slot"])  # never the slot the manifest names
    slot_t = torch.tensor([slot])
    checked("broadcast", rank, world, dist.broadcast, slot_t, 0, group=process_group)
    slot = int(slot_t)
    save_stream(st, os.path.join(folder, f"slot{slot}", f"rank{rank}"))
    checked("barrier", rank, world, dist.barrier, group=process_group)
    path = os.path.join(folder, MANIFEST)
    if rank == 0:
        doc = {"format": MANIFEST_FORMAT, "world_size": world, "slot": slot, "block": st.block,
               "num_heads": st.model.cfg.num_heads,
               "head_split": head_split(st.model.cfg.num_heads, world)}
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    checked("barrier", rank, world, dist.barrier, group=process_group)
    return path


def resume_parallel(st, folder: str, *, process_group=None) -> None:
    """Load this rank's shard of the checkpoint the manifest names. ``ValueError`` when the
    checkpoint was written by another world size or is not a parallel checkpoint."""
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    doc = read_manifest(folder)
    if doc is None:
        raise ValueError(f"{folder} holds no parallel checkpoint ({MANIFEST}); a single-process "
                         f"checkpoint resumes without --nproc")
    if doc.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"unknown parallel checkpoint format {doc.get('format')!r}")
    if doc["world_size"] != world:
        raise ValueError(f"the checkpoint in {folder} was written by {doc['world_size']} ranks; "
                         f"resume it with --nproc {doc['world_size']}, not {world} (cache "
                         f"shards are not re-sharded)")
    resume_stream(st, os.path.join(folder, f"slot{doc['slot']}", f"rank{rank}"))
