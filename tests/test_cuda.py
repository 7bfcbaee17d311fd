"""The CUDA backend against the NumPy reference.

Every test runs on two runtimes of the same launcher (lorakern/_cuda/launch.py):

* ``gpu``: the kernels compiled by NVRTC and run through CuPy. Skipped unless a runtime probe
  finds CuPy and a CUDA device (``cuda_available``), never by reading an error message.
* ``emulated``: the same fused.cu compiled by g++ for the host, one OS thread per CUDA thread
  and a barrier for __syncthreads (``HostRuntime`` below). It checks the index arithmetic,
  tail handling, shared-memory layout and the order of every reduction without a GPU; it
  cannot check timing, races the scheduler happens to hide, or the PTX paths (cp.async).
  Only small shapes run there.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import lorakern
from lorakern import _dispatch, reference
from lorakern._cuda import launch

from helpers import assert_bitwise, assert_close


def cuda_available() -> bool:
    """True if CuPy imports and the CUDA runtime reports at least one device."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


CUDA = cuda_available()
GXX = shutil.which("g++")
requires_gpu = pytest.mark.skipif(not CUDA, reason="no CUDA device (CuPy runtime probe)")

# fit trajectories against the CPU backend, step for step: rounding differences compound over
# the steps, so RTOL (helpers.py, the one tolerance table) times this factor
FIT_FACTOR = {np.dtype(np.float32): 20.0, np.dtype(np.float64): 100.0}


# ---- host emulation of the kernels ----------------------------------------------------------
EMULATION_HEADER = r"""
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#define LORAKERN_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) alignas(n)
using std::exp; using std::fabs; using std::fmax; using std::fmin; using std::log1p; using std::sqrt;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emu_barrier = nullptr;
inline unsigned char* emu_smem = nullptr;
inline unsigned emu_smem_bytes = 0;
inline unsigned char* lk_dynamic_smem() { return emu_smem; }
inline unsigned lk_dynamic_smem_size() { return emu_smem_bytes; }
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
[[noreturn]] inline void __trap() { std::fprintf(stderr, "emulated kernel: __trap()\n"); std::abort(); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }
"""

EMULATION_LAUNCHER = r"""
template <typename... Args, std::size_t... I>
void emu_call(void (*k)(Args...), void** args, std::index_sequence<I...>) {
    k(*reinterpret_cast<std::remove_cv_t<Args>*>(args[I])...);
}
// grid blocks run one after another; the block's threads are OS threads meeting at a barrier.
// Shared memory is filled with 0xff bytes (NaN) before every block: reading what no thread
// wrote shows up in the results.
// each parameter as (kind, size): kind 'p' pointer, 'f' floating point, 'i' integer
template <typename... Args>
int emu_signature(void (*)(Args...), char* kinds, int* sizes) {
    int i = 0;
    ((kinds[i] = std::is_pointer_v<Args> ? 'p' : std::is_floating_point_v<Args> ? 'f' : 'i',
      sizes[i++] = (int)sizeof(Args)), ...);
    return i;
}
template <typename... Args>
void emu_launch(void (*k)(Args...), unsigned grid, unsigned block, unsigned smem, void** args) {
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{block, 1, 1};
    std::barrier<> bar(block);
    emu_barrier = &bar;
    // exactly `smem` bytes (a multiple of 128 here), so AddressSanitizer sees any overrun
    emu_smem = static_cast<unsigned char*>(std::aligned_alloc(128, smem ? (smem + 127) / 128 * 128 : 128));
    emu_smem_bytes = smem;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([&, t] {
            threadIdx = dim3{t, 1, 1};
            for (unsigned b = 0; b < grid; ++b) {
                if (t == 0) std::memset(emu_smem, 0xff, smem);
                bar.arrive_and_wait();
                blockIdx = dim3{b, 1, 1};
                emu_call(k, args, std::index_sequence_for<Args...>{});
                bar.arrive_and_wait();
            }
        });
    for (auto& th : threads) th.join();
    std::free(emu_smem);
}
"""


class HostRuntime:
    """launch.py's runtime interface, with fused.cu compiled by g++ for the host."""

    name = "host-emulation"
    supports_graphs = False
    xp = np
    sm_count = 3
    max_smem_per_block = 227 * 1024
    CACHE = Path(tempfile.gettempdir()) / "lorakern-cuda-emulation"

    def __init__(self):
        self._modules: dict = {}

    def module(self, code: str, names: tuple[str, ...]):
        key = (code, names)
        if key not in self._modules:
            self._modules[key] = self._build(code, names)
        return self._modules[key]

    def _build(self, code, names):
        wrappers = "\n".join(
            f'extern "C" void emu_kernel_{i}(unsigned g, unsigned b, unsigned s, void** a) '
            f"{{ emu_launch(&{name}, g, b, s, a); }}\n"
            f'extern "C" int emu_signature_{i}(char* k, int* s) {{ return emu_signature(&{name}, k, s); }}'
            for i, name in enumerate(names))
        source = EMULATION_HEADER + code + EMULATION_LAUNCHER + wrappers + "\n"
        flags = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-w"]
        # e.g. "-fsanitize=address" (then run python with LD_PRELOAD=$(g++ -print-file-name=libasan.so))
        flags += os.environ.get("LORAKERN_EMULATION_FLAGS", "").split()
        digest = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:20]
        self.CACHE.mkdir(exist_ok=True)
        lib = self.CACHE / f"{digest}.so"
        if not lib.exists():
            src = self.CACHE / f"{digest}.cpp"
            src.write_text(source)
            tmp = self.CACHE / f"{digest}.{os.getpid()}.so"
            subprocess.run([GXX, *flags, str(src), "-o", str(tmp)], check=True)
            tmp.replace(lib)
        dll = ctypes.CDLL(str(lib))
        functions = {}
        for i, name in enumerate(names):
            f = getattr(dll, f"emu_kernel_{i}")
            f.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
            f.restype = None
            kinds, sizes = ctypes.create_string_buffer(64), (ctypes.c_int * 64)()
            count = getattr(dll, f"emu_signature_{i}")(kinds, sizes)
            functions[name] = SimpleNamespace(
                call=f, name=name, signature=[(kinds.raw[j:j + 1].decode(), sizes[j]) for j in range(count)])
        return SimpleNamespace(dll=dll, functions=functions)

    def kernel(self, module, name, smem):
        return module.functions[name]

    def occupancy(self, kernel, smem):
        return 1

    def launch(self, kernel, grid, args, smem=0):
        """Marshal args as CuPy would, checking each against the kernel's parameter types (a
        wrong integer width would pass here by luck and break on the GPU)."""
        assert len(args) == len(kernel.signature), f"{kernel.name}: {len(args)} arguments"
        keep, pointers = [], []
        for i, (a, (kind, size)) in enumerate(zip(args, kernel.signature)):
            where = f"{kernel.name} argument {i}"
            if isinstance(a, np.ndarray):
                assert kind == "p", f"{where}: an array for a {kind!r} parameter"
                assert a.flags.c_contiguous, f"{where}: kernels take C-contiguous arrays"
                value = np.array(a.ctypes.data, dtype=np.uint64)
            else:
                assert isinstance(a, np.generic), f"{where}: {type(a).__name__}"
                if kind == "p":
                    assert a.dtype == np.uint64 and a == 0, f"{where}: a pointer must be an array or null"
                else:
                    assert (a.dtype.kind == "f") == (kind == "f"), f"{where}: {a.dtype} for a {kind!r} parameter"
                    assert a.dtype.itemsize == size, f"{where}: {a.dtype} for a {size}-byte parameter"
                value = np.array(a)
            keep.append(value)
            pointers.append(value.ctypes.data)
        argv = (ctypes.c_void_p * len(pointers))(*pointers)
        kernel.call(grid, launch.NT, smem, argv)

    @staticmethod
    def to_host(x):
        return x


_HOST = HostRuntime() if GXX else None

RUNTIMES = [
    pytest.param("gpu", marks=requires_gpu),
    pytest.param("emulated", marks=pytest.mark.skipif(GXX is None, reason="g++ not found")),
]


@pytest.fixture(params=RUNTIMES)
def cuda(request, monkeypatch):
    """The CUDA backend on one runtime; to_host copies a result back."""
    if request.param == "gpu":
        rt = launch.CupyRuntime()
    else:
        rt = _HOST
    monkeypatch.setattr(launch, "RUNTIME", rt)
    monkeypatch.setattr(launch, "_UPDATE_KERNELS", {})
    monkeypatch.setitem(_dispatch._loaded, "cuda", lorakern._cuda)  # step/fit reach it by name
    return SimpleNamespace(name=request.param, rt=rt, backend=lorakern._cuda, xp=rt.xp,
                           emulated=request.param == "emulated",
                           to_host=lambda x: np.asarray(rt.to_host(x)))


def small_blocks(monkeypatch, tiles=((32, 32),), rows=1, cols=1):
    """Tiles and super-tiles patched small: small shapes cross tile edges and many blocks."""
    monkeypatch.setattr(launch, "TILES", tiles)
    monkeypatch.setattr(launch, "ROWS_PER_BLOCK", rows)
    monkeypatch.setattr(launch, "COLS_PER_BLOCK", cols)


# ---- problems ---------------------------------------------------------------------------------
def make_problem(m, n, r, dtype, *, loss="squared", masked=False, seed=0, lipschitz=None):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    W0 = rng.standard_normal((m, n)).astype(dtype)
    if loss == "logistic":
        Y = np.where(rng.random((m, n)) < 0.5, -1.0, 1.0).astype(dtype)
    else:
        Y = (W0 + rng.standard_normal((m, n))).astype(dtype)
    mask = rng.random((m, n)) < 0.7 if masked else None
    problem = lorakern.Problem(W0, Y, loss=loss, mask=mask, delta=0.8, lipschitz=lipschitz)
    B = (rng.standard_normal((m, r)) / math.sqrt(m)).astype(dtype)
    A = (rng.standard_normal((r, n)) / math.sqrt(n)).astype(dtype)
    return problem, B, A


def same_bits(actual, expected, name):
    """assert_bitwise for scalars and strided columns too."""
    assert_bitwise(np.ascontiguousarray(np.atleast_1d(actual)),
                   np.ascontiguousarray(np.atleast_1d(expected)), name)


def check_pass(cuda, problem, B, A):
    data = problem.data(cuda.backend)
    xp = cuda.xp
    p = cuda.backend.fused_pass(problem, data, xp.asarray(B), xp.asarray(A))
    want = reference.fused_pass(problem, None, B, A)
    dtype = problem.dtype
    assert cuda.to_host(p.grad_B).dtype == dtype
    assert_close(cuda.to_host(p.grad_B), want.grad_B, dtype, "grad_B")
    assert_close(cuda.to_host(p.grad_A), want.grad_A, dtype, "grad_A")
    for name in ("loss", "g_sq", "grad_sq", "v_sq"):
        assert_close(float(getattr(p, name)), getattr(want, name), dtype, name)
    return p


# ---- equivalence with the reference -------------------------------------------------------------
EMULATED_SHAPES = [(1, 1, 1), (37, 101, 5), (64, 32, 8), (33, 70, 16), (40, 36, 19)]
GPU_SHAPES = EMULATED_SHAPES + [(257, 263, 17), (300, 260, 128), (1024, 1000, 16), (129, 4097, 4)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("blocks", ["small", "default"])
def test_fused_pass_matches_reference(cuda, monkeypatch, dtype, shape, blocks):
    if cuda.emulated and (shape not in EMULATED_SHAPES or blocks == "default" and shape[0] > 40):
        pytest.skip("large shapes run on the GPU only")
    if blocks == "small":
        small_blocks(monkeypatch, rows=2, cols=3)
    check_pass(cuda, *make_problem(*shape, dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", sorted(lorakern.LOSSES))
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_every_loss_and_mask(cuda, monkeypatch, dtype, loss, masked):
    small_blocks(monkeypatch)
    shape = (37, 101, 5) if cuda.emulated else (257, 263, 17)
    problem, B, A = make_problem(*shape, dtype, loss=loss, masked=masked, seed=3)
    check_pass(cuda, problem, B, A)
    got = cuda.backend.loss_pass(problem, problem.data(cuda.backend), cuda.xp.asarray(B), cuda.xp.asarray(A))
    assert_close(float(got), reference.loss_pass(problem, None, B, A), dtype, "loss_pass")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ranks_up_to_128(cuda, monkeypatch, dtype):
    small_blocks(monkeypatch, tiles=launch.TILES, rows=1, cols=2)
    for r in ([3, 33, 128] if cuda.emulated else [1, 3, 4, 9, 31, 33, 64, 100, 128]):
        check_pass(cuda, *make_problem(40, 36, r, dtype, seed=r))
    with pytest.raises(ValueError, match="ranks up to 128"):
        check_pass(cuda, *make_problem(4, 4, 129, dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unaligned_rows_and_b_zero(cuda, monkeypatch, dtype):
    """n not a multiple of 4 (scalar loads), B = 0 as LoRA starts, a 1-row and a 1-column problem."""
    small_blocks(monkeypatch)
    for m, n, r in [(1, 77, 3), (45, 1, 2), (35, 66, 6)]:
        problem, B, A = make_problem(m, n, r, dtype)
        check_pass(cuda, problem, np.zeros_like(B), A)


def test_logistic_large_margins_stay_finite(cuda, monkeypatch):
    small_blocks(monkeypatch)
    problem, B, A = make_problem(37, 45, 3, np.float64, loss="logistic")
    problem.W0 *= 300.0  # |Z| in the hundreds
    p = check_pass(cuda, problem, B, A)
    assert np.isfinite(float(p.loss))


def test_all_true_mask_equals_no_mask(cuda, monkeypatch):
    small_blocks(monkeypatch)
    problem, B, A = make_problem(37, 50, 5, np.float32)
    masked = lorakern.Problem(problem.R, np.zeros_like(problem.R), mask=np.ones(problem.shape, bool))
    xp = cuda.xp
    a = cuda.backend.fused_pass(problem, problem.data(cuda.backend), xp.asarray(B), xp.asarray(A))
    b = cuda.backend.fused_pass(masked, masked.data(cuda.backend), xp.asarray(B), xp.asarray(A))
    for name in ("grad_B", "grad_A", "loss", "g_sq", "grad_sq", "v_sq"):
        same_bits(cuda.to_host(getattr(a, name)), cuda.to_host(getattr(b, name)), name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_repeated_runs_are_bit_identical(cuda, monkeypatch, dtype):
    small_blocks(monkeypatch, rows=2, cols=2)
    shape = (37, 101, 5) if cuda.emulated else (1024, 1000, 16)
    problem, B, A = make_problem(*shape, dtype)
    data, xp = problem.data(cuda.backend), cuda.xp
    runs = [cuda.backend.fused_pass(problem, data, xp.asarray(B), xp.asarray(A)) for _ in range(3)]
    for name in ("grad_B", "grad_A", "loss", "g_sq", "grad_sq", "v_sq"):
        first = cuda.to_host(getattr(runs[0], name))
        for other in runs[1:]:
            same_bits(cuda.to_host(getattr(other, name)), first, f"{name} (repeated run)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_rounds_like_numpy(cuda, dtype):
    rng = np.random.default_rng(1)
    B, A = rng.standard_normal((37, 5)).astype(dtype), rng.standard_normal((5, 41)).astype(dtype)
    gB, gA = rng.standard_normal(B.shape).astype(dtype), rng.standard_normal(A.shape).astype(dtype)
    eta = 0.0123456789
    want = reference.update(B, A, gB, gA, eta)
    xp = cuda.xp
    for e in (eta, xp.asarray(eta)):  # a number, and a 0-d device array
        got = cuda.backend.update(xp.asarray(B), xp.asarray(A), xp.asarray(gB), xp.asarray(gA), e)
        same_bits(cuda.to_host(got[0]), want[0], "B")
        same_bits(cuda.to_host(got[1]), want[1], "A")


# ---- step, fit and the on-device loop -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("step_size", ["theorem", 0.05, "armijo"])
def test_step_matches_reference(cuda, monkeypatch, dtype, step_size):
    small_blocks(monkeypatch)
    problem, B, A = make_problem(37, 60, 4, dtype, lipschitz=0.5)
    got = lorakern.step(problem, B, A, device="cuda", step_size=step_size)
    want = reference.step(problem, B, A, step_size=step_size)
    for name in ("eta", "loss", "grad_sq", "v_sq", "g_norm"):
        assert isinstance(getattr(got, name), float), name
        assert_close(getattr(got, name), getattr(want, name), dtype, name)
    assert_close(cuda.to_host(got.B), want.B, dtype, "new B")
    assert_close(cuda.to_host(got.A), want.A, dtype, "new A")
    assert got.trials == want.trials
    assert type(got.B) is type(cuda.xp.empty(0))  # results stay on the device


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_fit_matches_cpu_step_for_step(cuda, monkeypatch, dtype, loss):
    small_blocks(monkeypatch, rows=2, cols=1)
    shape, steps = ((37, 45, 3), 6) if cuda.emulated else ((257, 263, 17), 40)
    problem, B, A = make_problem(*shape, dtype, loss=loss, masked=loss == "logistic")
    got = lorakern.fit(problem, B, A, steps=steps, device="cuda")
    want = lorakern.fit(problem, B, A, steps=steps, device="cpu")
    assert got.steps == want.steps == steps
    factor = FIT_FACTOR[np.dtype(dtype)]
    for name in ("loss", "eta", "grad_sq", "v_sq", "g_norm"):
        assert_close(getattr(got.history, name), getattr(want.history, name), dtype,
                     f"history.{name}", factor)
    assert_close(cuda.to_host(got.B), want.B, dtype, "B", factor)
    assert_close(got.final_loss, want.final_loss, dtype, "final_loss", factor)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eta", [None, 0.02])
def test_run_steps_equals_fit_bit_for_bit(cuda, monkeypatch, dtype, eta):
    """The graph-replayed loop computes exactly what fit computes through the backend."""
    small_blocks(monkeypatch, rows=1, cols=2)
    monkeypatch.setattr(lorakern.descent, "DEVICE_LOOP", False)  # fit's step-by-step loop
    shape, steps = ((37, 45, 3), 5) if cuda.emulated else ((257, 263, 17), 25)
    problem, B, A = make_problem(*shape, dtype)
    fit = lorakern.fit(problem, B, A, steps=steps, device="cuda",
                       step_size="theorem" if eta is None else eta)
    data = problem.data(cuda.backend)
    run = cuda.backend.run_steps(problem, data, B, A, steps, eta=eta)
    assert run.diverged_at is None
    for i, name in enumerate(["loss", "g_sq", "grad_sq", "v_sq", "eta"]):
        if name == "g_sq":  # fit records g_norm = sqrt(g_sq)
            same_bits(np.sqrt(run.history[:, i]), fit.history.g_norm, "g_norm")
        else:
            same_bits(run.history[:, i], getattr(fit.history, name), name)
    same_bits(cuda.to_host(run.B), cuda.to_host(fit.B), "B")
    same_bits(cuda.to_host(run.A), cuda.to_host(fit.A), "A")
    one = cuda.backend.fused_step(problem, data, cuda.xp.asarray(B), cuda.xp.asarray(A), eta=eta)
    assert float(one.loss) == fit.history.loss[0] and float(one.eta) == fit.history.eta[0]


def test_run_steps_keeps_last_finite_iterate(cuda, monkeypatch):
    small_blocks(monkeypatch)
    problem, B, A = make_problem(20, 24, 3, np.float64, seed=5)
    with pytest.warns(RuntimeWarning, match="stopped being finite"):
        fit = lorakern.fit(problem, B, A, steps=40, device="cuda", step_size=50.0)
    run = cuda.backend.run_steps(problem, problem.data(cuda.backend), B, A, 40, eta=50.0)
    assert run.diverged_at is not None
    assert fit.steps == run.diverged_at - 1
    same_bits(cuda.to_host(run.B), cuda.to_host(fit.B), "B")
    same_bits(cuda.to_host(run.A), cuda.to_host(fit.A), "A")


# ---- GPU only -----------------------------------------------------------------------------------
@requires_gpu
def test_cupy_inputs_stay_and_numpy_inputs_copy_once():
    import cupy

    problem, B, A = make_problem(64, 80, 4, np.float32)
    on_gpu = lorakern.Problem(cupy.asarray(problem.R), cupy.zeros(problem.shape, np.float32))
    data = on_gpu.data(lorakern._cuda)
    assert data.x.data.ptr == on_gpu.R.data.ptr  # no copy
    first = problem.data(lorakern._cuda)
    assert isinstance(first.x, cupy.ndarray) and problem.data(lorakern._cuda) is first
    result = lorakern.step(on_gpu, cupy.asarray(B), cupy.asarray(A))  # device="auto" picks cuda
    assert isinstance(result.B, cupy.ndarray)


SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


@requires_gpu
def test_steps_do_not_wait_for_the_host():
    """Behind a kernel that keeps the GPU busy for ~1 s, the host issues 30 steps of fit's loop
    body (fused pass, theorem eta, update) long before the GPU gets to them."""
    import cupy

    problem, B, A = make_problem(512, 512, 8, np.float32)
    backend = lorakern._cuda
    data = problem.data(backend)
    B, A = cupy.asarray(B), cupy.asarray(A)
    policy = lorakern.Theorem()

    def steps(B, A, count):
        for _ in range(count):
            p = backend.fused_pass(problem, data, B, A)
            eta, _ = policy.choose(backend, problem, data, B, A, p, {})
            B, A = backend.update(B, A, p.grad_B, p.grad_A, eta)
        return B, A

    steps(B, A, 2)  # compile, load modules and fill the memory pool first
    backend.run_steps(problem, data, B, A, 2)
    cupy.cuda.Device().synchronize()
    spin = cupy.RawKernel(SPIN, "spin")
    clock_khz = cupy.cuda.runtime.getDeviceProperties(0).get("clockRate") or 1_500_000
    spin((1,), (1,), (np.int64(clock_khz * 1e3),))  # about one second
    start = time.perf_counter()
    B, A = steps(B, A, 30)
    issued = time.perf_counter() - start
    cupy.cuda.Device().synchronize()
    waited = time.perf_counter() - start
    assert issued < 0.5 * waited, f"issuing took {issued:.3f} s of {waited:.3f} s: something synchronised"


# ---- without a GPU ------------------------------------------------------------------------------
def test_missing_cupy_raises_device_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` fails, find_spec says absent
    with pytest.raises(lorakern.DeviceUnavailableError, match=r'pip install "lorakern\[cuda\]"'):
        lorakern._cuda.check_available()


def test_importing_the_backend_does_not_import_cupy():
    code = ("import sys, lorakern, lorakern._cuda, lorakern._cuda.launch; "
            "assert 'cupy' not in sys.modules, 'cupy imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without a usable GPU")
def test_cuda_device_unavailable_here():
    monkey = _dispatch._loaded.pop("cuda", None)
    try:
        with pytest.raises(lorakern.DeviceUnavailableError):
            lorakern.step(*make_problem(4, 4, 1, np.float32), device="cuda")
        assert "cuda" not in lorakern.devices()
    finally:
        if monkey is not None:
            _dispatch._loaded["cuda"] = monkey


@pytest.mark.parametrize("step_size", ["theorem", 0.02, 50.0])
def test_fit_device_loop_equals_host_loop(cuda, monkeypatch, step_size):
    """fit's device-side loop (run_steps) and its step-by-step loop agree bit for bit,
    divergence (eta = 50) included."""
    small_blocks(monkeypatch, rows=1, cols=2)
    shape, steps = ((37, 45, 3), 6) if cuda.emulated else ((257, 263, 17), 30)
    if step_size == 50.0:
        steps = 40  # enough for the loss to overflow
    problem, B, A = make_problem(*shape, np.float64)
    results = []
    for device_loop in (True, False):
        monkeypatch.setattr(lorakern.descent, "DEVICE_LOOP", device_loop)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            results.append(lorakern.fit(problem, B, A, steps=steps, device="cuda",
                                        step_size=step_size))
    on_device, on_host = results
    assert (on_device.steps, on_device.status) == (on_host.steps, on_host.status)
    assert on_host.status == ("diverged" if step_size == 50.0 else "completed")
    for name in ("loss", "eta", "grad_sq", "v_sq", "g_norm"):
        same_bits(getattr(on_device.history, name), getattr(on_host.history, name), name)
    same_bits(cuda.to_host(on_device.B), cuda.to_host(on_host.B), "B")
    same_bits(cuda.to_host(on_device.A), cuda.to_host(on_host.A), "A")
    assert on_device.final_loss == on_host.final_loss
