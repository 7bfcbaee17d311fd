"""The linear kind on the CPU: one Numba sweep over the rows of X (linear_kernels.py) for the
gradients, J and ||Delta||_F; BLAS only for the exact norm's large products.

One fused pass at V = (B, A), the problem's Z0 = X W0^T (- Y) prepared once:

    sweep over row parts   P = X A^T, Z = Z0 + P B^T, J, Delta, ||Delta||_F^2,
                           P^T Delta and (Delta B)^T X summed per part
    grad_B = (P^T Delta)^T / N = G A^T,   grad_A = (Delta B)^T X / N = B^T G
    ||G||_F^2              exact (problem.norm_strategy_for("cpu", r)) or the certified bound

so X and Z0 are read once, the gradients cost O(N r (m + n)) and no m x n matrix is formed.
The exact norm's BLAS products run tile by tile on the same workers, each on one OpenBLAS
thread (``on_workers``, blas_threads.one_thread): on OpenBLAS's own threads, which split a
product evenly and spin while they wait, a step took up to 66x its one-thread time with
another process busy on one of 2 cores (benchmarks/NOTES.md, 2026-12-07).
The exact norm ||Delta^T X||_F^2 comes either from Delta, which the sweep then keeps (N x m, a
workspace made once): as <Delta Delta^T, X X^T> (a syrk, N^2 m / 2 multiply-adds, against the
float64 X X^T) or from column tiles of Delta^T X (N m n), each squared and discarded; or, for
the squared loss, from the float64 moments as ||C0 + B (A Sigma)||_F^2 (r n (n + m), in row
tiles of B (A Sigma); the kept C0 is the only m x n matrix), without Delta.
"""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np

from .._host import ordered_sum
from ..results import PassResult
from . import blas_threads, linear_kernels as lk, workers
from .compiling import call

#: rows per part of the sweep, at least; at most MAX_PARTS parts. The parts, not the
#: threads, fix the order of the sums, so the result does not depend on the thread count.
#: Each part writes an r4 x m and an r4 x n partial, added in ``merge``: at N = 1024,
#: m = n = 4096, r = 16 that is 16 parts of 64 rows and 16 x 512 KB (fp32).
PART_ROWS = 64
MAX_PARTS = 64
#: below this many multiply-adds (a sweep's N r4 (3m + 2n), an exact norm's N m min(N, n))
#: the work runs on one thread (one worker), without BLAS: waking threads costs more than
#: such work (the digits demo's sweep, 1078 x 65 x 10 at r = 2: 1.8 ms on one thread, 15 ms
#: on two on this shared 2-core machine)
SERIAL_WORK = 1 << 22
#: columns of X per tile of Delta^T X in the "tiles" norm strategy (an m x NORM_TILE block),
#: rows per tile of C0 + B (A Sigma) and columns of A Sigma in the "moments" one
#: (NORM_TILE x n, float64), rows of the blocks of Delta Delta^T in the "gram" one. The tiles
#: are the work units of the exact norm's workers, each product on one BLAS thread
#: (``on_workers``): 256 gives 2 tiles at n = 512 and 16 at 4096.
NORM_TILE = 256


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
    """(P^T Delta summed (r4 x m), (Delta B)^T X summed (r4 x n), J, ||Delta||_F^2)."""
    (N, m), n, r = data.Z0.shape, data.X.shape[1], B.shape[1]
    r4 = -(-r // 4) * 4
    dt = problem.dtype
    A4 = np.zeros((r4, n), dt)
    A4[:r] = A
    Bt = np.zeros((r4, m), dt)
    Bt[:r] = B.T
    k = nparts(N)
    parts_B = np.empty((k, r4, m) if with_grad else (k, 1, 1), dt)
    parts_A = np.empty((k, r4, n) if with_grad else (k, 1, 1), dt)
    scalars = np.zeros((k, 2), np.float64)
    if store and data.D is None:
        data.D = np.empty((N, m), dt)
    D = data.D if store else np.zeros((1, 1), dt)
    kernel = lk.sweep_kernel(problem.loss)
    args = (np.zeros(1, np.int64), data.X, data.Z0, data.Yl, data.cls, A4, Bt, problem.delta,
            dt.type(0), with_grad, store, D, parts_B, parts_A, scalars)
    # small work on one worker (this thread): the same parts, so the same bits
    big = N * r4 * (3 * m + 2 * n) >= SERIAL_WORK
    workers.run(kernel, args, min(workers.count(), k) if big else 1,
                flops=2.0 * N * r4 * (3 * m + 2 * n))
    loss_sum, d_sq = ordered_sum(scalars[:k, 0]), ordered_sum(scalars[:k, 1])
    gBt = gA = None
    if with_grad:
        gBt, gA = np.empty((r4, m), dt), np.empty((r4, n), dt)
        call(lk.merge, parts_B, gBt)
        call(lk.merge, parts_A, gA)
    return gBt, gA, loss_sum / N, d_sq


def exact_norm_sq(problem, data, B, A, strategy: str) -> float:
    """||Delta^T X||_F^2 at (B, A) by ``strategy`` (problem.norm_strategy_for): from the
    moments, or from the Delta the last exact pass stored."""
    if strategy == "moments":
        C0, Sigma = problem.moments
        return moments_norm_sq(C0, Sigma, B, A)
    gram = problem.gram if strategy == "gram" else None
    return delta_x_norm_sq(data.D, data.X, gram)


def moments_norm_sq(C0, Sigma, B, A) -> float:
    """||C0 + B (A Sigma)||_F^2 in float64 (= ||Delta^T X||_F^2 for the squared loss: see
    LinearProblem.compute_moments) for C0 (m x n), Sigma (n x n) float64 and B, A of any
    float dtype, taken exactly into float64.

    A Sigma (r x n) first (r n^2 multiply-adds), then B (A Sigma) row tile by row tile
    (NORM_TILE x n, m n r in all), each added to C0's rows, squared, summed and discarded.
    Small work runs in one serial Numba loop, larger on BLAS products with Numba's
    ordered sums.
    """
    m, n = C0.shape
    r = B.shape[1]
    B64, A64 = B.astype(np.float64), A.astype(np.float64)
    if r * n * (n + m) < SERIAL_WORK:
        return call(lk.moments_norm_sq, C0, Sigma, B64, A64)
    AS = np.empty((r, n))

    def columns_of_AS(t):                  # A Sigma, columns t NORM_TILE..
        cols = slice(t * NORM_TILE, (t + 1) * NORM_TILE)
        AS[:, cols] = A64 @ Sigma[:, cols]
        return 0.0

    def tile_sq(t):
        rows = slice(t * NORM_TILE, (t + 1) * NORM_TILE)
        T = B64[rows] @ AS                 # rows t NORM_TILE.. of B (A Sigma)
        T += C0[rows]                      # ... of N G = C0 + B A Sigma
        return call(lk.sq_sum, T)

    with blas_threads.one_thread() as alone:
        on_workers(columns_of_AS, -(-n // NORM_TILE), alone, 2.0 * r * n * n)
        return on_workers(tile_sq, -(-m // NORM_TILE), alone, 2.0 * m * n * r)


def delta_x_norm_sq(D, X, K=None) -> float:
    """||D^T X||_F^2 in float64 for NumPy D (N x m) and X (N x n): the exact norm's kernels.

    K = X X^T (N x N, float64) selects the Gram identity <D D^T, K>; None the column tiles of
    D^T X. Small work runs in serial Numba loops (no BLAS threads woken), larger work on BLAS
    products with Numba's ordered sums. Used by the linear kind's pass and by
    ``lorakern.torch`` (each LoRA layer's Delta and X, read from CPU tensors).
    """
    N, m = D.shape
    small = N * m * min(N, X.shape[1]) < SERIAL_WORK  # serial loops, no BLAS threads
    if K is not None:
        if small:
            return call(lk.gram_norm_sq, D, K)
        # <Delta Delta^T, K> by blocks (I, J), J <= I, of NORM_TILE rows: K and Delta Delta^T
        # are symmetric, so a block below the diagonal counts twice (an exact doubling)
        tiles = -(-N // NORM_TILE)
        blocks = [(i, j) for i in range(tiles) for j in range(i + 1)]

        def block(t):
            i0, j0 = blocks[t][0] * NORM_TILE, blocks[t][1] * NORM_TILE
            S = D[i0:i0 + NORM_TILE] @ D[j0:j0 + NORM_TILE].T   # a block of Delta Delta^T
            return (1.0 if i0 == j0 else 2.0) * call(lk.block_dot, S, K, i0, j0)

        flops = 1.0 * N * N * m
    else:
        if small:
            return call(lk.tiles_norm_sq, D, X, NORM_TILE)
        blocks = range(0, X.shape[1], NORM_TILE)

        def block(t):                      # an m x NORM_TILE tile of Delta^T X, squared
            j0 = blocks[t]
            return call(lk.sq_sum, D.T @ X[:, j0:j0 + NORM_TILE])

        flops = 2.0 * N * m * X.shape[1]
    with blas_threads.one_thread() as alone:
        return on_workers(block, len(blocks), alone, flops)


def on_workers(tile, count: int, alone: bool, flops: float) -> float:
    """The float64 sum, in tile order, of ``tile(t)`` for t < count: the tiles taken from a
    counter by the pool's workers (workers.run) when ``alone`` (inside
    blas_threads.one_thread: each product on its worker's thread), else all on this thread
    with BLAS's own threads. The tiles, not the workers, fix the order of the sums and each
    product's bits, so the result does not depend on the thread count."""
    sums = np.zeros(count)
    next_tile = itertools.count().__next__   # atomic under the GIL

    def work():
        t = next_tile()
        while t < count:
            sums[t] = tile(t)
            t = next_tile()

    workers.run(work, (), min(workers.count(), count) if alone else 1, flops)
    return ordered_sum(sums)


def fused_pass(problem, data, B, A, *, norm="exact"):
    """Gradients and norms at (B, A); ``norm="bound"`` gives the certified bound's square
    in g_sq (LinearProblem.norm_bound_sq) and skips the exact norm's work."""
    N, r = problem.N, B.shape[1]
    strategy = problem.norm_strategy_for("cpu", r) if norm != "bound" else None
    # the sweep keeps Delta only for a strategy that reads it
    gBt, gA, J, d_sq = _sweep(problem, data, B, A, True, strategy in ("gram", "tiles"))
    grad_B = np.ascontiguousarray(gBt[:r].T) / N   # (1/N) Delta^T P = G A^T
    grad_A = gA[:r] / N                           # (1/N) (Delta B)^T X = B^T G
    g_sq = (exact_norm_sq(problem, data, B, A, strategy) / float(N) ** 2 if strategy
            else float(problem.norm_bound_sq(d_sq, J)))
    return PassResult(grad_B=grad_B, grad_A=grad_A, loss=J, g_sq=g_sq,
                      grad_sq=call(lk.sq_sum, grad_B) + call(lk.sq_sum, grad_A),
                      v_sq=call(lk.sq_sum, A) + call(lk.sq_sum, B))


def loss_pass(problem, data, B, A):
    """J(B, A) alone: one sweep, no gradient work."""
    return _sweep(problem, data, B, A, False, False)[2]
