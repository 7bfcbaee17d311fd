"""The linear kind's step (issue 9) against the plain NumPy step a user would write.

The implementations are rows of the one table, ``lorakern.benchmarking.COMPARISONS``, and the
inputs ``lorakern.testing.LinearCase``; this file times them:

* ``numpy`` (``linear-numpy``): Z = X (W0 + BA)^T, Delta = Z - Y, G = Delta^T X / N,
  grad_B = G A^T, grad_A = B^T G, ||G||_F, the theorem's eta and the update, in the data's dtype;
* ``exact`` (``linear-lorakern-cpu``): ``lorakern.step`` with the theorem's eta and the exact ||G||_F;
* ``bound`` (``linear-lorakern-cpu-bound``): ``lorakern.step`` with ``Theorem(norm="bound")``.

The squared loss, L the problem's certified one for all three. Under --benchmark-disable (CI)
each case shrinks to SMOKE (N, n, m) and runs once, checked against the reference step.

The speed-ups quoted in docs/linear.md come from the interleaved runner, which times the
three side by side (numpy, exact, bound, numpy, ...) after one warm-up call each, and prints
the one ratio table (``lorakern.benchmarking.ratio_table``): each median with its quartiles,
and the round-by-round ratios against the plain step:

    python benchmarks/bench_linear.py                       # N = 1024, fp32 and fp64, 9 rounds
    python benchmarks/bench_linear.py --N 16384 --rounds 9  # the tall case
"""
import argparse
import time

import pytest

from lorakern.benchmarking import (COMPARISONS, Row, Stats, check, interleaved, machine_line,
                                   now, paired_ratio, ratio_table)
from lorakern.testing import LinearCase

#: the issue's shapes: N samples, m = n = 4096, rank 16
SIZES = (1024, 16384)
M = N_IN = 4096
RANK = 16
DTYPES = ("float32", "float64")
#: short name -> the COMPARISONS row
IMPLS = {"numpy": "linear-numpy", "exact": "linear-lorakern-cpu", "bound": "linear-lorakern-cpu-bound"}
#: disabled mode (CI): every case at this (N, n, m)
SMOKE = (96, 80, 72)


PARAMS = [pytest.param(N, dtype, impl, id=f"N{N}-{dtype}-{impl}")
          for N in SIZES for dtype in DTYPES for impl in IMPLS]


@pytest.mark.parametrize("N, dtype, impl", PARAMS)
def test_linear_step(benchmark, N, dtype, impl):
    case = LinearCase(N, N_IN, M, RANK, dtype)
    if benchmark.disabled:
        case = case.smaller(*SMOKE)
    run = COMPARISONS[IMPLS[impl]](case)
    benchmark.group = f"linear step N={case.N} m={case.m} n={case.n} r={case.r} {dtype}"
    benchmark.extra_info.update(impl=impl, N=case.N, m=case.m, n=case.n, r=case.r, dtype=dtype)
    if benchmark.disabled:
        check(IMPLS[impl], case, benchmark(run))
    else:
        benchmark.pedantic(run, rounds=9, warmup_rounds=1)


# ---- the interleaved runner ---------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="the linear kind's step against plain NumPy, interleaved")
    parser.add_argument("--N", type=int, nargs="+", default=[1024])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    print(f"Machine: {machine_line()}. Date: {now()}.")
    print(f"{args.rounds} interleaved rounds after one warm-up call each; m = n = {M}, r = {RANK}, "
          f"squared loss. Cells: median ms (quartiles); 'numpy / x' is the plain step's time over "
          f"x's in the same round.")
    print()
    names = {IMPLS[k]: k for k in IMPLS}
    impls = list(IMPLS.values())
    rows = []
    for N in args.N:
        for dtype in args.dtypes:
            case = LinearCase(N, N_IN, M, RANK, dtype)
            t0 = time.perf_counter()
            problem = case.problem  # certifies L (untimed)
            setup = time.perf_counter() - t0
            runs = {name: COMPARISONS[name](case) for name in impls}
            times = interleaved(runs, args.rounds)  # one warm-up call each, then a, b, c, a, ...
            row = Row(cells=[N, dtype, problem.norm_strategy],
                      times={name: Stats.of(ts) for name, ts in times.items()},
                      ratios={name: paired_ratio(times, "linear-numpy", name) for name in impls[1:]})
            rows.append(row)
            lines = ratio_table([row], labels=["N", "dtype", "norm strategy"], impls=impls,
                                peer="linear-numpy", names=names)
            if len(rows) == 1:
                print("\n".join(lines[:2]))
            print(lines[2], flush=True)
            print(f"<!-- N={N} {dtype}: L = {problem.lipschitz:.6g} certified in {setup:.1f} s -->",
                  flush=True)
            del case, problem, runs
    notes = ratio_table(rows, labels=["N", "dtype", "norm strategy"], impls=impls,
                        peer="linear-numpy", names=names)[2 + len(rows):]
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
