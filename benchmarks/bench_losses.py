"""The masked, Huber and logistic steps against the squared one (issue 4).

Groups "loss m=n=4096 r=16 float32" (and float64) hold lorakern-cpu (the squared loss,
the peer), lorakern-cpu-masked (squared loss, ~60% of entries observed),
lorakern-cpu-huber (delta = 1, about half the entries clipped) and lorakern-cpu-logistic
(labels in {-1, +1}; reads W0 and Y, two arrays, where the others read one).

Under --benchmark-disable (CI) each runs once at 256 x 256 and is checked against the
reference (see conftest.py); most of the time is Numba compiling the three losses.
"""
from __future__ import annotations

import pytest

from lorakern.benchmarking import Case

M, R = 4096, 16
DTYPES = ("float32", "float64")
IMPLS = ("lorakern-cpu", "lorakern-cpu-masked", "lorakern-cpu-huber", "lorakern-cpu-logistic")

PARAMS = [pytest.param(dtype, impl, id=f"m{M}-r{R}-{dtype}-{impl}")
          for dtype in DTYPES for impl in IMPLS]


@pytest.mark.parametrize("dtype, impl", PARAMS)
def test_loss_step(run_impl, dtype, impl):
    run_impl(impl, Case(M, M, R, dtype), group=f"loss m=n={M} r={R} {dtype}")
