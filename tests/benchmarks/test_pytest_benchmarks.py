"""The pytest-benchmark twins of the benchmark scripts run: each case once, untimed, on the
quick shapes (``python -m pytest benchmarks --benchmark-disable --quick``), so a script's
shared workload and its result checks cannot rot. A smoke test, never a timing assertion."""

import json
import subprocess
import sys

from tests.support import ROOT


def test_benchmark_cases_run_once_on_quick_shapes():
    res = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-disable",
                          "--quick", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    tail = res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    assert " passed" in res.stdout.splitlines()[-1] and "failed" not in res.stdout, tail


def test_layout_report_counts_what_the_seams_forbid(tmp_path):
    """benchmarks/layout_report.py on this checkout: no layer violation, no project import
    inside a lol_model function, no tracker reference."""
    res = subprocess.run([sys.executable, "benchmarks/layout_report.py", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((tmp_path / "layout_report.json").read_text())
    assert r["layer_violations"] == [] and r["lol_model_function_level_project_imports"] == []
    assert r["issue_references"] == [], r["issue_references"]
    assert r["modules_per_folder"]["lol_model/streaming"] >= 10
