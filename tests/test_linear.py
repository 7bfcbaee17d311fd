"""The linear kind (issue 9): LinearProblem on every device against the reference, the norm
strategies, the certified bounds, and the paper's inequalities on fitted histories.

The CUDA module (lorakern/_cuda/linear.py) is written against the device's array namespace,
so it runs here on a stub device whose namespace is NumPy (``STUB``); on a machine with a GPU
the same tests run on device="cuda" too (pending: no GPU was available when they were written).
"""
from __future__ import annotations

import importlib.util
import math

import numba
import numpy as np
import pytest

import lorakern
from lorakern import reference, theory
from lorakern._dispatch import Device, bind
from lorakern._host import HostDevice
from lorakern.problems import linear as linear_problem
from lorakern.testing import random_linear_data

from helpers import DEVICES, assert_bitwise, assert_close, host

LINEAR_LOSSES = ("squared", "huber", "logistic", "cross_entropy")
DTYPES = (np.float32, np.float64)

#: (N, n, m, r): N = 1, n = 1, m = 1, primes, r not a multiple of 4, N far below n (the Gram
#: strategy) and far above it (tiles), several row parts once PART_ROWS is patched small
SHAPES = [
    (1, 1, 1, 1), (1, 7, 5, 2), (9, 1, 4, 3), (6, 5, 1, 2), (37, 11, 13, 5),
    (5, 41, 7, 3), (53, 29, 31, 17), (130, 9, 6, 4),
]


def make_linear(shape, dtype, loss="squared", *, seed=0, scale=0.5, lipschitz=None):
    """(problem, B, A) on fresh seeded random data; B and A both non-zero."""
    N, n, m, r = shape
    rng = np.random.default_rng([seed, N, n, m, r])
    X, Y, W0 = random_linear_data(rng, N, n, m, dtype, loss=loss, w0_scale=1 / math.sqrt(n))
    kwargs = {"delta": 0.7} if loss == "huber" else {}
    problem = lorakern.LinearProblem(X, Y, W0, loss=loss, lipschitz=lipschitz, **kwargs)
    B = (scale * rng.standard_normal((m, r))).astype(dtype)
    A = (scale * rng.standard_normal((r, n))).astype(dtype)
    return problem, B, A


# ---- the stub CUDA device: lorakern._cuda.linear with NumPy as its array namespace -------------
class _NumpyRuntime:
    xp = np

    @staticmethod
    def to_host(x):
        return np.asarray(x)


class StubCudaDevice:
    """A Device in the "cuda" column of KERNELS whose arrays are NumPy arrays: it runs the CUDA
    kernels module of the linear kind unchanged, scalars kept as arrays (host_scalars False)."""

    name = "cuda-stub"
    kernels_name = "cuda"
    host_scalars = False

    def __init__(self):
        self.runtime = _NumpyRuntime()

    @property
    def xp(self):
        return np

    @property
    def key(self):
        return ("cuda-stub", id(self))

    def check_available(self):
        pass

    def asarray(self, x, dtype):
        return np.array(x, dtype=dtype, copy=True, order="C")

    to_host = HostDevice.to_host  # NumPy arrays: the host's copy-back and eq. (3)
    update = HostDevice.update


STUB = StubCudaDevice()
assert isinstance(STUB, Device)


def _emulated_cuda():
    """The host emulation of the CUDA device (lorakern._cuda.emulation), where it exists."""
    try:
        from lorakern._cuda import CudaDevice
        from lorakern._cuda.emulation import HostRuntime

        return CudaDevice("cuda-emulated", runtime=HostRuntime())
    except Exception:  # not built on this branch, or no compiler: the stub still runs
        return None


#: the devices besides the reference that run the linear kind here: the CPU, the stub, the
#: host emulation of the CUDA device where this branch has it, and a GPU where there is one
TARGETS = (["cpu", "cuda-stub"]
           + (["cuda-emulated"] if importlib.util.find_spec("lorakern._cuda.emulation") else [])
           + (["cuda"] if "cuda" in DEVICES else []))


def device_of(name):
    if name == "cuda-stub":
        return STUB
    if name == "cuda-emulated":
        dev = _emulated_cuda()
        if dev is None:
            pytest.skip("lorakern._cuda.emulation is not available on this branch")
        return dev
    return name


@pytest.fixture
def small_parts(monkeypatch):
    """Row parts of 3 rows, column tiles of 4 and row tiles of 7: small inputs cross every
    boundary; the sweep runs on every thread however small the problem (SERIAL_WORK = 0)."""
    import lorakern._cpu.linear as cpu
    import lorakern._cuda.linear as cuda

    monkeypatch.setattr(cpu, "PART_ROWS", 3)
    monkeypatch.setattr(cpu, "NORM_TILE", 4)
    monkeypatch.setattr(cpu, "SERIAL_WORK", 0)
    monkeypatch.setattr(cuda, "ROW_TILE", 7)
    monkeypatch.setattr(cuda, "NORM_TILE", 4)


def linear_pass(problem, device, B, A, norm="exact"):
    engine = bind(problem, device_of(device))
    return engine, engine.fused_pass(engine.asarray(B), engine.asarray(A), norm=norm)


def compare_linear_pass(problem, B, A, device, norm="exact", factor=1.0):
    """A device's pass against the reference's: gradients, J, g_sq, grad_sq, v_sq."""
    dt = problem.dtype
    engine, got = linear_pass(problem, device, B, A, norm)
    want = reference.fused_pass(problem, None, B, A, norm=norm)
    assert host(got.grad_B).dtype == dt and host(got.grad_A).dtype == dt
    assert_close(host(got.grad_B), want.grad_B, dt, "grad_B", factor)
    assert_close(host(got.grad_A), want.grad_A, dt, "grad_A", factor)
    for name in ("loss", "g_sq", "grad_sq", "v_sq"):
        assert_close(float(getattr(got, name)), getattr(want, name), dt, name, factor)
    loss = float(engine.loss_pass(engine.asarray(B), engine.asarray(A)))
    assert_close(loss, want.loss, dt, "loss_pass", factor)
    return got, want


# ---- the reference is the truth ----------------------------------------------------------------
@pytest.mark.parametrize("loss", LINEAR_LOSSES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 5, 4, 3), (3, 6, 5, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_reference_gradients_against_finite_differences(shape, loss):
    """G against central differences of J in W, grad_B and grad_A against differences of
    J(B, A), and the V-form gradient (eq. 7) against [grad_B; grad_A^T]."""
    problem, B, A = make_linear(shape, np.float64, loss, seed=1)
    N, n, m, r = shape
    h = 1e-6
    G, J = reference.gradient(problem, B, A)
    assert G.shape == (m, n) and math.isclose(J, reference.loss_pass(problem, None, B, A))
    rng = np.random.default_rng(5)

    def at_W(E):  # J at W0 + BA + E: shift W0, keep B and A
        shifted = lorakern.LinearProblem(problem.X, problem.Y, problem.W0 + E,
                                         loss=loss, delta=problem.delta if loss == "huber" else 1.0)
        return reference.loss_pass(shifted, None, B, A)

    for _ in range(3):
        E = rng.standard_normal((m, n))
        fd = (at_W(h * E) - at_W(-h * E)) / (2 * h)
        assert abs(fd - np.sum(G * E)) <= 1e-6 * max(1.0, np.abs(G).sum() * np.abs(E).max())
    p = reference.fused_pass(problem, None, B, A)
    for name, X0, grad in (("B", B, p.grad_B), ("A", A, p.grad_A)):
        E = rng.standard_normal(X0.shape)
        plus = (B + h * E, A) if name == "B" else (B, A + h * E)
        minus = (B - h * E, A) if name == "B" else (B, A - h * E)
        fd = (reference.loss_pass(problem, None, *plus) - reference.loss_pass(problem, None, *minus)) / (2 * h)
        assert abs(fd - np.sum(grad * E)) <= 1e-6 * max(1.0, np.abs(grad).sum() * np.abs(E).max()), name
    v = reference.v_form_gradient(problem, B, A)
    assert_close(v[:m], p.grad_B, np.float64, "grad_B block")
    assert_close(v[m:], p.grad_A.T, np.float64, "grad_A^T block")


def test_reference_is_literal():
    """J, Delta and G of the squared loss written out by hand."""
    problem, B, A = make_linear((8, 6, 5, 2), np.float64, "squared", seed=3)
    Z = problem.X @ (problem.W0 + B @ A).T
    Delta = Z - problem.Y
    G, J = reference.gradient(problem, B, A)
    assert_close(J, 0.5 * np.sum(Delta ** 2) / 8, np.float64, "J")
    assert_close(G, Delta.T @ problem.X / 8, np.float64, "G")


# ---- every device against the reference ----------------------------------------------------------
@pytest.mark.parametrize("device", TARGETS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss", LINEAR_LOSSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_pass_matches_reference(dtype, loss, shape, device, small_parts):
    problem, B, A = make_linear(shape, dtype, loss, seed=2)
    for norm in ("exact", "bound"):
        compare_linear_pass(problem, B, A, device, norm)


@pytest.mark.parametrize("device", TARGETS)
@pytest.mark.parametrize("loss", ["logistic", "cross_entropy"])
def test_lora_start_and_default_tiles(loss, device):
    """B = 0 (LoRA's start: grad_A = 0) with the default tile sizes (one thread on the CPU)."""
    problem, _, A = make_linear((45, 17, 11, 6), np.float32, loss, seed=4)
    B = np.zeros((11, 6), np.float32)
    got, _ = compare_linear_pass(problem, B, A, device)
    assert not np.any(host(got.grad_A)) and np.any(host(got.grad_B))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_cross_entropy_does_not_overflow(dtype):
    """Logits near +-3e4 (exp overflows even float64): loss and gradients finite, as the reference."""
    problem, B, A = make_linear((12, 5, 6, 2), dtype, "cross_entropy", seed=6)
    big = lorakern.LinearProblem(problem.X, problem.Y, (problem.W0 * 2e4).astype(dtype),
                                 loss="cross_entropy")
    Z = big.X.astype(np.float64) @ big.W0.astype(np.float64).T
    assert np.abs(Z).max() > 800  # exp(800) overflows float64
    for device in ("cpu", "cuda-stub"):
        got, want = compare_linear_pass(big, B, A, device)
        assert np.isfinite(want.loss) and want.loss > 100


# ---- the norm strategies and the bound --------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "cuda-stub"])
@pytest.mark.parametrize("blas", [False, True], ids=["serial", "blas"])
@pytest.mark.parametrize("strategy", ["gram", "tiles"])
@pytest.mark.parametrize("shape", [(1, 7, 5, 2), (5, 41, 7, 3), (37, 11, 13, 5), (130, 9, 6, 4)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_norm_strategy_is_the_plain_norm(dtype, shape, strategy, blas, device, monkeypatch,
                                               small_parts):
    """Each way of computing ||(1/N) Delta^T X||_F, forced on every shape, equals the norm of
    (1/N) Delta^T X formed plainly in float64 from the same Delta, and the reference's."""
    import lorakern._cpu.linear as cpu

    monkeypatch.setattr(linear_problem, "GRAM_RATIO", 1e9 if strategy == "gram" else 0.0)
    monkeypatch.setattr(cpu, "SERIAL_WORK", 0 if blas else 1 << 40)  # exact norm: BLAS or loops
    if device == "cuda-stub" and not blas:
        pytest.skip("the CUDA module has one path")
    problem, B, A = make_linear(shape, dtype, "logistic", seed=7)
    assert problem.norm_strategy == strategy
    engine, got = linear_pass(problem, device, B, A)
    D = host(engine.data.D).astype(np.float64)
    plain = np.sum((D.T @ problem.X.astype(np.float64) / problem.N) ** 2)
    assert_close(float(got.g_sq), plain, dtype, f"{strategy} g_sq")
    assert_close(float(got.g_sq), reference.fused_pass(problem, None, B, A).g_sq, dtype, "vs reference")


def test_norm_strategy_rule(monkeypatch):
    """Gram while N <= GRAM_RATIO n and the N x N matrices fit; tiles otherwise."""
    def strategy(N, n):
        X = np.ones((N, n))
        return lorakern.LinearProblem(X, np.ones((N, 1)), np.ones((1, n))).norm_strategy

    assert strategy(4, 100) == "gram" and strategy(20, 10) == "gram" and strategy(21, 10) == "tiles"
    monkeypatch.setattr(linear_problem, "GRAM_MAX_BYTES", 16 * 9)
    assert strategy(3, 100) == "gram" and strategy(4, 100) == "tiles"


@pytest.mark.parametrize("device", ["reference", "cpu", "cuda-stub"])
@pytest.mark.parametrize("loss", LINEAR_LOSSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_bound_is_at_least_the_exact_norm(dtype, loss, device, small_parts):
    """U >= ||G||_F at iterates of several sizes, LoRA's start and N = 1 (where sigma ||Delta||
    / N is exactly ||G||: the bound is tight there, up to its margin)."""
    for shape, seed in (((1, 9, 6, 3), 0), ((40, 7, 5, 2), 1), ((6, 30, 8, 4), 2)):
        for scale in (0.0, 0.3, 1.0, 3.0):
            problem, B, A = make_linear(shape, dtype, loss, seed=seed, scale=scale or 0.3)
            if scale == 0.0:
                B = np.zeros_like(B)  # LoRA's start
            engine, bound = linear_pass(problem, device, B, A, "bound")
            _, exact = linear_pass(problem, device, B, A, "exact")
            truth = reference.fused_pass(problem, None, B, A).g_sq
            U, g = float(bound.g_sq), float(exact.g_sq)
            assert U >= g and U >= truth, (shape, scale, U, g, truth)
            if shape[0] == 1 and loss == "squared" and truth > 0:
                assert U <= truth * (1 + 1e-3), (U, truth)  # tight: only the margin


@pytest.mark.parametrize("eigh_max", [1024, 2], ids=["eigvalsh", "lanczos"])
def test_certified_sigma_is_an_upper_bound(eigh_max, monkeypatch):
    """sigma_sq_bound >= sigma_max(X)^2 (SVD in float64) and is within 1e-5 of it, also for
    a top singular value in a cluster, a slowly decaying spectrum, and X = 0."""
    monkeypatch.setattr(linear_problem, "EIGH_MAX", eigh_max)
    rng = np.random.default_rng(8)
    cases = [rng.standard_normal((N, n)) for N, n in ((1, 1), (1, 9), (9, 1), (30, 12), (12, 40))]
    U, _ = np.linalg.qr(rng.standard_normal((25, 8)))
    V, _ = np.linalg.qr(rng.standard_normal((16, 8)))
    cases.append(U @ np.diag(3.0 - 1e-9 * np.arange(8)) @ V.T)  # eight equal singular values
    U, _ = np.linalg.qr(rng.standard_normal((60, 30)))
    V, _ = np.linalg.qr(rng.standard_normal((40, 30)))
    cases.append(U @ np.diag(3.0 * (1 - 0.01 * np.arange(30))) @ V.T)  # a slow decay
    cases.append((rng.standard_normal((50, 20)) * 1e3).astype(np.float32))
    for X in cases:
        problem = lorakern.LinearProblem(X, np.zeros((X.shape[0], 1), X.dtype), np.zeros((1, X.shape[1]), X.dtype))
        top = np.linalg.svd(X.astype(np.float64), compute_uv=False)[0] ** 2
        assert top <= problem.sigma_sq_bound <= top * (1 + 1e-5), (X.shape, top, problem.sigma_sq_bound)
        assert math.isclose(problem.lipschitz, problem.sigma_sq_bound / X.shape[0])
    zero = lorakern.LinearProblem(np.zeros((4, 3)), np.zeros((4, 2)), np.ones((2, 3)))
    assert zero.sigma_sq_bound == 0.0 and zero.eta_lipschitz == 1.0


def test_lipschitz_constants_by_loss():
    X = np.random.default_rng(9).standard_normal((20, 6))
    top = np.linalg.svd(X, compute_uv=False)[0] ** 2 / 20
    for loss, factor in (("squared", 1.0), ("huber", 1.0), ("logistic", 0.25), ("cross_entropy", 0.5)):
        problem, _, _ = make_linear((20, 6, 3, 2), np.float64, loss)
        problem = lorakern.LinearProblem(X, problem.Y, problem.W0, loss=loss)
        assert top * factor <= problem.lipschitz <= top * factor * (1 + 1e-5), loss
    given = lorakern.LinearProblem(X, np.zeros((20, 3)), np.zeros((3, 6)), lipschitz=3.5)
    assert given.lipschitz == 3.5 and given.eta_lipschitz == 3.5
    assert given.certified_lipschitz == pytest.approx(top, rel=1e-5)  # the bound's L


# ---- steps, fits and the paper's inequalities --------------------------------------------------
@pytest.mark.parametrize("device", TARGETS)
@pytest.mark.parametrize("step_size", ["theorem", lorakern.Theorem(norm="bound"), "armijo", 0.05],
                         ids=["theorem", "bound", "armijo", "constant"])
@pytest.mark.parametrize("loss", ["squared", "cross_entropy"])
def test_step_matches_reference_step(loss, step_size, device, small_parts):
    problem, B, A = make_linear((23, 13, 9, 3), np.float64, loss, seed=10)
    got = lorakern.step(problem, B, A, device=device_of(device), step_size=step_size)
    want = reference.step(problem, B, A, step_size=step_size)
    for name in ("eta", "loss", "grad_sq", "v_sq", "g_norm"):
        assert_close(getattr(got, name), getattr(want, name), np.float64, name)
    assert got.trials == want.trials and (got.trials > 0) == (step_size == "armijo")
    assert_close(host(got.B), want.B, np.float64, "B")
    assert_close(host(got.A), want.A, np.float64, "A")


def test_bound_step_is_smaller_and_certified():
    """At the same iterate the bound's eta is at most the exact one's, and the reference's
    g_norm is the bound: step and theory see the same number."""
    problem, B, A = make_linear((30, 12, 7, 3), np.float64, "logistic", seed=11)
    exact = reference.step(problem, B, A)
    bound = reference.step(problem, B, A, step_size=lorakern.Theorem(norm="bound"))
    assert bound.g_norm >= exact.g_norm and bound.eta <= exact.eta
    assert bound.loss == exact.loss and bound.grad_sq == exact.grad_sq


@pytest.mark.parametrize("norm", ["exact", "bound"])
@pytest.mark.parametrize("device", ["reference", "cpu", "cuda-stub"])
@pytest.mark.parametrize("loss, dtype", [("squared", np.float64), ("huber", np.float32),
                                         ("logistic", np.float64), ("cross_entropy", np.float32)])
def test_fitted_histories_satisfy_the_paper(loss, dtype, device, norm, small_parts):
    """Lemma 2 at every step, Theorem 3's bound and the ||V_t||^2 growth bound, with the exact
    norm and with the certified bound in eta_t."""
    problem, B, A = make_linear((60, 14, 8, 4), dtype, loss, seed=12, scale=0.4)
    result = lorakern.fit(problem, B, A, steps=40, device=device_of(device),
                          step_size=lorakern.Theorem(norm=norm))
    assert result.status == "completed" and result.steps == 40
    report = theory.check(result)
    assert report.all_hold, report.summary()
    assert result.final_loss < result.history.loss[0]
    assert result.history.lipschitz == problem.eta_lipschitz


@pytest.mark.parametrize("device", ["cpu", "cuda-stub"])
def test_fit_follows_the_reference(device, small_parts):
    """A fit's trajectory step for step against the reference's (rounding compounds: 100x)."""
    problem, B, A = make_linear((40, 21, 10, 3), np.float64, "cross_entropy", seed=13)
    got = lorakern.fit(problem, B, A, steps=15, device=device_of(device))
    want = lorakern.fit(problem, B, A, steps=15, device="reference")
    for name in ("loss", "eta", "grad_sq", "v_sq", "g_norm"):
        assert_close(getattr(got.history, name), getattr(want.history, name), np.float64, name, 100)
    assert_close(host(got.B), want.B, np.float64, "B_T", 100)


@pytest.mark.parametrize("loss", ["huber", "cross_entropy"])
def test_results_do_not_depend_on_the_thread_count(loss, small_parts, cpu_threads, monkeypatch):
    """The parts, not the threads, fix the order of every sum: 1 Numba thread and 2, and 1,
    4 and 7 workers taking the parts, give the same bits."""
    from lorakern._cpu import workers

    problem, B, A = make_linear((97, 23, 19, 5), np.float32, loss, seed=14)
    passes = {}
    for threads in sorted({1, cpu_threads}):
        numba.set_num_threads(threads)
        passes[f"threads {threads}"] = linear_pass(problem, "cpu", B, A)[1]
    numba.set_num_threads(cpu_threads)
    for count in (1, 4, 7):
        monkeypatch.setattr(workers, "count", lambda: count)
        passes[f"workers {count}"] = linear_pass(problem, "cpu", B, A)[1]
    first = passes.pop("threads 1")
    for label, p in passes.items():
        for name in ("grad_B", "grad_A", "loss", "g_sq", "grad_sq", "v_sq"):
            assert_bitwise(np.asarray(getattr(p, name)), np.asarray(getattr(first, name)),
                           f"{name}, {label}")


def test_inputs_are_never_modified(small_parts):
    problem, B, A = make_linear((11, 6, 5, 2), np.float32, "logistic", seed=15)
    X, Y, W0 = problem.X.copy(), problem.Y.copy(), problem.W0.copy()
    B0, A0 = B.copy(), A.copy()
    for device in ("reference", "cpu", STUB):
        lorakern.fit(problem, B, A, steps=2, device=device)
        lorakern.step(problem, B, A, device=device, step_size=lorakern.Theorem(norm="bound"))
    for a, b in ((X, problem.X), (Y, problem.Y), (W0, problem.W0), (B0, B), (A0, A)):
        assert_bitwise(b, a)



def test_linear_rows_of_the_tables_conform():
    """Every (linear, device) entry of KERNELS is a Kernels module; LinearProblem a ProblemKind."""
    from lorakern import _dispatch
    from lorakern.problems import ProblemKind

    rows = {dev: target for (kind, dev), target in _dispatch.KERNELS.items() if kind == "linear"}
    assert set(rows) == {"reference", "cpu", "cuda"}
    for dev, target in rows.items():
        assert isinstance(_dispatch._load(target), _dispatch.Kernels), target
    problem, _, _ = make_linear((4, 3, 2, 1), np.float64)
    assert isinstance(problem, ProblemKind) and problem.kind == "linear"
    assert problem.adapter_shape() == (2, 3) and problem.arrays()[0] is problem.X


# ---- the exact norm's kernels on arrays not held by a problem (lorakern.torch uses them) ---------
@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("serial", [True, False], ids=["serial", "blas"])
def test_delta_x_norm_sq_both_devices(dtype, serial, monkeypatch):
    """||D^T X||_F^2 by the Gram identity and by tiles, on the CPU (serial Numba loops and the
    BLAS route) and in the CUDA module's array code (run on NumPy), against float64."""
    from lorakern._cpu import linear as cpu_linear
    from lorakern._cuda import linear as cuda_linear

    if not serial:
        monkeypatch.setattr(cpu_linear, "SERIAL_WORK", 0)
    monkeypatch.setattr(cpu_linear, "NORM_TILE", 5)   # several column tiles, a partial one
    monkeypatch.setattr(cuda_linear, "NORM_TILE", 5)
    rng = np.random.default_rng(11)
    D = rng.standard_normal((23, 6)).astype(dtype)
    X = rng.standard_normal((23, 13)).astype(dtype)
    want = float(np.sum((D.astype(np.float64).T @ X.astype(np.float64)) ** 2))
    X64 = X.astype(np.float64)
    K = X64 @ X64.T
    for name, got in (("cpu gram", cpu_linear.delta_x_norm_sq(D, X, K)),
                      ("cpu tiles", cpu_linear.delta_x_norm_sq(D, X)),
                      ("cuda gram", float(cuda_linear.delta_x_norm_sq(np, D, X, K))),
                      ("cuda tiles", float(cuda_linear.delta_x_norm_sq(np, D, X)))):
        assert_close(got, want, dtype, name)
