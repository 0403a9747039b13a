"""`lol bench`: runs the scripts it finds, merges their JSON, writes markdown, marks failures."""

import argparse
import json

import pytest

from lol_model.cli import bench

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
    bench.add_parser(sub)
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


OLD_README = """# x

<!-- bench:start -->
Machine: old box.

## paged_attention_cpu

| ratio |
|---|
| 0.50 |

## moc_router

| old router table |

## streaming

| old streaming table |
<!-- bench:end -->

tail text
"""


def _script(name: str, table: str, js: str = '{"rows": []}') -> str:
    """A benchmark script writing ``<name>.json`` (text ``js``) and a one-table ``<name>.md``."""
    return (f"import argparse, pathlib\nap = argparse.ArgumentParser(); ap.add_argument('--out')"
            f"\nout = pathlib.Path(ap.parse_known_args()[0].out); out.mkdir(parents=True)\n"
            f"(out / '{name}.json').write_text({js!r})\n"
            f"(out / '{name}.md').write_text({f'## {name}' + chr(10) * 2 + table + chr(10)!r})\n")


# name -> script text (None: no script) of moc_router, the benchmark next to the measured one
OTHERS = {
    "fails": "raise SystemExit(3)\n",
    "missing": None,
    "bad-json": _script("moc_router", "| new router table |", js="{not json"),
    "not-selected": _script("moc_router", "| new router table |"),
}


@pytest.mark.parametrize("other", list(OTHERS))
def test_readme_update_keeps_tables_it_did_not_measure(tmp_path, capsys, other):
    """Only the benchmarks measured successfully change the README; never '*failed*'."""
    bdir = tmp_path / "benchmarks"
    bdir.mkdir()
    (bdir / "paged_attention_cpu.py").write_text(SCRIPT)
    if OTHERS[other] is not None:
        (bdir / "moc_router.py").write_text(OTHERS[other])
    (tmp_path / "README.md").write_text(OLD_README)
    names = ["paged_attention_cpu"] + ([] if other == "not-selected" else ["moc_router"])
    rc = bench.run_bench(_args(tmp_path, names, readme=True))
    readme = (tmp_path / "README.md").read_text()
    assert "| 1.07 |" in readme and "| 0.50 |" not in readme  # measured: replaced
    assert "| old router table |" in readme and "| new router table |" not in readme
    assert "| old streaming table |" in readme and "*failed*" not in readme
    assert readme.startswith("# x\n") and readme.endswith("tail text\n")
    assert readme.count("## moc_router") == readme.count("## paged_attention_cpu") == 1
    if other == "bad-json":
        assert rc == 1 and "moc_router.json is not valid JSON" in capsys.readouterr().out
        data = json.loads((tmp_path / "out" / "bench.json").read_text())["benchmarks"]
        assert "moc_router.json" in data["moc_router"]["errors"][0]


def test_readme_untouched_when_nothing_measured(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "moc_router.py").write_text("raise SystemExit(3)\n")
    (tmp_path / "README.md").write_text(OLD_README)
    assert bench.run_bench(_args(tmp_path, ["moc_router"], readme=True)) == 1
    assert (tmp_path / "README.md").read_text() == OLD_README
