"""LoRAStepOptimizer's time per step on examples/torch_digits.py, before and after the
small-layer norm in torch (benchmarks/NOTES.md, "The torch optimizer's step"), interleaved.

    python benchmarks/torch_step.py                    # 9 rounds of 100 steps per method
    python benchmarks/torch_step.py --rounds 15 --steps 50
    python benchmarks/torch_step.py --threads 2        # torch's threads (default 1, as the example)

The example's setup (the pretrained MLP, rank-4 LoRALinear adapters on both layers, the
mirrored digits, 1347 images full batch, one torch thread unless --threads). Each round times:
the eta_t step and its Armijo variant with every exact norm in lorakern's CPU kernels
(``lorakern.torch.norms.TORCH_NORM_WORK = 0``: the code path before the change), the same with the
default TORCH_NORM_WORK (these layers' norms as float64 torch products), and SGD and Adam
(lr 0.3 and 0.01) for scale. Each model starts from the same adapters, so the two routes'
final losses must agree to rounding; the script checks it and prints the medians over the
rounds with their quartiles, in ms per step of wall time, and the median of the process's
CPU time per step (all its threads: BLAS and OpenMP threads that spin count there too; another
job on a shared machine moves the wall time more than the CPU time).

Since 2026-12-07 float32 rows (these) take one float32 product whatever TORCH_NORM_WORK is, so
"before" and "after" here run the same code; benchmarks/torch_step_cost.py compares the norm's
routes as they are now.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import lorakern.torch.norms as lt
from load_example import load_example  # benchmarks/load_example.py




def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # 1: as the example
    ex = load_example("torch_digits")
    X, y, _, _ = ex.load_digits(0)
    base = ex.pretrain(X, y, 300, 0)
    Xs = ex.mirrored(X)
    default = lt.TORCH_NORM_WORK
    variants = [("eta_t, kernels (before)", "lorakern", None, 0),
                ("eta_t, torch (after)", "lorakern", None, default),
                ("armijo, kernels (before)", "lorakern+armijo", None, 0),
                ("armijo, torch (after)", "lorakern+armijo", None, default),
                ("sgd lr 0.3", "sgd", 0.3, default),
                ("adam lr 0.01", "adam", 0.01, default)]
    for _, method, rate, work in variants:  # compile the kernels, warm the caches
        lt.TORCH_NORM_WORK = work
        ex.finetune(ex.with_lora(base, 4, 1), Xs, y, 2, method, rate)
    times = {name: [] for name, *_ in variants}
    cpu = {name: [] for name, *_ in variants}
    finals = {}
    print(f"load average before: {os.getloadavg()}")
    for _ in range(args.rounds):
        for name, method, rate, work in variants:
            lt.TORCH_NORM_WORK = work
            model = ex.with_lora(base, 4, 1)
            t0, c0 = time.perf_counter(), time.process_time()
            losses = ex.finetune(model, Xs, y, args.steps, method, rate)
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
            cpu[name].append((time.process_time() - c0) / args.steps * 1e3)
            finals[name] = losses[-1]
    lt.TORCH_NORM_WORK = default
    print(f"load average after: {os.getloadavg()}")
    print(f"\n{args.rounds} interleaved rounds of {args.steps} full-batch steps (1347 images, "
          f"rank 4, {args.threads} torch thread(s)), torch {torch.__version__}\n")
    print(f"{'method':<26}{'ms/step':>9}{'q25':>8}{'q75':>8}{'cpu ms':>8}{'final loss':>14}")
    for name, *_ in variants:
        q25, med, q75 = np.percentile(times[name], [25, 50, 75])
        print(f"{name:<26}{med:>9.2f}{q25:>8.2f}{q75:>8.2f}{np.median(cpu[name]):>8.2f}"
              f"{finals[name]:>14.8f}")
    for kind in ("eta_t", "armijo"):
        a, b = finals[f"{kind}, kernels (before)"], finals[f"{kind}, torch (after)"]
        assert abs(a - b) <= 1e-5 * abs(a), (kind, a, b)  # float32 training: rounding only
        print(f"{kind}: final losses differ by {abs(a - b) / abs(a):.1e} (relative)")


if __name__ == "__main__":
    main()
