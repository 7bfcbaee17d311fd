"""GPU benchmarks (issue 3): the fused CUDA step against the step a CuPy or PyTorch user writes.

Groups (fp32):

* ``cuda step m=n={8192,16384} r={4,16,64} float32``: ``lorakern-cuda`` (fused_step: pass,
  eta and update on the device), ``lorakern-cuda-loop`` (the body of ``fit``'s loop: fused pass,
  the Theorem policy on 0-d device arrays, update), ``cupy`` (G = R + B@A; G@A.T; B.T@G; norms;
  eta; update, cuBLAS underneath) and ``torch`` (the same in PyTorch, where it has CUDA). All
  four come from ``lorakern.benchmarking.COMPARISONS``, the table the CPU benchmarks use, on
  ``lorakern.testing``'s seeded data; under --benchmark-disable each runs once at 512 x 512 and
  is checked against the NumPy reference (``benchmarking.check``).
* ``cuda fit 200 steps m=n=8192 r=16 float32``: ``lorakern.fit`` against 200 ``fused_step``
  calls and ``run_steps`` (the graph-replayed loop); each ends with one synchronisation.
* ``cuda floor``: device-to-device copy bandwidth and the fp32 FMA rate, from which
  benchmarks/gpu_table.py computes the floor of each step group.

Every timed call ends with a device synchronisation. Each benchmark also records in
``extra_info["event_ms"]`` the median of EVENT_ROUNDS CUDA-event timings of back-to-back runs
(launch overhead hidden, as in a training loop); gpu_table.py reports those medians.

Skipped without a CUDA device. ``ci/gpu.sh`` runs this file with --benchmark-enable.
"""
from __future__ import annotations

import importlib.util
import math
import statistics
from functools import lru_cache

import numpy as np
import pytest

from lorakern.benchmarking import COMPARISONS, Case, check, unavailable


def _cuda_available() -> bool:
    import lorakern

    return "cuda" in lorakern.devices()  # the backend's runtime probe: CuPy + a device


pytestmark = pytest.mark.skipif(not _cuda_available(), reason="no CUDA device (runtime probe)")

SIZES = (8192, 16384)
RANKS = (4, 16, 64)
DTYPE = "float32"
FIT_STEPS = 200
EVENT_ROUNDS = 20
#: the GPU implementations of lorakern.benchmarking.COMPARISONS (one table for CPU and GPU)
IMPLS = ("lorakern-cuda", "lorakern-cuda-loop", "cupy", "torch")
SMOKE_SIZE = 512  # --benchmark-disable: each implementation once at this size, checked


# ---- inputs: lorakern.testing's seeded factory, copied to the GPU once per case ------------------
@lru_cache(maxsize=1)
def case(m: int, n: int, r: int, dtype: str = DTYPE, seed: int = 0) -> Case:
    """The seeded Case (one at a time: 1 GB of R at 16384^2 fp32, and its GPU copies)."""
    return Case(m, n, r, dtype, seed)


def gpu_info() -> dict:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    info = {"gpu": name, "sm_count": props["multiProcessorCount"],
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cupy.cuda.runtime.driverGetVersion(), "cupy": cupy.__version__}
    if importlib.util.find_spec("torch") is not None:
        import torch

        info["torch"] = torch.__version__
    return info


def _torch_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def synchronize():
    import cupy

    cupy.cuda.Device().synchronize()
    if _torch_cuda():
        import torch

        torch.cuda.synchronize()


def event_ms(step, rounds: int = EVENT_ROUNDS) -> list[float]:
    """Device time of each of ``rounds`` back-to-back runs, by CUDA events on the current stream
    (PyTorch's kernels go to its own current stream: synchronise it too, the events then bound
    the work from the host's side)."""
    import cupy

    out = []
    for _ in range(rounds):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        step()
        if _torch_cuda():
            import torch

            torch.cuda.current_stream().synchronize()
        end.record()
        end.synchronize()
        out.append(cupy.cuda.get_elapsed_time(start, end))
    return out


def time_it(benchmark, step, group: str, impl: str, **info):
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, **info, **gpu_info())
    for _ in range(3):  # warm-up: compilation, plans, cuBLAS handles, memory pool
        step()
    synchronize()

    def timed():
        out = step()
        synchronize()
        return out

    if benchmark.disabled:
        return benchmark(timed)
    times = event_ms(step)
    benchmark.extra_info.update(event_ms=statistics.median(times), event_ms_all=times)
    return benchmark.pedantic(timed, rounds=EVENT_ROUNDS, warmup_rounds=1, iterations=1)


# ---- one step -----------------------------------------------------------------------------------
STEP_PARAMS = [pytest.param(m, r, impl, id=f"m{m}-r{r}-{impl}")
               for m in SIZES for r in RANKS for impl in IMPLS]


@pytest.mark.parametrize("m, r, impl", STEP_PARAMS)
def test_step(benchmark, m, r, impl):
    why = unavailable(impl)
    if why:
        pytest.skip(why)
    if benchmark.disabled:  # a smoke run: once, small, checked against the NumPy reference
        c = case(m, m, r).smaller(SMOKE_SIZE)
        step = COMPARISONS[impl](c)
        out = step()
        synchronize()
        check(impl, c, out)
        return
    c = case(m, m, r)
    out = time_it(benchmark, COMPARISONS[impl](c), f"cuda step m=n={m} r={r} {DTYPE}", impl,
                  m=m, n=m, r=r, dtype=DTYPE)
    if impl.startswith("lorakern"):
        from lorakern._dispatch import bind

        engine = bind(c.problem(), "cuda")
        benchmark.extra_info["launch"] = engine.kernels.kernel_info(engine.problem, engine.data, r)
    want = COMPARISONS["cupy"](c)()  # at full size the reference is too slow: eta against cupy's
    assert math.isclose(float(out[2]), float(want[2]), rel_tol=1e-4), "eta differs from the cupy step"


# ---- 200 steps: fit, single fused steps, the graph-replayed loop ---------------------------------
def _engine(c):
    from lorakern._dispatch import bind

    engine = bind(c.problem(), "cuda")
    return engine, engine.asarray(c.B), engine.asarray(c.A)


def _fit(c, steps):
    import lorakern

    _, B, A = _engine(c)
    return lambda: lorakern.fit(c.problem(), B, A, steps=steps, device="cuda", step_size="theorem")


def _single_steps(c, steps):
    engine, B0, A0 = _engine(c)
    fused_step = engine.kernels.fused_step

    def run():
        B, A = B0, A0
        for _ in range(steps):
            s = fused_step(engine.problem, engine.data, B, A)
            B, A = s.B, s.A
        return B, A

    return run


def _run_steps(c, steps):
    engine, B, A = _engine(c)
    return lambda: engine.kernels.run_steps(engine.problem, engine.data, B, A, steps)


@pytest.mark.parametrize("impl", ["fit", "fused_step x200", "run_steps"])
def test_fit_200_steps(benchmark, impl):
    c = case(8192, 8192, 16)
    if benchmark.disabled:
        c = c.smaller(SMOKE_SIZE)
    setup = {"fit": _fit, "fused_step x200": _single_steps, "run_steps": _run_steps}[impl]
    time_it(benchmark, setup(c, FIT_STEPS), f"cuda fit {FIT_STEPS} steps m=n=8192 r=16 {DTYPE}", impl,
            m=c.m, n=c.n, r=16, dtype=DTYPE, steps=FIT_STEPS)


# ---- the floor ---------------------------------------------------------------------------------
FMA_SOURCE = r"""
extern "C" __global__ void fma_rate(float* out, int iters) {
    // 8 independent chains per thread keep the FMA pipes full; the result is stored so the
    // compiler keeps the work
    float a0 = threadIdx.x, a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3, a4 = a0 + 4, a5 = a0 + 5,
          a6 = a0 + 6, a7 = a0 + 7;
    const float x = 0.999999f, y = 1e-7f;
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            a0 = fmaf(a0, x, y); a1 = fmaf(a1, x, y); a2 = fmaf(a2, x, y); a3 = fmaf(a3, x, y);
            a4 = fmaf(a4, x, y); a5 = fmaf(a5, x, y); a6 = fmaf(a6, x, y); a7 = fmaf(a7, x, y);
        }
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
}
"""
FMA_ITERS = 4096
COPY_BYTES = 1 << 30


@pytest.mark.parametrize("what", ["copy", "fma"])
def test_floor(benchmark, what):
    import cupy

    if what == "copy":
        src = cupy.ones(COPY_BYTES // 4, np.float32)
        dst = cupy.empty_like(src)

        def step():
            dst[...] = src

        work = {"bytes_moved": 2 * COPY_BYTES}
    else:
        kernel = cupy.RawKernel(FMA_SOURCE, "fma_rate")
        sms = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["multiProcessorCount"]
        blocks, threads = sms * 8, 256
        out = cupy.empty(blocks * threads, np.float32)

        def step():
            kernel((blocks,), (threads,), (out, np.int32(FMA_ITERS)))

        work = {"flops": 2 * 8 * 16 * FMA_ITERS * blocks * threads}
    time_it(benchmark, step, "cuda floor", what, **work)
    if not benchmark.disabled:
        seconds = benchmark.extra_info["event_ms"] / 1e3
        if what == "copy":
            benchmark.extra_info["GB_per_s"] = work["bytes_moved"] / seconds / 1e9
        else:
            benchmark.extra_info["TFLOP_per_s"] = work["flops"] / seconds / 1e12
