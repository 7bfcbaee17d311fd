"""The linear kind on CUDA: cuBLAS products and elementwise array operations, over row tiles.

Written against the device's array namespace (``data.xp``: CuPy on a GPU, NumPy under a host
runtime), so the same code runs in the tests without a GPU. One fused pass at V = (B, A):

    P = X A^T                                    (N x r, one GEMM)
    per tile of ROW_TILE rows:  Z = Z0 + P B^T, the loss in float64, Delta rounded to the dtype
                                (pointwise losses: one kernel, fused.cu's linear_pointwise, after
                                the GEMM P B^T), grad_B += Delta^T P,  Q = Delta B
    grad_A = Q^T X / N,  ||G||_F^2 exact (problem.norm_strategy_for("cuda", r)) or the
                         certified bound

Z, Delta and the loss's float64 arrays exist for one tile at a time (ROW_TILE x m each); the
exact norm keeps Delta whole (N x m, a workspace made once) for the Gram identity or the
column tiles of Delta^T X, or, for the squared loss, keeps the float64 moments C0 (m x n) and
Sigma (n x n) on the device instead and needs no Delta. Scalars stay on the device as 0-d
float64 arrays.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..results import PassResult
from . import launch

#: rows per tile of the sweep (Z, Delta and two float64 copies of ROW_TILE x m each)
ROW_TILE = 8192
#: columns of X per tile of Delta^T X in the "tiles" norm strategy, and rows per tile of
#: C0 + B (A Sigma) (NORM_TILE x n, float64) in the "moments" one
NORM_TILE = 4096


def prepare(problem, device):
    """The problem's arrays on the device (NumPy arrays copied once), and Z0 formed there."""
    rt = device.runtime
    xp = rt.xp
    return SimpleNamespace(
        rt=rt, xp=xp,
        X=xp.ascontiguousarray(xp.asarray(problem.X)),
        Z0=problem.base(xp),
        Y=None if problem.residual else xp.ascontiguousarray(xp.asarray(problem.Y)),
        D=None,  # Delta for the exact norm, made on first use
        K=None,  # X X^T (float64) for the "gram" strategy, made on first use
        moments=None,  # (C0, Sigma) (float64) for the "moments" strategy, made on first use
        pointwise=None,  # fused.cu's linear_pointwise for a pointwise loss, loaded on first use
    )


def _loss(problem, xp, Z, Y):
    """(value (float64), Delta (float64)) for a tile Z of the outputs and its targets Y."""
    loss, t = problem.loss, Z.astype(np.float64)
    if loss.labels == "class":
        return loss.rows(xp, t, Y)
    y = None if Y is None else Y.astype(np.float64)
    return loss.array_pointwise(xp, t, y, problem.delta)


def _pointwise_tile(problem, data, Z0, PB, Y, Delta):
    """A pointwise loss's tile in one kernel (fused.cu's linear_pointwise): Delta = loss'(Z0 +
    PB) written in place, and the tile's (loss sum, ||Delta||^2) as 0-d float64 arrays."""
    rt, xp = data.rt, data.xp
    if data.pointwise is None:
        data.pointwise = launch.linear_pointwise_kernel(rt, problem.dtype, problem.loss)
    part = xp.empty(2 * launch.small_grid(Z0.size), np.float64)
    launch.linear_pointwise(rt, data.pointwise, Z0, PB, Y, float(problem.delta), Delta, part)
    return xp.sum(part[0::2]), xp.sum(part[1::2])


def _sweep(problem, data, B, A, with_grad: bool, store: bool):
    xp, dt = data.xp, problem.dtype
    X, Z0 = data.X, data.Z0
    N, r = problem.N, B.shape[1]
    P = X @ A.T
    loss_sum = xp.zeros((), np.float64)
    d_sq = xp.zeros((), np.float64)
    gB = xp.zeros(B.shape, dt) if with_grad else None
    Q = xp.empty((N, r), dt) if with_grad else None
    if store and data.D is None:
        data.D = xp.empty(Z0.shape, dt)
    # a pointwise loss: one kernel a tile; cross-entropy (and a runtime without kernels, the
    # tests' NumPy stub): array expressions
    pointwise = problem.loss.labels != "class" and hasattr(data.rt, "kernel")
    for i0 in range(0, N, ROW_TILE):
        rows = slice(i0, min(i0 + ROW_TILE, N))
        Y = None if data.Y is None else data.Y[rows]
        if pointwise:
            PB = P[rows] @ B.T
            Delta = data.D[rows] if store else xp.empty(PB.shape, dt)
            value_sum, delta_sq = _pointwise_tile(problem, data, Z0[rows], PB, Y, Delta)
            loss_sum += value_sum
            d_sq += delta_sq
        else:
            value, delta64 = _loss(problem, xp, Z0[rows] + P[rows] @ B.T, Y)
            Delta = delta64.astype(dt)
            loss_sum += value.sum()
            d_sq += xp.sum(xp.square(Delta.astype(np.float64)))
            if store:
                data.D[rows] = Delta
        if with_grad:
            gB += Delta.T @ P[rows]
            Q[rows] = Delta @ B
    return gB, Q, loss_sum / N, d_sq


def exact_norm_sq(problem, data, B, A, strategy: str):
    """||Delta^T X||_F^2 (0-d float64) at (B, A) by ``strategy`` (problem.norm_strategy_for):
    from the moments, or from the Delta the last exact pass stored."""
    xp, D, X = data.xp, data.D, data.X
    if strategy == "moments":
        if data.moments is None:  # C0 and Sigma in float64, formed on the device once
            data.moments = problem.compute_moments(xp)
        return moments_norm_sq(xp, *data.moments, B, A)
    if strategy == "gram" and data.K is None:  # X X^T in float64, formed on the device once
        X64 = X.astype(np.float64)
        data.K = X64 @ X64.T
    return delta_x_norm_sq(xp, D, X, data.K if strategy == "gram" else None)


def moments_norm_sq(xp, C0, Sigma, B, A):
    """||C0 + B (A Sigma)||_F^2 (0-d float64 of ``xp``; = ||Delta^T X||_F^2 for the squared
    loss, LinearProblem.compute_moments): A Sigma (r x n, float64) first, then B (A Sigma)
    in row tiles of NORM_TILE x n, each added to C0's rows, squared, summed and discarded."""
    B64, A64 = B.astype(np.float64), A.astype(np.float64)
    AS = A64 @ Sigma
    total = xp.zeros((), np.float64)
    for i0 in range(0, C0.shape[0], NORM_TILE):
        T = B64[i0:i0 + NORM_TILE] @ AS    # rows i0.. of B (A Sigma)
        T += C0[i0:i0 + NORM_TILE]         # ... of N G = C0 + B A Sigma
        total += xp.sum(xp.square(T))
    return total


def delta_x_norm_sq(xp, D, X, K=None):
    """||D^T X||_F^2 (0-d float64 of ``xp``) for D (N x m), X (N x n) of the device: the
    Gram identity <D D^T, K> when K = X X^T (float64) is given, else column tiles of D^T X.
    Used by the linear kind's pass and by ``lorakern.torch`` (CUDA tensors, as CuPy arrays)."""
    if K is not None:
        return xp.sum((D @ D.T).astype(np.float64) * K)  # <Delta Delta^T, X X^T>
    total = xp.zeros((), np.float64)
    for j0 in range(0, X.shape[1], NORM_TILE):
        total += xp.sum(xp.square((D.T @ X[:, j0:j0 + NORM_TILE]).astype(np.float64)))
    return total


def _sq(xp, a):
    return xp.sum(xp.square(a.astype(np.float64)))


def fused_pass(problem, data, B, A, *, norm="exact"):
    """grad_B, grad_A and the step's norms at (B, A); scalars are 0-d float64 device arrays.
    ``norm="bound"``: g_sq is the certified bound's square (LinearProblem.norm_bound_sq)."""
    xp, N = data.xp, problem.N
    B, A = xp.ascontiguousarray(B), xp.ascontiguousarray(A)
    strategy = problem.norm_strategy_for("cuda", B.shape[1]) if norm != "bound" else None
    # the sweep keeps Delta only for a strategy that reads it
    gB, Q, J, d_sq = _sweep(problem, data, B, A, True, strategy in ("gram", "tiles"))
    grad_B = gB / N                      # (1/N) Delta^T P = G A^T
    grad_A = (Q.T @ data.X) / N          # (1/N) (Delta B)^T X = B^T G
    g_sq = (exact_norm_sq(problem, data, B, A, strategy) / float(N) ** 2 if strategy
            else problem.norm_bound_sq(d_sq, J, xp=xp))
    return PassResult(grad_B=grad_B, grad_A=grad_A, loss=J, g_sq=xp.asarray(g_sq, np.float64),
                      grad_sq=_sq(xp, grad_B) + _sq(xp, grad_A), v_sq=_sq(xp, A) + _sq(xp, B))


def loss_pass(problem, data, B, A):
    """J(B, A) alone (0-d float64 device array): one sweep, no gradient work."""
    xp = data.xp
    B, A = xp.ascontiguousarray(B), xp.ascontiguousarray(A)
    return _sweep(problem, data, B, A, False, False)[2]
