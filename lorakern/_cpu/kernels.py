"""Numba kernels for the fused LoRA step.

Memory plan. Rows are split into ``nchunks`` contiguous chunks, one per thread (prange).
A chunk walks its rows in groups of ROWS = 4 and the columns in tiles of ``tile`` columns,
tile-major, so that the tile of A and the chunk's partial grad_A for that tile stay in
cache while every row group of the chunk passes over them:

    t[4, tile]  = R[rows, tile] + B[rows, :] @ A[:, tile]        (phase 1: 2*4*tile*r flops)
    value, G    = loss(t)          -> loss, ||G||^2 in float64     (pointwise)
    grad_B[rows, :]  += G @ A[:, tile]^T                           (phase 2)
    grad_A_part[:, tile] += B[rows, :]^T @ G                       (phase 3)

G never exists beyond a 4 x tile buffer. Each chunk owns its rows of grad_B and its own
r x n partial of grad_A; ``merge`` adds the partials in chunk order, so the bits do not
depend on scheduling (they do depend on nchunks, i.e. on the thread count).

B and A arrive padded with zeros to r4 = r rounded up to 4 (and B to m4 rows): zero
columns of B / rows of A add nothing to G and get zero gradients, and the phases can be
unrolled by 4 over the rank with no remainder loop. Rows past m read row m-1 of the data
and are given G = 0, so they add nothing either.
"""
from __future__ import annotations

import math  # noqa: F401  (used by the generated loss functions)
from functools import lru_cache

import numba
import numpy as np

ROWS = 4  # rows per group: phase 3 does 4 FMAs per load/store of grad_A
# reassociation lets LLVM vectorise the dot products of phase 2; no 'nnan'/'ninf', so
# non-finite values propagate and the driver can see them
FASTMATH = {"reassoc", "contract", "nsz"}


def _compile_loss(loss):
    """The loss's scalar (value, grad) function, compiled by Numba for inlining."""
    namespace = {"math": math}
    exec(loss.scalar_source("pointwise"), namespace)
    return numba.njit(inline="always", fastmath=FASTMATH)(namespace["pointwise"])


@lru_cache(maxsize=None)
def fused_kernel(loss, labels: bool, masked: bool, with_grad: bool):
    """The fused pass for one loss and data layout.

    ``labels``: the data are W0 and Y (z = W0 + BA) instead of R (d = R + BA).
    ``masked``: entries with mask == 0 add nothing.  ``with_grad``: False gives the
    loss-only pass (phase 1 and the loss; no G, no gradients), used by line searches.
    The flags are closure constants, so Numba compiles each combination separately and
    the branches on them cost nothing.
    """
    pointwise = _compile_loss(loss)

    @numba.njit(parallel=True, fastmath=FASTMATH, nogil=True)
    def kernel(data, labels_y, mask, Bp, Ap, delta, tile, zero, grad_B, grad_A_parts, scalars):
        m, n = data.shape
        r4 = Ap.shape[0]
        nchunks = grad_A_parts.shape[0]
        ngroups = Bp.shape[0] // ROWS
        for c in numba.prange(nchunks):
            g_first = c * ngroups // nchunks
            g_last = (c + 1) * ngroups // nchunks
            grad_A = grad_A_parts[c]
            if with_grad:
                grad_A[:, :] = 0.0
            buf = np.empty((ROWS, tile), dtype=data.dtype)
            loss_sum = 0.0  # float64 accumulators
            g_sq = 0.0
            for j0 in range(0, n, tile):
                w = min(tile, n - j0)
                for grp in range(g_first, g_last):
                    i0 = grp * ROWS
                    # ---- phase 1: t = R + B A for 4 rows x w columns (rows past m clamp)
                    for ii in range(ROWS):
                        src = data[min(i0 + ii, m - 1), j0:j0 + w]
                        row = buf[ii]
                        for jj in range(w):
                            row[jj] = src[jj]
                    t0, t1, t2, t3 = buf[0], buf[1], buf[2], buf[3]
                    for k in range(0, r4, 4):
                        b00, b01, b02, b03 = Bp[i0, k], Bp[i0, k + 1], Bp[i0, k + 2], Bp[i0, k + 3]
                        b10, b11, b12, b13 = Bp[i0 + 1, k], Bp[i0 + 1, k + 1], Bp[i0 + 1, k + 2], Bp[i0 + 1, k + 3]
                        b20, b21, b22, b23 = Bp[i0 + 2, k], Bp[i0 + 2, k + 1], Bp[i0 + 2, k + 2], Bp[i0 + 2, k + 3]
                        b30, b31, b32, b33 = Bp[i0 + 3, k], Bp[i0 + 3, k + 1], Bp[i0 + 3, k + 2], Bp[i0 + 3, k + 3]
                        a0, a1 = Ap[k, j0:j0 + w], Ap[k + 1, j0:j0 + w]
                        a2, a3 = Ap[k + 2, j0:j0 + w], Ap[k + 3, j0:j0 + w]
                        for jj in range(w):
                            x0, x1, x2, x3 = a0[jj], a1[jj], a2[jj], a3[jj]
                            t0[jj] += b00 * x0 + b01 * x1 + b02 * x2 + b03 * x3
                            t1[jj] += b10 * x0 + b11 * x1 + b12 * x2 + b13 * x3
                            t2[jj] += b20 * x0 + b21 * x1 + b22 * x2 + b23 * x3
                            t3[jj] += b30 * x0 + b31 * x1 + b32 * x2 + b33 * x3
                    # ---- pointwise: loss value and G = dL/dZ; G = 0 off the mask and past m
                    for ii in range(ROWS):
                        row = buf[ii]
                        i = i0 + ii
                        if i >= m:
                            row[:w] = 0.0
                            continue
                        for jj in range(w):
                            y = labels_y[i, j0 + jj] if labels else row[jj]
                            value, grad = pointwise(row[jj], y, delta)
                            if masked and mask[i, j0 + jj] == 0:
                                value = 0.0
                                grad = 0.0
                            row[jj] = grad  # rounded to the data's dtype
                            g = np.float64(row[jj])
                            loss_sum += value
                            g_sq += g * g
                    if not with_grad:
                        continue
                    # ---- phase 2: grad_B[rows, k] += sum_j G[rows, j] A[k, j]
                    for k in range(0, r4, 2):
                        a0, a1 = Ap[k, j0:j0 + w], Ap[k + 1, j0:j0 + w]
                        s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = zero
                        for jj in range(w):
                            x0, x1 = a0[jj], a1[jj]
                            y0, y1, y2, y3 = t0[jj], t1[jj], t2[jj], t3[jj]
                            s00 += y0 * x0
                            s01 += y0 * x1
                            s10 += y1 * x0
                            s11 += y1 * x1
                            s20 += y2 * x0
                            s21 += y2 * x1
                            s30 += y3 * x0
                            s31 += y3 * x1
                        grad_B[i0, k] += s00
                        grad_B[i0, k + 1] += s01
                        grad_B[i0 + 1, k] += s10
                        grad_B[i0 + 1, k + 1] += s11
                        grad_B[i0 + 2, k] += s20
                        grad_B[i0 + 2, k + 1] += s21
                        grad_B[i0 + 3, k] += s30
                        grad_B[i0 + 3, k + 1] += s31
                    # ---- phase 3: grad_A[k, tile] += sum_i B[i, k] G[i, tile]
                    for k in range(r4):
                        b0, b1, b2, b3 = Bp[i0, k], Bp[i0 + 1, k], Bp[i0 + 2, k], Bp[i0 + 3, k]
                        out = grad_A[k, j0:j0 + w]
                        for jj in range(w):
                            out[jj] += b0 * t0[jj] + b1 * t1[jj] + b2 * t2[jj] + b3 * t3[jj]
            scalars[c, 0] = loss_sum
            scalars[c, 1] = g_sq

    return kernel


@numba.njit(fastmath=FASTMATH, nogil=True)
def merge(grad_A_parts, grad_A, grad_B, Bp, Ap, scalars, out):
    """grad_A = sum of the chunks' partials, in chunk order; the norms in float64.

    out = [loss, ||G||^2, ||grad_B||^2 + ||grad_A||^2, ||A||^2 + ||B||^2].
    """
    r4, n = grad_A.shape
    grad_A[:, :] = grad_A_parts[0]
    for c in range(1, grad_A_parts.shape[0]):
        part = grad_A_parts[c]
        for k in range(r4):
            for j in range(n):
                grad_A[k, j] += part[k, j]
    loss = 0.0
    g_sq = 0.0
    for c in range(scalars.shape[0]):
        loss += scalars[c, 0]
        g_sq += scalars[c, 1]
    grad_sq = 0.0
    v_sq = 0.0
    for k in range(r4):
        for j in range(n):
            grad_sq += np.float64(grad_A[k, j]) ** 2
            v_sq += np.float64(Ap[k, j]) ** 2
    for i in range(grad_B.shape[0]):
        for k in range(r4):
            grad_sq += np.float64(grad_B[i, k]) ** 2
            v_sq += np.float64(Bp[i, k]) ** 2
    out[0] = loss
    out[1] = g_sq
    out[2] = grad_sq
    out[3] = v_sq
