"""The linear kind's step (issue 9) against the plain NumPy step a user would write.

One table of implementations, ``LINEAR_COMPARISONS`` (name -> setup(case) -> zero-argument
callable returning (B_next, A_next, eta)), used by the pytest-benchmark tests and by the
interleaved runner below:

* ``numpy``: Z = X (W0 + BA)^T, Delta = Z - Y, G = Delta^T X / N, grad_B = G A^T,
  grad_A = B^T G, ||G||_F, the theorem's eta and the update, in the data's dtype;
* ``lorakern-cpu``: ``lorakern.step`` with the theorem's eta and the exact ||G||_F;
* ``lorakern-cpu-bound``: ``lorakern.step`` with ``Theorem(norm="bound")``.

The squared loss, L the problem's certified one for all three. Under --benchmark-disable (CI)
each case shrinks to SMOKE (N, n, m) and runs once, checked against the reference step.

The speed-ups quoted in docs/linear.md come from the interleaved runner, which times the
three side by side (numpy, exact, bound, numpy, ...) after one warm-up call each, and prints
the median of each with its spread (min and max over the rounds) and the ratios:

    python benchmarks/bench_linear.py                       # N = 1024, fp32 and fp64, 9 rounds
    python benchmarks/bench_linear.py --N 16384 --rounds 9  # the tall case
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace

import numpy as np
import pytest

#: the issue's shapes: N samples, m = n = 4096, rank 16
SIZES = (1024, 16384)
M = N_IN = 4096
RANK = 16
DTYPES = ("float32", "float64")
IMPLS = ("numpy", "lorakern-cpu", "lorakern-cpu-bound")
#: disabled mode (CI): every case at this (N, n, m)
SMOKE = (96, 80, 72)


@dataclass(frozen=True)
class LinearCase:
    """Seeded random data: X, Y ~ N(0, 1); W0 ~ N(0, 1/n), so X W0^T ~ N(0, 1); B ~ N(0, 1) and
    A ~ N(0, 1/(r n)), so BA is of W0's size (B is not LoRA's zero: grad_A would vanish)."""

    N: int
    n: int
    m: int
    r: int
    dtype: str = "float32"
    seed: int = 0

    def _normal(self, stream, shape, scale=1.0):
        rng = np.random.default_rng([self.seed, stream, self.N, self.n, self.m, self.r])
        x = rng.standard_normal(shape, dtype=np.dtype(self.dtype).type)
        if scale != 1.0:
            x *= np.dtype(self.dtype).type(scale)
        return x

    @cached_property
    def X(self):
        return self._normal(1, (self.N, self.n))

    @cached_property
    def W0(self):
        return self._normal(2, (self.m, self.n), 1 / math.sqrt(self.n))

    @cached_property
    def Y(self):
        return self._normal(3, (self.N, self.m))

    @cached_property
    def B(self):
        return self._normal(4, (self.m, self.r))

    @cached_property
    def A(self):
        return self._normal(5, (self.r, self.n), 1 / math.sqrt(self.r * self.n))

    @cached_property
    def problem(self):
        import lorakern

        return lorakern.LinearProblem(self.X, self.Y, self.W0)

    def smaller(self):
        N, n, m = SMOKE
        return LinearCase(min(self.N, N), min(self.n, n), min(self.m, m), self.r, self.dtype, self.seed)


def _numpy(case):
    """The plain step: every m x n and N x m matrix formed, in the data's dtype; eta from
    step_size.Theorem.eta (eq. 8 is written once) on Python floats."""
    from lorakern.step_size import THEOREM

    X, Y, W0, B, A, N = case.X, case.Y, case.W0, case.B, case.A, case.N
    L = max(case.problem.lipschitz, 1.0)  # computed once, as a user would
    norm = np.linalg.norm
    host_math = SimpleNamespace(sqrt=math.sqrt, maximum=max)  # eta stays a Python float

    def run():
        Z = X @ (W0 + B @ A).T
        Delta = Z - Y
        G = Delta.T @ X / N
        grad_B, grad_A = G @ A.T, B.T @ G
        g_sq = float(norm(G)) ** 2
        loss = 0.5 * float(np.vdot(Delta, Delta)) / N  # noqa: F841  (a user reports it)
        grad_sq = float(norm(grad_B)) ** 2 + float(norm(grad_A)) ** 2  # noqa: F841
        v_sq = float(norm(A)) ** 2 + float(norm(B)) ** 2
        eta = THEOREM.eta(v_sq, g_sq, L, host_math)
        return B - eta * grad_B, A - eta * grad_A, eta

    return run


def _lorakern(norm):
    def setup(case):
        import lorakern

        problem, B, A = case.problem, case.B, case.A
        policy = lorakern.Theorem(norm=norm)

        def run():
            result = lorakern.step(problem, B, A, device="cpu", step_size=policy)
            return result.B, result.A, result.eta

        return run

    return setup


LINEAR_COMPARISONS = {
    "numpy": _numpy,
    "lorakern-cpu": _lorakern("exact"),
    "lorakern-cpu-bound": _lorakern("bound"),
}


def check(name, case, out):
    """AssertionError unless (B_next, A_next, eta) matches reference.step on the same case,
    within the tests' tolerance (lorakern.testing, factor "kernel"): the worst error of the
    three at SMOKE, 1024 x 256 x 192 and 300 x 500 x 64 (seeds 0-2) was 0.011x RTOL."""
    import lorakern
    from lorakern import reference
    from lorakern.testing import assert_close

    policy = lorakern.Theorem(norm="bound" if name.endswith("bound") else "exact")
    want = reference.step(case.problem, case.B, case.A, step_size=policy)
    for got, expected, what in ((out[0], want.B, "B"), (out[1], want.A, "A")):
        assert got.dtype == np.dtype(case.dtype), f"{name}: {what} is {got.dtype}"
        assert_close(got, expected, case.dtype, f"{name}: new {what}", "kernel")
    assert_close(out[2], want.eta, case.dtype, f"{name}: eta", "kernel")


PARAMS = [pytest.param(N, dtype, impl, id=f"N{N}-{dtype}-{impl}")
          for N in SIZES for dtype in DTYPES for impl in IMPLS]


@pytest.mark.parametrize("N, dtype, impl", PARAMS)
def test_linear_step(benchmark, N, dtype, impl):
    case = LinearCase(N, N_IN, M, RANK, dtype)
    if benchmark.disabled:
        case = case.smaller()
    run = LINEAR_COMPARISONS[impl](case)
    benchmark.group = f"linear step N={case.N} m={case.m} n={case.n} r={case.r} {dtype}"
    benchmark.extra_info.update(impl=impl, N=case.N, m=case.m, n=case.n, r=case.r, dtype=dtype)
    if benchmark.disabled:
        check(impl, case, benchmark(run))
    else:
        benchmark.pedantic(run, rounds=9, warmup_rounds=1)


# ---- the interleaved runner ---------------------------------------------------------------------
def interleaved(case, rounds: int, impls=IMPLS) -> dict:
    """name -> {"median", "min", "max", "times"} (seconds), the rounds interleaved."""
    import statistics

    from lorakern.benchmarking import interleaved as measure

    runs = {name: LINEAR_COMPARISONS[name](case) for name in impls}
    times = measure(runs, rounds)  # one warm-up call each, then a, b, c, a, b, c, ...
    return {name: {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "times": ts}
            for name, ts in times.items()}


def main(argv=None) -> int:
    import time

    import lorakern
    from lorakern.benchmarking import machine_line, now

    parser = argparse.ArgumentParser(description="the linear kind's step against plain NumPy, interleaved")
    parser.add_argument("--N", type=int, nargs="+", default=[1024])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    print(f"Machine: {machine_line()}. Date: {now()}.")
    print(f"Median [min, max] of {args.rounds} interleaved rounds after one warm-up call each; "
          f"m = n = {M}, r = {RANK}, squared loss; 'numpy / x' is the plain step's median over x's.")
    print()
    print("| N | dtype | norm strategy | numpy (ms) | exact (ms) | bound (ms) | numpy / exact | numpy / bound |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for N in args.N:
        for dtype in args.dtypes:
            case = LinearCase(N, N_IN, M, RANK, dtype)
            t0 = time.perf_counter()
            problem = case.problem
            L = problem.lipschitz
            setup = time.perf_counter() - t0
            lorakern.step(problem, case.B, case.A, device="cpu")  # prepares Z0 (untimed)
            s = interleaved(case, args.rounds)
            cell = {name: f"{x['median'] * 1e3:.1f} [{x['min'] * 1e3:.1f}, {x['max'] * 1e3:.1f}]"
                    for name, x in s.items()}

            ratio_e = s["numpy"]["median"] / s["lorakern-cpu"]["median"]
            ratio_b = s["numpy"]["median"] / s["lorakern-cpu-bound"]["median"]
            print(f"| {N} | {dtype} | {problem.norm_strategy} | {cell['numpy']} | "
                  f"{cell['lorakern-cpu']} | {cell['lorakern-cpu-bound']} | {ratio_e:.1f}x | "
                  f"{ratio_b:.1f}x |", flush=True)
            spread = {k: (v["max"] - v["min"]) / v["median"] for k, v in s.items()}
            print(f"<!-- N={N} {dtype}: L = {L:.6g} certified in {setup:.1f} s; spread (max-min)/median: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in spread.items()) + " -->", flush=True)
            del case, problem, s
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
