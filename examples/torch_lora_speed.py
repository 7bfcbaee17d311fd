"""Time to AdamW(1e-3)'s final loss: lorakern's certified step against the usual optimizers.

    python examples/torch_lora_speed.py                  # all tasks, 3 seeds (minutes)
    python examples/torch_lora_speed.py --quick          # seconds: a smoke run (the test's)
    python examples/torch_lora_speed.py --tasks mlp --seeds 0 1 2 --out table.md

Built here, no download (transformers' GPT2Config, PEFT's LoraConfig):

- ``gpt2-full``: a tiny GPT-2 (2 layers, 64 wide, vocabulary 33) pretrained (all weights,
  AdamW) on a copy task (``x1..xk SEP x1..xk``, tokens 0..31, SEP = 32), then LoRA (r = 8 on
  ``c_attn`` and ``c_proj``) fine-tuned on copy+1 mod 32, full batch of 256 sequences;
  the loss is the cross-entropy of the answer tokens.
- ``gpt2-mini``: the same fine-tuning with mini-batches of 32 drawn from the 256.
- ``mlp``: an MLP (32 -> 64 -> 10, tanh) pretrained on a teacher's labels, then LoRA (r = 4,
  ``LoRALinear``) fine-tuned on a shifted teacher (the pretrained MLP with a rank-4 change of
  its first layer: the adapters can fit it exactly),
  mini-batches of 32 from 2048 points; held-out accuracy on 1024 more.

Methods, every one with its default arguments unless a grid is named:
``lorakern`` (``LoRAStepOptimizer(model)`` and ``step(closure)``: the certified line search
with forward-only trials), ``lorakern-lazy`` (the same with ``norm="lazy"``: the exact ||G||
only on steps whose search comes near eta_t), ``adamw`` (lr 1e-3, the target), ``adamw-tuned`` and
``sgd-tuned`` (the lowest final loss of a small grid on the first seed; the table says which
rate), ``prodigy`` (``prodigyopt.Prodigy``, lr 1) and ``schedulefree`` (``schedulefree.
AdamWScheduleFree``). The methods take turns within each seed (interleaved). The clock runs
over the training steps only; the evaluation loss (the task's whole training set, no_grad,
every 2 steps full batch, every 10 on mini-batches) is outside it. The target is AdamW(1e-3)'s final evaluation
loss on the same seed; time to target is the clock at the first evaluation at or below it.

For ``lorakern`` (and ``lorakern-lazy``) every step's certificate is checked after the run:
eta >= eta_t and, where a trial was accepted, J(V_{t+1}) <= J(V_t) - eta/5 ||grad J||^2 on
the step's batch (the accepted trial's loss is J(V_{t+1}) on that batch). One torch thread (``--threads``).
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings

import torch
from torch import nn

from lorakern.torch import LoRALinear, LoRAStepOptimizer

TASKS = ("gpt2-full", "gpt2-mini", "mlp")
METHODS = ("lorakern", "lorakern-lazy", "adamw", "adamw-tuned", "sgd-tuned", "prodigy",
           "schedulefree")
ADAMW_GRID = (3e-3, 1e-2, 3e-2)
SGD_GRID = (0.1, 0.3, 1.0, 3.0)
SEP, VOCAB, DATA_TOKENS = 32, 33, 32


# ---- the tasks ----------------------------------------------------------------------------------
class Task:
    """A model factory (``fresh(seed)``: the pretrained model with new adapters), the data,
    the loss, and how batches are drawn."""

    def __init__(self, name, base, make_lora, data, loss_fn, batch, steps, eval_every):
        self.name, self.base, self.make_lora = name, base, make_lora
        self.data, self.loss_fn, self.batch = data, loss_fn, batch
        self.steps, self.eval_every = steps, eval_every

    def fresh(self, seed):
        torch.manual_seed(1000 + seed)
        return self.make_lora(copy.deepcopy(self.base))

    def batches(self, seed):
        """The step's batch, a function of (seed, step) only: every method sees the same."""
        n = len(self.data[0])
        gen = torch.Generator().manual_seed(seed)
        while True:
            if self.batch >= n:
                yield self.data
            else:
                rows = torch.randint(0, n, (self.batch,), generator=gen)
                yield tuple(t[rows] for t in self.data)

    def eval_loss(self, model):
        with torch.no_grad():
            return float(self.loss_fn(model, self.data))


def copy_data(n, k, shift, seed):
    """(tokens, targets): ``x SEP (x + shift) mod 32``; targets -100 outside the answer."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, DATA_TOKENS, (n, k), generator=gen)
    seq = torch.cat([x, torch.full((n, 1), SEP), (x + shift) % DATA_TOKENS], dim=1)
    targets = seq.clone()
    targets[:, : k + 1] = -100  # only the answer tokens count
    return seq, targets


def gpt2_loss(model, batch):
    tokens, targets = batch
    logits = model(input_ids=tokens).logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       targets[:, 1:].reshape(-1), ignore_index=-100)


def gpt2_tasks(k, pretrain_steps, steps_full, steps_mini, quick):
    import peft
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=2 * k + 1, n_embd=64, n_layer=2,
                        n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=SEP, eos_token_id=SEP)
    base = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
    for step in range(pretrain_steps):  # the copy task, fresh sequences every step
        opt.zero_grad()
        gpt2_loss(base, copy_data(128, k, 0, 10_000 + step)).backward()
        opt.step()
    base.eval()
    pre = copy_data(256, k, 0, 1)
    data = copy_data(256, k, 1, 2)
    with torch.no_grad():
        print(f"pretrained GPT-2: copy loss {float(gpt2_loss(base, pre)):.3f}, "
              f"copy+1 loss {float(gpt2_loss(base, data)):.3f}")

    def make_lora(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.get_peft_model(model, peft.LoraConfig(
                r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], lora_dropout=0.0,
                fan_in_fan_out=True))

    return [Task("gpt2-full", base, make_lora, data, gpt2_loss, 256, steps_full,
                 1 if quick else 2),
            Task("gpt2-mini", base, make_lora, data, gpt2_loss, 32, steps_mini,
                 5 if quick else 10)]


class MLP(nn.Module):
    def __init__(self, n=32, hidden=64, classes=10):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def mlp_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def mlp_task(pretrain_steps, steps, quick):
    torch.manual_seed(0)
    teacher = MLP()
    with torch.no_grad():
        teacher.fc1.weight.mul_(3.0)
    x = torch.randn(4096, 32)
    with torch.no_grad():
        y0 = teacher(x).argmax(1)
    base = MLP()
    opt = torch.optim.Adam(base.parameters(), lr=1e-2)
    for _ in range(pretrain_steps):
        opt.zero_grad()
        mlp_loss(base, (x, y0)).backward()
        opt.step()
    shifted = copy.deepcopy(base)
    with torch.no_grad():  # the shifted teacher: the pretrained MLP, fc1 plus a rank-4 change
        U, V = torch.randn(64, 4), torch.randn(4, 32)
        shifted.fc1.weight.add_(U @ V / math.sqrt(32 * 4))
        y = shifted(x).argmax(1)
    train, test = (x[:2048], y[:2048]), (x[2048:3072], y[2048:3072])

    def make_lora(model):
        model.fc1 = LoRALinear.from_linear(model.fc1, 4)
        model.fc2 = LoRALinear.from_linear(model.fc2, 4)
        return model

    task = Task("mlp", base, make_lora, train, mlp_loss, 32, steps, 5 if quick else 10)
    task.test = test
    with torch.no_grad():
        print(f"pretrained MLP: accuracy {accuracy(base, (x[:2048], y0[:2048])):.3f} on the "
              f"teacher, {accuracy(base, test):.3f} on the shifted teacher (loss "
              f"{float(mlp_loss(base, train)):.3f})")
    return task


def accuracy(model, data):
    with torch.no_grad():
        return float((model(data[0]).argmax(-1) == data[1]).float().mean())


# ---- the methods --------------------------------------------------------------------------------
def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(method, model, rate):
    if method == "lorakern":
        return LoRAStepOptimizer(model)
    if method == "lorakern-lazy":
        return LoRAStepOptimizer(model, norm="lazy")
    if method in ("adamw", "adamw-tuned"):
        return torch.optim.AdamW(trainable(model), lr=rate)
    if method == "sgd-tuned":
        return torch.optim.SGD(trainable(model), lr=rate)
    if method == "prodigy":
        from prodigyopt import Prodigy
        return Prodigy(trainable(model))
    if method == "schedulefree":
        from schedulefree import AdamWScheduleFree
        opt = AdamWScheduleFree(trainable(model))
        opt.train()
        return opt
    raise ValueError(f"unknown method {method!r}")


def train(task, method, rate, seed, steps=None):
    """One run: {'clock': [...], 'evals': [(step, clock, loss)], 'infos': [...], ...}."""
    steps = task.steps if steps is None else steps
    model = task.fresh(seed)
    model.train()
    opt = make_optimizer(method, model, rate)
    batches = task.batches(seed)
    clock, evals, infos, step_ms = 0.0, [], [], []

    def evaluate(step):
        if method == "schedulefree":
            opt.eval()  # schedule-free's evaluation point
        evals.append((step, clock, task.eval_loss(model)))
        if method == "schedulefree":
            opt.train()

    evaluate(0)
    for step in range(1, steps + 1):
        batch = next(batches)
        t0 = time.perf_counter()

        def closure():
            opt.zero_grad()
            loss = task.loss_fn(model, batch)
            loss.backward()
            return loss

        if method.startswith("lorakern"):
            opt.step(closure)
        else:
            closure()
            opt.step()
        elapsed = time.perf_counter() - t0
        clock += elapsed
        step_ms.append(1e3 * elapsed)
        if method.startswith("lorakern"):
            infos.append(opt.last)
        if step % task.eval_every == 0 or step == steps:
            evaluate(step)
            if not math.isfinite(evals[-1][2]):
                break
    if method == "schedulefree":
        opt.eval()
    run = dict(task=task.name, method=method, rate=rate, seed=seed, evals=evals, infos=infos,
               step_ms=step_ms, final=evals[-1][2])
    if hasattr(task, "test"):
        run["accuracy"] = accuracy(model, task.test)
    if method.startswith("lorakern"):
        opt.remove_hooks()
    return run


def certificate_violations(run):
    """Steps of a lorakern run whose certificate fails: eta < eta_t, or an accepted trial
    without the decrease eta/5 ||grad||^2 (in the float64 arithmetic of the check)."""
    bad = []
    for t, info in enumerate(run["infos"]):
        if info.eta < info.eta_theorem:
            bad.append((t, "eta < eta_t"))
        elif info.eta > info.eta_theorem:
            new = info.trial_losses[-1]
            if not new <= info.loss - 0.2 * info.eta * info.grad_sq:
                bad.append((t, f"decrease {info.loss - new} < {0.2 * info.eta * info.grad_sq}"))
    return bad


def time_to(run, target):
    for step, clock, loss in run["evals"]:
        if loss <= target:
            return clock, step
    return None, None


def tune(task, method, grid, seed):
    """The rate of ``grid`` with the lowest final evaluation loss (ties: the first)."""
    finals = {}
    for rate in grid:
        finals[rate] = train(task, method, rate, seed)["final"]
    best = min(grid, key=lambda r: finals[r] if math.isfinite(finals[r]) else math.inf)
    print(f"  {task.name} {method}: final losses {({r: round(v, 4) for r, v in finals.items()})}"
          f" -> lr {best}")
    return best


# ---- the report ---------------------------------------------------------------------------------
def summarise(task, runs, seeds):
    rows = []
    targets = {s: next(r["final"] for r in runs if r["method"] == "adamw" and r["seed"] == s)
               for s in seeds}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        ms = statistics.median(m for r in mine for m in r["step_ms"])
        reach = [time_to(r, targets[r["seed"]]) for r in mine]
        secs = [t for t, _ in reach]
        row = dict(method=method, rate=mine[0]["rate"], ms=ms,
                   final=statistics.median(r["final"] for r in mine),
                   reached=sum(t is not None for t in secs), seeds=len(mine),
                   to_target=(statistics.median(secs) if all(t is not None for t in secs)
                              else None),
                   secs=secs, steps=[s for _, s in reach])
        if "accuracy" in mine[0]:
            row["accuracy"] = statistics.median(r["accuracy"] for r in mine)
        if method.startswith("lorakern"):
            trials = [i.trials for r in mine for i in r["infos"]]
            row["trials_median"] = statistics.median(trials)
            row["trials_mean"] = sum(trials) / len(trials)
            row["violations"] = sum(len(certificate_violations(r)) for r in mine)
            row["theorem_steps"] = sum(i.eta == i.eta_theorem for r in mine for i in r["infos"])
            row["eta_ratio"] = statistics.median(i.eta / i.eta_theorem for r in mine
                                                 for i in r["infos"])
        rows.append(row)
    return rows


def table(task, rows):
    acc = "accuracy" in rows[0]
    head = ("| method | lr | ms/step (median) | final loss (median) | reached | "
            "s to target (median; per seed) |" + (" test acc |" if acc else ""))
    lines = [f"**{task.name}** ({task.steps} steps, batch {task.batch})", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        rate = "-" if r["rate"] is None else f"{r['rate']:g}"
        secs = "; ".join("-" if s is None else f"{s:.2f}" for s in r["secs"])
        tt = "-" if r["to_target"] is None else f"{r['to_target']:.2f}"
        line = (f"| {r['method']} | {rate} | {r['ms']:.1f} | {r['final']:.4f} | "
                f"{r['reached']}/{r['seeds']} | {tt} ({secs}) |")
        if acc:
            line += f" {r['accuracy']:.3f} |"
        lines.append(line)
    for lk in (r for r in rows if r["method"].startswith("lorakern")):
        lines += ["", f"{lk['method']}: trials per step median {lk['trials_median']}, mean "
                      f"{lk['trials_mean']:.2f}; steps at eta_t {lk['theorem_steps']}; median "
                      f"eta / eta_t {lk['eta_ratio']:.3g}; certificate violations "
                      f"{lk['violations']}"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: few steps, one seed, lorakern(-lazy) and adamw only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="append the markdown tables to this file")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args):
    quick = args.quick
    if quick:
        args.seeds = args.seeds[:1]
        args.methods = [m for m in args.methods if m in ("lorakern", "lorakern-lazy", "adamw")]
    tasks = []
    wanted = set(args.tasks)
    if wanted & {"gpt2-full", "gpt2-mini"}:
        tasks += [t for t in gpt2_tasks(k=4 if quick else 6, pretrain_steps=30 if quick else 300,
                                        steps_full=6 if quick else 60,
                                        steps_mini=10 if quick else 200, quick=quick)
                  if t.name in wanted]
    if "mlp" in wanted:
        tasks.append(mlp_task(pretrain_steps=50 if quick else 300, steps=20 if quick else 300,
                              quick=quick))
    results = {}
    for task in tasks:
        rates = {"lorakern": None, "lorakern-lazy": None, "adamw": 1e-3, "prodigy": None,
                 "schedulefree": None}
        if "adamw-tuned" in args.methods:
            rates["adamw-tuned"] = tune(task, "adamw", ADAMW_GRID, args.seeds[0])
        if "sgd-tuned" in args.methods:
            rates["sgd-tuned"] = tune(task, "sgd-tuned", SGD_GRID, args.seeds[0])
        runs = []
        for seed in args.seeds:  # the methods take turns within a seed
            for method in args.methods:
                runs.append(train(task, method, rates[method], seed))
        rows = summarise(task, runs, args.seeds)
        text = table(task, rows)
        print("\n" + text + "\n")
        results[task.name] = dict(runs=runs, rows=rows, text=text)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n\n")
    return results


if __name__ == "__main__":
    main()
