"""GPU benchmarks (issue 3): the fused CUDA step against the step a CuPy or PyTorch user writes.

Groups (fp32):

* ``cuda step m=n={8192,16384} r={4,16,64} float32``: ``lorakern-cuda`` (fused_step: pass,
  eta and update on the device), ``lorakern-cuda-loop`` (the body of ``fit``'s loop: fused pass,
  the Theorem policy on 0-d device arrays, update), ``cupy`` (G = R + B@A; G@A.T; B.T@G; norms;
  eta; update, cuBLAS underneath) and ``torch`` (the same in PyTorch, where it has CUDA).
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
from types import SimpleNamespace

import numpy as np
import pytest


def _cuda_available() -> bool:
    import lorakern

    return "cuda" in lorakern.devices()  # the backend's runtime probe: CuPy + a device


pytestmark = pytest.mark.skipif(not _cuda_available(), reason="no CUDA device (runtime probe)")

SIZES = (8192, 16384)
RANKS = (4, 16, 64)
DTYPE = "float32"
FIT_STEPS = 200
EVENT_ROUNDS = 20
THEOREM_CONSTANT = 5.0 * math.sqrt(2.0)


# ---- inputs, built on the device and kept for the implementations of one case --------------
@lru_cache(maxsize=1)
def case(m: int, n: int, r: int, dtype: str = DTYPE, seed: int = 0):
    """Seeded random R, B, A on the GPU (as lorakern.benchmarking.Case: B ~ N(0, 1),
    A ~ N(0, 1/r)) and the lorakern Problem holding R; one case at a time (1 GB at 16384^2)."""
    import cupy

    import lorakern

    rng = cupy.random.default_rng(seed)
    R = rng.standard_normal((m, n), dtype=dtype)
    B = rng.standard_normal((m, r), dtype=dtype)
    A = rng.standard_normal((r, n), dtype=dtype) * np.dtype(dtype).type(1 / math.sqrt(r))
    problem = lorakern.Problem(R, cupy.zeros_like(R))  # R = W0 - Y with Y = 0: R itself
    return SimpleNamespace(m=m, n=n, r=r, dtype=dtype, R=problem.R, B=B, A=A, problem=problem)


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


# ---- the implementations: name -> setup(case) -> step() (no synchronisation inside) ---------
def _lorakern_step(c):
    import lorakern._cuda as backend

    data = c.problem.data(backend)

    def step():
        s = backend.fused_step(c.problem, data, c.B, c.A)
        return s.B, s.A, s.eta

    return step


def _lorakern_loop(c):
    import lorakern
    import lorakern._cuda as backend

    data, policy = c.problem.data(backend), lorakern.Theorem()

    def step():
        p = backend.fused_pass(c.problem, data, c.B, c.A)
        eta, _ = policy.choose(backend, c.problem, data, c.B, c.A, p, {})
        B, A = backend.update(c.B, c.A, p.grad_B, p.grad_A, eta)
        return B, A, eta

    return step


def _cupy(c):
    """What a CuPy user writes: cuBLAS products, a few elementwise kernels, eta on the device."""
    import cupy

    R, B, A = c.R, c.B, c.A
    norm = cupy.linalg.norm

    def step():
        G = R + B @ A
        grad_B = G @ A.T
        grad_A = B.T @ G
        g_sq = norm(G) ** 2
        loss = 0.5 * g_sq  # noqa: F841  (reported by a user; costs nothing extra)
        grad_sq = norm(grad_B) ** 2 + norm(grad_A) ** 2  # noqa: F841
        v_sq = norm(A) ** 2 + norm(B) ** 2
        eta = 1.0 / cupy.maximum(THEOREM_CONSTANT * (v_sq + cupy.sqrt(g_sq)), 1.0)
        eta = eta.astype(B.dtype)
        return B - eta * grad_B, A - eta * grad_A, eta

    return step


def _torch(c):
    import torch

    R, B, A = (torch.as_tensor(x, device="cuda") for x in (c.R, c.B, c.A))  # zero-copy (DLPack)

    def step():
        G = R + B @ A
        grad_B = G @ A.T
        grad_A = B.T @ G
        g_sq = torch.linalg.vector_norm(G) ** 2
        grad_sq = torch.linalg.vector_norm(grad_B) ** 2 + torch.linalg.vector_norm(grad_A) ** 2  # noqa: F841
        v_sq = torch.linalg.vector_norm(A) ** 2 + torch.linalg.vector_norm(B) ** 2
        eta = 1.0 / torch.clamp(THEOREM_CONSTANT * (v_sq + torch.sqrt(g_sq)), min=1.0)
        return B - eta * grad_B, A - eta * grad_A, eta

    return step


def _torch_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


COMPARISONS = {
    "lorakern-cuda": _lorakern_step,
    "lorakern-cuda-loop": _lorakern_loop,
    "cupy": _cupy,
    "torch": _torch,
}


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
               for m in SIZES for r in RANKS for impl in COMPARISONS]


@pytest.mark.parametrize("m, r, impl", STEP_PARAMS)
def test_step(benchmark, m, r, impl):
    if impl == "torch" and not _torch_cuda():
        pytest.skip("PyTorch with CUDA is not installed")
    c = case(m, m, r)
    out = time_it(benchmark, COMPARISONS[impl](c), f"cuda step m=n={m} r={r} {DTYPE}", impl,
                  m=m, n=m, r=r, dtype=DTYPE)
    if impl.startswith("lorakern"):
        import lorakern._cuda as backend

        benchmark.extra_info["launch"] = backend.kernel_info(c.problem, c.problem.data(backend), r)
    want = _cupy(c)()
    assert math.isclose(float(out[2]), float(want[2]), rel_tol=1e-4), "eta differs from the cupy step"


# ---- 200 steps: fit, single fused steps, the graph-replayed loop ---------------------------------
def _fit(c, steps):
    import lorakern

    return lambda: lorakern.fit(c.problem, c.B, c.A, steps=steps, device="cuda")


def _single_steps(c, steps):
    import lorakern._cuda as backend

    data = c.problem.data(backend)

    def run():
        B, A = c.B, c.A
        for _ in range(steps):
            s = backend.fused_step(c.problem, data, B, A)
            B, A = s.B, s.A
        return B, A

    return run


def _run_steps(c, steps):
    import lorakern._cuda as backend

    data = c.problem.data(backend)
    return lambda: backend.run_steps(c.problem, data, c.B, c.A, steps)


@pytest.mark.parametrize("impl", ["fit", "fused_step x200", "run_steps"])
def test_fit_200_steps(benchmark, impl):
    c = case(8192, 8192, 16)
    setup = {"fit": _fit, "fused_step x200": _single_steps, "run_steps": _run_steps}[impl]
    time_it(benchmark, setup(c, FIT_STEPS), f"cuda fit {FIT_STEPS} steps m=n=8192 r=16 {DTYPE}", impl,
            m=8192, n=8192, r=16, dtype=DTYPE, steps=FIT_STEPS)


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
