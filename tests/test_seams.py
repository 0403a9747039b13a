"""The seams between modules (docs/design.md §2): public names across modules, no import cycles,
one backend resolver, references free of process-wide side effects.

These read the source as text (``ast``), so they run in milliseconds and need no imports.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lol_kernels", "lol_model")
SCANNED = (*PACKAGES, "benchmarks")


def _modules(roots=SCANNED) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``roots``."""
    mods = {}
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(mod: str, path: Path, node: ast.ImportFrom) -> str:
    """Absolute module name of ``from <node.module> import ...`` written in ``mod``."""
    if not node.level:
        return node.module or ""
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str, path: Path):
    """``(target module, imported name or None, line)`` of every import in the file, at any
    depth (a function-level import closes a cycle as surely as a top-level one)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, path, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:  # ``from pkg import submodule``
                    yield sub, None, node.lineno
                else:
                    yield target, a.name, node.lineno


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_names_imported_across_modules():
    bad = []
    for mod, path in MODULES.items():
        for target, name, line in _imports(mod, path):
            ours = target.split(".")[0] in SCANNED
            if ours and target != mod and name is not None and _is_private(name):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} from {target}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_no_private_attributes_of_our_modules():
    """``module._name`` on one of our modules is the same leak as importing ``_name``."""
    bad = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for target, name, _ in _imports(mod, path):
            if name is None and target.split(".")[0] in SCANNED:
                aliases[target.rsplit(".", 1)[-1]] = target
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name.split(".")[0] in SCANNED:
                        aliases[a.asname] = a.name
            if (isinstance(node, ast.Attribute) and _is_private(node.attr)
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} reads "
                           f"{node.value.id}.{node.attr}")
    assert not bad, "private attributes of other modules:\n" + "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES if m.split(".")[0] in PACKAGES}
    for mod in graph:
        for target, _, _ in _imports(mod, MODULES[mod]):
            if target in graph and target != mod:
                graph[mod].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    """The check above can fail: a two-module circle is reported."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_one_backend_resolver():
    """Only ``lol_kernels/_dispatch.py`` decides what ``backend="auto"`` means."""
    pat = re.compile(r"""backend\s*==\s*["']auto["']""")
    bad = [f"{p.relative_to(ROOT)}" for m, p in MODULES.items()
           if m.startswith("lol_kernels") and not m.endswith("_dispatch")
           and pat.search(p.read_text())]
    assert not bad, f"backend='auto' resolved outside _dispatch.py: {bad}"


def test_no_process_wide_thread_changes():
    bad = [str(p.relative_to(ROOT)) for m, p in MODULES.items()
           if m.startswith("lol_kernels") and "set_num_threads" in p.read_text()]
    assert not bad, f"lol_kernels must not change torch's thread count: {bad}"


@pytest.mark.parametrize("folder", ["lol_kernels", "lol_model", "benchmarks", "tests"])
def test_docs_point_inside_the_project(folder):
    """Docstrings cite docs/design.md (in the repository), not an outside brief."""
    bad = [str(p.relative_to(ROOT)) for p in sorted((ROOT / folder).rglob("*.py"))
           if "DESIGN.md" in p.read_text() and p.name != "test_seams.py"]
    assert not bad, f"references to DESIGN.md (use docs/design.md): {bad}"
    assert (ROOT / "docs" / "design.md").is_file()
