"""Append-only mp4 and latent output in closed segments, so a killed stream stays playable.

An mp4 is only playable once its index (``moov``) is written at close, so a long stream is
written as a sequence of segments ``<out>.segments/seg_00000.mp4, seg_00001.mp4, ...``: frames
go into ``seg_NNNNN.part.mp4`` as they are decoded, and the segment is closed and renamed at
every checkpoint (or every ``segment_blocks`` blocks). If the process is killed, every closed
segment plays, and ``<out>.segments/list.txt`` (rewritten atomically at each close) is an ffmpeg
concat list of them: ``ffmpeg -f concat -safe 0 -i list.txt -c copy out.mp4``. When the stream
finishes, :meth:`SegmentedVideoWriter.finalize` joins the segments into ``<out>`` the same way
(stream copy: nothing is re-encoded or held in memory) and removes the folder.

``--resume`` calls :meth:`SegmentedVideoWriter.truncate` with the number of segments the
checkpoint recorded: later segments (and the unfinished part) are dropped and regenerated.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import torch


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SegmentedVideoWriter:
    """Write ``uint8 [Fv, H, W, 3]`` video frames to ``out`` through closed mp4 segments."""

    def __init__(self, out: str, *, fps: float = 16.0, quality: int = 7):
        if not out.endswith(".mp4"):
            raise ValueError(f"video output must end in .mp4, got {out!r}")
        self.out, self.fps, self.quality = out, fps, quality
        self.seg_dir = out + ".segments"
        os.makedirs(self.seg_dir, exist_ok=True)
        self.closed = 0
        self._gen = None
        self._size = None

    def _seg(self, i: int, part: bool = False) -> str:
        return os.path.join(self.seg_dir, f"seg_{i:05d}{'.part' if part else ''}.mp4")

    def append(self, frames: torch.Tensor) -> None:
        """Encode frames ``[Fv, H, W, 3]`` uint8 into the open segment (opened on demand)."""
        import imageio_ffmpeg

        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [Fv, H, W, 3], got {frames.dtype} "
                             f"{list(frames.shape)}")
        if self._gen is None:
            H, W = frames.shape[1:3]
            self._size = (W, H)
            self._gen = imageio_ffmpeg.write_frames(
                self._seg(self.closed, part=True), (W, H), fps=self.fps, codec="libx264",
                quality=self.quality, macro_block_size=2, ffmpeg_log_level="error")
            self._gen.send(None)
        for f in frames:
            self._gen.send(f.contiguous().numpy().tobytes())

    def close_segment(self) -> None:
        """Close the open segment (now playable) and update ``list.txt``; no-op if none."""
        if self._gen is None:
            return
        self._gen.close()
        self._gen = None
        os.replace(self._seg(self.closed, part=True), self._seg(self.closed))
        self.closed += 1
        lines = "".join(f"file 'seg_{i:05d}.mp4'\n" for i in range(self.closed))
        _atomic_write_text(os.path.join(self.seg_dir, "list.txt"), lines)

    def truncate(self, closed: int) -> None:
        """Keep the first ``closed`` segments, delete the rest (resume)."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        missing = [i for i in range(closed) if not os.path.isfile(self._seg(i))]
        if missing:
            raise ValueError(f"cannot resume the video: segment(s) {missing} are missing from "
                             f"{self.seg_dir}")
        for p in glob.glob(os.path.join(self.seg_dir, "seg_*.mp4")):
            name = os.path.basename(p)
            if name.endswith(".part.mp4") or int(name[4:9]) >= closed:
                os.remove(p)
        self.closed = closed

    def finalize(self, *, keep_segments: bool = False) -> str:
        """Close, join every segment into ``out`` (stream copy), then remove the segment folder
        unless ``keep_segments`` (kept when checkpointing, so a finished run can be extended
        with ``--resume --blocks N``)."""
        import imageio_ffmpeg

        self.close_segment()
        segs = [self._seg(i) for i in range(self.closed)]
        tmp = self.out + ".tmp.mp4"
        if len(segs) == 1:
            shutil.copyfile(segs[0], tmp)
        elif segs:
            cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "concat",
                   "-safe", "0", "-i", os.path.join(self.seg_dir, "list.txt"), "-c", "copy", tmp]
            subprocess.run(cmd, check=True)
        else:
            return self.out
        os.replace(tmp, self.out)
        if not keep_segments:
            shutil.rmtree(self.seg_dir)
        return self.out


class LatentWriter:
    """Save clean latents per segment to ``<dir>/seg_NNNNN.safetensors``: key ``latents``
    ``[B, F, Cz, h, w]`` (frame-major, so a ``B = 1`` segment is the ``[F, Cz, H, W]`` that
    ``lol diagnose --latents`` reads) for the blocks since the last close, and ``first_frame``."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.closed, self.frames, self._buf = 0, 0, []

    def append(self, z: torch.Tensor) -> None:
        self._buf.append(z.detach().cpu())

    def close_segment(self) -> None:
        from safetensors.torch import save_file

        if not self._buf:
            return
        z = torch.cat(self._buf, dim=2).transpose(1, 2).contiguous()
        path = os.path.join(self.folder, f"seg_{self.closed:05d}.safetensors")
        save_file({"latents": z, "first_frame": torch.tensor([self.frames])}, path + ".tmp")
        os.replace(path + ".tmp", path)
        self.closed += 1
        self.frames += z.shape[1]
        self._buf = []

    def truncate(self, closed: int, frames: int) -> None:
        for p in glob.glob(os.path.join(self.folder, "seg_*.safetensors*")):
            name = os.path.basename(p)
            if not name.endswith(".safetensors") or int(name[4:9]) >= closed:
                os.remove(p)
        self.closed, self.frames, self._buf = closed, frames, []


def load_latents(folder: str) -> torch.Tensor:
    """All saved latents of a run, ``[B, F, Cz, h, w]`` (for analysis; loads everything)."""
    from safetensors.torch import load_file

    paths = sorted(glob.glob(os.path.join(folder, "seg_*.safetensors")))
    if not paths:
        raise ValueError(f"no latent segments in {folder!r}")
    return torch.cat([load_file(p)["latents"] for p in paths], dim=1)
