"""benchmarks/kernel_report.py's measured mode runs on the CPU: the exact command
``python benchmarks/kernel_report.py --measure --tiny --out DIR`` in a fresh process, the Triton
kernel in the interpreter at the TINY shape (partial pages, queries not a whole frame, GQA), so
a shape bug of the measured path shows without a GPU. The Wan shape's inputs are built too
(only built: the interpreter would take hours there)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.support import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import kernel_report  # noqa: E402


def test_measure_tiny_writes_json_and_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it sets its own
    res = subprocess.run([sys.executable, "benchmarks/kernel_report.py", "--measure", "--tiny",
                          "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    data = json.loads((tmp_path / "kernel_report.json").read_text())
    assert data["shape"] == kernel_report.TINY and data["mode"] == "measured"
    assert data["configs"] == []  # --measure: no sm_90 compile
    rows = {r["method"]: r for r in data["measured"]}
    for name in ("lol triton (public op, key path auto)", "lol triton fused (RoPE in the key loop)",
                 "lol triton rotate once + paged loop"):
        assert rows[name]["ms"] > 0 and rows[name]["tflops"] > 0, name
    assert rows["torch SDPA (pre-rotated dense K)"]["ms"] > 0  # GQA baselines got Hq heads
    assert all("ms" in r or r.get("note") for r in data["measured"])
    par = data["parity"]
    assert par["ok"] and par["queries"] == kernel_report.TINY["Nq"], par
    assert par["paths"]["fused"]["ok"] and par["paths"]["once"]["ok"], par
    table = (tmp_path / "kernel_report.md").read_text()
    assert "lol triton" in table and "Parity of the first 40 queries vs float64: ok" in table


def test_measure_needs_a_gpu_or_tiny():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --measure runs there")
    res = subprocess.run([sys.executable, "benchmarks/kernel_report.py", "--measure"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--tiny" in res.stderr


@pytest.mark.parametrize("shape", ["SHAPE", "TINY"])
def test_inputs_hold_exactly_nk_keys_in_cache_layout(shape):
    """Whole frames on fresh pages, the last one partial: ``Nk`` valid keys, every page in the
    table once, positions of frame ``f`` at ``t = f``; queries the next frames."""
    s = getattr(kernel_report, shape)
    nf, frames, ppf, P = kernel_report.frame_layout(s)
    x = kernel_report.make_inputs(s, torch.float16, "cpu")
    assert x["cache_k"].shape == (P, s["S"], s["Hkv"], s["D"])
    assert int(x["page_len"].sum()) == s["Nk"]
    assert sorted(x["page_table"][0].tolist()) == list(range(P))
    assert x["q"].shape == (s["B"], s["Nq"], s["Hq"], s["D"]) and x["q_pos"].shape[1] == s["Nq"]
    t = x["cache_pos"][..., 0].view(frames, ppf * s["S"])[:, :nf]
    assert torch.equal(t, torch.arange(frames).view(frames, 1).expand(frames, nf).int())
    assert int(x["q_pos"][..., 0].min()) == frames
    assert kernel_report.key_tiles(s, 64) == -(-P * s["S"] // 64)


def test_nk_must_be_whole_frames():
    with pytest.raises(ValueError, match="whole frames"):
        kernel_report.frame_layout({**kernel_report.TINY, "Nk": 70})
