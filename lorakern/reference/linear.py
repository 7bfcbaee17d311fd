"""The linear kind's reference: Z, Delta and G = (1/N) Delta^T X formed whole, in float64."""
from __future__ import annotations

import numpy as np

from ._common import check_numpy, pass_from_gradient, quiet


def forward(problem, B, A):
    """(Delta, J) in float64: Delta = dloss/dZ (N x m) at Z = X (W0 + BA)^T and J the mean loss."""
    X = problem.X.astype(np.float64)
    W = problem.W0.astype(np.float64) + B.astype(np.float64) @ A.astype(np.float64)
    Z = X @ W.T
    loss = problem.loss
    if loss.labels == "class":
        value, Delta = loss.rows(np, Z, problem.Y)
    elif loss.labels:
        value, Delta = loss.numpy_pointwise(Z, problem.Y.astype(np.float64), problem.delta)
    else:
        value, Delta = loss.numpy_pointwise(Z - problem.Y.astype(np.float64), None, problem.delta)
    return Delta, float(np.sum(value)) / problem.N


def gradient(problem, B, A):
    """(G, J): G = grad_W J = (1/N) Delta^T X (m x n) and J, both in float64."""
    Delta, J = forward(problem, B, A)
    return Delta.T @ problem.X.astype(np.float64) / problem.N, J


def prepare(problem, device):
    check_numpy(problem)
    return None


@quiet
def fused_pass(problem, data, B, A, *, norm="exact"):
    """results.PassResult; with ``norm="bound"`` g_sq is the certified bound's square
    (LinearProblem.norm_bound_sq) in place of ||G||_F^2."""
    Delta, J = forward(problem, B, A)
    G = Delta.T @ problem.X.astype(np.float64) / problem.N
    p = pass_from_gradient(G, J, B, A)
    if norm == "bound":
        p.g_sq = float(problem.norm_bound_sq(float(np.sum(Delta * Delta)), J))
    return p


@quiet
def loss_pass(problem, data, B, A):
    return forward(problem, B, A)[1]
