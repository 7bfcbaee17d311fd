"""The matrix kind's reference: G = grad L(W0 + BA) entrywise, formed whole, in float64."""
from __future__ import annotations

import numpy as np

from ._common import check_numpy, pass_from_gradient, quiet


def gradient(problem, B, A):
    """(G, loss): G = grad L(W0 + BA) (m x n) and L(W0 + BA), both in float64."""
    B, A = B.astype(np.float64), A.astype(np.float64)
    if problem.loss.labels:
        t, y = problem.W0.astype(np.float64) + B @ A, problem.Y.astype(np.float64)
    else:
        t, y = problem.R.astype(np.float64) + B @ A, None  # d = W0 + BA - Y
    value, G = problem.loss.numpy_pointwise(t, y, problem.delta)
    if problem.mask is not None:
        observed = problem.mask.view(bool)
        value, G = np.where(observed, value, 0.0), np.where(observed, G, 0.0)
    return G, float(np.sum(value))


def prepare(problem, device):
    check_numpy(problem)
    return None


@quiet
def fused_pass(problem, data, B, A, *, norm="exact"):
    return pass_from_gradient(*gradient(problem, B, A), B, A)


@quiet
def loss_pass(problem, data, B, A):
    return gradient(problem, B, A)[1]


def line_quartic(problem, data, B, A, grad_B, grad_A):
    """(a2, a3, a4) in float64 with J(B - eta grad_B, A - eta grad_A) = sum_k a_k eta^k, for
    the squared loss (the exact line search of step_size.Certified); a0 = J(B, A) and
    a1 = -||grad J||^2 come from the fused pass.

    The residual moves quadratically in eta: R + (B - eta gB)(A - eta gA) = D - eta P + eta^2 Q
    with D = R + BA, P = gB A + B gA, Q = gB gA, so J(eta) = 1/2 sum_M (D - eta P + eta^2 Q)^2:
    a0 = 1/2 sum D^2, a1 = -sum D P (= -||grad J||^2), a2 = sum (P^2 / 2 + D Q),
    a3 = -sum P Q, a4 = 1/2 sum Q^2, each sum over the observed entries (all without a mask).
    (a1 = -<G, P> = -<G A^T, gB> - <B^T G, gA> = -||grad J||^2 with G the masked D.)
    """
    check_quartic(problem)
    B, A = B.astype(np.float64), A.astype(np.float64)
    gB, gA = grad_B.astype(np.float64), grad_A.astype(np.float64)
    D = problem.R.astype(np.float64) + B @ A
    P = gB @ A + B @ gA
    Q = gB @ gA
    if problem.mask is not None:
        observed = problem.mask.view(bool)
        D, P, Q = (np.where(observed, X, 0.0) for X in (D, P, Q))
    return np.array([np.sum(0.5 * P * P + D * Q), -np.sum(P * Q), 0.5 * np.sum(Q * Q)])


def check_quartic(problem):
    """J(V - eta grad J) is a quartic in eta for the squared loss only: else a ValueError."""
    if problem.loss.name != "squared":
        raise ValueError(f"the exact line search needs the squared loss (J(V - eta grad J) is "
                         f"then a quartic in eta); this problem has loss {problem.loss.name!r}: "
                         f"use step_size='certified' or Certified(search='backtrack')")
