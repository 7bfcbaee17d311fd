"""The reference is the definition of truth: check it against the paper by hand (issue 2),
and check that no backend touches the caller's arrays."""
from __future__ import annotations

import math

import numpy as np
import pytest

import lorakern
from lorakern import reference

from helpers import (DEVICES, DTYPES, LOSS_NAMES, assert_bitwise, assert_close, host,
                      make_case, random_data)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 2), (6, 4, 3), (9, 11, 4)],
                         ids=lambda s: "x".join(map(str, s)))
def test_v_form_gradient(shape, loss, masked):
    """The paper's 2 Sym(E1^T G E2^T) V (eq. 7) equals [grad_B; grad_A^T]."""
    problem, B, A = make_case(shape, np.float64, loss=loss, masked=masked, seed=sum(shape))
    p = reference.fused_pass(problem, None, B, A)
    v = reference.v_form_gradient(problem, B, A)
    m = shape[0]
    assert v.shape == (shape[0] + shape[1], shape[2])
    assert_close(v[:m], p.grad_B, np.float64, "grad_B block")
    assert_close(v[m:], p.grad_A.T, np.float64, "grad_A^T block")


@pytest.mark.parametrize("lipschitz", [None, 0.3, 1.0, 7.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_reference_step_by_hand(dtype, lipschitz):
    """J, the gradients, eta (eq. 8) and the update (eq. 3), written out for the squared loss."""
    m, n, r = 9, 11, 4
    problem, B, A = make_case((m, n, r), dtype, seed=31, lipschitz=lipschitz)
    W0, Y, _ = random_data((m, n), dtype, seed=31)
    B64, A64 = B.astype(np.float64), A.astype(np.float64)
    # dL/dZ of 1/2 ||W0 + BA - Y||^2; the problem keeps R = W0 - Y in the data's dtype
    G = (W0 - Y).astype(np.float64) + B64 @ A64
    grad_B, grad_A = G @ A64.T, B64.T @ G
    L = max(1.0 if lipschitz is None else lipschitz, 1.0)
    v_sq = np.sum(A64 ** 2) + np.sum(B64 ** 2)
    g_norm = np.linalg.norm(G)
    eta = min(1.0 / (5 * math.sqrt(2) * L * (v_sq + g_norm)), 1.0)

    got = reference.step(problem, B, A)
    assert_close(got.loss, 0.5 * np.sum(G ** 2), np.float64, "loss")
    assert_close(got.g_norm, g_norm, np.float64, "g_norm")
    assert_close(got.v_sq, v_sq, np.float64, "v_sq")
    assert_close(got.grad_sq, np.sum(grad_B ** 2) + np.sum(grad_A ** 2), dtype, "grad_sq")
    assert_close(got.eta, eta, np.float64, "eta")
    assert got.trials == 0
    assert got.B.dtype == dtype and got.A.dtype == dtype
    assert_close(got.B, B64 - eta * grad_B, dtype, "B_{t+1}")
    assert_close(got.A, A64 - eta * grad_A, dtype, "A_{t+1}")


@pytest.mark.parametrize("device", ("reference",) + DEVICES)
def test_eta_is_one_at_a_stationary_zero(device):
    """V = 0 and G = 0: min{1/0, 1} is 1, with no division by zero."""
    W0, _, _ = random_data((7, 13), np.float64, seed=32)
    problem = lorakern.Problem(W0, W0.copy())
    B, A = np.zeros((7, 3)), np.zeros((3, 13))
    with np.errstate(all="raise"):
        got = lorakern.step(problem, B, A, device=device, step_size="theorem")
    assert (got.eta, got.loss, got.grad_sq, got.v_sq, got.g_norm) == (1.0, 0.0, 0.0, 0.0, 0.0)
    assert not host(got.B).any() and not host(got.A).any()
    with np.errstate(all="raise"):
        assert reference.step(problem, B, A).eta == 1.0


@pytest.mark.parametrize("step_size", ["theorem", "armijo", 0.01])
@pytest.mark.parametrize("loss", ["squared", "logistic"])
@pytest.mark.parametrize("device", ("reference",) + DEVICES)
def test_caller_arrays_untouched(device, loss, step_size):
    """step and fit leave W0, Y, mask, B and A as they were, and return arrays of their own."""
    W0, Y, mask = random_data((9, 11), np.float64, loss=loss, seed=33, masked=True)
    B, A = lorakern.init_adapters(9, 11, 3, dtype=np.float64, seed=33, init="gaussian")
    before = [x.copy() for x in (W0, Y, mask, B, A)]
    problem = lorakern.Problem(W0, Y, loss=loss, mask=mask)
    results = [lorakern.step(problem, B, A, device=device, step_size=step_size),
               reference.step(problem, B, A, step_size=step_size)]
    for steps in (0, 3):
        results.append(lorakern.fit(problem, B, A, steps=steps, device=device, step_size=step_size))
    for x, x0, name in zip((W0, Y, mask, B, A), before, ("W0", "Y", "mask", "B", "A")):
        assert_bitwise(x, x0, name)
    for res in results:
        for out in (host(res.B), host(res.A)):
            assert not any(np.shares_memory(out, x) for x in (W0, Y, mask, B, A))


@pytest.mark.parametrize("device", ("reference",) + DEVICES)
def test_problem_keeps_its_own_copy(device):
    """Changing W0 or Y after building the Problem changes nothing it computes."""
    W0, Y, mask = random_data((9, 11), np.float64, seed=34, masked=True)
    _, B, A = make_case((9, 11, 3), np.float64, seed=34)
    problem = lorakern.Problem(W0, Y, mask=mask)
    want = lorakern.step(problem, B, A, device=device, step_size="theorem")
    W0 += 1.0
    Y *= 2.0
    mask[...] = ~mask
    got = lorakern.step(problem, B, A, device=device, step_size="theorem")
    assert_bitwise(host(got.B), host(want.B), "B")
    assert got.loss == want.loss
