"""The tensor-core fused pass (lorakern/_cuda/fused_mma.cu, launch.KERNEL = "mma") against the
NumPy reference and against today's kernel (fused.cu, "simt").

Devices: ``gpu`` (CuPy and a CUDA device; skipped otherwise, by a runtime probe) and the host
emulation under three accumulations an mma may have (``emulated-rn``: the exact sum of products
rounded to nearest even; ``emulated-rz``: truncated; ``emulated-aligned``: each product
truncated at the largest term's last bit, then the sum truncated; the PTX ISA does not say, and
benchmarks/gpu_probe.py measures which, if any, the GPU has: the accuracy tests run under all
three and bound the error, so that a GPU whose model is none of them passes if it is as accurate
as truncation). Correctness tests that do not depend on the rounding run on ``gpu`` and
``emulated-rn`` only, to keep the emulated time small (each mma is a rendezvous of 32 fibers).
On random data nothing is compared bit for bit against the emulation: the same bits are asked
only where the hardware guarantees them (the same kernel and launch run twice).

* every loss x mask x dtype on odd shapes (tiles patched small: 32 x 32, super-tiles of 2 x 3,
  as conftest.small_tiles), ranks 1 .. 128, against the reference with the one tolerance table;
* fp32 accuracy by the issue's rule: each output within max(1e-6, 20 x the error of the plain
  fp32 FMA kernel, fused.cu on the same inputs, never taken below its expected size) of the
  float64 reference, on random data and on near-converged data (t ~ 0.01 R), every loss (the
  rule's derivation is above ``accuracy``); fp64 (DMMA) within the fp64 tolerance;
* plain TF32 (LORAKERN_TF32_PASSES=1, a mutation of fused_mma.cu) fails that rule: the test can
  fail;
* the same bits on every run; the step, run_steps and the loss-only pass on top of it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import lorakern
from lorakern import LOSSES, reference
from lorakern._cuda import CudaDevice, emulation, launch
from lorakern._cuda import matrix as cuda_kernels
from lorakern.problems import Problem

from helpers import assert_bitwise, assert_close, make_case

ROOT = Path(__file__).resolve().parents[1]


def cuda_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no usable GPU
        return False


CUDA = cuda_available()
requires_gpu = pytest.mark.skipif(not CUDA, reason="no CUDA device (CuPy runtime probe)")
requires_gxx = pytest.mark.skipif(not emulation.available(), reason="g++ not found")

ROUNDING = ["gpu", "emulated-rn", "emulated-rz", "emulated-aligned"]  # accuracy: every model
PLAIN = ["gpu", "emulated-rn"]                    # correctness that does not depend on it


def _marks(name):
    return requires_gpu if name == "gpu" else requires_gxx


@pytest.fixture(scope="module")
def _devices():
    made = {}

    def get(name):
        if name not in made:
            if name == "gpu":
                made[name] = lorakern._cuda.DEVICE
            else:
                policy = name.rsplit("-", 1)[1]
                made[name] = CudaDevice(f"cuda-{name}", runtime=emulation.HostRuntime(mma_rounding=policy))
        return made[name]

    return get


def _cuda(_devices, name):
    device = _devices(name)
    return SimpleNamespace(device=device, xp=device.xp, name=name, emulated=name != "gpu",
                           to_host=lambda x: np.asarray(device.to_host(x)))


@pytest.fixture(params=[pytest.param(n, marks=_marks(n)) for n in PLAIN])
def cuda(request, _devices):
    return _cuda(_devices, request.param)


@pytest.fixture(params=[pytest.param(n, marks=_marks(n)) for n in ROUNDING])
def cuda_rounding(request, _devices):
    return _cuda(_devices, request.param)


def small_blocks(monkeypatch, tiles=((32, 32),), rows=2, cols=3):
    """conftest.small_tiles' CUDA half: 32 x 32 tiles, super-tiles of 2 x 3."""
    monkeypatch.setattr(launch, "TILES", tiles)
    monkeypatch.setattr(launch, "ROWS_PER_BLOCK", rows)
    monkeypatch.setattr(launch, "COLS_PER_BLOCK", cols)


def run_pass(cuda, problem, B, A, kernel="mma", grad=True):
    """One fused pass (or the loss-only pass) with launch.KERNEL = kernel; host results."""
    old = launch.KERNEL
    launch.KERNEL = kernel
    try:
        data = problem.data(cuda.device, cuda_kernels)
        xp = cuda.xp
        if not grad:
            return float(cuda_kernels.loss_pass(problem, data, xp.asarray(B), xp.asarray(A)))
        p = cuda_kernels.fused_pass(problem, data, xp.asarray(B), xp.asarray(A))
        assert launch.plan(problem, data, B.shape[1]).kernel == kernel
        return SimpleNamespace(grad_B=cuda.to_host(p.grad_B), grad_A=cuda.to_host(p.grad_A),
                               **{k: float(getattr(p, k)) for k in ("loss", "g_sq", "grad_sq", "v_sq")})
    finally:
        launch.KERNEL = old


def check_against_reference(got, problem, B, A):
    want = reference.fused_pass(problem, None, B, A)
    dt = problem.dtype
    assert got.grad_B.dtype == dt and got.grad_A.dtype == dt
    assert_close(got.grad_B, want.grad_B, dt, "grad_B")
    assert_close(got.grad_A, want.grad_A, dt, "grad_A")
    for name in ("loss", "g_sq", "grad_sq", "v_sq"):
        assert_close(getattr(got, name), getattr(want, name), dt, name)


# ---- the switch ---------------------------------------------------------------------------------
def test_switch_defaults_to_simt_and_reads_the_environment():
    code = "from lorakern._cuda import launch; print(launch.KERNEL)"
    env = {k: v for k, v in os.environ.items() if k != "LORAKERN_CUDA_KERNEL"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "simt"
    env["LORAKERN_CUDA_KERNEL"] = "mma"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "mma"
    with pytest.raises(ValueError, match="one of"):
        launch.rank_bound(4, "tensor")
    assert [launch.rank_bound(r, "mma") for r in (1, 8, 9, 100)] == [8, 8, 16, 128]


@requires_gxx
def test_plan_names_the_kernel(monkeypatch):
    small_blocks(monkeypatch)
    problem, B, A = make_case((37, 45, 3), np.float32)
    device = emulation.device()
    data = problem.data(device, cuda_kernels)
    monkeypatch.setattr(launch, "KERNEL", "mma")
    plan = launch.plan(problem, data, 3)
    assert plan.kernel == "mma" and plan.rk == 8 and "fused_pass_mma" in plan.names["grad"]
    monkeypatch.setattr(launch, "KERNEL", "simt")
    assert launch.plan(problem, data, 3).kernel == "simt"  # its own plan, not the mma one


# ---- against the reference --------------------------------------------------------------------------
SHAPES = [(1, 1, 1), (37, 101, 5), (33, 70, 16), (40, 36, 19), (64, 32, 8)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_on_odd_shapes(cuda, monkeypatch, dtype, shape):
    small_blocks(monkeypatch)
    problem, B, A = make_case(shape, dtype, delta=0.8)
    check_against_reference(run_pass(cuda, problem, B, A), problem, B, A)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_every_loss_and_mask(cuda, monkeypatch, dtype, loss, masked):
    small_blocks(monkeypatch)
    problem, B, A = make_case((37, 101, 5), dtype, loss=loss, masked=masked, seed=3, delta=0.8)
    got = run_pass(cuda, problem, B, A)
    check_against_reference(got, problem, B, A)
    # the loss-only pass: the same phase 1, pointwise and sums as the fused pass (bit for bit in
    # the emulation; on a GPU the compiler may contract the two instances differently)
    loss_only = run_pass(cuda, problem, B, A, grad=False)
    if cuda.emulated:
        assert loss_only == got.loss
    assert_close(loss_only, got.loss, dtype, "loss-only pass", "same_kernel")


@pytest.mark.filterwarnings("ignore:rank .* is above min")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ranks_up_to_128(cuda, monkeypatch, dtype):
    """Every rank bound of the mma kernel (8 .. 128), ranks that are not multiples of 8."""
    small_blocks(monkeypatch, rows=2, cols=2)  # two row tiles per block: grad_A read-add-write
    ranks = [1, 9, 33, 100, 128] if cuda.emulated else [1, 3, 9, 17, 31, 33, 64, 100, 128]
    for r in ranks:
        problem, B, A = make_case((35, 40, r), dtype, seed=r)
        check_against_reference(run_pass(cuda, problem, B, A), problem, B, A)


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_copy_stages(cuda, monkeypatch, dtype, stages):
    """Every pipeline depth, where rows of tiles are one tile long (a new B every tile: B's
    ring of STAGES buffers) and where B has one buffer (rank 100: reloaded at each row). On a
    GPU 2 and 3 only (the launcher's choices; fewer NVRTC modules in ci/gpu.sh's minutes)."""
    if stages == 4 and not cuda.emulated:
        pytest.skip("4 stages: emulated only")
    small_blocks(monkeypatch, rows=3, cols=1)
    monkeypatch.setattr(launch, "MMA_STAGES", (stages, 2))  # 2 where `stages` does not fit
    for shape in [(100, 40, 5), (70, 45, 100)]:
        problem, B, A = make_case(shape, dtype, seed=stages, masked=True)
        check_against_reference(run_pass(cuda, problem, B, A), problem, B, A)
        data = problem.data(cuda.device, cuda_kernels)
        assert launch.plan(problem, data, shape[2]).describe()["stages"] in (stages, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_default_tiles(cuda, dtype):
    """The launcher's own tile choice (64 x 64 where it fits) and super-tiles."""
    problem, B, A = make_case((130, 150, 16), dtype, seed=5, loss="huber", delta=0.8)
    check_against_reference(run_pass(cuda, problem, B, A), problem, B, A)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_repeated_runs_are_bit_identical(cuda, monkeypatch, dtype):
    small_blocks(monkeypatch)
    problem, B, A = make_case((37, 101, 5), dtype, masked=True, seed=11)
    first, second = run_pass(cuda, problem, B, A), run_pass(cuda, problem, B, A)
    assert_bitwise(second.grad_B, first.grad_B, "grad_B")
    assert_bitwise(second.grad_A, first.grad_A, "grad_A")
    for name in ("loss", "g_sq", "grad_sq", "v_sq"):
        assert_bitwise(np.atleast_1d(getattr(second, name)), np.atleast_1d(getattr(first, name)), name)


def test_run_steps_on_the_mma_kernel(cuda, monkeypatch):
    """The tail kernels and the on-device loop work unchanged on top of fused_pass_mma: five
    steps of run_steps follow the reference's steps."""
    small_blocks(monkeypatch)
    monkeypatch.setattr(launch, "KERNEL", "mma")
    problem, B, A = make_case((37, 45, 3), np.float64, seed=2)
    data = problem.data(cuda.device, cuda_kernels)
    run = cuda_kernels.run_steps(problem, data, B, A, 5, eta_fixed=0.02)
    want_B, want_A = B, A
    for _ in range(5):
        want = reference.step(problem, want_B, want_A, step_size=0.02)
        want_B, want_A = want.B, want.A
    assert_close(cuda.to_host(run.B), want_B, np.float64, "B after 5 steps", "fit")
    assert_close(cuda.to_host(run.A), want_A, np.float64, "A after 5 steps", "fit")


# ---- fp32 accuracy: 3xTF32 against plain fp32 FMA, both against float64 ----------------------------
def near_converged(shape, dtype, loss, seed):
    """(problem, B, A) with t = base + BA ~ 0.01 R: W0 = -(BA) + 0.01 noise (entries of R ~ 1).
    Nothing subnormal in fp32 (-ftz=true on the GPU flushes those): |t| ~ 1e-2, products ~ 1."""
    m, n, r = shape
    rng = np.random.default_rng(seed)
    s = r ** -0.25
    B = (s * rng.standard_normal((m, r))).astype(dtype)
    A = (s * rng.standard_normal((r, n))).astype(dtype)
    BA = B.astype(np.float64) @ A.astype(np.float64)
    W0 = (-BA + 0.01 * rng.standard_normal((m, n))).astype(dtype)
    if LOSSES[loss].labels:
        Y = np.where(rng.random((m, n)) < 0.5, -1.0, 1.0).astype(dtype)
    else:
        Y = np.zeros((m, n), dtype)
    delta = 0.005 if LOSSES[loss].uses_delta else None  # Huber: both branches near convergence
    return Problem(W0, Y, loss=loss, delta=delta), B, A


def rebuild(problem, dtype=None, mask="same", base=None):
    """The same problem's data in ``dtype`` (exact for float32 -> float64), with ``mask`` (and
    ``base`` in place of its own where given)."""
    dtype = problem.dtype if dtype is None else np.dtype(dtype)
    base = np.asarray(problem.base if base is None else base).astype(dtype)
    Y = np.asarray(problem.labels).astype(dtype) if problem.loss.labels else np.zeros_like(base)
    if isinstance(mask, str):
        mask = None if problem.mask is None else np.asarray(problem.mask).astype(bool)
    return Problem(base, Y, loss=problem.loss.name, mask=mask,
                   delta=problem.delta if problem.loss.uses_delta else None)


def errors_against_float64(got, problem, B, A):
    """Relative error of each output against the float64 reference of the same inputs."""
    want = reference.fused_pass(rebuild(problem, np.float64), None, B.astype(np.float64), A.astype(np.float64))
    out = {}
    for name in ("grad_B", "grad_A"):
        ref = getattr(want, name)
        out[name] = float(np.abs(getattr(got, name) - ref).max() / max(np.abs(ref).max(), 1e-300))
    for name in ("loss", "g_sq"):
        ref = getattr(want, name)
        out[name] = abs(getattr(got, name) - ref) / max(abs(ref), 1e-300)
    return out


# The accuracy rule (flash-attention's form): mma error <= max(FLOOR, K x the fp32 FMA kernel's
# error), both against float64, with K = 20 and FLOOR = 1e-6 (the goal). The FMA kernel's
# error is the measured one, but never less than what its accumulation is *expected* to cause:
# a measured error is one draw, and on an aggregate output (the loss, ||G||^2: sums over all m n
# entries of t = base + B A) round-to-nearest's errors cancel, so the draw can sit at the output's
# own last-bit rounding (~u), far under its spread. The expected size, derived: t's chain in
# fused.cu is r FMAs from the base, s_k = base + sum_{k' <= k} B_ik' A_k'j, each rounding a
# relative error uniform in [-u, u] of s_k (u = 2^-24): variance u^2 s_k^2 / 3, so t_ij is off by
# about sigma_ij = u sqrt(sum_k s_k^2 / 3). fma_expected moves t by N(0, 1) x sigma (one fixed
# draw, in float64) and takes each output's relative change. Why K x that covers truncation and any
# model as accurate: an mma accumulating with truncation makes 3 ceil(r / 8) roundings of t's
# chain (3xTF32: three mma per 8 ranks), each an error in [0, 2u) of the running sum, whose sign
# changes along the chain (B A's partial sums wander around 0), so they add like a random walk of
# 3 ceil(r / 8) steps of rms 2u / sqrt(3) against the FMA chain's r + 1 of rms u / sqrt(3): a
# ratio of 2 sqrt(3 ceil(r / 8) / (r + 1)) <= 1.6 for r >= 8 (2.5 at r = 1), plus the 3xTF32
# split's dropped terms (<= 3 x 2^-22 = 12 u of each product, whatever the model) and the
# phases after t, which round as the FMA kernel's do. A model whose errors are no larger than
# truncation's is then within a few times the FMA kernel's expected error: K = 20 leaves it a
# margin of 5 or more. Measured in the emulation on this file's cases (2026-12-07; the largest
# mma error over its bound): RN 0.11, RZ 0.30, "aligned" (terms truncated at the largest one's
# last bit first, emulation.h) 0.40. Plain TF32 (one product: 2^-11 of each, ~2^13 u) is far
# outside (test_plain_tf32_fails_the_accuracy_rule).
# No input here is subnormal in fp32, nor any intermediate the expectations depend on: entries of
# B, A, base are N(0, 1)-sized (>= ~1e-4 in practice; the smallest normal fp32 is 1.2e-38), and
# NVRTC's -ftz=true (CuPy's option) flushes fp32 subnormals on the GPU but not in NumPy or the
# emulation (docs/architecture.md, "Accuracy").
U32 = 2.0**-24
K_FMA, FLOOR = 20.0, 1e-6


def fma_expected(problem, B, A, seed=0):
    """{output: relative change} when t = base + B A moves by one N(0, 1) draw x sigma_ij =
    u sqrt(sum_k s_k^2 / 3) (s_k: the FMA chain's partial sums from the base): the error an fp32
    FMA chain over the rank is expected to make (see the rule above); float64 throughout."""
    p64 = rebuild(problem, np.float64)
    B64, A64 = B.astype(np.float64), A.astype(np.float64)
    base = np.asarray(p64.base)
    partial = base[:, :, None] + np.cumsum(B64[:, None, :] * A64.T[None, :, :], axis=2)  # m x n x r
    sigma = U32 * np.sqrt((partial * partial).sum(axis=2) / 3)
    moved = rebuild(p64, base=base + np.random.default_rng(seed).standard_normal(base.shape) * sigma)
    return errors_against_float64(reference.fused_pass(moved, None, B64, A64), problem, B, A)


def accuracy(cuda, problem, B, A):
    """{output: (mma error, simt error, bound)}, bound = max(FLOOR, K_FMA x max(simt error,
    its expected size)) (the rule above)."""
    mma = errors_against_float64(run_pass(cuda, problem, B, A, "mma"), problem, B, A)
    simt = errors_against_float64(run_pass(cuda, problem, B, A, "simt"), problem, B, A)
    expected = fma_expected(problem, B, A)
    return {k: (mma[k], simt[k], max(FLOOR, K_FMA * max(simt[k], expected[k]))) for k in mma}


def assert_accurate(report):
    bad = {k: v for k, v in report.items() if not v[0] <= v[2]}
    assert not bad, f"(mma error, fp32 FMA error, bound) outside the bound: {bad}; all: {report}"


DATA = ["random", "near-converged"]


def accuracy_case(kind, loss, shape=(100, 130, 16), seed=7):
    if kind == "random":
        problem, B, A = make_case(shape, np.float32, loss=loss, seed=seed, delta=0.8)
        return problem, B, A
    return near_converged(shape, np.float32, loss, seed)


@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_fp32_accuracy_3xtf32(cuda_rounding, kind, loss):
    """Default tiles (64 x 64: phase 3 chains 64 rows, phase 2 a warp's 32 columns)."""
    problem, B, A = accuracy_case(kind, loss)
    assert_accurate(accuracy(cuda_rounding, problem, B, A))


@pytest.mark.filterwarnings("ignore:rank .* is above min")
@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize("case", ["r64-squared-masked", "r128-huber"])
def test_fp32_accuracy_at_high_rank(cuda_rounding, kind, case):
    """The longest chains: phase 1 over 64 ranks (8 K steps x 3 mma, default 64 x 64 tiles) with
    a mask, and over 128 ranks (16 K steps; under RZ the closest to the bound: ~0.6 of it)."""
    if case == "r64-squared-masked":
        problem, B, A = accuracy_case(kind, "squared", shape=(70, 66, 64), seed=9)
        problem = rebuild(problem, mask=np.random.default_rng(1).random(problem.shape) < 0.6)
    else:
        problem, B, A = accuracy_case(kind, "huber", shape=(70, 130, 128), seed=4)
    assert_accurate(accuracy(cuda_rounding, problem, B, A))


@requires_gxx
@pytest.mark.parametrize("kind", DATA)
def test_plain_tf32_fails_the_accuracy_rule(monkeypatch, _devices, kind):
    """The mutation check: fused_mma.cu with one TF32 product (LORAKERN_TF32_PASSES=1) instead
    of three misses the bound, so the tests above can fail."""
    source = launch.mma_kernel_source()
    monkeypatch.setattr(launch, "mma_kernel_source", lambda: "#define LORAKERN_TF32_PASSES 1\n" + source)
    cuda = _cuda(_devices, "emulated-rn")
    problem, B, A = accuracy_case(kind, "squared")
    report = accuracy(cuda, problem, B, A)
    assert any(mma > bound for mma, _, bound in report.values()), report
    assert report["grad_B"][0] > 10 * report["grad_B"][2], report  # far off, not at the edge


# ---- 128 x 64 tiles (fp32): one warp column, grad_B flushed from registers ----------------------
WIDE = ((128, 64),)


@pytest.mark.parametrize("rank", [3, 16, 29])
@pytest.mark.parametrize("loss, masked", [("squared", True), ("logistic", False), ("huber", False)])
def test_wide_tiles(cuda, monkeypatch, rank, loss, masked):
    """128 x 64 fp32 tiles (WR = 8 warps of 16 rows, WC = 1: each warp's grad_B sums are final
    and go out from its C fragments): odd shapes across row and column tiles, super-tiles of
    2 x 2 (grad_A read-add-write, grad_B per row tile), every rank bound up to 32, each loss,
    a mask; against the reference, and within the accuracy bound of the 64 x 64 pass."""
    small_blocks(monkeypatch, tiles=WIDE, rows=2, cols=2)
    problem, B, A = make_case((300, 150, rank), np.float32, loss=loss, masked=masked, seed=rank, delta=0.8)
    got = run_pass(cuda, problem, B, A)
    check_against_reference(got, problem, B, A)
    data = problem.data(cuda.device, cuda_kernels)
    assert launch.plan(problem, data, rank).describe()["bm"] == 128
    assert_accurate(accuracy(cuda, problem, B, A))


def test_wide_tiles_run_steps_and_loss_pass(cuda, monkeypatch):
    """The device loop and the loss-only pass on 128 x 64 tiles: the same bits on two runs,
    the loss-only pass equal to the full pass's loss."""
    small_blocks(monkeypatch, tiles=WIDE, rows=1, cols=2)
    problem, B, A = make_case((200, 130, 8), np.float32, seed=2)
    old = launch.KERNEL
    launch.KERNEL = "mma"
    try:
        data = problem.data(cuda.device, cuda_kernels)
        runs = [cuda_kernels.run_steps(problem, data, B, A, 3, eta_fixed=0.01) for _ in range(2)]
    finally:
        launch.KERNEL = old
    assert np.array_equal(runs[0].history, runs[1].history)  # the same kernels and launches
    assert np.array_equal(cuda.to_host(runs[0].B), cuda.to_host(runs[1].B))
    loss_only, full = run_pass(cuda, problem, B, A, grad=False), run_pass(cuda, problem, B, A).loss
    if cuda.emulated:  # two instances of the kernel: a GPU's compiler may contract them apart
        assert loss_only == full
    assert_close(loss_only, full, np.float32, "loss-only pass", "same_kernel")
