"""The line search of ``LoRAStepOptimizer.step(closure)``: forward-only trials, a first trial
from a model of the last step, Armijo with c = 1/5, and a guard on ||V'||^2.

**What a trial costs.** One forward pass, no backward. PyTorch closures (``torch.optim.LBFGS``)
are written ``opt.zero_grad(); loss = f(); loss.backward(); return loss``; a trial calls the
same closure inside ``forward_only()``: under ``torch.no_grad()`` nothing is recorded for
autograd, and ``torch.autograd.backward`` (which ``Tensor.backward`` calls) returns at once,
on this thread only, when none of its tensors needs a gradient, instead of raising. So the
closure runs unchanged and its ``backward()`` costs nothing. ``in_trial()`` tells code that
wants to know (a ``zero_grad`` that should keep what it would clear, a logger). A closure
that turns gradients back on itself (``torch.enable_grad()`` inside) gets its backward run:
such a closure is not forward-only, and its trials cost a backward each.

**The search** (``LineSearch.search``). At V' with loss J0 = J(V'), g2 = ||grad J(V')||^2 and
the theorem's eta_t (eq. 8), along -grad J, with phi(eta) = J(V' - eta grad):

    accept eta  iff  phi(eta) <= J0 - c eta g2        (Armijo, c = 1/5 = Lemma 2's constant)

A rejected trial at eta fits the quadratic q(e) = J0 - e g2 + k e^2 / 2 through phi(eta)
(k > 0 because Armijo failed) and tries its minimiser g2 / k, kept in [eta / 100, eta / 2];
once the next trial would not exceed eta_t the search takes eta_t, which Lemma 2 gives the
decrease (eta_t / 5) g2 without a trial, as ``lorakern.Armijo`` does. So eta >= eta_t at every
step and every accepted step has the decrease (c = 1/5 is the certificate's constant).

**The first trial** is where the work is saved: an accepted eta with decrease ratio
rho = (J0 - phi(eta)) / (eta g2) says, for a quadratic phi, that its minimiser is
eta* = eta / (2 (1 - rho)). The next step's first trial is that eta* (the minimiser of the
last step's model: rho = 1/2 if the curvature is unchanged, and Armijo accepts up to
1.6 eta*, so a curvature 1.6 times larger still passes at the first trial), at most
``growth`` times the last accepted eta and at most ``cap``. The first step's first trial is
``cap``.

**The guard** keeps a mini-batch step from ruining ||V'||: with d = -grad J(V'),
||V' + eta d||^2 = v_sq - 2 eta <V', grad> + eta^2 g2 is known from three scalars, and a
trial with ||V' + eta d||^2 > ``v_growth`` ||V'||^2 is not run: the search moves to the
largest eta inside it. (eta_t itself is always allowed: it is the certified step.) With
``growth`` this bounds how far one batch can pull the adapters in one step.

**Distributed.** This module calls no collective: ``loss_at(eta)`` returns the loss that the
optimizer has already all-reduced (the mean over ranks), and v_sq, <V', grad>, g2 and eta_t
are computed from parameters and gradients that are equal on every rank, so every rank takes
the same decisions from the same floats.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import torch

#: Lemma 2's decrease constant: Armijo with c = 1/5 is the certificate
LEMMA2_C = 0.2

_local = threading.local()       # .depth: forward_only() nesting on this thread
_patch_lock = threading.Lock()
_patch = {"users": 0, "original": None}


def in_trial() -> bool:
    """Whether this thread is inside a forward-only trial of the line search."""
    return getattr(_local, "depth", 0) > 0


def _guarded_backward(tensors, *args, **kwargs):
    """torch.autograd.backward, a no-op inside a trial when no tensor needs a gradient."""
    if in_trial():
        items = (tensors,) if torch.is_tensor(tensors) else tuple(tensors)
        if not any(t.requires_grad for t in items):
            return None
    return _patch["original"](tensors, *args, **kwargs)


@contextmanager
def forward_only():
    """``torch.no_grad()`` with ``backward()`` made a no-op on this thread (module docstring).

    The patch of ``torch.autograd.backward`` is installed while any thread is inside and
    removed when the last one leaves; other threads' backward passes go through unchanged.
    """
    with _patch_lock:
        if _patch["users"] == 0:
            _patch["original"] = torch.autograd.backward
            torch.autograd.backward = _guarded_backward
        _patch["users"] += 1
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        with torch.no_grad():
            yield
    finally:
        _local.depth -= 1
        with _patch_lock:
            _patch["users"] -= 1
            if _patch["users"] == 0:
                torch.autograd.backward = _patch["original"]
                _patch["original"] = None


def trial_loss(closure) -> float:
    """The closure's loss from a forward-only call (module docstring), as a float."""
    with forward_only():
        return item(closure())


class LineSearch:
    """Armijo search with forward-only trials and a first trial from the last step's model.

    Parameters
    ----------
    cap : the largest step (and the first step's first trial).
    c : Armijo's constant, in (0, 1/5]; 1/5 makes every accepted step certified.
    growth : the first trial is at most ``growth`` times the last accepted eta.
    v_growth : a trial may not take ||V'||^2 beyond ``v_growth`` times its value at V_t.
    max_trials : trials per step at most; then eta_t.

    ``state_dict()`` / ``load_state_dict()`` carry what the next step's first trial reads.
    """

    def __init__(self, *, cap: float = 1.0, c: float = LEMMA2_C, growth: float = 2.0,
                 v_growth: float = 1.25, max_trials: int = 20):
        self.cap = _positive("cap", cap)
        self.c = _positive("c", c)
        if self.c > LEMMA2_C:
            raise ValueError(f"Armijo c must lie in (0, 1/5] (Lemma 2's constant), got {c}")
        self.growth = _at_least_one("growth", growth)
        self.v_growth = _at_least_one("v_growth", v_growth)
        if not isinstance(max_trials, int) or isinstance(max_trials, bool) or max_trials < 1:
            raise ValueError(f"max_trials must be a positive integer, got {max_trials!r}")
        self.max_trials = max_trials
        self.eta = None        # the last accepted eta
        self.eta_star = None   # the minimiser of the last step's quadratic model

    def state_dict(self) -> dict:
        return {"eta": self.eta, "eta_star": self.eta_star}

    def load_state_dict(self, state: dict) -> None:
        self.eta, self.eta_star = state["eta"], state["eta_star"]

    def first_trial(self) -> float:
        if self.eta is None:
            return self.cap
        eta = self.growth * self.eta
        if self.eta_star is not None:
            eta = min(eta, self.eta_star)
        return min(eta, self.cap)

    def search(self, loss_at, loss0: float, grad_sq: float, eta_theorem, *,
               v_sq: float = 0.0, v_dot_grad: float = 0.0, eta_ceiling: float | None = None):
        """(eta, trial losses): the accepted eta and phi at each trial, in order.

        ``loss_at(eta)`` puts the parameters at V' - eta grad and returns the loss there
        (forward only, already reduced over ranks). The caller puts the parameters at the
        returned eta afterwards. ``v_sq`` = ||V'||^2 and ``v_dot_grad`` = <V', grad J(V')>
        give the guard (module docstring). ``eta_theorem`` is eta_t, or a zero-argument
        callable that computes it; with ``eta_ceiling`` (an upper bound of eta_t, such as
        eq. 8 with ||G|| = 0) it is called only when a trial does not exceed the ceiling,
        i.e. when the search comes near eta_t (the norm ||G|| is eta_t's only use here).
        """
        theorem = _Lazy(eta_theorem)

        def above_floor(eta):  # eta > eta_t, asking for eta_t only when the ceiling can't say
            return (eta_ceiling is not None and eta > eta_ceiling) or eta > theorem()

        losses = []
        if not (math.isfinite(loss0) and grad_sq > 0.0):
            return self._accept(theorem(), None, loss0, grad_sq), losses
        eta = self._inside_guard(self.first_trial(), v_sq, v_dot_grad, grad_sq)
        while len(losses) < self.max_trials and above_floor(eta):
            value = float(loss_at(eta))
            losses.append(value)
            if value <= loss0 - self.c * eta * grad_sq:  # False for nan
                return self._accept(eta, value, loss0, grad_sq), losses
            # q(e) = loss0 - e g2 + k e^2 / 2 through (eta, value): k > 0 as Armijo failed
            excess = value - loss0 + eta * grad_sq
            step = grad_sq * eta * eta / (2.0 * excess) if math.isfinite(excess) else 0.0
            eta = min(max(step, eta / 100.0), eta / 2.0)
        return self._accept(theorem(), None, loss0, grad_sq), losses

    def _inside_guard(self, eta, v_sq, v_dot_grad, grad_sq):
        """The largest eta' <= eta with ||V' - eta' grad||^2 <= v_growth ||V'||^2."""
        # v_sq - 2 e <V, g> + e^2 g2 <= v_growth v_sq: the larger root of the quadratic
        slack = (self.v_growth - 1.0) * v_sq
        disc = v_dot_grad * v_dot_grad + grad_sq * slack
        largest = (v_dot_grad + math.sqrt(disc)) / grad_sq
        return min(eta, largest)

    def _accept(self, eta, value, loss0, grad_sq):
        self.eta = eta
        self.eta_star = None
        if value is not None:
            rho = (loss0 - value) / (eta * grad_sq)  # >= c: the observed decrease ratio
            if rho < 1.0:
                self.eta_star = eta / (2.0 * (1.0 - rho))  # phi's minimiser if quadratic
        return eta


class _Lazy:
    """A float, or a zero-argument callable evaluated once on first use."""

    def __init__(self, value):
        self.value, self.call = (None, value) if callable(value) else (float(value), None)

    def __call__(self) -> float:
        if self.value is None:
            self.value = float(self.call())
        return self.value


def armijo(loss_at, loss0: float, grad_sq: float, eta_theorem: float, *, armijo, eta_prev):
    """lorakern.Armijo's search (halving from ``cap`` or twice the last eta), with
    ``loss_at`` as in ``LineSearch.search``: (accepted eta, trial losses)."""
    eta = armijo.cap if eta_prev is None else min(armijo.cap, 2.0 * eta_prev)
    losses = []
    while eta > eta_theorem and len(losses) < armijo.max_trials:
        losses.append(float(loss_at(eta)))
        if losses[-1] <= loss0 - armijo.c * eta * grad_sq:
            return eta, losses
        eta *= 0.5
    return eta_theorem, losses


def item(loss) -> float:
    """A loss (tensor or number) as a Python float."""
    return float(loss.detach()) if torch.is_tensor(loss) else float(loss)


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return float(value)


def _at_least_one(name, value):
    value = _positive(name, value)
    if value < 1.0:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value
