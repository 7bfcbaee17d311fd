"""The fused CPU step against the plain NumPy step, interleaved in one process (issue 11).

    python benchmarks/interleaved.py                       # 4096^2, r in 4 16 64, fp32 and fp64
    python benchmarks/interleaved.py --ranks 16 --dtypes float32 --rounds 15
    python benchmarks/interleaved.py --pause 0.2           # sleep before each call
    python benchmarks/interleaved.py --set lorakern._cpu.matrix.UNIT_ROWS=64   # tuning sweeps

This is what a user's program sees: every round calls the plain NumPy step (its BLAS
threads keep spinning for a while after it returns) and then the fused step, each timed
with time.perf_counter. pytest-benchmark (bench_cpu.py) times each implementation in its own
block, where that never happens.

For every case it prints a row of the one ratio table (lorakern.benchmarking.ratio_table):
the median of each implementation with its quartiles over the rounds, the round-by-round
ratio (median and quartiles), and the floor of the fused step from rates measured in the
same run (benchmarks/floor.py: read bandwidth of a large sum, FMA rate of a BLAS matrix
product), with the fraction of it the fused step reaches (floor / median) and the ratio a
step running at that floor would reach (the peer's median / floor: the most any fused kernel
doing the step's 6 m n r flops at BLAS's rate could show against the same peer, that run). The machine's load average is printed before and
after, since other jobs on a shared machine move the numbers.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import floor  # noqa: E402  (benchmarks/floor.py)
from lorakern.benchmarking import (COMPARISONS, Case, Row, Stats, check, machine_line,  # noqa: E402
                                   now, paired_ratio, ratio_table)


def _set(assignment: str):
    """'pkg.module.NAME=value' -> setattr(pkg.module, NAME, eval(value))."""
    target, _, value = assignment.partition("=")
    module, _, name = target.rpartition(".")
    mod = importlib.import_module(module)
    if not hasattr(mod, name):
        raise SystemExit(f"--set: {module} has no {name}")
    setattr(mod, name, eval(value, {}))  # a developer's own command line


def rates():
    """(read bandwidth B/s, {dtype: FMA flop/s}) as benchmarks/floor.py measures them."""
    return floor.read_bandwidth(), {d: floor.fma_rate(d) for d in ("float32", "float64")}


def floor_seconds(case: Case, bandwidth: float, fma: dict) -> float:
    itemsize = 4 if case.dtype == "float32" else 8
    return max(case.m * case.n * itemsize / bandwidth, 6.0 * case.m * case.n * case.r / fma[case.dtype])


def run_case(case: Case, impl: str, peer: str, rounds: int, pause: float):
    runs = {peer: COMPARISONS[peer](case), impl: COMPARISONS[impl](case)}
    for name, run in runs.items():
        out = run()  # warm-up: Numba compiles here
        if case.m * case.n <= 1024 * 1024:
            check(name, case, out)
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():  # peer first: its BLAS threads are still spinning after it
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to sleep before each call")
    parser.add_argument("--impl", default="lorakern-cpu")
    parser.add_argument("--peer", default="numpy")
    parser.add_argument("--set", action="append", default=[], metavar="MOD.NAME=VALUE",
                        help="patch a tuning constant first (development sweeps)")
    parser.add_argument("--no-floor", action="store_true", help="skip measuring the floor's rates")
    args = parser.parse_args(argv)
    for assignment in args.set:
        _set(assignment)

    print(f"# interleaved: {args.impl} vs {args.peer}, {now()}")
    print(f"machine: {machine_line()}")
    print(f"command: python benchmarks/interleaved.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    bandwidth, fma = (None, None) if args.no_floor else rates()
    if bandwidth:
        print(f"rates: read {bandwidth / 1e9:.1f} GB/s, FMA fp32 {fma['float32'] / 1e9:.0f} "
              f"GFLOP/s, fp64 {fma['float64'] / 1e9:.0f} GFLOP/s")
    print(f"{args.rounds} rounds; ratio = {args.peer}'s time over {args.impl}'s in the same round")
    print()
    extra = {"floor ms": lambda row: f"{row.info['floor'] * 1e3:.1f}" if row.info["floor"] else "-",
             "of floor": lambda row: (f"{row.info['floor'] / row.times[args.impl].median:.0%}"
                                      if row.info["floor"] else "-"),
             # the ratio a fused step running at its floor would reach against this peer
             "ratio at floor": lambda row: (f"{row.times[args.peer].median / row.info['floor']:.2f}x"
                                            if row.info["floor"] else "-")}
    rows = []
    for size in args.size:
        for r in args.ranks:
            for dtype in args.dtypes:
                case = Case(size, size, r, dtype)
                times = run_case(case, args.impl, args.peer, args.rounds, args.pause)
                rows.append(Row(cells=[size, r, dtype],
                                times={k: Stats.of(v) for k, v in times.items()},
                                ratios={args.impl: paired_ratio(times, args.peer, args.impl)},
                                info={"floor": floor_seconds(case, bandwidth, fma) if bandwidth else None}))
                lines = ratio_table(rows[-1:], labels=["m=n", "r", "dtype"], impls=[args.peer, args.impl],
                                    peer=args.peer, extra=extra)
                if len(rows) == 1:
                    print("\n".join(lines[:2]))
                print(lines[2], flush=True)
                del case, times
    print("\n".join(ratio_table(rows, labels=["m=n", "r", "dtype"], impls=[args.peer, args.impl],
                                peer=args.peer, extra=extra)[2 + len(rows):]))
    print()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
