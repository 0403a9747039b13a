"""Fault injection at the mp4 segment close and the final join.

A fake ffmpeg (``IMAGEIO_FFMPEG_EXE``, which imageio-ffmpeg reads on every call) runs the real
one except for one chosen call, which it breaks: it exits non-zero, is killed, or exits 0 after
writing a truncated, garbage, empty or short file. Driven through ``lol generate
--checkpoint-every 2``, every fault must stop the run with one ``lol: error:`` line (exit 1)
naming the segment, leave the last checkpoint intact and recording only good segments, and a
``--resume`` with the real ffmpeg must then produce the same frames and bit-identical latents as
an uninterrupted run.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from lol_model.cli import main
from lol_model.streaming.checkpoint import load_checkpoint
from lol_model.streaming.video import count_video_frames, ffmpeg_exe, file_sha256, load_latents

RUN = ["generate", "--blocks", "6", "--size", "32x32", "--quiet", "--threads", "1",
       "--checkpoint-every", "2", "--save-latents", "--prompt", "a cat[3] | a dog"]
FRAMES = 1 + 4 * (6 * 3 - 1)  # video frames of 6 blocks of 3 latent frames

FAKE = r'''#!{python} -S
import os, subprocess, sys
REAL, MODE, KIND, NTH, COUNTER = {real!r}, {mode!r}, {kind!r}, {nth!r}, {counter!r}
args = sys.argv[1:]
kind = "encode" if "rawvideo" in args else "join" if "concat" in args else "probe"
n = -1
if kind == KIND:
    n = int(open(COUNTER).read()) if os.path.exists(COUNTER) else 0
    open(COUNTER, "w").write(str(n + 1))
if n != NTH:
    os.execv(REAL, [REAL] + args)
out = args[-1]
if MODE == "exit-at-start":  # dies before reading a frame
    sys.exit(1)
if MODE in ("garbage", "empty"):  # reads everything, writes a broken file, claims success
    sys.stdin.buffer.read()
    open(out, "wb").write(os.urandom(3000) if MODE == "garbage" else b"")
    sys.exit(0)
if MODE == "short":  # a valid file with only some of the frames, exit 0
    if kind == "encode":
        w, h = map(int, args[args.index("-s") + 1].split("x"))
        data = sys.stdin.buffer.read()
        subprocess.run([REAL] + args, input=data[: 5 * w * h * 3])
    else:
        subprocess.run([REAL] + args[:-1] + ["-frames:v", "10", out])
    sys.exit(0)
rc = subprocess.run([REAL] + args).returncode
if MODE == "exit-nonzero":  # a finished file, but ffmpeg reports a failure
    sys.stderr.write("av_interleaved_write_frame(): No space left on device\n")
    sys.exit(1)
if MODE == "killed":
    os.kill(os.getpid(), 9)
if MODE == "truncated":  # the disk filled: the end of the file (with the mp4 index) is gone
    os.truncate(out, os.path.getsize(out) // 2)
sys.exit(rc)
'''


def fake_ffmpeg(tmp_path, monkeypatch, mode: str, kind: str, nth: int) -> None:
    """Point ``IMAGEIO_FFMPEG_EXE`` at a fake that breaks the ``nth`` (0-based) ``kind`` call."""
    real = ffmpeg_exe()
    path = tmp_path / "fake-ffmpeg"
    path.write_text(FAKE.format(python=sys.executable, real=real, mode=mode, kind=kind, nth=nth,
                                counter=str(tmp_path / "calls")))
    path.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(path))
    assert ffmpeg_exe() == str(path)  # imageio-ffmpeg honours the variable on every call


def lol(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("lol")]
    assert len(lines) == 1 and lines[0].startswith("lol: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its frame count and latents."""
    d = tmp_path_factory.mktemp("ref")
    assert main([*RUN, "--out", str(d / "ref.mp4")]) == 0
    return count_video_frames(str(d / "ref.mp4")), load_latents(str(d / "ref.latents"))


def check_resumed(tmp_path, reference, out) -> None:
    frames, latents = reference
    assert frames == FRAMES
    assert count_video_frames(str(out)) == frames
    assert torch.equal(load_latents(str(tmp_path / "x.latents")), latents)


def check_good_segments(ck, seg_dir) -> int:
    """The checkpoint loads (checksums verified) and records only files that are there with
    the recorded digest; returns its block."""
    meta, _ = load_checkpoint(str(ck))
    for rec in meta["video_segments"]:
        assert file_sha256(os.path.join(seg_dir, rec["file"])) == rec["sha256"]
        assert count_video_frames(os.path.join(seg_dir, rec["file"])) == rec["frames"]
    return meta["block"]


# (mode, nth encode that breaks, text the error line must hold)
CLOSE_FAULTS = [
    ("exit-at-start", 1, "ffmpeg"),
    ("exit-nonzero", 1, "exited with status 1: av_interleaved_write_frame(): No space left"),
    ("killed", 1, "killed by signal 9"),
    ("truncated", 1, "unreadable"),
    ("garbage", 1, "unreadable"),
    ("empty", 1, "unreadable"),
    ("short", 1, "holds 5 of the 24 frames sent"),
    ("exit-nonzero", 0, "exited with status 1"),  # the first segment: no checkpoint yet
]


@pytest.mark.parametrize("mode,nth,expect", CLOSE_FAULTS,
                         ids=[f"{m}-segment{n}" for m, n, _ in CLOSE_FAULTS])
def test_failed_segment_close_stops_and_resume_regenerates(tmp_path, capsys, monkeypatch,
                                                           reference, mode, nth, expect):
    out, ck, seg = tmp_path / "x.mp4", tmp_path / "x.mp4.ckpt", tmp_path / "x.mp4.segments"
    fake_ffmpeg(tmp_path, monkeypatch, mode, "encode", nth)
    rc, err = lol([*RUN, "--out", str(out)], capsys)
    line = error_line(err)
    assert rc == 1, err
    assert f"video segment {seg / f'seg_{nth:05d}.mp4'} failed" in line and expect in line, line
    assert "discarded" in line and not out.exists()
    assert not (seg / f"seg_{nth:05d}.mp4").exists()  # the broken segment is not kept
    assert not list(seg.glob("*.part.mp4"))
    if nth == 0:
        assert not (ck / "stream.safetensors").exists() and "checkpoint" not in line
    else:
        assert f"the last good checkpoint (block {2 * nth}) in {ck} is intact" in line, line
        assert check_good_segments(ck, seg) == 2 * nth
        assert f"{count_video_frames(str(seg / 'seg_00000.mp4'))} video frames" in line
    monkeypatch.delenv("IMAGEIO_FFMPEG_EXE")
    again = "--resume" if nth else "--overwrite"
    assert lol([*RUN, "--out", str(out), again], capsys)[0] == 0
    check_resumed(tmp_path, reference, out)


JOIN_FAULTS = [
    ("exit-nonzero", "exited with status 1"),
    ("killed", "killed by signal 9"),
    ("truncated", "unreadable"),
    ("garbage", "unreadable"),
    ("short", f"holds 10 of the {FRAMES} frames"),
]


@pytest.mark.parametrize("mode,expect", JOIN_FAULTS, ids=[m for m, _ in JOIN_FAULTS])
def test_failed_join_keeps_the_segments(tmp_path, capsys, monkeypatch, reference, mode, expect):
    out, ck, seg = tmp_path / "x.mp4", tmp_path / "x.mp4.ckpt", tmp_path / "x.mp4.segments"
    fake_ffmpeg(tmp_path, monkeypatch, mode, "join", 0)
    rc, err = lol([*RUN, "--out", str(out)], capsys)
    line = error_line(err)
    assert rc == 1 and "joining the 3 video segments" in line and expect in line, line
    assert f"the segments are kept in {seg}" in line
    assert not out.exists() and not (tmp_path / "x.mp4.tmp.mp4").exists()
    assert check_good_segments(ck, seg) == 6
    assert sum(count_video_frames(str(p)) for p in seg.glob("seg_?????.mp4")) == FRAMES
    monkeypatch.delenv("IMAGEIO_FFMPEG_EXE")
    assert lol([*RUN, "--out", str(out), "--resume"], capsys)[0] == 0  # only joins again
    check_resumed(tmp_path, reference, out)


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size)``: (re)mount a tmpfs of ``size`` at ``tmp_path / "disk"`` (root only)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(size: str):
        opts = f"size={size}" if not mounted else f"remount,size={size}"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(disk)],
                           capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(size)
        return disk

    yield mount
    if mounted:
        subprocess.run(["umount", str(disk)], check=True)


# (segments' disk size, checkpoint on the same disk): the disk fills at a video segment close,
# a latent segment or the checkpoint, depending on the size
DISK_FULL = [("16k", False), ("28k", False), ("40k", False), ("52k", False), ("64k", False),
             ("1200k", True)]


@pytest.mark.parametrize("size,same_disk", DISK_FULL,
                         ids=[f"{s}{'-with-checkpoint' if c else ''}" for s, c in DISK_FULL])
def test_disk_full_stops_and_resume_regenerates(tmp_path, capsys, small_disk, reference, size,
                                                same_disk):
    """A real full disk (a small tmpfs): one error line, exit 1, the checkpoint records only
    good segments; with space again, ``--resume`` (``--overwrite`` if no checkpoint was
    written yet) completes bit-exactly."""
    disk = small_disk(size)
    out = disk / "x.mp4"
    ck = disk / "ck" if same_disk else tmp_path / "ck"
    argv = [*RUN[:-2], "--prompt", RUN[-1], "--out", str(out), "--checkpoint-dir", str(ck)]
    rc, err = lol(argv, capsys)
    line = error_line(err)
    assert rc == 1 and "No space left on device" in line, line
    assert not out.exists() and not list(disk.glob("x.mp4.segments/*.part.mp4"))
    resumable = (ck / "stream.safetensors").exists()
    if resumable:
        check_good_segments(ck, disk / "x.mp4.segments")
        assert "the last good checkpoint (block" in line
    small_disk("10m")
    assert lol([*argv, "--resume" if resumable else "--overwrite"], capsys)[0] == 0
    frames, latents = reference
    assert count_video_frames(str(out)) == frames
    assert torch.equal(load_latents(str(disk / "x.latents")), latents)
