"""One exact fused pass of the linear kind with each norm strategy forced, side by side.

    python benchmarks/linear_norm.py                        # N = 4096, m = n = 1024, r = 16, fp32
    python benchmarks/linear_norm.py --N 8192 --m 2048 --n 2048 --rounds 11

The squared loss on ``lorakern.testing.random_linear_data``, device="cpu". Each strategy is
its own LinearProblem (``norm_strategy=...``) on the same arrays, so each keeps its own Gram or
moments: those are made in the untimed warm-up call, and the times are per step. The passes
run interleaved (``lorakern.benchmarking.interleaved``: one warm-up call each, then rounds of
tiles, gram, moments, then a bound pass: the sweep alone, ...), each given as the median
(min-max) of the rounds. Also printed:
the one-time cost (the first call, less a timed pass), the choice of the cost model
(``LinearProblem.norm_strategy_for``) and its priced costs, and the g_sq of each strategy
against the reference's float64 one.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lorakern  # noqa: E402
from lorakern import reference  # noqa: E402
from lorakern._dispatch import bind  # noqa: E402
from lorakern.benchmarking import Stats, interleaved, machine_line, now  # noqa: E402
from lorakern.testing import random_linear_data  # noqa: E402

STRATEGIES = ("tiles", "gram", "moments")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--N", type=int, default=4096)
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    N, m, n, r, dtype = args.N, args.m, args.n, args.rank, np.dtype(args.dtype)
    rng = np.random.default_rng([N, m, n, r])
    X, Y, W0 = random_linear_data(rng, N, n, m, dtype, loss="squared", w0_scale=1 / math.sqrt(n))
    B = (0.1 * rng.standard_normal((m, r))).astype(dtype)
    A = (0.1 * rng.standard_normal((r, n))).astype(dtype)

    engines, first = {}, {}
    for name in STRATEGIES:
        problem = lorakern.LinearProblem(X, Y, W0, norm_strategy=name)
        problem.sigma_sq_bound  # certified L: not the pass's work (the Gram strategy reuses K)
        engine = bind(problem, "cpu")
        Bd, Ad = engine.asarray(B), engine.asarray(A)
        t0 = time.perf_counter()
        engine.fused_pass(Bd, Ad)  # prepares Z0, and the Gram or the moments
        first[name] = time.perf_counter() - t0
        engines[name] = (engine, Bd, Ad)
    runs = {name: (lambda e=e, b=b, a=a: e.fused_pass(b, a)) for name, (e, b, a) in engines.items()}
    e, b, a = engines["tiles"]
    runs["bound"] = lambda: e.fused_pass(b, a, norm="bound")  # the sweep alone: the floor
    times = interleaved(runs, args.rounds)

    auto = lorakern.LinearProblem(X, Y, W0)
    print(f"Machine: {machine_line()}. Date: {now()}.")
    print(f"One exact fused pass, squared loss, N = {N}, m = {m}, n = {n}, r = {r}, {dtype}; "
          f"median (min-max) of {args.rounds} interleaved rounds after one warm-up call each.")
    costs = ", ".join(f"{k} {v:.3g}" for k, v in auto.norm_costs("cpu", r).items())
    print(f"Cost model (cpu): {auto.norm_strategy_for('cpu', r)!r}; costs per step in fp32 "
          f"multiply-adds: {costs}")
    truth = reference.fused_pass(auto, None, B, A).g_sq
    print()
    print("| strategy | pass (ms) | first call, setup included (ms) | g_sq rel. error vs float64 |")
    print("|---|---:|---:|---:|")
    for name in (*STRATEGIES, "bound"):
        t = Stats.of(times[name])
        if name == "bound":
            print(f"| (bound: the sweep alone) | {t.median * 1e3:.1f} ({t.lo * 1e3:.1f}-"
                  f"{t.hi * 1e3:.1f}) | | |")
            continue
        g_sq = float(runs[name]().g_sq)
        print(f"| {name} | {t.median * 1e3:.1f} ({t.lo * 1e3:.1f}-{t.hi * 1e3:.1f}) | "
              f"{first[name] * 1e3:.0f} | {abs(g_sq - truth) / truth:.1e} |")


if __name__ == "__main__":
    main()
