"""What a lorakern step costs the user's NumPy code that runs right after it (issue 11).

    python benchmarks/numpy_after.py                       # m = n = 1024 and 2048, r = 16, fp32
    python benchmarks/numpy_after.py --sizes 4096 --rounds 20

Threads that spin after a parallel pass (OpenMP's, OpenBLAS's) take cores from whatever runs
next. Each round times the plain NumPy step (G = R + BA, G Aᵀ, Bᵀ G) twice: once after a
0.2 s pause (nothing of ours is awake) and once right after a lorakern CPU step; it prints
the median of each over the rounds. Equal medians: the step leaves nothing running behind it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lorakern  # noqa: E402
from lorakern.benchmarking import Case, machine_line, now  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    print(f"Machine: {machine_line()}. Date: {now()}.")
    print(f"r = {args.rank}, {args.dtype}, median of {args.rounds} rounds (min-max)")
    print()
    print("| m = n | NumPy step after a pause (ms) | NumPy step right after a lorakern step (ms) |")
    print("|---:|---:|---:|")
    for size in args.sizes:
        case = Case(size, size, args.rank, args.dtype)
        problem, R, B, A = case.problem(), case.R, case.B, case.A

        def numpy_step():
            G = R + B @ A
            return G @ A.T, B.T @ G

        def lorakern_step():
            return lorakern.step(problem, B, A, device="cpu")

        lorakern_step(), numpy_step()  # compile, warm up
        paused, after = [], []
        for _ in range(args.rounds):
            time.sleep(0.2)
            t0 = time.perf_counter()
            numpy_step()
            paused.append(time.perf_counter() - t0)
            lorakern_step()
            t0 = time.perf_counter()
            numpy_step()
            after.append(time.perf_counter() - t0)
        cell = [f"{statistics.median(x) * 1e3:.2f} ({min(x) * 1e3:.2f}-{max(x) * 1e3:.2f})"
                for x in (paused, after)]
        print(f"| {size} | {cell[0]} | {cell[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
