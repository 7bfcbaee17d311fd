"""Step-size policies (issue 4): constant, the theorem's eta with its constant, Armijo; the
certified line search and its quartic pass (issue 24)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import lorakern
from lorakern import Armijo, Certified, Constant, Theorem, reference, theory
from lorakern import _dispatch
from lorakern.step_size import exact_step

from helpers import (DEVICES, DTYPES, assert_bitwise, assert_close, device_pass, host, make_case,
                     tolerance)

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
    default = lorakern.step(problem, B, A, device=device, step_size="theorem")
    assert_close(got.eta * constant, default.eta * 5 * math.sqrt(2), np.float64, "eta * constant")
    assert lorakern.step(problem, B, A, device=device, step_size=Theorem()).eta == default.eta


def test_theorem_eta_capped_at_one():
    """Tiny V and G: 1 / (5 sqrt(2) L (...)) > 1, so eta = 1."""
    problem, B, A = make_case((7, 13, 3), np.float64, seed=42, scale=1e-3, adapter_scale=1e-3)
    assert reference.step(problem, B, A).eta == 1.0
    for device in DEVICES:
        assert lorakern.step(problem, B, A, device=device, step_size="theorem").eta == 1.0


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
    theorem = lorakern.step(problem, B, A, device=device, step_size="theorem")
    got = lorakern.step(problem, B, A, device=device, step_size=Armijo(cap=theorem.eta / 2))
    assert got.trials == 0 and got.eta == theorem.eta


@pytest.mark.parametrize("device", ALL)
def test_armijo_takes_larger_steps_than_theorem(device):
    problem, B, A = make_case(SHAPE, np.float64, seed=44, device=device)
    armijo = lorakern.fit(problem, B, A, steps=10, device=device, step_size="armijo")
    theorem = lorakern.fit(problem, B, A, steps=10, device=device, step_size="theorem")
    assert armijo.history.eta.min() > theorem.history.eta.max()
    assert armijo.final_loss < theorem.final_loss


@pytest.mark.parametrize("device", ALL)
def test_armijo_falls_back_to_theorem(device):
    """Out of trials (one trial of a far too long step): the theorem's eta is taken."""
    problem, B, A = make_case(SHAPE, np.float64, seed=45, device=device)
    got = lorakern.step(problem, B, A, device=device, step_size=Armijo(cap=1e6, max_trials=1))
    want = lorakern.step(problem, B, A, device=device, step_size="theorem")
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
    (lambda: Certified(search="fast"), "search must be one of"),
    (lambda: Certified(cap=0.0), "cap"),
    (lambda: Certified(cap=math.inf), "cap"),
    (lambda: Certified(max_trials=0), "max_trials"),
])
def test_bad_policy_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- the certified line search (issue 24) --------------------------------------------------
#: the devices with the quartic pass (the exact search); the others backtrack
QUARTIC_DEVICES = ("reference", "cpu")


def test_certified_by_name():
    assert lorakern.step_size.as_policy("certified") == Certified()
    assert lorakern.step_size.as_policy("exact") == Certified(search="exact")
    policy = Certified()
    assert policy.decrease == 0.2 and policy.eta_floor == Theorem().constant and policy.host_loop


def _certified_run(device, dtype, search, masked, loss="squared", steps=15, seed=60):
    problem, B, A = make_case(SHAPE, dtype, seed=seed, masked=masked, loss=loss, device=device)
    B0, A0 = B.copy(), A.copy()
    result = lorakern.fit(problem, B, A, steps=steps, device=device,
                          step_size=Certified(search=search))
    assert_bitwise(B, B0, "B untouched")
    assert_bitwise(A, A0, "A untouched")
    assert result.status == "completed" and len(result.history) == steps
    return problem, B, A, result


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("device, search", [(d, s) for d in ALL for s in ("exact", "backtrack")
                                             if s == "backtrack" or d in QUARTIC_DEVICES])
def test_certified_every_step(device, search, dtype, masked):
    """At every step: eta >= eta_t of eq. (8), and J(V_t+1) <= J(V_t) - eta/5 ||grad J||^2
    (theory.check, and recomputed with the reference at the first steps); the search takes
    longer steps than eta_t (else the test could not tell it from the theorem's step)."""
    problem, B, A, result = _certified_run(device, dtype, search, masked)
    h = result.history
    report = theory.check(result)
    assert report.eta_floor is not None and report.eta_floor.all(), report.summary()
    assert report.lemma2.all() and report.theorem3 and report.norm_growth, report.summary()
    assert report.all_hold, report.summary()
    eta_theorem = theorem_eta(h)
    assert (h.eta >= eta_theorem * (1 - 1e-12)).all() and (h.eta <= 1.0).all()
    assert (h.eta > 2 * eta_theorem).sum() >= len(h) // 2, h.eta / eta_theorem
    if search == "exact":
        assert (h.trials == 1).all()  # one quartic pass per step
    B_t, A_t = B, A
    for t in range(4):
        p = reference.fused_pass(problem, None, B_t, A_t)
        B_t, A_t = reference.update(B_t, A_t, p.grad_B, p.grad_A, h.eta[t])
        bound = p.loss - 0.2 * h.eta[t] * p.grad_sq
        slack = theory.RTOL[np.dtype(dtype)] * p.loss
        assert reference.loss_pass(problem, None, B_t, A_t) <= bound + slack, f"step {t}"


def test_certified_auto_takes_the_exact_search_where_it_can():
    problem, B, A = make_case(SHAPE, np.float64, seed=61)
    exact = lorakern.fit(problem, B, A, steps=8, device="reference", step_size="exact")
    auto = lorakern.fit(problem, B, A, steps=8, device="reference", step_size="certified")
    assert_bitwise(auto.history.eta, exact.history.eta, "eta")
    # huber (no quartic) and a mask (a costly quartic pass): auto backtracks
    for kwargs in (dict(loss="huber"), dict(masked=True)):
        other, B, A = make_case(SHAPE, np.float64, seed=61, **kwargs)
        back = lorakern.fit(other, B, A, steps=8, device="reference",
                            step_size=Certified(search="backtrack"))
        auto = lorakern.fit(other, B, A, steps=8, device="reference", step_size="certified")
        assert_bitwise(auto.history.eta, back.history.eta, "eta")
        assert theory.check(auto).all_hold
        assert "backtracking" in Certified().describe(other)
    assert "exact line search" in Certified().describe(problem)
    assert (auto.history.trials != 1).any()  # backtracking, not one quartic pass a step


@pytest.mark.parametrize("device", QUARTIC_DEVICES)
def test_exact_search_is_the_best_certified_eta(device):
    """The exact search's eta is at least as good as every eta on a fine grid of [eta_t, cap]
    that meets the decrease (checked with the reference's loss, in float64)."""
    problem, B, A = make_case(SHAPE, np.float64, seed=62)
    for _ in range(3):  # three iterates along the run
        got = lorakern.step(problem, B, A, device=device, step_size="exact")
        p = reference.fused_pass(problem, None, B, A)
        eta_t = 1.0 / max(5 * math.sqrt(2) * (p.v_sq + math.sqrt(p.g_sq)), 1.0)
        assert got.eta >= eta_t

        def J(eta):
            return reference.loss_pass(problem, None, *reference.update(B, A, p.grad_B, p.grad_A, eta))

        J_got = J(got.eta)
        assert J_got <= p.loss - 0.2 * got.eta * p.grad_sq + 1e-12 * p.loss
        for eta in np.linspace(eta_t, 1.0, 400):
            if J(eta) <= p.loss - 0.2 * eta * p.grad_sq:
                assert J_got <= J(eta) + 1e-10 * p.loss, eta
        B, A = got.B, got.A


QUARTIC_SHAPES = [(37, 101, 5), (1, 7, 1), (130, 67, 3), (9, 1, 2)]


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", QUARTIC_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quartic_coefficients(shape, dtype, masked, monkeypatch):
    """The CPU's quartic pass against the reference's, and the quartic's value against a
    direct evaluation of J (reference, float64) at several eta, on random iterates with
    non-zero B (so every term of D, P and Q is present); small row blocks so that the CPU's
    sums cross several blocks."""
    from lorakern._cpu import quartic

    monkeypatch.setattr(quartic, "QUARTIC_ROWS", 8)
    problem, B, A = make_case(shape, dtype, seed=63 + shape[0], masked=masked, init="gaussian")
    B = B + np.asarray(np.random.default_rng(64).standard_normal(B.shape), dtype)
    p = reference.fused_pass(problem, None, B, A)
    want = reference.matrix.line_quartic(problem, None, B, A, p.grad_B, p.grad_A)
    engine = _dispatch.bind(problem, "cpu")
    args = (B.copy(), A.copy(), p.grad_B.copy(), p.grad_A.copy())
    got = engine.line_quartic(*args)
    for x, y in zip(args, (B, A, p.grad_B, p.grad_A)):
        assert_bitwise(x, y, "inputs untouched")
    for k in range(3):
        assert_close(got[k], want[k], dtype, f"a{k + 2}")
    W0 = problem.R.astype(np.float64)  # J depends on W0 - Y only: W0 = R, Y = 0
    exact = lorakern.Problem(W0, np.zeros_like(W0), mask=None if problem.mask is None
                             else problem.mask.view(bool))
    gB, gA = p.grad_B.astype(np.float64), p.grad_A.astype(np.float64)
    # a1 = -||grad J||^2 is the pass's float64 norm of the gradient before it is rounded to
    # the dtype; the direction moved along is the rounded one: in fp32 that differs by about
    # eps32 eta ||grad J||^2 (measured 1e-9 of J); in fp64 the sums agree to 1e-12
    rtol = {np.dtype(np.float32): 1e-7, np.dtype(np.float64): 1e-12}[np.dtype(dtype)]
    for eta in (1e-3, 0.03, 0.2, 1.0):
        direct = reference.loss_pass(exact, None, B - eta * gB, A - eta * gA)
        scale = max(abs(direct), p.loss, eta * p.grad_sq)
        quartic_value = np.polyval([*want[::-1], -p.grad_sq, p.loss], eta)
        assert abs(quartic_value - direct) <= rtol * scale, (eta, quartic_value, direct)
        cpu_value = np.polyval([*got[::-1], -p.grad_sq, p.loss], eta)
        assert abs(cpu_value - direct) <= rtol * scale, (eta, cpu_value, direct)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_quartic_same_bits_for_any_worker_count(masked, monkeypatch):
    """The CPU's quartic pass adds its row blocks' float64 partials in block order: the same
    bits on 1, 2, 3, 4 and 7 worker threads, with small row blocks so that the work is
    split into many (130 rows: 17 blocks of 8, the last short) and odd row counts per block
    cross the kernel's 4-row loop and its tail."""
    from lorakern._cpu import quartic, workers

    monkeypatch.setattr(quartic, "QUARTIC_ROWS", 8)
    for dtype in DTYPES:
        problem, B, A = make_case((130, 67, 3), dtype, seed=70, masked=masked, init="gaussian")
        p = reference.fused_pass(problem, None, B, A)
        engine = _dispatch.bind(problem, "cpu")
        bits = {}
        for count in (1, 2, 3, 4, 7):
            monkeypatch.setattr(workers, "count", lambda count=count: count)
            got = engine.line_quartic(B, A, p.grad_B, p.grad_A)
            bits[count] = np.array([float(a) for a in got]).tobytes()
        assert len(set(bits.values())) == 1, (dtype, {k: np.frombuffer(v) for k, v in bits.items()})


def test_exact_search_needs_the_squared_loss():
    """Huber or logistic: a ValueError naming the loss and the way out, before any step."""
    for loss in ("huber", "logistic"):
        problem, B, A = make_case((7, 13, 3), np.float64, seed=65, loss=loss)
        B0 = B.copy()
        with pytest.raises(ValueError, match=f"squared loss.*{loss}.*certified"):
            lorakern.fit(problem, B, A, steps=3, device="reference", step_size="exact")
        with pytest.raises(ValueError, match="squared loss"):
            lorakern.step(problem, B, A, device="reference", step_size="exact")
        assert_bitwise(B, B0, "B untouched")


@pytest.mark.skipif(not any(getattr(d, "name", d) == "cuda-emulated" for d in ALL),
                    reason="no emulated CUDA device")
def test_exact_search_where_there_is_no_quartic_pass():
    device = next(d for d in ALL if getattr(d, "name", d) == "cuda-emulated")
    problem, B, A = make_case((7, 13, 3), np.float64, seed=66)
    with pytest.raises(ValueError, match="no quartic pass"):
        lorakern.step(problem, B, A, device=device, step_size="exact")


def test_exact_step_polynomial_cases():
    """exact_step on hand-made quartics: the unconstrained minimum, a minimum cut off by the
    decrease condition, the cap, and nothing feasible but lo."""
    # q = 1 - eta + eta^2 / 2: minimum at 1, decrease there 1/2 >= eta/5
    assert exact_step(1.0, 1.0, 0.5, 0.0, 0.0, 0.01, 4.0) == pytest.approx(1.0)
    # the cap below the minimum: the cap
    assert exact_step(1.0, 1.0, 0.5, 0.0, 0.0, 0.01, 0.5) == pytest.approx(0.5)
    # q = 1 - eta + 10 eta^4: minimum at (1/40)^(1/3) = 0.292 meets the decrease there
    eta = exact_step(1.0, 1.0, 0.0, 0.0, 10.0, 1e-3, 1.0)
    assert eta == pytest.approx(40 ** (-1 / 3))
    # a quartic whose least value sits where the decrease fails: the best feasible eta is at
    # the edge of the feasible set, q(eta) = 1 - eta/5 there
    q = [1.0, 1.0, -0.5, -1.0, 0.9]  # 1 - eta - 0.5 eta^2 - eta^3 + 0.9 eta^4 ... below
    eta = exact_step(*q, 1e-3, 3.0)
    value = np.polyval([0.9, -1.0, -0.5, -1.0, 1.0], eta)
    assert value <= 1.0 - 0.2 * eta + 1e-12
    grid = np.linspace(1e-3, 3.0, 30001)
    vals = np.polyval([0.9, -1.0, -0.5, -1.0, 1.0], grid)
    ok = vals <= 1.0 - 0.2 * grid
    assert value <= vals[ok].min() + 1e-9
    # nothing feasible above lo (q rises at once): lo
    assert exact_step(1.0, 1e-9, 100.0, 0.0, 0.0, 0.01, 1.0) == 0.01


@pytest.mark.parametrize("search", ["exact", "backtrack"])
def test_certified_fit_resumed_from_its_state(search):
    """Two fits of 6 steps, the second from the first's iterate and state, end at the bits of
    one fit of 12 (the backtracking's first trial comes from the state)."""
    problem, B, A = make_case(SHAPE, np.float64, seed=67)
    policy = Certified(search=search)
    whole = lorakern.fit(problem, B, A, steps=12, device="cpu", step_size=policy)
    half = lorakern.fit(problem, B, A, steps=6, device="cpu", step_size=policy)
    rest = lorakern.fit(problem, half.B, half.A, steps=6, device="cpu", step_size=policy,
                        state=half.state)
    assert_bitwise(np.append(half.history.eta, rest.history.eta), whole.history.eta, "eta")
    assert_bitwise(rest.B, whole.B, "B")
