"""One worker of the linear kind's fused sweep (the template of the generated kernels).

linear_kernels.sweep_kernel() copies this file into the cache folder with the block between
the "generated" markers replaced by one loss's scalar function and mode, and imports the
copy, so that Numba's ``cache=True`` finds the compiled sweep in the next process (as
kernels.fused_kernel does for the matrix kind). As it stands the module is the squared loss
and is importable and usable as such. See linear_kernels.py for the memory plan.
"""
import math  # noqa: F401  (the generated loss functions call math.exp, ...)

import numba
import numpy as np

from lorakern._cpu.kernels import FASTMATH, _log1p  # noqa: F401
from lorakern._cpu.linear_kernels import CLASS, LABEL, ROWS
from lorakern._cpu.simd import atomic_add

# ---- generated: begin
MODE = 0  # linear_kernels.RESIDUAL (squared, huber), LABEL (logistic) or CLASS (softmax)

from lorakern._cpu.kernels import squared_pointwise as pointwise  # noqa: E402
# ---- generated: end


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True)
def work(counter, X, Z0, Yl, cls, A, Bt, delta, zero, with_grad, store, D, parts_B, parts_A,
         scalars):
    """One worker of the sweep: takes row parts from ``counter[0]`` until none is left.

    workers.run runs several at once, each on a thread of its own (nogil). Part p (rows
    p N / nparts up to (p + 1) N / nparts) writes its own partials parts_B[p] (r4 x m,
    P^T Delta) and parts_A[p] (r4 x n, (Delta B)^T X) and scalars[p] = (J_p, ||Delta_p||^2);
    linear_kernels.merge adds them in part order, so the bits do not depend on which worker
    ran which part. A row-wise loss (CLASS) uses the squared loss's scalar function only to
    type the kernel.
    """
    N, m = Z0.shape
    n = X.shape[1]
    r4 = Bt.shape[0]
    nparts = scalars.shape[0]
    buf = np.empty((ROWS, m), dtype=Z0.dtype)
    ebuf = np.empty(m if MODE == CLASS else 1, dtype=np.float64)
    pk = np.zeros((ROWS, r4), dtype=Z0.dtype)  # P of the group
    qk = np.zeros((ROWS, r4), dtype=Z0.dtype)  # Delta B of the group
    while True:
        p = atomic_add(counter, 0, 1)
        if p >= nparts:
            break
        i_first = p * N // nparts
        i_last = (p + 1) * N // nparts
        gBt = parts_B[p]
        gA = parts_A[p]
        if with_grad:
            gBt[:, :] = 0.0
            gA[:, :] = 0.0
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
                pk[0, k], pk[1, k], pk[2, k], pk[3, k] = s0, s1, s2, s3
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
                if MODE == CLASS:
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
                        y = Yl[i, j] if MODE == LABEL else row[j]
                        value, grad = pointwise(row[j], y, delta)
                        row[j] = grad
                        g = np.float64(row[j])
                        loss_sum += value
                        d_sq += g * g
                if store:
                    for j in range(m):  # a loop, not D[i, :] = row (kernels.COPY_BY_LOOP)
                        D[i, j] = row[j]
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
                qk[0, k], qk[1, k], qk[2, k], qk[3, k] = s0, s1, s2, s3
            # ---- phase 4: gA += (Delta B)^T X for the 4 rows (rows past the part have
            # Delta = 0, so qk = 0 there)
            for k in range(r4):
                out = gA[k]
                q0, q1, q2, q3 = qk[0, k], qk[1, k], qk[2, k], qk[3, k]
                for j in range(n):
                    out[j] += q0 * x0[j] + q1 * x1[j] + q2 * x2[j] + q3 * x3[j]
        scalars[p, 0] = loss_sum
        scalars[p, 1] = d_sq
