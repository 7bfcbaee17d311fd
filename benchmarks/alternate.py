"""Tuning settings of the CPU kernel compared in one process, each round interleaved with NumPy.

    python benchmarks/alternate.py --ranks 16 64 --configs "" "matrix.LARGE_RANK=1000"
    python benchmarks/alternate.py --ranks 4 --configs "matrix.G_BYTES=24576" "matrix.G_BYTES=49152"
    python benchmarks/alternate.py --configs "workers.WORKERS_PER_CORE=1" "workers.WORKERS_PER_CORE=2"

Each configuration (comma-separated NAME=VALUE settings of lorakern._cpu's modules; "" is
the defaults) gets its own problem, so its workspace is kept between its calls like a user's.
Every round runs NumPy's step then lorakern's, once per configuration, in an order that
reverses every round; it prints the median ms of each configuration and the median (and
quartiles) of its round-by-round ratio to the NumPy step just before it. benchmarks/
interleaved.py runs one configuration per process (--set); this one puts them side by side,
where the machine's drift between processes cannot decide the comparison.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakern.benchmarking import COMPARISONS, Case, machine_line, now  # noqa: E402


def _settings(config: str):
    """[(module, name, value)] of 'matrix.BLOCK_ROWS=24,workers.WORKERS_PER_CORE=1'."""
    out = []
    for item in filter(None, config.split(",")):
        target, value = item.split("=")
        module, name = target.rsplit(".", 1)
        mod = importlib.import_module(f"lorakern._cpu.{module}")
        if not hasattr(mod, name):
            raise SystemExit(f"lorakern._cpu.{module} has no {name}")
        out.append((mod, name, ast.literal_eval(value)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--configs", nargs="+", default=[""])
    args = parser.parse_args(argv)
    configs = {c or "defaults": _settings(c) for c in args.configs}
    defaults = {(mod, name): getattr(mod, name) for s in configs.values() for mod, name, _ in s}

    def apply(settings):
        for (mod, name), value in defaults.items():
            setattr(mod, name, value)
        for mod, name, value in settings:
            setattr(mod, name, value)

    print(f"# alternate: {now()}; {machine_line()}")
    print(f"command: python benchmarks/alternate.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    for dtype in args.dtypes:
        for r in args.ranks:
            case = Case(args.size, args.size, r, dtype)
            numpy_step = COMPARISONS["numpy"](case)
            numpy_step()
            steps = {}
            for label, settings in configs.items():
                apply(settings)
                steps[label] = COMPARISONS["lorakern-cpu"](Case(args.size, args.size, r, dtype))
                steps[label]()  # compiled, workspace made
            times = {label: [] for label in configs}
            ratios = {label: [] for label in configs}
            order = list(configs)
            for k in range(args.rounds):
                for label in (order if k % 2 == 0 else order[::-1]):
                    apply(configs[label])
                    t = time.perf_counter()
                    numpy_step()
                    t_numpy = time.perf_counter() - t
                    t = time.perf_counter()
                    steps[label]()
                    t_step = time.perf_counter() - t
                    times[label].append(t_step)
                    ratios[label].append(t_numpy / t_step)
            apply([])
            cells = []
            for label in configs:
                q1, q3 = np.percentile(ratios[label], [25, 75])
                cells.append(f"{label}: {statistics.median(times[label]) * 1e3:.1f} ms "
                             f"({statistics.median(ratios[label]):.2f}x, {q1:.2f}-{q3:.2f})")
            print(f"{args.size}^2 r={r} {dtype}: " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
