"""Step-size policies: the paper's eta_t, a constant, and Armijo backtracking.

Each policy's ``choose`` works on any backend: the norms arrive as 0-d float64 arrays of
the backend's namespace (NumPy or CuPy) and eta stays there, so a GPU step needs no
host round trip for "theorem" or a constant.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

#: the constant of eq. (8): eta_t = min{1 / (5 sqrt(2) max(L, 1) (||V_t||^2 + ||G_t||_F)), 1}
THEOREM_CONSTANT = 5.0 * math.sqrt(2.0)


@dataclass(frozen=True)
class Theorem:
    """eta_t = min{1 / (constant * max(L, 1) * (||V_t||^2 + ||G_t||_F)), 1}  (Lemma 2, eq. 8).

    ``constant`` is 5*sqrt(2) as the paper states it; other versions of the bound can pass
    their own. Lemma 2 guarantees J(V_{t+1}) <= J(V_t) - eta_t/5 ||grad J(V_t)||^2.
    """

    constant: float = THEOREM_CONSTANT

    def __post_init__(self):
        if not (math.isfinite(self.constant) and self.constant > 0):
            raise ValueError(f"Theorem constant must be positive and finite, got {self.constant}")

    def choose(self, backend, problem, data, B, A, p, state):
        xp = backend.xp
        scale = self.constant * problem.eta_lipschitz * (p.v_sq + xp.sqrt(p.g_sq))
        # min{1/x, 1} written as 1/max{x, 1}: the same number, and no 1/0 when V = G = 0
        return 1.0 / xp.maximum(scale, 1.0), 0


@dataclass(frozen=True)
class Constant:
    """A fixed eta for every step (no descent guarantee)."""

    eta: float

    def __post_init__(self):
        # numbers.Real also takes NumPy scalars (np.float32(0.01)); bools are not step sizes
        if isinstance(self.eta, (bool, np.bool_)) or not isinstance(self.eta, numbers.Real):
            raise TypeError(f"step_size must be 'theorem', 'armijo' or a positive float, got {self.eta!r}")
        if not (math.isfinite(self.eta) and self.eta > 0):
            raise ValueError(f"a constant step_size must be positive and finite, got {self.eta}")

    def choose(self, backend, problem, data, B, A, p, state):
        # a Python float: a device backend takes it as a kernel argument, with no copy
        # from host memory (which would synchronise the stream every step)
        return float(self.eta), 0


@dataclass(frozen=True)
class Armijo:
    """Backtracking line search along -grad J.

    The first trial is ``cap``, or twice the last accepted eta if that is smaller; eta is
    halved until J(V - eta grad J) <= J(V) - c * eta * ||grad J||^2 (each trial is one
    loss-only fused pass). Once eta would fall to the theorem's eta_t, the search stops
    and takes eta_t: Lemma 2 guarantees it the decrease eta_t/5 ||grad J||^2, which meets
    the condition for any c <= 1/5, so no trial is spent on it. This bounds the trials by
    log2(cap / eta_t) and ends the search in floating point too (near a minimum float32
    rounding can hide any decrease). ``max_trials`` caps the trials further.
    """

    cap: float = 1.0
    c: float = 1e-4
    max_trials: int = 60

    def __post_init__(self):
        if not (math.isfinite(self.cap) and self.cap > 0):
            raise ValueError(f"Armijo cap must be positive and finite, got {self.cap}")
        if not (0 < self.c <= 0.2):
            raise ValueError(f"Armijo c must lie in (0, 1/5] (Lemma 2's constant), got {self.c}")
        if int(self.max_trials) < 1:
            raise ValueError(f"Armijo max_trials must be >= 1, got {self.max_trials}")

    def choose(self, backend, problem, data, B, A, p, state):
        loss0, grad_sq = float(p.loss), float(p.grad_sq)
        eta_theorem = float(THEOREM.choose(backend, problem, data, B, A, p, state)[0])
        eta = self.cap if state.get("eta") is None else min(self.cap, 2.0 * state["eta"])
        trials = 0
        while eta > eta_theorem and trials < int(self.max_trials):
            trials += 1
            B1, A1 = backend.update(B, A, p.grad_B, p.grad_A, eta)
            if float(backend.loss_pass(problem, data, B1, A1)) <= loss0 - self.c * eta * grad_sq:
                state["eta"] = eta
                return backend.xp.asarray(eta), trials
            eta *= 0.5
        state["eta"] = eta_theorem
        return backend.xp.asarray(eta_theorem), trials


THEOREM = Theorem()


def as_policy(step_size):
    """'theorem' | 'armijo' | positive float | a policy object -> a policy object."""
    if isinstance(step_size, (Theorem, Constant, Armijo)):
        return step_size
    if isinstance(step_size, str):
        if step_size == "theorem":
            return THEOREM
        if step_size == "armijo":
            return Armijo()
        raise ValueError(f"unknown step_size {step_size!r}; use 'theorem', 'armijo' or a positive float")
    return Constant(step_size)
