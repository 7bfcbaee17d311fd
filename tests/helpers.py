"""Shared test helpers: the one tolerance table, the comparison helpers, random problems.
(Fixtures live in conftest.py.)

Numba compiles one CPU kernel per (loss, mask or not, dtype) on first use, 4-9 s each on a
2-core machine; tests reuse losses and dtypes so that they share those compilations.
"""
from __future__ import annotations

import numpy as np
import pytest

import lorakern
from lorakern import reference
from lorakern._cuda import emulation
from lorakern._dispatch import bind

#: relative tolerance by dtype, against the scale (max |expected|) of the quantity compared
#: (~80 ulps of float32, ~4500 of float64). The CPU kernel's worst error over the shapes of
#: test_equivalence and test_losses was 0.09x these (fp32 grad_A at 2053x1031 r16) and
#: 0.03x (fp64 loss), so they leave room for summation order, not for a wrong result.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}

DTYPES = (np.float32, np.float64)
LOSS_NAMES = ("squared", "huber", "logistic")

#: the CUDA kernels run on the host (lorakern/_cuda/emulation.py), a Device object, where g++
#: is found: the generic tests run the CUDA launcher and kernels through it without a GPU
EMULATED = emulation.device() if emulation.available() else None

#: the devices the generic tests run on: those this machine has ('cpu', and 'cuda' where a GPU
#: works), and the emulated CUDA device
DEVICES = lorakern.devices() + ((EMULATED,) if EMULATED is not None else ())

#: the largest problem (m * n) a device runs in the tests: the emulation runs a block's 256
#: threads one after another and switches all of them at every __syncthreads (~0.3 ms), so it
#: gets small shapes only (131 x 67 at rank 64 is the largest of the generic suites it runs)
MAX_ENTRIES = {"cuda-emulated": 10_000}


def skip_if_too_big(device, shape):
    """Skip the test if the (m, n[, r]) problem is above the device's size cap."""
    name = getattr(device, "name", device)
    cap = MAX_ENTRIES.get(name)
    if cap is not None and shape[0] * shape[1] > cap:
        pytest.skip(f"{name} runs problems of up to {cap} entries (a block's 256 threads run one "
                    f"after another); this one is {shape[0]}x{shape[1]}")


def assert_close(actual, expected, dtype, name="value", factor=1.0):
    """|actual - expected| <= RTOL[dtype] * factor * max|expected| elementwise.

    The scale is the quantity's own size, so one tolerance serves gradients, losses and
    iterates. On failure the message gives the max error and the first differing elements.
    """
    rtol = RTOL[np.dtype(dtype)] * factor
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
    """A NumPy copy of a NumPy or CuPy array."""
    return x.get() if hasattr(x, "get") else np.asarray(x)


def random_data(shape, dtype, *, loss="squared", seed=0, scale=1.0, masked=False):
    """(W0, Y, mask) on fresh seeded random numbers; Y in {-1, +1} for logistic."""
    rng = np.random.default_rng(seed)
    m, n = shape
    W0 = (scale * rng.standard_normal((m, n))).astype(dtype)
    if loss == "logistic":
        Y = np.where(rng.random((m, n)) < 0.5, -1.0, 1.0).astype(dtype)
    else:
        Y = (scale * rng.standard_normal((m, n))).astype(dtype)
    mask = (rng.random((m, n)) < 0.6) if masked else None
    return W0, Y, mask


def random_adapters(m, n, r, dtype, *, seed=0, scale=None, init="gaussian"):
    """(B, A) Gaussian (both non-zero), or LoRA's B = 0 with init='lora'."""
    return lorakern.init_adapters(m, n, r, dtype=dtype, seed=seed + 10_000, init=init, scale=scale)


def make_case(shape, dtype, *, loss="squared", masked=False, seed=0, lipschitz=None,
              scale=1.0, init="gaussian", adapter_scale=None, delta=None, device=None):
    """(problem, B, A) for an (m, n, r) shape on fresh seeded random data; with ``device``,
    the test is skipped if the shape is above that device's cap (MAX_ENTRIES)."""
    m, n, r = shape
    if device is not None:
        skip_if_too_big(device, shape)
    W0, Y, mask = random_data((m, n), dtype, loss=loss, seed=seed, scale=scale, masked=masked)
    if not lorakern.LOSSES[loss].uses_delta:
        delta = None  # one call site serves every loss; only huber takes a delta
    problem = lorakern.Problem(W0, Y, loss=loss, mask=mask, lipschitz=lipschitz, delta=delta)
    B, A = random_adapters(m, n, r, dtype, seed=seed, scale=adapter_scale, init=init)
    return problem, B, A


def device_pass(problem, device, B, A):
    """The fused pass of ``problem`` on ``device`` at (B, A) (copied onto the device)."""
    engine = bind(problem, device)
    return engine.fused_pass(engine.asarray(B), engine.asarray(A))


def compare_pass(problem, B, A, device, factor=1.0):
    """The backend's fused pass against the reference's: gradients and the four norms."""
    dt = problem.dtype
    got = device_pass(problem, device, B, A)
    want = reference.fused_pass(problem, None, B, A)
    assert host(got.grad_B).dtype == dt and host(got.grad_A).dtype == dt
    assert_close(host(got.grad_B), want.grad_B, dt, "grad_B", factor)
    assert_close(host(got.grad_A), want.grad_A, dt, "grad_A", factor)
    for name in ("loss", "g_sq", "grad_sq", "v_sq"):
        assert_close(float(getattr(got, name)), getattr(want, name), dt, name, factor)


def compare_step(problem, B, A, device, step_size="theorem", factor=1.0):
    """lorakern.step on ``device`` against reference.step: eta, the norms, the new B and A."""
    got = lorakern.step(problem, B, A, device=device, step_size=step_size)
    want = reference.step(problem, B, A, step_size=step_size)
    dt = problem.dtype
    for name in ("eta", "loss", "grad_sq", "v_sq", "g_norm"):
        value = getattr(got, name)
        assert isinstance(value, float), f"{name} is {type(value).__name__}, not a Python float"
        assert_close(value, getattr(want, name), dt, name, factor)
    assert got.trials == want.trials
    assert host(got.B).dtype == dt and host(got.A).dtype == dt
    assert_close(host(got.B), want.B, dt, "new B", factor)
    assert_close(host(got.A), want.A, dt, "new A", factor)
    return got, want
