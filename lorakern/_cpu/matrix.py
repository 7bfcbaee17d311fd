"""The matrix kind on the CPU: the launcher of the fused Numba pass (kernels.py, _fused.py)."""
from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import numpy as np

from .._host import ordered_sum
from ..results import PassResult
from . import kernels, quartic, simd, workers

#: Rows of G computed, passed through the loss and used by phases 2 and 3 at a time
#: (a multiple of kernels.BLOCK_MULTIPLE = 12).
BLOCK_ROWS = 12
#: ... and from rank LARGE_RANK up (r rounded up to 4), LARGE_RANK_BLOCK_ROWS: phase 3 then
#: loads and stores its accumulators once per 24 rows instead of 12 (r = 64: 6-8 % faster;
#: r = 16: 2-10 % slower; benchmarks/NOTES.md, v9)
LARGE_RANK, LARGE_RANK_BLOCK_ROWS = 32, 24
#: The block of G (BLOCK_ROWS x chunk columns) should stay in L1 between the phases:
#: chunk ~ G_BYTES / (BLOCK_ROWS itemsize), clamped to [MIN_TILE, MAX_TILE], a multiple of
#: kernels.COLUMN_MULTIPLE = 24 (about 504 float32, 240 float64 columns; the same chunk for
#: the larger blocks of a large rank, whose G then lives in L2).
G_BYTES = 24 * 1024
MIN_TILE, MAX_TILE = 24, 1024
#: Work units: about TARGET_UNITS of them (64: 32 per thread on 2 cores, so a core that is
#: busy for a while costs a fraction of the step), as square as the matrix, but fewer where
#: their partial sums ((row panels x n + column tiles x m) x r4 values) would exceed
#: PARTIAL_FRACTION of the m x n data.
TARGET_UNITS = 64
PARTIAL_FRACTION = 0.25
#: caps on a unit's rows and columns (None: none); the tests set them small
MAX_UNIT_ROWS = MAX_UNIT_COLS = None
#: phase 1 prefetches R this many blocks ahead (0: no prefetch)
PREFETCH_BLOCKS = 1


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k


def geometry(m: int, n: int, r4: int, itemsize: int) -> tuple[int, int, int, int]:
    """(unit_rows, unit_cols, block_rows, chunk) for an m x n problem: a function of the
    shape, the rank and the dtype only, so the bits do not depend on the thread count."""
    align = kernels.COLUMN_MULTIPLE
    block_rows = LARGE_RANK_BLOCK_ROWS if r4 >= LARGE_RANK else BLOCK_ROWS
    # P panels x Q tiles = units, P / Q = m / n, (P n + Q m) r4 = 2 sqrt(units m n) r4
    # at most PARTIAL_FRACTION m n
    units = min(TARGET_UNITS, int(PARTIAL_FRACTION ** 2 * m * n / (4 * r4 * r4)))
    units = max(units, 1)
    panels = min(max(1, round(math.sqrt(units * m / n))), -(-m // block_rows))
    tiles = min(max(1, units // panels), -(-n // align))
    unit_rows = _round_up(-(-m // panels), block_rows)
    unit_cols = _round_up(-(-n // tiles), align)
    if MAX_UNIT_ROWS:
        unit_rows = min(unit_rows, _round_up(MAX_UNIT_ROWS, block_rows))
    if MAX_UNIT_COLS:
        unit_cols = min(unit_cols, _round_up(MAX_UNIT_COLS, align))
    # the unit's columns in equal chunks of about the target width (up to 25 % over it)
    target = min(max(G_BYTES // (BLOCK_ROWS * itemsize), MIN_TILE), MAX_TILE)
    chunks = -(-4 * unit_cols // (5 * target))
    chunk = _round_up(-(-unit_cols // chunks), align)
    return unit_rows, unit_cols, block_rows, chunk


def prepare(problem, device):
    if problem.xp is not np:
        raise TypeError("device='cpu' needs NumPy arrays; the problem holds CuPy arrays "
                        "(use device='cuda', or build the Problem from NumPy arrays)")
    one = np.zeros((1, 1), problem.dtype)
    return SimpleNamespace(
        # the SIMD loads need unit stride along rows (a copy only if the caller's W0 is strided)
        data=np.ascontiguousarray(problem.base),
        labels_y=np.ascontiguousarray(problem.labels) if problem.labels is not None else one,
        mask=problem.mask if problem.mask is not None else np.zeros((1, 1), np.uint8),
        workspace={}, lock=threading.Lock(),
    )


def _workspace(data, key, make):
    """The arrays for ``key``, kept with the problem's prepared data between calls (the
    fresh pages of a new large array cost a page fault each); a call that finds another
    thread using them gets its own."""
    if data.lock.acquire(blocking=False):
        try:
            ws = data.workspace.get(key)
            if ws is None:
                data.workspace.clear()  # one shape at a time
                ws = data.workspace[key] = make()
            return ws, data.lock
        except BaseException:
            data.lock.release()
            raise
    return make(), None


def _run(problem, data, B, A, with_grad):
    (m, r), n = B.shape, A.shape[1]
    dtype = B.dtype
    r4 = _round_up(r, 4)
    geo = unit_rows, unit_cols, _, _ = geometry(m, n, r4, dtype.itemsize)
    npanels, ntiles = -(-m // unit_rows), -(-n // unit_cols)

    ncols = _round_up(n, kernels.COLUMN_MULTIPLE)
    group = 3 * simd.VECTOR_BYTES // dtype.itemsize  # phase 1's 3 vectors of columns

    def make():
        return SimpleNamespace(
            Bp=np.zeros((npanels * unit_rows, r4), dtype),
            Ap=np.zeros((r4, ncols), dtype),
            Apk=np.empty((ncols // group, r4, group), dtype),
            gA=np.empty((npanels, r4, ncols), dtype),
            gB=np.empty((ntiles, npanels * unit_rows, r4), dtype),
        )

    ws, lock = _workspace(data, (m, n, r, dtype.str, geo), make)
    try:
        ws.Bp[:m, :r] = B
        ws.Ap[:r, :n] = A
        kernels.pack_groups(ws.Ap, ws.Apk)
        kernel = kernels.fused_kernel(problem.loss, problem.loss.labels, problem.mask is not None,
                                      kernels.SIMD)
        scalars = np.empty((npanels * ntiles, 2), np.float64)
        counters = np.zeros(1 + ntiles + npanels, np.int64)
        grad_A = np.empty((r4, n) if with_grad else (1, 1), dtype)
        grad_B = np.empty((m, r4) if with_grad else (1, 1), dtype)
        norms = np.empty((ntiles + npanels, 2), np.float64)
        workers.run(kernel, (data.data, data.labels_y, data.mask, ws.Bp, ws.Ap,
                             ws.Apk.reshape(-1, group), problem.delta,
                             geo, geo[2] * PREFETCH_BLOCKS, with_grad, counters, ws.gB,
                             ws.gA, scalars, grad_B, grad_A, norms),
                    min(workers.count(), npanels * ntiles), flops=6.0 * m * n * r)
    finally:
        if lock is not None:
            lock.release()
    # the units' and the tiles' and panels' sums, each added in a fixed order
    loss, g_sq = ordered_sum(scalars[:, 0]), ordered_sum(scalars[:, 1])
    if not with_grad:
        return loss, None
    return loss, PassResult(grad_B=grad_B[:, :r], grad_A=grad_A[:r], loss=loss, g_sq=g_sq,
                            grad_sq=ordered_sum(norms[:, 0]), v_sq=ordered_sum(norms[:, 1]))


def fused_pass(problem, data, B, A, *, norm="exact"):
    """Gradients and norms at (B, A) in one pass over the data (||G|| is always exact here)."""
    return _run(problem, data, B, A, True)[1]


def loss_pass(problem, data, B, A):
    """J(B, A) alone: one read of the data, no gradient work (the same sum as fused_pass's)."""
    return _run(problem, data, B, A, False)[0]


def line_quartic(problem, data, B, A, grad_B, grad_A):
    """(a2, a3, a4) of J(B - eta grad_B, A - eta grad_A) = J - eta ||grad J||^2 + a2 eta^2
    + a3 eta^3 + a4 eta^4 for the squared loss: ``reference.matrix.line_quartic``'s
    coefficients, summed in float64 (quartic.py's kernels on the workers' pool).

    Without a mask one term touches the data: with D = R + BA, P = gB A + B gA, Q = gB gA,
    a2 = 1/2 ||P||^2 + <R, Q> + <BA, Q>, and <R, Q> = sum_ik gB[i, k] <R[i], gA[k]> is one
    pass over R of 2 m n r flops (the fused pass does 6 m n r). Every other term is the
    trace of a product of r x r Gram matrices, O((m + n) r^2). With a mask the sums run over
    the observed entries and do not factor: d, p and q are formed row by row, 8 m n r flops.
    """
    from ..reference.matrix import check_quartic

    check_quartic(problem)
    m = B.shape[0]
    block_rows = quartic.QUARTIC_ROWS
    nblocks = -(-m // block_rows)
    counter = np.zeros(1, np.int64)
    R, r, n = data.data, B.shape[1], A.shape[1]
    workers_ = min(workers.count(), nblocks)
    if problem.mask is not None:
        partial = np.zeros((nblocks, 3))
        workers.run(quartic.masked_work, (R, data.mask, B, A, grad_B, grad_A, block_rows,
                                          counter, partial), workers_, flops=8.0 * m * n * r)
        return np.array([ordered_sum(partial[:, 0]), -ordered_sum(partial[:, 1]),
                         0.5 * ordered_sum(partial[:, 2])])
    partial = np.zeros((nblocks, 1))
    workers.run(quartic.rq_work, (R, grad_B, grad_A, block_rows, counter, partial), workers_,
                flops=2.0 * m * n * r)
    f8 = np.float64
    B64, A64, gB64, gA64 = (x.astype(f8) for x in (B, A, grad_B, grad_A))
    # <X Y, U W> = tr(Y^T X^T U W) = tr((X^T U)(W Y^T)), X, U m x r and Y, W r x n
    BtB, BtgB, gBtgB = B64.T @ B64, B64.T @ gB64, gB64.T @ gB64
    AAt, gAAt, gAgAt = A64 @ A64.T, gA64 @ A64.T, gA64 @ gA64.T

    def inner(XtU, WYt):
        return float(np.sum(XtU * WYt.T))  # tr(XtU @ WYt)

    D_Q = ordered_sum(partial[:, 0]) + inner(BtgB, gAAt)  # <R, gB gA> + <B A, gB gA>
    P_P = inner(gBtgB, AAt) + 2.0 * inner(BtgB.T, gAAt) + inner(BtB, gAgAt)
    P_Q = inner(gBtgB, gAAt) + inner(BtgB, gAgAt)         # <gB A, Q> + <B gA, Q>
    Q_Q = inner(gBtgB, gAgAt)
    return np.array([0.5 * P_P + D_Q, -P_Q, 0.5 * Q_Q])
