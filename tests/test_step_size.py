"""Step-size policies (issue 4): constant, the theorem's eta with its constant, Armijo."""
from __future__ import annotations

import math

import numpy as np
import pytest

import lorakern
from lorakern import Armijo, Constant, Theorem, reference, theory

from helpers import device_pass, DEVICES, DTYPES, assert_bitwise, assert_close, host, make_case

SHAPE = (37, 101, 5)
ALL = ("reference",) + DEVICES


@pytest.mark.parametrize("eta", [0.01, np.float32(0.01), Constant(0.02), 1])
@pytest.mark.parametrize("device", ALL)
def test_constant_eta_is_used_exactly(device, eta):
    """eta is the number given, and the update is B - eta grad_B with that eta."""
    problem, B, A = make_case(SHAPE, np.float64, seed=40, device=device)
    got = lorakern.step(problem, B, A, device=device, step_size=eta)
    value = float(eta.eta if isinstance(eta, Constant) else eta)
    assert got.eta == value
    p = device_pass(problem, device, B, A)
    assert_bitwise(host(got.B), B - value * host(p.grad_B), "B")
    assert_bitwise(host(got.A), A - value * host(p.grad_A), "A")
    history = lorakern.fit(problem, B, A, steps=4, device=device, step_size=eta).history
    assert (history.eta == value).all() and (history.trials == 0).all()


@pytest.mark.parametrize("constant", [1.0, 5 * math.sqrt(2), 20.0])
@pytest.mark.parametrize("lipschitz", [0.3, 7.0])
@pytest.mark.parametrize("device", ALL)
def test_theorem_constant(device, constant, lipschitz):
    """eta = min{1 / (constant max(L, 1) (||V||^2 + ||G||)), 1}, for the constant given."""
    problem, B, A = make_case(SHAPE, np.float64, seed=41, lipschitz=lipschitz, device=device)
    got = lorakern.step(problem, B, A, device=device, step_size=Theorem(constant=constant))
    want = min(1.0 / (constant * max(lipschitz, 1.0) * (got.v_sq + got.g_norm)), 1.0)
    assert want < 1  # not capped here, so the constant shows
    assert_close(got.eta, want, np.float64, "eta")
    default = lorakern.step(problem, B, A, device=device)
    assert_close(got.eta * constant, default.eta * 5 * math.sqrt(2), np.float64, "eta * constant")
    assert lorakern.step(problem, B, A, device=device, step_size=Theorem()).eta == default.eta


def test_theorem_eta_capped_at_one():
    """Tiny V and G: 1 / (5 sqrt(2) L (...)) > 1, so eta = 1."""
    problem, B, A = make_case((7, 13, 3), np.float64, seed=42, scale=1e-3, adapter_scale=1e-3)
    assert reference.step(problem, B, A).eta == 1.0
    for device in DEVICES:
        assert lorakern.step(problem, B, A, device=device).eta == 1.0


def theorem_eta(history):
    """eta_t of eq. (8) from a history's own v_sq and g_norm."""
    scale = 5 * math.sqrt(2) * history.lipschitz * (history.v_sq + history.g_norm)
    return 1.0 / np.maximum(scale, 1.0)


@pytest.mark.parametrize("policy", [Armijo(), Armijo(cap=8.0, c=0.2), Armijo(cap=0.05, c=0.01)],
                         ids=["default", "cap8-c0.2", "cap0.05"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("device", ALL)
def test_armijo_condition_every_step(device, dtype, policy):
    """On every recorded step: J(V - eta grad J) <= J(V) - c eta ||grad J||^2; eta is either
    an accepted trial, (first trial) / 2^(trials - 1) with first = min(cap, 2 x last eta),
    or the theorem's eta_t once the trials would fall to it."""
    problem, B, A = make_case(SHAPE, dtype, seed=43, device=device)
    result = lorakern.fit(problem, B, A, steps=12, device=device, step_size=policy)
    h = result.history
    assert result.status == "completed" and len(h) == 12
    report = theory.check(result, decrease=policy.c)
    assert report.lemma2.all(), report.summary()
    assert report.theorem3, report.summary()
    assert (h.eta <= policy.cap).all() and (h.trials <= policy.max_trials).all()
    eta_theorem = theorem_eta(h)
    searched = h.eta > eta_theorem
    assert searched.any() and (h.trials[searched] >= 1).all()
    assert_close(h.eta[~searched], eta_theorem[~searched], np.float64, "fallback eta")
    first = policy.cap
    for t in range(len(h)):
        if searched[t]:
            assert h.eta[t] == first * 0.5 ** (h.trials[t] - 1), f"step {t}"
        first = min(policy.cap, 2.0 * h.eta[t])
    # the condition itself, recomputed at each iterate with the reference's loss
    B_t, A_t = B, A
    for t in range(4):
        p = reference.fused_pass(problem, None, B_t, A_t)
        B_t, A_t = reference.update(B_t, A_t, p.grad_B, p.grad_A, h.eta[t])
        bound = p.loss - policy.c * h.eta[t] * p.grad_sq
        assert reference.loss_pass(problem, None, B_t, A_t) <= bound + theory.RTOL[np.dtype(dtype)] * p.loss


@pytest.mark.parametrize("device", ALL)
def test_armijo_cap_below_theorem_takes_theorem(device):
    """A cap at or below eta_t: no trial is spent, the theorem's eta is taken."""
    problem, B, A = make_case(SHAPE, np.float64, seed=47, device=device)
    theorem = lorakern.step(problem, B, A, device=device)
    got = lorakern.step(problem, B, A, device=device, step_size=Armijo(cap=theorem.eta / 2))
    assert got.trials == 0 and got.eta == theorem.eta


@pytest.mark.parametrize("device", ALL)
def test_armijo_takes_larger_steps_than_theorem(device):
    problem, B, A = make_case(SHAPE, np.float64, seed=44, device=device)
    armijo = lorakern.fit(problem, B, A, steps=10, device=device, step_size="armijo")
    theorem = lorakern.fit(problem, B, A, steps=10, device=device)
    assert armijo.history.eta.min() > theorem.history.eta.max()
    assert armijo.final_loss < theorem.final_loss


@pytest.mark.parametrize("device", ALL)
def test_armijo_falls_back_to_theorem(device):
    """Out of trials (one trial of a far too long step): the theorem's eta is taken."""
    problem, B, A = make_case(SHAPE, np.float64, seed=45, device=device)
    got = lorakern.step(problem, B, A, device=device, step_size=Armijo(cap=1e6, max_trials=1))
    want = lorakern.step(problem, B, A, device=device)
    assert got.trials == 1
    assert got.eta == want.eta
    assert_bitwise(host(got.B), host(want.B), "B")


@pytest.mark.parametrize("bad, error, match", [
    ("fastest", ValueError, "unknown step_size"),
    ("0.1", ValueError, "unknown step_size"),
    (-0.1, ValueError, "step_size must be positive"),
    (0.0, ValueError, "step_size must be positive"),
    (math.nan, ValueError, "step_size must be positive"),
    (math.inf, ValueError, "step_size must be positive"),
    (None, TypeError, "step_size"),
    (True, TypeError, "step_size"),
    ([0.1], TypeError, "step_size"),
])
def test_bad_step_size(bad, error, match):
    problem, B, A = make_case((7, 13, 3), np.float64, seed=46)
    with pytest.raises(error, match=match):
        lorakern.step(problem, B, A, step_size=bad)
    with pytest.raises(error, match=match):
        lorakern.fit(problem, B, A, steps=3, step_size=bad)
    with pytest.raises(error, match=match):
        reference.step(problem, B, A, step_size=bad)


@pytest.mark.parametrize("make, match", [
    (lambda: Theorem(constant=0.0), "constant"),
    (lambda: Theorem(constant=-1.0), "constant"),
    (lambda: Theorem(constant=math.inf), "constant"),
    (lambda: Armijo(cap=0.0), "cap"),
    (lambda: Armijo(cap=math.nan), "cap"),
    (lambda: Armijo(c=0.0), "c must"),
    (lambda: Armijo(c=1.0), "c must"),
    (lambda: Armijo(c=0.3), "c must"),  # above Lemma 2's 1/5 the theorem fallback would not do
    (lambda: Armijo(max_trials=0), "max_trials"),
])
def test_bad_policy_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()
