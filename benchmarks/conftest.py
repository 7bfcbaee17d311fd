"""Shared fixture for the CPU benchmarks: build a Case once, time one implementation.

Under ``--benchmark-disable`` (the default in pyproject, so CI runs every benchmark once)
a benchmark is a smoke test: cases larger than SMOKE_MAX x SMOKE_MAX shrink to
SMOKE_SIZE x SMOKE_SIZE, the step runs once, and its result is checked against the
NumPy reference. With ``--benchmark-enable`` (benchmarks/run.py) the case runs at its
full size, after one untimed warm-up call (Numba compiles there, not in the rounds).
"""
from __future__ import annotations

import pytest

from lorakern.benchmarking import COMPARISONS, Case, check

SMOKE_MAX = 1024   # disabled mode keeps cases up to 1024 x 1024 ...
SMOKE_SIZE = 256   # ... and runs larger ones at 256 x 256


class _LastCase:
    """Keeps only the most recent Case (its arrays are large): the benchmarks are ordered
    so that every implementation of one case runs before the next case is built."""

    def __init__(self):
        self.case = None

    def get(self, case: Case) -> Case:
        if self.case != case:
            self.case = None  # free the old arrays before building the new ones
            self.case = case
        return self.case


@pytest.fixture(scope="session")
def _case_cache():
    return _LastCase()


@pytest.fixture
def run_impl(benchmark, _case_cache):
    """run_impl(impl, case, group): time COMPARISONS[impl] on case in benchmark group ``group``."""

    def run(impl: str, case: Case, group: str):
        if benchmark.disabled and case.m * case.n > SMOKE_MAX * SMOKE_MAX:
            case = case.smaller(SMOKE_SIZE)
        case = _case_cache.get(case)
        step = COMPARISONS[impl](case)  # setup: not timed
        benchmark.group = group
        benchmark.extra_info.update(impl=impl, m=case.m, n=case.n, r=case.r, dtype=case.dtype)
        if benchmark.disabled:
            check(impl, case, benchmark(step))
        else:
            step()  # warm-up (compiles on first use)
            benchmark(step)

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record lorakern's view of the machine (CPU, cores, Numba threads, BLAS) in the JSON."""
    from lorakern.benchmarking import machine

    machine_info["lorakern"] = machine()
