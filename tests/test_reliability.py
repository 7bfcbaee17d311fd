"""What a new user hit (issue 12): each reproducer from the issue, fixed, with the inputs left
untouched. The reproducers share one setup: W0 40 x 30 float32, Gaussian adapters of rank 4."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import lorakern

from helpers import EMULATED, assert_bitwise, host

DEVICES = ["reference", "cpu"]
#: item 1 on every device: the CUDA kernels run in their host emulation, through fit's
#: device-side loop (run_steps) and through its step-by-step loop (tests/test_dask.py has the
#: Dask device's case)
LOOPS = [(d, True) for d in DEVICES] + [
    pytest.param(EMULATED, loop, id=f"cuda-emulated-{'device' if loop else 'host'}-loop",
                 marks=pytest.mark.skipif(EMULATED is None, reason="g++ not found"))
    for loop in (True, False)]


@pytest.fixture
def setup():
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((40, 30)).astype(np.float32)
    B, A = lorakern.init_adapters(40, 30, rank=4, dtype=np.float32, seed=1, init="gaussian")
    return W0, B, A


def _copies(*arrays):
    return [a.copy() for a in arrays]


# -- 1. a blow-up on the last step is divergence ------------------------------------------------
@pytest.mark.parametrize("device, device_loop", LOOPS)
@pytest.mark.parametrize("dtype, steps, eta", [
    (np.float32, 1, 1e20), (np.float64, 1, 1e200), (np.float32, 5, 0.9)])
def test_last_step_blow_up_is_diverged(setup, monkeypatch, device, device_loop, dtype, steps, eta):
    if device == "reference" and dtype is np.float32 and eta == 1e20:
        pytest.skip("the reference computes J in float64, where J(V_1) ~ 1e83 is finite")
    monkeypatch.setattr(lorakern.descent, "DEVICE_LOOP", device_loop)
    W0, B, A = (x.astype(dtype) for x in setup)
    problem = lorakern.Problem(W0, W0 + 1)
    before = _copies(B, A)
    with pytest.warns(RuntimeWarning, match="stopped being finite"):
        result = lorakern.fit(problem, B, A, steps=steps, device=device, step_size=eta)
    assert result.status == "diverged"
    assert math.isfinite(result.final_loss)
    assert np.isfinite(host(result.B)).all() and np.isfinite(host(result.A)).all()
    assert len(result.history) == result.steps < steps
    # the returned iterate is V_steps, and its loss is the one reported
    replay = lorakern.fit(problem, B, A, steps=result.steps, device=device, step_size=eta)
    assert replay.status == "completed"
    assert_bitwise(host(result.B), host(replay.B), "B")
    assert_bitwise(host(result.A), host(replay.A), "A")
    assert result.final_loss == replay.final_loss
    assert_bitwise(B, before[0], "caller's B")
    assert_bitwise(A, before[1], "caller's A")


@pytest.mark.parametrize("device, device_loop", LOOPS)
def test_finite_run_stays_completed(setup, monkeypatch, device, device_loop):
    monkeypatch.setattr(lorakern.descent, "DEVICE_LOOP", device_loop)
    W0, B, A = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divergence warning
        result = lorakern.fit(lorakern.Problem(W0, W0 + 1), B, A, steps=3, device=device, step_size="theorem")
    assert result.status == "completed" and result.steps == 3 and math.isfinite(result.final_loss)


# -- 2. a residual that overflows -------------------------------------------------------------
def test_overflowing_residual_raises():
    W, Y = np.full((40, 30), 3e38, np.float32), np.full((40, 30), -3e38, np.float32)
    before = _copies(W, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even NumPy's overflow warning escapes
        with pytest.raises(ValueError, match="residual W0 - Y overflows float32.*float64"):
            lorakern.Problem(W, Y)
    assert_bitwise(W, before[0], "W0")
    assert_bitwise(Y, before[1], "Y")
    lorakern.Problem(W.astype(np.float64), -W.astype(np.float64))  # fine in float64


# -- 3. masked arrays -------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["W0", "Y"])
def test_masked_array_is_refused_pointing_to_mask(setup, which):
    W0 = setup[0]
    observed = np.random.default_rng(2).random(W0.shape) < 0.5
    hidden = np.ma.masked_array(W0 + 1, mask=~observed)
    args = (hidden, W0) if which == "W0" else (W0, hidden)
    before = _copies(W0, hidden.data, hidden.mask)
    with pytest.raises(TypeError, match=rf"{which} is a NumPy masked array.*mask="):
        lorakern.Problem(*args)
    for got, want, name in zip((W0, hidden.data, hidden.mask), before, ("W0", "data", "mask")):
        assert_bitwise(got, want, name)
    # what the message suggests works, and matches building the mask by hand
    fixed = lorakern.Problem(*(a.data if isinstance(a, np.ma.MaskedArray) else a for a in args),
                             mask=~np.ma.getmaskarray(hidden))
    assert fixed.mask.view(bool).sum() == observed.sum()


@pytest.mark.parametrize("where", ["mask", "B", "linear X", "linear classes"])
def test_other_masked_arrays_are_refused(setup, where):
    """A masked array anywhere else is refused too, without pointing to a mask= that the call
    does not have (B, A, LinearProblem) or that it is (mask=)."""
    W0, B, A = setup
    problem = lorakern.Problem(W0, W0 + 1)
    rng = np.random.default_rng(3)
    X, classes = rng.standard_normal((20, 30)).astype(np.float32), rng.integers(0, 40, 20)
    hide = {"mask": rng.random(W0.shape) < 0.5, "B": np.zeros(B.shape, bool),
            "linear X": np.zeros(X.shape, bool), "linear classes": classes == 0}[where]
    value = {"mask": hide, "B": B, "linear X": X, "linear classes": classes}[where]
    hidden = np.ma.masked_array(value, mask=hide)
    call = {"mask": lambda: lorakern.Problem(W0, W0 + 1, mask=hidden),
            "B": lambda: lorakern.step(problem, hidden, A, device="reference", step_size="theorem"),
            "linear X": lambda: lorakern.LinearProblem(hidden, classes, W0, loss="cross_entropy"),
            "linear classes": lambda: lorakern.LinearProblem(X, hidden, W0, loss="cross_entropy")}
    name = {"mask": "mask", "B": "B", "linear X": "X", "linear classes": "Y"}[where]
    before = _copies(W0, B, A, hidden.data, hidden.mask)
    with pytest.raises(TypeError, match=rf"^{name} is a NumPy masked array.*plain array") as info:
        call[where]()
    assert "mask=" not in str(info.value)
    for got, want in zip((W0, B, A, hidden.data, hidden.mask), before):
        assert_bitwise(got, want, "input")


# -- 4. errors that name their argument -------------------------------------------------------
def _fit(setup, **kwargs):
    W0, B, A = setup
    return lorakern.fit(lorakern.Problem(W0, W0 + 1), B, A, steps=2, device="reference", **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"check_every": 0}, ValueError, r"check_every must be a positive integer"),
    ({"check_every": -1}, ValueError, r"check_every must be a positive integer"),
    ({"check_every": 2.5}, ValueError, r"check_every must be a positive integer, got 2.5"),
    ({"check_every": "2"}, TypeError, r"check_every must be a positive integer"),
    ({"tol": "1e-3"}, TypeError, r"tol must be None or a number >= 0, got '1e-3'"),
    ({"tol": -1.0}, ValueError, r"tol must be None or a number >= 0"),
])
def test_fit_arguments_are_named(setup, kwargs, error, match):
    B, A = _copies(*setup[1:])
    with pytest.raises(error, match=match):
        _fit(setup, **kwargs)
    assert_bitwise(setup[1], B, "B")
    assert_bitwise(setup[2], A, "A")


@pytest.mark.parametrize("make, error, match", [
    (lambda: lorakern.Armijo(cap="1"), TypeError, r"Armijo cap must be a real number"),
    (lambda: lorakern.Theorem(constant="x"), TypeError, r"Theorem constant must be a real number"),
    (lambda: lorakern.Armijo(max_trials=None), TypeError, r"Armijo max_trials must be a positive integer"),
    (lambda: lorakern.Armijo(max_trials=2.7), ValueError, r"Armijo max_trials must be a positive integer, got 2.7"),
    (lambda: lorakern.Armijo(c="0.1"), TypeError, r"Armijo c must be a real number"),
    (lambda: lorakern.Theorem(norm="fast"), ValueError, r"Theorem norm must be 'exact' or 'bound'"),
    (lambda: lorakern.init_adapters(4, 3, 2, seed=-1), ValueError, r"seed must be None or a non-negative integer, got -1"),
    (lambda: lorakern.init_adapters(4, 3, 2, seed=1.5), TypeError, r"seed must be None or a non-negative integer"),
    (lambda: lorakern.init_adapters(4, 3, 2, scale=0), ValueError, r"scale must be positive"),
    (lambda: lorakern.init_adapters(4, 3, 2, dtype="int8"), TypeError, r"dtype must be float32 or float64"),
])
def test_policy_and_init_arguments_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_delta_for_a_loss_without_one(setup, loss):
    W0 = setup[0]
    Y = np.sign(W0 + 0.5).astype(np.float32) if loss == "logistic" else W0 + 1
    Y[Y == 0] = 1
    before = _copies(W0, Y)
    with pytest.raises(ValueError, match=rf"delta=0.5 was given, but loss '{loss}' has no delta "
                                         rf"\(only huber uses it\)"):
        lorakern.Problem(W0, Y, loss=loss, delta=0.5)
    assert_bitwise(W0, before[0], "W0")
    assert_bitwise(Y, before[1], "Y")
    assert lorakern.Problem(W0, W0 + 1, loss="huber", delta=0.5).delta == 0.5
