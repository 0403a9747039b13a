"""Layout figures of a checkout: modules per folder, the largest files, imports made inside
functions between project modules, layer violations of lol_model, test files per folder and
tracker references ("issue N") in code and docs. Reads source as text (``ast``); runs nothing.

Usage::

    python benchmarks/layout_report.py [--root CHECKOUT] [--out results/layout]

``--root`` may be any checkout (an older commit: ``git worktree add /tmp/old <rev>``), so the
same figures can be taken before and after a change. Duplicated blocks are counted apart, by a
clone detector of your choice. Writes ``layout_report.json`` and ``layout_report.md``.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table, write_results  # noqa: E402

PACKAGES = ("lol_kernels", "lol_model")
# lowest first, as tests/test_seams.py's LAYERS (docs/design.md §2): layer -> groups
LAYERS = [("errors",), ("model",), ("streaming",), ("training", "parallel", "integrations"),
          ("cli",)]
# the group of a top-level name: public aliases, and the modules of a flat lol_model (one file
# per concern, no subpackages) by the concern each holds
GROUP_OF = {"diffusers": "integrations", "pipeline": "integrations", "config": "model",
            "weights": "model", "text": "model", "vae": "model", "generate": "streaming",
            "step": "streaming", "sampling": "streaming", "schedule": "streaming",
            "caches": "streaming", "state": "streaming", "video": "streaming",
            "train": "training", "liveness": "parallel", "bench": "cli", "guard": "cli",
            "files": "cli"}
ISSUE = re.compile(r"\bissues? #?\d+", re.I)


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            parts = list(p.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def imports(mod: str, path: Path, mods: dict[str, Path]):
    """``(target, in_function)`` of every import of a project module in ``path``."""
    tree = ast.parse(path.read_text())
    inner = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                t = ".".join(base + ([node.module] if node.module else []))
            else:
                t = node.module or ""
            targets = [f"{t}.{a.name}" if f"{t}.{a.name}" in mods else t for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in PACKAGES:
                yield t, id(node) in inner


def group(mod: str) -> tuple[int, str] | None:
    """``(layer, group)`` of a lol_model module (``None``: the package itself)."""
    parts = mod.split(".")
    if parts[0] != "lol_model" or len(parts) < 2:
        return None
    g = GROUP_OF.get(parts[1], parts[1])
    return next(((i, g) for i, names in enumerate(LAYERS) if g in names), None)


def report(root: Path) -> dict:
    mods = modules(root)
    per_folder = Counter(str(p.parent.relative_to(root)) for m, p in mods.items()
                         if p.name != "__init__.py")
    sizes = sorted(((len(p.read_text().splitlines()), str(p.relative_to(root)))
                    for p in mods.values()), reverse=True)
    fn_imports, violations = [], []
    for mod, path in mods.items():
        for target, inner in sorted(set(imports(mod, path, mods))):
            if inner:
                fn_imports.append(f"{mod} -> {target}")
            a, b = group(mod), group(target)
            if a is not None and b is not None and a[1] != b[1] and b[0] >= a[0]:
                violations.append(f"{mod} -> {target} ({a[1]} imports {b[1]})")
    tests = Counter(str(p.parent.relative_to(root)) for p in (root / "tests").rglob("test_*.py"))
    issue_refs = []
    for folder in (*PACKAGES, "tests", "benchmarks", "docs", "csrc"):
        for p in sorted((root / folder).rglob("*")):
            if p.suffix in (".py", ".md", ".h", ".cpp", ".cu", ".cuh") and p.is_file():
                issue_refs += [f"{p.relative_to(root)}:{i + 1}" for i, line in
                               enumerate(p.read_text().splitlines()) if ISSUE.search(line)]
    return {"modules_per_folder": dict(sorted(per_folder.items())),
            "largest_files": [{"lines": n, "file": f} for n, f in sizes[:3]],
            "function_level_project_imports": fn_imports,
            "lol_model_function_level_project_imports": [x for x in fn_imports
                                                         if x.startswith("lol_model")],
            "layer_violations": violations, "test_files_per_folder": dict(sorted(tests.items())),
            "issue_references": issue_refs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--out", default="results/layout")
    ap.add_argument("--quick", action="store_true", help="accepted for lol bench (no effect)")
    args = ap.parse_args(argv)
    r = report(Path(args.root).resolve())
    rows = [{"figure": "modules per folder", "value": ", ".join(
                f"{k}: {v}" for k, v in r["modules_per_folder"].items())},
            {"figure": "largest file", "value": f"{r['largest_files'][0]['file']} "
                                                f"({r['largest_files'][0]['lines']} lines)"},
            {"figure": "function-level imports between project modules (lol_model / all)",
             "value": f"{len(r['lol_model_function_level_project_imports'])} / "
                      f"{len(r['function_level_project_imports'])}"},
            {"figure": "layer violations in lol_model", "value": len(r["layer_violations"])},
            {"figure": "test files per folder", "value": ", ".join(
                f"{k}: {v}" for k, v in r["test_files_per_folder"].items())},
            {"figure": '"issue N" references', "value": len(r["issue_references"])}]
    write_results(args.out, "layout_report", r, markdown_table(rows, ["figure", "value"]))
    print(markdown_table(rows, ["figure", "value"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
