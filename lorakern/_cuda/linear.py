"""The linear kind on CUDA: cuBLAS products around the kernels of fused.cu.

One pass at V = (B, A), with P = X A^T (N x r, one GEMM), Delta = loss'(Z) at the outputs
Z = Z0 + P B^T (Z0 = X W0^T - Y, or X W0^T for label losses, formed once):

    grad_B = Delta^T P / N,   grad_A = (Delta B)^T X / N = Q^T X / N,
    ||G||_F^2 exact (problem.norm_strategy_for("cuda", r)) or the certified bound.

The sweep that makes Delta^T P, Q, J and ||Delta||^2 takes one of three routes:

* a pointwise loss (squared, huber, logistic) where nothing needs Delta afterwards (the
  "moments" norm, the bound, the loss alone), r <= 128: the matrix kind's fused pass (launch.Plan) on
  R = Z0, "B" = P and "A" = B^T. Its t = R + (P)(B^T) are the outputs Z, formed tile by tile in
  registers; its gradients are Delta B and P^T Delta. Z0 is read once and no N x m array is
  written: the sweep at its memory floor;
* a pointwise loss whose exact norm reads Delta ("gram", "tiles"), or r > 128: per row tile of ROW_TILE
  rows the GEMM P B^T, then fused.cu's linear_pointwise writes Delta (into the kept N x m
  workspace) with the loss and ||Delta||^2 in one kernel, then Delta^T P and Delta B;
* cross-entropy (a softmax over each row), or a runtime without kernels (the tests' NumPy
  stub): the same row tiles in array expressions of ``data.xp``.

Written against the device's runtime and array namespace (``data.rt``, ``data.xp``: CuPy on a
GPU, the host emulation's in tests), so every route runs in the tests without a GPU. The
"moments" norm keeps C0 (m x n) and Sigma (n x n) in float64 on the device instead of Delta,
and sums ||C0 + B (A Sigma)||_F^2 with the matrix kind's loss-only pass in float64.
Scalars stay on the device as 0-d float64 arrays.
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
    data = SimpleNamespace(
        rt=rt, xp=xp,
        X=xp.ascontiguousarray(xp.asarray(problem.X)),
        Z0=problem.base(xp),
        Y=None if problem.residual else xp.ascontiguousarray(xp.asarray(problem.Y)),
        D=None,  # Delta for the exact norm, made on first use
        K=None,  # X X^T (float64) for the "gram" strategy, made on first use
        moments=None,  # (C0, Sigma) (float64) for the "moments" strategy, made on first use
        # a runtime with kernels (a GPU's, the emulation's); the tests' NumPy stub has none
        kernels=hasattr(rt, "kernel"),
        pointwise=None,  # fused.cu's linear_pointwise for a pointwise loss, loaded on first use
        moments_matrix=None,  # the moments norm's float64 matrix problem and data (C0 as R)
    )
    # the sweep as the matrix kind's fused pass (``_fused_sweep``): the problem it sees, an
    # N x m "matrix" problem of the same loss, and its data (Z0 read in place of R or W0)
    data.as_matrix = SimpleNamespace(shape=(problem.N, problem.m), dtype=problem.dtype, loss=problem.loss,
                                     mask=None, delta=problem.delta)
    data.matrix = SimpleNamespace(rt=rt, x=data.Z0, y=data.Y, mask=None, plans={})
    return data


def _loss(problem, xp, Z, Y):
    """(value (float64), Delta (float64)) for a tile Z of the outputs and its targets Y."""
    loss, t = problem.loss, Z.astype(np.float64)
    if loss.labels == "class":
        return loss.rows(xp, t, Y)
    y = None if Y is None else Y.astype(np.float64)
    return loss.array_pointwise(xp, t, y, problem.delta)


def _pointwise_tile(problem, data, Z0, PB, Y, Delta, part):
    """A pointwise loss's tile in one kernel (fused.cu's linear_pointwise): Delta = loss'(Z0 +
    PB) written in place, and the tile's (loss sum, ||Delta||^2) as 0-d float64 arrays
    (``part``: the kernel's per-block sums, 2 x launch.small_grid(Z0.size) float64)."""
    if data.pointwise is None:
        data.pointwise = launch.linear_pointwise_kernel(data.rt, problem.dtype, problem.loss)
    part = part[:2 * launch.small_grid(Z0.size)]
    launch.linear_pointwise(data.rt, data.pointwise, Z0, PB, Y, float(problem.delta), Delta, part)
    return data.xp.sum(part[0::2]), data.xp.sum(part[1::2])


def _fused_route(problem, data, B) -> bool:
    """Whether the matrix kind's fused pass can run this sweep: a pointwise loss, a runtime with
    kernels and a rank the pass is compiled for (launch.RANK_BOUNDS; above it, cuBLAS)."""
    return problem.loss.labels != "class" and data.kernels and B.shape[1] <= launch.RANK_BOUNDS[-1]


def _fused_sweep(problem, data, B, A, with_grad: bool):
    """The sweep of a pointwise loss as the matrix kind's fused pass (fused.cu, launch.Plan) on
    R = Z0 (N x m), "B" = P = X A^T (N x r) and "A" = B^T (r x m): its t = Z0 + P B^T are the
    outputs Z, tile by tile, never stored; its loss and ||G||^2 are J N and ||Delta||^2; its
    gradients are Delta B = Q (N x r) and P^T Delta = (Delta^T P)^T (r x m). One read of Z0 and
    no N x m array written: the sweep at its memory floor. Returns what _sweep returns."""
    xp = data.xp
    P = xp.ascontiguousarray(data.X @ A.T)
    Bt = xp.ascontiguousarray(B.T)
    plan = launch.plan(data.as_matrix, data.matrix, B.shape[1])
    out = xp.empty(5, np.float64)
    gB = Q = None
    if with_grad:
        Q, gBt = xp.empty(P.shape, problem.dtype), xp.empty(Bt.shape, problem.dtype)
        plan.fused(data.matrix, P, Bt)
        plan.tail(P, Bt, out, grad_B=Q, grad_A=gBt)  # no update: the gradients and the row
        gB = xp.ascontiguousarray(gBt.T)
    else:
        plan.fused(data.matrix, P, Bt, grad=False)
        plan.tail(P, Bt, out, grad=False)
    return gB, Q, out[0] / problem.N, out[1]


def _sweep(problem, data, B, A, with_grad: bool, store: bool):
    """(Delta^T P, Q = Delta B, J, ||Delta||^2) at (B, A), Delta kept in data.D with ``store``
    (the "gram" and "tiles" norms read it). A pointwise loss on a runtime with kernels: the
    fused pass when nothing is stored, else one linear_pointwise kernel a tile; cross-entropy
    (and a runtime without kernels, the tests' NumPy stub): array expressions."""
    if _fused_route(problem, data, B) and not store:
        return _fused_sweep(problem, data, B, A, with_grad)
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
    pointwise = problem.loss.labels != "class" and data.kernels  # linear_pointwise
    part = xp.empty(2 * launch.small_grid(min(N, ROW_TILE) * problem.m), np.float64) if pointwise else None
    for i0 in range(0, N, ROW_TILE):
        rows = slice(i0, min(i0 + ROW_TILE, N))
        Y = None if data.Y is None else data.Y[rows]
        if pointwise:
            PB = P[rows] @ B.T
            Delta = data.D[rows] if store else xp.empty(PB.shape, dt)
            value_sum, delta_sq = _pointwise_tile(problem, data, Z0[rows], PB, Y, Delta, part)
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
        if data.kernels and B.shape[1] <= launch.RANK_BOUNDS[-1]:
            return _moments_norm_fused(problem, data, B, A)
        return moments_norm_sq(xp, *data.moments, B, A)
    if strategy == "gram" and data.K is None:  # X X^T in float64, formed on the device once
        X64 = X.astype(np.float64)
        data.K = X64 @ X64.T
    return delta_x_norm_sq(xp, D, X, data.K if strategy == "gram" else None)


def _moments_norm_fused(problem, data, B, A):
    """||C0 + B (A Sigma)||_F^2 as the loss-only pass of the matrix kind (fused.cu, float64,
    the squared loss) on R = C0, "B" = B and "A" = A Sigma: its sum of t^2 / 2 over the m x n
    entries, times 2 (exact: a power of two). One read of C0 and no m x n array written; the
    GEMM A Sigma reads Sigma once. Equals moments_norm_sq to float64 rounding."""
    xp = data.xp
    C0, Sigma = data.moments
    if data.moments_matrix is None:
        from ..losses import LOSSES

        data.moments_matrix = (
            SimpleNamespace(shape=C0.shape, dtype=np.dtype(np.float64), loss=LOSSES["squared"], mask=None,
                            delta=1.0),
            SimpleNamespace(rt=data.rt, x=C0, y=None, mask=None, plans={}))
    as_matrix, matrix = data.moments_matrix
    B64 = xp.ascontiguousarray(B.astype(np.float64))
    AS = xp.ascontiguousarray(A.astype(np.float64) @ Sigma)
    plan = launch.plan(as_matrix, matrix, B.shape[1])
    out = xp.empty(5, np.float64)
    plan.fused(matrix, B64, AS, grad=False)
    plan.tail(B64, AS, out, grad=False)
    return 2.0 * out[0]


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
    """||a||_F^2 in float64: the square taken in float64 (exact widening first), two launches."""
    return xp.sum(xp.square(a, dtype=np.float64))


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
