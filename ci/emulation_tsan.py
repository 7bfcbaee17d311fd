"""ThreadSanitizer over the CUDA host emulation: data races between barriers fail.

The emulation (lorakern/_cuda/emulation.h) runs each CUDA thread as a fiber; in a process with
the TSan runtime loaded, every fiber is a TSan fiber and every barrier orders exactly what a
__syncthreads orders, so a module built with -fsanitize=thread reports what a GPU would race
on: two threads of a block touching the same shared or global memory between two barriers,
one of them writing. This script, run by .ci/run after the test suite:

  1. shows that it catches races: small kernels that race (through shared memory, through
     global memory) and fused.cu with one barrier removed must fail under TSan, and the small
     kernel with its barrier must not;
  2. runs fused.cu through the launcher on a few small shapes (every code path: 16-byte and
     scalar copies, one and two B buffers, labels and a mask, several blocks and super-tiles,
     the loss-only pass, the tail, finish, update and the on-device loop), each checked against
     the NumPy reference, with TSan watching;
  3. the same for the tensor-core pass (fused_mma.cu, launch.KERNEL = "mma"), after showing
     that it too fails with one of its barriers removed.

Each part runs in a child Python started with the TSan runtime preloaded
(LD_PRELOAD=$(g++ -print-file-name=libtsan.so)) and, where ``setarch -R`` works, without
address-space randomisation (some kernels' randomisation is wider than TSan's memory map).
Exit status 0 when everything holds. A few minutes on 2 cores, most of it compiling.

    python ci/emulation_tsan.py            # all of it
    python ci/emulation_tsan.py races      # part 1 only
    python ci/emulation_tsan.py mma        # part 3 only
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

TSAN_EXIT = 66
FLAGS = ["-fsanitize=thread", "-g"]
TIMEOUT = 120.0  # seconds a barrier may wait: TSan makes everything 5-15x slower

RACY = r"""
// each thread writes its slot, then reads its neighbour's: with the barrier, a clean kernel;
// without it, thread t's read races with thread t + 1's write
__global__ void neighbour(float* out, int sync)
{
    float* s = reinterpret_cast<float*>(lk_dynamic_smem());
    s[threadIdx.x] = (float)threadIdx.x;
    if (sync) __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// every thread of the block adds to the same global word: a race between threads
__global__ void global_sum(float* out)
{
    out[0] += 1.0f;
}
"""


# ---- the children (run under TSan) -----------------------------------------------------------
def child_race(which: str):
    import numpy as np

    from lorakern._cuda.emulation import HostRuntime

    rt = HostRuntime(flags=FLAGS, timeout=TIMEOUT)
    module = rt.module(RACY, ("neighbour", "global_sum"))
    out = rt.xp.zeros(256, np.float32)
    if which == "clean":
        rt.launch(rt.kernel(module, "neighbour", 0), 2, (out, np.int32(1)), 4 * 256)
        assert (out == (rt.xp.arange(256) + 1) % 256).all()
    elif which == "shared":
        rt.launch(rt.kernel(module, "neighbour", 0), 2, (out, np.int32(0)), 4 * 256)
    else:
        rt.launch(rt.kernel(module, "global_sum", 0), 1, (out,))


#: a barrier of fused.cu that the race check removes: without it, phase 3's reads of the G
#: tile race with the writes of the split scratch that shares its memory
BARRIER = "            __syncthreads();  // G tile no longer read: the work area becomes the split scratch\n"


def child_fused_without_barrier():
    from lorakern._cuda import launch

    source = launch.kernel_source()
    assert source.count(BARRIER) == 1, "fused.cu changed: update BARRIER"
    launch._SOURCE = source.replace(BARRIER, "")
    child_fused(cases=1)


#: a barrier of fused_mma.cu the race check removes: without it the grad_B flush's writes into
#: the tile's A buffer race with the reads of phase 3's split sums kept there
MMA_BARRIER = "                    __syncthreads();  // w = 0: phase 3's sums read; else: warp column w - 1 added\n"


def child_mma_without_barrier():
    from lorakern._cuda import launch

    source = launch.mma_kernel_source()
    assert source.count(MMA_BARRIER) == 1, "fused_mma.cu changed: update MMA_BARRIER"
    launch.mma_kernel_source = lambda: source.replace(MMA_BARRIER, "")
    child_fused(cases=1, kernel="mma")


def child_fused(cases=None, kernel=None):
    import numpy as np

    from lorakern.testing import assert_close, compare_pass, make_case

    import lorakern
    from lorakern import reference
    from lorakern._cuda import CudaDevice, launch
    from lorakern._cuda import matrix as kernels
    from lorakern._cuda.emulation import HostRuntime

    if kernel is not None:
        launch.KERNEL = kernel
    device = CudaDevice("cuda-emulated-tsan", runtime=HostRuntime(flags=FLAGS, timeout=TIMEOUT))
    #: (m, n, r), dtype, loss, masked, (tiles, rows per block, cols per block) or None (default)
    all_cases = [
        ((37, 101, 5), np.float32, "squared", False, (((32, 32),), 2, 3)),  # scalar copies, 2 blocks
        ((40, 64, 8), np.float32, "huber", True, (((32, 32),), 2, 2)),      # 16-byte copies, mask
        ((33, 70, 16), np.float64, "logistic", True, None),                # labels, default tiles
        ((40, 36, 33), np.float64, "squared", False, (((32, 32),), 1, 2)),  # RK 64: one B buffer
        ((100, 40, 5), np.float32, "squared", True, (((32, 32),), 3, 1)),   # rows one tile long
    ]
    for shape, dtype, loss, masked, tiles in all_cases[:cases]:
        start = time.perf_counter()
        saved = launch.TILES, launch.ROWS_PER_BLOCK, launch.COLS_PER_BLOCK
        if tiles is not None:
            launch.TILES, launch.ROWS_PER_BLOCK, launch.COLS_PER_BLOCK = tiles
        try:
            problem, B, A = make_case(shape, dtype, loss=loss, masked=masked, seed=sum(shape), delta=0.5)
            compare_pass(problem, B, A, device)
            data = problem.data(device, kernels)
            got = float(kernels.loss_pass(problem, data, B, A))
            assert_close(got, reference.loss_pass(problem, None, B, A), dtype, "loss_pass")
            fit = lorakern.fit(problem, B, A, steps=2, device=device, step_size="theorem")  # run_steps: pass and tail
            want = lorakern.fit(problem, B, A, steps=2, device="reference", step_size="theorem")
            assert_close(fit.history.loss, want.history.loss, dtype, "history.loss", 10)
            assert_close(device.to_host(fit.B), want.B, dtype, "B", 10)
        finally:
            launch.TILES, launch.ROWS_PER_BLOCK, launch.COLS_PER_BLOCK = saved
        print(f"  {launch.KERNEL}: {'x'.join(map(str, shape))} {np.dtype(dtype).name} {loss}"
              f"{' masked' if masked else ''}: "
              f"matches the reference, no race ({time.perf_counter() - start:.1f} s)", flush=True)


# ---- the parent ----------------------------------------------------------------------------------
def tsan_library() -> str:
    gxx = shutil.which(os.environ.get("CXX", "g++"))
    if gxx is None:
        sys.exit("emulation_tsan: g++ not found")
    path = subprocess.run([gxx, "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        sys.exit(f"emulation_tsan: g++ has no ThreadSanitizer runtime (libtsan.so: {path!r}); "
                 f"install it (Debian/Ubuntu: libtsan2 or the gcc package that ships it)")
    return path


def run_child(args, tsan: str) -> subprocess.CompletedProcess:
    import lorakern

    # the child imports the lorakern this process imports (the installed one in CI)
    package_root = str(Path(lorakern.__file__).resolve().parents[1])
    env = {**os.environ, "LD_PRELOAD": tsan,
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
           "TSAN_OPTIONS": f"halt_on_error=1 exitcode={TSAN_EXIT} report_signal_unsafe=0"}
    cmd = [sys.executable, __file__, "--child", *args]
    if shutil.which("setarch") and subprocess.run(["setarch", platform.machine(), "-R", "true"],
                                                  capture_output=True).returncode == 0:
        cmd = ["setarch", platform.machine(), "-R", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)


def check_races(tsan: str) -> bool:
    ok = True
    clean = run_child(["clean"], tsan)
    if clean.returncode != 0 or "ThreadSanitizer" in clean.stderr:
        print(f"FAIL: the kernel with its barrier should pass under TSan (exit {clean.returncode}):\n"
              f"{clean.stderr[-4000:]}")
        ok = False
    else:
        print("  the neighbour kernel with its __syncthreads: no race reported")
    for which in ("shared", "global"):
        proc = run_child([which], tsan)
        if proc.returncode != TSAN_EXIT or "ThreadSanitizer: data race" not in proc.stderr:
            print(f"FAIL: the {which}-memory race was not caught (exit {proc.returncode}):\n"
                  f"{proc.stderr[-4000:]}")
            ok = False
        else:
            where = next((line.strip() for line in proc.stderr.splitlines() if "#0" in line), "")
            print(f"  a race through {which} memory: caught by TSan ({where})")
    return expect_race(tsan, "fused-without-barrier", "fused.cu without the barrier before the split scratch") and ok


def expect_race(tsan: str, part: str, what: str) -> bool:
    """The child `part` (a kernel file with one barrier removed) must stop on a TSan data race."""
    proc = run_child([part], tsan)
    if proc.returncode != TSAN_EXIT or "ThreadSanitizer: data race" not in proc.stderr:
        print(f"FAIL: {what}: the race was not caught (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return False
    where = [line.strip() for line in proc.stderr.splitlines() if "#0" in line][:2]
    print(f"  {what}: caught by TSan ({'; '.join(where)})")
    return True


def check_fused(tsan: str, part: str = "fused") -> bool:
    proc = run_child([part], tsan)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        print(f"FAIL: {part} under TSan (exit {proc.returncode}):\n{proc.stderr[-8000:]}")
        return False
    return True


def check_mma(tsan: str) -> bool:
    ok = expect_race(tsan, "mma-without-barrier", "fused_mma.cu without the barrier before the grad_B flush")
    return check_fused(tsan, "fused-mma") and ok


def main(argv):
    if argv[:1] == ["--child"]:
        if argv[1] == "fused":
            child_fused()
        elif argv[1] == "fused-without-barrier":
            child_fused_without_barrier()
        elif argv[1] == "fused-mma":
            child_fused(kernel="mma")
        elif argv[1] == "mma-without-barrier":
            child_mma_without_barrier()
        else:
            child_race(argv[1])
        return 0
    parts = argv or ["races", "fused", "mma"]
    tsan = tsan_library()
    start = time.perf_counter()
    ok = True
    if "races" in parts:
        print("ThreadSanitizer catches races in emulated kernels:", flush=True)
        ok &= check_races(tsan)
    if "fused" in parts:
        print("fused.cu under ThreadSanitizer:", flush=True)
        ok &= check_fused(tsan)
    if "mma" in parts:
        print("fused_mma.cu (the tensor-core pass) under ThreadSanitizer:", flush=True)
        ok &= check_mma(tsan)
    print(f"emulation_tsan: {'ok' if ok else 'FAILED'} ({time.perf_counter() - start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
