"""The NumPy reference: short, literal, the definition of truth.

Everything is computed in float64 from the problem's data, whatever its dtype; results are
rounded to the input dtype only where an array is handed back. It is also a device
(``device="reference"``), so tests and benchmarks reach it like every other one. Each problem
kind has a module here with ``gradient(problem, B, A) -> (G, loss)``: G = dL/dW formed whole.
"""
from __future__ import annotations

import math

import numpy as np

from .. import _dispatch
from .._host import HostDevice
from ..step_size import THEOREM_CONSTANT, Armijo, Constant, Theorem, as_policy

DEVICE = HostDevice("reference", "reference")


def _kind(problem):
    return _dispatch.kernels(problem.kind, DEVICE)


def gradient(problem, B, A):
    """(G, loss) in float64: G = grad_W J at W0 + BA, the m x n matrix the kernels never form."""
    return _kind(problem).gradient(problem, B, A)


def fused_pass(problem, data, B, A, *, norm="exact"):
    """results.PassResult: grad_B = G A^T, grad_A = B^T G and the norms of the step (eq. 3, 8).
    ``norm="bound"``: g_sq may be a certified upper bound's square (Theorem(norm="bound"))."""
    return _kind(problem).fused_pass(problem, data, B, A, norm=norm)


def loss_pass(problem, data, B, A):
    return gradient(problem, B, A)[1]


def update(B, A, grad_B, grad_A, eta):
    return DEVICE.update(B, A, grad_B, grad_A, eta)


def v_form_gradient(problem, B, A):
    """grad J(V) = 2 Sym(E1^T G E2^T) V with V = [B; A^T] (paper, eq. 7). Small sizes only:
    it builds (m+n) x (m+n) matrices. Returns the (m+n) x r array [grad_B; grad_A^T]."""
    (m, n), G = problem.shape, gradient(problem, B, A)[0]
    E1 = np.hstack([np.eye(m), np.zeros((m, n))])          # m x (m+n): top m rows
    E2 = np.vstack([np.zeros((m, n)), np.eye(n)])          # (m+n) x n: right n columns
    V = np.vstack([B, A.T]).astype(np.float64)
    M = E1.T @ G @ E2.T
    return 2.0 * ((M + M.T) / 2.0) @ V


def step(problem, B, A, *, step_size="theorem"):
    """One step of LoRA gradient descent, as the paper writes it (eq. 3 and 8).

    Same contract as ``lorakern.step``: new arrays for B and A, the caller's untouched.
    The built-in policies are written out literally here; any other policy, a subclass of a
    built-in one included (it may override ``choose``), runs its own ``choose`` on the
    reference device.
    """
    from ..descent import step as generic_step
    from ..adapters import check_adapters

    check_adapters(problem, B, A, stacklevel=3)
    policy = as_policy(step_size)
    if type(policy) not in (Theorem, Constant, Armijo):
        return generic_step(problem, B, A, device=DEVICE, step_size=policy)
    p = fused_pass(problem, None, B, A, norm=policy.norm)
    g_norm = math.sqrt(p.g_sq)  # ||G_t||_F, or its certified bound for Theorem(norm="bound")
    trials = 0
    # eq. (8): eta_t = min{1 / (c max(L, 1) (||V_t||^2 + ||G_t||_F)), 1}, c = 5 sqrt(2)
    constant = policy.constant if isinstance(policy, Theorem) else THEOREM_CONSTANT
    scale = constant * max(problem.lipschitz, 1.0) * (p.v_sq + g_norm)
    eta_theorem = min(1.0 / scale, 1.0) if scale > 0 else 1.0
    if isinstance(policy, Theorem):
        eta = eta_theorem
    elif isinstance(policy, Constant):
        eta = float(policy.eta)
    else:
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
    from ..results import StepResult

    return StepResult(B=B_next, A=A_next, eta=float(eta), loss=p.loss, grad_sq=p.grad_sq,
                      v_sq=p.v_sq, g_norm=g_norm, trials=trials)
