"""The linear kind on the CPU: BLAS for the thin products with X, the Numba sweep
(linear_kernels.py) for everything that touches a row of the N x m outputs.

One fused pass at V = (B, A), the problem's Z0 = X W0^T (- Y) prepared once:

    P = X A^T                  (N x r, BLAS: N n r multiply-adds)
    sweep over row parts       Z = Z0 + P B^T, J, Delta, ||Delta||_F^2, Q = Delta B, P^T Delta
    grad_B = (P^T Delta)^T / N    grad_A = Q^T X / N   (r x n, BLAS: N n r)
    ||G||_F^2                  exact (problem.norm_strategy) or the certified bound

so the gradients cost O(N r (m + n)) and no m x n matrix is formed. The exact norm keeps
Delta (N x m, a workspace made once) and computes ||Delta^T X||_F^2 either as
<Delta Delta^T, X X^T> (a syrk of N^2 m / 2 multiply-adds against the float64 X X^T) or from
column tiles of Delta^T X (N m n), each squared and discarded.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..results import PassResult
from . import linear_kernels as lk

#: rows per part of the sweep, at least; at most MAX_PARTS parts. The parts, not the
#: threads, fix the order of the sums, so the result does not depend on the thread count.
#: A part's r4 x m partial of P^T Delta is written once and added in ``merge``: at
#: N = 1024, m = 4096, r = 16 that is 16 parts of 64 rows, 16 x 256 KB.
PART_ROWS = 64
MAX_PARTS = 64
#: columns of X per tile of Delta^T X in the "tiles" norm strategy (an m x NORM_TILE block)
NORM_TILE = 512


def prepare(problem, device):
    if problem.xp is not np:
        raise TypeError("device='cpu' needs NumPy arrays; the problem holds CuPy arrays "
                        "(use device='cuda', or build the LinearProblem from NumPy arrays)")
    mode = lk.mode_of(problem.loss)
    dummy = np.zeros((1, 1), problem.dtype)
    return SimpleNamespace(
        X=problem.X,
        Z0=problem.base(np),
        Yl=problem.Y if mode == lk.LABEL else dummy,
        cls=problem.Y if mode == lk.CLASS else np.zeros(1, np.int64),
        D=None,  # Delta, for the exact norm: allocated on the first pass that needs it
    )


def nparts(N: int) -> int:
    return max(1, min(MAX_PARTS, -(-N // PART_ROWS)))


def _sweep(problem, data, B, A, with_grad: bool, store: bool):
    N, m = data.Z0.shape
    n, r = data.X.shape[1], B.shape[1]
    r4 = -(-r // 4) * 4
    dt = problem.dtype
    A4 = np.zeros((r4, n), dt)
    A4[:r] = A
    P = np.matmul(data.X, A4.T)  # N x r4, zero past r
    Bt = np.zeros((r4, m), dt)
    Bt[:r] = B.T
    k = nparts(N)
    parts = np.empty((k, r4, m) if with_grad else (k, 1, 1), dt)
    Q = np.empty((N, r4) if with_grad else (1, 1), dt)
    scalars = np.zeros((k, 2), np.float64)
    if store and data.D is None:
        data.D = np.empty((N, m), dt)
    D = data.D if store else np.zeros((1, 1), dt)
    lk.sweep_kernel(problem.loss)(data.Z0, data.Yl, data.cls, P, Bt, problem.delta,
                                  dt.type(0), with_grad, store, D, Q, parts, scalars)
    loss_sum = d_sq = 0.0
    for p in range(k):  # in part order
        loss_sum += float(scalars[p, 0])
        d_sq += float(scalars[p, 1])
    return P, Q, parts, loss_sum / N, d_sq


def exact_norm_sq(problem, data) -> float:
    """||Delta^T X||_F^2 of the Delta the last exact pass stored (see norm_strategy)."""
    D, X = data.D, data.X
    if problem.norm_strategy == "gram":
        return lk.frob_dot(D @ D.T, problem.gram)  # <Delta Delta^T, X X^T>
    total = 0.0
    for j0 in range(0, X.shape[1], NORM_TILE):
        total += lk.sq_sum(D.T @ X[:, j0:j0 + NORM_TILE])  # an m x NORM_TILE tile of Delta^T X
    return total


def fused_pass(problem, data, B, A, *, norm="exact"):
    """Gradients and norms at (B, A); ``norm="bound"`` gives the certified bound's square
    in g_sq (LinearProblem.norm_bound_sq) and skips the exact norm's work."""
    N, r = problem.N, B.shape[1]
    exact = norm != "bound"
    P, Q, parts, J, d_sq = _sweep(problem, data, B, A, True, exact)
    gBt = np.empty(parts.shape[1:], problem.dtype)
    lk.merge(parts, gBt)
    grad_B = np.ascontiguousarray(gBt[:r].T) / N   # (1/N) Delta^T P = G A^T
    grad_A = (Q[:, :r].T @ data.X) / N            # (1/N) (Delta B)^T X = B^T G
    g_sq = (exact_norm_sq(problem, data) / float(N) ** 2 if exact
            else float(problem.norm_bound_sq(d_sq, J)))
    return PassResult(grad_B=grad_B, grad_A=grad_A, loss=J, g_sq=g_sq,
                      grad_sq=lk.sq_sum(grad_B) + lk.sq_sum(grad_A),
                      v_sq=lk.sq_sum(A) + lk.sq_sum(B))


def loss_pass(problem, data, B, A):
    """J(B, A) alone: one sweep, no gradient work."""
    return _sweep(problem, data, B, A, False, False)[3]
