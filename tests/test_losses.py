"""Losses and masks (issue 4): each loss's formula, every loss x mask x dtype x backend
against the reference, logistic far from the origin, and what a mask must (not) change."""
from __future__ import annotations

import math

import numpy as np
import pytest

import lorakern
from lorakern import LOSSES, reference

from helpers import (device_pass, DEVICES, DTYPES, LOSS_NAMES, assert_bitwise, assert_close, compare_pass,
                      compare_step, host, make_case, random_data)

SHAPE = (37, 101, 5)  # one odd shape shared by the tests below: 37 rows, 101 = 6 tiles of 16 + 5


# -- the formulas ------------------------------------------------------------------------
def _by_hand(name, t, y, delta):
    """value and gradient of each loss as issue 4 writes them, in float64."""
    if name == "squared":
        return 0.5 * t * t, t
    if name == "huber":
        a = np.abs(t)
        return np.where(a <= delta, 0.5 * t * t, delta * (a - delta / 2)), np.clip(t, -delta, delta)
    # logistic: log(1 + exp(-y z)) and -y / (1 + exp(y z)), by a route that cannot overflow
    return np.logaddexp(0.0, -y * t), -y * np.exp(-np.logaddexp(0.0, y * t))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_pointwise_formulas(name):
    """numpy_pointwise and the scalar source the CPU kernels inline, against the formulas,
    over small and huge arguments (logistic: |z| up to 1e4 must not overflow)."""
    rng = np.random.default_rng(1)
    t = np.concatenate([rng.standard_normal(200), 300 * rng.standard_normal(50),
                        [0.0, 0.5, -0.5, 0.7, -0.7, 1e4, -1e4, 745.0, -745.0]])
    y = np.where(rng.random(t.size) < 0.5, -1.0, 1.0) if LOSSES[name].labels else None
    delta = 0.7
    want_v, want_g = _by_hand(name, t, y, delta)
    with np.errstate(over="raise", invalid="raise"):
        v, g = LOSSES[name].numpy_pointwise(t, y, delta)
    assert_close(v, want_v, np.float64, "value", factor="formula")
    assert_close(g, want_g, np.float64, "grad", factor="formula")
    namespace = {"math": math}
    exec(LOSSES[name].scalar_source("f"), namespace)
    scalar = np.array([namespace["f"](float(ti), 0.0 if y is None else float(yi), delta)
                       for ti, yi in zip(t, t if y is None else y)])
    assert_close(scalar[:, 0], want_v, np.float64, "scalar value", factor="formula")
    assert_close(scalar[:, 1], want_g, np.float64, "scalar grad", factor="formula")


def test_lipschitz_defaults():
    W0, Y, _ = random_data((3, 4), np.float64, loss="logistic")
    assert [LOSSES[n].lipschitz for n in LOSS_NAMES] == [1.0, 1.0, 0.25]
    p = lorakern.Problem(W0, Y, loss="logistic")
    assert p.lipschitz == 0.25 and p.eta_lipschitz == 1.0  # eta always uses max(L, 1)
    assert lorakern.Problem(W0, Y, loss="logistic", lipschitz=3.0).eta_lipschitz == 3.0


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_reference_gradient_is_the_derivative(name):
    """The reference's grad_B, grad_A against central differences of its own loss."""
    problem, B, A = make_case((5, 6, 2), np.float64, loss=name, seed=2, masked=True, delta=0.5)
    p = reference.fused_pass(problem, None, B, A)
    h = 1e-6
    for X, grad in ((B, p.grad_B), (A, p.grad_A)):
        fd = np.empty_like(X)
        for i in np.ndindex(X.shape):
            Xp, Xm = X.copy(), X.copy()
            Xp[i] += h
            Xm[i] -= h
            args_p = (Xp, A) if X is B else (B, Xp)
            args_m = (Xm, A) if X is B else (B, Xm)
            fd[i] = (reference.loss_pass(problem, None, *args_p)
                     - reference.loss_pass(problem, None, *args_m)) / (2 * h)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


# -- every loss x mask x dtype x backend -------------------------------------------------
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("device", DEVICES)
def test_loss_matches_reference(device, dtype, loss, masked, small_tiles):
    problem, B, A = make_case(SHAPE, dtype, loss=loss, masked=masked, seed=20, delta=0.5, device=device)
    compare_pass(problem, B, A, device)
    compare_step(problem, B, A, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("device", DEVICES)
def test_logistic_large_margins(device, dtype, small_tiles):
    """|Z| in the hundreds: exp(|Z|) overflows, the loss and gradients must not. In fp32 the
    entries with y Z in ~[87, 103] have subnormal loss and derivative terms: a GPU flushes them
    to zero (CuPy's -ftz=true), NumPy keeps them; each is < 1.2e-38 against sums in the
    hundreds, so no comparison below depends on them."""
    problem, B, A = make_case(SHAPE, dtype, loss="logistic", seed=21, scale=300.0, device=device)
    Z = problem.W0.astype(np.float64) + B.astype(np.float64) @ A.astype(np.float64)
    assert np.abs(Z).max() > 500 and np.median(np.abs(Z)) > 100
    with np.errstate(over="raise", invalid="raise"):
        reference.fused_pass(problem, None, B, A)  # the reference itself must not overflow
    got = device_pass(problem, device, B, A)
    assert np.isfinite([float(got.loss), float(got.g_sq), float(got.grad_sq)]).all()
    assert np.isfinite(host(got.grad_B)).all() and np.isfinite(host(got.grad_A)).all()
    compare_pass(problem, B, A, device)
    step = lorakern.step(problem, B, A, device=device, step_size="theorem")
    assert np.isfinite(host(step.B)).all() and math.isfinite(step.eta)


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("device", DEVICES)
def test_all_true_mask_equals_no_mask(device, loss, small_tiles):
    problem, B, A = make_case(SHAPE, np.float64, loss=loss, seed=22, device=device)
    W0, Y, _ = random_data(SHAPE[:2], np.float64, loss=loss, seed=22)
    masked = lorakern.Problem(W0, Y, loss=loss, mask=np.ones(SHAPE[:2], bool))
    got = device_pass(masked, device, B, A)
    want = device_pass(problem, device, B, A)
    assert_close(host(got.grad_B), host(want.grad_B), np.float64, "grad_B", factor="same_kernel")
    assert_close(host(got.grad_A), host(want.grad_A), np.float64, "grad_A", factor="same_kernel")
    for name in ("loss", "g_sq", "grad_sq", "v_sq"):
        assert_close(float(getattr(got, name)), float(getattr(want, name)), np.float64, name, "same_kernel")


@pytest.mark.parametrize("device", DEVICES)
def test_all_true_mask_fit_equals_unmasked_fit(device):
    problem, B, A = make_case(SHAPE, np.float64, seed=23, device=device)
    W0, Y, _ = random_data(SHAPE[:2], np.float64, seed=23)
    masked = lorakern.Problem(W0, Y, mask=np.ones(SHAPE[:2], bool))
    got = lorakern.fit(masked, B, A, steps=10, device=device, step_size="theorem")
    want = lorakern.fit(problem, B, A, steps=10, device=device, step_size="theorem")
    for name in ("loss", "eta", "grad_sq", "v_sq", "g_norm"):
        assert_close(getattr(got.history, name), getattr(want.history, name), np.float64, name, "same_kernel")
    assert_close(host(got.B), host(want.B), np.float64, "B", 0.01)
    assert_close(host(got.A), host(want.A), np.float64, "A", 0.01)
    assert_close(got.final_loss, want.final_loss, np.float64, "final_loss", 0.01)


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("device", ("reference",) + DEVICES)
def test_masked_out_entries_do_not_matter(device, loss, small_tiles):
    """Changing Y (and W0) where the mask is False changes no bit of the step."""
    W0, Y, mask = random_data(SHAPE[:2], np.float64, loss=loss, seed=24, masked=True)
    _, B, A = make_case(SHAPE, np.float64, seed=24, device=device)
    W0b, Yb = W0.copy(), Y.copy()
    off = ~mask
    Yb[off] = -Yb[off] if loss == "logistic" else Yb[off] + 100.0
    W0b[off] += 50.0
    one = lorakern.step(lorakern.Problem(W0, Y, loss=loss, mask=mask), B, A, device=device, step_size="theorem")
    two = lorakern.step(lorakern.Problem(W0b, Yb, loss=loss, mask=mask), B, A, device=device, step_size="theorem")
    assert_bitwise(host(one.B), host(two.B), "B")
    assert_bitwise(host(one.A), host(two.A), "A")
    assert (one.loss, one.eta, one.grad_sq, one.g_norm) == (two.loss, two.eta, two.grad_sq, two.g_norm)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_selects_entries(device, small_tiles):
    """The masked loss is the sum over observed entries only (and an empty mask gives 0)."""
    W0, Y, mask = random_data(SHAPE[:2], np.float64, seed=25, masked=True)
    _, B, A = make_case(SHAPE, np.float64, seed=25, device=device)
    Z = W0 + B @ A
    step = lorakern.step(lorakern.Problem(W0, Y, mask=mask), B, A, device=device, step_size="theorem")
    assert_close(step.loss, 0.5 * np.sum((Z - Y)[mask] ** 2), np.float64, "loss")
    with pytest.warns(lorakern.InputWarning, match="mask is False everywhere"):
        nothing = lorakern.Problem(W0, Y, mask=np.zeros_like(mask))  # empty on purpose
    empty = lorakern.step(nothing, B, A, device=device, step_size="theorem")
    assert empty.loss == 0.0 and empty.grad_sq == 0.0 and empty.g_norm == 0.0
    assert_bitwise(host(empty.B), B, "B")


def test_huber_delta_is_used():
    """delta moves the kink: a huge delta is the squared loss, a tiny one almost L1."""
    problem, B, A = make_case((7, 13, 3), np.float64, seed=26)
    W0, Y, _ = random_data((7, 13), np.float64, seed=26)
    sq = reference.step(problem, B, A)
    big = reference.step(lorakern.Problem(W0, Y, loss="huber", delta=1e6), B, A)
    small = reference.step(lorakern.Problem(W0, Y, loss="huber", delta=1e-3), B, A)
    assert_close(big.loss, sq.loss, np.float64, "loss")
    d = np.abs(W0 + B @ A - Y)
    assert_close(small.loss, 1e-3 * np.sum(d - 0.5e-3), np.float64, "loss")
