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
