"""Shared test helpers: the comparison helpers against the reference, and (from
lorakern.testing) the one tolerance table and the seeded problem factory.
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

# the one tolerance table and the seeded problem factory live in the package, shared with
# benchmarks/ and lorakern.benchmarking; re-exported here for the tests
from lorakern.testing import make_case as _make_case
from lorakern.testing import (FACTORS, RTOL, assert_bitwise, assert_close,  # noqa: F401
                              compare_pass, device_pass, host, random_adapters, random_data,
                              tolerance)

DTYPES = (np.float32, np.float64)
LOSS_NAMES = ("squared", "huber", "logistic")

#: the CUDA kernels run on the host (lorakern/_cuda/emulation.py), a Device object, where g++
#: is found: the generic tests run the CUDA launcher and kernels through it without a GPU
EMULATED = emulation.device() if emulation.available() else None

#: the devices the generic tests run on: the kernels this machine has ('cpu', and 'cuda' where
#: a GPU works; not 'reference', the truth they are compared with), and the emulated CUDA device
DEVICES = (tuple(d for d in lorakern.devices() if d != "reference")
           + ((EMULATED,) if EMULATED is not None else ()))

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


def make_case(shape, dtype, *, device=None, **kwargs):
    """lorakern.testing.make_case; with ``device``, the test is skipped if the shape is above
    that device's cap (MAX_ENTRIES)."""
    if device is not None:
        skip_if_too_big(device, shape)
    return _make_case(shape, dtype, **kwargs)


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
