"""Reliability of the ``lol`` command line, one parametrized test per class:

* bad options and files: one ``lol: error:`` line naming the option or file, exit 2, nothing
  written (checked before any work);
* non-finite latents: the run stops at the block that went wrong, exit 1, nothing black written;
* ``lol diagnose`` refuses non-finite latents and bad options the same way;
* two runs, one output: the second fails while the first holds the lock; a dead holder's lock
  does not block;
* a fresh run onto a previous run's data is refused without ``--overwrite``;
* Ctrl-C (at every stage, twice, a real SIGINT, while torch loads): exit 130, one line saying
  what was kept, and ``--resume`` or ``--overwrite`` then reproduces the uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from lol_model.cli import main
from lol_model.cli.lock import RunLock
from lol_model.model.config import ModelConfig
from lol_model.streaming.checkpoint import load_checkpoint
from tests.support.checkpoints import tiny_weights

FAST = ["--quiet", "--threads", "1", "--size", "64x64"]


def lol(argv, capsys) -> tuple[int, str]:
    """Run ``lol argv`` in-process: ``(exit code, stderr)`` (argparse errors raise SystemExit)."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def error_line(err: str) -> str:
    """The single ``lol: error:`` line of ``err`` (progress bars and warnings aside)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("lol") and "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("lol: error: "), err
    return lines[0]


# --------------------------------------------------------------------------- bad options
def _garbage(d, name, data=b"\x00garbage, not a tensor file" * 8):
    p = d / name
    p.write_bytes(data)
    return str(p)


def _truncated(d):
    full = tiny_weights(d / "full.safetensors")
    data = open(full, "rb").read()
    return _garbage(d, "cut.safetensors", data[: len(data) // 2])


def _garbage_vae(d):
    v = d / "vae"
    v.mkdir()
    (v / "config.json").write_text('{"_class_name": "AutoencoderKLWan", "base_dim": 8, '
                                   '"z_dim": 16}')
    _garbage(v, "diffusion_pytorch_model.safetensors")
    return str(v)


def _file(d):
    (d / "plain").write_text("x")
    return str(d / "plain")


NINES = "9" * 400
# (id, argv builder given a scratch folder, text the error line must contain); builders that
# return a path in the message use "{path}" in the expected text
BAD = [
    ("shift-inf", lambda d: ["--shift", "inf"], "--shift"),
    ("shift-nan", lambda d: ["--shift", "nan"], "--shift"),
    ("shift-overflow", lambda d: ["--shift", "1e999"], "--shift"),
    ("shift-negative", lambda d: ["--shift", "-1"], "--shift"),
    ("seconds-inf", lambda d: ["--seconds", "inf"], "--seconds"),
    ("seconds-nan", lambda d: ["--seconds", "nan"], "--seconds"),
    ("seconds-zero", lambda d: ["--seconds", "0"], "--seconds"),
    ("seconds-huge", lambda d: ["--seconds", "1e300"], "--seconds"),
    ("schedule-overflow", lambda d: ["--prompt", f"a[{NINES}s] | b"], "--prompt"),
    ("schedule-huge", lambda d: ["--prompt", "a[999999999999b] | b[99999999999b]"], "--prompt"),
    ("schedule-cut-first", lambda d: ["--prompt", "a[3#] | b"], "--prompt"),
    ("timesteps-nan", lambda d: ["--timesteps", "1000,nan"], "--timesteps"),
    ("timesteps-inf", lambda d: ["--timesteps", "inf,500"], "--timesteps"),
    ("timesteps-order", lambda d: ["--timesteps", "500,1000"], "--timesteps"),
    ("jitter-nan", lambda d: ["--jitter-sigma", "nan"], "--jitter-sigma"),
    ("jitter-one", lambda d: ["--jitter-sigma", "1"], "--jitter-sigma"),
    ("blocks-zero", lambda d: ["--blocks", "0"], "--blocks"),
    ("steps-zero", lambda d: ["--steps", "0"], "--steps"),
    ("threads-negative", lambda d: ["--threads", "-2"], "--threads"),
    ("threads-huge", lambda d: ["--threads", "100000"], "--threads 100000"),
    ("steps-huge", lambda d: ["--steps", "1001"], "--steps 1001"),
    ("steps-overflow", lambda d: ["--steps", NINES], "--steps"),
    ("checkpoint-every-negative", lambda d: ["--checkpoint-every", "-1"], "--checkpoint-every"),
    ("sink-negative", lambda d: ["--sink-frames", "-1"], "--sink-frames"),
    ("seed-too-big", lambda d: ["--seed", str(2**64)], "--seed"),
    ("seed-too-small", lambda d: ["--seed", str(-(2**63) - 1)], "--seed"),
    ("jitter-seed-too-big", lambda d: ["--jitter-seed", str(2**70)], "--jitter-seed"),
    ("device-garbage", lambda d: ["--device", "bogus"], "--device"),
    ("device-absent", lambda d: ["--device", "cuda:99"], "--device"),
    ("device-meta", lambda d: ["--device", "meta"], "--device"),
    ("device-cpu-index", lambda d: ["--device", "cpu:1"], "--device"),
    ("dtype", lambda d: ["--dtype", "int8"], "--dtype"),
    ("preset", lambda d: ["--preset", "nope"], "--preset"),
    ("cache", lambda d: ["--cache", "nope"], "--cache"),
    ("lora-without-checkpoint", lambda d: ["--lora", _file(d)], "--lora"),
    ("resume-and-overwrite", lambda d: ["--resume", "--overwrite"], "--overwrite"),
    ("out-is-dir", lambda d: ["--out", str(d)], "--out"),
    ("out-under-file", lambda d: ["--out", os.path.join(_file(d), "x.mp4")], "--out"),
    ("out-not-mp4", lambda d: ["--out", str(d / "x.avi")], "--out"),
    ("ckpt-is-file", lambda d: ["--checkpoint-dir", _file(d), "--checkpoint-every", "1"],
     "--checkpoint-dir"),
    ("ckpt-under-file", lambda d: ["--checkpoint-dir", os.path.join(_file(d), "c"),
                                   "--checkpoint-every", "1"], "--checkpoint-dir"),
    ("checkpoint-missing", lambda d: ["--checkpoint", str(d / "none.safetensors")],
     "--checkpoint"),
    ("vae-missing", lambda d: ["--vae", str(d / "none")], "--vae"),
    ("checkpoint-garbage-safetensors",
     lambda d: ["--preset", "tiny", "--checkpoint", _garbage(d, "w.safetensors")], "{path}"),
    ("checkpoint-garbage-pt", lambda d: ["--preset", "tiny", "--checkpoint", _garbage(d, "w.pt")],
     "{path}"),
    ("checkpoint-truncated", lambda d: ["--preset", "tiny", "--checkpoint", _truncated(d)],
     "{path}"),
    ("lora-garbage", lambda d: ["--preset", "tiny", "--checkpoint",
                                tiny_weights(d / "ok.safetensors"), "--lora",
                                _garbage(d, "l.safetensors")], "{path}"),
    ("text-garbage-safetensors", lambda d: ["--text-encoder", _garbage(d, "t.safetensors")],
     "{path}"),
    ("text-garbage-pt", lambda d: ["--text-encoder", _garbage(d, "t.pt")], "{path}"),
    ("vae-garbage", lambda d: ["--vae", _garbage_vae(d)], "{path}"),
    # paths that exist but are neither a file nor a folder
    ("text-device", lambda d: ["--text-encoder", "/dev/null"], "--text-encoder /dev/null is not"),
    ("checkpoint-device", lambda d: ["--checkpoint", "/dev/null"], "--checkpoint /dev/null is not"),
    ("vae-device", lambda d: ["--vae", "/dev/null"], "--vae /dev/null is not"),
    # sizes beyond any machine's memory (the estimate is checked before anything is built)
    ("window-beyond-memory", lambda d: ["--window-frames", str(10**12)],
     f"{10**12} window frames"),
    ("sink-beyond-memory", lambda d: ["--cache", "relativistic", "--sink-frames", str(10**12)],
     f"{10**12} sink"),
    ("attn-size-beyond-memory", lambda d: ["--local-attn-size", str(10**12)],
     f"{10**12 - 6} window frames"),
    ("size-beyond-memory", lambda d: ["--size", f"{2**22}x{2**22}"], f"--size {2**22}x{2**22}"),
    ("growing-beyond-memory", lambda d: ["--cache", "growing", "--blocks", str(2**28)],
     f"{2**28} blocks"),
]


@pytest.mark.parametrize("build,expect", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_option_is_one_line_error(tmp_path, capsys, build, expect):
    scratch = tmp_path / "in"
    scratch.mkdir()
    argv = build(scratch)
    out = tmp_path / "run" / "x.mp4"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    rc, err = lol(["generate", "--blocks", "1", *FAST, *argv]
                  if "--blocks" not in argv and "--seconds" not in argv and "--prompt" not in argv
                  else ["generate", *FAST, *argv], capsys)
    line = error_line(err)
    assert rc == 2 and err.strip().splitlines()[-1] == line, err  # nothing after the line
    path = next((a for a in reversed(argv) if a.startswith(str(scratch)) and os.path.exists(a)),
                "")
    assert expect.replace("{path}", os.path.basename(path)) in line, line
    assert not out.exists() and not list(tmp_path.glob("run/*.segments"))  # nothing written
    assert not list(tmp_path.glob("run/*.lock"))  # and the lock released


def _read_only_folder(tmp_path) -> str:
    """A folder this process cannot write: a chmod-ed one, or for root ``/proc/1``."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    for d in (str(ro), "/proc/1"):
        if os.path.isdir(d) and not os.access(d, os.W_OK):
            return d
    pytest.skip("no folder here is read-only for this user")


@pytest.mark.parametrize("option", ["--out", "--checkpoint-dir"])
def test_unwritable_folder_is_refused(tmp_path, capsys, option):
    ro = _read_only_folder(tmp_path)
    target = os.path.join(ro, "x.mp4" if option == "--out" else "ck")
    extra = ["--out", str(tmp_path / "y.mp4"), "--checkpoint-every", "1"] \
        if option != "--out" else []
    rc, err = lol(["generate", "--blocks", "1", *FAST, option, target, *extra], capsys)
    line = error_line(err)
    assert rc == 2 and option in line and "not writable" in line


# --------------------------------------------------------------------------- non-finite latents
def _nan_text(d):
    dim = ModelConfig.preset("tiny").text_dim
    p = d / "emb.safetensors"
    save_file({"0": torch.full((4, dim), float("nan"))}, str(p))
    return ["--text-encoder", str(p)]


def _nan_vae(d):
    from lol_model.model.vae import tiny_vae

    vae = tiny_vae()
    with torch.no_grad():
        next(vae.decoder.parameters()).view(-1)[0] = float("nan")
    vae.save_pretrained(str(d / "vae"))
    return ["--vae", str(d / "vae")]


NONFINITE = [
    ("nan-checkpoint", lambda d: ["--preset", "tiny", "--checkpoint",
                                  tiny_weights(d / "w.safetensors", poison="head.head.weight")],
     "sampled latents"),
    ("inf-checkpoint", lambda d: ["--preset", "tiny", "--checkpoint",
                                  tiny_weights(d / "w.safetensors", poison="blocks.0.ffn.0.bias",
                                               value=float("inf"))], "sampled latents"),
    ("nan-prompt-embedding", _nan_text, "sampled latents"),
    ("nan-vae", _nan_vae, "decoded frames"),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("build,what", [b[1:] for b in NONFINITE], ids=[b[0] for b in NONFINITE])
def test_nonfinite_latents_stop_the_run(tmp_path, capsys, build, what):
    out = tmp_path / "x.mp4"
    rc, err = lol(["generate", "--blocks", "2", *FAST, "--out", str(out), *build(tmp_path)],
                  capsys)
    line = error_line(err)
    assert rc == 1 and f"block 1 of 2: the {what} hold NaN or inf" in line, line
    assert not out.exists()  # no all-black video
    assert "Nothing was written" in line  # block 1 failed: there was nothing to keep


# --------------------------------------------------------------------------- lol diagnose
@pytest.mark.parametrize("poison", ["all-nan", "one-nan-frame", "pos-inf", "neg-inf"])
def test_diagnose_refuses_nonfinite_latents(tmp_path, capsys, poison):
    from lol_kernels.diagnostics import stream_metrics

    z = torch.randn(12, 4, 8, 8)
    {"all-nan": lambda: z.fill_(float("nan")), "one-nan-frame": lambda: z[7, 1, 2].fill_(
        float("nan")), "pos-inf": lambda: z[3].fill_(float("inf")),
     "neg-inf": lambda: z[11, 0, 0, 0].fill_(float("-inf"))}[poison]()
    path = tmp_path / "lat.safetensors"
    save_file({"latents": z}, str(path))
    rc, err = lol(["diagnose", "--latents", str(path), "--out", str(tmp_path / "d"),
                   "--max-delta", "200"], capsys)
    line = error_line(err)
    assert rc == 2 and "lat.safetensors" in line and "NaN or inf" in line, line
    assert not (tmp_path / "d" / "summary.json").exists()
    with pytest.raises(ValueError, match="NaN or inf"):
        stream_metrics(z, [0, 1, 2])


def _latent_file(d, name="lat.safetensors", cut=None, frames=8):
    p = d / name
    save_file({"latents": torch.randn(frames, 4, 4, 4)}, str(p))
    if cut:
        p.write_bytes(p.read_bytes()[:cut])
    return str(p)


DIAGNOSE_BAD = [
    ("latents-garbage", lambda d: ["--latents", _garbage(d, "z.safetensors")], "z.safetensors"),
    ("latents-garbage-pt", lambda d: ["--latents", _garbage(d, "z.pt")], "z.pt"),
    ("latents-truncated", lambda d: ["--latents", _latent_file(d, cut=300)], "lat.safetensors"),
    ("latents-missing", lambda d: ["--latents", str(d / "none.pt")], "--latents"),
    ("latents-suffix", lambda d: ["--latents", _garbage(d, "z.npy")], "--latents"),
    ("theta-inf", lambda d: ["--theta", "inf"], "--theta"),
    ("threshold-nan", lambda d: ["--threshold", "nan"], "--threshold"),
    ("jitter-overflow", lambda d: ["--jitter-sigma", "1e999"], "--jitter-sigma"),
    ("sigmas-nan", lambda d: ["--sigmas", "0,nan"], "--sigmas"),
    ("range-beyond-memory", lambda d: ["--max-delta", str(10**14)], "--max-delta"),
    ("range-empty", lambda d: ["--min-delta", "50", "--max-delta", "50"], "--max-delta"),
    ("range-negative", lambda d: ["--min-delta", "-5"], "--min-delta"),
    ("heads-zero", lambda d: ["--heads", "0"], "--heads 0"),
    ("heads-negative", lambda d: ["--heads", "-3"], "--heads -3"),
    ("heads-text", lambda d: ["--heads", "many"], "--heads"),
    ("heads-beyond-memory", lambda d: ["--heads", str(10**9)], f"--heads {10**9}"),
    ("head-dim-odd", lambda d: ["--head-dim", "7"], "--head-dim 7"),
    ("head-dim-small", lambda d: ["--head-dim", "4"], "--head-dim 4"),
    ("head-dim-zero", lambda d: ["--head-dim", "0"], "--head-dim 0"),
    ("head-dim-beyond-memory", lambda d: ["--head-dim", str(10**10)], f"--head-dim {10**10}"),
    ("axis-out", lambda d: ["--axis", "3"], "--axis 3"),
    ("axis-negative", lambda d: ["--axis", "-1"], "--axis -1"),
    ("seed-overflow", lambda d: ["--seed", str(2**70)], "--seed"),
    ("theta-one", lambda d: ["--theta", "1"], "--theta"),
    ("jitter-negative", lambda d: ["--jitter-sigma", "-0.1"], "--jitter-sigma"),
    ("sigmas-one", lambda d: ["--sigmas", "0,1"], "--sigmas"),
    ("threshold-above-one", lambda d: ["--threshold", "1.5"], "--threshold"),
    ("sync-threshold-negative", lambda d: ["--sync-threshold", "-0.5"], "--sync-threshold"),
    ("min-fraction-zero", lambda d: ["--min-fraction", "0"], "--min-fraction"),
    ("zoom-zero", lambda d: ["--zoom", "0"], "--zoom"),
    ("sink-negative", lambda d: ["--sink-frames", "-1"], "--sink-frames"),
    ("sink-twice", lambda d: ["--sink-frames", "2,2"], "--sink-frames"),
    ("sink-beyond-latents", lambda d: ["--latents", _latent_file(d), "--sink-frames", "0,8"],
     "--sink-frames 0,8"),
    ("latents-one-frame", lambda d: ["--latents", _latent_file(d, frames=1)], "--latents"),
    ("out-is-file", lambda d: ["--out", _file(d)], "--out"),
    ("out-under-file", lambda d: ["--out", os.path.join(_file(d), "sub")], "--out"),
]


@pytest.mark.parametrize("build,expect", [b[1:] for b in DIAGNOSE_BAD],
                         ids=[b[0] for b in DIAGNOSE_BAD])
def test_diagnose_bad_option_is_one_line_error(tmp_path, capsys, build, expect):
    rc, err = lol(["diagnose", "--out", str(tmp_path / "d"), *build(tmp_path)], capsys)
    line = error_line(err)
    assert rc == 2 and expect in line and err.strip().splitlines()[-1] == line, err
    assert not (tmp_path / "d").exists()  # refused before any work


# --------------------------------------------------------------------------- one output, two runs
HOLD = ("import sys, time; from lol_model.cli.lock import RunLock; "
        "RunLock(sys.argv[1:]).acquire(); print('locked', flush=True); time.sleep(120)")


@pytest.mark.parametrize("shared", ["out", "checkpoint-dir"])
def test_second_run_on_a_locked_output_fails(tmp_path, capsys, shared):
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "a.mp4"),
                              str(tmp_path / "ck")], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        out = tmp_path / ("a.mp4" if shared == "out" else "b.mp4")
        rc, err = lol(["generate", "--blocks", "1", *FAST, "--out", str(out),
                       "--checkpoint-every", "1", "--checkpoint-dir", str(tmp_path / "ck")],
                      capsys)
        line = error_line(err)
        assert rc == 2 and f"pid {first.pid}" in line and "in use by another lol run" in line
        assert not (tmp_path / "ck" / "stream.safetensors").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the holder died without unlinking its lock files: the kernel released them
    assert list(tmp_path.glob("*.lock"))
    RunLock([str(tmp_path / "a.mp4"), str(tmp_path / "ck")]).acquire().release()
    assert not list(tmp_path.glob("*.lock"))


def test_real_second_generate_fails_while_the_first_runs(tmp_path, capsys):
    out = tmp_path / "a.mp4"
    cmd = [sys.executable, "-m", "lol_model.cli", "generate", "--blocks", "200", *FAST,
           "--out", str(out)]
    first = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "a.mp4.segments").exists() and time.time() < deadline:
            time.sleep(0.05)
        rc, err = lol(["generate", "--blocks", "1", *FAST, "--out", str(out)], capsys)
        assert rc == 2 and "in use by another lol run" in error_line(err)
        assert first.poll() is None  # the first run goes on, its segments untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


# --------------------------------------------------------------------------- previous run data
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished checkpointed run (checkpoint and segments kept) to copy from."""
    d = tmp_path_factory.mktemp("prev")
    assert main(["generate", "--blocks", "2", *FAST, "--checkpoint-every", "1",
                 "--save-latents", "--out", str(d / "x.mp4")]) == 0
    return d


def _previous(kind, d, finished):
    import shutil

    if kind == "checkpoint":
        shutil.copytree(finished / "x.mp4.ckpt", d / "x.mp4.ckpt")
        return d / "x.mp4.ckpt" / "stream.safetensors", []
    if kind == "segments":  # a killed run without checkpoints: only its closed segments
        shutil.copytree(finished / "x.mp4.segments", d / "x.mp4.segments")
        return d / "x.mp4.segments" / "seg_00000.mp4", []
    shutil.copytree(finished / "x.latents", d / "x.latents")
    return d / "x.latents" / "seg_00000.safetensors", ["--save-latents"]


@pytest.mark.parametrize("kind", ["checkpoint", "segments", "latents"])
def test_fresh_run_onto_previous_run_is_refused(tmp_path, capsys, finished, kind):
    kept, extra = _previous(kind, tmp_path, finished)
    before = kept.read_bytes()
    rc, err = lol(["generate", "--blocks", "1", *FAST, "--out", str(tmp_path / "x.mp4"),
                   *extra], capsys)
    line = error_line(err)
    assert rc == 2 and "previous run" in line and "--overwrite" in line
    assert ("continue it with --resume" in line) == (kind == "checkpoint")
    assert kept.read_bytes() == before


def test_overwrite_replaces_previous_run(tmp_path, capsys, finished):
    kept, _ = _previous("checkpoint", tmp_path, finished)
    argv = ["generate", "--blocks", "1", *FAST, "--out", str(tmp_path / "x.mp4"),
            "--checkpoint-every", "1", "--overwrite"]
    assert lol(argv, capsys)[0] == 0
    assert load_checkpoint(str(kept.parent))[0]["block"] == 1


# --------------------------------------------------------------------------- Ctrl-C
SMALL = ["generate", "--blocks", "6", "--size", "32x32", "--quiet", "--threads", "1",
         "--checkpoint-every", "2", "--save-latents"]


def _raise_at(monkeypatch, target, name, when):
    """Make ``target.name`` raise KeyboardInterrupt on the calls where ``when(call_no, *a)``
    (``target``: a module or a class; ``"module:Class"`` in the table below)."""
    real = getattr(target, name)
    calls = [0]

    def wrapped(*a, **kw):
        calls[0] += 1
        if when(calls[0], *a):
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(target, name, wrapped)


def _at_block(k):  # sampling block k (1-based)
    return ("lol_model.streaming.stream", "sample_block", lambda n, st: st.block == k - 1)


# (id, extra argv, (module, function, when), expected line after "lol: ", checkpoint block)
INTERRUPTS = [
    ("while-building", [], ("lol_model.cli.generate", "new_stream", lambda n, s: True),
     "interrupted before the first block; nothing was written", None),
    ("block-1", [], _at_block(1), "interrupted at block 1; nothing was written", None),
    ("block-3", [], _at_block(3), "interrupted at block 3; kept: 21 video frames in {seg} "
     "(ffmpeg concat list: list.txt); 6 latent frames in {lat}; the last good checkpoint "
     "(block 2) in {ck} is intact (--resume continues from it)", 2),
    ("writing-video", [], ("lol_model.streaming.video:SegmentedVideoWriter", "append",
                           lambda n, w, f: n == 3),
     "interrupted at block 4; kept: 21 video frames", 2),
    ("saving-checkpoint", [], ("lol_model.streaming.checkpoint", "save_checkpoint", lambda n, *a: n == 2),
     "interrupted at block 5; kept: 45 video frames in {seg} (ffmpeg concat list: list.txt); "
     "12 latent frames", 2),
    ("joining", [], ("lol_model.streaming.video:SegmentedVideoWriter", "finalize",
                     lambda n, *a: True), "interrupted at block 6; kept: 69 video frames", 6),
    ("latents-only", ["--no-decode"], _at_block(4),
     "interrupted at block 4; kept: 9 latent frames in {lat}; the last good checkpoint "
     "(block 2)", 2),
]


@pytest.fixture(scope="module")
def small_latents(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    assert main([*SMALL, "--no-decode", "--out", str(d / "x.mp4")]) == 0
    from lol_model.streaming.video import load_latents

    return load_latents(str(d / "x.latents"))


@pytest.mark.parametrize("argv,patch,expect,block", [i[1:] for i in INTERRUPTS],
                         ids=[i[0] for i in INTERRUPTS])
def test_ctrl_c_prints_one_line_and_keeps_the_output(tmp_path, capsys, monkeypatch,
                                                     small_latents, argv, patch, expect, block):
    import importlib

    from lol_model.streaming.video import count_video_frames, load_latents

    module, _, attr = patch[0].partition(":")
    target = importlib.import_module(module)
    _raise_at(monkeypatch, getattr(target, attr) if attr else target, patch[1], patch[2])
    out = tmp_path / "x.mp4"
    paths = {"seg": f"{out}.segments", "lat": tmp_path / "x.latents", "ck": f"{out}.ckpt"}
    rc, err = lol([*SMALL, *argv, "--out", str(out)], capsys)
    assert rc == 130 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("lol")]
    assert lines == [err.strip().splitlines()[-1]], err  # one line, the last
    assert lines[0].startswith("lol: " + expect.format(**paths)), lines[0]
    if block is None:
        assert not os.path.exists(paths["ck"] + "/stream.safetensors")
    else:
        assert load_checkpoint(paths["ck"])[0]["block"] == block
    for seg in sorted(tmp_path.glob("x.mp4.segments/seg_?????.mp4")):  # every kept one plays
        assert count_video_frames(str(seg)) > 0
    monkeypatch.undo()
    again = "--resume" if block is not None else "--overwrite"
    assert main([*SMALL, *argv, "--out", str(out), again]) == 0
    assert torch.equal(load_latents(str(paths["lat"])), small_latents)
    if "--no-decode" not in argv:
        assert count_video_frames(str(out)) == 1 + 4 * 17


def test_second_ctrl_c_during_cleanup_is_one_line(tmp_path, capsys, monkeypatch):
    import lol_model.streaming.stream as gen
    from lol_model.streaming.video import SegmentedVideoWriter

    _raise_at(monkeypatch, gen, *_at_block(3)[1:])
    _raise_at(monkeypatch, SegmentedVideoWriter, "close_segment", lambda n, w: n >= 2)
    rc, err = lol([*SMALL, "--out", str(tmp_path / "x.mp4")], capsys)
    assert rc == 130 and err.strip().splitlines()[-1] == "lol: interrupted", err
    assert "Traceback" not in err and load_checkpoint(str(tmp_path / "x.mp4.ckpt"))[0]["block"] == 2


@pytest.mark.parametrize("every", ["2", "0"], ids=["checkpoints", "segments-only"])
def test_real_sigint_prints_one_line(tmp_path, every):
    """A real SIGINT to ``python -m lol_model.cli``: exit 130, one line saying what was kept,
    and every kept segment plays."""
    import re

    from lol_model.streaming.video import count_video_frames

    out = tmp_path / "x.mp4"
    cmd = [sys.executable, "-m", "lol_model.cli", *SMALL[:1], "--blocks", "400",
           *SMALL[3:8], "--checkpoint-every", every, "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    wait_for = tmp_path / ("x.mp4.ckpt/stream.safetensors" if every != "0"
                           else "x.mp4.segments/seg_00000.mp4")
    deadline = time.time() + 120
    while not wait_for.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    m = re.fullmatch(r"lol: interrupted at block (\d+); kept: (\d+) video frames in \S+ "
                     r"\(ffmpeg concat list: list.txt\)(.*)", line)
    assert m, line
    segs = sorted(tmp_path.glob("x.mp4.segments/seg_?????.mp4"))
    assert sum(count_video_frames(str(p)) for p in segs) == int(m[2])
    if every != "0":
        block = load_checkpoint(str(tmp_path / "x.mp4.ckpt"))[0]["block"]
        assert f"the last good checkpoint (block {block})" in m[3]
        assert 2 <= block < int(m[1])


def test_ctrl_c_while_torch_loads_is_an_interrupt(monkeypatch, capsys):
    """``lol`` imports torch only once main() runs, inside its Ctrl-C handling."""
    from lol_model import cli

    code = "import sys, lol_model, lol_model.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["generate"]) == 130
    assert capsys.readouterr().err.strip() == "lol: interrupted"
