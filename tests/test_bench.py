"""`lol bench`: runs the scripts it finds, merges their JSON, writes markdown, marks failures."""

import argparse
import json

from lol_model import bench

SCRIPT = '''
import argparse, json, pathlib
ap = argparse.ArgumentParser(); ap.add_argument("--out"); ap.add_argument("--repeats")
a = ap.parse_args()
out = pathlib.Path(a.out); out.mkdir(parents=True, exist_ok=True)
(out / "paged_attention_cpu.json").write_text(json.dumps({"rows": [{"ratio": 1.07}]}))
(out / "paged_attention_cpu.md").write_text("## paged_attention_cpu\\n\\n| ratio |\\n|---|\\n| 1.07 |\\n")
'''


def _args(tmp_path, names, **kw):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    bench.add_bench_parser(sub)
    argv = ["bench", *names, "--out", str(tmp_path / "out"), "--benchmarks-dir",
            str(tmp_path / "benchmarks")]
    if kw.get("readme"):
        argv.append("--update-readme")
    return p.parse_args(argv)


def test_bench_runs_merges_and_updates_readme(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "paged_attention_cpu.py").write_text(SCRIPT)
    (tmp_path / "benchmarks" / "moc_router.py").write_text("raise SystemExit(3)\n")
    (tmp_path / "README.md").write_text("# x\n")
    rc = bench.run_bench(_args(tmp_path, ["paged_attention_cpu", "moc_router", "streaming"],
                               readme=True))
    assert rc == 1  # moc_router failed
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    b = data["benchmarks"]
    assert b["paged_attention_cpu"]["status"] == "ok"
    assert b["paged_attention_cpu"]["results"]["paged_attention_cpu"]["rows"][0]["ratio"] == 1.07
    assert b["moc_router"]["status"] == "failed" and b["streaming"]["status"] == "missing"
    assert data["machine"]["torch"]
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "| 1.07 |" in md and "*failed*" in md
    readme = (tmp_path / "README.md").read_text()
    assert "<!-- bench:start -->" in readme and "| 1.07 |" in readme
    # a second update replaces the block instead of appending another
    bench.run_bench(_args(tmp_path, ["paged_attention_cpu"], readme=True))
    assert (tmp_path / "README.md").read_text().count("<!-- bench:start -->") == 1


def test_bench_rejects_unknown_name(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    try:
        bench.run_bench(_args(tmp_path, ["nope"]))
    except SystemExit as e:
        assert "unknown benchmark" in str(e)
    else:
        raise AssertionError("unknown benchmark accepted")
