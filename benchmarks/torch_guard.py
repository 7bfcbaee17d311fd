"""The line search's guard on mini-batches: cap, growth and v_growth against the final loss.

    python benchmarks/torch_guard.py                      # the MLP, 3 seeds
    python benchmarks/torch_guard.py --tasks mlp gpt2-mini --seeds 0

The mini-batch tasks of examples/torch_lora_speed.py (one torch thread). Variants of
``LoRAStepOptimizer(model).step(closure)``: the defaults (cap 1, growth 2, v_growth 1.25);
cap 10; cap 10 without the guard (growth and v_growth unbounded); and the search before this
change (``line_search="halving"``: twice the last eta, halved, c = 1e-4) at cap 1 and 10,
the issue's setting. Median over the seeds of the final evaluation loss, the test accuracy
(MLP), the largest ||V'||^2 met, and the steps whose certificate failed.
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch

from lorakern.torch import LoRAStepOptimizer
from load_example import load_example  # benchmarks/load_example.py

VARIANTS = {
    "default (cap 1, growth 2, v_growth 1.25)": dict(),
    "cap 10": dict(cap=10.0),
    "cap 10, no guard": dict(cap=10.0, growth=math.inf, v_growth=math.inf),
    "halving, c 1e-4, cap 1 (before)": dict(line_search="halving", c=1e-4, max_trials=60),
    "halving, c 1e-4, cap 10 (before)": dict(line_search="halving", c=1e-4, cap=10.0,
                                             max_trials=60),
}



def make(model, growth=None, v_growth=None, **kwargs):
    opt = LoRAStepOptimizer(model, **kwargs)
    if opt.line_search is not None:
        if growth is not None:
            opt.line_search.growth = growth
        if v_growth is not None:
            opt.line_search.v_growth = v_growth
    return opt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["mlp"], choices=["mlp", "gpt2-mini"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ex = load_example("torch_lora_speed")
    tasks = []
    if "gpt2-mini" in args.tasks:
        tasks += [t for t in ex.gpt2_tasks(6, 300, 60, 200, False) if t.name == "gpt2-mini"]
    if "mlp" in args.tasks:
        tasks.append(ex.mlp_task(300, 300, False))
    real = ex.make_optimizer
    for task in tasks:
        print(f"\n**{task.name}** ({task.steps} steps, batch {task.batch}, seeds {args.seeds})\n")
        print("| variant | final loss | test acc | max ||V'||^2 | median eta/eta_t | trials/step | "
              "certificate failures |")
        print("|---|---|---|---|---|---|---|")
        for name, kwargs in VARIANTS.items():
            ex.make_optimizer = lambda method, model, rate: make(model, **kwargs)
            runs = [ex.train(task, "lorakern", None, seed) for seed in args.seeds]
            ex.make_optimizer = real
            final = statistics.median(r["final"] for r in runs)
            acc = (f"{statistics.median(r['accuracy'] for r in runs):.3f}"
                   if "accuracy" in runs[0] else "-")
            vmax = statistics.median(max(i.v_sq for i in r["infos"]) for r in runs)
            ratio = statistics.median(i.eta / i.eta_theorem for r in runs for i in r["infos"])
            trials = statistics.mean(i.trials for r in runs for i in r["infos"])
            fails = sum(_failures(r) for r in runs)
            print(f"| {name} | {final:.4f} | {acc} | {vmax:.1f} | {ratio:.0f} | {trials:.2f} "
                  f"| {fails} |")


def _failures(run):
    """Steps without the decrease eta/5 ||grad||^2 at the accepted trial (any search)."""
    return sum(1 for i in run["infos"] if i.eta > i.eta_theorem
               and not i.trial_losses[-1] <= i.loss - 0.2 * i.eta * i.grad_sq)


if __name__ == "__main__":
    main()
