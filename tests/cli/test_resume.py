"""``lol generate`` writes a playable mp4 and a checkpoint that ``--resume`` extends; a real
SIGKILL after the first checkpoint leaves playable segments and ``--resume`` reproduces the
uninterrupted latents; bad schedules, a missing checkpoint, bad sizes and a missing command
module give clear errors."""

import imageio.v3 as iio
import pytest
import torch

from lol_model.cli import main
from lol_model.streaming.video import load_latents

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_default_run_writes_playable_mp4(tmp_path, capsys):
    out = tmp_path / "lol.mp4"
    assert main(["generate", "--blocks", "3", "--out", str(out), "--quiet", "--threads", "1",
                 "--checkpoint-every", "2"]) == 0
    v = iio.imread(out)
    assert v.shape == (1 + 4 * 8, 128, 128, 3) and v.std() > 0
    assert (tmp_path / "lol.mp4.ckpt" / "stream.safetensors").is_file()
    # extend the finished run by one block
    assert main(["generate", "--blocks", "4", "--out", str(out), "--quiet", "--threads", "1",
                 "--checkpoint-every", "2", "--resume"]) == 0
    assert iio.imread(out).shape[0] == 1 + 4 * 11
    assert "resumed at block 3" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    assert main(["generate", "--prompt", "a[3#] | b", "--out", str(tmp_path / "x.mp4"),
                 "--quiet"]) == 2
    assert "first segment" in capsys.readouterr().err
    assert main(["generate", "--resume", "--out", str(tmp_path / "y.mp4"), "--quiet",
                 "--no-decode"]) == 2
    assert "no stream checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--size", "60x64"])
    with pytest.raises(SystemExit):
        main(["generate", "--blocks", "2", "--seconds", "3"])


def test_cli_missing_subcommand_module_is_reported(monkeypatch):
    import lol_model.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "diagnose", ("lol_kernels.no_such_module", "add_x", "x"))
    with pytest.raises(SystemExit, match="lol diagnose is unavailable"):
        main(["diagnose", "--anything"])


def test_sigkill_then_resume(tmp_path):
    """A real kill: the process dies at an arbitrary moment after its first checkpoint; the
    closed mp4 segments play and ``--resume`` reproduces the uninterrupted latents."""
    import signal
    import subprocess
    import sys
    import time

    base = ["generate", "--blocks", "6", "--size", "64x64", "--checkpoint-every", "2",
            "--save-latents", "--quiet", "--prompt", "a cat[3] | a dog"]
    assert main([*base, "--out", str(tmp_path / "full.mp4")]) == 0
    out = tmp_path / "part.mp4"
    cmd = [sys.executable, "-m", "lol_model.cli", *base, "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    ck = tmp_path / "part.mp4.ckpt" / "stream.safetensors"
    while not ck.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    segs = sorted((tmp_path / "part.mp4.segments").glob("seg_?????.mp4"))
    assert segs and all(iio.imread(p).shape[1:] == (64, 64, 3) for p in segs)
    assert main([*base, "--out", str(out), "--resume"]) == 0
    a = load_latents(str(tmp_path / "full.latents"))
    assert torch.equal(a, load_latents(str(tmp_path / "part.latents")))
    assert iio.imread(out).shape == iio.imread(tmp_path / "full.mp4").shape == (69, 64, 64, 3)
