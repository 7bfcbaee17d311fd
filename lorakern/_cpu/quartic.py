"""Numba kernels of the exact line search's pass (matrix kind, squared loss).

J(B - eta gB, A - eta gA) = J - eta ||grad J||^2 + a2 eta^2 + a3 eta^3 + a4 eta^4 with
D = R + BA, P = gB A + B gA, Q = gB gA (reference.matrix.line_quartic). The workers
(workers.run: threads of a pool kept between passes, whose idle threads sleep) take blocks of
QUARTIC_ROWS rows from an atomic counter; each block writes its float64 partial sums to its
own row of ``partial``, which the launcher adds in block order: the bits depend on the shape,
never on the thread count. (BLAS would do the unmasked GEMM faster alone, but its threads
spin for ~0.1 s after each call, on the cores of the fused pass that follows: 2.8 ms per
step instead of 0.9 at the demo's 512 x 384, r = 8; see benchmarks/NOTES.md.)

* ``rq_work`` (no mask): only <R, Q> = sum_i sum_k gB[i, k] <R[i, :], gA[k, :]> touches the
  data (2 m n r flops, one read of R, as a loss-only pass); the launcher gets the rest from
  r x r Gram matrices.
* ``masked_work``: per row, d, p and q over the columns (8 n r flops), and the three sums
  sum M (p^2 / 2 + d q), sum M p q, sum M q^2.
"""
from __future__ import annotations

import numba
import numpy as np

from .kernels import FASTMATH
from .simd import atomic_add

#: rows a worker takes at a time (partial sums per block: the order is fixed by the shape)
QUARTIC_ROWS = 64


@numba.njit(nogil=True, fastmath=FASTMATH, cache=True)
def rq_work(R, gB, gA, block_rows, counter, partial):
    """partial[b, 0] = sum over block b's rows i of sum_k gB[i, k] <R[i], gA[k]>.

    Rows go 4 at a time, so that each element of gA read from cache serves 4 rows; the rows
    after a block's last group of 4 (m mod 4 of them in the last block when block_rows is a
    multiple of 4) go one at a time. Every dot product <R[i], gA[k]>, in either loop, adds up
    in the data's dtype (vectorised; reassociated by fastmath); the rest (gB[i, k] times the
    dot product, and the block's sum) in float64. In float32 the coefficient a2 came within
    1e-9 of the reference's at 2048^2, r = 16, and the pass took 4.1 ms against 6.1 ms with
    float64 dot products (which halve the SIMD lanes) and 2.7 ms for a loss-only pass (the
    same machine, minutes apart, loaded). Summing 256-column chunks in float32 and those in
    float64 was 20x slower: Numba did not vectorise it. One rule for every row: the leftover
    rows are too few to make the pass faster or the total more accurate in float64 (its
    error is that of the float32 dot products of the other rows), and a row's rounding
    then does not depend on its index mod 4."""
    m, n = R.shape
    r = gB.shape[1]
    nblocks = partial.shape[0]
    while True:
        b = atomic_add(counter, 0, 1)
        if b >= nblocks:
            break
        acc = 0.0
        i1 = min((b + 1) * block_rows, m)
        i = b * block_rows
        zero = R[i, 0] * np.float32(0.0)  # 0 in the data's dtype (R is finite)
        while i + 4 <= i1:
            for k in range(r):
                s0 = zero
                s1 = zero
                s2 = zero
                s3 = zero
                for j in range(n):
                    g = gA[k, j]
                    s0 += R[i, j] * g
                    s1 += R[i + 1, j] * g
                    s2 += R[i + 2, j] * g
                    s3 += R[i + 3, j] * g
                acc += (np.float64(gB[i, k]) * np.float64(s0)
                        + np.float64(gB[i + 1, k]) * np.float64(s1)
                        + np.float64(gB[i + 2, k]) * np.float64(s2)
                        + np.float64(gB[i + 3, k]) * np.float64(s3))
            i += 4
        while i < i1:  # the rows after the last group of 4: the same sums, one row
            for k in range(r):
                s = zero
                for j in range(n):
                    s += R[i, j] * gA[k, j]
                acc += np.float64(gB[i, k]) * np.float64(s)
            i += 1
        partial[b, 0] = acc


@numba.njit(nogil=True, fastmath=FASTMATH, cache=True)
def masked_work(R, mask, B, A, gB, gA, block_rows, counter, partial):
    """partial[b] = (sum M (p^2/2 + d q), sum M p q, sum M q^2) over block b's rows."""
    m, n = R.shape
    r = B.shape[1]
    nblocks = partial.shape[0]
    d = np.empty(n, np.float64)
    p = np.empty(n, np.float64)
    q = np.empty(n, np.float64)
    while True:
        b = atomic_add(counter, 0, 1)
        if b >= nblocks:
            break
        s2 = 0.0
        s3 = 0.0
        s4 = 0.0
        for i in range(b * block_rows, min((b + 1) * block_rows, m)):
            for j in range(n):
                d[j] = R[i, j]
                p[j] = 0.0
                q[j] = 0.0
            for k in range(r):
                bik, gik = np.float64(B[i, k]), np.float64(gB[i, k])
                for j in range(n):
                    a, ga = np.float64(A[k, j]), np.float64(gA[k, j])
                    d[j] += bik * a
                    p[j] += gik * a + bik * ga
                    q[j] += gik * ga
            for j in range(n):
                if mask[i, j]:
                    s2 += 0.5 * p[j] * p[j] + d[j] * q[j]
                    s3 += p[j] * q[j]
                    s4 += q[j] * q[j]
        partial[b, 0] = s2
        partial[b, 1] = s3
        partial[b, 2] = s4
