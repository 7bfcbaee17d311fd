"""Compile every NVRTC module a GPU run asks for, in parallel processes, into CuPy's kernel cache.

Command line (needs CuPy and NVRTC; a GPU only where no ``--arch`` is given)::

    python -m lorakern._cuda.precompile [--jobs N] [--arch sm_80|sm_90] [--list] [--dry-run]

* ``--arch``: the architecture to compile for; default the GPU's (as CuPy picks it: its compute
  capability, capped at what this NVRTC knows). Without a GPU an explicit arch is required.
* ``--jobs``: worker processes (default: every core, ``os.cpu_count()``).
* ``--list``: print the modules (one label a line: dtype, loss, mask, rank bound, tile...) and
  their count, compile nothing.
* ``--dry-run``: NVRTC's front end only (``-fdevice-syntax-only``: every template instance is
  parsed, instantiated and named, no code generated; static_asserts fire), one program per
  distinct source holding the name expressions of all its modules, in memory
  (``CUPY_CACHE_IN_MEMORY=1``): nothing is written to the cache. Seconds for the whole list
  instead of minutes; what CI can afford.

It prints one progress line (rewritten in place on a terminal) and, last, one summary line::

    precompile: 284 modules for sm_90 in 31.4 s on 16 processes: 280 compiled, 4 cached, 0 failed

and exits 1 if a module failed (its NVRTC log is printed). The modules are
``launch.all_modules(arch)``: the single list of what a GPU run asks for (every Plan at the tile
the launcher picks on that architecture and at the tiles and copy stages the tests and
benchmarks/gpu_probe.py patch in, update and linear_pointwise); a module compiled here is a
cache hit for ``launch.CupyRuntime`` in every later process (CuPy 13: the cubin plus our
``lorakern-*.names.json``; CuPy 14: CuPy's own entry, mangled names included). Where a GPU is
present the summary ends with ``loader check: hit``: one module loaded through CupyRuntime in
this process without compiling (``MISS`` would mean the keys differ: report it).

Python API (for ci/gpu.sh's helpers)::

    from lorakern._cuda import launch, precompile
    report = precompile.precompile(list(launch.all_modules("sm_90")), jobs=16, arch="sm_90")
    # report: {"modules", "compiled", "cached", "failed": [(label, log)], "seconds", "arch", "jobs"}

``modules`` is any list of (label, code, names) as ``launch.all_modules`` yields them (extra
modules such as gpu_probe.py's ``(label, launch.warp_source() + PROBE_SOURCE, NAMES)`` may be
appended: the runtime compiles ``launch.keyed_source(code, names)`` with ``launch.OPTIONS``, and so
does this). A GPU script should run it first, with its own time limit (about
``modules x 1.7 s / jobs`` + 10 s of start-up on an H100 machine's CPUs; measured numbers in
benchmarks/NOTES.md), then run the steps that load the modules.

How it compiles without a GPU: the workers call CuPy's own compile path
(``cupy._core.core.compile_with_cache``, what ``cupy.RawModule`` calls, with CuPy's options and an
explicit ``arch``) after ``compile_only`` has replaced the two steps of it that need a driver:
loading the cubin into a CUDA module (kept as bytes instead) and the per-device memo of the
``-arch`` option (the undecorated function is called). No worker creates a CUDA context.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import types
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_all_start_methods, get_context

from . import launch

#: NVRTC's option for the dry run: front end only (parse, instantiate, name; no code)
SYNTAX_ONLY = "-fdevice-syntax-only"


def arch_number(arch: str) -> str:
    """"sm_90" -> "90" (the form CuPy's compiler takes and keys its cache by)."""
    digits = str(arch).removeprefix("sm_").removeprefix("compute_")
    if not digits.isdigit():
        raise ValueError(f"arch is like 'sm_90', got {arch!r}")
    return digits


def compile_only(compiler, setattr=setattr) -> None:
    """Make CuPy's compile path usable without a GPU in this process: ``function.Module.load``
    keeps the cubin as bytes (``module.image``) instead of loading it into a CUDA context, and
    the ``-arch`` option is computed by the undecorated function instead of its per-device memo
    (which asks the driver for the current device). Everything else (the cache key, NVRTC, the
    cache file) is CuPy's own. Raises RuntimeError where this CuPy lacks what it replaces."""
    real = compiler.function
    if getattr(real, "_lorakern_compile_only", False):
        return
    arch_option = getattr(compiler._get_arch_for_options_for_nvrtc, "__wrapped__", None)
    if arch_option is None or not hasattr(real.Module, "load"):
        raise RuntimeError("this CuPy's compiler has no undecorated _get_arch_for_options_for_nvrtc "
                           "or function.Module.load: precompile needs a GPU here")

    class HostModule(real.Module):
        """function.Module whose load keeps the image (no CUDA context)."""

        def load(self, cubin):
            self.image = bytes(cubin)

    shim = types.ModuleType(real.__name__)
    shim.__dict__.update(vars(real))
    shim.Module, shim._lorakern_compile_only = HostModule, True
    setattr(compiler, "function", shim)
    setattr(compiler, "_get_arch_for_options_for_nvrtc", arch_option)


def count_nvrtc(compiler, setattr=setattr) -> list:
    """Count NVRTC compiles of non-empty sources in this process from now on (wraps the real
    compiler._NVRTCProgram.compile; CuPy's empty-file probe, once per option set, is not
    counted): returns the list each compile appends to."""
    calls: list = []
    program = compiler._NVRTCProgram
    real = program.compile

    def compile(self, *args, **kwargs):
        if getattr(self, "src", ""):
            calls.append(1)
        return real(self, *args, **kwargs)

    setattr(program, "compile", compile)
    return calls


def compile_module(code: str, names, arch: str, syntax_only: bool = False):
    """Compile one module as CupyRuntime would load it, for ``arch`` ("90"), through CuPy's
    compile path (after compile_only): (module, compiled: bool). On CuPy 13 the mangled names are
    recorded beside the cubin (launch.write_names), and a module already there is not
    compiled again."""
    from cupy._core import core
    from cupy.cuda import compiler

    source = launch.keyed_source(code, names)
    options = launch.OPTIONS + ((SYNTAX_ONLY,) if syntax_only else ())
    native = launch.caches_name_expressions(compiler)
    path = None if native or syntax_only else launch.names_path(launch.cupy_cache_dir(compiler), source, names)
    calls = getattr(compiler, "_lorakern_nvrtc_calls", None)
    start = len(calls) if calls is not None else 0
    mangled = launch.read_names(path, names)
    if mangled is not None:  # CuPy 13, compiled before: its cubin (no name expressions) must hold them
        module = core.compile_with_cache(source, options, arch=arch, prepend_cupy_headers=False)
        image = getattr(module, "image", b"")
        if all(m.encode() in image for m in mangled.values()):
            return module, calls is not None and len(calls) > start
    module = core.compile_with_cache(source, options, arch=arch, prepend_cupy_headers=False,
                                     name_expressions=tuple(names))
    mapping = module.mapping
    missing = [n for n in names if not mapping or not mapping.get(n)]
    if missing:
        raise RuntimeError(f"NVRTC named no kernel for {missing}")
    if path is not None:
        launch.write_names(path, {n: str(mapping[n]) for n in names})
    compiled = True if calls is None else len(calls) > start
    return module, compiled


# ---- the worker processes --------------------------------------------------------------------
def _worker_init(syntax_only: bool):
    if syntax_only:
        os.environ["CUPY_CACHE_IN_MEMORY"] = "1"
    from cupy.cuda import compiler

    compile_only(compiler)
    try:
        compiler._lorakern_nvrtc_calls = count_nvrtc(compiler)
    except AttributeError:  # no _NVRTCProgram to count: every module reported as compiled
        pass


def _worker(task):
    """One task: (label, code, names, arch, syntax_only, modules it stands for) -> (label,
    "compiled" | "cached" | "failed", seconds, message, modules, CPU seconds)."""
    label, code, names, arch, syntax_only, count = task
    start, cpu = time.perf_counter(), time.process_time()  # NVRTC runs in this process: its CPU time
    try:
        _, compiled = compile_module(code, names, arch, syntax_only)
        status, message = ("compiled" if compiled or syntax_only else "cached"), ""
    except Exception as exc:  # noqa: BLE001 - reported with the module's label
        status, message = "failed", f"{type(exc).__name__}: {exc}"
    return label, status, time.perf_counter() - start, message, count, time.process_time() - cpu


def device_arch() -> str | None:
    """"sm_XY" of the current GPU as CuPy compiles for it, or None without a usable GPU."""
    from . import _driver_problem

    if _driver_problem() is not None:
        return None
    try:
        from cupy.cuda import compiler

        return f"sm_{compiler._get_arch()}"
    except Exception:  # noqa: BLE001 - no usable device
        return None


def loader_check(module) -> str:
    """Load one precompiled module through CupyRuntime (a GPU is here): "hit" or "MISS"."""
    label, code, names = module
    rt = launch.CupyRuntime()
    rt.module(code, names)
    return "hit" if rt.compiles == 0 else f"MISS ({label} compiled again)"


def precompile(modules=None, jobs: int | None = None, arch: str | None = None, *,
               syntax_only: bool = False, progress=None) -> dict:
    """Compile ``modules`` ((label, code, names); default launch.all_modules(arch)) for ``arch``
    ("sm_80", "sm_90"; default the GPU's) in ``jobs`` processes (default os.cpu_count()) into
    CuPy's kernel cache. ``syntax_only``: NVRTC's front end only, nothing written (the dry
    run). ``progress``: a stream for the progress line (None: none). Returns {"modules",
    "compiled", "cached", "failed": [(label, message)], "seconds", "arch", "jobs", "per_module":
    {label: wall seconds}, "cpu_per_module": {label: CPU seconds of its worker}}."""
    started = time.perf_counter()
    if arch is None:
        arch = device_arch()
        if arch is None:
            raise RuntimeError("no GPU here: give the architecture to compile for (arch='sm_90')")
    number = arch_number(arch)
    if modules is None:
        modules = list(launch.all_modules(f"sm_{number}" if f"sm_{number}" in launch.SMEM_LIMITS else "sm_90"))
    modules = list(modules)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(modules) or 1))
    report = {"modules": len(modules), "compiled": 0, "cached": 0, "failed": [], "arch": f"sm_{number}",
              "jobs": jobs, "per_module": {}, "cpu_per_module": {}}
    if syntax_only:  # one front-end program per distinct source, holding every name of its modules
        groups: dict = {}
        for label, code, names in modules:
            groups.setdefault(code, ([], {}))
            groups[code][0].append(label)
            groups[code][1].update(dict.fromkeys(names))
        tasks = [(f"{len(labels)} modules from {labels[0]}", code, tuple(names), number, True, len(labels))
                 for code, (labels, names) in groups.items()]
    else:
        tasks = [(label, code, tuple(names), number, False, 1) for label, code, names in modules]
    jobs = max(1, min(jobs, len(tasks)))
    report["jobs"] = jobs
    # fork where there is one (no `if __name__ == "__main__"` needed in the caller's script):
    # the workers make no CUDA call (compile_only), so a CUDA context of this process does not
    # matter to them
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(jobs, mp_context=get_context(method), initializer=_worker_init,
                             initargs=(syntax_only,)) as pool:
        futures = [pool.submit(_worker, task) for task in tasks]
        for done, future in enumerate(as_completed(futures), 1):
            label, status, seconds, message, count, cpu = future.result()
            report["per_module"][label] = seconds
            report["cpu_per_module"][label] = cpu
            if status == "failed":
                report["failed"].append((label, message))
            else:
                report[status] += count
            if progress is not None and getattr(progress, "isatty", lambda: False)():
                progress.write(f"\rprecompile: {done}/{len(tasks)} modules, {len(report['failed'])} failed, "
                               f"{time.perf_counter() - started:.0f} s")
                progress.flush()
    if progress is not None and getattr(progress, "isatty", lambda: False)():
        progress.write("\n")
    report["seconds"] = time.perf_counter() - started
    return report


def summary(report: dict, syntax_only: bool = False) -> str:
    what = "checked (front end only)" if syntax_only else "compiled"
    return (f"precompile: {report['modules']} modules for {report['arch']} in {report['seconds']:.1f} s on "
            f"{report['jobs']} processes: {report['compiled']} {what}, {report['cached']} cached, "
            f"{len(report['failed'])} failed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakern._cuda.precompile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: every core)")
    parser.add_argument("--arch", default=None, help="sm_80 or sm_90 (default: the GPU's)")
    parser.add_argument("--list", action="store_true", help="print the modules and compile nothing")
    parser.add_argument("--dry-run", action="store_true",
                        help="NVRTC's front end only, nothing written to the cache")
    args = parser.parse_args(argv)

    arch = args.arch
    if not args.list and importlib.util.find_spec("cupy") is None:
        print('precompile: CuPy is not installed (pip install ".[cuda]" in a clone of lorakern)',
              file=sys.stderr)
        return 2
    if arch is None and not args.list:
        arch = device_arch()
        if arch is None:
            print("precompile: no GPU here: give --arch sm_80 or --arch sm_90", file=sys.stderr)
            return 2
    listed = f"sm_{arch_number(arch)}" if arch else "sm_90"
    if listed not in launch.SMEM_LIMITS:
        print(f"precompile: the GPU run's modules are listed for {tuple(launch.SMEM_LIMITS)}; "
              f"using sm_90's list for {listed}", file=sys.stderr)
        listed = "sm_90"
    modules = list(launch.all_modules(listed))
    if args.list:
        for label, _, _ in modules:
            print(label)
        print(f"{len(modules)} modules for {listed}")
        return 0
    report = precompile(modules, args.jobs, arch, syntax_only=args.dry_run, progress=sys.stderr)
    for label, message in report["failed"]:
        print(f"FAILED {label}: {message}", file=sys.stderr)
    line = summary(report, args.dry_run)
    if not args.dry_run and device_arch() is not None and modules and not report["failed"]:
        try:
            line += f"; loader check: {loader_check(modules[0])}"
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            line += f"; loader check failed: {type(exc).__name__}: {exc}"
    print(line, flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
