"""What ``LoRAStepOptimizer.step()`` itself costs, against a whole AdamW training step.

    python benchmarks/torch_step_cost.py                  # batch 256 and 32, 9 rounds
    python benchmarks/torch_step_cost.py --batches 256 --rounds 15

The tiny GPT-2 of examples/torch_lora_speed.py (LoRA r = 8 on c_attn and c_proj, sequences
of 13 tokens, one torch thread). Each round, in turn, on the same batch: an AdamW training
step (zero_grad, forward, backward, ``step()``: the clock runs over all of it) and, after
their own forward and backward (not timed), ``opt.step()`` of lorakern's optimizer alone
(the eta_t step: ||G||, ||V'||^2, ||grad||^2, the update) with the exact norm in float32
products raised by their rounding bound (the default), the same norm from float64 products
(the route before it), and norm="bound"; and the line search's ``step(closure)`` whole
(gradient pass plus forward-only trials), and its own time (less the closure's calls) with
the exact norm and with norm="lazy"; the closure alone (a gradient pass) and a trial (the
closure forward-only) give the passes a step of one trial costs. Median ms of ``--rounds``
rounds (``--calls`` timed calls each) with the quartiles, and the ratio of the median to AdamW's
median training step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lorakern.torch import LoRAStepOptimizer, norms, search
from load_example import load_example  # benchmarks/load_example.py




def float64_route(D, X, norm):
    """The exact norm as it was computed before: float64 products of the rows."""
    return ORIGINAL(D.double(), X.double(), norm)


ORIGINAL = norms.layer_norm_sq


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per round")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 32])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ex = load_example("torch_lora_speed")
    task = ex.gpt2_tasks(k=6, pretrain_steps=100, steps_full=1, steps_mini=1, quick=False)[0]
    print(f"load average before: {os.getloadavg()}, torch {torch.__version__}, 1 thread")
    for batch in args.batches:
        data = tuple(t[:batch] for t in task.data)
        adam_model = task.fresh(0)
        adam = torch.optim.AdamW(ex.trainable(adam_model), lr=1e-3)
        lk_model = task.fresh(0)
        opt = LoRAStepOptimizer(lk_model)  # its norm attribute switched between the variants

        def adam_step():
            adam.zero_grad()
            task.loss_fn(adam_model, data).backward()
            adam.step()

        def own_step(name, route=None):
            opt.norm = "bound" if name == "bound" else "exact"
            ms = []
            for _ in range(args.calls):
                opt.zero_grad()
                task.loss_fn(lk_model, data).backward()
                if route is not None:
                    norms.layer_norm_sq = route
                t0 = time.perf_counter()
                opt.step()
                ms.append(1e3 * (time.perf_counter() - t0))
                norms.layer_norm_sq = ORIGINAL
            opt.norm = "exact"
            return ms

        def closure_step(norm, own=False):
            """step(closure)'s time, whole or less the closure's calls (its own time)."""
            inside = [0.0]

            def closure():
                t0 = time.perf_counter()
                opt.zero_grad()
                loss = task.loss_fn(lk_model, data)
                loss.backward()
                inside[0] += time.perf_counter() - t0
                return loss
            opt.norm = norm
            ms = []
            for _ in range(args.calls):
                inside[0] = 0.0
                t0 = time.perf_counter()
                opt.step(closure)
                spent = time.perf_counter() - t0
                ms.append(1e3 * (spent - inside[0] if own else spent))
            opt.norm = "exact"
            return ms

        def timed(fn):
            ms = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                fn()
                ms.append(1e3 * (time.perf_counter() - t0))
            return ms

        def gradient_pass():
            opt.zero_grad()
            loss = task.loss_fn(lk_model, data)
            loss.backward()
            return loss

        def trial_pass():
            search.trial_loss(gradient_pass)

        variants = {
            "AdamW training step (fwd + bwd + step)": lambda: timed(adam_step),
            "the closure: a gradient pass (fwd + bwd)": lambda: timed(gradient_pass),
            "a trial: the closure forward-only": lambda: timed(trial_pass),
            "AdamW step() alone": None,
            "lorakern step(): exact, float32 + bound (default)": lambda: own_step("exact"),
            "lorakern step(): exact, float64 products (before)":
                lambda: own_step("exact", float64_route),
            "lorakern step(): norm='bound'": lambda: own_step("bound"),
            "lorakern step(closure) whole (gradient pass + trials)":
                lambda: closure_step("exact"),
            "lorakern step(closure) less its closure calls: exact":
                lambda: closure_step("exact", own=True),
            "lorakern step(closure) less its closure calls: norm='lazy'":
                lambda: closure_step("lazy", own=True),
        }
        times = {name: [] for name in variants}
        for name, fn in variants.items():  # warm up
            if fn is not None:
                fn()
        for _ in range(args.rounds):
            for name, fn in variants.items():
                if fn is None:
                    adam.zero_grad()
                    task.loss_fn(adam_model, data).backward()
                    t0 = time.perf_counter()
                    adam.step()
                    times[name].append(1e3 * (time.perf_counter() - t0))
                else:
                    times[name].append(statistics.median(fn()))
        ref = statistics.median(times["AdamW training step (fwd + bwd + step)"])
        print(f"\nbatch {batch} sequences of 13 tokens ({batch * 13} rows a layer), "
              f"{args.rounds} interleaved rounds, median of {args.calls} calls each\n")
        print("| what | ms (median) | quartiles | / AdamW training step |")
        print("|---|---|---|---|")
        for name, ms in times.items():
            q = statistics.quantiles(ms, n=4)
            med = statistics.median(ms)
            print(f"| {name} | {med:.2f} | {q[0]:.2f}-{q[2]:.2f} | {med / ref:.1%} |")
        trial = statistics.median(times["a trial: the closure forward-only"])
        full = statistics.median(times["the closure: a gradient pass (fwd + bwd)"])
        print(f"\na forward-only trial costs {trial / full:.2f} of a gradient pass: a step of "
              f"one trial takes {1 + trial / full:.2f} passes")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
