"""Step-size policies: the paper's eta_t, a constant, Armijo backtracking, and the certified
line search (``Certified``: Lemma 2's decrease with an eta never below the paper's).

A policy is any object with what ``StepSize`` lists; the strings "theorem", "certified",
"exact" and "armijo" and a positive number are shortcuts for the built-in ones. ``choose``
works on any device: the pass's norms arrive as that device keeps them (Python floats on the
host, 0-d float64 arrays on a GPU) and eta stays there, so a GPU step needs no host round
trip for "theorem" or a constant.
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

    # Optional: ``eta_floor``, the constant of eq. (8) whose eta_t the policy's eta is never
    # below (theory.check then checks eta >= eta_t at every step); ``constant``, the same
    # for a policy whose eta never exceeds that eta_t (the paper's ||V_t||^2 growth bound);
    # ``state_keys``, the keys choose() keeps in ``state`` (fit(state=) is checked against
    # them; each a step size: a positive float, or None).


def theorem_eta(v_sq, g_norm, lipschitz, constant=THEOREM_CONSTANT, xp=np):
    """eta_t = min{1 / (constant max(L, 1) (||V_t||^2 + ||G_t||_F)), 1} of eq. (8), from
    ||V_t||^2, ||G_t||_F and ``lipschitz`` = max(L, 1), elementwise in ``xp``'s arithmetic:
    the one place the formula is written (Theorem.eta, theory.check's eta >= eta_t and
    lorakern.torch use it; reference.step writes it out literally, as the reference does)."""
    scale = constant * lipschitz * (v_sq + g_norm)
    # min{1/x, 1} written as 1/max{x, 1}: the same number, and no 1/0 when V = G = 0
    return 1.0 / xp.maximum(scale, 1.0)


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
    state_keys = ()  # eta depends on V_t alone

    @property
    def eta_floor(self) -> float:
        return self.constant

    def __post_init__(self):
        object.__setattr__(self, "constant", positive_float("Theorem constant", self.constant))
        if self.norm not in ("exact", "bound"):
            raise ValueError(f"Theorem norm must be 'exact' or 'bound', got {self.norm!r}")

    def eta(self, v_sq, g_sq, lipschitz, xp=np):
        """eta_t of eq. (8) from ||V_t||^2, ||G_t||_F^2 and max(L, 1), in ``xp``'s arithmetic
        (NumPy on host floats, CuPy on 0-d device arrays, or any namespace with ``sqrt`` and
        ``maximum``), by ``theorem_eta``."""
        return theorem_eta(v_sq, xp.sqrt(g_sq), lipschitz, self.constant, xp)

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
    state_keys = ()  # eta depends on V_t alone
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

    So eta >= eta_t at every step (``eta_floor``). With c = 1/5 this is
    ``Certified(search="backtrack")``, whose docstring gives what that certifies.
    """

    cap: float = 1.0
    c: float = 1e-4
    max_trials: int = 60

    host_loop = True
    norm = "exact"
    eta_floor = THEOREM_CONSTANT
    state_keys = ("eta",)  # the last accepted eta: the next search starts at twice it

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


#: Certified's searches: "exact" (the quartic, squared loss), "backtrack" (Armijo, c = 1/5),
#: "auto" (exact where the problem and device have the quartic pass, else backtrack)
SEARCHES = ("auto", "exact", "backtrack")


@dataclass(frozen=True)
class Certified:
    """A line search with the paper's guarantees (``step_size="certified"``): at every step

        J(V_{t+1}) <= J(V_t) - eta/5 ||grad J(V_t)||^2   and   eta >= eta_t of eq. (8),

    so Lemma 2's inequality (9) holds with the eta actually taken, and eq. (10) of Theorem 3,
    min_t ||grad J(V_t)||^2 <= 5 (J(V_0) - L*) / sum_t eta_t, holds with the larger sum.

    Searches (``search``):

    * ``"exact"``: for the squared loss J(V - eta grad J) is a quartic in eta (R + BA moves
      quadratically: (B - eta gB)(A - eta gA) = BA - eta (gB A + B gA) + eta^2 gB gA). One
      more pass gives its coefficients (``Kernels.line_quartic``; on the CPU without a mask
      2 m n r flops over R, as a loss-only pass), and eta minimises the quartic over those
      eta in [eta_t, cap] that satisfy the decrease with c = 1/5 (eta_t does, by Lemma 2,
      so the set is never empty; the minimum is among the interval's ends, the critical
      points of the quartic and the roots of the decrease condition, all found from the
      coefficients, no further pass).
      Only the squared loss: another loss raises ValueError.
    * ``"backtrack"``: ``Armijo(cap, c=1/5)``: halving from min(cap, 2 eta_(t-1)) until the
      decrease holds, stopping at eta_t (which Lemma 2 guarantees to pass): one loss-only
      pass per trial. Any loss, any device.
    * ``"auto"`` (the default): "exact" where the problem has the squared loss without a
      mask and its device has the quartic pass (reference, cpu), else "backtrack". Exact
      needed 21-48 % fewer passes to 1 % above the optimum in benchmarks/NOTES.md; in
      seconds it was 1.9x
      faster at 4096^2, r = 4, and about even at r = 16 (5 % slower at 4096^2, a tie at
      2048^2 and on the demo).

    Why the paper's guarantees carry over (checked against Appendix A.4 of Mu & Klabjan,
    2025). Write Delta = J(V_0) - L*, c = 1/5, S_t = sum_{s<t} eta_s, g_s = grad J(V_s).

    1. Eq. (10). Summing the decrease, c sum_{s<T} eta_s ||g_s||^2 <= J(V_0) - J(V_T) <=
       Delta, so min_t ||g_t||^2 <= Delta / (c S_T) = 5 Delta / S_T. The proof of (10)
       uses nothing else about eta: it holds for any eta with the decrease, and since
       eta >= eta_t at every step, with a sum at least the theorem's at the same iterates.
    2. The rate. Theorem 3's O(1/log T) needs sum_t eta_t to grow like log T, and the paper
       gets it from its growth bound ||V_t||^2 <= ||V_0||^2 + t/(5 sqrt(2) L) + 10 Delta,
       whose proof uses eta <= 1 and eta ||V_t||^2 <= 1/(5 sqrt(2) L) (both follow from
       eta <= eta_t). A longer step breaks that proof, so the bound is not guaranteed here
       (theory.check reports whether it held, and does not count it). The rate survives by
       another route, which needs only the decrease: ||V_{t+1}|| <= ||V_t|| + eta_t ||g_t||
       and Cauchy-Schwarz give
           ||V_t|| <= ||V_0|| + sqrt(S_t Delta / c)                                   (G)
       (theory.check checks (G) at every step). With L-smoothness, ||grad L(W_t)|| <=
       sqrt(2 L Delta) (J decreases), so eta_s >= eta_t(V_s) >= min{1, 1/(a + b S_s)} with
       a = K (2 ||V_0||^2 + sqrt(2 L Delta)), b = 2 K Delta / c, K = 5 sqrt(2) max(L, 1).
       Then phi(S) = a S + b S^2 / 2 rises by at least k = min{1, a + b/2} per step, so
       S_T >= (sqrt(a^2 + 2 b k T) - a) / b, which grows like sqrt(T): min_t ||g_t||^2 =
       O(1/sqrt(T)), within Theorem 3's O(1/log T). (The argument applies to eta_t itself
       too; the paper's linear growth bound is the looser one.)

    ``decrease`` is 1/5 and ``eta_floor`` eq. (8)'s constant: theory.check certifies both
    at every step of a run. ``cap`` bounds eta from above (the paper's eta_t <= 1 too);
    ``max_trials`` bounds the backtracking's trials (then eta_t is taken). The name says
    what ``theory.check`` does with a run of it; ``Armijo(c=0.2)`` is the same backtracking,
    kept for its other c.

    Parameters
    ----------
    search : "auto" (the default), "exact" or "backtrack", as above.
    cap : the largest eta tried, > 0 (default 1, where eq. (8) caps eta_t too).
    max_trials : the backtracking's trials per step, >= 1; after them eta_t is taken.

    Raises
    ------
    ValueError : an unknown ``search``; a ``cap`` or ``max_trials`` that is not positive
        (TypeError if not a number); "exact" on a loss other than squared (when a fit or
        step starts).
    """

    search: str = "auto"
    cap: float = 1.0
    max_trials: int = 60

    decrease = LEMMA2_DECREASE
    eta_floor = THEOREM_CONSTANT
    state_keys = ("eta",)  # the last accepted eta: the next search starts at twice it
    host_loop = True
    norm = "exact"

    def __post_init__(self):
        if self.search not in SEARCHES:
            raise ValueError(f"Certified search must be one of {SEARCHES}, got {self.search!r}")
        object.__setattr__(self, "cap", positive_float("Certified cap", self.cap))
        object.__setattr__(self, "max_trials",
                           positive_int("Certified max_trials", self.max_trials))

    @property
    def backtracking(self) -> Armijo:
        return Armijo(cap=self.cap, c=LEMMA2_DECREASE, max_trials=self.max_trials)

    def exact_for(self, problem, engine=None) -> bool:
        """Whether this run uses the exact search (raises ValueError where "exact" cannot)."""
        if self.search == "backtrack":
            return False
        squared = getattr(getattr(problem, "loss", None), "name", None) == "squared"
        has_pass = engine is None or engine.has_line_quartic
        if self.search == "exact" and not squared:
            from .reference.matrix import check_quartic  # its message

            check_quartic(problem)
        if self.search == "exact" and not has_pass:
            raise ValueError(f"the exact line search has no quartic pass for problem kind "
                             f"{problem.kind!r} on device {engine.device.name!r}; use "
                             f"step_size='certified' (it backtracks there)")
        # auto: not with a mask, whose quartic pass (8 m n r flops, no Gram shortcut) costs
        # 4.3 loss-only passes on the CPU (2048^2, r = 16; benchmarks/NOTES.md)
        masked = getattr(problem, "mask", None) is not None
        return squared and has_pass and (self.search == "exact" or not masked)

    def choose(self, engine, B, A, p, state):
        # decided at each step, not kept in ``state``: a fit resumed from that state may run
        # on another device (the exact search needs nothing carried over)
        if not self.exact_for(engine.problem, engine):
            return self.backtracking.choose(engine, B, A, p, state)
        eta_theorem = float(THEOREM.choose(engine, B, A, p, state)[0])
        a2, a3, a4 = (float(a) for a in engine.line_quartic(B, A, p.grad_B, p.grad_A))
        eta = exact_step(float(p.loss), float(p.grad_sq), a2, a3, a4, eta_theorem,
                         max(self.cap, eta_theorem))
        # kept as the backtracking keeps it: the exact search does not read it, but a fit
        # resumed where the search backtracks (a mask, another device) starts at twice it
        state["eta"] = eta
        return engine.xp.asarray(eta), 1

    def device_loop(self, problem):
        self.exact_for(problem)  # a loss the exact search cannot take fails before the fit
        return None

    def describe(self, problem, device=None) -> str:
        """One line on the search this policy runs on ``problem`` (on ``device``, a name or a
        Device, when given: a device without the quartic pass, CUDA, backtracks)."""
        search = self.search
        if search == "auto":  # what the loss and the device allow
            on = None
            if device is not None:
                from types import SimpleNamespace

                from . import _dispatch

                dev = _dispatch.device(device) if isinstance(device, str) else device
                has = getattr(_dispatch.kernels(problem.kind, dev), "line_quartic", None) is not None
                on = SimpleNamespace(has_line_quartic=has, device=dev)
            search = "exact" if self.exact_for(problem, on) else "backtrack"
        how = {"exact": "exact line search on the quartic J(V - eta grad J)",
               "backtrack": "backtracking (halving) line search"}[search]
        dev = device if device is None or not isinstance(device, str) else None
        if isinstance(device, str):
            from . import _dispatch

            dev = _dispatch.device(device)
        host = ("" if dev is None or getattr(dev, "host_scalars", True) else
                "; step by step from the host (the device-side loop runs 'theorem' or a constant)")
        return (f"certified: {how}, eta in [eta_t, {self.cap:g}] with J(V_t+1) <= J(V_t) - "
                f"eta/5 ||grad J||^2 (Lemma 2's decrease, eta >= the theorem's eta_t){host}")


def exact_step(loss, grad_sq, a2, a3, a4, lo, hi, c=LEMMA2_DECREASE) -> float:
    """The eta in [lo, hi] that minimises q(eta) = loss - grad_sq eta + a2 eta^2 + a3 eta^3 +
    a4 eta^4 among those with q(eta) <= loss - c eta grad_sq; ``lo`` if none does (Lemma 2
    puts eta_t in that set when lo = eta_t; in floating point it may be missed by rounding).

    The minimum over that set lies at an end of [lo, hi], at a critical point of q, or at a
    root of h(eta) = q(eta) - loss + c eta grad_sq (an end of one of the set's intervals).
    """
    q = np.array([a4, a3, a2, -grad_sq, loss])          # highest power first (np.polyval)
    if not (np.isfinite(q).all() and math.isfinite(lo) and math.isfinite(hi)):
        return float(lo)  # an overflowing iterate: the theorem's eta, and fit reports it
    h = q - np.array([0.0, 0.0, 0.0, -c * grad_sq, loss])
    candidates = [lo, hi]
    for poly in (np.array([4 * a4, 3 * a3, 2 * a2, -grad_sq]), h[:-1]):
        # q' and h / eta (h(0) = 0): their real roots inside (lo, hi)
        for root in np.roots(np.trim_zeros(poly, "f")) if np.any(poly[:-1]) else ():
            if abs(root.imag) <= 1e-9 * abs(root.real) and lo < root.real < hi:
                candidates.append(float(root.real))
    candidates = np.array(candidates)
    values, slack = np.polyval(q, candidates), np.polyval(h, candidates)
    # a root of h is feasible up to its rounding: allow it the size of q's terms' rounding
    tol = 64 * np.finfo(float).eps * (abs(loss) + grad_sq * candidates)
    feasible = slack <= tol
    if not feasible.any():
        return float(lo)
    best = np.argmin(np.where(feasible, values, np.inf))
    return float(candidates[best])


THEOREM = Theorem()


def check_state(state, policy) -> dict:
    """fit's ``state=`` as a new dict: TypeError unless a dict, ValueError for a key the
    policy does not keep (``state_keys``; not checked for a policy without it) or a value
    that is not a positive finite step size. The caller's dict is not changed."""
    if state is None:
        return {}
    if not isinstance(state, dict):
        raise TypeError(f"state must be None or a dict (a FitResult's state), got "
                        f"{type(state).__name__}")
    keys = getattr(policy, "state_keys", None)
    unknown = [k for k in state if keys is not None and k not in keys]
    if unknown:
        kept = ", ".join(repr(k) for k in keys) or "nothing"
        raise ValueError(f"state has {', '.join(repr(k) for k in unknown)} but "
                         f"{type(policy).__name__} keeps {kept}: pass the state of a fit with "
                         f"the same step size, fit(..., step_size=result.step_size, "
                         f"state=result.state)")
    out = dict(state)
    for key in keys or ():
        if out.get(key) is not None:
            out[key] = positive_float(f"state[{key!r}]", out[key])
    return out


def as_policy(step_size) -> StepSize:
    """'theorem' | 'certified' | 'exact' | 'armijo' | positive number | a policy object (StepSize)
    -> a policy object."""
    if isinstance(step_size, str):
        if step_size == "theorem":
            return THEOREM
        if step_size == "certified":
            return Certified()
        if step_size == "exact":
            return Certified(search="exact")
        if step_size == "armijo":
            return Armijo()
        raise ValueError(f"unknown step_size {step_size!r}; use 'theorem', 'certified', "
                         f"'exact', 'armijo', a positive float or a policy object")
    if isinstance(step_size, StepSize):
        return step_size
    return Constant(step_size)
