"""The linear kind's step with NumPy's OpenBLAS threads against OPENBLAS_NUM_THREADS=1, with
another process busy on one core (issue 31, item 3).

    python benchmarks/linear_threads.py                      # the cases below, 9 rounds
    python benchmarks/linear_threads.py --rounds 11 --out benchmarks/results/linear-threads-<date>.md
    python benchmarks/linear_threads.py --no-busy            # the same on a machine left alone
    python benchmarks/linear_threads.py --no-busy --against /tmp/old   # this tree against another
                                                             # checkout (git worktree), both default

Two worker processes hold the same problems, one started with the environment as it is
(OpenBLAS's default threads), one with OPENBLAS_NUM_THREADS=1; this script starts and stops
a third, ``python -c "while True: pass"``, that keeps one core busy. After one untimed
warm-up step per case in each worker, the rounds alternate between the two workers (which
goes first alternates too), one ``lorakern.step`` per case and worker per round, timed in
the worker with time.perf_counter. Printed per case: the median (min-max) step of each and
the round-by-round ratio default / one-thread as median (quartiles). The goal: no ratio
above 1.3.

Cases: the sizes of benchmarks/README.md's linear rows (N = 1024, m = n = 4096, r = 16) and
the small one of issue 31 (N = 1024, m = n = 512, r = 8), each with the exact norm
(Theorem()) and the bound (Theorem(norm="bound")), squared and huber, float32 and float64.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorakern.benchmarking import Stats, interleave_workers, machine_line, now  # noqa: E402

#: (N, n, m, r)
SIZES = ((1024, 4096, 4096, 16), (1024, 512, 512, 8))
NORMS = ("exact", "bound")
LOSSES = ("squared", "huber")
DTYPES = ("float32", "float64")

WORKER = r"""
import json, sys, time
import numpy as np
import lorakern
from lorakern.testing import LinearCase

cases = json.loads(sys.argv[1])
runs = []
for N, n, m, r, dtype, loss, norm in cases:
    case = LinearCase(N, n, m, r, dtype)
    problem = lorakern.LinearProblem(case.X, case.Y, case.W0, loss=loss)
    policy = lorakern.Theorem(norm=norm)
    B, A = case.B, case.A
    run = (lambda p=problem, B=B, A=A, s=policy: lorakern.step(p, B, A, device="cpu", step_size=s))
    run()  # untimed: Numba's compile or cache load, the problem's L and its norm's data
    strategy = problem.norm_strategy_for("cpu", r) if norm == "exact" else "bound"
    runs.append((run, strategy))
print(json.dumps([s for _, s in runs]), flush=True)
for line in sys.stdin:
    run = runs[int(line)][0]
    t0 = time.perf_counter()
    run()
    print(time.perf_counter() - t0, flush=True)
"""


QUIET_LABEL = "No busy process started (the machine's other jobs ran as they did)"
BUSY_LABEL = 'One core kept busy by `python -c "while True: pass"`'


def start_worker(cases, one_thread: bool, root: Path = ROOT) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(root))
    if one_thread:
        env["OPENBLAS_NUM_THREADS"] = "1"
    else:
        env.pop("OPENBLAS_NUM_THREADS", None)
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cases)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-busy", action="store_true", help="no busy process")
    parser.add_argument("--small-only", action="store_true", help="only the small size")
    parser.add_argument("--against", metavar="DIR", default=None,
                        help="time the lorakern of DIR (another checkout), default threads, in "
                             "place of OPENBLAS_NUM_THREADS=1")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    sizes = SIZES[1:] if args.small_only else SIZES
    cases = [(*size, dtype, loss, norm) for size in sizes for dtype in DTYPES
             for loss in LOSSES for norm in NORMS]
    busy = None if args.no_busy else subprocess.Popen([sys.executable, "-c", "while True: pass"])
    workers = {}
    try:
        other = (start_worker(cases, False, Path(args.against)) if args.against
                 else start_worker(cases, True))
        workers = {"default": start_worker(cases, False), "one": other}
        strategies = {name: json.loads(w.stdout.readline()) for name, w in workers.items()}
        times = interleave_workers(workers, len(cases), args.rounds)
    finally:
        for w in workers.values():
            if w.stdin:
                w.stdin.close()
            w.wait(timeout=60)
        if busy is not None:
            busy.kill()
            busy.wait()

    peer = f"{args.against} (default threads)" if args.against else "OPENBLAS_NUM_THREADS=1"
    lines = [f"Machine: {machine_line()}. Date: {now()}.",
             f"`python benchmarks/linear_threads.py {' '.join(argv or sys.argv[1:])}`".replace(" `", "`"),
             f"{QUIET_LABEL if args.no_busy else BUSY_LABEL}; "
             f"{args.rounds} interleaved rounds after one warm-up step each. Cells: median ms "
             f"(min-max); ratio: default threads / {peer}, round by round, median (quartiles).",
             "",
             f"| N | n = m | r | dtype | loss | norm (strategy) | default threads | {peer} | ratio |",
             "|---:|---:|---:|---|---|---|---:|---:|---:|"]
    worst = 0.0
    for i, (N, n, m, r, dtype, loss, norm) in enumerate(cases):
        d, o = Stats.of(times["default"][i]), Stats.of(times["one"][i])
        ratio = Stats.of(a / b for a, b in zip(times["default"][i], times["one"][i]))
        worst = max(worst, ratio.median)
        strategy = strategies["default"][i]
        lines.append(f"| {N} | {n} | {r} | {dtype} | {loss} | {norm} ({strategy}) | "
                     f"{1e3 * d.median:.2f} ({1e3 * d.lo:.2f}-{1e3 * d.hi:.2f}) | "
                     f"{1e3 * o.median:.2f} ({1e3 * o.lo:.2f}-{1e3 * o.hi:.2f}) | "
                     f"{ratio.median:.2f} ({ratio.q1:.2f}-{ratio.q3:.2f}) |")
    lines += ["", f"Largest median ratio: {worst:.2f}" + ("." if args.against else " (goal: <= 1.3).")]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
