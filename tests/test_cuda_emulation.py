"""The CUDA host emulation itself (lorakern/_cuda/emulation.py, emulation.h): that it catches
what it is there to catch. Each check runs a small kernel, or fused.cu with one line moved,
that is wrong on purpose, and expects the wrong results or the error a GPU would not give.

ThreadSanitizer: ci/emulation_tsan.py (run by .ci/run) builds the emulation with
-fsanitize=thread, shows that a racy kernel fails, and runs fused.cu on a few shapes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import lorakern
from lorakern import LOSSES, reference
from lorakern._cuda import emulation, launch
from lorakern._cuda.emulation import EmulationError, HostRuntime

from helpers import assert_close, make_case

pytestmark = pytest.mark.skipif(not emulation.available(), reason="g++ not found")

NT = launch.NT
#: the emulated device's array namespace: kernels take its arrays, not host NumPy arrays
dev = emulation.XP

# Small kernels on the emulation's own primitives and on fused.cu's copy helpers (the module
# is the loss prelude + fused.cu, as the launcher builds it, then these).
PROBES = r"""
// each thread: 16 bytes to shared memory by fused.cu's copy_async; out[t] read before the
// wait, out[NT + t] after it, out[2 NT + t] the zero fill of a 4-byte partial copy
__global__ void copy_probe(const float* g, float* out)
{
    float* s = reinterpret_cast<float*>(lk_dynamic_smem());
    const int t = threadIdx.x;
    lorakern::copy_async<16>(s + 8 * t, g + 4 * t, 16);
    lorakern::copy_async<16>(s + 8 * t + 4, g + 4 * t, 4);
    lorakern::copy_async_commit();
    out[t] = s[8 * t];
    lorakern::copy_async_wait_all();
    out[NT + t] = s[8 * t];
    out[2 * NT + t] = s[8 * t + 5];
}

// two commit groups: wait_group(1) lands the older only
__global__ void group_probe(const float* g, float* out)
{
    float* s = reinterpret_cast<float*>(lk_dynamic_smem());
    const int t = threadIdx.x;
    lk_emu::copy_async(s + 8 * t, g + 4 * t, 16, 16);
    lk_emu::copy_async_commit();
    lk_emu::copy_async(s + 8 * t + 4, g + 4 * t, 16, 16);
    lk_emu::copy_async_commit();
    lk_emu::copy_async_wait_group(1);
    out[t] = s[8 * t];
    out[NT + t] = s[8 * t + 4];
    lk_emu::copy_async_wait_group(0);
    out[2 * NT + t] = s[8 * t + 4];
}

// a copy to a misaligned or an out-of-range shared address
__global__ void bad_copy(const float* g, int offset)
{
    lorakern::copy_async<16>(lk_dynamic_smem() + offset, g, 16);
    lorakern::copy_async_wait_all();
}

// copies never waited for
__global__ void no_wait(const float* g)
{
    lorakern::copy_async<16>(lk_dynamic_smem() + 16 * threadIdx.x, g, 16);
    lorakern::copy_async_commit();
}

// half the threads skip a barrier
__global__ void skip_barrier(float* out)
{
    if (threadIdx.x < NT / 2) __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// two barriers on different lines, taken by different threads
__global__ void split_barrier(float* out)
{
    if (threadIdx.x % 2) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// the last thread comes to the barrier `delay` seconds late (a stand-in for a deadlock)
__global__ void late_thread(float* out, double delay)
{
    if (threadIdx.x == NT - 1) {
        const auto start = std::chrono::steady_clock::now();
        while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < delay)
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

__global__ void trap_in_block_1(float* out)
{
    if (blockIdx.x == 1 && threadIdx.x == 5) __trap();
    __syncthreads();
    out[blockIdx.x * NT + threadIdx.x] = 1.0f;
}

// shared memory no thread of this block wrote reads NaN
__global__ void unwritten_smem(float* out)
{
    float* s = reinterpret_cast<float*>(lk_dynamic_smem());
    if (blockIdx.x == 0) s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[blockIdx.x * NT + threadIdx.x] = s[threadIdx.x];
}

// each thread writes its slot, then reads its neighbour's; `sync`: with the barrier between
__global__ void neighbour(float* out, int sync)
{
    float* s = reinterpret_cast<float*>(lk_dynamic_smem());
    s[threadIdx.x] = (float)threadIdx.x;
    if (sync) __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % NT];
}

// block 0 raises a flag the other blocks read in the same launch: a cross-block race
__global__ void cross_block_flag(int* flag, int* out)
{
    if (blockIdx.x == 0 && threadIdx.x == 0) flag[0] = 1;
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = flag[0];
}

// an argument list to check the launcher's marshalling against
__global__ void typed(float* out, int i, long long j, double x)
{
    if (threadIdx.x == 0) out[0] = (float)(i + j + x);
}
"""

PROBE_NAMES = ("copy_probe", "group_probe", "bad_copy", "no_wait", "skip_barrier", "split_barrier",
               "late_thread", "trap_in_block_1", "unwritten_smem", "neighbour", "typed", "cross_block_flag")


def probes_source() -> str:
    return ("#include <chrono>\n#include <thread>\n" + launch.module_source(LOSSES["squared"])
            + "\nusing lorakern::NT;\n" + PROBES)


@pytest.fixture(scope="module")
def rt():
    return HostRuntime(timeout=1.0)


@pytest.fixture(scope="module")
def probes(rt):
    module = rt.module(probes_source(), PROBE_NAMES)
    return {name: rt.kernel(module, name, 0) for name in PROBE_NAMES}


def nan_bits(x):
    """True where x holds the poison the emulation writes (all bytes 0xff)."""
    return np.asarray(x).view(np.uint32) == 0xFFFFFFFF


# ---- cp.async: deferred copies --------------------------------------------------------------------
def test_copy_lands_at_the_wait(rt, probes):
    g = dev.arange(1, 4 * NT + 1, dtype=np.float32)
    out = dev.zeros(3 * NT, np.float32)
    rt.launch(probes["copy_probe"], 1, (g, out), 8 * 4 * NT)
    assert nan_bits(out[:NT]).all(), "read before the wait must see the poison"
    np.testing.assert_array_equal(out[NT:2 * NT], g[::4])
    np.testing.assert_array_equal(out[2 * NT:], 0.0)  # a 4-byte copy of 16 zero-fills the rest


def test_wait_group_lands_older_groups_only(rt, probes):
    g = dev.arange(1, 4 * NT + 1, dtype=np.float32)
    out = dev.zeros(3 * NT, np.float32)
    rt.launch(probes["group_probe"], 1, (g, out), 8 * 4 * NT)
    np.testing.assert_array_equal(out[:NT], g[::4])
    assert nan_bits(out[NT:2 * NT]).all(), "the newest group must not have landed at wait_group(1)"
    np.testing.assert_array_equal(out[2 * NT:], g[::4])


@pytest.mark.parametrize("offset, match", [(4, "misaligned destination"),
                                           (1024, "outside the block's dynamic shared memory")])
def test_bad_copy_addresses(rt, probes, offset, match):
    g = dev.zeros(4, np.float32)
    with pytest.raises(EmulationError, match=match):
        rt.launch(probes["bad_copy"], 1, (g, np.int32(offset)), 1024)


def test_copies_never_waited_for(rt, probes):
    with pytest.raises(EmulationError, match="never waited for"):
        rt.launch(probes["no_wait"], 1, (dev.zeros(4, np.float32),), 16 * NT)


WAIT = ("        copy_async_wait_all();\n"
        "        __syncthreads();  // this tile's copies visible; every thread is done with the previous tile\n")
LOOP_END = "        }\n    }\n\n    __syncthreads();  // the work area is free\n"


def mutated_fused(monkeypatch, old: str, new: str):
    """fused.cu with one piece of text replaced, for the launcher to compile."""
    source = launch.kernel_source()
    assert source.count(old) == 1, "fused.cu changed: update this test's text"
    monkeypatch.setattr(launch, "_SOURCE", source.replace(old, new))


def emulated_pass(problem, B, A):
    """A fused pass on a fresh emulated device (so no plan of the unmodified source is reused)."""
    device = lorakern._cuda.CudaDevice("cuda-emulated-test", runtime=HostRuntime())
    engine = lorakern._dispatch.bind(problem, device)
    return engine.fused_pass(engine.asarray(B), engine.asarray(A))


def test_fused_pass_reading_before_its_wait_goes_wrong(monkeypatch, small_tiles):
    """fused.cu with the wait for a tile's copies moved to the end of that tile's work: tile 0
    is read before its copies land, so the pass sees NaN (on a GPU it would read stale or
    half-copied data, or, by luck, the right values)."""
    problem, B, A = make_case((37, 101, 5), np.float32, seed=1)
    good = emulated_pass(problem, B, A)
    assert_close(good.grad_B, reference.fused_pass(problem, None, B, A).grad_B, np.float32, "grad_B")
    mutated_fused(monkeypatch, WAIT, "        __syncthreads();\n")
    text = launch.kernel_source()
    monkeypatch.setattr(launch, "_SOURCE", text.replace(LOOP_END, LOOP_END.replace(
        "        }\n    }\n", "        }\n        copy_async_wait_all();\n    }\n", 1), 1))
    assert launch.kernel_source().count("        copy_async_wait_all();\n    }\n\n    __syncthreads();") == 1
    bad = emulated_pass(problem, B, A)
    assert not np.isfinite(float(bad.loss)) and not np.isfinite(bad.grad_B).all()


def test_fused_pass_without_its_wait_fails(monkeypatch, small_tiles):
    """fused.cu with the wait for a tile's copies dropped: the copies never land."""
    problem, B, A = make_case((37, 101, 5), np.float64, seed=2)
    mutated_fused(monkeypatch, WAIT, "        __syncthreads();\n")
    with pytest.raises(EmulationError, match="cp.async copies issued by thread .* never waited for"):
        emulated_pass(problem, B, A)


# ---- barriers ------------------------------------------------------------------------------------
def line_of(text: str) -> int:
    """The line of probes_source() (the module's code) that holds `text`."""
    source = probes_source()
    return source[:source.index(text)].count("\n") + 1


def test_skipped_barrier_fails_at_once(rt, probes):
    start = time.perf_counter()
    line = line_of("if (threadIdx.x < NT / 2) __syncthreads();")
    with pytest.raises(EmulationError, match=rf"skip_barrier: threads of block 0 reached different barriers: "
                                             rf"thread\(s\) 0-127 wait at __syncthreads\(\) at module:{line}, "
                                             rf"thread\(s\) 128-255 reached the end of the kernel"):
        rt.launch(probes["skip_barrier"], 2, (dev.zeros(NT, np.float32),))
    assert time.perf_counter() - start < rt.timeout  # found by the check, not the timeout


def test_barriers_on_different_lines_fail(rt, probes):
    odd, even = line_of("__syncthreads();\n    } else {"), line_of("__syncthreads();\n    }\n    out")
    with pytest.raises(EmulationError, match=rf"thread\(s\) 0, 2, 4, .* \(128 threads\) wait at "
                                             rf"__syncthreads\(\) at module:{even}, thread\(s\) 1, 3, 5, .* "
                                             rf"\(128 threads\) wait at __syncthreads\(\) at module:{odd} "):
        rt.launch(probes["split_barrier"], 1, (dev.zeros(NT, np.float32),))


def test_barrier_times_out(rt, probes):
    """A thread that does not come to the barrier (here: 2 s late) fails the launch after the
    timeout (1 s), with a message naming it and the barrier the others wait at."""
    out = dev.zeros(NT, np.float32)
    rt.launch(probes["late_thread"], 1, (out, np.float64(0.2)))  # late, but within the timeout
    assert (out == 1).all()
    start = time.perf_counter()
    line = line_of("    __syncthreads();\n    out[threadIdx.x] = 1.0f;\n}\n\n__global__ void trap")
    with pytest.raises(EmulationError, match=rf"barrier timed out: thread 255 of block 0 ran for 1 s without "
                                             rf"reaching a barrier or the end of the kernel; 255 of 256 threads "
                                             rf"wait at __syncthreads\(\) at module:{line}"):
        rt.launch(probes["late_thread"], 1, (out, np.float64(2.0)))
    assert time.perf_counter() - start < 4.0  # the late thread still leaves in the grace period


def test_a_thread_that_never_comes_aborts_with_the_message(tmp_path):
    """A thread spinning forever cannot be stopped: after the timeout and a grace period the
    process ends with the message, instead of hanging."""
    code = (
        "import numpy as np\n"
        "from lorakern._cuda.emulation import HostRuntime\n"
        "rt = HostRuntime(timeout=0.5)\n"
        "src = 'extern volatile int lk_never; volatile int lk_never = 0;\\n'"
        " '__global__ void stuck(float* out) { if (threadIdx.x == 3) while (!lk_never) {} "
        "__syncthreads(); out[threadIdx.x] = 1; }'\n"
        "k = rt.kernel(rt.module(src, ('stuck',)), 'stuck', 0)\n"
        "rt.launch(k, 1, (rt.xp.zeros(256, np.float32),))\n")
    root = str(Path(lorakern.__file__).resolve().parents[1])
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode != 0
    assert "barrier timed out: thread 3 of block 0 ran for 0.5 s" in proc.stderr
    assert "3 of 256 threads wait at __syncthreads()" in proc.stderr
    assert "thread 3 is still running, aborting" in proc.stderr
    assert time.perf_counter() - start < 60


def test_trap_fails_with_where(rt, probes):
    with pytest.raises(EmulationError, match=r"__trap\(\) in thread 5 of block 1"):
        rt.launch(probes["trap_in_block_1"], 3, (dev.zeros(3 * NT, np.float32),))


def test_fused_pass_traps_on_too_little_shared_memory(monkeypatch):
    """The kernel checks the dynamic shared memory it is given against its own layout."""
    real = launch.smem_bytes
    monkeypatch.setattr(launch, "smem_bytes", lambda *a, **k: real(*a, **k) - 128)
    problem, B, A = make_case((7, 13, 3), np.float32, seed=3)
    with pytest.raises(EmulationError, match=r"fused_pass<float, 4, 64, 64, false, false, true>: "
                                             r"__trap\(\) in thread \d+ of block 0"):
        emulated_pass(problem, B, A)


def test_shared_memory_starts_as_nan_in_every_block(rt, probes):
    out = dev.zeros(2 * NT, np.float32)
    rt.launch(probes["unwritten_smem"], 2, (out,), 4 * NT)
    assert (out[:NT] == 1).all() and nan_bits(out[NT:]).all()


def test_missing_barrier_shows_in_the_results(rt, probes):
    """Without the barrier, a thread reads its neighbour's slot before the neighbour has run
    (threads of a phase run one after another): the poison, not the value. (ThreadSanitizer
    reports it as a race: ci/emulation_tsan.py.)"""
    out = dev.zeros(NT, np.float32)
    rt.launch(probes["neighbour"], 2, (out, np.int32(1)), 4 * NT)
    np.testing.assert_array_equal(out, (dev.arange(NT) + 1) % NT)
    rt.launch(probes["neighbour"], 2, (out, np.int32(0)), 4 * NT)
    assert nan_bits(out[:NT - 1]).all()


def test_a_cross_block_race_shows_in_the_block_order(probes):
    """Blocks run one after another, forward or in reverse (HostRuntime(block_order=...)): a
    block that reads what another block of the launch writes sees it under one order only."""
    seen = {}
    for order in ("forward", "reverse"):
        runtime = HostRuntime(timeout=1.0, block_order=order)
        kernel = runtime.kernel(runtime.module(probes_source(), PROBE_NAMES), "cross_block_flag", 0)
        flag, out = dev.zeros(1, np.int32), dev.zeros(4, np.int32)
        runtime.launch(kernel, 4, (flag, out))
        seen[order] = out.tolist()
    assert seen == {"forward": [1, 1, 1, 1], "reverse": [1, 0, 0, 0]}
    with pytest.raises(ValueError, match="block_order"):
        HostRuntime(block_order="random")


@pytest.mark.parametrize("kernel", launch.KERNELS)
def test_lorakern_kernels_do_not_depend_on_the_block_order(monkeypatch, kernel):
    """The fused passes, the tail (every block computes eta_t itself; ok and the norm shares
    alternate by step parity), the device loop through a divergence, and the linear kind's
    routes: the same bits with the blocks run forward and in reverse."""
    import lorakern
    from lorakern._cuda import CudaDevice
    from lorakern._cuda import linear as cuda_linear
    from lorakern._cuda import matrix
    from lorakern._dispatch import bind
    from lorakern.testing import make_case, random_linear_data

    monkeypatch.setattr(launch, "KERNEL", kernel)
    monkeypatch.setattr(launch, "TILES", ((32, 32),))
    monkeypatch.setattr(launch, "ROWS_PER_BLOCK", 1)
    monkeypatch.setattr(launch, "COLS_PER_BLOCK", 2)
    monkeypatch.setattr(cuda_linear, "ROW_TILE", 50)
    results = {}
    for order in ("forward", "reverse"):
        device = CudaDevice(f"cuda-{order}", runtime=HostRuntime(block_order=order))
        out = []
        # the last one diverges at step 4
        for loss, masked, eta in (("squared", True, None), ("logistic", False, 0.05), ("squared", False, 60.0)):
            problem, B, A = make_case((70, 90, 5), np.float64, loss=loss, masked=masked, seed=4, delta=0.5)
            run = matrix.run_steps(problem, problem.data(device, matrix), B, A, 6, eta_fixed=eta)
            out += [run.history, device.to_host(run.B), device.to_host(run.A)]
        rng = np.random.default_rng(7)
        for loss, strategy, norm in (("squared", "moments", "exact"), ("huber", "tiles", "exact"),
                                     ("logistic", "auto", "bound")):
            X, Y, W0 = random_linear_data(rng, 101, 23, 37, np.float32, loss=loss, w0_scale=0.2)
            problem = lorakern.LinearProblem(X, Y, W0, loss=loss, norm_strategy=strategy)
            engine = bind(problem, device)
            B = engine.asarray(0.3 * rng.standard_normal((37, 5)).astype(np.float32))
            A = engine.asarray(0.3 * rng.standard_normal((5, 23)).astype(np.float32))
            p = engine.fused_pass(B, A, norm=norm)
            out += [device.to_host(p.grad_B), device.to_host(p.grad_A), float(p.loss), float(p.g_sq)]
        results[order] = out
    for i, (a, b) in enumerate(zip(results["forward"], results["reverse"])):
        np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8),
                                      err_msg=f"item {i}")


def test_recovers_after_a_failure(rt, probes):
    """The launch after a failed one runs normally (the thread pool is left clean)."""
    with pytest.raises(EmulationError):
        rt.launch(probes["skip_barrier"], 1, (dev.zeros(NT, np.float32),))
    out = dev.zeros(3 * NT, np.float32)
    g = dev.arange(1, 4 * NT + 1, dtype=np.float32)
    rt.launch(probes["copy_probe"], 1, (g, out), 8 * 4 * NT)
    np.testing.assert_array_equal(out[NT:2 * NT], g[::4])


# ---- the launcher's argument checks -----------------------------------------------------------------
def test_arguments_are_checked(rt, probes):
    k, out = probes["typed"], dev.zeros(1, np.float32)
    rt.launch(k, 1, (out, np.int32(1), np.int64(2), np.float64(0.5)))
    assert out[0] == 3.5
    with pytest.raises(TypeError, match="argument 2: int32 for a 8-byte integer"):
        rt.launch(k, 1, (out, np.int32(1), np.int32(2), np.float64(0.5)))
    with pytest.raises(TypeError, match="argument 3: float32 for a 8-byte float"):
        rt.launch(k, 1, (out, np.int32(1), np.int64(2), np.float32(0.5)))
    with pytest.raises(TypeError, match="argument 1: an array for a 'i' parameter"):
        rt.launch(k, 1, (out, out, np.int64(2), np.float64(0.5)))
    with pytest.raises(TypeError, match="argument 1: int"):
        rt.launch(k, 1, (out, 1, np.int64(2), np.float64(0.5)))
    with pytest.raises(ValueError, match="C-contiguous"):
        rt.launch(k, 1, (dev.zeros(4, np.float32)[::2], np.int32(1), np.int64(2), np.float64(0.5)))
    with pytest.raises(TypeError, match="3 arguments for 4 parameters"):
        rt.launch(k, 1, (out, np.int32(1), np.int64(2)))


def test_emulated_device_is_for_tests_only():
    device = emulation.device()
    assert device is emulation.device() and device.name == "cuda-emulated"
    assert isinstance(device.runtime, HostRuntime) and not device.runtime.supports_graphs
    assert "cuda-emulated" not in lorakern.devices()
    assert "cuda-emulated" not in lorakern._dispatch.DEVICES
    with pytest.raises(ValueError, match="unknown device 'cuda-emulated'"):
        lorakern.step(*make_case((3, 4, 1), np.float64), device="cuda-emulated", step_size="theorem")
    assert isinstance(device, lorakern._dispatch.Device)


# ---- the device's arrays: what CuPy refuses, the emulation refuses -----------------------------
def test_device_array_refuses_a_host_array_as_cupy_does():
    """CuPy: ``device[...] = numpy_array`` raises ValueError("non-scalar numpy.ndarray cannot be
    used for fill"); run_steps did that with NumPy B, A and failed on the GPU only (issue 22).
    The emulated device's arrays refuse it the same way; scalars and device arrays go in."""
    host_B = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    d = dev.empty((5, 3), np.float32)
    assert isinstance(d, emulation.DeviceArray) and type(host_B) is np.ndarray
    with pytest.raises(ValueError, match="^non-scalar numpy.ndarray cannot be used for fill$"):
        d[...] = host_B
    with pytest.raises(ValueError, match="cannot be used for fill"):
        d[1:3] = host_B[1:3]
    d[...] = dev.asarray(host_B)  # the fix: copy to the device first
    np.testing.assert_array_equal(d.get(), host_B)
    d[0, 0] = np.float32(2.5)  # a scalar, a 0-d array and a Python number are scalars
    d[0, 1] = np.array(3.5, np.float32)
    d[0, 2] = 4.5
    assert d.get()[0].tolist() == [2.5, 3.5, 4.5]


def test_device_array_refuses_host_arrays_in_operations_and_launches(rt, probes):
    """Elementwise operations mixing device and host arrays fail (CuPy: TypeError, Unsupported
    type), kernels take device arrays only, and host copies leave through to_host / get."""
    host_x = np.arange(1.0, 4.0)
    d = dev.asarray(host_x)
    assert not np.shares_memory(d, host_x)  # a copy, as with CuPy
    with pytest.raises(TypeError, match="Unsupported type"):
        d + host_x
    with pytest.raises(TypeError, match="Unsupported type"):
        np.multiply(host_x, d)
    assert isinstance(d * 2.0, emulation.DeviceArray) and isinstance(dev.sqrt(d), emulation.DeviceArray)
    e = d
    e += d  # in place: the same array
    assert e is d and d.get().tolist() == [2.0, 4.0, 6.0]
    assert np.add(d, d, out=d) is d
    back = rt.to_host(d)
    assert type(back) is np.ndarray and not np.shares_memory(back, d)
    with pytest.raises(TypeError, match="argument 0: a host numpy.ndarray"):
        rt.launch(probes["skip_barrier"], 1, (np.zeros(NT, np.float32),))


def test_run_steps_takes_host_arrays():
    """The GPU failure of issue 22, on the emulated device: run_steps with NumPy B and A."""
    from lorakern._cuda import matrix

    problem, B, A = make_case((9, 11, 2), np.float64, seed=4)
    device = emulation.device()
    data = matrix.prepare(problem, device)
    run = matrix.run_steps(problem, data, B, A, 2, eta_fixed=0.01)
    assert type(B) is np.ndarray and run.diverged_at is None
    step = reference.fused_pass(problem, None, B, A)
    assert_close(rt_host(run.B_prev), B - 0.01 * step.grad_B, np.float64, "B after one step")


def rt_host(x):
    return emulation.HostRuntime.to_host(x)
