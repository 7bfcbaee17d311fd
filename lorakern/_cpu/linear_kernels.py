"""Numba kernels of the linear kind: one sweep over the rows of X and Z0, and the norms' sums.

Memory plan of the sweep (``sweep_kernel``, from the template _linear_sweep.py). The rows
are cut into ``nparts`` contiguous parts (a number fixed by N alone, not by the thread
count), which the workers (workers.run: threads of a pool kept between passes) take from an
atomic counter. A part walks its rows in groups of ROWS = 4 and, per group, reads 4 rows of X and of Z0 once:

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
Each loss compiles once per machine (the generated module is kept in the cache folder, so
the next process finds the compiled sweep on disk); the launcher runs small problems on one
worker, where waking the others costs more than the work.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numba
import numpy as np

from . import kernels
from .kernels import FASTMATH
from ..losses import LOSSES

ROWS = 4  # rows per group: phases 2+3 do 8 multiply-adds per 6 loads (as in kernels.py)

RESIDUAL, LABEL, CLASS = 0, 1, 2


def mode_of(loss) -> int:
    """RESIDUAL (squared, huber: buf holds d = z - y), LABEL (logistic) or CLASS (softmax)."""
    if loss.labels == "class":
        return CLASS
    return LABEL if loss.labels else RESIDUAL


_TEMPLATE = Path(__file__).with_name("_linear_sweep.py")


@lru_cache(maxsize=None)
def sweep_kernel(loss):
    """One worker of the fused sweep for one loss (see the module's memory plan and
    _linear_sweep.py), compiled once per machine: _linear_sweep.py with the loss pasted in,
    written to the cache folder and imported, as kernels.fused_kernel does."""
    mode = mode_of(loss)
    # a row-wise loss has no scalar body; the squared one stands in so the kernel types
    scalar = LOSSES["squared"] if mode == CLASS else loss
    source = kernels.generated_source(_TEMPLATE, scalar, {"MODE": mode}, label=loss.name)
    slug = re.sub(r"\W", "_", loss.name)
    name = f"lorakern_linear_{slug}_{kernels.fingerprint(source, [Path(__file__)])}"
    return kernels.load_generated(name, source)


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True)
def merge(parts, out):
    """out = the sum of the parts' partials (parts[p] has out's shape), in part order."""
    first = parts[0]
    for k in range(out.shape[0]):  # loops, not out[:, :] = parts[0] (kernels.COPY_BY_LOOP)
        for j in range(out.shape[1]):
            out[k, j] = first[k, j]
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
def block_dot(S, K, i0, j0):
    """<S, K[i0:, j0:] (S's shape)> in float64, in a fixed order: a block of <M, K>."""
    s = 0.0
    for i in range(S.shape[0]):
        for j in range(S.shape[1]):
            s += np.float64(S[i, j]) * K[i0 + i, j0 + j]
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


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True)
def moments_norm_sq(C0, S, B, A):
    """||C0 + B (A S)||_F^2 in float64, serial (all float64): A S (r x n) first, then one
    row of C0 + B (A S) at a time, squared and summed in a fixed order."""
    m, n = C0.shape
    r = A.shape[0]
    AS = np.zeros((r, n))
    for k in range(r):
        for l in range(n):
            a = A[k, l]
            for j in range(n):
                AS[k, j] += a * S[l, j]
    row = np.empty(n)
    s = 0.0
    for i in range(m):
        for j in range(n):
            row[j] = C0[i, j]
        for k in range(r):
            b = B[i, k]
            for j in range(n):
                row[j] += b * AS[k, j]
        for j in range(n):
            s += row[j] * row[j]
    return s
