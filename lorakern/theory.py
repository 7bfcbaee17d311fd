"""The paper's inequalities as checks on a fit's history (Mu & Klabjan, 2025).

With eta_t from eq. (8) and V_{t+1} = V_t - eta_t grad J(V_t):

* Lemma 2 (eq. 9):   J(V_{t+1}) <= J(V_t) - eta_t / 5 * ||grad J(V_t)||^2 at every step;
* Theorem 3 (eq. 10): min_t ||grad J(V_t)||^2 <= 5 (J(V_0) - L*) / sum_t eta_t;
* proof of Theorem 3: ||V_t||^2 <= ||V_0||^2 + t / (5 sqrt(2) L) + 10 (J(V_0) - L*),
  the at-most-linear growth that makes sum_t eta_t diverge like log T (its proof needs
  eta <= eta_t: guaranteed for the theorem's step only).

For a policy that takes longer steps (``Certified``, ``Armijo``) two more checks:

* eta >= eta_t of eq. (8) at every step (policies declaring ``eta_floor``), recomputed from
  the history's ||V_t||^2, ||G_t||_F and max(L, 1);
* ||V_t|| <= ||V_0|| + sqrt(sum_{s<t} eta_s (J(V_0) - L*) / c), which follows from the
  decrease alone (triangle inequality and Cauchy-Schwarz; step_size.Certified's docstring)
  and with eta >= eta_t keeps sum_t eta_t growing like sqrt(T): Theorem 3's rate.

The losses are computed in floating point, so each inequality is allowed a slack of
``rtol * |J|`` (``RTOL`` by dtype, a few hundred ulps of the accumulated loss).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .step_size import LEMMA2_DECREASE, THEOREM_CONSTANT, theorem_eta

#: slack allowed on each inequality, relative to the loss, by dtype of the data
RTOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}
#: what a check of a run with no step says (every inequality holds vacuously: all_hold)
NOTHING_TO_CHECK = "nothing to check: the run took 0 steps (no inequality has a step to test)"


@dataclass(eq=False)
class Report:
    """What held: per-step Lemma 2 (``lemma2`` is a bool per step), Theorem 3's bound.

    ``print(report)`` prints ``summary()``; the repr is one line. For a policy that declares
    no decrease (a constant eta) ``guaranteed`` is False: the inequalities are checked with
    Lemma 2's c = 1/5 for reference, and ``all_hold`` says whether they happened to hold.
    """

    lemma2: np.ndarray          # bool per step: J(V_{t+1}) <= J(V_t) - c eta_t ||grad J||^2
    lemma2_slack: np.ndarray    # J(V_t) - c eta_t ||grad J||^2 - J(V_{t+1}): >= -tol if held
    theorem3_lhs: float         # min_t ||grad J(V_t)||^2
    theorem3_bound: float       # (J(V_0) - L*) / (c sum_t eta_t)
    theorem3: bool
    v_growth: bool              # ||V_t||^2 <= ||V_0||^2 + t/(5 sqrt(2) L) + 10 (J_0 - L*)
    tolerance: float
    #: bool per step: eta >= eta_t of eq. (8) (None: the policy declares no floor)
    eta_floor: np.ndarray | None = None
    #: eta_t of eq. (8) at each step, recomputed from the history (None with eta_floor)
    eta_theorem: np.ndarray | None = None
    #: ||V_t|| <= ||V_0|| + sqrt(sum_{s<t} eta_s (J_0 - L*) / c) at every step
    norm_growth: bool = True
    #: whether the paper's v_growth bound is guaranteed (eta <= eta_t); all_hold ignores
    #: v_growth where it is not
    growth_guaranteed: bool = True
    #: whether the run's policy guarantees the inequalities (False: checked for reference)
    guaranteed: bool = True
    #: the policy's short name, for the summary of a run without a guarantee
    policy: str = ""

    def __str__(self):
        return self.summary()

    def __repr__(self):
        steps = len(self.lemma2)
        return (f"Report(all_hold={self.all_hold}, {steps} steps, Lemma 2 held at "
                f"{int(np.sum(self.lemma2))}/{steps}, theorem3={self.theorem3}"
                + ("" if self.guaranteed else ", no guarantee: checked for reference") + ")")

    @property
    def all_hold(self) -> bool:
        """Every inequality the run's policy guarantees held."""
        return (bool(self.lemma2.all()) and self.theorem3 and self.norm_growth
                and (self.v_growth or not self.growth_guaranteed)
                and (self.eta_floor is None or bool(self.eta_floor.all())))

    def summary(self) -> str:
        if len(self.lemma2) == 0:
            return NOTHING_TO_CHECK
        bad = np.flatnonzero(~self.lemma2)
        lemma = ("Lemma 2 held at every step" if bad.size == 0 else
                 f"Lemma 2 failed at {bad.size} step(s), first t = {bad[0]}")
        verdict = "held" if self.theorem3 else "FAILED"
        growth = ("held" if self.v_growth else "FAILED" if self.growth_guaranteed
                  else "did not hold (not guaranteed)")
        floor = "" if self.eta_floor is None else (
            "; eta >= eta_t at every step" if self.eta_floor.all() else
            f"; eta < eta_t at {int((~self.eta_floor).sum())} step(s), FAILED")
        head = "" if self.guaranteed else (
            f"no guarantee for a {self.policy or 'policy without a declared decrease'} step; "
            f"checked for reference with Lemma 2's c = 1/5: ")
        return (f"{head}{lemma} ({len(self.lemma2)} steps); Theorem 3 {verdict}: "
                f"min ||grad J||^2 = {self.theorem3_lhs:.4g} <= {self.theorem3_bound:.4g}; "
                f"||V_t||^2 growth bound {growth}; ||V_t|| growth bound "
                f"{'held' if self.norm_growth else 'FAILED'}{floor}")


def check(result, *, l_star: float = 0.0, decrease: float | None = None,
          constant: float | None = None, rtol: float | None = None) -> Report:
    """Check a FitResult's history against Lemma 2 and Theorem 3.

    Parameters
    ----------
    result : a FitResult (its ``history``, ``final_loss`` and ``step_size``).
    l_star : a lower bound on the loss (0 for the built-in losses).
    decrease : the sufficient-decrease constant c; default: the one the run's step-size
        policy guarantees (``policy.decrease``: 1/5 for the theorem's eta as in Lemma 2, the
        Armijo c for a line search), or Lemma 2's 1/5 for a policy that guarantees none.
    constant : the step-size constant of eq. (8); default: the policy's ``constant`` if it
        has one, else 5 sqrt(2). Only the ||V_t||^2 growth bound depends on it.
    rtol : the slack, relative to |J|; default ``RTOL`` for the data's dtype.

    Returns
    -------
    Report (``print(report)`` prints its summary). For a policy that declares no decrease
    (a constant eta) ``report.guaranteed`` is False and the summary says so: the
    inequalities are then checked with c = 1/5 for reference, as ``lorakern demo`` does.
    For a policy with ``eta_floor`` (Theorem, Armijo, Certified) ``eta_floor``
    says per step whether eta >= eta_t (eq. 8 with that constant, recomputed from the
    history); the paper's ||V_t||^2 growth bound counts in ``all_hold`` only for a policy
    with ``constant`` (its eta never exceeds eta_t).
    """
    policy = getattr(result, "step_size", None)
    guaranteed = policy is None or getattr(policy, "decrease", None) is not None
    if decrease is None:
        decrease = getattr(policy, "decrease", None) or LEMMA2_DECREASE
    if constant is None:
        constant = getattr(policy, "constant", THEOREM_CONSTANT)
    if not (math.isfinite(decrease) and decrease > 0):
        raise ValueError(f"decrease must be positive and finite, got {decrease}")
    h = result.history
    loss_next = np.append(h.loss[1:], result.final_loss)
    report = check_arrays(h.loss, loss_next, h.eta, h.grad_sq, h.v_sq, l_star=l_star,
                          decrease=decrease, constant=constant, lipschitz=h.lipschitz,
                          rtol=RTOL[np.dtype(h.dtype)] if rtol is None else rtol,
                          g_norm=h.g_norm, eta_floor=getattr(policy, "eta_floor", None),
                          growth_guaranteed=policy is None or
                          getattr(policy, "constant", None) is not None)
    report.guaranteed = guaranteed
    report.policy = "" if policy is None else policy_name(policy)
    return report


#: eta >= eta_t is checked up to this relative slack: eta_t recomputed from the history may
#: differ from the policy's in the last bits (a device computes it in its own order)
ETA_RTOL = 1e-9


def check_arrays(loss, loss_next, eta, grad_sq, v_sq, *, l_star=0.0, decrease=0.2,
                 constant=THEOREM_CONSTANT, lipschitz=1.0, rtol=1e-12, g_norm=None,
                 eta_floor=None, growth_guaranteed=True) -> Report:
    """The checks of ``check`` on plain arrays: values at V_t and J(V_{t+1}); with
    ``g_norm`` (||G_t||_F per step) and ``eta_floor`` (eq. 8's constant) also eta >= eta_t."""
    loss, loss_next = np.asarray(loss, float), np.asarray(loss_next, float)
    eta, grad_sq, v_sq = np.asarray(eta, float), np.asarray(grad_sq, float), np.asarray(v_sq, float)
    floor = eta_floor is not None and g_norm is not None
    if loss.size == 0:
        return Report(np.ones(0, bool), np.zeros(0), math.nan, math.inf, True, True, 0.0,
                      eta_floor=np.ones(0, bool) if floor else None,
                      eta_theorem=np.zeros(0) if floor else None,
                      growth_guaranteed=growth_guaranteed)
    tol = rtol * max(float(np.max(np.abs(loss))), float(np.max(np.abs(loss_next))), 1e-300)
    # Lemma 2, eq. (9): J(V_{t+1}) <= J(V_t) - (eta_t / 5) ||grad J(V_t)||^2
    slack = loss - decrease * eta * grad_sq - loss_next
    lemma2 = slack >= -tol
    # Theorem 3, eq. (10): min_t ||grad J(V_t)||^2 <= 5 (J(V_0) - L*) / sum_t eta_t
    lhs = float(np.min(grad_sq))
    bound = (loss[0] - l_star + tol) / (decrease * float(np.sum(eta)))
    # proof of Theorem 3: ||V_t||^2 <= ||V_0||^2 + t / (5 sqrt(2) L) + 10 (J(V_0) - L*)
    t = np.arange(v_sq.size)
    # (sum_t 2 eta_t ||grad J||^2 <= 2 (J_0 - L*) / c, which is 10 (J_0 - L*) for c = 1/5)
    growth = v_sq[0] + t / (constant * lipschitz) + 2.0 / decrease * (loss[0] - l_star + tol)
    v_growth = bool(np.all(v_sq <= growth * (1 + rtol)))
    # ||V_t|| <= ||V_0|| + sum_{s<t} eta_s ||g_s|| <= ||V_0|| + sqrt(S_t sum_{s<t} eta_s ||g_s||^2)
    #         <= ||V_0|| + sqrt(S_t (J_0 - L*) / c)          (Certified's docstring, (G))
    S = np.concatenate([[0.0], np.cumsum(eta)[:-1]])
    norm_bound = math.sqrt(v_sq[0]) + np.sqrt(S * max(loss[0] - l_star + tol, 0.0) / decrease)
    norm_growth = bool(np.all(np.sqrt(v_sq) <= norm_bound * (1 + rtol)))
    eta_theorem = floor_ok = None
    if floor:
        eta_theorem = theorem_eta(v_sq, np.asarray(g_norm, float), lipschitz, eta_floor)
        floor_ok = eta >= eta_theorem * (1 - ETA_RTOL)
    return Report(lemma2=lemma2, lemma2_slack=slack, theorem3_lhs=lhs, theorem3_bound=float(bound),
                  theorem3=lhs <= bound, v_growth=v_growth, tolerance=tol, eta_floor=floor_ok,
                  eta_theorem=eta_theorem, norm_growth=norm_growth,
                  growth_guaranteed=growth_guaranteed)


# -- a run's verdict, in words (lorakern demo prints it) --------------------------------------

def policy_name(policy) -> str:
    """A policy's short name: its ``name`` attribute, else its class name in lower case
    ("theorem", "constant", "armijo", or a user-defined policy's own)."""
    return str(getattr(policy, "name", None) or type(policy).__name__).lower()


def monotone(result) -> tuple[bool, int | None]:
    """(J decreased at every step up to rounding, the first t where it rose or None)."""
    h = result.history
    loss = np.append(h.loss, result.final_loss)
    tol = RTOL[np.dtype(h.dtype)] * float(np.max(np.abs(loss)))
    rose = np.flatnonzero(np.diff(loss) > tol)
    return rose.size == 0, (int(rose[0]) if rose.size else None)


def verdict(result) -> tuple[list[str], bool]:
    """Lines saying what the theory guarantees for this run and whether it held; an ok flag.

    What is guaranteed is read from the run's policy (``result.step_size``), so a
    user-defined policy is judged by what it declares:

    * ``decrease`` None: no descent guarantee. The lines say whether J fell monotonically
      and, for reference, at how many steps Lemma 2's inequality (c = 1/5) held; ok is True.
    * ``decrease`` c: Lemma 2's inequality with c at every step and Theorem 3's bound with c
      are guaranteed; so is the ||V_t||^2 growth bound if the policy has eq. (8)'s
      ``constant`` (its eta never exceeds the theorem's). ok is False if one of those failed
      or the run diverged.
    """
    policy, h = result.step_size, result.history
    name = policy_name(policy)
    label = type(policy).__name__
    steps = len(h)
    c = getattr(policy, "decrease", None)
    lines = []
    if steps == 0:
        lines.append(f"theory    {NOTHING_TO_CHECK}")
        if result.status == "diverged":
            lines.append("          the loss was not finite at V_0")
        return lines, result.status != "diverged"
    if c is None:
        mono, first = monotone(result)
        ref = check(result, decrease=LEMMA2_DECREASE)
        lines.append(f"theory    the paper's guarantees are for its eta_t; a {name} step has none")
        lines.append("          loss decreased monotonically: " + (
            f"yes, at all {steps} steps (up to {h.dtype} rounding)" if mono
            else f"NO, it first rose at t = {first}"))
        lines.append(f"          for reference, Lemma 2's inequality (c = 1/5) held at "
                     f"{int(ref.lemma2.sum())}/{steps} steps, Theorem 3's bound "
                     + ("held" if ref.theorem3 else "did not hold")
                     + f" (theory.check(result).all_hold: {ref.all_hold})")
        if result.status == "diverged":
            lines.append(f"          the loss stopped being finite after step {result.steps}")
        return lines, True

    report = check(result)  # the policy's own decrease and constant
    paper = c == LEMMA2_DECREASE
    growth_guaranteed = report.growth_guaranteed
    if paper:
        lines.append("theory    Mu & Klabjan (2025), checked on every recorded step")
        lemma = "J(V_t+1) <= J(V_t) - eta_t/5 ||grad J(V_t)||^2"
        bound = "5 (J(V_0) - 0) / sum_t eta_t"
        growth_term = "10 J(V_0)"
        if not growth_guaranteed and getattr(policy, "eta_floor", None) is not None:
            # a longer step than eta_t (Certified), with Lemma 2's decrease
            lines[-1] += f", with the eta taken in place of eta_t ({label})"
            lemma = "J(V_t+1) <= J(V_t) - eta/5 ||grad J(V_t)||^2"
            bound = "5 (J(V_0) - 0) / sum_t eta"
    else:
        lines.append(f"theory    Lemma 2 and Theorem 3 checked with Lemma 2's constant 1/5 replaced by "
                     f"the {label} c = {c:g}")
        lemma = f"J(V_t+1) <= J(V_t) - c eta_t ||grad J(V_t)||^2 (the {label} condition)"
        bound = "(J(V_0) - 0) / (c sum_t eta_t)"
        growth_term = "(2/c) J(V_0)"
    bad = np.flatnonzero(~report.lemma2)
    lines.append(f"Lemma 2   {lemma}: " + (
        f"held at all {steps} steps" if bad.size == 0 else
        f"FAILED at {bad.size}/{steps} steps, first t = {bad[0]} "
        f"(short by {-report.lemma2_slack[bad[0]]:.3g})"))
    lines.append(f"Theorem 3 min_t ||grad J(V_t)||^2 <= {bound}: "
                 f"{report.theorem3_lhs:.4g} <= {report.theorem3_bound:.4g}, "
                 + ("held" if report.theorem3 else "FAILED"))
    growth = "held" if report.v_growth else ("FAILED" if growth_guaranteed else "did not hold")
    k = getattr(policy, "constant", None) or THEOREM_CONSTANT
    k = "5 sqrt(2)" if k == THEOREM_CONSTANT else f"{k:.4g}"
    lines.append(f"growth    ||V_t||^2 <= ||V_0||^2 + t/({k} L) + {growth_term} "
                 f"(proof of Theorem 3): {growth}"
                 + ("" if growth_guaranteed else f" (not guaranteed for {name})"))
    if not growth_guaranteed:
        coef = "5" if paper else "1/c"
        lines.append(f"growth    ||V_t|| <= ||V_0|| + sqrt({coef} (J(V_0) - 0) sum_(s<t) eta_s) "
                     f"(needs only the decrease; keeps Theorem 3's rate): "
                     + ("held" if report.norm_growth else "FAILED"))
    if report.eta_floor is not None and not growth_guaranteed and steps:
        below = np.flatnonzero(~report.eta_floor)
        ratio = h.eta / report.eta_theorem
        lines.append("eta       eta >= eta_t of eq. (8) (the theorem's step at V_t): " + (
            f"held at all {steps} steps (eta / eta_t: median {np.median(ratio):.3g}, "
            f"max {np.max(ratio):.3g}; sum eta = {np.sum(h.eta):.4g} against sum eta_t = "
            f"{np.sum(report.eta_theorem):.4g})" if below.size == 0 else
            f"FAILED at {below.size}/{steps} steps, first t = {below[0]}"))
    lines.append(f"          slack allowed for {h.dtype} rounding: {report.tolerance:.3g} "
                 f"({RTOL[np.dtype(h.dtype)]:g} x max |J|)")
    ok = report.all_hold  # every inequality the policy guarantees
    if result.status == "diverged":
        lines.append(f"          the loss stopped being finite after step {result.steps}: "
                     f"a guaranteed-descent step must not do that")
        ok = False
    return lines, ok
