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
  data (2 m n r flops, one read of R); the launcher gets the rest from r x r Gram matrices.
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
    """partial[b, 0] = sum over block b's rows of R_i . (gB_i gA), in float64 per row."""
    m, n = R.shape
    r = gB.shape[1]
    nblocks = partial.shape[0]
    while True:
        b = atomic_add(counter, 0, 1)
        if b >= nblocks:
            break
        acc = 0.0
        for i in range(b * block_rows, min((b + 1) * block_rows, m)):
            for k in range(r):
                s = 0.0  # float64: the n products of R[i] and gA[k]
                for j in range(n):
                    s += R[i, j] * gA[k, j]
                acc += gB[i, k] * s
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
