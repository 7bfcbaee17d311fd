"""Every Python block of README.md and docs/*.md runs alone, in a fresh interpreter, and the
numbers it quotes are the numbers it prints.

* A block is a fenced ```python (or ```py) block. It runs as written in its own subprocess
  (``python -c``, the working directory a temporary folder, this checkout first on the path):
  no block may lean on names from the blocks before it.
* A block that needs an extra or more than one machine says so in its first line,
  ``# needs: torch`` (or ``a GPU``, ``a Dask cluster``, ``scikit-learn``, ``matplotlib``),
  and is skipped with that reason where it is missing (``NEEDS``). CI installs ".[test]", which
  brings torch and scikit-learn, so those blocks run there.
* A quoted result is a comment ``# -> TEXT`` at the end of a one-line statement that prints
  one line: the test checks that the line printed is TEXT, so a quoted number cannot go stale.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(python|py)\n(.*?)^```", re.S | re.M)
NEEDS_LINE = re.compile(r"^# needs: ([^(]+?)\s*(\(.*\))?$")
QUOTE = re.compile(r"^(\s*)(\S.*?)\s+# -> (.+)$")
MARK = "@@lorakern-docs-quote@@"


def _gpu() -> str | None:
    import lorakern

    return None if "cuda" in lorakern.devices() else "needs a GPU"


def _module(name: str, extra: str):
    def why() -> str | None:
        return None if importlib.util.find_spec(name) else f'needs {name}: pip install ".[{extra}]"'
    return why


#: what a block's "# needs:" line may name -> why it cannot run here (None: it can)
NEEDS = {
    "torch": _module("torch", "torch"),
    "scikit-learn": _module("sklearn", "digits"),
    "matplotlib": _module("matplotlib", "plot"),
    "a GPU": _gpu,
    # a scheduler, workers and a shared store: tests/test_dask.py runs this code on a
    # LocalCluster instead
    "a Dask cluster": lambda: "needs a Dask cluster (tests/test_dask.py runs this code on a LocalCluster)",
}


def doc_blocks():
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 2  # the block's first line
            yield pytest.param(path, line, match.group(2), id=f"{path.name}:{line}")


def needs_of(code: str) -> list[str]:
    first = code.splitlines()[0] if code.strip() else ""
    found = NEEDS_LINE.match(first)
    if not found:
        return []
    names = [n.strip() for n in found.group(1).split(",")]
    unknown = [n for n in names if n not in NEEDS]
    assert not unknown, f"unknown '# needs:' {unknown}; known: {sorted(NEEDS)}"
    return names


def instrument(code: str) -> tuple[str, list[str]]:
    """The block with a marker printed after each quoted statement (the one ending on the
    line of the ``# -> TEXT`` comment, at its indentation), and the quoted texts in order."""
    import ast

    lines = code.splitlines()
    ends = {}  # last line of a statement -> its indentation (the innermost statement wins)
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.stmt):
            old = ends.get(node.end_lineno)
            ends[node.end_lineno] = node.col_offset if old is None else max(old, node.col_offset)
    out, quotes = [], []
    for number, line in enumerate(lines, start=1):
        out.append(line)
        found = QUOTE.match(line)
        if found:
            assert number in ends, f"'# -> ' must end a statement: {line!r}"
            out.append(" " * ends[number] + f"print({MARK!r}, {len(quotes)}, flush=True)")
            quotes.append(found.group(3).strip())
    return "\n".join(out) + "\n", quotes


def printed_quotes(stdout: str) -> dict[int, str]:
    """quote number -> the last line printed before its marker."""
    got, before = {}, []
    for line in stdout.splitlines():
        if line.startswith(MARK):
            got[int(line.split()[-1])] = before[-1] if before else ""
            before = []
        else:
            before.append(line)
    return got


def test_the_docs_have_blocks_and_quotes():
    blocks = list(doc_blocks())
    assert len(blocks) >= 8
    quoted = sum(len(instrument(p.values[2])[1]) for p in blocks)
    assert quoted >= 5  # the numbers the prose leans on are checked


@pytest.mark.parametrize("path, line, code", list(doc_blocks()))
def test_block_runs_alone(path, line, code, tmp_path):
    for need in needs_of(code):
        why = NEEDS[need]()
        if why is not None:
            pytest.skip(why)
    program, quotes = instrument(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    where = f"{path.name}, block at line {line}"
    assert proc.returncode == 0, f"{where} failed:\n{proc.stdout}\n{proc.stderr}"
    got = printed_quotes(proc.stdout)
    for i, want in enumerate(quotes):
        assert i in got, f"{where}: quote {i} ('# -> {want}') was never printed"
        assert got[i] == want, f"{where}: the block quotes '{want}' but printed '{got[i]}'"


def test_instrument_and_read_back():
    program, quotes = instrument("x = 2\nprint(x + 1)  # -> 3\nfor i in [1]:\n    print(i)   # -> 1\n")
    assert quotes == ["3", "1"]
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert printed_quotes(proc.stdout) == {0: "3", 1: "1"}
    assert needs_of("# needs: torch, a GPU\nimport torch\n") == ["torch", "a GPU"]
    assert needs_of("import numpy\n") == []
