"""benchmarks/rope_attention_train.py runs end to end: the exact command
``python benchmarks/rope_attention_train.py --tiny --causal --split --out DIR`` in a fresh
process (a seconds-long shape), writing its JSON and markdown table. A smoke test of the
script, never a timing assertion."""

import json
import subprocess
import sys

from tests.support import ROOT


def test_tiny_run_writes_json_and_table(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/rope_attention_train.py", "--tiny",
                          "--causal", "--split", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    data = json.loads((tmp_path / "rope_attention_train.json").read_text())
    rows = data["rows"]
    methods = {(r["method"], r["causal"]) for r in rows}
    for m in ("rotate_sdpa", "rope_attention", "rotate_sdpa_fwd", "rope_attention_fwd"):
        assert (m, False) in methods and (m, True) in methods, m
    for r in rows:
        assert r["median_s"] > 0 and r["ratio"] > 0, r
        assert r["max_rel_grad_diff"] < 1e-4, r  # both steps give the same gradients (fp32)
    table = (tmp_path / "rope_attention_train.md").read_text()
    assert "| rope_attention |" in table and "ratio" in table
