"""Step-size policies: the paper's eta_t, a constant, and Armijo backtracking.

A policy is any object with what ``StepSize`` lists; the strings "theorem" and "armijo" and a
positive number are shortcuts for the built-in ones. ``choose`` works on any device: the
pass's norms arrive as that device keeps them (Python floats on the host, 0-d float64 arrays
on a GPU) and eta stays there, so a GPU step needs no host round trip for "theorem" or a
constant.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ._validate import positive_float, positive_int

#: the constant of eq. (8): eta_t = min{1 / (5 sqrt(2) max(L, 1) (||V_t||^2 + ||G_t||_F)), 1}
THEOREM_CONSTANT = 5.0 * math.sqrt(2.0)
#: Lemma 2's sufficient-decrease constant: J(V_{t+1}) <= J(V_t) - eta_t / 5 ||grad J(V_t)||^2
LEMMA2_DECREASE = 0.2


@runtime_checkable
class StepSize(Protocol):
    """What fit and step ask of a policy."""

    #: c with J(V_{t+1}) <= J(V_t) - c eta_t ||grad J(V_t)||^2 guaranteed at every step,
    #: or None (no guarantee); theory.check tests a run against it
    decrease: float | None
    #: True if choose() needs host numbers every step (a line search): fit then runs its
    #: loop on the host; False lets a device run the whole fit (run_steps)
    host_loop: bool
    #: which ||G||_F the pass must give: "exact", or "bound" (a certified upper bound)
    norm: str

    def choose(self, engine, B, A, p, state: dict) -> tuple[Any, int]:
        """(eta, trials) at V_t = (B, A) from the pass result ``p``; ``state`` lives for a fit."""

    def device_loop(self, problem) -> dict | None:
        """Arguments of Kernels.run_steps ({"eta_scale": c} or {"eta_fixed": eta}), or None."""


@dataclass(frozen=True)
class Theorem:
    """eta_t = min{1 / (constant * max(L, 1) * (||V_t||^2 + ||G_t||_F)), 1}  (Lemma 2, eq. 8).

    ``constant`` is 5*sqrt(2) as the paper states it; other versions of the bound can pass
    their own. Lemma 2 guarantees J(V_{t+1}) <= J(V_t) - eta_t/5 ||grad J(V_t)||^2.

    ``norm="bound"`` lets the kernels put a certified upper bound U >= ||G_t||_F in place of
    ||G_t||_F where the exact norm is costly (the linear kind). A larger ||G|| only makes
    eta_t smaller, and Lemma 2's proof needs eta_t <= its value with the exact norm, so the
    decrease still holds at every step; the proof of Theorem 3 itself bounds ||G_t|| by
    sqrt(2L (J(V_t) - L*)), so with U <= that bound the rate holds too.
    """

    constant: float = THEOREM_CONSTANT
    norm: str = "exact"

    decrease = LEMMA2_DECREASE
    host_loop = False

    def __post_init__(self):
        object.__setattr__(self, "constant", positive_float("Theorem constant", self.constant))
        if self.norm not in ("exact", "bound"):
            raise ValueError(f"Theorem norm must be 'exact' or 'bound', got {self.norm!r}")

    def eta(self, v_sq, g_sq, lipschitz, xp=np):
        """eta_t of eq. (8) from ||V_t||^2, ||G_t||_F^2 and max(L, 1), in ``xp``'s arithmetic
        (NumPy on host floats, CuPy on 0-d device arrays, or any namespace with ``sqrt`` and
        ``maximum``): the one place the formula is written."""
        scale = self.constant * lipschitz * (v_sq + xp.sqrt(g_sq))
        # min{1/x, 1} written as 1/max{x, 1}: the same number, and no 1/0 when V = G = 0
        return 1.0 / xp.maximum(scale, 1.0)

    def choose(self, engine, B, A, p, state):
        return self.eta(p.v_sq, p.g_sq, engine.problem.eta_lipschitz, engine.xp), 0

    def device_loop(self, problem):
        return {"eta_scale": self.constant * problem.eta_lipschitz}


@dataclass(frozen=True)
class Constant:
    """A fixed eta for every step (no descent guarantee)."""

    eta: float

    decrease = None
    host_loop = False
    norm = "exact"

    def __post_init__(self):
        # numbers.Real also takes NumPy scalars (np.float32(0.01)); bools are not step sizes
        if isinstance(self.eta, (bool, np.bool_)) or not isinstance(self.eta, numbers.Real):
            raise TypeError(f"step_size must be 'theorem', 'armijo', a positive float or a "
                            f"policy object, got {self.eta!r}")
        if not (math.isfinite(self.eta) and self.eta > 0):
            raise ValueError(f"a constant step_size must be positive and finite, got {self.eta}")

    def choose(self, engine, B, A, p, state):
        # a Python float: a device takes it as a kernel argument, with no copy from host
        # memory (which would synchronise the stream every step)
        return float(self.eta), 0

    def device_loop(self, problem):
        return {"eta_fixed": float(self.eta)}


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

    host_loop = True
    norm = "exact"

    def __post_init__(self):
        object.__setattr__(self, "cap", positive_float("Armijo cap", self.cap))
        c = positive_float("Armijo c", self.c)
        if not c <= LEMMA2_DECREASE:
            raise ValueError(f"Armijo c must lie in (0, 1/5] (Lemma 2's constant), got {c}")
        object.__setattr__(self, "c", c)
        object.__setattr__(self, "max_trials", positive_int("Armijo max_trials", self.max_trials))

    @property
    def decrease(self) -> float:
        return self.c

    def choose(self, engine, B, A, p, state):
        loss0, grad_sq = float(p.loss), float(p.grad_sq)
        eta_theorem = float(THEOREM.choose(engine, B, A, p, state)[0])
        eta = self.cap if state.get("eta") is None else min(self.cap, 2.0 * state["eta"])
        trials = 0
        while eta > eta_theorem and trials < self.max_trials:
            trials += 1
            B1, A1 = engine.update(B, A, p.grad_B, p.grad_A, eta)
            if float(engine.loss_pass(B1, A1)) <= loss0 - self.c * eta * grad_sq:
                state["eta"] = eta
                return engine.xp.asarray(eta), trials
            eta *= 0.5
        state["eta"] = eta_theorem
        return engine.xp.asarray(eta_theorem), trials

    def device_loop(self, problem):
        return None


THEOREM = Theorem()


def as_policy(step_size) -> StepSize:
    """'theorem' | 'armijo' | positive number | a policy object (StepSize) -> a policy object."""
    if isinstance(step_size, str):
        if step_size == "theorem":
            return THEOREM
        if step_size == "armijo":
            return Armijo()
        raise ValueError(f"unknown step_size {step_size!r}; use 'theorem', 'armijo', a positive "
                         f"float or a policy object")
    if isinstance(step_size, StepSize):
        return step_size
    return Constant(step_size)
