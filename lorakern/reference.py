"""The NumPy reference: short, literal, the definition of truth.

Everything is computed in float64 from the problem's data, whatever its dtype; results are
rounded to the input dtype only where an array is handed back. It is also a backend
(``device="reference"``), so tests and benchmarks reach it like every other one.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from .step_size import THEOREM_CONSTANT, Armijo, Constant, Theorem, as_policy

NAME = "reference"
SYNC_EVERY = 1
xp = np


def check_available():
    pass


def prepare(problem):
    if problem.xp is not np:
        raise TypeError("the reference backend takes NumPy arrays; the problem holds CuPy arrays")
    return None


def asarray(x, dtype):
    return np.array(x, dtype=dtype, copy=True)


def gradient_of_loss(problem, B, A):
    """(G, loss): G = grad L(W0 + BA) entrywise, and L(W0 + BA), both in float64."""
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


def fused_pass(problem, data, B, A):
    """grad_B = G A^T, grad_A = B^T G and the norms of the step (DEVELOPERS.md, eq. 7)."""
    G, loss = gradient_of_loss(problem, B, A)
    B64, A64 = B.astype(np.float64), A.astype(np.float64)
    grad_B, grad_A = G @ A64.T, B64.T @ G
    return SimpleNamespace(
        grad_B=grad_B.astype(B.dtype), grad_A=grad_A.astype(A.dtype),
        loss=loss,
        g_sq=float(np.sum(G * G)),
        grad_sq=float(np.sum(grad_B * grad_B) + np.sum(grad_A * grad_A)),
        v_sq=float(np.sum(A64 * A64) + np.sum(B64 * B64)),
    )


def loss_pass(problem, data, B, A):
    return gradient_of_loss(problem, B, A)[1]


def update(B, A, grad_B, grad_A, eta):
    eta = B.dtype.type(eta)
    return B - eta * grad_B, A - eta * grad_A


def v_form_gradient(problem, B, A):
    """grad J(V) = 2 Sym(E1^T G E2^T) V with V = [B; A^T] (paper, eq. 7). Small sizes only:
    it builds (m+n) x (m+n) matrices. Returns the (m+n) x r array [grad_B; grad_A^T]."""
    (m, n), G = problem.shape, gradient_of_loss(problem, B, A)[0]
    E1 = np.hstack([np.eye(m), np.zeros((m, n))])          # m x (m+n): top m rows
    E2 = np.vstack([np.zeros((m, n)), np.eye(n)])          # (m+n) x n: right n columns
    V = np.vstack([B, A.T]).astype(np.float64)
    M = E1.T @ G @ E2.T
    return 2.0 * ((M + M.T) / 2.0) @ V


def step(problem, B, A, *, step_size="theorem"):
    """One step of LoRA gradient descent, as the paper writes it (eq. 3 and 8).

    Same contract as ``lorakern.step``: new arrays for B and A, the caller's untouched.
    """
    from .descent import StepResult, check_adapters

    check_adapters(problem, B, A)
    policy = as_policy(step_size)
    p = fused_pass(problem, None, B, A)
    g_norm = math.sqrt(p.g_sq)
    trials = 0
    # eq. (8): eta_t = min{1 / (c max(L, 1) (||V_t||^2 + ||G_t||_F)), 1}, c = 5 sqrt(2)
    constant = policy.constant if isinstance(policy, Theorem) else THEOREM_CONSTANT
    scale = constant * max(problem.lipschitz, 1.0) * (p.v_sq + g_norm)
    eta_theorem = min(1.0 / scale, 1.0) if scale > 0 else 1.0
    if isinstance(policy, Theorem):
        eta = eta_theorem
    elif isinstance(policy, Constant):
        eta = float(policy.eta)
    elif isinstance(policy, Armijo):
        # halve from the cap until the Armijo condition holds; at or below the theorem's
        # eta, take the theorem's eta (Lemma 2 guarantees it the condition for c <= 1/5)
        eta = policy.cap
        while True:
            if eta <= eta_theorem or trials == policy.max_trials:
                eta = eta_theorem
                break
            trials += 1
            B1, A1 = update(B, A, p.grad_B, p.grad_A, eta)
            if loss_pass(problem, None, B1, A1) <= p.loss - policy.c * eta * p.grad_sq:
                break
            eta *= 0.5
    B_next, A_next = update(B, A, p.grad_B, p.grad_A, eta)
    return StepResult(B=B_next, A=A_next, eta=float(eta), loss=p.loss, grad_sq=p.grad_sq,
                      v_sq=p.v_sq, g_norm=g_norm, trials=trials)
