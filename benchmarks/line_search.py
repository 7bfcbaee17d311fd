"""Passes and seconds to a target loss for each step size (issue 24), side by side.

    python benchmarks/line_search.py                          # the demo's problem: 512 x 384, r = 8
    python benchmarks/line_search.py --m 2048 --n 2048 --rank 16
    python benchmarks/line_search.py --m 4096 --n 4096 --rank 16 --steps 150 --rounds 9

The problem is ``lorakern.demo.synthetic_problem`` (Y = W0 + S + noise, S of rank ``rank``,
the squared loss, the LoRA start B = 0) in float32 on device="cpu". The target is J* (1 +
``--within``), J* the least loss at that rank (1/2 sum of the squared singular values of
W0 - Y past the rank-th: scipy's ``svds`` for its top singular values). Each policy runs
``--steps`` steps once; its steps to the target are the first t with J(V_t) <= target, its
passes are those steps' fused passes plus their line-search passes (a loss-only pass for a
backtracking trial, the quartic pass for the exact search), and its seconds are the median
(with min-max) of ``--rounds`` timed fits of exactly that many steps, the policies taking
turns in every round (``FitResult.seconds``: the loop alone, kernels compiled before). A
policy that does not reach the target says so, with J(V_T) / J*.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lorakern  # noqa: E402
from lorakern import Armijo, Certified, demo  # noqa: E402

POLICIES = {
    "theorem": lambda: "theorem",
    "armijo (c = 1e-4)": lambda: Armijo(),
    "certified backtrack (c = 1/5)": lambda: Certified(search="backtrack"),
    "certified exact (quartic)": lambda: Certified(search="exact"),
}


def optimum(problem, rank: int) -> float:
    from scipy.sparse.linalg import svds

    R = np.asarray(problem.R, dtype=np.float64)
    top = svds(R, k=rank, return_singular_vectors=False)
    return 0.5 * (float(np.sum(R * R)) - float(np.sum(top ** 2)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=512)
    parser.add_argument("--n", type=int, default=384)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--within", type=float, default=0.01, help="target: J* (1 + WITHIN)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    d = demo.synthetic_problem(args.m, args.n, args.rank)
    j_star = optimum(d.problem, args.rank)
    target = j_star * (1 + args.within)
    print(f"python benchmarks/line_search.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"lorakern {lorakern.__version__}, device {args.device}")
    print(f"problem {args.m}x{args.n} float32 squared loss, rank {args.rank}; J* = {j_star:.6g}, "
          f"target J* (1 + {args.within:g}) = {target:.6g}, {args.steps} steps at most")
    print()
    print("| step size | steps to target | passes to target | seconds to target, median (min-max) "
          f"| J(V_T) / J* after {args.steps} | passes in {args.steps} steps |")
    print("|---|---|---|---|---|---|")
    rows, reached = {}, {}
    for name, make in POLICIES.items():
        lorakern.fit(d.problem, d.B, d.A, steps=2, device=args.device, step_size=make())  # compile
        run = lorakern.fit(d.problem, d.B, d.A, steps=args.steps, device=args.device, step_size=make())
        loss = np.append(run.history.loss, run.final_loss)
        hit = np.flatnonzero(loss <= target)
        rows[name] = (run, int(hit[0]) if hit.size else None)
        if hit.size:
            reached[name] = []
    for _ in range(args.rounds):  # the policies take turns, so a slow moment hits them all
        for name in reached:
            reached[name].append(lorakern.fit(d.problem, d.B, d.A, steps=rows[name][1],
                                              device=args.device,
                                              step_size=POLICIES[name]()).seconds)
    for name, (run, t) in rows.items():
        passes_all = run.steps + int(run.history.trials.sum())
        if t is None:
            print(f"| {name} | not reached | - | - | {run.final_loss / j_star:.4g} | {passes_all} |")
            continue
        passes = t + int(run.history.trials[:t].sum())
        sec = np.asarray(reached[name])
        print(f"| {name} | {t} | {passes} | {np.median(sec):.3g} ({sec.min():.3g}-{sec.max():.3g}) "
              f"| {run.final_loss / j_star:.6g} | {passes_all} |")

if __name__ == "__main__":
    main()
