"""ci/gpu.sh, the GPU session's one script, checked here so that its errors cost no GPU minutes:
its syntax, its plan (every step's limit at least twice its predicted time, the limits within
480 s, the table last; a plan that breaks the rule fails), its pytest lines without plugins
(pyproject's addopts name pytest-benchmark's option), and the module list of its first step
(benchmarks/gpu_modules.py) against the steps it names. The whole dry run (modules compiled,
every pytest line collected) runs in .ci/run.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "ci" / "gpu.sh"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash not found")


def plan(script: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(script), "--plan"], capture_output=True, text=True, timeout=60)


def test_syntax():
    proc = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_plan_fits_and_every_limit_is_twice_the_prediction():
    proc = plan(SCRIPT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = re.findall(r"^(\S+)\s+predicted\s+(\d+) s\s+limit\s+(\d+) s\s+ok$", proc.stdout, re.M)
    assert len(rows) >= 7, proc.stdout
    assert rows[0][0] == "precompile" and rows[-1][0] == "table", rows
    for name, predicted, limit in rows:
        assert int(limit) >= 2 * int(predicted), name
    total = int(re.search(r"each: (\d+) s of 480 s", proc.stdout).group(1))
    assert total <= 480 and total >= sum(int(limit) for _, _, limit in rows)


@pytest.mark.parametrize("edit, message", [
    (("step table 3 10", "step table 3 5"), "LIMIT UNDER 2 x PREDICTED"),
    (("step timing 55 110", "step timing 55 200"), "more than 480 s"),
])
def test_a_plan_that_breaks_the_rule_fails(tmp_path, edit, message):
    (tmp_path / "ci").mkdir()
    text = SCRIPT.read_text()
    assert edit[0] in text, edit
    (tmp_path / "ci" / "gpu.sh").write_text(text.replace(edit[0], edit[1]))
    proc = plan(tmp_path / "ci" / "gpu.sh")
    assert proc.returncode == 1 and message in proc.stdout, proc.stdout


def test_pytest_lines_do_not_need_the_benchmark_plugin():
    """The script's pytest options with pytest-benchmark switched off: pyproject's addopts
    (--benchmark-disable) would make pytest exit 4; the script's `-o addopts=` drops them."""
    options = re.search(r'^PYTEST=\("\$PY" -m pytest (.*)\)$', SCRIPT.read_text(), re.M)
    assert options, "PYTEST=(...) not found in ci/gpu.sh"
    args = [a for a in shlex.split(options.group(1))]
    cmd = [sys.executable, "-m", "pytest", *args, "-p", "no:benchmark", "--collect-only",
           "tests/test_gpu_probe.py", "-k", "exact_round"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1/" in proc.stdout and "collected" in proc.stdout, proc.stdout
    # and without the override the same line fails: the check can fail
    bare = [c for c in cmd if c not in ("-o", "addopts=")]
    assert subprocess.run(bare, cwd=ROOT, capture_output=True, text=True, timeout=120).returncode == 4


def test_module_list_names_the_scripts_steps():
    spec = importlib.util.spec_from_file_location("gpu_modules", ROOT / "benchmarks" / "gpu_modules.py")
    gpu_modules = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_modules)
    steps = gpu_modules.step_modules()
    in_script = re.findall(r"^\s+step (\S+) \d+ \d+", SCRIPT.read_text(), re.M)
    assert set(steps) <= set(in_script), (set(steps), in_script)
    modules = gpu_modules.run_modules()
    assert len({(code, names) for _, code, names in modules}) == len(modules)
    keys = {(code, names) for _, code, names in modules}
    assert all((code, names) in keys for mods in steps.values() for _, code, names in mods)
    labels = [label for label, _, _ in gpu_modules.unique(steps)]
    # the timing's rows on both kernels, the 128 x 64 knock-out, the probe's own kernels
    assert any(l.startswith("simt float32 squared rk=16 tile=64x64") for l in labels), labels
    assert any(l.startswith("mma float32 squared rk=16 tile=128x64") for l in labels), labels
    assert "probe kernels" in labels
    kinds = {(names[0].split("<")[0], "double" in names[0]) for _, _, names in gpu_modules.sample(modules)}
    assert len(kinds) == 9 and ("lorakern::fused_pass_mma", True) in kinds, kinds


FAKE_PYTHON = """#!/bin/bash
# a stand-in for python on ci/gpu.sh's run path (no GPU here): says what it was asked, exits 0;
# the precompile writes a module into the cache, the tests step one more (a module it missed),
# dated in the past: a file written within the filesystem's timestamp granularity of the last
# listing looks no newer than it (CI's filesystem did that), and it must still be counted
echo "python $*"
case "$*" in *gpu_modules.py*) touch "$CUPY_CACHE_DIR/first.cubin";; esac
case "$*" in *tests/test_cuda.py*) touch -d @946684800 "$CUPY_CACHE_DIR/late.cubin";; esac
cat > /dev/null
"""


def test_the_run_path_with_a_stand_in_python(tmp_path):
    """The GPU run's own bash (the steps in order with their limits, each step's line in
    steps.txt with the modules CuPy's cache gained during it, the table last), with a stand-in
    for python: a bash error there would cost a GPU run."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(fake), "OUT": str(out),
           "CUPY_CACHE_DIR": str(cache)}
    proc = subprocess.run([BASH, str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = (out / "steps.txt").read_text().splitlines()
    names = [line.split()[1].rstrip(":") for line in steps]
    assert names == ["precompile", "calibrate", "tests", "timing", "linear", "mma-tests", "torch", "table"]
    assert "compiled in the step: 1 modules" in steps[2] and "compiled in the step: 0 modules" in steps[3]
    assert "--warm-numba" in proc.stdout and "-o addopts= tests/test_cuda.py -k not emulated" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1] == f"python benchmarks/gpu_probe.py table --out {out}"
    # what comes back from the device tool's $OUT (8 files at most): the logs packed in one
    assert sorted(p.name for p in out.iterdir()) == ["logs.tgz", "steps.txt"]
