"""LoRA fine-tuning of a small PyTorch MLP with lorakern's step, against SGD and Adam.

    pip install ".[torch,digits]"             # in a clone (".[test]" has both)
    python examples/torch_digits.py [--plot curves.png]

1. An MLP (64 -> 64 -> 10, tanh) is trained on scikit-learn's bundled digits (8 x 8 images,
   no download) with Adam.
2. The shifted task: the same digits mirrored left to right. The pretrained network is frozen
   and both layers get a rank-4 LoRA adapter (``lorakern.torch.LoRALinear``; a PEFT model
   works the same way).
3. The adapters are fine-tuned, full batch, with
     - ``LoRAStepOptimizer``: the paper's eta_t (no learning rate to tune; L = 1),
     - the same with ``step(closure)``: the certified line search (each trial is one more
       forward pass through the closure, its backward skipped; it stops at eta_t),
     - SGD and Adam, each at the best rate of a small grid (best final training loss).
   The table gives the held-out accuracy on the mirrored digits, the final training loss,
   the steps and the time; ``--plot FILE`` draws the loss curves (needs matplotlib).
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch
from torch import nn

from lorakern.torch import LoRALinear, LoRAStepOptimizer

SGD_RATES = (0.1, 0.3, 1.0, 3.0)
ADAM_RATES = (1e-3, 3e-3, 1e-2, 3e-2)


def load_digits(seed: int):
    """(X_train, y_train, X_test, y_test): float32 pixels in [0, 1], a seeded 75/25 split."""
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError:
        raise SystemExit('this example needs scikit-learn: pip install ".[digits]" in a '
                         'clone of lorakern (".[test]" has it too)') from None
    data = sk_load()
    X = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = (3 * len(y)) // 4
    tr, te = order[:cut], order[cut:]
    return (torch.from_numpy(X[tr]), torch.from_numpy(y[tr]),
            torch.from_numpy(X[te]), torch.from_numpy(y[te]))


def mirrored(X):
    """The shifted task's images: each 8 x 8 digit flipped left to right."""
    return X.reshape(-1, 8, 8).flip(-1).reshape(-1, 64)


class MLP(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def accuracy(model, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def pretrain(X, y, steps: int, seed: int) -> MLP:
    torch.manual_seed(seed)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model


def with_lora(base: MLP, rank: int, seed: int) -> MLP:
    """A copy of ``base`` whose layers are frozen, each with a rank-``rank`` adapter
    (B = 0, A Gaussian: the model starts as ``base``), the same adapters for every seed."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    model.fc1 = LoRALinear.from_linear(base.fc1, rank)
    model.fc2 = LoRALinear.from_linear(base.fc2, rank)
    return model


def lora_parameters(model):
    return [p for name, p in model.named_parameters() if "lora_" in name]


def finetune(model, X, y, steps: int, method: str, rate=None):
    """Train the adapters of ``model`` for ``steps`` full-batch steps; the loss per step."""
    losses = []
    if method in ("lorakern", "lorakern+armijo"):
        opt = LoRAStepOptimizer(model, lipschitz=1.0)
    elif method == "sgd":
        opt = torch.optim.SGD(lora_parameters(model), lr=rate)
    else:
        opt = torch.optim.Adam(lora_parameters(model), lr=rate)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    for _ in range(steps):
        if method == "lorakern+armijo":
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            break
    return losses


def run(args) -> list[dict]:
    X, y, X_test, y_test = load_digits(args.seed)
    t0 = time.perf_counter()
    base = pretrain(X, y, args.pretrain_steps, args.seed)
    print(f"pretrained MLP: {accuracy(base, X_test, y_test):.3f} held-out accuracy on the "
          f"digits, {accuracy(base, mirrored(X_test), y_test):.3f} on the mirrored digits "
          f"({time.perf_counter() - t0:.1f} s)")
    Xs, Xs_test = mirrored(X), mirrored(X_test)
    # one throwaway step first: the Numba norm kernels compile on their first use on a
    # machine (kept on disk after that), which is not the optimizer's time per step
    # (on the full batch: the shapes pick which norm kernel runs)
    finetune(with_lora(base, args.rank, args.seed + 1), Xs, y, 1, "lorakern")
    runs = []
    grids = [("lorakern", (None,)), ("lorakern+armijo", (None,)),
             ("sgd", args.sgd_rates), ("adam", args.adam_rates)]
    for method, rates in grids:
        best = None
        for rate in rates:
            model = with_lora(base, args.rank, args.seed + 1)
            t0 = time.perf_counter()
            losses = finetune(model, Xs, y, args.steps, method, rate)
            seconds = time.perf_counter() - t0
            final = losses[-1] if math.isfinite(losses[-1]) else math.inf
            if best is None or final < best["final"]:
                best = dict(method=method, rate=rate, losses=losses, final=final,
                            seconds=seconds, accuracy=accuracy(model, Xs_test, y_test))
        runs.append(best)
    print(f"\nLoRA rank {args.rank} on the mirrored digits, {args.steps} full-batch steps "
          f"({len(y)} training images); SGD and Adam at the best rate of "
          f"{list(args.sgd_rates)} / {list(args.adam_rates)} (lowest final training loss)\n")
    print(f"{'method':<18}{'rate':>8}{'steps':>7}{'train loss':>12}{'accuracy':>10}{'time (s)':>10}")
    for r in runs:
        rate = {"lorakern": "eta_t", "lorakern+armijo": "search"}.get(r["method"], f"{r['rate']}")
        print(f"{r['method']:<18}{rate:>8}{len(r['losses']):>7}{r['final']:>12.4f}"
              f"{r['accuracy']:>10.3f}{r['seconds']:>10.2f}")
    return runs


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        label = r["method"] + ("" if r["rate"] is None else f" (lr {r['rate']:g})")
        ax.plot(np.arange(len(r["losses"])), r["losses"], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("LoRA fine-tuning on mirrored digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nloss curves: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sgd-rates", type=float, nargs="+", default=SGD_RATES)
    parser.add_argument("--adam-rates", type=float, nargs="+", default=ADAM_RATES)
    parser.add_argument("--plot", metavar="FILE", help="save the loss curves (PNG)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small matrices: one thread is the fastest and deterministic
    runs = run(args)
    if args.plot:
        plot(runs, args.plot)
    return runs


if __name__ == "__main__":
    main()
