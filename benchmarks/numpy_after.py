"""A lorakern step and the user's NumPy step, each right after the other (issue 11).

    python benchmarks/numpy_after.py                       # m = n = 512, 1024, 2048, r = 16, fp32
    python benchmarks/numpy_after.py --sizes 4096 --rounds 20

Threads that spin after a parallel pass (OpenMP's, OpenBLAS's) take cores from whatever runs
next. Each round times the plain NumPy step (G = R + BA, G Aᵀ, Bᵀ G) once after a 0.2 s
pause (nothing is awake) and once right after a lorakern CPU step, and the lorakern step
once after a pause and once right after the NumPy step; it prints the median (min-max) of
each over the rounds. Equal columns: the step before leaves nothing running behind it.
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
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    print(f"Machine: {machine_line()}. Date: {now()}.")
    print(f"r = {args.rank}, {args.dtype}, median of {args.rounds} rounds (min-max)")
    print()
    print("| m = n | NumPy step: after a pause | right after a lorakern step "
          "| lorakern step: after a pause | right after a NumPy step |")
    print("|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        case = Case(size, size, args.rank, args.dtype)
        problem, R, B, A = case.problem(), case.R, case.B, case.A

        def numpy_step():
            G = R + B @ A
            return G @ A.T, B.T @ G

        def lorakern_step():
            return lorakern.step(problem, B, A, device="cpu", step_size="theorem")

        lorakern_step(), numpy_step()  # compile, warm up
        times = {k: [] for k in ("numpy paused", "numpy after", "lorakern paused", "lorakern after")}
        for _ in range(args.rounds):
            for first, then, name in ((None, numpy_step, "numpy paused"),
                                      (lorakern_step, numpy_step, "numpy after"),
                                      (None, lorakern_step, "lorakern paused"),
                                      (numpy_step, lorakern_step, "lorakern after")):
                if first is None:
                    time.sleep(0.2)
                else:
                    first()
                t0 = time.perf_counter()
                then()
                times[name].append(time.perf_counter() - t0)
        cells = [f"{statistics.median(x) * 1e3:.2f} ({min(x) * 1e3:.2f}-{max(x) * 1e3:.2f})"
                 for x in times.values()]
        print(f"| {size} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
