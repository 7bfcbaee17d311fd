"""What tests/ and benchmarks/ share: the seeded random problems and the one tolerance table.

* ``make_case(shape, dtype, *, loss, masked, seed, ...) -> (problem, B, A)``: a Problem and
  adapters on fresh seeded random data; ``random_data`` and ``random_adapters`` are its two
  halves. ``Case`` is the same factory for the benchmarks: the arrays of one (m, n, r, dtype,
  seed) built on first use and kept, a Problem per (loss, masked), copies on a GPU library.
* ``RTOL`` (by dtype) and ``FACTORS`` (named multiples of it, each with the reason it is
  needed): ``tolerance(dtype, factor)``; ``assert_close`` and ``assert_bitwise`` compare and,
  on failure, show the first differing elements and the largest error.

Used by the test suite, the benchmarks' smoke checks and ``lorakern.benchmarking.check``; it
imports nothing beyond NumPy and lorakern.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace

import numpy as np

# -- the tolerance table ---------------------------------------------------------------------

#: relative tolerance by dtype, against the scale (max |expected|) of the quantity compared
#: (~80 ulps of float32, ~4500 of float64). The CPU kernel's worst error over the shapes of
#: test_equivalence and test_losses was 0.09x these (fp32 grad_A at 2053x1031 r16) and
#: 0.03x (fp64 loss), so they leave room for summation order, not for a wrong result.
#: On a GPU, CuPy compiles every kernel with ``-ftz=true`` (its NVRTC options): fp32 subnormals
#: (|x| < 1.2e-38) flush to zero there, not in NumPy, Numba or the host emulation.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}

#: named multiples of RTOL: what is compared, and why it needs more (or less) than one
#: kernel against the reference. A factor is a number or a {dtype: number} dict.
FACTORS: dict[str, float | dict] = {
    # one fused pass or one step of a kernel against the NumPy reference
    "kernel": 1.0,
    # one device's two routes to the same number (the loss-only pass against the fused pass,
    # an all-true mask against no mask): the same sums in the same order, up to the last bits
    "same_kernel": 0.01,
    # an entrywise loss formula (value and gradient, float64) against a separately derived
    # one: log1p/exp routes differ by a few ulps per entry, and some arguments reach 1e4
    "formula": 10.0,
    # fit trajectories, step for step, on two devices: the rounding of each step feeds the
    # next, so the difference grows with the steps (6 emulated, 40 on a GPU)
    "fit": {np.dtype(np.float32): 20.0, np.dtype(np.float64): 100.0},
}


def tolerance(dtype, factor: float | str = "kernel") -> float:
    """RTOL[dtype] times a factor: a number, or a name in FACTORS."""
    dtype = np.dtype(dtype)
    if isinstance(factor, str):
        if factor not in FACTORS:
            raise ValueError(f"unknown tolerance factor {factor!r}; known: {sorted(FACTORS)}")
        factor = FACTORS[factor]
    if isinstance(factor, dict):
        factor = factor[dtype]
    return RTOL[dtype] * float(factor)


def assert_close(actual, expected, dtype, name="value", factor: float | str = 1.0):
    """|actual - expected| <= tolerance(dtype, factor) * max|expected| elementwise.

    The scale is the quantity's own size, so one tolerance serves gradients, losses and
    iterates. On failure the message gives the max error and the first differing elements.
    """
    rtol = tolerance(dtype, factor)
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    if not np.isfinite(e).all():
        raise AssertionError(f"{name}: the expected value is not finite")
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    bound = rtol * scale
    err = np.abs(a - e)
    bad = ~(err <= bound)  # NaN in actual counts as bad
    if bad.any():
        idx = np.argwhere(bad) if a.ndim else np.zeros((1, 0), int)
        lines = [f"{name}: {int(bad.sum())} of {a.size} elements differ; max error "
                 f"{np.nanmax(err):.3e} > {bound:.3e} (rtol {rtol:.1e} x scale {scale:.3e}), "
                 f"dtype {np.dtype(dtype)}"]
        for i in idx[:5]:
            i = tuple(int(k) for k in i)
            lines.append(f"  at {i}: actual {a[i]!r}, expected {e[i]!r}, error {err[i]:.3e}")
        raise AssertionError("\n".join(lines))


def assert_bitwise(actual, expected, name="value"):
    """Identical bits (NaNs equal); on failure show the first differing elements."""
    # contiguous 1-d+ copies: a 0-d array or a strided column can not be viewed as bytes
    a = np.ascontiguousarray(np.atleast_1d(np.asarray(actual)))
    e = np.ascontiguousarray(np.atleast_1d(np.asarray(expected)))
    assert a.shape == e.shape and a.dtype == e.dtype, (
        f"{name}: {a.shape} {a.dtype} != {e.shape} {e.dtype}")
    diff = a.view(np.uint8).reshape(a.shape + (-1,)) != e.view(np.uint8).reshape(e.shape + (-1,))
    bad = diff.any(axis=-1)
    if bad.any():
        err = np.abs(a.astype(np.float64) - e.astype(np.float64))
        lines = [f"{name}: {int(bad.sum())} of {a.size} elements differ in their bits; "
                 f"max error {np.nanmax(err):.3e}"]
        for i in (np.argwhere(bad) if a.ndim else np.zeros((1, 0), int))[:5]:
            i = tuple(int(k) for k in i)
            lines.append(f"  at {i}: actual {a[i]!r}, expected {e[i]!r}")
        raise AssertionError("\n".join(lines))


def host(x):
    """A NumPy copy of a NumPy, CuPy (``.get()``) or PyTorch (``.cpu()``) array or scalar."""
    if hasattr(x, "get"):
        return x.get()
    if hasattr(x, "cpu") and hasattr(x, "numpy"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def device_pass(problem, device, B, A):
    """The fused pass of ``problem`` on ``device`` at (B, A) (copied onto the device)."""
    from ._dispatch import bind

    engine = bind(problem, device)
    return engine.fused_pass(engine.asarray(B), engine.asarray(A))


def compare_pass(problem, B, A, device, factor=1.0):
    """The device's fused pass against the reference's: gradients and the four norms."""
    from . import reference

    dt = problem.dtype
    got = device_pass(problem, device, B, A)
    want = reference.fused_pass(problem, None, B, A)
    assert host(got.grad_B).dtype == dt and host(got.grad_A).dtype == dt
    assert_close(host(got.grad_B), want.grad_B, dt, "grad_B", factor)
    assert_close(host(got.grad_A), want.grad_A, dt, "grad_A", factor)
    for name in ("loss", "g_sq", "grad_sq", "v_sq"):
        assert_close(float(getattr(got, name)), getattr(want, name), dt, name, factor)


# -- the seeded problem factory ------------------------------------------------------------

def random_data(shape, dtype, *, loss="squared", seed=0, scale=1.0, masked=False):
    """(W0, Y, mask) on fresh seeded random numbers: W0, Y ~ N(0, scale^2), Y in {-1, +1}
    for "logistic", mask (``masked``) True on about 60% of the entries, else None.

    One generator draws W0, then Y, then the mask, so the squared and Huber problems of one
    seed share W0 and Y, and every loss shares W0. A mask drawn False everywhere (likely at
    tiny shapes: 40 % at 1 x 1) gets one entry observed, drawn after it: an all-False mask
    makes J = 0 for any adapters, which tests nothing and warns (``InputWarning``); a test
    that wants one builds it on purpose. Every other mask is as drawn.

    No test's expectation depends on a subnormal: N(0, scale^2) entries of a scale the tests
    use (>= 1e-3) are subnormal in fp32 (< 1.2e-38) with probability ~1e-35, and so are the
    products and sums of their passes. A GPU flushes fp32 subnormals (CuPy's NVRTC option
    -ftz=true); NumPy and the host emulation keep them (docs/architecture.md).
    """
    from .losses import LOSSES

    rng = np.random.default_rng(seed)
    m, n = shape
    W0 = (scale * rng.standard_normal((m, n))).astype(dtype)
    if loss in LOSSES and LOSSES[loss].labels:
        Y = np.where(rng.random((m, n)) < 0.5, -1.0, 1.0).astype(dtype)
    else:
        Y = (scale * rng.standard_normal((m, n))).astype(dtype)
    mask = (rng.random((m, n)) < 0.6) if masked else None
    if mask is not None and not mask.any():
        mask.flat[rng.integers(mask.size)] = True
    return W0, Y, mask


def random_linear_data(rng, N, n, m, dtype, *, loss="squared", w0_scale=1.0):
    """(X, Y, W0) of a linear layer on data, drawn from ``rng`` in that order: X (N x n) and
    W0 (m x n) ~ N(0, 1) (W0 times ``w0_scale``); Y (N, m) ~ N(0, 1), +-1 for "logistic", or
    (N,) class indices in [0, m) for "cross_entropy"."""
    X = rng.standard_normal((N, n)).astype(dtype)
    W0 = (w0_scale * rng.standard_normal((m, n))).astype(dtype)
    if loss == "cross_entropy":
        Y = rng.integers(0, m, N)
    elif loss == "logistic":
        Y = np.where(rng.random((N, m)) < 0.5, -1.0, 1.0).astype(dtype)
    else:
        Y = rng.standard_normal((N, m)).astype(dtype)
    return X, Y, W0


def random_adapters(m, n, r, dtype, *, seed=0, scale=None, init="gaussian"):
    """(B, A) both Gaussian (standard deviation ``scale``, default 1/sqrt(max(m, n)); both
    non-zero, so that BA and grad_A are not trivial), or LoRA's B = 0 with init="lora".

    A rank above min(m, n) is asked for on purpose (shapes such as 9 x 1 x 2 cross the
    kernels' edge cases), so init_adapters' InputWarning about it is not raised here."""
    from ._validate import InputWarning
    from .adapters import init_adapters

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        return init_adapters(m, n, r, dtype=dtype, seed=seed + 10_000, init=init, scale=scale)


def make_case(shape, dtype, *, loss="squared", masked=False, seed=0, lipschitz=None,
              scale=1.0, init="gaussian", adapter_scale=None, delta=None):
    """(problem, B, A) for an (m, n, r) shape on fresh seeded random data.

    ``delta`` is passed on only for a loss that takes one, so one call site serves every loss.
    """
    from .losses import LOSSES
    from .problems import Problem

    m, n, r = shape
    W0, Y, mask = random_data((m, n), dtype, loss=loss, seed=seed, scale=scale, masked=masked)
    if loss in LOSSES and not LOSSES[loss].uses_delta:
        delta = None
    problem = Problem(W0, Y, loss=loss, mask=mask, lipschitz=lipschitz, delta=delta)
    B, A = random_adapters(m, n, r, dtype, seed=seed, scale=adapter_scale, init=init)
    return problem, B, A


@dataclass(frozen=True)
class Case:
    """One benchmark input: ``make_case``'s data for (m, n, r, dtype, seed), built on first use.

    ``problem(loss, masked)`` is built once per (loss, masked) and kept; ``B``, ``A`` are
    shared by all of them; ``R`` is the squared problem's residual W0 - Y (what a user of
    plain NumPy keeps). ``on("cupy")`` / ``on("torch")`` copy R, B, A to the GPU once.
    """

    m: int
    n: int
    r: int
    dtype: str = "float32"
    seed: int = 0

    def problem(self, loss: str = "squared", masked: bool = False):
        """The lorakern.Problem for ``loss`` (with a mask if ``masked``), built once."""
        cache = self.__dict__.setdefault("_problems", {})
        if (loss, masked) not in cache:
            cache[loss, masked] = make_case((self.m, self.n, self.r), self.dtype, loss=loss,
                                            masked=masked, seed=self.seed)[0]
        return cache[loss, masked]

    @cached_property
    def _adapters(self):
        return random_adapters(self.m, self.n, self.r, self.dtype, seed=self.seed)

    @property
    def B(self) -> np.ndarray:
        return self._adapters[0]

    @property
    def A(self) -> np.ndarray:
        return self._adapters[1]

    @property
    def R(self) -> np.ndarray:
        """The residual W0 - Y of the squared problem."""
        return self.problem().R

    def on(self, library: str) -> SimpleNamespace:
        """R, B and A on the GPU as ``library`` ("cupy" or "torch") arrays, copied once."""
        cache = self.__dict__.setdefault("_on", {})
        if library not in cache:
            import cupy

            if "cupy" not in cache:
                cache["cupy"] = SimpleNamespace(R=cupy.asarray(self.R), B=cupy.asarray(self.B),
                                                A=cupy.asarray(self.A))
            if library == "torch":
                import torch

                gpu = cache["cupy"]  # zero-copy views (DLPack)
                cache["torch"] = SimpleNamespace(**{k: torch.as_tensor(getattr(gpu, k), device="cuda")
                                                    for k in ("R", "B", "A")})
            elif library != "cupy":
                raise ValueError(f"unknown array library {library!r}; use 'cupy' or 'torch'")
        return cache[library]

    def smaller(self, size: int) -> "Case":
        """The same case with m and n cut to at most ``size`` (smoke runs)."""
        return Case(min(self.m, size), min(self.n, size), self.r, self.dtype, self.seed)

    @property
    def elements(self) -> int:
        return self.m * self.n


@dataclass(frozen=True)
class LinearCase:
    """One benchmark input of the linear kind, seeded, built on first use:
    ``random_linear_data``'s X, Y ~ N(0, 1) and W0 ~ N(0, 1/n) (so X W0^T ~ N(0, 1)), and
    ``random_adapters``' B, A ~ N(0, 1/sqrt(r n)), so that BA is of W0's size (B is not LoRA's
    zero: grad_A would vanish). ``problem`` is the squared-loss LinearProblem with its
    certified L."""

    N: int
    n: int
    m: int
    r: int
    dtype: str = "float32"
    seed: int = 0

    @cached_property
    def _data(self):
        rng = np.random.default_rng([self.seed, self.N, self.n, self.m, self.r])
        return random_linear_data(rng, self.N, self.n, self.m, self.dtype,
                                  w0_scale=1 / np.sqrt(self.n))

    @cached_property
    def _adapters(self):
        return random_adapters(self.m, self.n, self.r, self.dtype, seed=self.seed,
                               scale=(self.r * self.n) ** -0.25)

    X = property(lambda self: self._data[0])
    Y = property(lambda self: self._data[1])
    W0 = property(lambda self: self._data[2])
    B = property(lambda self: self._adapters[0])
    A = property(lambda self: self._adapters[1])

    @cached_property
    def problem(self):
        from .problems import LinearProblem

        return LinearProblem(self.X, self.Y, self.W0)

    def smaller(self, N: int, n: int, m: int) -> "LinearCase":
        """The same case capped at (N, n, m) (the benchmarks' smoke size)."""
        return LinearCase(min(self.N, N), min(self.n, n), min(self.m, m), self.r, self.dtype, self.seed)

__all__ = ["RTOL", "FACTORS", "tolerance", "assert_close", "assert_bitwise", "host",
           "device_pass", "compare_pass", "random_data",
           "random_linear_data", "random_adapters", "make_case", "Case", "LinearCase"]
