"""Lemma 2 and Theorem 3 hold on fitted histories (hypothesis), and the checker can fail."""
from __future__ import annotations

import copy
import math
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakern
from lorakern import Armijo, Certified, theory

from helpers import DEVICES, LOSS_NAMES, make_case

#: examples per property; raise it for a longer search, e.g. LORAKERN_EXAMPLES=500
EXAMPLES = int(os.environ.get("LORAKERN_EXAMPLES", "25"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

cases = st.fixed_dictionaries({
    "shape": st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 4)),
    "loss": st.sampled_from(LOSS_NAMES),
    "masked": st.booleans(),
    "dtype": st.sampled_from([np.float32, np.float64]),
    "seed": st.integers(0, 2**31 - 1),
    "lipschitz": st.one_of(st.none(), st.floats(0.1, 10.0)),
    "scale": st.sampled_from([0.1, 1.0, 10.0]),
    "init": st.sampled_from(["lora", "gaussian"]),
    "adapter_scale": st.sampled_from([None, 0.1, 1.0, 3.0]),
    "steps": st.integers(1, 25),
})


def _fit(case, device, step_size="theorem"):
    case = dict(case)
    steps = case.pop("steps")
    with warnings.catch_warnings():
        # the shapes include r > min(m, n) and tiny all-False masks on purpose
        warnings.simplefilter("ignore", lorakern.InputWarning)
        problem, B, A = make_case(**case)
        result = lorakern.fit(problem, B, A, steps=steps, device=device, step_size=step_size)
    assert result.status == "completed" and result.steps == steps == len(result.history)
    return result


@PROPERTY
@given(case=cases)
def test_theorem_histories_satisfy_the_paper_reference(case):
    result = _fit(case, "reference")
    report = theory.check(result)
    assert report.all_hold, report.summary()


# CPU: fp64, unmasked, each loss -- shares the kernels the other tests compile
cpu_cases = cases.map(lambda c: {**c, "dtype": np.float64, "masked": False})


@pytest.mark.skipif("cpu" not in DEVICES, reason="no CPU backend")
@PROPERTY
@given(case=cpu_cases)
def test_theorem_histories_satisfy_the_paper_cpu(case):
    result = _fit(case, "cpu")
    report = theory.check(result)
    assert report.all_hold, report.summary()


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=cases, cap=st.sampled_from([0.5, 1.0, 4.0]), c=st.sampled_from([1e-4, 0.05, 0.2]))
def test_armijo_histories_satisfy_sufficient_decrease(case, cap, c):
    """Armijo: Lemma 2's inequality with its own c, and hence Theorem 3's bound with it."""
    result = _fit(case, "reference", Armijo(cap=cap, c=c))
    report = theory.check(result, decrease=c)
    assert report.lemma2.all() and report.theorem3, report.summary()
    h = result.history
    eta_theorem = 1.0 / np.maximum(5 * math.sqrt(2) * h.lipschitz * (h.v_sq + h.g_norm), 1.0)
    assert ((h.trials >= 1) | (h.eta == eta_theorem)).all()
    assert (h.eta >= eta_theorem * (1 - 1e-12)).all()  # never a shorter step than the theorem's


# -- the checker itself must be able to fail ---------------------------------------------
@pytest.fixture(scope="module")
def fitted():
    problem, B, A = make_case((9, 11, 3), np.float64, seed=50)
    result = lorakern.fit(problem, B, A, steps=20, device="reference", step_size="theorem")
    assert theory.check(result).all_hold
    return result


def _doctored(result, **changes):
    out = copy.deepcopy(result)
    for name, (index, value) in changes.items():
        getattr(out.history, name)[index] = value
    return out


def test_checker_reports_a_loss_increase(fitted):
    bad = _doctored(fitted, loss=(6, fitted.history.loss[5] * 1.01))
    report = theory.check(bad)
    assert not report.all_hold
    assert list(np.flatnonzero(~report.lemma2)) == [5]
    assert report.lemma2_slack[5] < -report.tolerance
    assert "Lemma 2 failed at 1 step(s), first t = 5" in report.summary()


def test_checker_reports_a_final_loss_increase(fitted):
    bad = copy.deepcopy(fitted)
    bad.final_loss = fitted.history.loss[-1] + 1e-6
    report = theory.check(bad)
    assert not report.all_hold and list(np.flatnonzero(~report.lemma2)) == [19]


def test_checker_reports_too_little_decrease(fitted):
    """Descent, but less than eta/5 ||grad J||^2: Lemma 2 fails at that step."""
    h = fitted.history
    short = h.loss[4] - 0.1 * h.eta[4] * h.grad_sq[4]
    report = theory.check(_doctored(fitted, loss=(5, short)))
    assert not report.lemma2[4]
    assert theory.check(_doctored(fitted, loss=(5, short)), decrease=0.05).lemma2[4]


def test_checker_reports_theorem3_and_growth_failures():
    loss = np.array([1.0, 0.9, 0.8])
    ok = dict(eta=[0.1, 0.1, 0.1], grad_sq=[1.0, 1.0, 1.0], v_sq=[1.0, 1.0, 1.0])
    report = theory.check_arrays(loss, np.array([0.9, 0.8, 0.7]), **ok)
    assert report.all_hold and report.theorem3_bound == pytest.approx(5 * 1.0 / 0.3)
    # min grad_sq above 5 (J_0 - L*) / sum eta
    huge = theory.check_arrays(loss, [0.9, 0.8, 0.7], eta=[0.1] * 3, grad_sq=[1.0, 1.0, 1.0],
                               v_sq=[1.0] * 3, l_star=0.99)
    assert not huge.theorem3 and not huge.all_hold
    # ||V_t||^2 beyond ||V_0||^2 + t / (5 sqrt(2) L) + 10 (J_0 - L*)
    grown = theory.check_arrays(loss, [0.9, 0.8, 0.7], eta=[0.1] * 3, grad_sq=[1.0] * 3,
                                v_sq=[1.0, 1.0, 1.0 + 2 / (5 * math.sqrt(2)) + 10.0 + 1e-3])
    assert grown.theorem3 and not grown.v_growth and not grown.all_hold


def test_checker_empty_history():
    problem, B, A = make_case((3, 4, 1), np.float64, seed=51)
    result = lorakern.fit(problem, B, A, steps=0, device="reference", step_size="theorem")
    assert theory.check(result).all_hold


def test_checker_slack_is_by_dtype(fitted):
    """Missing Lemma 2 by 1e-9 |J| passes as fp32 rounding but not as fp64."""
    h = fitted.history
    bad = _doctored(fitted, loss=(6, h.loss[5] - 0.2 * h.eta[5] * h.grad_sq[5] + 1e-9 * h.loss[0]))
    assert not theory.check(bad).all_hold
    bad.history.dtype = np.dtype(np.float32)
    assert theory.check(bad).lemma2[5]


# -- the certified step (issue 24): eta >= eta_t and the ||V_t|| growth bound -----------------

@settings(max_examples=EXAMPLES, deadline=None)
@given(case=cases, search=st.sampled_from(["auto", "backtrack"]))
def test_certified_histories_satisfy_the_paper(case, search):
    """Certified on random problems, every loss: Lemma 2's decrease with the eta taken,
    eta >= eta_t, Theorem 3's bound and the ||V_t|| growth bound; all_hold."""
    result = _fit(case, "reference", Certified(search=search))
    report = theory.check(result)
    assert report.eta_floor is not None and not report.growth_guaranteed
    assert report.all_hold, report.summary()


@pytest.fixture(scope="module")
def certified():
    problem, B, A = make_case((9, 11, 3), np.float64, seed=52)
    result = lorakern.fit(problem, B, A, steps=20, device="reference", step_size="certified")
    report = theory.check(result)
    assert report.all_hold and (result.history.eta > 2 * report.eta_theorem).any()
    return result


def test_checker_reports_an_eta_below_eta_t(certified):
    """A step shorter than eta_t (doctored): eta_floor fails at that step, all_hold too."""
    eta_t = theory.check(certified).eta_theorem
    bad = _doctored(certified, eta=(7, 0.5 * eta_t[7]))
    report = theory.check(bad)
    assert list(np.flatnonzero(~report.eta_floor)) == [7] and not report.all_hold
    assert "eta < eta_t at 1 step(s), FAILED" in report.summary()
    lines, ok = theory.verdict(bad)
    assert not ok and any("FAILED at 1/20 steps, first t = 7" in line for line in lines)


def test_checker_reports_a_norm_growth_failure(certified):
    """||V_t|| beyond ||V_0|| + sqrt(sum_{s<t} eta_s (J_0 - L*) / c): norm_growth fails."""
    h = certified.history
    S = np.sum(h.eta[:10])
    too_far = (math.sqrt(h.v_sq[0]) + math.sqrt(S * h.loss[0] / 0.2)) ** 2 * 1.01
    report = theory.check(_doctored(certified, v_sq=(10, too_far)))
    assert not report.norm_growth and not report.all_hold
    assert "||V_t|| growth bound FAILED" in report.summary()


def test_paper_growth_bound_is_not_required_of_a_longer_step(certified):
    """The paper's ||V_t||^2 bound assumes eta <= eta_t: for Certified a miss is reported
    but is not a failure; for the theorem's step it is."""
    h = certified.history
    # at t = 10 this run's ||V|| bound allows 932.8, the paper's ||V||^2 bound 922.6
    v = h.v_sq[0] + 10 / (5 * math.sqrt(2)) + 10 * h.loss[0]
    report = theory.check(_doctored(certified, v_sq=(10, v * 1.001)))
    assert report.norm_growth and not report.v_growth and report.all_hold, report.summary()
    assert "did not hold (not guaranteed)" in report.summary()
    report = theory.check_arrays([1.0, 0.9], [0.9, 0.8], eta=[0.1, 0.1], grad_sq=[1.0, 1.0],
                                 v_sq=[1.0, 1.0 + 1 / (5 * math.sqrt(2)) + 10.0 + 1e-3])
    assert not report.v_growth and not report.all_hold
