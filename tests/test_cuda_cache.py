"""The NVRTC modules are compiled once per machine: CuPy's disk cache is hit in every later
process (lorakern/_cuda/launch.py, "compiled once per machine").

No GPU needed: the generated sources, options and name expressions are checked to be the
same bytes in separate processes (hash seed, working directory), and CupyRuntime's use of the
cache is checked against a stand-in for CuPy that behaves as cupy/cuda/compiler.py does (the
disk cache is read only for modules made without name expressions). The real cache is
checked on a GPU by benchmarks/gpu_probe.py (ci/gpu.sh).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
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


# ---- CupyRuntime against a stand-in for CuPy's compiler cache -----------------------------------
class FakeCupy:
    """CuPy's RawModule and disk cache as cupy/cuda/compiler.py has them: the cache file is
    named by a hash of source and options; it is written after every compile and read only
    when no name expressions are given; without them, NVRTC instantiates no template."""

    def __init__(self, cache_dir: Path):
        self.cache_dir, self.compiles, self.reads = cache_dir, 0, 0
        fake = self

        class RawModule:
            def __init__(self, *, code, options=(), name_expressions=None):
                self.code, self.options, self.names = code, options, name_expressions
                self._mod = None

            @property
            def module(self):
                if self._mod is None:
                    self._mod = fake.compile_with_cache(self.code, self.options, self.names)
                return self._mod

            def get_function(self, name):
                mangled = self.module.mapping.get(name, name) if self.names else name
                if mangled not in self.module.kernels:
                    raise RuntimeError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
                return types.SimpleNamespace(name=mangled)

        self.RawModule = RawModule
        compiler = types.SimpleNamespace(get_cache_dir=lambda: str(cache_dir))
        self.cuda = types.SimpleNamespace(compiler=compiler, Device=lambda: types.SimpleNamespace(id=0))

    def compile_with_cache(self, code, options, names):
        path = self.cache_dir / (launch.module_digest(code, ())[:16] + launch.module_digest("".join(options), ())[:8] + ".cubin")
        if path.exists() and not names:
            self.reads += 1
            kernels = json.loads(path.read_text())
            return types.SimpleNamespace(kernels=set(kernels), mapping={})
        self.compiles += 1
        mapping = {n: "_Z" + str(abs(hash(n))) for n in names or ()}
        path.write_text(json.dumps(sorted(mapping.values())))
        return types.SimpleNamespace(kernels=set(mapping.values()), mapping=mapping)


def runtime_on(monkeypatch, fake):
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupy.cuda", fake.cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.compiler", fake.cuda.compiler)
    return launch.CupyRuntime()


def test_a_later_process_loads_from_the_disk_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("CUPY_CACHE_IN_MEMORY", raising=False)
    fake = FakeCupy(tmp_path)
    label, code, names = next(launch.all_modules())
    first = runtime_on(monkeypatch, fake)  # the first process on this machine
    module = first.module(code, names)
    assert (first.compiles, first.cache_hits, fake.compiles) == (1, 0, 1)
    assert first.kernel(module, names[0], 0).name.startswith("_Z")
    assert first.names_file(code, names).exists()

    later = runtime_on(monkeypatch, fake)  # a new process: a new runtime, the same disk
    module = later.module(code, names)
    assert (later.compiles, later.cache_hits, fake.compiles, fake.reads) == (0, 1, 1, 1)
    assert [later.kernel(module, n, 0).name for n in names] == [first.kernel(first.module(code, names), n, 0).name
                                                                for n in names]


def test_a_stale_cache_entry_compiles_again(tmp_path, monkeypatch):
    """The names file outlived CuPy's cubin (or the cubin lacks a kernel): compile again."""
    monkeypatch.delenv("CUPY_CACHE_IN_MEMORY", raising=False)
    fake = FakeCupy(tmp_path)
    _, code, names = next(launch.all_modules())
    runtime_on(monkeypatch, fake).module(code, names)
    for cubin in tmp_path.glob("*.cubin"):
        cubin.unlink()
    later = runtime_on(monkeypatch, fake)
    module = later.module(code, names)
    assert (later.compiles, later.cache_hits) == (1, 0)
    assert later.kernel(module, names[-1], 0).name.startswith("_Z")


def test_no_disk_cache_in_memory_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    fake = FakeCupy(tmp_path)
    _, code, names = next(launch.all_modules())
    rt = runtime_on(monkeypatch, fake)
    assert rt.names_file(code, names) is None
    rt.module(code, names)
    assert not list(tmp_path.glob("lorakern-*"))
