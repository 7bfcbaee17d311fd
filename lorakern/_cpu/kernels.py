"""Numba kernels for the fused LoRA step.

Memory plan. Rows are split into ``nchunks`` contiguous chunks, one per thread (prange).
A chunk walks its rows in groups of ROWS = 4 and the columns in tiles of ``tile`` columns,
tile-major, so that the tile of A and the chunk's partial grad_A for that tile stay in
cache (L2) while every row group of the chunk passes over them:

    t[4, tile]  = R[rows, tile] + B[rows, :] @ A[:, tile]        (phase 1: 2*4*tile*r flops)
    value, G    = loss(t)          -> loss, ||G||^2 in float64     (pointwise)
    grad_B[rows, :]  += G @ A[:, tile]^T                           (phase 2)
    grad_A_part[:, tile] += B[rows, :]^T @ G                       (phase 3, same sweep)

R is read from memory exactly once; the three phases are 6 m n r flops in all, the same
as the three matrix products of the unfused step, but with no m x n temporary.

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

ROWS = 4  # rows per group: phases 2+3 do 8 FMAs per 6 loads (4 of G, 1 of A, 1 of grad_A)
# reassociation lets LLVM vectorise the dot products of phase 2; no 'nnan'/'ninf', so
# non-finite values propagate and the driver can see them
FASTMATH = {"reassoc", "contract", "nsz"}


@numba.njit(inline="always")  # no fast-math: (1 + x) - 1 must not be simplified to x
def _log1p(x):
    """log(1 + x) to a few ulps with one log (Goldberg 1991, Theorem 4): libm's log1p
    takes 14 ns per call here against 6 for log, and the logistic loss calls it per entry."""
    u = 1.0 + x
    return x if u == 1.0 else math.log(u) * (x / (u - 1.0))


#: libm calls in the generated scalar code replaced by faster equivalents
_SCALAR_REPLACEMENTS = {"math.log1p(": "_log1p("}


def _compile_loss(loss):
    """The loss's scalar (value, grad) function, compiled by Numba for inlining."""
    source = loss.scalar_source("pointwise")
    for slow, fast in _SCALAR_REPLACEMENTS.items():
        source = source.replace(slow, fast)
    namespace = {"math": math, "_log1p": _log1p}
    exec(source, namespace)
    return numba.njit(inline="always", fastmath=FASTMATH)(namespace["pointwise"])


@lru_cache(maxsize=None)
def fused_kernel(loss, labels: bool, masked: bool):
    """The fused pass for one loss and data layout.

    ``labels``: the data are W0 and Y (z = W0 + BA) instead of R (d = R + BA).
    ``masked``: entries with mask == 0 add nothing. These two are closure constants, so
    Numba compiles each combination separately and the branches on them cost nothing.
    The kernel's ``with_grad`` argument is a run-time flag (one branch per row group):
    False gives the loss-only pass (phase 1 and the loss; no gradients) used by line
    searches and for J(V_T), without compiling a second kernel.
    """
    pointwise = _compile_loss(loss)

    @numba.njit(parallel=True, fastmath=FASTMATH, nogil=True)
    def kernel(data, labels_y, mask, Bp, Ap, delta, tile, zero, with_grad, grad_B, grad_A_parts, scalars):
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
                    # ---- phase 1: t = R + B A for the 4 rows x w columns, two rows at a
                    # time and 4 ranks at a time (8 B values + 4 A values + 2 rows fit the
                    # 16 vector registers of AVX2); the first rank group reads R itself,
                    # so R is loaded once. Rows past m read row m - 1 (G is zeroed below).
                    for ip in range(0, ROWS, 2):
                        ia, ib = i0 + ip, i0 + ip + 1
                        ta, tb = buf[ip], buf[ip + 1]
                        ra = data[min(ia, m - 1), j0:j0 + w]
                        rb = data[min(ib, m - 1), j0:j0 + w]
                        for k in range(0, r4, 4):
                            ba0, ba1, ba2, ba3 = Bp[ia, k], Bp[ia, k + 1], Bp[ia, k + 2], Bp[ia, k + 3]
                            bb0, bb1, bb2, bb3 = Bp[ib, k], Bp[ib, k + 1], Bp[ib, k + 2], Bp[ib, k + 3]
                            a0, a1 = Ap[k, j0:j0 + w], Ap[k + 1, j0:j0 + w]
                            a2, a3 = Ap[k + 2, j0:j0 + w], Ap[k + 3, j0:j0 + w]
                            if k == 0:
                                for jj in range(w):
                                    x0, x1, x2, x3 = a0[jj], a1[jj], a2[jj], a3[jj]
                                    ta[jj] = ra[jj] + ba0 * x0 + ba1 * x1 + ba2 * x2 + ba3 * x3
                                    tb[jj] = rb[jj] + bb0 * x0 + bb1 * x1 + bb2 * x2 + bb3 * x3
                            else:
                                for jj in range(w):
                                    x0, x1, x2, x3 = a0[jj], a1[jj], a2[jj], a3[jj]
                                    ta[jj] += ba0 * x0 + ba1 * x1 + ba2 * x2 + ba3 * x3
                                    tb[jj] += bb0 * x0 + bb1 * x1 + bb2 * x2 + bb3 * x3
                    t0, t1, t2, t3 = buf[0], buf[1], buf[2], buf[3]
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
                            if masked:
                                # multiply by the 0/1 mask instead of branching: the loop
                                # stays vectorisable (a branch here cost 1.5-2x)
                                keep = np.float64(mask[i, j0 + jj])
                                value = value * keep
                                grad = grad * keep
                            row[jj] = grad  # rounded to the data's dtype
                            g = np.float64(row[jj])
                            loss_sum += value
                            g_sq += g * g
                    if not with_grad:
                        continue
                    # ---- phases 2 and 3 in one sweep per rank k, sharing the loads of G:
                    #   grad_B[rows, k]    += G[rows, tile] . A[k, tile]     (G A^T)
                    #   grad_A_part[k, tile] += B[rows, k]^T G[rows, tile]   (B^T G)
                    # 8 FMAs per 6 loads and 1 store: bound by the FMA units, not by loads.
                    for k in range(r4):
                        b0, b1, b2, b3 = Bp[i0, k], Bp[i0 + 1, k], Bp[i0 + 2, k], Bp[i0 + 3, k]
                        a = Ap[k, j0:j0 + w]
                        out = grad_A[k, j0:j0 + w]
                        s0 = s1 = s2 = s3 = zero
                        for jj in range(w):
                            y0, y1, y2, y3 = t0[jj], t1[jj], t2[jj], t3[jj]
                            x = a[jj]
                            s0 += y0 * x
                            s1 += y1 * x
                            s2 += y2 * x
                            s3 += y3 * x
                            out[jj] += b0 * y0 + b1 * y1 + b2 * y2 + b3 * y3
                        grad_B[i0, k] += s0
                        grad_B[i0 + 1, k] += s1
                        grad_B[i0 + 2, k] += s2
                        grad_B[i0 + 3, k] += s3
            scalars[c, 0] = loss_sum
            scalars[c, 1] = g_sq

    return kernel


# cached on disk (saves ~3.5 s of a new process's first step). The fused kernels are not:
# they are closures over a generated loss function, whose pickled form differs in every
# process, so Numba would write a new cache entry each time and never hit it.
@numba.njit(fastmath=FASTMATH, nogil=True, cache=True)
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
