"""Append-only mp4 and latent output in closed, checked segments, so a killed stream stays playable.

An mp4 is only playable once its index (``moov``) is written at close, so a long stream is
written as a sequence of segments ``<out>.segments/seg_00000.mp4, seg_00001.mp4, ...``: frames
go into ``seg_NNNNN.part.mp4`` as they are decoded, and the segment is closed and renamed at
every checkpoint (or every ``segment_blocks`` blocks). If the process is killed, every closed
segment plays, and ``<out>.segments/list.txt`` (rewritten atomically at each close) is an ffmpeg
concat list of them: ``ffmpeg -f concat -safe 0 -i list.txt -c copy out.mp4``. When the stream
finishes, :meth:`SegmentedVideoWriter.finalize` joins the segments into ``<out>`` the same way
(stream copy: nothing is re-encoded or held in memory) and removes the folder.

A segment counts as closed only when ffmpeg exited with status 0 **and** the file holds exactly
the frames sent (counted by ffmpeg from the container, :func:`count_video_frames`). Otherwise
(ffmpeg died, the disk filled, the file is truncated) the segment is deleted, never recorded,
and :class:`~lol_model.errors.SegmentError` is raised: no checkpoint is written after it (the
generator closes the segments before it saves), so the last checkpoint stays consistent and
``--resume`` regenerates the lost blocks. The final join is checked the same way (exit status,
and the joined file holds the sum of the segments' frames); if it fails the segments are kept.

Each closed segment is a record ``{"file", "sha256", "frames"}`` (:attr:`segments`) that the
checkpoint stores. ``--resume`` calls ``truncate(records)``: the recorded segments must be
there with the same SHA-256 (else ``ValueError`` naming the segment, expected and found digest);
later segments (and an unfinished part) are deleted and regenerated.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from fractions import Fraction

import torch

from ..errors import SegmentError, exit_status, first_line

RESTORE = "restore it, or start the stream again with --overwrite"


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file and ``os.replace``."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: str, *, fsync: bool = False) -> str:
    """Hex SHA-256 of the file at ``path`` (read in 1 MiB chunks); ``fsync`` it first."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def ffmpeg_exe() -> str:
    """The ffmpeg binary: ``IMAGEIO_FFMPEG_EXE`` if set, else imageio-ffmpeg's own."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def exit_text(rc: int, message: str = "") -> str:
    """``"ffmpeg exited with status 1: <its last message>"`` / ``"... killed by signal 9, ..."``."""
    return f"ffmpeg {exit_status(rc)}" + (f": {message}" if message else "")


def last_line(data: bytes) -> str:
    """The last non-empty line of ffmpeg's output, cut to 200 characters."""
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def count_video_frames(path: str) -> int:
    """Video frames in the media file ``path``, counted by ffmpeg from its packets (stream copy,
    nothing decoded, so cheap for long files). ``RuntimeError`` if ffmpeg cannot read it."""
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", path, "-map", "0:v:0", "-c", "copy",
           "-f", "null", "-progress", "pipe:1", "-"]
    r = subprocess.run(cmd, capture_output=True, start_new_session=True)
    if r.returncode:
        raise RuntimeError(exit_text(r.returncode, last_line(r.stderr)))
    counts = [ln.split(b"=", 1)[1] for ln in r.stdout.splitlines() if ln.startswith(b"frame=")]
    if not counts or not counts[-1].strip().isdigit():
        raise RuntimeError("ffmpeg finds no video stream in it")
    return int(counts[-1])


class FFmpegEncoder:
    """One ffmpeg process encoding raw ``uint8 [H, W, 3]`` frames from its stdin into an H.264
    mp4 at ``path``. ``quality`` is imageio-ffmpeg's scale (10 best; CRF ``51 (1 - q / 10)``).

    ffmpeg runs in its own session, so a Ctrl-C in the terminal reaches only ``lol`` (which then
    closes the segment cleanly); its messages go to a temporary file, quoted in errors.
    """

    def __init__(self, path: str, size: tuple[int, int], *, fps: float, quality: int):
        W, H = size
        crf = int((1 - quality / 10) * 51)
        cmd = [ffmpeg_exe(), "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
               f"{W}x{H}", "-r", str(Fraction(fps).limit_denominator()), "-i", "-", "-an",
               "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), path]
        self.log = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=self.log, start_new_session=True)
        except OSError:
            self.log.close()
            raise
        self.sent = 0  # frames written to ffmpeg

    def write(self, frame: bytes) -> None:
        self.proc.stdin.write(frame)
        self.sent += 1

    def close(self) -> tuple[int, str]:
        """End the input and wait for ffmpeg: ``(exit status, its last message)``. Idempotent."""
        if not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:  # ffmpeg is gone and the last frames stayed buffered: rc says why
                pass
        rc = self.proc.wait()
        if self.log.closed:
            return rc, ""
        self.log.seek(0)
        msg = last_line(self.log.read())
        self.log.close()
        return rc, msg


class SegmentLog:
    """Records ``{"file", "sha256", "frames"}`` of a writer's closed segments, in order."""

    segments: list[dict]

    @property
    def closed(self) -> int:
        """Number of closed segments."""
        return len(self.segments)

    @property
    def frames(self) -> int:
        """Frames in the closed segments."""
        return sum(r["frames"] for r in self.segments)


class SegmentedVideoWriter(SegmentLog):
    """Write ``uint8 [Fv, H, W, 3]`` video frames to ``out`` through closed mp4 segments.

    ``segments``: the records ``{"file", "sha256", "frames"}`` of the closed segments, in order.
    """

    def __init__(self, out: str, *, fps: float = 16.0, quality: int = 7):
        if not out.endswith(".mp4"):
            raise ValueError(f"video output must end in .mp4, got {out!r}")
        try:
            exe = ffmpeg_exe()
        except RuntimeError as e:  # imageio-ffmpeg found no binary
            raise ValueError(f"no ffmpeg to write {out}: {first_line(e)}") from None
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise ValueError(f"ffmpeg {exe!r} is not an executable file (IMAGEIO_FFMPEG_EXE?)")
        self.out, self.fps, self.quality = out, fps, quality
        self.seg_dir = out + ".segments"
        os.makedirs(self.seg_dir, exist_ok=True)
        self.segments: list[dict] = []
        self._gen: FFmpegEncoder | None = None  # the open segment's encoder

    def _seg(self, i: int, part: bool = False) -> str:
        return os.path.join(self.seg_dir, f"seg_{i:05d}{'.part' if part else ''}.mp4")

    def append(self, frames: torch.Tensor) -> None:
        """Encode frames ``[Fv, H, W, 3]`` uint8 into the open segment (opened on demand).
        :class:`~lol_model.errors.SegmentError` if ffmpeg has stopped (the segment is lost)."""
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [Fv, H, W, 3], got {frames.dtype} "
                             f"{list(frames.shape)}")
        if frames.shape[1] % 2 or frames.shape[2] % 2:
            raise ValueError(f"frames need an even height and width (H.264 4:2:0), got "
                             f"{list(frames.shape[1:3])}")
        if self._gen is None:
            try:
                self._gen = FFmpegEncoder(self._seg(self.closed, part=True),
                                          (frames.shape[2], frames.shape[1]), fps=self.fps,
                                          quality=self.quality)
            except OSError as e:
                raise SegmentError(f"cannot start ffmpeg for video segment "
                                   f"{self._seg(self.closed)}: {first_line(e)}") from None
        try:
            for f in frames:
                self._gen.write(f.contiguous().numpy().tobytes())
        except (OSError, ValueError) as e:  # a broken pipe: ffmpeg has exited
            self._discard(f"ffmpeg stopped while encoding ({first_line(e)})")

    def _discard(self, why: str, *, status: tuple[int, str] | None = None):
        """Drop the open segment (its file is incomplete) and raise ``SegmentError``."""
        enc, self._gen = self._gen, None
        rc, msg = status if status is not None else enc.close()
        part = self._seg(self.closed, part=True)
        for p in (part, self._seg(self.closed)):
            if os.path.exists(p):
                os.remove(p)
        detail = f"; {exit_text(rc, msg)}" if status is None and (rc or msg) else ""
        raise SegmentError(f"video segment {self._seg(self.closed)} failed: {why}{detail}; its "
                           f"{enc.sent} frames were discarded (ffmpeg died or the disk is full?)")

    def close_segment(self) -> None:
        """Close the open segment (now playable) and update ``list.txt``; no-op if none.

        :class:`~lol_model.errors.SegmentError` (the segment deleted, not recorded) if ffmpeg
        exits non-zero or the file does not hold every frame sent."""
        if self._gen is None:
            return
        enc = self._gen
        rc, msg = enc.close()
        if rc:
            self._discard(exit_text(rc, msg), status=(rc, msg))
        part, final = self._seg(self.closed, part=True), self._seg(self.closed)
        try:
            found = count_video_frames(part)
        except (RuntimeError, OSError) as e:
            self._discard(f"the closed file is unreadable ({e})", status=(rc, msg))
        if found != enc.sent:
            self._discard(f"the closed file holds {found} of the {enc.sent} frames sent",
                          status=(rc, msg))
        try:
            record = {"file": os.path.basename(final), "sha256": file_sha256(part, fsync=True),
                      "frames": found}
            os.replace(part, final)
            names = [r["file"] for r in self.segments] + [record["file"]]
            atomic_write_text(os.path.join(self.seg_dir, "list.txt"),
                              "".join(f"file '{n}'\n" for n in names))
        except OSError as e:
            self._discard(f"cannot record it ({first_line(e)})", status=(rc, msg))
        self.segments.append(record)
        self._gen = None

    def truncate(self, kept: int | list[dict]) -> None:
        """Keep the segments a checkpoint recorded, delete the rest (resume).

        ``kept``: the checkpoint's records, each verified against its file (``ValueError`` naming
        the segment if it is missing or its SHA-256 differs); an ``int`` (a ``lol-stream/2``
        checkpoint) keeps that many segments unverified and records them as they are.
        """
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        n = kept if isinstance(kept, int) else len(kept)
        missing = [i for i in range(n) if not os.path.isfile(self._seg(i))]
        if missing:
            raise ValueError(f"cannot resume the video: segment(s) {missing} are missing from "
                             f"{self.seg_dir}; {RESTORE}")
        if isinstance(kept, int):
            kept = [{"file": os.path.basename(self._seg(i)), "sha256": file_sha256(self._seg(i)),
                     "frames": count_video_frames(self._seg(i))} for i in range(n)]
        for i, rec in enumerate(kept):
            check_record(rec, os.path.basename(self._seg(i)), self.seg_dir, "video")
        for p in glob.glob(os.path.join(self.seg_dir, "seg_*.mp4")):
            name = os.path.basename(p)
            if name.endswith(".part.mp4") or int(name[4:9]) >= n:
                os.remove(p)
        self.segments = [dict(r) for r in kept]
        atomic_write_text(os.path.join(self.seg_dir, "list.txt"),
                          "".join(f"file '{r['file']}'\n" for r in self.segments))

    def finalize(self, *, keep_segments: bool = False) -> str:
        """Close, join every segment into ``out`` (stream copy), then remove the segment folder
        unless ``keep_segments`` (kept when checkpointing, so a finished run can be extended
        with ``--resume --blocks N``).

        :class:`~lol_model.errors.SegmentError` if the join fails (ffmpeg's exit status, or the
        joined file does not hold the sum of the segments' frames); the segments are kept."""
        self.close_segment()
        if not self.segments:
            return self.out
        segs = [os.path.join(self.seg_dir, r["file"]) for r in self.segments]
        tmp = self.out + ".tmp.mp4"
        try:
            if len(segs) == 1:
                shutil.copyfile(segs[0], tmp)
            else:
                cmd = [ffmpeg_exe(), "-nostdin", "-y", "-v", "error", "-f", "concat", "-safe",
                       "0", "-i", os.path.join(self.seg_dir, "list.txt"), "-c", "copy", tmp]
                r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)
                if r.returncode:
                    raise RuntimeError(exit_text(r.returncode, last_line(r.stderr)))
            try:
                found = count_video_frames(tmp)
            except RuntimeError as e:
                raise RuntimeError(f"the joined file is unreadable ({e})") from None
            if found != self.frames:
                raise RuntimeError(f"the joined file holds {found} of the {self.frames} frames")
            os.replace(tmp, self.out)
        except (OSError, RuntimeError) as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise SegmentError(f"joining the {len(segs)} video segments into {self.out} failed: "
                               f"{e}; the segments are kept in {self.seg_dir} (ffmpeg concat "
                               f"list: list.txt)") from None
        if not keep_segments:
            shutil.rmtree(self.seg_dir)
        return self.out


def check_record(rec, name: str, folder: str, what: str) -> None:
    """``ValueError`` unless segment record ``rec`` names ``name`` and that file in ``folder``
    has the recorded SHA-256."""
    if not isinstance(rec, dict) or rec.get("file") != name or \
            not isinstance(rec.get("sha256"), str) or not isinstance(rec.get("frames"), int):
        raise ValueError(f"cannot resume: the checkpoint's record of {what} segment {name} is "
                         f"malformed ({rec!r})")
    got = file_sha256(os.path.join(folder, name))
    if got != rec["sha256"]:
        raise ValueError(f"cannot resume: {what} segment {name} in {folder} does not match the "
                         f"checkpoint (sha256 {rec['sha256'][:12]}... expected, {got[:12]}... "
                         f"found); it changed after the checkpoint was written: {RESTORE}")


class LatentWriter(SegmentLog):
    """Save clean latents per segment to ``<dir>/seg_NNNNN.safetensors``: key ``latents``
    ``[B, F, Cz, h, w]`` (frame-major, so a ``B = 1`` segment is the ``[F, Cz, H, W]`` that
    ``lol diagnose --latents`` reads) for the blocks since the last close, and ``first_frame``.

    ``segments``: records ``{"file", "sha256", "frames"}`` of the closed segments."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.segments: list[dict] = []
        self._buf: list[torch.Tensor] = []

    def append(self, z: torch.Tensor) -> None:
        self._buf.append(z.detach().cpu())

    def close_segment(self) -> None:
        """Write the buffered latents as the next segment; :class:`~lol_model.errors.SegmentError`
        (nothing recorded) if the file cannot be written."""
        from safetensors.torch import save_file

        if not self._buf:
            return
        z = torch.cat(self._buf, dim=2).transpose(1, 2).contiguous()
        self._buf = []
        name = f"seg_{self.closed:05d}.safetensors"
        path = os.path.join(self.folder, name)
        try:
            save_file({"latents": z, "first_frame": torch.tensor([self.frames])}, path + ".tmp")
            digest = file_sha256(path + ".tmp", fsync=True)
            os.replace(path + ".tmp", path)
        except Exception as e:  # safetensors raises its own error type for a full disk
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            raise SegmentError(f"latent segment {path} could not be written ({first_line(e)}); "
                               f"its {z.shape[1]} frames were discarded (disk full?)") from None
        self.segments.append({"file": name, "sha256": digest, "frames": z.shape[1]})

    def truncate(self, kept: int | list[dict]) -> None:
        """As :meth:`SegmentedVideoWriter.truncate`: keep (and verify) the recorded segments,
        delete later ones; an ``int`` keeps that many unverified (``lol-stream/2``)."""
        from safetensors import safe_open

        n = kept if isinstance(kept, int) else len(kept)
        paths = [os.path.join(self.folder, f"seg_{i:05d}.safetensors") for i in range(n)]
        missing = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"cannot resume the latents: segment(s) {missing} are missing from "
                             f"{self.folder}; {RESTORE}")
        if isinstance(kept, int):
            kept = []
            for p in paths:
                with safe_open(p, "pt") as f:
                    frames = f.get_slice("latents").get_shape()[1]
                kept.append({"file": os.path.basename(p), "sha256": file_sha256(p),
                             "frames": frames})
        for p, rec in zip(paths, kept, strict=True):
            check_record(rec, os.path.basename(p), self.folder, "latent")
        for p in glob.glob(os.path.join(self.folder, "seg_*.safetensors*")):
            name = os.path.basename(p)
            if not name.endswith(".safetensors") or int(name[4:9]) >= n:
                os.remove(p)
        self.segments, self._buf = [dict(r) for r in kept], []


def load_latents(folder: str) -> torch.Tensor:
    """All saved latents of a run, ``[B, F, Cz, h, w]`` (for analysis; loads everything)."""
    from safetensors.torch import load_file

    paths = sorted(glob.glob(os.path.join(folder, "seg_*.safetensors")))
    if not paths:
        raise ValueError(f"no latent segments in {folder!r}")
    return torch.cat([load_file(p)["latents"] for p in paths], dim=1)
