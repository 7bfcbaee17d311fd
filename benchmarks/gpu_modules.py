"""The NVRTC modules a run of ci/gpu.sh asks for, step by step, and their compile (its first step).

    python benchmarks/gpu_modules.py list                       # counts per step and kind
    python benchmarks/gpu_modules.py compile --jobs 16 [--warm-numba]
                                  # into CuPy's cache (on the GPU); --warm-numba: the Numba
                                  # kernels of the tests' CPU comparisons too, in parallel
    python benchmarks/gpu_modules.py compile --dry-run [--full] [--arch sm_90]
                                  # no GPU: NVRTC's front end (CuPy; --full: cubins) or nvcc
                                  # (one module of each kind); nothing cached

A module is one (source, name expressions) pair: one fused pass's instance (kernel, dtype, loss,
mask, rank bound, tile, copy stages) with its tail and finish, or update<T>, linear_pointwise<T>,
the probe kernels. NVRTC takes 1.3-2.5 s a module (measured here, 2026-12-07: simt 1.35 s, mma
fp32 2.3-2.5 s, mma fp64 1.6 s; NVRTC 13.5, sm_90), so the steps of ci/gpu.sh would spend minutes
compiling one module after another; the first step compiles them all at once over the machine's
cores into CuPy's disk cache, and the later steps load them from it (lorakern/_cuda/launch.py,
"compiled once per machine").

The list below mirrors what each step's code and tests ask for (the parameters of each test,
the probe's rows). It is written by hand from those files: a module it misses is not an error,
only ~2 s of NVRTC inside that step; ci/gpu.sh counts the files CuPy's cache gained during each
later step and prints the count, so a list that drifted shows in the run's log.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorakern import LOSSES  # noqa: E402
from lorakern._cuda import launch  # noqa: E402

#: shared memory a block may opt in to on an H100 / H200 (cudaDevAttrMaxSharedMemoryPerBlockOptin,
#: 227 KB; the emulation's HostRuntime.max_smem_per_block is the same): the tile choice's limit
HOPPER_SMEM = 227 * 1024
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
BOTH = (F32, F64)


def fused(kernel, dtype, loss, masked, rk, tiles=None, stages=None):
    """(label, code, names) of the fused pass's module as launch.Plan makes it, with launch.TILES
    = ``tiles`` and launch.MMA_STAGES = ``stages`` (None: the launcher's defaults), on Hopper."""
    dtype, lossobj = np.dtype(dtype), LOSSES[loss]
    saved = launch.TILES, launch.MMA_STAGES
    launch.TILES = launch.TILES if tiles is None else tiles
    launch.MMA_STAGES = launch.MMA_STAGES if stages is None else stages
    try:
        bm, bn, st = launch.choose_config(dtype.itemsize, rk, lossobj.labels, HOPPER_SMEM, kernel)
    finally:
        launch.TILES, launch.MMA_STAGES = saved
    names = tuple(launch.kernel_names(dtype, rk, bm, bn, lossobj.labels, masked, kernel, st).values())
    label = (f"{kernel} {dtype} {loss}{' masked' if masked else ''} rk={rk} tile={bm}x{bn}"
             f"{f' stages={st}' if kernel == 'mma' else ''}")
    return label, launch.module_source(lossobj, kernel), names


def update(dtype):
    name = f"lorakern::update<{launch._ctype(dtype)}>"
    return f"update {np.dtype(dtype)}", launch.module_source(LOSSES["squared"]), (name,)


def pointwise(dtype, loss):
    lossobj = LOSSES[loss]
    name = f"lorakern::linear_pointwise<{launch._ctype(dtype)}, {launch._flag(bool(lossobj.labels))}>"
    return f"linear_pointwise {np.dtype(dtype)} {loss}", launch.module_source(lossobj), (name,)


def bound(r, kernel):
    return launch.rank_bound(r, kernel)


SMALL = ((32, 32),)   # the tests' small_blocks tiles
WIDE = ((128, 64),)   # test_cuda_mma's and the timing's 128 x 64 fp32 tiles


def step_modules() -> dict[str, list]:
    """{step of ci/gpu.sh: [(label, code, names)]}, in the order the steps run."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_probe  # benchmarks/gpu_probe.py: its rows and probe kernels

    steps: dict[str, list] = {}
    # calibrate: the probe kernels (kernel_cache's module is compiled cold on purpose, in an
    # empty cache of its own: not listed)
    steps["calibrate"] = [("probe kernels", launch.warp_source() + gpu_probe.PROBE_SOURCE, gpu_probe.NAMES)]

    # timing: each row's plan with both kernels (make_case's squared loss, no mask; m does not
    # change the module), the knock-outs
    mods = []
    for _, r, dtype in gpu_probe.ROWS:
        for kernel in launch.KERNELS:
            mods.append(fused(kernel, dtype, "squared", False, bound(r, kernel)))
    for _, r, dtype in gpu_probe.KNOCKOUT_ROWS:
        mods.append(fused("mma", dtype, "squared", False, bound(r, "mma"), stages=(2,)))
    for _, r, dtype in gpu_probe.WIDE_ROWS:
        mods.append(fused("mma", dtype, "squared", False, bound(r, "mma"), tiles=WIDE))
    steps["timing"] = mods

    # linear: the sweep's plan on the N x m "matrix" (the loss, no mask; simt), the float64
    # moments plan (squared), linear_pointwise, update
    mods = []
    for _, _, r, dtype, loss in gpu_probe.LINEAR_ROWS:
        mods += [fused("simt", dtype, loss, False, bound(r, "simt")),
                 fused("simt", F64, "squared", False, bound(r, "simt")),
                 pointwise(dtype, loss), update(dtype)]
    steps["linear"] = mods

    # tests/test_cuda.py, the GPU cases (simt): squared at every rank bound on the small tiles
    # and the default ones (fused_pass_matches_reference, ranks_up_to_128, plan_geometry, ...),
    # logistic with a mask (fit_matches_cpu_step_for_step), update<T>
    mods = []
    for dtype in BOTH:
        for rk in launch.RANK_BOUNDS:
            mods += [fused("simt", dtype, "squared", False, rk, tiles=SMALL),
                     fused("simt", dtype, "squared", False, rk)]
        mods += [fused("simt", dtype, "logistic", True, bound(17, "simt"), tiles=SMALL), update(dtype)]
    steps["tests"] = mods

    # tests/test_cuda_mma.py -k gpu
    mods = []
    for dtype in BOTH:
        for r in (1, 5, 16, 19, 8, 3, 9, 17, 31, 33, 64, 100, 128):  # odd shapes, ranks, run_steps
            mods.append(fused("mma", dtype, "squared", False, bound(r, "mma"), tiles=SMALL))
        for loss in LOSSES:  # every loss and mask, rank 5
            for masked in (False, True):
                mods.append(fused("mma", dtype, loss, masked, 8, tiles=SMALL))
        for st in (3, 2):  # copy stages (MMA_STAGES = (stages, 2)), masked, ranks 5 and 100
            for r in (5, 100):
                mods.append(fused("mma", dtype, "squared", True, bound(r, "mma"), tiles=SMALL, stages=(st, 2)))
        mods.append(fused("mma", dtype, "huber", False, 16))  # default tiles
    for loss in LOSSES:  # fp32 accuracy, default tiles: mma and simt, rank 16, every loss
        for kernel in launch.KERNELS:
            mods.append(fused(kernel, F32, loss, False, bound(16, kernel)))
    for kernel in launch.KERNELS:  # high rank: r64 squared masked, r128 huber
        mods += [fused(kernel, F32, "squared", True, 64), fused(kernel, F32, "huber", False, 128)]
    for loss, masked in (("squared", True), ("logistic", False), ("huber", False)):  # 128 x 64
        for r in (3, 16, 29):
            for kernel in launch.KERNELS:
                mods.append(fused(kernel, F32, loss, masked, bound(r, kernel), tiles=WIDE))
    mods.append(fused("mma", F32, "squared", False, 8, tiles=WIDE))
    steps["mma-tests"] = mods

    # tests/test_dlpack.py, tests/test_torch.py -k cuda: small linear layers (squared, r 3-8)
    mods = []
    for dtype in BOTH:
        mods += [fused("simt", dtype, "squared", False, 4), fused("simt", dtype, "squared", False, 8),
                 pointwise(dtype, "squared"), update(dtype)]
    steps["torch"] = mods
    return steps


def unique(steps: dict) -> list:
    """Every module once, in the order of the steps (each step's new ones)."""
    seen, out = set(), []
    for mods in steps.values():
        for label, code, names in mods:
            if (code, names) not in seen:
                seen.add((code, names))
                out.append((label, code, names))
    return out


def sample(modules: list) -> list:
    """One module of each kind (the probe's; fused_pass, fused_pass_mma, update and
    linear_pointwise, each fp32 and fp64): what nvcc compiles in a dry run without CuPy."""
    kinds = {}
    for mod in modules:
        first = mod[2][0]
        kinds.setdefault((first.split("<")[0], "double" in first), mod)
    return list(kinds.values())


# ---- compiling ------------------------------------------------------------------------------------
def run_modules() -> list:
    """What the first step compiles: launch.all_modules("sm_90") (the launcher's single list of
    what a GPU run asks for) and this file's steps' modules beyond it (the probe's kernels; the
    simt pass on 128 x 64 tiles that test_cuda_mma's accuracy check runs beside the mma one)."""
    return unique({"launch.all_modules": list(launch.all_modules("sm_90")), **step_modules()})


def nvcc_compile(item, arch: str) -> float:
    """Compile one module with nvcc to a cubin, its instances pinned as name expressions pin
    them (tests/test_cuda_compile.py's way), with CuPy's -ftz=true; seconds taken."""
    label, code, names = item
    keep = "\n".join(f"__device__ void* lorakern_keep_{i} = (void*)&{name};" for i, name in enumerate(names))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "module.cu"
        src.write_text(f"{code}\n{keep}\n")
        proc = subprocess.run([shutil.which("nvcc"), "-cubin", f"-arch={arch}", *launch.OPTIONS, "-ftz=true",
                               str(src), "-o", str(Path(tmp) / "module.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {label}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def compile_modules(modules, jobs: int, arch: str | None, dry_run: bool, full: bool) -> tuple[list, str]:
    """([(label, problem)] of the failures, what was done). On the GPU: lorakern._cuda.precompile
    into CuPy's cache (the loader's own keys). Dry run: precompile's NVRTC front end (every
    instance parsed and named; ``full``: whole cubins) for ``arch`` where CuPy imports, nothing
    cached; else nvcc, one module of each kind; else nothing, said so."""
    try:
        from lorakern._cuda import precompile
        import cupy.cuda.compiler  # noqa: F401 - imports without a GPU
    except ImportError as exc:
        if not dry_run:
            return [("all", f"cannot precompile: {exc}")], "nothing"
        precompile = None
    if precompile is not None:
        arch = arch or ("sm_90" if dry_run else None)
        syntax_only = dry_run and not full
        report = precompile.precompile(modules, jobs, arch, syntax_only=syntax_only)
        line = precompile.summary(report, syntax_only)
        if not dry_run and not report["failed"]:  # one module through CupyRuntime: a cache hit?
            try:
                line += f"; loader check: {precompile.loader_check(modules[0])}"
            except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                line += f"; loader check failed: {type(exc).__name__}: {exc}"
        return report["failed"], line
    arch = arch or "sm_90"
    if shutil.which("nvcc"):
        todo = sample(modules)
        failed = []
        with ThreadPoolExecutor(max_workers=jobs) as pool:  # nvcc runs in its own processes
            futures = [(item[0], pool.submit(nvcc_compile, item, arch)) for item in todo]
            for label, future in futures:
                try:
                    future.result()
                except Exception as exc:  # noqa: BLE001 - every failure listed, then exit 1
                    failed.append((label, str(exc)))
        return failed, (f"no CuPy here: nvcc compiled {len(todo) - len(failed)} of {len(todo)} modules "
                        f"(one of each kind) for {arch}")
    return [], (f"no CuPy and no nvcc here: {len(modules)} modules listed, none compiled "
                f"(tests/test_cuda_compile.py compiles the sources where nvcc is)")


#: the Numba kernels (cache=True: the next process loads them) that the GPU steps' CPU
#: comparisons compile cold on a fresh machine (~30 s on one core): tests/test_cuda.py's
#: fit_matches_cpu_step_for_step (squared, logistic with a mask; fp32, fp64), the linear kind's
#: step on the CPU (tests/test_dlpack.py, tests/test_torch.py)
WARM_NUMBA = """
import numpy as np, lorakern
from lorakern.testing import make_case, random_linear_data
for dtype in (np.float32, np.float64):
    for loss, masked in (("squared", False), ("logistic", True)):
        problem, B, A = make_case((257, 263, 17), dtype, loss=loss, masked=masked, delta=0.8)
        lorakern.fit(problem, B, A, steps=2, device="cpu")
    rng = np.random.default_rng(0)
    X, Y, W0 = random_linear_data(rng, 13, 7, 5, np.dtype(dtype), loss="squared", w0_scale=0.3)
    B, A = (rng.standard_normal((5, 3)) / 3).astype(dtype), (rng.standard_normal((3, 7)) / 3).astype(dtype)
    lorakern.step(lorakern.LinearProblem(X, Y, W0), B, A, device="cpu")
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("list", "compile"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--arch", default=None, help="e.g. sm_90 (default: the GPU's; sm_90 in a dry run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: NVRTC's front end over every module (nvcc: a sample), nothing cached")
    parser.add_argument("--full", action="store_true", help="dry run: whole cubins, not the front end only")
    parser.add_argument("--warm-numba", action="store_true",
                        help="also fill Numba's cache with the CPU kernels the tests compare against")
    args = parser.parse_args(argv)
    steps = step_modules()
    modules = run_modules()
    if args.command == "list":
        for step, mods in steps.items():
            kinds: dict = {}
            for label, _, _ in mods:
                kind = " ".join(label.split()[:2])
                kinds[kind] = kinds.get(kind, 0) + 1
            print(f"{step}: {len(mods)} modules ({', '.join(f'{k} {v}' for k, v in kinds.items())})")
        print(f"the steps: {len(unique(steps))} distinct; with launch.all_modules('sm_90'): {len(modules)}")
        return 0
    t0 = time.perf_counter()
    numba = None
    if args.warm_numba and not args.dry_run:  # one more process beside the NVRTC jobs
        numba = subprocess.Popen([sys.executable, "-c", WARM_NUMBA], env={**os.environ, "PYTHONPATH": str(ROOT)})
    failed, how = compile_modules(modules, max(1, args.jobs), args.arch, args.dry_run, args.full)
    print(how, flush=True)
    for label, problem in failed:
        print(f"FAILED {label}: {str(problem)[-3000:]}")
    if numba is not None:
        rc = numba.wait()
        print(f"Numba's cache warmed (exit {rc}) in {time.perf_counter() - t0:.1f} s wall")
        if rc != 0:
            return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
