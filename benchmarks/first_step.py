"""How long a new process takes to its first CPU step (issue 11: under 1 s from the cache).

    python benchmarks/first_step.py                  # float32 and float64, 9 warm processes each
    python benchmarks/first_step.py --rounds 15 --dtypes float32
    python benchmarks/first_step.py --kind linear    # a LinearProblem (N = m = n = 64)

Each process starts Python, imports lorakern, builds a 64 x 64 squared-loss problem (or a
linear layer on 64 rows of data) and takes one step on device="cpu", timed from the first line of the script (interpreter start-up itself
is not counted). The first process of each dtype runs on an empty cache directory
(NUMBA_CACHE_DIR=<tmp>, so it compiles); the next ones find its kernels there. For scale, the
same timing of a process that only imports numpy and numba is printed too. The processes run
without PYTHONDONTWRITEBYTECODE (set on this project's machines), so Python writes and then
reads its .pyc files, as it does on a user's machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, time
t0 = time.perf_counter()
import numpy as np
{body}
print(json.dumps({{"seconds": time.perf_counter() - t0}}))
"""

STEP = """
import lorakern
rng = np.random.default_rng(0)
W0, Y = rng.standard_normal((64, 64)).astype("{dtype}"), rng.standard_normal((64, 64)).astype("{dtype}")
B, A = lorakern.init_adapters(64, 64, rank=4, dtype="{dtype}", seed=1, init="gaussian")
lorakern.step(lorakern.Problem(W0, Y), B, A, device="cpu")
"""

LINEAR_STEP = """
import lorakern
rng = np.random.default_rng(0)
X, Y = rng.standard_normal((64, 64)).astype("{dtype}"), rng.standard_normal((64, 64)).astype("{dtype}")
W0 = rng.standard_normal((64, 64)).astype("{dtype}")
B, A = lorakern.init_adapters(64, 64, rank=4, dtype="{dtype}", seed=1, init="gaussian")
lorakern.step(lorakern.LinearProblem(X, Y, W0), B, A, device="cpu")
"""


def seconds(body: str, cache: str) -> float:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as on a user's machine: imports read .pyc files
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(body=body)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="warm processes per dtype")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--kind", choices=("matrix", "linear"), default="matrix")
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as cache:
        base = [seconds("import numba", cache) for _ in range(args.rounds)]
        print(f"import numpy, numba only: median {statistics.median(base):.2f} s "
              f"({min(base):.2f}-{max(base):.2f}, {len(base)} processes)")
        for dtype in args.dtypes:
            body = (STEP if args.kind == "matrix" else LINEAR_STEP).format(dtype=dtype)
            cold = seconds(body, cache)
            warm = [seconds(body, cache) for _ in range(args.rounds)]
            print(f"{args.kind} {dtype}: first step, empty cache {cold:.1f} s; from the cache median "
                  f"{statistics.median(warm):.2f} s ({min(warm):.2f}-{max(warm):.2f}, "
                  f"{len(warm)} processes)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
