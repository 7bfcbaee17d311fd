"""A CPU step never imports CuPy or Dask; a missing CUDA backend is a clear error (STYLE.md)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lorakern

SCRIPT = """
import sys
import numpy as np
import lorakern

rng = np.random.default_rng(0)
W0, Y = rng.standard_normal((5, 6)), rng.standard_normal((5, 6))
B, A = lorakern.init_adapters(5, 6, 2, dtype=np.float64, seed=0, init="gaussian")
result = lorakern.step(lorakern.Problem(W0, Y), B, A, device="cpu")
assert np.isfinite(result.B).all()
assert "cupy" not in sys.modules, "a CPU step imported cupy"
for name in ("dask", "distributed"):
    assert name not in sys.modules, f"a CPU step on NumPy arrays imported {name}"
found = lorakern.devices()
assert "cpu" in found
if "cuda" not in found:
    assert "cupy" not in sys.modules, "devices() imported cupy and found no CUDA"
print("ok", found)
"""


def test_cpu_step_does_not_import_cupy_or_dask():
    root = str(Path(lorakern.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def test_import_lorakern_is_light():
    """Importing the package loads neither Numba's kernels nor CuPy."""
    code = "import sys, lorakern; print('cupy' in sys.modules, 'lorakern._cpu' in sys.modules)"
    root = str(Path(lorakern.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "False"]


def test_public_api():
    for name in ("Problem", "step", "fit", "init_adapters", "devices", "DeviceUnavailableError",
                 "Theorem", "Constant", "Armijo", "reference", "theory"):
        assert hasattr(lorakern, name), name
    assert set(lorakern.__all__) <= set(dir(lorakern))


def _import_graph() -> dict[str, set[str]]:
    """lorakern's modules -> the lorakern modules their import statements name (anywhere in
    the file, functions included), read from the source without importing anything."""
    import ast

    root = Path(lorakern.__file__).resolve().parent
    files = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {}
    for name, (path, is_package) in files.items():
        package = name if is_package else name.rpartition(".")[0]
        named = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                named |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # "from . import x" names the module x when x is one, else the package
                named |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                          for a in node.names}
        # a module's own packages are being imported already when it runs: not an edge
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {m for m in named if m in files and m != name and m not in own}
    return graph


def _cycles(graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    """No two lorakern modules import each other, directly or around a circle (issue 24:
    problems/matrix.py and _dask/problem.py did; the dispatch table now joins them)."""
    graph = _import_graph()
    assert {"lorakern.problems.matrix", "lorakern._dask.problem", "lorakern.descent"} <= set(graph)
    assert "lorakern._dispatch" in graph["lorakern.problems.matrix"]  # the graph sees imports
    assert "lorakern.problems" in graph["lorakern._dask.problem"]     # ... inside functions too
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_circle():
    """The check above can fail: a circle made by hand is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
