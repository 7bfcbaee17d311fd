"""One matrix-kind step of this checkout against another checkout's, interleaved across two
processes: did a change cost speed?

    python benchmarks/ab_trees.py --against /path/to/other/checkout
    python benchmarks/ab_trees.py --against ../base --sizes 512x384 4096x4096 --rank 16 --rounds 15

Each checkout runs in its own worker process (PYTHONPATH set to it), holding the same seeded
problems (lorakern.testing.make_case, squared loss unless --loss). After one untimed warm-up
step per case in each, the rounds alternate between the two (which goes first alternates
too), one ``lorakern.step`` (the theorem's eta, device="cpu") per case and worker per round,
timed in the worker. Printed per case: the median (min-max) of each and the round-by-round
ratio this / other as median (quartiles); < 1: this checkout is faster.
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

WORKER = r"""
import json, sys, time
import numpy as np
import lorakern
from lorakern.testing import make_case

runs = []
for m, n, r, dtype, loss in json.loads(sys.argv[1]):
    problem, B, A = make_case((m, n, r), np.dtype(dtype), loss=loss, seed=0)
    run = lambda p=problem, B=B, A=A: lorakern.step(p, B, A, device="cpu", step_size="theorem")
    run()  # untimed: the compile or the cache load
    runs.append(run)
print("ready", flush=True)
for line in sys.stdin:
    t0 = time.perf_counter()
    runs[int(line)]()
    print(time.perf_counter() - t0, flush=True)
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, metavar="DIR", help="the other checkout")
    parser.add_argument("--sizes", nargs="+", default=["512x384", "2048x2048"], metavar="MxN")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--loss", default="squared")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    cases = [(*map(int, size.split("x")), args.rank, dtype, args.loss)
             for size in args.sizes for dtype in args.dtypes]
    workers = {}
    try:
        for name, root in (("this", ROOT), ("other", Path(args.against).resolve())):
            workers[name] = subprocess.Popen(
                [sys.executable, "-c", WORKER, json.dumps(cases)], text=True,
                env=dict(os.environ, PYTHONPATH=str(root)), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE)
        for w in workers.values():
            assert w.stdout.readline().strip() == "ready"
        times = interleave_workers(workers, len(cases), args.rounds)
    finally:
        for w in workers.values():
            w.stdin.close()
            w.wait(timeout=60)
    print(f"Machine: {machine_line()}. Date: {now()}. Load average: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}.")
    print(f"`python benchmarks/ab_trees.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
          f"{args.rounds} interleaved rounds after one warm-up step each. Cells: median ms (min-max); "
          f"ratio this / other, round by round: median (quartiles).")
    print()
    print("| m x n | r | dtype | loss | this | other | this / other |")
    print("|---|---:|---|---|---:|---:|---:|")
    for i, (m, n, r, dtype, loss) in enumerate(cases):
        a, b = Stats.of(times["this"][i]), Stats.of(times["other"][i])
        ratio = Stats.of(x / y for x, y in zip(times["this"][i], times["other"][i]))
        print(f"| {m} x {n} | {r} | {dtype} | {loss} | {1e3 * a.median:.3f} ({1e3 * a.lo:.3f}-"
              f"{1e3 * a.hi:.3f}) | {1e3 * b.median:.3f} ({1e3 * b.lo:.3f}-{1e3 * b.hi:.3f}) | "
              f"{ratio.median:.2f} ({ratio.q1:.2f}-{ratio.q3:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
