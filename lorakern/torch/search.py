"""The Armijo line search of ``LoRAStepOptimizer.step(closure)``.

The first trial is ``cap`` (or twice the last accepted eta), halved until
J(V' - eta grad) <= J(V') - c eta ||grad J(V')||^2; once it would fall to eta_t it takes eta_t
(Lemma 2 gives eta_t the decrease), as ``lorakern.Armijo`` does.
"""
from __future__ import annotations

import torch


def armijo(closure, loss0: float, grad_sq: float, eta_theorem: float, *, move, armijo,
           eta_prev):
    """(accepted eta, trials): ``move(eta)`` puts the parameters at V' - eta grad.

    Each trial calls the closure once with gradients enabled, as PyTorch's closures expect;
    the caller keeps p.grad and the hooks' captures of V_t out of the trials' reach.
    """
    eta = armijo.cap if eta_prev is None else min(armijo.cap, 2.0 * eta_prev)
    trials = 0
    while eta > eta_theorem and trials < armijo.max_trials:
        trials += 1
        move(eta)
        with torch.enable_grad():
            value = item(closure())
        if value <= loss0 - armijo.c * eta * grad_sq:
            return eta, trials
        eta *= 0.5
    return eta_theorem, trials


def item(loss) -> float:
    """A loss (tensor or number) as a Python float."""
    return float(loss.detach()) if torch.is_tensor(loss) else float(loss)
