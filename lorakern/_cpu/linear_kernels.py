"""Numba kernels of the linear kind: one sweep over the rows of X and Z0, and the norms' sums.

Memory plan of the sweep (``sweep_kernel``). The rows are cut into ``nparts`` contiguous
parts (a number fixed by N alone, not by the thread count), one prange iteration each. A
part walks its rows in groups of ROWS = 4 and, per group, reads 4 rows of X and of Z0 once:

    pk[4, r4]  = X[rows] A^T                            phase 0: P = X A^T
    buf[4, m]  = Z0[rows] + pk Bt                        phase 1: z_i = x_i (W0 + BA)^T (- y_i)
    value, Delta = loss(buf)  -> J, ||Delta||_F^2 (float64); Delta written back into buf
    D[rows] = buf                                        only when the exact norm needs Delta
    qk[4, r4]  = buf Bt^T               (Delta B)        phase 2
    gBt[:, :] += pk^T buf               (P^T Delta)      phase 3, same sweep over buf
    gA[:, :]  += qk^T X[rows]           ((Delta B)^T X)  phase 4, the rows of X still in cache

A part keeps its own r4 x m partial of P^T Delta and r4 x n partial of (Delta B)^T X; A, Bt
and the two partials stay in cache while the groups pass. Nothing N x m is written except
D (for the exact norm), nothing m x n at all. ``merge`` adds the parts in part order, so the
bits depend on N and the tuning constants, never on the thread count or the schedule. r is
padded with zeros to r4 (a multiple of 4): zero rows of A and Bt add nothing; rows past a
part's end are zero in the group's buffers.

The loss is a closure constant: an entrywise loss from losses.LOSSES inlined per entry
(its generated scalar function, as the matrix kind's kernels use it), or the row-wise
softmax cross-entropy written out below (max, exp once per entry into a float64 row, sum).
Each loss compiles once, lazily (parallel over the parts); the launcher runs small problems
on one thread, where waking the others costs more than the work.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numba
import numpy as np

from .kernels import FASTMATH, _compile_loss
from ..losses import LOSSES

ROWS = 4  # rows per group: phases 2+3 do 8 multiply-adds per 6 loads (as in kernels.py)

RESIDUAL, LABEL, CLASS = 0, 1, 2


def mode_of(loss) -> int:
    """RESIDUAL (squared, huber: buf holds d = z - y), LABEL (logistic) or CLASS (softmax)."""
    if loss.labels == "class":
        return CLASS
    return LABEL if loss.labels else RESIDUAL


@lru_cache(maxsize=None)
def sweep_kernel(loss):
    """The fused sweep for one loss (see the module's memory plan)."""
    mode = mode_of(loss)
    # a row-wise loss has no scalar body; the squared one stands in so the kernel types
    pointwise = _compile_loss(LOSSES["squared"] if mode == CLASS else loss)

    def kernel(X, Z0, Yl, cls, A, Bt, delta, zero, with_grad, store, D, parts_B, parts_A,
               scalars):
        N, m = Z0.shape
        n = X.shape[1]
        r4 = Bt.shape[0]
        nparts = scalars.shape[0]
        for p in numba.prange(nparts):
            i_first = p * N // nparts
            i_last = (p + 1) * N // nparts
            gBt = parts_B[p]
            gA = parts_A[p]
            if with_grad:
                gBt[:, :] = 0.0
                gA[:, :] = 0.0
            buf = np.empty((ROWS, m), dtype=Z0.dtype)
            ebuf = np.empty(m if mode == CLASS else 1, dtype=np.float64)
            pk = np.zeros((ROWS, r4), dtype=Z0.dtype)  # P of the group
            qk = np.zeros((ROWS, r4), dtype=Z0.dtype)  # Delta B of the group
            loss_sum = 0.0  # float64 accumulators
            d_sq = 0.0
            for i0 in range(i_first, i_last, ROWS):
                nr = min(ROWS, i_last - i0)
                # rows past the part's end read its last row; their Delta is set to 0 below
                x0 = X[i0]
                x1 = X[min(i0 + 1, i_last - 1)]
                x2 = X[min(i0 + 2, i_last - 1)]
                x3 = X[min(i0 + 3, i_last - 1)]
                # ---- phase 0: P = X A^T for the 4 rows, one rank at a time
                for k in range(r4):
                    a = A[k]
                    s0 = s1 = s2 = s3 = zero
                    for j in range(n):
                        w = a[j]
                        s0 += x0[j] * w
                        s1 += x1[j] * w
                        s2 += x2[j] * w
                        s3 += x3[j] * w
                    pk[0, k] = s0
                    pk[1, k] = s1
                    pk[2, k] = s2
                    pk[3, k] = s3
                # ---- phase 1: z = Z0 + P Bt, 4 ranks at a time
                for ii in range(ROWS):
                    row = buf[ii]
                    z0 = Z0[min(i0 + ii, i_last - 1)]
                    for k in range(0, r4, 4):
                        p0, p1, p2, p3 = pk[ii, k], pk[ii, k + 1], pk[ii, k + 2], pk[ii, k + 3]
                        b0, b1, b2, b3 = Bt[k], Bt[k + 1], Bt[k + 2], Bt[k + 3]
                        if k == 0:
                            for j in range(m):
                                row[j] = z0[j] + p0 * b0[j] + p1 * b1[j] + p2 * b2[j] + p3 * b3[j]
                        else:
                            for j in range(m):
                                row[j] += p0 * b0[j] + p1 * b1[j] + p2 * b2[j] + p3 * b3[j]
                # ---- the loss: value into J, Delta = dloss/dz into buf (rounded to the dtype)
                for ii in range(ROWS):
                    i = i0 + ii
                    row = buf[ii]
                    if ii >= nr:
                        row[:] = 0.0  # past the part: adds nothing
                        continue
                    if mode == CLASS:
                        # logsumexp(z) - z_y with the max subtracted: every exp <= 1, sum >= 1
                        mx = row[0]
                        for j in range(1, m):
                            mx = max(mx, row[j])
                        s = 0.0
                        for j in range(m):
                            e = math.exp(np.float64(row[j]) - mx)
                            ebuf[j] = e
                            s += e
                        c = cls[i]
                        loss_sum += math.log(s) - (np.float64(row[c]) - mx)
                        inv = 1.0 / s
                        for j in range(m):
                            row[j] = ebuf[j] * inv  # softmax(z)_j
                        row[c] = ebuf[c] * inv - 1.0  # - e_y
                        for j in range(m):
                            g = np.float64(row[j])
                            d_sq += g * g
                    else:
                        for j in range(m):
                            y = Yl[i, j] if mode == LABEL else row[j]
                            value, grad = pointwise(row[j], y, delta)
                            row[j] = grad
                            g = np.float64(row[j])
                            loss_sum += value
                            d_sq += g * g
                    if store:
                        D[i, :] = row
                if not with_grad:
                    continue
                # ---- phases 2 and 3 in one sweep per rank k, sharing the loads of Delta:
                #   qk[rows, k] = Delta[rows] . Bt[k]          (Delta B)
                #   gBt[k, :]  += P[rows, k]^T Delta[rows]     (P^T Delta)
                t0, t1, t2, t3 = buf[0], buf[1], buf[2], buf[3]
                for k in range(r4):
                    b = Bt[k]
                    out = gBt[k]
                    q0, q1, q2, q3 = pk[0, k], pk[1, k], pk[2, k], pk[3, k]
                    s0 = s1 = s2 = s3 = zero
                    for j in range(m):
                        y0, y1, y2, y3 = t0[j], t1[j], t2[j], t3[j]
                        x = b[j]
                        s0 += y0 * x
                        s1 += y1 * x
                        s2 += y2 * x
                        s3 += y3 * x
                        out[j] += q0 * y0 + q1 * y1 + q2 * y2 + q3 * y3
                    qk[0, k] = s0
                    qk[1, k] = s1
                    qk[2, k] = s2
                    qk[3, k] = s3
                # ---- phase 4: gA += (Delta B)^T X for the 4 rows (rows past the part have
                # Delta = 0, so qk = 0 there)
                for k in range(r4):
                    out = gA[k]
                    q0, q1, q2, q3 = qk[0, k], qk[1, k], qk[2, k], qk[3, k]
                    for j in range(n):
                        out[j] += q0 * x0[j] + q1 * x1[j] + q2 * x2[j] + q3 * x3[j]
            scalars[p, 0] = loss_sum
            scalars[p, 1] = d_sq

    return numba.njit(parallel=True, fastmath=FASTMATH, nogil=True)(kernel)


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True)
def merge(parts, out):
    """out = the sum of the parts' partials (parts[p] has out's shape), in part order."""
    out[:, :] = parts[0]
    for p in range(1, parts.shape[0]):
        part = parts[p]
        for k in range(out.shape[0]):
            for j in range(out.shape[1]):
                out[k, j] += part[k, j]


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True)
def sq_sum(a):
    """sum of a_ij^2 in float64, in a fixed order (a 2-D array)."""
    s = 0.0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            x = np.float64(a[i, j])
            s += x * x
    return s


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True)
def frob_dot(M, K):
    """<M, K> = sum_ij M_ij K_ij in float64, in a fixed order."""
    s = 0.0
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            s += np.float64(M[i, j]) * np.float64(K[i, j])
    return s


# -- the exact norm of small problems, serial (BLAS would wake its threads for each product) --

@numba.njit(fastmath=FASTMATH, nogil=True, cache=True)
def gram_norm_sq(D, K):
    """<D D^T, K> = sum_ab (D_a . D_b) K_ab in float64, K symmetric: each pair a > b once."""
    N, m = D.shape
    s = 0.0
    for a in range(N):
        da = D[a]
        for b in range(a + 1):
            db = D[b]
            dot = 0.0
            for j in range(m):
                dot += np.float64(da[j]) * np.float64(db[j])
            s += (dot if a == b else 2.0 * dot) * K[a, b]
    return s


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True)
def tiles_norm_sq(D, X, tile):
    """||D^T X||_F^2 from m x tile blocks of D^T X, each summed over the rows, squared and
    discarded (float64 accumulation)."""
    N, m = D.shape
    n = X.shape[1]
    T = np.empty((m, tile), dtype=np.float64)
    s = 0.0
    for j0 in range(0, n, tile):
        w = min(tile, n - j0)
        T[:, :w] = 0.0
        for i in range(N):
            x = X[i, j0:j0 + w]
            for c in range(m):
                d = np.float64(D[i, c])
                t = T[c]
                for j in range(w):
                    t[j] += d * x[j]
        for c in range(m):
            for j in range(w):
                s += T[c, j] * T[c, j]
    return s
