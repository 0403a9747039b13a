"""Running a stream: blocks until ``settings.blocks`` exist, with checkpoints, progress and
outputs, and the one description of a failure (what stopped, at which block, what was kept)
that the command line, :class:`~lol_model.integrations.diffusers.LolStreamingPipeline` and
every rank of a head-parallel run give.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from ..errors import GenerationError, Interrupted, RankFailure, first_line
from .checkpoint import FILE, save_stream
from .memory import rss_bytes
from .outputs import close_segments, finish
from .stream import Stream, advance

SaveFn = Callable[[Stream, str], str]


def run(st: Stream, *, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
        segment_blocks: int = 25, progress: bool = True,
        on_block: Callable[[Stream, torch.Tensor], None] | None = None,
        save: SaveFn | None = None) -> Stream:
    """Generate until ``settings.blocks`` blocks exist, checkpointing every ``checkpoint_every``
    blocks into ``checkpoint_dir`` (mp4 segments close at checkpoints, or every
    ``segment_blocks`` blocks without checkpoints) with ``save(st, folder)`` (default
    :func:`~lol_model.streaming.checkpoint.save_stream`;
    :func:`lol_model.parallel.runner.save_parallel` on every rank)."""
    save = save_stream if save is None else save

    total = st.settings.blocks
    if checkpoint_every and not checkpoint_dir:
        raise ValueError("checkpoint_every needs a checkpoint_dir")
    every = checkpoint_every or segment_blocks
    bar = tqdm(total=total, initial=st.block, unit="block", disable=not progress,
               dynamic_ncols=True)
    t0, b0 = time.perf_counter(), st.block
    while st.block < total:
        x0 = advance(st)
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


def keep_written(st: Stream, checkpoint_dir: str | None) -> str:
    """After a failed or interrupted block: close the open segments so what was written stays
    playable / loadable; returns a sentence saying what was kept, where, and whether the last
    checkpoint (which ``--resume`` continues from) is intact."""
    said, lost = [], []
    for writer, what in ((st.video, "video"), (st.latent_writer, "latent")):
        if writer is None:
            continue
        try:
            writer.close_segment()
        except Exception as e:  # keep the first error; report that the open segment was lost
            lost.append(f"the open {what} segment was lost ({first_line(e, 120)})")
    if getattr(st.video, "segments", None):  # a segmented mp4 (not frames kept in memory)
        said.append(f"{st.video.frames} video frames in {st.video.seg_dir} (ffmpeg concat "
                    f"list: list.txt)")
    if st.latent_writer is not None and st.latent_writer.segments:
        said.append(f"{st.latent_writer.frames} latent frames in {st.latent_writer.folder}")
    if checkpoint_dir:
        if os.path.isfile(os.path.join(checkpoint_dir, FILE)):
            said.append(f"the last good checkpoint{saved_block(checkpoint_dir)} in "
                        f"{checkpoint_dir} is intact (--resume continues from it)")
    text = ("kept: " + "; ".join(said)) if said else "nothing was written"
    return "; ".join([text, *lost])


def saved_block(checkpoint_dir: str) -> str:
    """``" (block N)"`` from the checkpoint's readable copy ``stream.json``; ``""`` if unknown."""
    try:
        with open(os.path.join(checkpoint_dir, "stream.json")) as f:
            return f" (block {int(json.load(f)['block'])})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def run_to_outputs(st: Stream, *, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
                   progress: bool = True,
                   on_block: Callable[[Stream, torch.Tensor], None] | None = None,
                   save: SaveFn | None = None) -> str | None:
    """:func:`run`, then :func:`~lol_model.streaming.outputs.finish` (segments are kept when
    checkpoints refer to them); returns the mp4's path, if any.

    Every failure comes out described in one message: a stop (:class:`GenerationError`, a
    failed output: ``OSError``, another rank's failure: :class:`RankFailure`) as a
    :class:`GenerationError` saying at which block, and a Ctrl-C as :class:`Interrupted`; both
    say what was kept (:func:`keep_written`).
    """
    ckpt = checkpoint_dir if checkpoint_every else None
    try:
        run(st, checkpoint_dir=ckpt, checkpoint_every=checkpoint_every, progress=progress,
            on_block=on_block, save=save)
        return finish(st, keep_segments=bool(checkpoint_every))
    except RankFailure as e:
        raise GenerationError(f"{e} (at block {st.block + 1})") from None
    except (GenerationError, OSError) as e:  # stop; say what stays (keep_written closes it)
        kept = keep_written(st, ckpt)
        what = str(e) if isinstance(e, GenerationError) else \
            f"writing the output failed at block {st.block}: {first_line(e, 1000)}"
        raise GenerationError(f"{what}. {kept[0].upper()}{kept[1:]}",
                              block=getattr(e, "block", None)) from None
    except KeyboardInterrupt:
        raise interrupted(st, ckpt) from None


def interrupted(st: Stream, checkpoint_dir: str | None) -> Interrupted:
    """The :class:`Interrupted` of a Ctrl-C during block ``st.block + 1``, saying what was kept
    (:func:`keep_written` closes the open segments)."""
    at = min(st.block + 1, st.settings.blocks)
    return Interrupted(f"interrupted at block {at}; {keep_written(st, checkpoint_dir)}")
