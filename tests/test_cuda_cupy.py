"""The CUDA layer against the real CuPy (13.x and 14.x wheels, pip's NVRTC), without a GPU.

Run by .ci/run in two small venvs (cupy-cuda12x 13.x with nvidia-cuda-nvrtc-cu12, cupy-cuda13x
14.x with nvidia-cuda-nvrtc); skipped where CuPy is not importable (the README's venv). Only the
driver-level calls are replaced (tests/cupy_standin.py: module load, function get, launch, the
device), and test_standin_matches_the_real_cupy checks each replaced name against the installed
CuPy. Everything else is CuPy's own: cupy/cuda/compiler.py's cache key and files, its NVRTC
options (-ftz=true among them), NVRTC itself.

* the loader (launch.CupyRuntime) in two fresh processes: the second compiles nothing (NVRTC
  calls counted at CuPy's own compile entry), on CuPy 13 (our names file) and 14 (CuPy's
  name-expression cache), for variants that share one source; without keyed_source CuPy 13's
  second process compiles again (so the test can fail);
* precompile.py's cache is the loader's: a process after it compiles nothing;
* every module of a GPU run (launch.all_modules(arch)) through NVRTC's front end for sm_80 and
  sm_90, and the heaviest ones through the full compile with CuPy's options;
* the kernel arguments lorakern passes (NumPy scalars, arrays, null pointers) against the
  parameter types NVRTC compiled, and CuPy's conversion of each scalar.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import lorakern
from lorakern import LOSSES
from lorakern._cuda import launch, precompile

ROOT = Path(lorakern.__file__).resolve().parents[1]


def _nvrtc_problem() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (.ci/run runs these tests in its CuPy 13 and 14 venvs)"
    try:
        from cupy.cuda import compiler

        compiler._get_nvrtc_version()
    except Exception as exc:  # noqa: BLE001 - CuPy without NVRTC
        return f"CuPy cannot load NVRTC ({type(exc).__name__}: {exc}); pip install the nvidia-cuda-nvrtc wheel"
    return None


PROBLEM = _nvrtc_problem()
if PROBLEM is not None and os.environ.get("LORAKERN_REQUIRE_CUPY"):  # .ci/run's CuPy venvs: no silent skip
    raise RuntimeError(f"LORAKERN_REQUIRE_CUPY is set but {PROBLEM}")
pytestmark = [pytest.mark.cupy, pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))]

ARCHS = ("sm_80", "sm_90")


@pytest.fixture
def cupy_standin(monkeypatch, tmp_path):
    """The real CuPy with the stand-in's driver-level calls, its cache in tmp_path."""
    import cupy_standin

    use_cache_dir(monkeypatch, tmp_path / "cache")
    cupy_standin.install(monkeypatch.setattr)
    return SimpleNamespace(cache=tmp_path / "cache", nvrtc=cupy_standin.nvrtc_counter(monkeypatch.setattr))


def use_cache_dir(monkeypatch, path: Path):
    """CuPy's disk cache in ``path`` for this test (CuPy 14 reads $CUPY_CACHE_DIR once, when its
    compiler is imported: its disk backend is made anew here)."""
    from cupy.cuda import compiler

    monkeypatch.setenv("CUPY_CACHE_DIR", str(path))
    monkeypatch.delenv("CUPY_CACHE_IN_MEMORY", raising=False)
    backend = getattr(compiler, "_kernel_cache_backend", None)
    if backend is not None:
        monkeypatch.setattr(compiler, "_kernel_cache_backend", type(backend)(str(path)))


def shared_source_modules():
    """Three modules with one source (the squared loss's fused.cu; update<T> and
    linear_pointwise use it too): on CuPy 13 they share a cache key unless keyed_source
    separates them. Small kernels: cheap to compile."""
    code = launch.module_source(LOSSES["squared"])
    return [("update float", code, ("lorakern::update<float>",)),
            ("update double", code, ("lorakern::update<double>",)),
            ("pointwise float", code, ("lorakern::linear_pointwise<float, false>",))]


# ---- the stand-in against the real package ---------------------------------------------------------
def doc_signature(obj) -> inspect.Signature:
    """The signature of a Cython function or class from its docstring (the last line that
    reads like a call of it: CuPy 14 puts a generic one first for RawKernel.__call__)."""
    name = obj.__name__
    lines = [line.strip() for line in (obj.__doc__ or "").splitlines()
             if re.match(rf"^(\w+\.)?{re.escape(name)}\(", line.strip())]
    first = lines[-1]
    params = first[first.index("(") + 1:first.rindex(")")]
    params = re.sub(r"\b(?:str|unicode|tuple|bint|bool|int|object)\s+(?=\w+\s*(?:=|,|$))", "", params)
    params = params.replace("\\*", "*")
    return inspect.signature(eval(f"lambda {params}: None", {}))  # noqa: S307 - a docstring of the installed CuPy


def test_standin_matches_the_real_cupy():
    """Every name the stand-in replaces or calls exists in the installed CuPy with the call
    shape lorakern and the stand-in use; a removed or renamed one fails here."""
    import cupy
    from cupy._core import core
    from cupy.cuda import compiler, function

    import cupy_standin

    # cupy.RawModule(code=..., options=<tuple>, name_expressions=...): keyword-only but code
    real = doc_signature(cupy.RawModule)
    standin = inspect.signature(cupy_standin.StandInRawModule)
    for name in ("code", "options", "name_expressions"):
        assert name in real.parameters, f"cupy.RawModule lost {name}: {real}"
        assert standin.parameters[name].kind == real.parameters[name].kind, name
    assert "tuple options" in cupy.RawModule.__doc__.splitlines()[0]  # a list would be refused
    assert isinstance(launch.OPTIONS, tuple)
    for attr in ("get_function", "module", "name_expressions"):
        assert hasattr(cupy.RawModule, attr), attr
    # what RawModule's compile calls (raw.pyx _get_raw_module), with an explicit arch
    compile_params = doc_signature(core.compile_with_cache).parameters
    for name in ("source", "options", "arch", "prepend_cupy_headers", "name_expressions"):
        assert name in compile_params, f"cupy._core.core.compile_with_cache lost {name}"
    # the kernel: attributes set and read, the launch's call shape
    for attr in ("num_regs", "max_dynamic_shared_size_bytes"):
        assert hasattr(cupy.RawKernel, attr), attr
    call = doc_signature(cupy.RawKernel.__call__)
    assert list(call.parameters)[:4] == ["self", "grid", "block", "args"]
    assert call.parameters["shared_mem"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(cupy_standin.StandInKernel.__call__).parameters) == [
        "self", "grid", "block", "args", "shared_mem"]
    # the device: what CupyRuntime and the stand-in read
    for attr in ("id", "attributes", "compute_capability"):
        assert hasattr(cupy.cuda.Device, attr), attr
    # compile_only's replacements, count_nvrtc's wrapped method
    assert callable(compiler._get_arch)
    assert callable(compiler._get_arch_for_options_for_nvrtc.__wrapped__)
    for attr in ("load", "_set_mapping", "get_function", "mapping"):
        assert hasattr(function.Module, attr), attr
    assert callable(compiler._NVRTCProgram.compile)
    assert "function.Module()" in inspect.getsource(compiler._compile_with_cache_cuda)
    # the disk cache the loader reads: get_cache_dir (13) or $CUPY_CACHE_DIR (14's backend)
    assert hasattr(compiler, "get_cache_dir") or "CUPY_CACHE_DIR" in inspect.getsource(compiler._kernel_cache_backend.__class__)


def test_name_expression_cache_probe_agrees_with_cupys_code():
    """launch.caches_name_expressions is a feature probe; it agrees with what CuPy's
    _compile_with_cache_cuda does: the name expressions are in the cache key (14) or the cache
    is skipped for them (13)."""
    from cupy.cuda import compiler

    code = inspect.getsource(compiler._compile_with_cache_cuda)
    keyed = "sorted(name_expressions)" in code
    assert launch.caches_name_expressions(compiler) == keyed
    assert keyed or "not name_expressions" in code  # 13: "We force recompiling"


# ---- compiled once per machine --------------------------------------------------------------------
CHILD = r"""
import json, os, sys
sys.path.insert(0, os.environ["LORAKERN_TESTS"])
import cupy_standin
cupy_standin.install()
nvrtc = cupy_standin.nvrtc_counter()
from lorakern._cuda import launch, precompile
with open(os.environ["LORAKERN_MODULES"]) as f:
    modules = [tuple(m[:2]) + (tuple(m[2]),) for m in json.load(f)]
if os.environ.get("LORAKERN_UNKEYED"):
    launch.keyed_source = lambda code, names: code  # the variants share a key (the test can fail)
if os.environ.get("LORAKERN_PRECOMPILE"):
    report = precompile.precompile(modules, 2, "sm_90")
    print(json.dumps({"failed": report["failed"], "compiled": report["compiled"]}))
    sys.exit(0)
rt = launch.CupyRuntime()
mangled = {}
for label, code, names in modules:
    module = rt.module(code, names)
    mangled[label] = [rt.kernel(module, name, 0).name for name in names]
print(json.dumps({"nvrtc": len(nvrtc), "compiles": rt.compiles, "cache_hits": rt.cache_hits,
                  "mangled": mangled, "native": rt.native}))
"""


def run_child(cache: Path, modules, **flags) -> dict:
    """A fresh process with the stand-in: loads ``modules`` through CupyRuntime (or precompiles
    them), CuPy's cache in ``cache``; its report."""
    listed = cache.parent / f"{cache.name}-modules.json"
    listed.write_text(json.dumps(modules))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUPY_CACHE_DIR": str(cache),
           "LORAKERN_TESTS": str(Path(__file__).parent), "LORAKERN_MODULES": str(listed),
           **{f"LORAKERN_{k.upper()}": "1" for k, v in flags.items() if v}}
    env.pop("CUPY_CACHE_IN_MEMORY", None)
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def listing(cache: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}


def test_a_second_process_compiles_nothing(tmp_path):
    """Three variants of one source: the first process compiles each once, the second loads
    all three from the disk cache with no NVRTC call and writes no file, same kernels."""
    modules = shared_source_modules()
    cache = tmp_path / "cache"
    first = run_child(cache, modules)
    assert (first["nvrtc"], first["compiles"], first["cache_hits"]) == (3, 3, 0), first
    files = listing(cache)
    second = run_child(cache, modules)
    assert (second["nvrtc"], second["compiles"], second["cache_hits"]) == (0, 0, 3), second
    assert listing(cache) == files
    assert second["mangled"] == first["mangled"]
    assert all(name.startswith("_Z") for names in first["mangled"].values() for name in names)
    # CuPy 13: the cubins (one per variant) and our names files; 14: CuPy's entries only
    names_files = [f for f in files if f.endswith(".names.json")]
    assert len(names_files) == (0 if first["native"] else 3)
    assert len([f for f in files if f.endswith(".cubin")]) == 3


def test_without_keyed_source_cupy13_variants_overwrite_each_other(tmp_path):
    """The same three variants with the name expressions left out of the source: CuPy 13
    keys them alike (each compile overwrites the entry, so the second process compiles again);
    CuPy 14 keys by the names itself."""
    modules = shared_source_modules()
    first = run_child(tmp_path / "cache", modules, unkeyed=True)
    second = run_child(tmp_path / "cache", modules, unkeyed=True)
    if first["native"]:
        assert second["nvrtc"] == 0, second
    else:
        assert second["nvrtc"] >= 2 and second["compiles"] >= 2, second


def test_precompiled_modules_load_without_nvrtc(tmp_path):
    """precompile.py's cache entries are the loader's: after it (2 worker processes, explicit
    sm_90, no device), a process loads every module without NVRTC."""
    modules = shared_source_modules() + [
        m for m in launch.all_modules("sm_90") if m[0] == "float32 squared masked=False rk=4 tile=32x32"]
    assert len(modules) == 4
    done = run_child(tmp_path / "cache", modules, precompile=True)
    assert done == {"failed": [], "compiled": 4}
    later = run_child(tmp_path / "cache", modules)
    assert (later["nvrtc"], later["compiles"], later["cache_hits"]) == (0, 0, 4), later


def test_stale_or_damaged_names_files_compile_again(cupy_standin):
    """CuPy 13's path: a names file that is not JSON, or names a kernel the cubin lacks, is
    not an error: the module is compiled with its name expressions (and the file rewritten).
    CuPy 14: no names file is read or written."""
    rt = launch.CupyRuntime()
    _, code, names = shared_source_modules()[0]
    path = rt.names_file(code, names)
    if rt.native:
        assert path is None
        rt.module(code, names)
        assert not list(cupy_standin.cache.glob("lorakern-*"))
        return
    for damaged in ("{not json", json.dumps({names[0]: "_Z_no_such_kernel"})):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(damaged)
        fresh = launch.CupyRuntime()
        module = fresh.module(code, names)
        assert fresh.compiles == 1 and fresh.kernel(module, names[0], 0).name.startswith("_Z")
        assert json.loads(path.read_text())[names[0]].startswith("_Z")


def test_in_memory_mode_writes_nothing(cupy_standin, monkeypatch):
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    rt = launch.CupyRuntime()
    _, code, names = shared_source_modules()[0]
    assert rt.names_file(code, names) is None
    rt.kernel(rt.module(code, names), names[0], 0)
    assert rt.compiles == 1 and len(cupy_standin.nvrtc) == 1
    assert not cupy_standin.cache.exists() or not list(cupy_standin.cache.iterdir())


# ---- every module of a GPU run through NVRTC ------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_every_module_of_a_gpu_run_passes_nvrtcs_front_end(arch):
    """launch.all_modules(arch) (what precompile compiles for a GPU run): every name expression
    of every module parsed, instantiated and named by NVRTC with CuPy's options
    (precompile --dry-run: -fdevice-syntax-only, nothing written)."""
    modules = list(launch.all_modules(arch))
    report = precompile.precompile(modules, None, arch, syntax_only=True)
    assert report["failed"] == []
    assert report["compiled"] == len(modules) > 200


def test_the_front_end_check_can_fail():
    """A name expression the kernels cannot instantiate (an mma rank bound not a multiple of 8:
    fused_mma.cu's static_assert) fails the dry run."""
    code = launch.module_source(LOSSES["squared"], "mma")
    bad = ("bad", code, ("lorakern::fused_pass_mma<float, 12, 64, 64, 3, false, false, true>",))
    report = precompile.precompile([bad], 1, "sm_90", syntax_only=True)
    assert [label for label, _ in report["failed"]] == ["1 modules from bad"]
    assert "static assertion" in report["failed"][0][1]


def covering(arch):
    """The launcher's modules for the squared loss at rank bound 16 on ``arch``: fused.cu's
    fp32 pass and fused_mma.cu's fp32 (TF32 mma) and fp64 (DMMA) passes, the cheapest real
    ones (labels and masks are the front end's test above; the full compile adds NVVM and
    ptxas: the inline PTX of warp.cuh and cp.async among it)."""
    picked = {}
    for label, code, names in launch.all_modules(arch):
        m = re.fullmatch(r"(\w+) squared masked=False rk=16 tile=(\S+)(?: kernel=(\w+) stages=\d)?", label)
        kernel = m and (m.group(3) or "simt")
        if m and m.group(2) != "32x32" and (kernel, m.group(1)) != ("simt", "float64"):
            picked.setdefault((m.group(1), kernel), (label, code, names))
    return list(picked.values())


def full_compile_arch() -> str:
    """The architecture this NVRTC compiles fully here: NVRTC 13 (CuPy 14, as on the GPU
    machine) sm_90, NVRTC 12 sm_80; so CI's two venvs cover both, each once (a full compile is
    1-2 s a module, the front end's check above covers both archs in both)."""
    from cupy.cuda import compiler

    return "sm_90" if compiler._get_nvrtc_version()[0] >= 13 else "sm_80"


def test_modules_compile_fully_with_cupys_options(tmp_path, monkeypatch):
    """The full compile (CuPy's exact options, cubin) of covering()'s modules into a fresh
    cache; every kernel named (the loader-level round trip is
    test_precompiled_modules_load_without_nvrtc). All of launch.all_modules(arch) compiles
    fully with ``python -m lorakern._cuda.precompile --arch ...`` (minutes on 2 cores: not in
    CI; benchmarks/NOTES.md has the times)."""
    use_cache_dir(monkeypatch, tmp_path)
    modules = covering(full_compile_arch())
    assert len(modules) == 3
    report = precompile.precompile(modules, 2, full_compile_arch())
    assert report["failed"] == [] and report["compiled"] == 3
    assert len(list(tmp_path.glob("*.cubin"))) == 3


# ---- the kernel arguments ---------------------------------------------------------------------------
class RecordingRuntime:
    """launch.py's runtime interface on NumPy arrays: the kernels are name expressions, the
    launches are recorded (what CupyRuntime would hand to RawKernel.__call__)."""

    name, supports_graphs, xp = "record", False, np
    sm_count, max_smem_per_block = 132, launch.SMEM_LIMITS["sm_90"]

    def __init__(self):
        self.calls = []

    def module(self, code, names):
        return code

    def kernel(self, module, name, smem):
        return name

    def occupancy(self, kernel, smem):
        return 1

    def launch(self, kernel, grid, args, smem=0):
        self.calls.append((kernel, tuple(args)))


def recorded_launches(dtype, loss, kernel):
    from lorakern.testing import make_case

    rt = RecordingRuntime()
    m, n, r = 40, 30, 3
    problem, B, A = make_case((m, n, r), dtype, loss=loss, masked=True, seed=0, delta=0.8)
    data = SimpleNamespace(x=np.zeros((m, n), dtype), y=np.zeros((m, n), dtype) if LOSSES[loss].labels else None,
                           mask=np.ones((m, n), np.uint8))
    plan = launch.Plan(rt, problem, r, kernel)
    out, flag = np.zeros(5), np.ones(1, np.int32)
    plan.fused(data, B, A)
    plan.fused(data, B, A, grad=False)
    plan.tail(B, A, out, grad_B=B, grad_A=A, B_out=B, A_out=A, counter=flag, ok_in=flag, ok_out=flag)
    plan.finish(out, counter=flag)
    launch.update(rt, launch.update_kernel(rt, dtype), B, A, B, A, B, A, eta_ptr=np.zeros(1))
    launch.linear_pointwise(rt, launch.linear_pointwise_kernel(rt, dtype, LOSSES[loss]), B, B, None, 0.8, B,
                            np.zeros(4))
    return rt.calls


C_TYPES = {np.dtype(np.int32): "int", np.dtype(np.int64): "long long", np.dtype(np.float64): "double",
           np.dtype(np.uint64): "unsigned long long"}


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="c++filt (binutils) not found")
@pytest.mark.parametrize("kernel", launch.KERNELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_arguments_match_the_compiled_parameters(cupy_standin, monkeypatch, dtype, kernel):
    """Each launch's arguments (fused passes, tail, finish, update, linear_pointwise) against
    the parameters NVRTC compiled (the mangled names, demangled): an array or a null pointer
    (np.uint64(0)) for each pointer, a NumPy scalar of the parameter's C type otherwise, which
    CuPy's kernel-argument conversion (cupy.cuda.function.CNumpyArray) takes and types alike."""
    from cupy._core import _scalar
    from cupy.cuda import function

    calls = recorded_launches(dtype, "logistic", kernel)
    assert len(calls) == 6
    by_code = {}  # the fused passes and the tail come from the Plan's source, the rest from fused.cu
    for name, _ in calls:
        source = launch.module_source(LOSSES["logistic"], kernel if "fused_pass" in name else "simt")
        by_code.setdefault(source, []).append(name)
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")  # NVRTC's front end names them; nothing written
    mangled = {}
    for code, names in by_code.items():
        module, _ = precompile.compile_module(code, tuple(dict.fromkeys(names)), "90", syntax_only=True)
        mangled.update(module.mapping)
    names = list(mangled)
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled[n] for n in names), text=True,
                               capture_output=True, check=True).stdout.splitlines()
    params = {n: [p.strip() for p in d[d.index("(") + 1:d.rindex(")")].split(",")] for n, d in zip(names, demangled)}
    for name, args in calls:
        assert len(args) == len(params[name]), (name, params[name])
        for i, (arg, param) in enumerate(zip(args, params[name])):
            where = f"{name} argument {i} ({param})"
            if param.endswith("*"):
                assert isinstance(arg, np.ndarray) or (isinstance(arg, np.uint64) and arg == 0), where
                continue
            assert isinstance(arg, np.generic), f"{where}: {type(arg).__name__}, not a NumPy scalar"
            assert C_TYPES.get(arg.dtype) == param, f"{where}: {arg.dtype}"
            assert _scalar.get_typename(arg.dtype) == param, where
            function.CNumpyArray(arg)  # what RawKernel.__call__ makes of a NumPy scalar
