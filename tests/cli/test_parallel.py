"""``lol generate --nproc``: two ranks give the one-process latents, a world size that does not
divide the heads is refused (exit 2), and a rank killed or stopped mid-run is named in one
error line (exit 1) within a time bound."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import threading
import time

import torch

from lol_model.cli import main


def test_cli_nproc_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    common = ["generate", "--blocks", "2", "--no-decode", "--save-latents", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one.mp4")]) == 0
    assert main([*common, "--nproc", "2", "--out", str(tmp_path / "two.mp4")]) == 0
    one, two = (load_file(tmp_path / f"{n}.latents" / "seg_00000.safetensors")["latents"]
                for n in ("one", "two"))
    assert torch.equal(one, two)
    assert main([*common, "--nproc", "3", "--out", str(tmp_path / "three.mp4")]) == 2  # 4 heads


def cli_with_fault(tmp_path, sig, extra=()):
    """``lol generate --nproc 2`` in a thread; once its first checkpoint is written, rank 1 gets
    ``sig``. Returns (exit status, seconds from the signal to the return)."""
    out, rc = tmp_path / "run.mp4", []
    argv = ["generate", "--blocks", "5000", "--no-decode", "--quiet", "--nproc", "2",
            "--checkpoint-every", "5", "--out", str(out), *extra]
    thread = threading.Thread(target=lambda: rc.append(main(argv)), daemon=True)
    thread.start()
    t0 = time.perf_counter()
    while not (tmp_path / "run.mp4.ckpt" / "parallel.json").exists():
        assert time.perf_counter() - t0 < 60 and thread.is_alive(), "no checkpoint in 60 s"
        time.sleep(0.05)
    ranks = sorted(multiprocessing.active_children(), key=lambda p: int(p.name.split("-")[-1]))
    os.kill(ranks[1].pid, sig)  # children are numbered in start order: rank 0, rank 1
    t1 = time.perf_counter()
    thread.join(timeout=60)
    assert not thread.is_alive(), "lol generate hung after a rank's fault"
    return rc[0], time.perf_counter() - t1


def test_cli_names_a_killed_rank(tmp_path, capfd):
    rc, dt = cli_with_fault(tmp_path, signal.SIGKILL)
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("lol: ")]
    assert rc == 1 and dt < 5.0, (rc, dt)
    assert err == ["lol: error: rank 1 of 2 died (killed by signal 9, SIGKILL)"], err


def test_cli_names_a_stopped_rank_after_dist_timeout(tmp_path, capfd):
    rc, dt = cli_with_fault(tmp_path, signal.SIGSTOP, ["--dist-timeout", "3"])
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("lol: ")]
    assert rc == 1 and 3.0 < dt < 8.0, (rc, dt)
    assert len(err) == 1 and re.match(r"lol: error: rank 1 of 2 is stopped \(process \d+ in "
                                      r"state T.*; rank 0 of 2 saw \w+ fail: Timed out", err[0]), err
