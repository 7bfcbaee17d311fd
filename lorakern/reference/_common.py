"""What every kind's reference shares: the paper's gradients from G, in float64."""
from __future__ import annotations

import numpy as np

from ..results import PassResult


#: a diverging run overflows: the step reports it (status "diverged", as the kernels do, which
#: never warn), so the reference's passes run without NumPy's overflow warnings
quiet = np.errstate(over="ignore", invalid="ignore")


def check_numpy(problem):
    if problem.xp is not np:
        raise TypeError("the reference takes NumPy arrays; the problem holds CuPy arrays")


def pass_from_gradient(G, loss, B, A) -> PassResult:
    """grad_B = G A^T, grad_A = B^T G and the norms of the step (paper, eq. 3 and 8)."""
    B64, A64 = B.astype(np.float64), A.astype(np.float64)
    grad_B, grad_A = G @ A64.T, B64.T @ G
    return PassResult(
        grad_B=grad_B.astype(B.dtype), grad_A=grad_A.astype(A.dtype),
        loss=float(loss),
        g_sq=float(np.sum(G * G)),
        grad_sq=float(np.sum(grad_B * grad_B) + np.sum(grad_A * grad_A)),
        v_sq=float(np.sum(A64 * A64) + np.sum(B64 * B64)),
    )
