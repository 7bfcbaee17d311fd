"""What the README's first uses compile, with an empty kernel cache: seconds per stage.

    python benchmarks/first_compiles.py             # one fresh process, a fresh empty cache
    python benchmarks/first_compiles.py --warmup    # after `lorakern warmup` into that cache

A child process is started with NUMBA_CACHE_DIR set to a new empty folder and runs, in the
README's order: the squared loss in float32 (lorakern.step, then 20 steps of fit with the
certified and the theorem step), the same in float64, Huber (certified and theorem), a mask
(Armijo) and the README's linear layer (cross-entropy: the exact norm, the bound, the
certified step). Printed per stage: wall seconds, CPU seconds of the process
(time.process_time, which the other jobs of a shared machine do not inflate the way they
inflate the wall time) and the dispatchers that took longest to compile (Numba's
"numba:compile" events; nested compiles count in their callers too). With --warmup the
child runs after ``lorakern warmup`` (its wall time printed too) filled that cache.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r'''
import collections, time, warnings
import numpy as np
from numba.core import event
import lorakern

warnings.simplefilter("ignore")
starts, compiles = {}, []

def key(ev):
    return id(ev.data["dispatcher"]), str(ev.data["args"])

class Timer(event.Listener):
    def on_start(self, ev):
        starts[key(ev)] = time.perf_counter()

    def on_end(self, ev):
        name = ev.data["dispatcher"].py_func.__qualname__
        compiles.append((name, time.perf_counter() - starts.pop(key(ev))))

event.register("numba:compile", Timer())
rng = np.random.default_rng(0)
W0 = rng.standard_normal((512, 384)).astype(np.float32)
Y = (W0 + rng.standard_normal((512, 8)) @ rng.standard_normal((8, 384)) / 8).astype(np.float32)
B, A = lorakern.init_adapters(512, 384, rank=8, dtype=np.float32, seed=1)
B64, A64 = B.astype(np.float64), A.astype(np.float64)
X = rng.standard_normal((256, 64)).astype(np.float32)
W_true = rng.standard_normal((10, 64)).astype(np.float32)
classes = np.argmax(X @ W_true.T, axis=1)
W_pre = (W_true + rng.standard_normal(W_true.shape)).astype(np.float32)
Bl, Al = lorakern.init_adapters(10, 64, rank=4, dtype=np.float32, seed=2)

def squared32():
    problem = lorakern.Problem(W0, Y)
    lorakern.step(problem, B, A, device="cpu")
    for step_size in ("certified", "theorem"):
        lorakern.fit(problem, B, A, steps=20, device="cpu", step_size=step_size)

def squared64():
    problem = lorakern.Problem(W0.astype(np.float64), Y.astype(np.float64))
    for step_size in ("certified", "theorem"):
        lorakern.fit(problem, B64, A64, steps=20, device="cpu", step_size=step_size)

def huber():
    problem = lorakern.Problem(W0, Y, loss="huber", delta=0.5)
    for step_size in ("certified", "theorem"):
        lorakern.fit(problem, B, A, steps=20, device="cpu", step_size=step_size)

def mask():
    problem = lorakern.Problem(W0, Y, mask=rng.random(W0.shape) < 0.3)
    lorakern.fit(problem, B, A, steps=20, device="cpu", step_size="armijo")

def linear():
    layer = lorakern.LinearProblem(X, classes, W_pre, loss="cross_entropy")
    for step_size in ("theorem", lorakern.Theorem(norm="bound"), "certified"):
        lorakern.fit(layer, Bl, Al, steps=20, device="cpu", step_size=step_size)

total_wall = total_cpu = 0.0
for name, stage in (("squared fp32", squared32), ("squared fp64", squared64), ("huber", huber),
                    ("mask", mask), ("linear", linear)):
    first = len(compiles)
    t0, c0 = time.perf_counter(), time.process_time()
    stage()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    total_wall, total_cpu = total_wall + wall, total_cpu + cpu
    top = sorted(compiles[first:], key=lambda c: -c[1])[:4]
    print(f"| {name} | {wall:.2f} | {cpu:.2f} | {len(compiles) - first} | "
          + ", ".join(f"{n} {t:.2f}" for n, t in top) + " |", flush=True)
print(f"| total | {total_wall:.2f} | {total_cpu:.2f} | {len(compiles)} | |")
'''


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", action="store_true", help="run `lorakern warmup` first")
    args = parser.parse_args(argv)
    from lorakern.benchmarking import machine_line, now

    cache = tempfile.mkdtemp(prefix="lorakern-first-compiles-")
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
    print(f"Machine: {machine_line()}. Date: {now()}. Load average: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}.")
    print(f"`python benchmarks/first_compiles.py {' '.join(argv or sys.argv[1:])}`, cache {cache}")
    if args.warmup:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lorakern", "warmup"], env=env, check=True)
        print(f"lorakern warmup: {time.perf_counter() - t0:.1f} s wall")
    print()
    print("| stage | wall s | CPU s | compiles | longest compiles (s, nested ones counted in their callers) |")
    print("|---|---:|---:|---:|---|", flush=True)
    return subprocess.run([sys.executable, "-c", CHILD], env=env).returncode


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
