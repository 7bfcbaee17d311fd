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


def make_linear(shape, dtype, loss="squared", *, seed=0, scale=0.5, lipschitz=None,
                norm_strategy="auto"):
    """(problem, B, A) on fresh seeded random data; B and A both non-zero."""
    N, n, m, r = shape
    rng = np.random.default_rng([seed, N, n, m, r])
    X, Y, W0 = random_linear_data(rng, N, n, m, dtype, loss=loss, w0_scale=1 / math.sqrt(n))
    kwargs = {"delta": 0.7} if loss == "huber" else {}
    problem = lorakern.LinearProblem(X, Y, W0, loss=loss, lipschitz=lipschitz,
                                     norm_strategy=norm_strategy, **kwargs)
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
#: the devices of the norm strategies' tests: the emulated CUDA device too where this branch
#: has it (its DeviceArrays catch a host array mixed into the moments' products)
NORM_DEVICES = ["cpu", "cuda-stub"] + [t for t in TARGETS if t in ("cuda-emulated", "cuda")]


@pytest.mark.parametrize("device", NORM_DEVICES)
@pytest.mark.parametrize("blas", [False, True], ids=["serial", "blas"])
@pytest.mark.parametrize("strategy", ["moments", "gram", "tiles"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 7, 5, 2), (5, 41, 7, 3), (37, 11, 13, 5),
                                   (130, 9, 6, 4)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_norm_strategy_is_the_plain_norm(dtype, shape, strategy, blas, device, monkeypatch,
                                               small_parts):
    """Each way of computing ||(1/N) Delta^T X||_F, forced on every shape, equals the norm of
    (1/N) Delta^T X formed plainly in float64 from the same Delta, and the reference's.

    "moments" (the squared loss) reads no Delta: it is the norm of the true G, so it meets the
    reference's float64 ||Delta^T X|| / N at float64's tolerance whatever the data's dtype."""
    import lorakern._cpu.linear as cpu

    monkeypatch.setattr(cpu, "SERIAL_WORK", 0 if blas else 1 << 40)  # exact norm: BLAS or loops
    if device != "cpu" and not blas:
        pytest.skip("the CUDA module has one path")
    loss = "squared" if strategy == "moments" else "logistic"
    problem, B, A = make_linear(shape, dtype, loss, seed=7, norm_strategy=strategy)
    assert problem.norm_strategy == strategy and problem.norm_strategy_for("cuda", 1) == strategy
    engine, got = linear_pass(problem, device, B, A)
    want = reference.fused_pass(problem, None, B, A).g_sq
    if strategy == "moments":
        assert engine.data.D is None  # the sweep kept no Delta
        G, _ = reference.gradient(problem, B, A)  # Delta^T X / N formed whole in float64
        assert_close(float(got.g_sq), float(np.sum(G * G)), np.float64, "moments g_sq")
        assert_close(float(got.g_sq), want, np.float64, "moments vs reference")
        return
    D = host(engine.data.D).astype(np.float64)
    plain = np.sum((D.T @ problem.X.astype(np.float64) / problem.N) ** 2)
    assert_close(float(got.g_sq), plain, dtype, f"{strategy} g_sq")
    assert_close(float(got.g_sq), want, dtype, "vs reference")


def near_optimum(dtype, shape=(300, 24, 17, 3), noise=1e-5, seed=16):
    """(problem, B, A, B0, A0): the squared loss with Y = X (W0 + B* A*)^T + noise, at
    (B, A) = (B*, A*) rounded to the dtype (a near-minimiser: G there is the noise's, about
    ``noise`` times its size at (B0, A0), a random start)."""
    N, n, m, r = shape
    rng = np.random.default_rng([seed, N, n, m, r])
    X = rng.standard_normal((N, n))
    W0 = rng.standard_normal((m, n)) / math.sqrt(n)
    B, A = rng.standard_normal((m, r)), rng.standard_normal((r, n)) / math.sqrt(n)
    Y = X @ (W0 + B @ A).T + noise * rng.standard_normal((N, m))
    problem = lorakern.LinearProblem(*(a.astype(dtype) for a in (X, Y, W0)))
    B0, A0 = 0.5 * rng.standard_normal((m, r)), 0.5 * rng.standard_normal((r, n))
    return problem, *(a.astype(dtype) for a in (B, A, B0, A0))


@pytest.mark.parametrize("device", NORM_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_moments_are_accurate_near_convergence(dtype, device, small_parts):
    """Near a least-squares minimiser Delta^T X cancels (G ~ 1e-5 of its size at a random
    start): the float64 moments keep their accuracy (<= 1e-6 relative) against the
    reference's float64 G, where the tiles of a float32 Delta lose most digits (float64 data:
    both near eps64 times the cancellation, either may be the closer)."""
    problem, B, A, B0, A0 = near_optimum(dtype)
    truth = reference.fused_pass(problem, None, B, A).g_sq
    assert truth < 1e-8 * reference.fused_pass(problem, None, B0, A0).g_sq  # converged
    errors = {}
    for strategy in ("moments", "tiles"):
        forced = lorakern.LinearProblem(problem.X, problem.Y, problem.W0, norm_strategy=strategy)
        errors[strategy] = abs(float(linear_pass(forced, device, B, A)[1].g_sq) - truth) / truth
    assert errors["moments"] <= 1e-6, errors
    if dtype == np.float32:  # the float32 Delta has lost most of G's digits there
        assert errors["moments"] <= errors["tiles"] and errors["tiles"] > 1e-5, errors


def test_norm_strategy_rule(monkeypatch):
    """The cheapest available strategy of norm_costs, priced per device: moments for the
    squared loss at large N, never for another loss; between gram and tiles the old rule
    (gram while N <= 2 n) away from its edge; the memory caps respected. Shapes as numbers
    only: nothing is allocated."""
    from lorakern.problems.linear import cheapest, norm_costs

    def choice(N, n, m, r=16, dtype="float32", loss="squared", device="cpu"):
        return cheapest(norm_costs(N, n, m, r, dtype, loss, device))

    for device in ("cpu", "cuda", "reference", "dask"):
        for dtype in ("float32", "float64"):
            # the shape (13.5 ms with the Gram identity against PyTorch's 11.2 ms)
            assert choice(8192, 4096, 4096, 16, dtype, "squared", device) == "moments"
            assert choice(16384, 4096, 4096, 64, dtype, "squared", device) == "moments"
            # few samples: the syrk's N^2 m / 2 is below the moments' r n (n + m) and C0's bytes
            assert choice(256, 4096, 4096, 16, dtype, "squared", device) == "gram"
            for loss in ("huber", "logistic", "cross_entropy"):
                for N, n, m in ((8192, 4096, 4096), (65536, 1024, 1024), (1, 1, 1), (500, 3, 7)):
                    assert "moments" not in norm_costs(N, n, m, 4, dtype, loss, device)
                for n in (1024, 4096):  # the old rule, N <= 2 n, away from its edge
                    assert choice(3 * n // 2, n, n, 16, dtype, loss, device) == "gram"
                    assert choice(3 * n, n, n, 16, dtype, loss, device) == "tiles"
                    assert choice(n // 8, n, n, 16, dtype, loss, device) == "gram"
    # float64 products cost more than float32 ones on the CPU only: the same shape can differ
    costs = {d: norm_costs(2048, 2048, 2048, 16, "float32", "squared", d) for d in ("cpu", "cuda")}
    assert costs["cpu"]["moments"] > costs["cuda"]["moments"]
    assert costs["cpu"]["tiles"] < costs["cuda"]["tiles"]  # a byte costs more on the H200
    # the caps: gram while 16 N^2 bytes fit, moments while 8 (m n + n^2) do
    monkeypatch.setattr(linear_problem, "GRAM_MAX_BYTES", 16 * 9)
    assert "gram" in norm_costs(3, 100, 50, 4, "float64", "huber")
    assert "gram" not in norm_costs(4, 100, 50, 4, "float64", "huber")
    monkeypatch.setattr(linear_problem, "GRAM_MAX_BYTES", 1 << 30)
    monkeypatch.setattr(linear_problem, "MOMENTS_MAX_BYTES", 8 * (4096 * 4096 + 4096 * 4096))
    assert choice(8192, 4096, 4096) == "moments"
    monkeypatch.setattr(linear_problem, "MOMENTS_MAX_BYTES", 8 * (4096 * 4096 + 4096 * 4096) - 1)
    assert "moments" not in norm_costs(8192, 4096, 4096, 16, "float32", "squared")
    assert choice(8192, 4096, 4096) == choice(8192, 4096, 4096, loss="huber") == "tiles"
    with pytest.raises(ValueError, match="no cost weights for device 'tpu'"):
        norm_costs(4, 3, 2, 1, "float32", "squared", "tpu")


def test_problem_reports_its_strategy():
    """norm_strategy_for answers per device and rank, the property is the CPU's at
    NOMINAL_RANK, and a forced strategy is what every device uses."""
    problem, _, _ = make_linear((130, 9, 6, 4), np.float32, "squared")
    costs = problem.norm_costs("cuda", 4)
    assert set(costs) == {"moments", "gram", "tiles"}
    assert problem.norm_strategy_for("cuda", 4) == min(costs, key=costs.get)
    assert problem.norm_strategy == problem.norm_strategy_for("cpu", linear_problem.NOMINAL_RANK)
    assert "moments" not in make_linear((130, 9, 6, 4), np.float32, "huber")[0].norm_costs()
    forced, _, _ = make_linear((130, 9, 6, 4), np.float32, "squared", norm_strategy="gram")
    assert {forced.norm_strategy_for(d, r) for d in ("cpu", "cuda") for r in (1, 64)} == {"gram"}


@pytest.mark.parametrize("device", ["cpu", "cuda-stub"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_strategies_change_g_sq_only(dtype, device, small_parts):
    """At one iterate the passes with each strategy forced give the same gradients, J,
    grad_sq and v_sq to the bit (the sweep is the same; it only keeps Delta or not), and
    g_sq within rounding; fits of the squared loss follow the same iterates."""
    shape = (41, 13, 11, 3)
    passes, fits = {}, {}
    for strategy in ("tiles", "gram", "moments"):
        problem, B, A = make_linear(shape, dtype, "squared", seed=17, norm_strategy=strategy)
        passes[strategy] = linear_pass(problem, device, B, A)[1]
        fits[strategy] = lorakern.fit(problem, B, A, steps=12, device=device_of(device), step_size="theorem")
    first = passes["tiles"]
    for strategy in ("gram", "moments"):
        for name in ("grad_B", "grad_A", "loss", "grad_sq", "v_sq"):
            assert_bitwise(host(getattr(passes[strategy], name)), host(getattr(first, name)),
                           f"{name}, {strategy}")
        assert_close(float(passes[strategy].g_sq), float(first.g_sq), dtype, f"g_sq, {strategy}")
        got, want = fits[strategy], fits["tiles"]
        for name in ("loss", "eta", "g_norm"):
            assert_close(getattr(got.history, name), getattr(want.history, name), dtype, name, 10)
        assert_close(host(got.B), host(want.B), dtype, f"B_T, {strategy}", 10)
        assert_close(host(got.A), host(want.A), dtype, f"A_T, {strategy}", 10)


def test_moments_are_made_once_and_only_for_moments():
    """problem.moments (CPU) and the CUDA module's copy are made on the first exact pass that
    uses them and kept; a bound pass and another strategy make none."""
    problem, B, A = make_linear((29, 7, 5, 2), np.float64, "squared", norm_strategy="moments")
    engine, _ = linear_pass(problem, "cpu", B, A, "bound")
    assert "moments" not in problem.__dict__
    linear_pass(problem, "cpu", B, A)
    C0, Sigma = problem.moments
    X, Y, W0 = (a.astype(np.float64) for a in (problem.X, problem.Y, problem.W0))
    assert_close(C0, (X @ W0.T - Y).T @ X, np.float64, "C0")
    assert_close(Sigma, X.T @ X, np.float64, "Sigma")
    linear_pass(problem, "cpu", B, A)
    assert problem.moments[0] is C0  # kept
    stub, _ = linear_pass(problem, "cuda-stub", B, A)
    assert stub.data.moments is not None and stub.data.K is None and stub.data.D is None
    tiles, _, _ = make_linear((29, 7, 5, 2), np.float64, "squared", norm_strategy="tiles")
    linear_pass(tiles, "cpu", B, A)
    assert "moments" not in tiles.__dict__
    with pytest.raises(ValueError, match="squared loss only"):
        make_linear((29, 7, 5, 2), np.float64, "huber")[0].compute_moments()


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
    got = lorakern.fit(problem, B, A, steps=15, device=device_of(device), step_size="theorem")
    want = lorakern.fit(problem, B, A, steps=15, device="reference", step_size="theorem")
    for name in ("loss", "eta", "grad_sq", "v_sq", "g_norm"):
        assert_close(getattr(got.history, name), getattr(want.history, name), np.float64, name, 100)
    assert_close(host(got.B), want.B, np.float64, "B_T", 100)


@pytest.mark.parametrize("loss", ["huber", "cross_entropy", "squared-moments"])
def test_results_do_not_depend_on_the_thread_count(loss, small_parts, cpu_threads, monkeypatch):
    """The parts, not the threads, fix the order of every sum: 1 Numba thread and 2, and 1, 3,
    4 and 7 workers taking the parts, give the same bits (the squared loss with its exact
    norm from the moments too)."""
    from lorakern._cpu import workers

    problem, B, A = make_linear((97, 23, 19, 5), np.float32, loss.split("-")[0], seed=14)
    if loss == "squared-moments":
        problem = lorakern.LinearProblem(problem.X, problem.Y, problem.W0, norm_strategy="moments")
    passes = {}
    for threads in sorted({1, cpu_threads}):
        numba.set_num_threads(threads)
        passes[f"threads {threads}"] = linear_pass(problem, "cpu", B, A)[1]
    numba.set_num_threads(cpu_threads)
    for count in (1, 3, 4, 7):
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
        lorakern.fit(problem, B, A, steps=2, device=device, step_size="theorem")
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


# ---- the CUDA sweep's three routes (host emulation) ----------------------------------------------
def _emulation_available() -> bool:
    from lorakern._cuda import emulation

    return emulation.available()


@pytest.mark.skipif(not _emulation_available(), reason="no CUDA host emulation (g++)")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss, strategy, norm, route", [
    ("squared", "moments", "exact", "fused_pass"),     # nothing kept: the matrix kind's pass
    ("squared", "tiles", "exact", "linear_pointwise"),  # Delta kept for the norm: one kernel a tile
    ("huber", "gram", "exact", "linear_pointwise"),
    ("huber", "auto", "bound", "fused_pass"),
    ("logistic", "tiles", "bound", "fused_pass"),
    ("logistic", "tiles", "exact", "linear_pointwise"),
    ("cross_entropy", "auto", "bound", None),            # a softmax a row: array expressions
])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (53, 29, 31, 17), (130, 9, 6, 4)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_sweep_routes(shape, dtype, loss, strategy, norm, route, monkeypatch):
    """On the emulated CUDA device a pointwise loss's sweep is the matrix kind's fused pass on
    (Z0, X A^T, B^T) where no Delta is kept (the moments norm, the bound, the loss alone) and
    fused.cu's linear_pointwise where the gram or tiles norm reads Delta; each route matches
    the reference (J, ||G||, both gradients, the norms) at odd shapes, fp32 and fp64."""
    import lorakern._cuda.linear as cuda_linear

    monkeypatch.setattr(cuda_linear, "ROW_TILE", 7)  # several row tiles on the tile route
    N, n, m, r = shape
    rng = np.random.default_rng([N, n, m, r, 11])
    X, Y, W0 = random_linear_data(rng, N, n, m, dtype, loss=loss, w0_scale=1 / math.sqrt(n))
    problem = lorakern.LinearProblem(X, Y, W0, loss=loss, norm_strategy=strategy,
                                     **({"delta": 0.7} if loss == "huber" else {}))
    B = (0.5 * rng.standard_normal((m, r))).astype(dtype)
    A = (0.5 * rng.standard_normal((r, n))).astype(dtype)
    device = device_of("cuda-emulated")
    launched = []
    real = device.runtime.launch
    monkeypatch.setattr(device.runtime, "launch",
                        lambda kernel, *a, **k: launched.append(kernel.name) or real(kernel, *a, **k))
    compare_linear_pass(problem, B, A, device, norm=norm)
    if strategy == "moments":  # the fused float64 pass against the array expressions
        engine = bind(problem, device)
        C0, Sigma = engine.data.moments
        xp = device.xp
        plain = cuda_linear.moments_norm_sq(xp, C0, Sigma, xp.asarray(B), xp.asarray(A))
        fused = cuda_linear._moments_norm_fused(problem, engine.data, xp.asarray(B), xp.asarray(A))
        assert float(fused) == pytest.approx(float(plain), rel=1e-12, abs=1e-300)
    routes = {name for name in ("fused_pass", "linear_pointwise") if any(name in k for k in launched)}
    # the loss alone (compare_linear_pass's loss_pass) always takes the fused pass
    want = {"fused_pass"} if route in (None, "fused_pass") and loss != "cross_entropy" else set()
    if route == "linear_pointwise":
        want = {"linear_pointwise", "fused_pass"}
    assert routes == want, launched


@pytest.mark.skipif(not _emulation_available(), reason="no CUDA host emulation (g++)")
@pytest.mark.parametrize("loss, strategy, norm", [("squared", "moments", "exact"), ("huber", "auto", "bound")])
def test_cuda_ranks_above_the_fused_pass(loss, strategy, norm):
    """Ranks above launch.RANK_BOUNDS (128) take the row tiles and cuBLAS products: the linear
    kind has no rank limit on CUDA, where the matrix kind has."""
    from lorakern._cuda import launch

    N, n, m, r = 23, 9, 7, launch.RANK_BOUNDS[-1] + 2
    rng = np.random.default_rng(5)
    X, Y, W0 = random_linear_data(rng, N, n, m, np.float64, loss=loss, w0_scale=0.3)
    problem = lorakern.LinearProblem(X, Y, W0, loss=loss, norm_strategy=strategy)
    B = (0.1 * rng.standard_normal((m, r))).astype(np.float64)
    A = (0.1 * rng.standard_normal((r, n))).astype(np.float64)
    compare_linear_pass(problem, B, A, device_of("cuda-emulated"), norm=norm)
