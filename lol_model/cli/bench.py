"""``lol bench``: run the benchmark scripts, write one JSON results file and a markdown report.

Each benchmark is a script in ``benchmarks/`` that takes ``--out DIR`` and writes ``<name>.json``
and ``<name>.md`` there. This module runs the ones that exist (each in its own process, so one
failure does not stop the others), merges their JSON into ``bench.json`` with the machine and
library versions, and writes ``bench.md``; ``--update-readme`` puts the tables into README.md
between ``<!-- bench:start -->`` and ``<!-- bench:end -->``.

The README block holds one section per benchmark, from its ``## <name>`` heading to the next
benchmark's. ``--update-readme`` replaces only the sections of the benchmarks that ran
successfully in this run (each with the machine it was measured on) and keeps every other
section as it was: a failed, missing or unselected benchmark never changes the README.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

# name -> (script, args of the full run, args of --quick)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "paged_attention_cpu": ("paged_attention_cpu.py", [], ["--repeats", "3"]),
    "kernel_report": ("kernel_report.py", [], []),
    "moc_router": ("moc_router.py", [], ["--repeats", "3", "--ref-repeats", "1"]),
    "moc_attention": ("moc_attention.py", [], ["--quick"]),
    "streaming": ("streaming.py", [], ["--quick"]),
    "rope_attention_train": ("rope_attention_train.py", ["--split"],
                             ["--repeats", "3", "--shapes", "B2-N1560"]),
}


def default_benchmarks_dir() -> Path:
    """``benchmarks/`` of the source checkout (the package is installed editable from it)."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "machine": platform.machine(),
           "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for mod in ("triton", "diffusers", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        out["cpu"] = f"{names[0]} x{len(names)}" if names else None
    except OSError:
        out["cpu"] = None
    return out


def run_benchmarks(names, *, out_dir: Path, bench_dir: Path, quick: bool) -> dict:
    """Run each named benchmark; returns ``{name: {status, seconds, results}}``."""
    report = {}
    for name in names:
        script, full, fast = BENCHMARKS[name]
        path = bench_dir / script
        if not path.exists():
            report[name] = {"status": "missing", "script": str(path)}
            print(f"[lol bench] {name}: {path} not found, skipped", flush=True)
            continue
        sub = out_dir / name
        cmd = [sys.executable, str(path), "--out", str(sub), *(fast if quick else full)]
        print(f"[lol bench] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        entry = {"status": "ok" if proc.returncode == 0 else "failed", "seconds": round(dt, 1),
                 "command": " ".join(cmd)}
        if proc.returncode:
            entry["stderr_tail"] = proc.stderr[-2000:]
            print(f"[lol bench] {name} failed ({proc.returncode}):\n{proc.stderr[-800:]}",
                  flush=True)
        entry["results"] = {}
        for p in sorted(sub.glob("*.json")):
            try:
                entry["results"][p.stem] = json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:  # one bad file, not the run
                entry["status"] = "failed"
                entry.setdefault("errors", []).append(f"{p}: not valid JSON ({e})")
                print(f"[lol bench] {name}: {p} is not valid JSON ({e}); marked failed",
                      flush=True)
        entry["tables"] = [p.read_text() for p in sorted(sub.glob("*.md"))]
        report[name] = entry
    return report


def render_markdown(report: dict, info: dict) -> str:
    lines = ["# lol-kernels benchmark report", "", machine_line(info), ""]
    for name, entry in report.items():
        if entry["status"] != "ok":
            lines += [f"## {name}", "", f"*{entry['status']}*", ""]
            continue
        for table in entry["tables"]:
            lines += [table.strip(), ""]
    return "\n".join(lines) + "\n"


def machine_line(info: dict) -> str:
    return (f"Machine: {info.get('cpu') or info['machine']}"
            + (f", GPU {info['cuda_device']}" if info.get("cuda_device") else ", no GPU")
            + f"; Python {info['python']}, torch {info['torch']}, triton {info.get('triton')}, "
              f"diffusers {info.get('diffusers')}.")


def split_sections(block: str) -> tuple[str, dict[str, str]]:
    """``(head, {name: section})`` of a README bench block: a section runs from a
    ``## <benchmark name>`` line to the next one; ``head`` is the text before the first."""
    head, sections, name = [], {}, None
    for line in block.splitlines():
        title = line[3:].strip() if line.startswith("## ") else None
        if title in BENCHMARKS:
            name = title
            sections[name] = []
        (sections[name] if name else head).append(line)
    return "\n".join(head).strip(), {k: "\n".join(v).strip() for k, v in sections.items()}


def update_readme(readme: Path, report: dict, info: dict) -> list[str]:
    """Replace the README sections of the benchmarks whose status is ``ok``; keep the others.
    Returns the names updated (the file is not written when there are none)."""
    ok = [n for n, e in report.items() if e["status"] == "ok" and e["tables"]]
    if not ok:
        return []
    text = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    inside = start in text and end in text
    head, sections = split_sections(text[text.index(start) + len(start): text.index(end)]
                                     if inside else "")
    for name in ok:
        body = "\n\n".join(t.strip() for t in report[name]["tables"])
        if not body.startswith(f"## {name}"):
            body = f"## {name}\n\n{body}"
        title, _, rest = body.partition("\n")
        sections[name] = f"{title}\n\n*{machine_line(info)}*\n\n{rest.strip()}"
    if head.startswith("Machine:") and all("\n*Machine:" in v for v in sections.values()):
        head = ""  # every section names its own machine
    order = [n for n in BENCHMARKS if n in sections] + [n for n in sections if n not in BENCHMARKS]
    parts = ([head] if head else []) + [sections[n] for n in order]
    block = start + "\n" + "\n\n".join(parts) + "\n" + end
    if inside:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n## Latest benchmarks\n\n" + block + "\n"
    readme.write_text(text)
    return ok


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run the benchmark scripts and write a report",
                              description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=[],
                   help=f"benchmarks to run, any of {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--out", default="results/bench", help="output directory")
    p.add_argument("--benchmarks-dir", default=None, help="where the scripts are")
    p.add_argument("--quick", action="store_true", help="smaller shapes / fewer repeats")
    p.add_argument("--update-readme", action="store_true",
                   help="write the table into README.md between the bench markers")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    bench_dir = Path(args.benchmarks_dir) if args.benchmarks_dir else default_benchmarks_dir()
    if not bench_dir.is_dir():
        raise SystemExit(f"--benchmarks-dir {bench_dir} is not a directory; `lol bench` runs "
                         f"the scripts of a source checkout (pip install -e .)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = versions()
    report = run_benchmarks(args.names or list(BENCHMARKS), out_dir=out, bench_dir=bench_dir,
                            quick=args.quick)
    (out / "bench.json").write_text(json.dumps({"machine": info, "benchmarks": report},
                                               indent=2))
    md = render_markdown(report, info)
    (out / "bench.md").write_text(md)
    print(md)
    if args.update_readme:
        done = update_readme(bench_dir.parent / "README.md", report, info)
        print(f"[lol bench] README.md: updated {', '.join(done) or 'nothing'}; other "
              f"benchmarks' tables kept as they were")
    print(f"[lol bench] wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0 if all(e["status"] in ("ok", "missing") for e in report.values()) else 1
