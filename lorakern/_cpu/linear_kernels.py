"""Numba kernels of the linear kind: one sweep over the rows of Z0, and the norms' sums.

Memory plan of the sweep (``sweep_kernel``). The caller has formed P = X A^T (N x r4, BLAS);
the rows are cut into ``nparts`` contiguous parts (a number fixed by N alone, not by the
thread count), one prange iteration each. A part walks its rows in groups of ROWS = 4:

    buf[4, m] = Z0[rows] + P[rows] Bt                   phase 1: z_i = x_i W0^T (+ B A x_i)
    value, Delta = loss(buf)  -> J, ||Delta||_F^2 (float64); Delta written back into buf
    D[rows] = buf                                        only when the exact norm needs Delta
    Q[rows, k]  = buf . Bt[k]           (Delta B)        phase 2
    part[k, :] += P[rows, k]^T buf      (P^T Delta)      phase 3, same sweep over buf

Bt = B^T (r4 x m) and the part's r4 x m partial stay in cache while the groups pass; Z0 is
read once. Nothing N x m is written except D (for the exact norm). ``merge`` adds the
parts in part order, so the bits depend on N and the tuning constants, never on the thread
count or the schedule. r is padded with zeros to r4 (a multiple of 4): zero columns of P and
rows of Bt add nothing; rows past a part's end are zero in buf and in P's copy.

The loss is a closure constant: an entrywise loss from losses.LOSSES inlined per entry
(its generated scalar function, as the matrix kind's kernels use it), or the row-wise
softmax cross-entropy written out below (max, exp once per entry into a float64 row, sum).
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

    @numba.njit(parallel=True, fastmath=FASTMATH, nogil=True)
    def kernel(Z0, Yl, cls, P, Bt, delta, zero, with_grad, store, D, Q, parts, scalars):
        N, m = Z0.shape
        r4 = Bt.shape[0]
        nparts = scalars.shape[0]
        for p in numba.prange(nparts):
            i_first = p * N // nparts
            i_last = (p + 1) * N // nparts
            part = parts[p]
            if with_grad:
                part[:, :] = 0.0
            buf = np.empty((ROWS, m), dtype=Z0.dtype)
            ebuf = np.empty(m if mode == CLASS else 1, dtype=np.float64)
            pk = np.zeros((ROWS, r4), dtype=Z0.dtype)  # P of the group; zero past the part
            loss_sum = 0.0  # float64 accumulators
            d_sq = 0.0
            for i0 in range(i_first, i_last, ROWS):
                nr = min(ROWS, i_last - i0)
                # ---- phase 1: z = Z0 + P Bt, 4 ranks at a time
                for ii in range(ROWS):
                    row = buf[ii]
                    if ii >= nr:
                        row[:] = 0.0
                        pk[ii, :] = 0.0
                        continue
                    i = i0 + ii
                    pk[ii, :] = P[i, :]
                    z0 = Z0[i]
                    for k in range(0, r4, 4):
                        p0, p1, p2, p3 = P[i, k], P[i, k + 1], P[i, k + 2], P[i, k + 3]
                        b0, b1, b2, b3 = Bt[k], Bt[k + 1], Bt[k + 2], Bt[k + 3]
                        if k == 0:
                            for j in range(m):
                                row[j] = z0[j] + p0 * b0[j] + p1 * b1[j] + p2 * b2[j] + p3 * b3[j]
                        else:
                            for j in range(m):
                                row[j] += p0 * b0[j] + p1 * b1[j] + p2 * b2[j] + p3 * b3[j]
                # ---- the loss: value into J, Delta = dloss/dz into buf (rounded to the dtype)
                for ii in range(nr):
                    i = i0 + ii
                    row = buf[ii]
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
                # ---- phases 2 and 3 in one sweep per rank k, sharing the loads of Delta
                t0, t1, t2, t3 = buf[0], buf[1], buf[2], buf[3]
                for k in range(r4):
                    b = Bt[k]
                    out = part[k]
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
                    if nr > 0:
                        Q[i0, k] = s0
                    if nr > 1:
                        Q[i0 + 1, k] = s1
                    if nr > 2:
                        Q[i0 + 2, k] = s2
                    if nr > 3:
                        Q[i0 + 3, k] = s3
            scalars[p, 0] = loss_sum
            scalars[p, 1] = d_sq

    return kernel


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True)
def merge(parts, out):
    """out = the sum of the parts' r4 x m partials of P^T Delta, in part order."""
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
