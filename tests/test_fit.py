"""fit(): the history is the values at V_t, the iterate is V_T, tol, steps=0, divergence."""
from __future__ import annotations

import numpy as np
import pytest

import lorakern
from lorakern import theory

from helpers import device_pass, DEVICES, DTYPES, assert_bitwise, assert_close, host, make_case

SHAPE = (37, 101, 5)
ALL = ("reference",) + DEVICES
FIELDS = ("loss", "eta", "grad_sq", "v_sq", "g_norm", "trials")


@pytest.mark.parametrize("step_size", ["theorem", 0.01, "armijo"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("device", ALL)
def test_history_is_the_steps(device, dtype, step_size):
    """fit's history entry t and iterate V_T are what step() gives from V_t, step by step."""
    problem, B, A = make_case(SHAPE, dtype, seed=70, device=device)
    T = 8
    result = lorakern.fit(problem, B, A, steps=T, device=device, step_size=step_size)
    h = result.history
    assert result.status == "completed" and result.steps == T
    assert all(len(getattr(h, name)) == T for name in FIELDS) and len(h) == T
    assert all(getattr(h, name).dtype == np.float64 for name in FIELDS[:-1])
    assert h.trials.dtype == np.int64
    assert h.dtype == np.dtype(dtype) and h.lipschitz == problem.eta_lipschitz
    B_t, A_t = B, A
    policy = lorakern.step_size.as_policy(step_size)
    for t in range(T):
        # armijo's first trial depends on the last accepted eta: give step() that history
        if isinstance(policy, lorakern.Armijo) and t:
            policy_t = lorakern.Armijo(cap=min(policy.cap, 2 * h.eta[t - 1]), c=policy.c)
        else:
            policy_t = policy
        s = lorakern.step(problem, B_t, A_t, device=device, step_size=policy_t)
        for name in FIELDS:
            assert getattr(h, name)[t] == getattr(s, name), f"{name}[{t}]"
        B_t, A_t = s.B, s.A
    assert_bitwise(host(result.B), host(B_t), "B_T")
    assert_bitwise(host(result.A), host(A_t), "A_T")
    assert host(result.B).dtype == dtype
    # final_loss = J(V_T), by the loss-only pass; the next step's loss is the same number
    assert_close(result.final_loss, lorakern.step(problem, B_t, A_t, device=device, step_size="theorem").loss, dtype,
                 "final_loss", factor="same_kernel")
    assert result.seconds >= 0


@pytest.mark.parametrize("device", ALL)
def test_history_loss_at_next_iterate(device):
    """history.loss[t + 1] is J at the iterate of a fit that stopped after t + 1 steps."""
    problem, B, A = make_case(SHAPE, np.float64, seed=71, device=device)
    long = lorakern.fit(problem, B, A, steps=6, device=device, step_size="theorem")
    for t in range(5):
        short = lorakern.fit(problem, B, A, steps=t + 1, device=device, step_size="theorem")
        assert_bitwise(short.history.loss, long.history.loss[:t + 1], "history.loss")
        assert long.history.loss[t + 1] == lorakern.step(problem, short.B, short.A, device=device, step_size="theorem").loss
        assert_close(short.final_loss, long.history.loss[t + 1], np.float64, "final_loss", 0.01)


@pytest.mark.parametrize("device", DEVICES)
def test_fit_matches_reference_fit(device):
    """fit on the device follows fit on the reference, step for step (fp64, tight)."""
    problem, B, A = make_case((257, 263, 17), np.float64, seed=72, device=device)
    got = lorakern.fit(problem, B, A, steps=15, device=device, step_size="theorem")
    want = lorakern.fit(problem, B, A, steps=15, device="reference", step_size="theorem")
    for name in FIELDS[:-1]:
        assert_close(getattr(got.history, name), getattr(want.history, name), np.float64, name)
    assert_close(host(got.B), want.B, np.float64, "B_T")
    assert_close(host(got.A), want.A, np.float64, "A_T")
    assert_close(got.final_loss, want.final_loss, np.float64, "final_loss")
    assert theory.check(got).all_hold


@pytest.mark.parametrize("device", ALL)
def test_tol_stops_early(device):
    """With the host looking every step (check_every=1: the default on the CPU; a GPU looks
    every 50 steps by default), fit stops at the first V_t with grad_sq <= tol."""
    problem, B, A = make_case(SHAPE, np.float64, seed=73, device=device)
    full = lorakern.fit(problem, B, A, steps=30, device=device, step_size="armijo")
    g = full.history.grad_sq
    # the last new minimum of grad_sq: the first V_t with grad_sq <= tol is V_stop
    stop = max(k for k in range(1, 30) if g[k] < g[:k].min())
    tol = float(g[stop])
    assert stop >= 3
    result = lorakern.fit(problem, B, A, steps=30, device=device, step_size="armijo", tol=tol,
                          check_every=1)
    assert result.status == "converged" and result.steps == stop == len(result.history)
    for name in FIELDS:
        assert_bitwise(getattr(result.history, name), getattr(full.history, name)[:stop], name)
    assert result.final_loss == full.history.loss[stop]  # J(V_stop), from the same pass
    s = lorakern.step(problem, result.B, result.A, device=device, step_size="theorem")
    assert s.grad_sq <= tol and s.loss == result.final_loss
    # tol already met at V_0: no step at all
    at_start = lorakern.fit(problem, B, A, steps=30, device=device, tol=np.inf, check_every=1, step_size="theorem")
    assert at_start.status == "converged" and at_start.steps == 0 and len(at_start.history) == 0
    assert_bitwise(host(at_start.B), B, "B")
    assert at_start.final_loss == full.history.loss[0]


@pytest.mark.parametrize("device", ALL)
def test_zero_steps(device):
    problem, B, A = make_case(SHAPE, np.float64, seed=74, device=device)
    result = lorakern.fit(problem, B, A, steps=0, device=device, step_size="theorem")
    assert result.status == "completed" and result.steps == 0 and len(result.history) == 0
    assert_bitwise(host(result.B), B, "B")
    assert_bitwise(host(result.A), A, "A")
    assert_close(result.final_loss, lorakern.step(problem, B, A, device=device, step_size="theorem").loss, np.float64,
                 "final_loss", 0.01)


@pytest.mark.parametrize("device", ALL)
def test_diverging_step_stops(device):
    """A constant eta far too large: the loss overflows; fit stops, warns, and returns the last
    iterate whose loss was finite, with a history that ends there."""
    problem, B, A = make_case(SHAPE, np.float64, seed=75, device=device)
    with pytest.warns(RuntimeWarning, match="finite"), np.errstate(over="ignore", invalid="ignore"):
        result = lorakern.fit(problem, B, A, steps=20, device=device, step_size=1e3)
    assert result.status == "diverged"
    assert 0 < result.steps < 19 and len(result.history) == result.steps
    Bf, Af = host(result.B), host(result.A)
    assert np.isfinite(Bf).all() and np.isfinite(Af).all()
    assert np.isfinite(result.final_loss) and np.isfinite(result.history.loss).all()
    # the iterate returned is V_steps of the same run, and final_loss is its loss
    again = lorakern.fit(problem, B, A, steps=result.steps, device=device, step_size=1e3)
    assert again.status == "completed"
    assert_bitwise(Bf, host(again.B), "B")
    assert result.final_loss == again.final_loss
    # ... and one more step from there is where the loss stops being finite
    with np.errstate(over="ignore", invalid="ignore"):
        nxt = lorakern.step(problem, Bf, Af, device=device, step_size=1e3)
        p = device_pass(problem, device, host(nxt.B), host(nxt.A))
    assert not np.isfinite(float(p.loss)) or not np.isfinite(host(nxt.B)).all()


@pytest.mark.parametrize("device_loop", [True, False], ids=["device-loop", "host-loop"])
@pytest.mark.parametrize("device", ALL)
def test_last_step_diverges(device, device_loop, monkeypatch):
    """J(V_t) finite for every t < T, J(V_T) not: fit returns V_{T-1}, its loss from the
    history, status "diverged" and a warning; a device with a loop of its own (CUDA's
    run_steps) does it through DeviceRun.B_prev, the others through the host loop."""
    monkeypatch.setattr(lorakern.descent, "DEVICE_LOOP", device_loop)
    problem, B, A = make_case(SHAPE, np.float64, seed=75, device=device)
    with pytest.warns(RuntimeWarning, match="finite"), np.errstate(over="ignore", invalid="ignore"):
        first = lorakern.fit(problem, B, A, steps=20, device=device, step_size=1e3)
    T = first.steps + 1  # J(V_T) is the first loss that is not finite
    with pytest.warns(RuntimeWarning, match=f"after step {T - 1}"), \
            np.errstate(over="ignore", invalid="ignore"):
        result = lorakern.fit(problem, B, A, steps=T, device=device, step_size=1e3)
    assert (result.status, result.steps, len(result.history)) == ("diverged", T - 1, T - 1)
    before = lorakern.fit(problem, B, A, steps=T - 1, device=device, step_size=1e3)
    assert before.status == "completed"
    assert_bitwise(host(result.B), host(before.B), "B = V_{T-1}")
    assert_bitwise(host(result.A), host(before.A), "A = V_{T-1}")
    assert np.isfinite(result.final_loss)  # J(V_{T-1}) of the history, the loss-only pass's
    assert_close(result.final_loss, before.final_loss, np.float64, "final_loss", 0.01)
    for name in FIELDS:
        assert_bitwise(getattr(result.history, name), getattr(before.history, name), name)


def test_progress_bar(capsys):
    problem, B, A = make_case(SHAPE, np.float64, seed=76)
    lorakern.fit(problem, B, A, steps=5, device="cpu" if "cpu" in DEVICES else "reference",
                 progress=True, step_size="theorem")
    err = capsys.readouterr().err
    assert "5/5 steps" in err and "loss" in err


def test_init_adapters():
    B, A = lorakern.init_adapters(6, 9, 3, dtype=np.float32, seed=1)
    assert B.shape == (6, 3) and A.shape == (3, 9) and B.dtype == A.dtype == np.float32
    assert not B.any() and A.any()  # LoRA: B = 0, so BA = 0
    B2, A2 = lorakern.init_adapters(6, 9, 3, dtype=np.float32, seed=1)
    assert_bitwise(A, A2, "A with the same seed")
    Bg, Ag = lorakern.init_adapters(600, 900, 3, dtype=np.float64, seed=2, init="gaussian")
    assert Bg.any() and np.std(Ag) == pytest.approx(1 / np.sqrt(900), rel=0.05)
    Bs, _ = lorakern.init_adapters(600, 900, 3, dtype=np.float64, seed=2, init="gaussian", scale=0.5)
    assert np.std(Bs) == pytest.approx(0.5, rel=0.05)
