"""The NVRTC modules are compiled once per machine: CuPy's disk cache is hit in every later
process (lorakern/_cuda/launch.py, "compiled once per machine").

No GPU and no CuPy needed here: the generated sources, options and name expressions are the
same bytes in separate processes (hash seed, working directory), and each variant has a source
(so a cache key) of its own. CupyRuntime against the real CuPy 13 and 14 cache code (a second
process compiles nothing): tests/test_cuda_cupy.py, in .ci/run's CuPy venvs; on a GPU:
benchmarks/gpu_probe.py's kernel_cache probe (ci/gpu.sh).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lorakern
from lorakern._cuda import launch

ROOT = Path(lorakern.__file__).resolve().parents[1]

DIGESTS = """
import json
from lorakern._cuda import launch
print(json.dumps({label: launch.module_digest(code, names) for label, code, names in launch.all_modules()}))
"""


def digests_in_a_new_process(cwd: Path, seed: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed}
    proc = subprocess.run([sys.executable, "-c", DIGESTS], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(proc.stdout)


def test_every_module_is_the_same_bytes_in_every_process(tmp_path):
    """Source, options and name expressions of every variant: the same digest in two fresh
    processes (different PYTHONHASHSEED, different working directories) and in this one."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    first = digests_in_a_new_process(tmp_path / "a", "0")
    second = digests_in_a_new_process(tmp_path / "b" / "deeper", "4242")
    here = {label: launch.module_digest(code, names) for label, code, names in launch.all_modules()}
    # per dtype: loss x mask x rank bound x tile, for each fused kernel (simt; mma at each copy
    # stage count), update, and the linear kind's linear_pointwise per loss
    ranks = len(launch.RANK_BOUNDS) + len(launch.MMA_RANK_BOUNDS) * len(launch.MMA_STAGES)
    expected = 2 * (len(lorakern.LOSSES) * 2 * ranks * len(launch.TILES) + 1 + len(lorakern.LOSSES))
    assert len(here) == expected and len(first) == expected
    assert first == second == here
    assert len(set(here.values())) == expected  # every variant its own module


def test_digest_sees_every_input():
    """A change of source, options or names changes the digest (so the test above could fail)."""
    label, code, names = next(launch.all_modules())
    base = launch.module_digest(code, names)
    assert launch.module_digest(code + " ", names) != base
    assert launch.module_digest(code, names[::-1]) != base
    assert launch.module_digest(code, names[:-1]) != base


def test_digest_sees_every_kernel_file(monkeypatch):
    """The headers go into the module as text (no #include that NVRTC would resolve on its own):
    every file a module is made of is in its source, and a change to fused_common.cuh, which
    both fused kernels share, changes the digest of every module."""
    files = {"simt": (launch.common_source, launch.kernel_source),
             "mma": (launch.warp_source, launch.common_source, launch.kernel_source, launch.mma_kernel_source)}
    loss = lorakern.LOSSES["squared"]
    before = {}
    for kernel, parts in files.items():
        code = launch.module_source(loss, kernel)
        assert not any(line.lstrip().startswith("#include") for line in code.splitlines())
        assert all(part() in code for part in parts), kernel
        before[kernel] = launch.module_digest(code, ())
    header = launch.common_source()
    monkeypatch.setattr(launch, "common_source", lambda: header + "\n// changed\n")
    for kernel in files:
        assert launch.module_digest(launch.module_source(loss, kernel), ()) != before[kernel]


def test_source_has_no_process_dependent_text():
    """No path of this machine, no object address in the generated source."""
    paths = [p for p in (str(ROOT), str(Path.cwd()), str(Path.home())) if len(p) > 1]
    for _, code, names in launch.all_modules():
        for text in (*paths, " at 0x", "<object"):
            assert text not in code and all(text not in n for n in names)


# ---- one cache key per variant --------------------------------------------------------------------
def test_each_variant_is_compiled_from_a_source_of_its_own():
    """CuPy 13 keys its cache by source and options only, and one fused.cu serves every rank,
    tile and mask of a loss (update<T> and linear_pointwise the squared loss's): keyed_source
    puts the name expressions into the source, so that no two modules share a key. The
    loader against the real CuPy cache: tests/test_cuda_cupy.py."""
    for arch in (None, *launch.SMEM_LIMITS):
        modules = list(launch.all_modules(arch))
        assert len({label for label, _, _ in modules}) == len(modules)
        assert len({launch.keyed_source(code, names) for _, code, names in modules}) == len(modules)
        assert len({code for _, code, _ in modules}) < len(modules) / 10  # without it: shared


def test_a_gpu_run_asks_for_the_launchers_tiles_and_the_tests():
    """all_modules(arch): the tile the launcher picks on that GPU and the tests' 32 x 32 for
    every variant, the mma knock-outs where tests and gpu_probe use them."""
    for arch, limit in launch.SMEM_LIMITS.items():
        labels = {label for label, _, _ in launch.all_modules(arch)}
        for dtype in ("float32", "float64"):
            for rk in launch.RANK_BOUNDS:
                bm, bn, _ = launch.choose_config(4 if dtype == "float32" else 8, rk, False, limit)
                assert f"{dtype} squared masked=True rk={rk} tile={bm}x{bn}" in labels
                assert f"{dtype} huber masked=False rk={rk} tile=32x32" in labels
        # 128 x 64 with labels fits sm_90's shared memory only (two X tiles: fused_mma.cu)
        wide = any(label.startswith("float32 logistic masked=True rk=16 tile=128x64 kernel=mma") for label in labels)
        assert wide == (arch == "sm_90")
        assert any(label.startswith("float32 squared masked=True rk=32 tile=128x64 kernel=mma") for label in labels)
        assert "float64 squared masked=True rk=8 tile=32x32 kernel=mma stages=2" in labels
        assert not any("tile=128x64" in label and "float64" in label for label in labels)


def test_precompile_lists_the_gpu_runs_modules_without_cupy():
    """``python -m lorakern._cuda.precompile --list`` prints all_modules(arch), one label a line
    (no CuPy needed); compiling without CuPy says what to install."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for arch in launch.SMEM_LIMITS:
        proc = subprocess.run([sys.executable, "-m", "lorakern._cuda.precompile", "--list", "--arch", arch],
                              env=env, capture_output=True, text=True, timeout=120, check=True)
        lines = proc.stdout.splitlines()
        assert lines[:-1] == [label for label, _, _ in launch.all_modules(arch)]
        assert lines[-1] == f"{len(lines) - 1} modules for {arch}"
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        proc = subprocess.run([sys.executable, "-m", "lorakern._cuda.precompile", "--arch", "sm_90"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "CuPy is not installed" in proc.stderr
