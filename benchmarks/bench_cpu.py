"""The fused CPU step against the plain NumPy step and the reference (issue 2).

One benchmark group per shape and dtype, "step m=n=4096 r=16 float32", holding
lorakern-cpu, numpy and (at m = n = 1024 only: it computes in float64 with several
m x n temporaries) reference. The implementations come from lorakern.benchmarking.

CI runs this file with --benchmark-disable (pyproject's default): each case runs once as
a smoke test checked against the reference, and the 4096 cases shrink to 256 x 256 (see
conftest.py) so the file stays well under a minute, most of it Numba compiling. Time it
with ``python benchmarks/run.py`` (or ``pytest benchmarks --benchmark-enable``).
"""
from __future__ import annotations

import pytest

from lorakern.benchmarking import Case

SIZES = (1024, 4096)
RANKS = (4, 16, 64)
DTYPES = ("float32", "float64")
IMPLS = ("lorakern-cpu", "numpy", "reference")
REFERENCE_MAX = 1024

# impl varies fastest, so all implementations of one case run while it is built
PARAMS = [
    pytest.param(m, r, dtype, impl, id=f"m{m}-r{r}-{dtype}-{impl}")
    for m in SIZES for r in RANKS for dtype in DTYPES for impl in IMPLS
    if not (impl == "reference" and m > REFERENCE_MAX)
]


@pytest.mark.parametrize("m, r, dtype, impl", PARAMS)
def test_step(run_impl, m, r, dtype, impl):
    run_impl(impl, Case(m, m, r, dtype), group=f"step m=n={m} r={r} {dtype}")
