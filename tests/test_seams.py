"""The seams between modules (docs/design.md §2): the layers of lol_model, public names across
modules, no import cycles, one backend resolver, references free of process-wide side effects.

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


# --------------------------------------------------------------------------- layers of lol_model
# lowest first; a module may import its own group and the groups of lower layers, never a group
# of its own layer or of a higher one (docs/design.md §2)
LAYERS = [
    {"errors": ("lol_model.errors",)},
    {"model": ("lol_model.model",)},
    {"streaming": ("lol_model.streaming",)},
    {"training": ("lol_model.training",), "parallel": ("lol_model.parallel",),
     "integrations": ("lol_model.integrations", "lol_model.diffusers", "lol_model.pipeline")},
    {"cli": ("lol_model.cli",)},
]
HEAVY_OR_OPTIONAL = {"torch", "triton", "diffusers", "transformers", "safetensors", "imageio",
                     "imageio_ffmpeg", "tqdm", "matplotlib", "numpy", "fcntl", "av"}


def _group(mod: str) -> tuple[int, str] | None:
    """``(layer, group)`` of a ``lol_model`` module; ``None`` for the package facade."""
    for level, groups in enumerate(LAYERS):
        for name, prefixes in groups.items():
            if any(mod == p or mod.startswith(p + ".") for p in prefixes):
                return level, name
    return None


def _import_sites(mod: str, source: str):
    """``(target module, line, in_function)`` of every import in ``source`` (module ``mod``)."""
    tree = ast.parse(source)
    in_fn = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_fn.update(id(n) for n in ast.walk(node) if n is not node)
    is_pkg = mod in PKG_MODULES
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, id(node) in in_fn
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # ``from pkg import submodule`` names the submodule
                sub = f"{target}.{a.name}"
                yield (sub if sub in MODULES else target), node.lineno, id(node) in in_fn


PKG_MODULES = {m for m, p in MODULES.items() if p.name == "__init__.py"}


def layer_violations(sources: dict[str, str]) -> list[str]:
    """Every import in ``sources`` (module -> text) that breaks the layer rule: an import of a
    higher layer or of a peer group of the same layer, of ``lol_model.cli`` from outside it, of
    ``lol_model`` from ``lol_kernels``, or a function-level import in ``lol_model`` of a project
    or standard library module (kept only for heavy or optional third-party packages; in
    ``lol_kernels`` the Triton modules load in functions, Triton being optional)."""
    bad = []
    for mod, source in sources.items():
        here = _group(mod)
        for target, line, in_fn in _import_sites(mod, source):
            top = target.split(".")[0]
            where = f"{mod}:{line} imports {target}"
            if in_fn and mod.startswith("lol_model") and top not in HEAVY_OR_OPTIONAL:
                bad.append(f"{where} inside a function")
            if mod.startswith("lol_kernels") and top == "lol_model":
                bad.append(f"{where}: lol_kernels is below lol_model")
            if top != "lol_model" or not mod.startswith("lol_model"):
                continue
            there = _group(target)
            if there is not None and there[1] == "cli" and (here is None or here[1] != "cli"):
                bad.append(f"{where}: only lol_model.cli imports the command line")
            elif there is not None and here is not None and there[1] != here[1] \
                    and there[0] >= here[0]:
                bad.append(f"{where}: layer {here[1]} may not import {there[1]}")
    return bad


def _sources(prefixes=PACKAGES) -> dict[str, str]:
    return {m: p.read_text() for m, p in MODULES.items() if m.split(".")[0] in prefixes}


def test_layers_of_lol_model():
    bad = layer_violations(_sources())
    assert not bad, "layer rule broken (docs/design.md §2):\n" + "\n".join(bad)


def test_every_lol_model_module_has_a_layer():
    loose = [m for m in MODULES if m.startswith("lol_model.") and _group(m) is None]
    assert not loose, f"modules outside every layer (add them to LAYERS): {loose}"


@pytest.mark.parametrize("mod,source,why", [
    ("lol_model.model.transformer", "from lol_model.streaming.presets import CacheConfig\n",
     "layer model may not import streaming"),
    ("lol_model.streaming.stream", "from ..parallel import runner\n",
     "layer streaming may not import parallel"),
    ("lol_model.parallel.runner", "from ..integrations.diffusers import pipeline\n",
     "layer parallel may not import integrations"),
    ("lol_model.streaming.outputs", "from lol_model.cli.options import bounded_int\n",
     "only lol_model.cli imports the command line"),
    ("lol_model.integrations.diffusers.pipeline", "from ...cli import generate\n",
     "only lol_model.cli imports the command line"),
    ("lol_model.streaming.stream", "def f():\n    from .sampling import SHIFT\n",
     "inside a function"),
    ("lol_model.streaming.stream", "def f():\n    import json\n", "inside a function"),
    ("lol_kernels.cache.paged", "import lol_model\n", "lol_kernels is below lol_model"),
])
def test_layer_rule_catches_a_planted_import(mod, source, why):
    """The rule can fail: each planted import is reported, with its reason."""
    bad = layer_violations({mod: source})
    assert len(bad) == 1 and why in bad[0], bad


def test_function_level_import_of_a_heavy_dependency_is_allowed():
    assert layer_violations({"lol_model.model.vae": "def f():\n    import diffusers\n"}) == []


def test_lol_help_imports_no_torch():
    """``lol --help`` lists the commands from a static table, importing none of them."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\n"
            "from lol_model.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert 'generate' in out.getvalue() and 'diagnose' in out.getvalue()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'lol_kernels', 'numpy')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


# --------------------------------------------------------------------------- tests/ mirrors them
#: folders of tests/ that mirror no package: the shared helpers, the tests of benchmarks/ scripts
UNMIRRORED = ("support", "benchmarks")
#: the files at the top of tests/ (every other test sits in the folder of the package it tests)
TOP_FILES = ("__init__.py", "conftest.py", "test_seams.py")
#: an import of conftest or of a test module (helpers live in tests/support/)
TEST_MODULE_IMPORT = re.compile(
    r"^\s*(?:from|import)\s+((?:tests\.)?(?:\w+\.)*(?:conftest|test_\w+))\b", re.M)


def _package_of(folder: tuple[str, ...]) -> Path | None:
    """The package a test folder names: ``kernels/<x>`` -> ``lol_kernels/<x>``, any other
    ``<a>/<b>`` -> ``lol_model/<a>/<b>`` (a subpackage, or a module ``<b>.py``); ``None`` for
    the unmirrored folders."""
    if folder[0] in UNMIRRORED:
        return None
    if folder[0] == "kernels":
        return ROOT.joinpath("lol_kernels", *folder[1:])
    return ROOT.joinpath("lol_model", *folder)


def tree_violations(files: dict[str, str]) -> list[str]:
    """What breaks the layout of tests/ (docs/design.md §8) in ``files`` (path under tests/ ->
    text): a folder of ``tests/kernels/`` that names no folder of ``lol_kernels/``, another
    folder that names no subpackage or module of ``lol_model/`` (``support/`` and
    ``benchmarks/`` aside), a folder on the way to a Python file without ``__init__.py`` (same
    file names in two folders would clash), a file at the top of tests/ besides
    :data:`TOP_FILES`, and an import of conftest or of a test module."""
    bad = []
    folders = set()
    for path, text in sorted(files.items()):
        parts = tuple(path.split("/"))
        if len(parts) == 1 and parts[0] not in TOP_FILES:
            bad.append(f"tests/{path} is at the top of tests/: put it in the folder of the "
                       "package it tests (helpers: tests/support/)")
        folders.update(parts[:i] for i in range(1, len(parts)))
        if path.endswith(".py"):
            for i in range(len(parts)):
                init = "/".join((*parts[:i], "__init__.py"))
                if init not in files:
                    bad.append(f"tests/{path}: tests/{init} is missing (no __init__.py)")
            for m in TEST_MODULE_IMPORT.finditer(text):
                bad.append(f"tests/{path} imports {m[1]}: import helpers from tests.support")
    for folder in sorted(folders):
        package = _package_of(folder)
        if package is None or package.is_dir() or package.with_suffix(".py").is_file():
            continue
        where = "/".join(folder)
        if folder[0] == "kernels":
            bad.append(f"tests/{where} names no folder of lol_kernels ({package.name}/)")
        else:
            bad.append(f"tests/{where} names no subpackage or module of lol_model "
                       f"({package.name}/ or {package.name}.py)")
    return sorted(set(bad))


def _test_tree() -> dict[str, str]:
    tests = ROOT / "tests"
    return {p.relative_to(tests).as_posix(): p.read_text() if p.suffix == ".py" else ""
            for p in sorted(tests.rglob("*")) if p.is_file() and p.suffix != ".pyc"
            and not any(part == "__pycache__" or part.startswith(".")
                        for part in p.relative_to(tests).parts)}


def test_tests_mirror_the_packages():
    bad = tree_violations(_test_tree())
    assert not bad, "tests/ does not mirror the packages (docs/design.md §8):\n" + "\n".join(bad)


def _planted(*paths: str, text: str = "", inits: bool = True) -> dict[str, str]:
    """A minimal tests/ tree holding ``paths`` (each with ``text``, and with the __init__.py
    files of its folders when ``inits``)."""
    files = dict.fromkeys(TOP_FILES, "")
    for path in paths:
        parts = path.split("/")
        if inits:
            files.update(("/".join((*parts[:i], "__init__.py")), "") for i in range(1, len(parts)))
        files[path] = text
    return files


@pytest.mark.parametrize("files,why", [
    pytest.param(_planted("kernels/nope/test_x.py"), "tests/kernels/nope names no folder",
                 id="kernels-folder"),
    pytest.param(_planted("kernels/rope/nope/test_x.py"), "tests/kernels/rope/nope names no",
                 id="kernels-subfolder"),
    pytest.param(_planted("gui/test_x.py"), "tests/gui names no subpackage or module",
                 id="model-folder"),
    pytest.param(_planted("streaming/nope/test_x.py"), "tests/streaming/nope names no",
                 id="model-subfolder"),
    pytest.param(_planted("test_presets.py"), "tests/test_presets.py is at the top",
                 id="top-file"),
    pytest.param(_planted("tiny_wan.py"), "tests/tiny_wan.py is at the top", id="top-helper"),
    pytest.param(_planted("model/test_x.py", inits=False), "tests/model/__init__.py is missing",
                 id="no-init"),
    pytest.param(_planted("model/test_x.py", text="import torch\nfrom conftest import max_err\n"),
                 "imports conftest", id="conftest"),
    pytest.param(_planted("cli/test_x.py", text="def f():\n    import conftest\n"),
                 "imports conftest", id="conftest-in-function"),
    pytest.param(_planted("kernels/cache/test_x.py", text="from test_cache import push\n"),
                 "imports test_cache", id="flat-test-module"),
    pytest.param(_planted("streaming/test_x.py",
                          text="from tests.kernels.cache.test_cache import push\n"),
                 "imports tests.kernels.cache.test_cache", id="test-module"),
])
def test_tree_rule_catches_a_planted_file(files, why):
    """The rule can fail: each planted file or import is reported, with its reason."""
    bad = tree_violations(files)
    assert len(bad) == 1 and why in bad[0], bad


def test_tree_rule_allows_the_layout():
    """Tests of a whole package (tests/kernels/), of a module (training), of benchmark scripts,
    helpers in tests/support/ and their imports are all in place."""
    files = _planted("kernels/test_threads.py", "kernels/rope/test_rope.py",
                     "training/test_training.py", "integrations/diffusers/test_x.py",
                     "benchmarks/test_kernel_report.py", "support/cuda_emu/emu.cpp",
                     text="from tests.support import max_err\nfrom tests.support.x import y\n")
    assert tree_violations(files) == []
