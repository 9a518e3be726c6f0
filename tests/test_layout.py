"""The house plan (docs/architecture.md) holds: no import cycle, no lazy import of pydiff's own
modules outside the named exceptions, and `import pydiff` loads no tool and no heavy framework.

The tiers themselves are the import-linter contracts in pyproject.toml (`lint-imports`, run by CI);
these tests check what those contracts cannot see."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent  # no pydiff/ here: subprocesses import the installed one

ROOT = Path(__file__).resolve().parent.parent / "pydiff"

# Function-level imports of pydiff modules that stay lazy, and why:
LAZY_ALLOWED = {
    "pydiff/__init__.py": "the pipeline loads ONNX Runtime, tokenizers and Pillow: `import pydiff` stays cheap",
    "pydiff/cli/__init__.py": "the tools' commands import torch: loaded only when one is asked for",
}
# The compiled modules may be absent (the NumPy reference runs without them): imported on first use.
COMPILED = {"pydiff._C", "pydiff._C_cuda"}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).as_posix()
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        yield rel, name.removesuffix(".__init__"), path


def _imported(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return []


def test_no_import_cycle_among_pydiff_modules():
    """Tarjan's strongly connected components over every import, function-level ones included."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("pydiff", include_external_packages=False)
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    # importing a package runs its __init__, which is not a dependency on its children
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w == "pydiff":  # the root only re-exports (see the import-linter ignore list)
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in modules:
        if m not in index:
            visit(m)
    assert cycles == [], f"import cycles: {cycles}"


def test_lazy_imports_are_only_for_heavy_packages():
    """A pydiff module imported inside a function hides a tier problem; only the named exceptions."""
    offenders = []
    for rel, _name, path in _modules():
        tree = ast.parse(path.read_text(), filename=rel)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            mods = [m for m in _imported(node) if m == "pydiff" or m.startswith("pydiff.")]
            if not mods or any(m in COMPILED for m in mods) or _at_module_level(tree, node):
                continue
            if rel not in LAZY_ALLOWED:
                offenders.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == [], "lazy imports of pydiff modules:\n" + "\n".join(offenders)


def _at_module_level(tree, target) -> bool:
    def walk(body):
        for stmt in body:
            if stmt is target:
                return True
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                sub = getattr(stmt, field, None)
                if sub and walk(sub):
                    return True
        return False

    return walk(tree.body)


def test_import_pydiff_loads_no_tool_and_no_framework():
    code = (
        "import sys, pydiff\n"
        "pydiff.Schedule()\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('pydiff.tools', 'pydiff.cli', 'torch',"
        " 'onnx', 'diffusers', 'transformers', 'pydiff.pipeline', 'pydiff.backends', 'onnxruntime')))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=TESTS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_generate_path_loads_no_tool_module():
    code = (
        "import sys, pydiff\n"
        "pydiff.load('digits')\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('pydiff.tools', 'pydiff.cli', 'torch')))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=TESTS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_python_subprocess_in_the_tests_runs_from_a_folder_without_pydiff():
    """`python -c` puts its working directory first on sys.path: run from the checkout's root, a
    child imports the source tree (no compiled _C in a non-editable install) instead of the
    installed pydiff. CI installs non-editable, so each such call names its cwd."""
    missing = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.List)):
                continue
            first = node.args[0].elts[:1]
            runs_python = first and ast.unparse(first[0]) == "sys.executable"
            if runs_python and not any(k.arg == "cwd" for k in node.keywords):
                missing.append(f"{path.name}:{node.lineno}")
    assert not missing, f"subprocesses of sys.executable without cwd=: {missing}"
