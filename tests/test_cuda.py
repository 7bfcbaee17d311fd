"""The CUDA device's own paths against the NumPy reference: launch geometry, rank bounds, the
update's rounding, fused_step, run_steps and fit's device loop.

Every test runs on two CUDA devices of the same launcher (lorakern/_cuda/launch.py):

* ``gpu``: the kernels compiled by NVRTC and run through CuPy. Skipped unless a runtime probe
  finds CuPy and a CUDA device (``cuda_available``), never by reading an error message.
* ``emulated``: the same fused.cu compiled by g++ for the host (lorakern/_cuda/emulation.py:
  a thread per CUDA thread, deferred cp.async copies, poisoned shared memory, checked
  barriers). Small shapes only. The emulation itself is tested in test_cuda_emulation.py.

The generic suites (test_equivalence, test_losses, test_fit, test_step_size) run on both too,
through helpers.DEVICES.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import lorakern
from lorakern import reference
from lorakern._cuda import emulation, launch
from lorakern._cuda import matrix as cuda_kernels
from lorakern.results import DEVICE_HISTORY_COLUMNS

from helpers import assert_bitwise, assert_close, make_case


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
requires_gpu = pytest.mark.skipif(not CUDA, reason="no CUDA device (CuPy runtime probe)")

# fit trajectories against the CPU device, step for step: rounding differences compound over
# the steps, so RTOL (helpers.py, the one tolerance table) times this factor
FIT_FACTOR = {np.dtype(np.float32): 20.0, np.dtype(np.float64): 100.0}

DEVICES = [
    pytest.param("gpu", marks=requires_gpu),
    pytest.param("emulated", marks=pytest.mark.skipif(not emulation.available(), reason="g++ not found")),
]


@pytest.fixture(params=DEVICES)
def cuda(request):
    """A CUDA device: the GPU's (lorakern._cuda.DEVICE) or the host emulation's."""
    device = lorakern._cuda.DEVICE if request.param == "gpu" else emulation.device()
    return SimpleNamespace(device=device, kernels=cuda_kernels, xp=device.xp,
                           emulated=request.param == "emulated",
                           to_host=lambda x: np.asarray(device.to_host(x)))


def small_blocks(monkeypatch, tiles=((32, 32),), rows=1, cols=1):
    """Tiles and super-tiles patched small: small shapes cross tile edges and many blocks."""
    monkeypatch.setattr(launch, "TILES", tiles)
    monkeypatch.setattr(launch, "ROWS_PER_BLOCK", rows)
    monkeypatch.setattr(launch, "COLS_PER_BLOCK", cols)


def make_problem(m, n, r, dtype, *, loss="squared", masked=False, seed=0, lipschitz=None):
    return make_case((m, n, r), dtype, loss=loss, masked=masked, seed=seed, lipschitz=lipschitz,
                     delta=0.8)


def same_bits(actual, expected, name):
    """assert_bitwise for scalars and strided columns too."""
    assert_bitwise(np.ascontiguousarray(np.atleast_1d(actual)),
                   np.ascontiguousarray(np.atleast_1d(expected)), name)


def data_of(cuda, problem):
    return problem.data(cuda.device, cuda.kernels)


def check_pass(cuda, problem, B, A):
    xp = cuda.xp
    p = cuda.kernels.fused_pass(problem, data_of(cuda, problem), xp.asarray(B), xp.asarray(A))
    want = reference.fused_pass(problem, None, B, A)
    dtype = problem.dtype
    assert cuda.to_host(p.grad_B).dtype == dtype
    assert_close(cuda.to_host(p.grad_B), want.grad_B, dtype, "grad_B")
    assert_close(cuda.to_host(p.grad_A), want.grad_A, dtype, "grad_A")
    for name in ("loss", "g_sq", "grad_sq", "v_sq"):
        assert_close(float(getattr(p, name)), getattr(want, name), dtype, name)
    return p


# ---- launch geometry ----------------------------------------------------------------------------
EMULATED_SHAPES = [(1, 1, 1), (37, 101, 5), (64, 32, 8), (33, 70, 16), (40, 36, 19)]
GPU_SHAPES = EMULATED_SHAPES + [(257, 263, 17), (300, 260, 128), (1024, 1000, 16), (129, 4097, 4)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("blocks", ["1x1", "2x3"])
def test_fused_pass_matches_reference(cuda, monkeypatch, dtype, shape, blocks):
    """32 x 32 tiles, one tile per block or super-tiles of 2 x 3 (the generic suites run the
    default tiles and small_tiles' 2 x 3 on their own shapes)."""
    if cuda.emulated and shape not in EMULATED_SHAPES:
        pytest.skip("large shapes run on the GPU only")
    small_blocks(monkeypatch, rows=int(blocks[0]), cols=int(blocks[2]))
    check_pass(cuda, *make_problem(*shape, dtype))


def test_plan_geometry(cuda, monkeypatch):
    """The emulated 'GPU' (3 multiprocessors, one block each) splits a problem into about
    three super-tiles; patched constants give a fresh plan, never a stale one."""
    problem, B, A = make_problem(100, 130, 5, np.float32)
    data = data_of(cuda, problem)
    plan = launch.plan(problem, data, 5)
    assert (plan.bm, plan.bn, plan.rk) == (64, 64, 8)
    if cuda.emulated:
        assert (plan.ntr, plan.ntc, plan.grid) == (2, 3, 3)
    small_blocks(monkeypatch, rows=1, cols=2)
    small = launch.plan(problem, data, 5)
    assert small is not plan and (small.bm, small.rpb, small.cpb, small.grid) == (32, 1, 2, 4 * 3)
    check_pass(cuda, problem, B, A)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ranks_up_to_128(cuda, monkeypatch, dtype):
    small_blocks(monkeypatch, tiles=launch.TILES, rows=1, cols=2)
    for r in ([3, 33, 128] if cuda.emulated else [1, 3, 4, 9, 31, 33, 64, 100, 128]):
        check_pass(cuda, *make_problem(40, 36, r, dtype, seed=r))
    with pytest.raises(ValueError, match="ranks up to 128"):
        check_pass(cuda, *make_problem(4, 4, 129, dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unaligned_rows_and_b_zero(cuda, monkeypatch, dtype):
    """n not a multiple of 4 (scalar copies), B = 0 as LoRA starts, a 1-row and a 1-column
    problem, and inputs that are not 16-byte aligned (the scalar copy paths)."""
    small_blocks(monkeypatch)
    for m, n, r in [(1, 77, 3), (45, 1, 2), (35, 66, 6)]:
        problem, B, A = make_problem(m, n, r, dtype)
        check_pass(cuda, problem, np.zeros_like(B), A)
    # B and A one element off 16-byte alignment: the scalar copies instead of the 16-byte ones
    problem, B, A = make_problem(33, 40, 4, dtype, seed=1)
    xp = cuda.xp

    def shifted(x):
        out = xp.empty(x.size + 1, x.dtype)[1:].reshape(x.shape)
        out[...] = xp.asarray(x)
        return out

    Bs, As = shifted(B), shifted(A)
    if cuda.emulated:
        assert Bs.ctypes.data % 16 and As.ctypes.data % 16
    data = data_of(cuda, problem)
    p = cuda.kernels.fused_pass(problem, data, Bs, As)
    q = cuda.kernels.fused_pass(problem, data, xp.asarray(B), xp.asarray(A))
    for name in ("grad_B", "grad_A", "loss", "g_sq", "grad_sq", "v_sq"):
        same_bits(cuda.to_host(getattr(p, name)), cuda.to_host(getattr(q, name)), name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_repeated_runs_are_bit_identical(cuda, monkeypatch, dtype):
    small_blocks(monkeypatch, rows=2, cols=2)
    shape = (37, 101, 5) if cuda.emulated else (1024, 1000, 16)
    problem, B, A = make_problem(*shape, dtype)
    data, xp = data_of(cuda, problem), cuda.xp
    runs = [cuda.kernels.fused_pass(problem, data, xp.asarray(B), xp.asarray(A)) for _ in range(3)]
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
        got = cuda.device.update(xp.asarray(B), xp.asarray(A), xp.asarray(gB), xp.asarray(gA), e)
        same_bits(cuda.to_host(got[0]), want[0], "B")
        same_bits(cuda.to_host(got[1]), want[1], "A")


# ---- step, fit and the on-device loop -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_fit_matches_cpu_step_for_step(cuda, monkeypatch, dtype, loss):
    small_blocks(monkeypatch, rows=2, cols=1)
    shape, steps = ((37, 45, 3), 6) if cuda.emulated else ((257, 263, 17), 40)
    problem, B, A = make_problem(*shape, dtype, loss=loss, masked=loss == "logistic")
    got = lorakern.fit(problem, B, A, steps=steps, device=cuda.device, step_size="theorem")
    want = lorakern.fit(problem, B, A, steps=steps, device="cpu", step_size="theorem")
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
    """The on-device loop computes exactly what fit's step-by-step loop computes."""
    small_blocks(monkeypatch, rows=1, cols=2)
    monkeypatch.setattr(lorakern.descent, "DEVICE_LOOP", False)  # fit's step-by-step loop
    shape, steps = ((37, 45, 3), 5) if cuda.emulated else ((257, 263, 17), 25)
    problem, B, A = make_problem(*shape, dtype)
    fit = lorakern.fit(problem, B, A, steps=steps, device=cuda.device,
                       step_size="theorem" if eta is None else eta)
    data = data_of(cuda, problem)
    run = cuda.kernels.run_steps(problem, data, B, A, steps, eta_fixed=eta)
    assert run.diverged_at is None
    for i, name in enumerate(DEVICE_HISTORY_COLUMNS):
        if name == "g_sq":  # fit records g_norm = sqrt(g_sq)
            same_bits(np.sqrt(run.history[:, i]), fit.history.g_norm, "g_norm")
        else:
            same_bits(run.history[:, i], getattr(fit.history, name), name)
    same_bits(cuda.to_host(run.B), cuda.to_host(fit.B), "B")
    same_bits(cuda.to_host(run.A), cuda.to_host(fit.A), "A")
    one = cuda.kernels.fused_step(problem, data, cuda.xp.asarray(B), cuda.xp.asarray(A), eta_fixed=eta)
    assert float(one.loss) == fit.history.loss[0] and float(one.eta) == fit.history.eta[0]


@pytest.mark.parametrize("shape", [(37, 45, 3), (70, 90, 5)], ids=["one-tail-block", "four-tail-blocks"])
def test_a_step_is_two_launches(cuda, monkeypatch, shape):
    """The tail (fused.cu) reduces the partials, computes eta_t in every block and updates, so
    a step of the device loop is two kernels (pass, tail) and one finish per run completes the
    last row's ||grad J||^2; fused_step and fused_pass are three, the loss alone two. Every row
    of the history then holds what fused_pass reports at that row's iterate."""
    small_blocks(monkeypatch, rows=1, cols=2)
    problem, B, A = make_problem(*shape, np.float64, seed=3)
    data, rt = data_of(cuda, problem), cuda.device.runtime
    plan = launch.plan(problem, data, shape[2])  # the plan run_steps and the passes below use
    # every tail block computes eta_t itself, and the rows' ||grad J||^2 sum every block's share
    assert plan.small_grid == -(-(shape[0] + shape[1]) * shape[2] // launch.NT)
    kind_of = {id(k): "pass" if key in ("grad", "loss") else key for key, k in plan.kernels.items()}
    names = []
    real = rt.launch
    def counted(kernel, *args, **kwargs):
        names.append(kind_of.get(id(kernel), "other"))
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(rt, "launch", counted)

    def kinds():
        got = list(names)
        names.clear()
        return got

    xp = cuda.xp
    steps = 5
    run = cuda.kernels.run_steps(problem, data, B, A, steps, graph=False)
    assert kinds() == ["pass", "tail"] * steps + ["finish"]
    cuda.kernels.fused_step(problem, data, xp.asarray(B), xp.asarray(A))
    assert kinds() == ["pass", "tail", "finish"]
    cuda.kernels.loss_pass(problem, data, xp.asarray(B), xp.asarray(A))
    assert kinds() == ["pass", "tail"]
    # each row against a fresh fused_pass at that row's iterate (the host loop's numbers)
    B_t, A_t = xp.asarray(B), xp.asarray(A)
    for t in range(steps):
        p = cuda.kernels.fused_pass(problem, data, B_t, A_t)
        assert kinds() == ["pass", "tail", "finish"]
        for i, name in enumerate(DEVICE_HISTORY_COLUMNS[:4]):
            same_bits(run.history[t, i], float(getattr(p, name)), f"row {t} {name}")
        B_t, A_t = cuda.device.update(B_t, A_t, p.grad_B, p.grad_A, float(run.history[t, 4]))
        assert kinds() == ["other"]  # the device's update kernel
    same_bits(cuda.to_host(run.B), cuda.to_host(B_t), "B")


def test_run_steps_keeps_last_finite_iterate(cuda, monkeypatch):
    small_blocks(monkeypatch)
    problem, B, A = make_problem(20, 24, 3, np.float64, seed=5)
    with pytest.warns(RuntimeWarning, match="stopped being finite"):
        fit = lorakern.fit(problem, B, A, steps=40, device=cuda.device, step_size=50.0)
    run = cuda.kernels.run_steps(problem, data_of(cuda, problem), B, A, 40, eta_fixed=50.0)
    assert run.diverged_at is not None and run.B_prev is None
    assert fit.steps == run.diverged_at - 1
    same_bits(cuda.to_host(run.B), cuda.to_host(fit.B), "B")
    same_bits(cuda.to_host(run.A), cuda.to_host(fit.A), "A")


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
            results.append(lorakern.fit(problem, B, A, steps=steps, device=cuda.device,
                                        step_size=step_size))
    on_device, on_host = results
    assert (on_device.steps, on_device.status) == (on_host.steps, on_host.status)
    assert on_host.status == ("diverged" if step_size == 50.0 else "completed")
    for name in ("loss", "eta", "grad_sq", "v_sq", "g_norm"):
        same_bits(getattr(on_device.history, name), getattr(on_host.history, name), name)
    same_bits(cuda.to_host(on_device.B), cuda.to_host(on_host.B), "B")
    same_bits(cuda.to_host(on_device.A), cuda.to_host(on_host.A), "A")
    assert on_device.final_loss == on_host.final_loss


def test_last_step_divergence_in_the_device_loop(cuda, monkeypatch):
    """J(V_T) alone not finite: run_steps reports no divergence (its history is finite) and
    hands V_{T-1} back in B_prev / A_prev; fit returns that, status "diverged", and warns."""
    small_blocks(monkeypatch, rows=1, cols=2)
    problem, B, A = make_problem(20, 24, 3, np.float64, seed=5)
    calls = []
    real = cuda_kernels.run_steps
    monkeypatch.setattr(cuda_kernels, "run_steps", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        first = lorakern.fit(problem, B, A, steps=40, device=cuda.device, step_size=50.0)
    T = first.steps + 1
    with pytest.warns(RuntimeWarning, match=f"after step {T - 1}"):
        result = lorakern.fit(problem, B, A, steps=T, device=cuda.device, step_size=50.0)
    run = calls[-1]
    assert run.diverged_at is None and np.isfinite(run.history).all() and len(run.history) == T
    assert (result.status, result.steps) == ("diverged", T - 1)
    same_bits(cuda.to_host(result.B), cuda.to_host(run.B_prev), "B = V_{T-1}")
    same_bits(cuda.to_host(result.A), cuda.to_host(run.A_prev), "A = V_{T-1}")
    assert not np.isfinite(float(cuda.kernels.loss_pass(problem, data_of(cuda, problem), run.B, run.A)))
    assert result.final_loss == run.history[T - 1, DEVICE_HISTORY_COLUMNS.index("loss")]


# ---- GPU only -----------------------------------------------------------------------------------
@requires_gpu
def test_cupy_inputs_stay_and_numpy_inputs_copy_once():
    import cupy

    problem, B, A = make_problem(64, 80, 4, np.float32)
    device = lorakern._cuda.DEVICE
    on_gpu = lorakern.Problem(cupy.asarray(problem.R), cupy.zeros(problem.shape, np.float32))
    data = on_gpu.data(device, cuda_kernels)
    assert data.x.data.ptr == on_gpu.R.data.ptr  # no copy
    first = problem.data(device, cuda_kernels)
    assert isinstance(first.x, cupy.ndarray) and problem.data(device, cuda_kernels) is first
    result = lorakern.step(on_gpu, cupy.asarray(B), cupy.asarray(A), step_size="theorem")  # device="auto" picks cuda
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
    engine = lorakern._dispatch.bind(problem, "cuda")
    B, A = cupy.asarray(B), cupy.asarray(A)
    policy = lorakern.Theorem()

    def steps(B, A, count):
        for _ in range(count):
            p = engine.fused_pass(B, A)
            eta, _ = policy.choose(engine, B, A, p, {})
            B, A = engine.update(B, A, p.grad_B, p.grad_A, eta)
        return B, A

    steps(B, A, 2)  # compile, load modules and fill the memory pool first
    cuda_kernels.run_steps(problem, engine.data, B, A, 2)
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
    with pytest.raises(lorakern.DeviceUnavailableError,
                       match=r'pip install "\.\[cuda\]" in a clone of lorakern'):
        lorakern._cuda.check_available()


def test_importing_the_backend_does_not_import_cupy():
    """In a fresh interpreter that imports this checkout's lorakern (not whichever one the
    interpreter would find: an installed copy, or the current directory's), the CUDA device
    modules and the emulation import without CuPy, and the emulated device runs a step."""
    root = str(Path(lorakern.__file__).resolve().parents[1])
    code = ("import sys, numpy as np, lorakern, lorakern._cuda, lorakern._cuda.launch, "
            "lorakern._cuda.matrix, lorakern._cuda.emulation as emu\n"
            f"assert lorakern.__file__.startswith({root!r}), lorakern.__file__\n"
            "assert 'cupy' not in sys.modules, 'cupy imported'\n"
            "if emu.available():\n"
            "    p = lorakern.Problem(np.ones((3, 4)), np.zeros((3, 4)))\n"
            "    lorakern.step(p, np.ones((3, 1)), np.ones((1, 4)), device=emu.device(), step_size='theorem')\n"
            "    assert 'cupy' not in sys.modules, 'the emulated device imported cupy'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": root}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without a usable GPU")
def test_cuda_device_unavailable_here():
    with pytest.raises(lorakern.DeviceUnavailableError):
        lorakern.step(*make_problem(4, 4, 1, np.float32), device="cuda", step_size="theorem")
    assert "cuda" not in lorakern.devices()
    assert "cuda-emulated" not in lorakern.devices()  # a test device, never offered to users


def test_default_certified_fit_runs_the_host_loop(cuda, monkeypatch):
    """The default step, "certified", is a line search: on CUDA fit runs the step-by-step loop
    (never run_steps, and never another step in its place), backtracking (CUDA has no quartic
    pass), and takes the reference's backtracking etas; naming "theorem" runs the device loop."""
    small_blocks(monkeypatch, rows=1, cols=2)
    problem, B, A = make_problem(37, 45, 3, np.float64)
    calls = []
    real = cuda_kernels.run_steps
    monkeypatch.setattr(cuda_kernels, "run_steps", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = lorakern.fit(problem, B, A, steps=5, device=cuda.device)
    assert not calls and isinstance(got.step_size, lorakern.Certified)
    assert got.status == "completed" and got.steps == 5 and got.history.trials.sum() > 0
    want = lorakern.fit(problem, B, A, steps=5, device="reference",
                        step_size=lorakern.Certified(search="backtrack"))
    np.testing.assert_allclose(got.history.eta, want.history.eta, rtol=1e-12)
    np.testing.assert_allclose(got.history.loss, want.history.loss, rtol=1e-12)
    assert lorakern.theory.check(got).all_hold
    with pytest.raises(ValueError, match="no quartic pass"):  # said, not silently swapped
        lorakern.fit(problem, B, A, steps=1, device=cuda.device, step_size="exact")
    lorakern.fit(problem, B, A, steps=2, device=cuda.device, step_size="theorem")
    assert calls  # the theorem's step: one device-side loop
