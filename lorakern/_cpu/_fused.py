"""The fused pass over the work units (the template of the generated kernels).

kernels.fused_kernel() copies this file into a cache folder with the block between the
"generated" markers replaced by one loss's scalar function and the layout constants, and
imports the copy, so that Numba's ``cache=True`` finds the compiled kernel in the next
process. As it stands the module is the squared loss, residual layout, no mask (its block
below), and is importable and usable as such. See kernels.py for the memory plan.
"""
import math  # noqa: F401  (the generated loss functions call math.exp, ...)

import numba
import numpy as np

from lorakern._cpu.kernels import (FASTMATH, PORTABLE_PHASES, SIMD_PHASES, _log1p,  # noqa: F401
                                   merge_panel, merge_tile)
from lorakern._cpu.simd import atomic_add, lanes

# ---- generated: begin
LABELS = False   # the data are W0 and the labels Y are read (z = W0 + BA), else R (d = R + BA)
MASKED = False   # entries where mask == 0 add nothing
USE_SIMD = True  # the AVX2/FMA micro-kernels, else the portable loops

from lorakern._cpu.kernels import squared_pointwise as pointwise  # noqa: E402
# ---- generated: end

phase1, phase2, phase3 = SIMD_PHASES if USE_SIMD else PORTABLE_PHASES


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True)
def work(data, labels_y, mask, Bp, Ap, Apk, delta, geometry, prefetch_rows, with_grad,
         counters, gB_parts, gA_parts, scalars, grad_B, grad_A, norms):
    """One worker of the fused pass: takes units from ``counters[0]`` until none is left.

    matrix.py runs several at once, each on a thread of its own (nogil): every one of them
    computes loss, ||G||^2, grad_B, grad_A and the norms for the units it takes.

    geometry = (unit_rows, unit_cols, block_rows, chunk); units are numbered column tile
    major, u = q * npanels + p, so that the units two threads run at once are in different
    row panels and write different partials of grad_A (numbered row panel major, two
    threads wrote neighbouring columns of one partial, and two threads took 25 % more CPU
    time than one). ``Apk``: Ap packed for phase 1 (kernels.pack_groups), as a
    (groups r4) x 3 L matrix. ``prefetch_rows`` > 0: phase 1 prefetches the data that many rows
    ahead (0: no prefetch). ``counters`` (int64[1 + ntiles + npanels], zeros): [0] hands
    out the units; [1 + q] and [1 + ntiles + p] count the finished units of tile q and
    panel p.

    Unit (p, q) writes scalars[u] = (loss, ||G||^2), gB_parts[q][its rows] and
    gA_parts[p][:, its columns]. The thread that finishes the last unit of tile q adds the
    panels' partials of its columns into grad_A (in panel order) and writes their norms to
    norms[q]; the one that finishes panel p's does the same for its rows of grad_B and
    norms[ntiles + p]. So no second parallel pass (and no second wait for a slow thread) is
    needed, and the sums are in a fixed order whoever did them.
    """
    m, n = data.shape
    unit_rows, unit_cols, block_rows, chunk = geometry
    npanels = (m + unit_rows - 1) // unit_rows
    ntiles = (n + unit_cols - 1) // unit_cols
    nunits = npanels * ntiles
    G = np.empty((block_rows, chunk), dtype=data.dtype)
    while True:
        u = atomic_add(counters, 0, 1)
        if u >= nunits:
            break
        q, p = u // npanels, u % npanels
        i0, i1 = p * unit_rows, min((p + 1) * unit_rows, m)
        j_end = min((q + 1) * unit_cols, n)
        gA, gB = gA_parts[p], gB_parts[q]
        loss_sum = 0.0  # float64 accumulators
        g_sq = 0.0
        for b0 in range(i0, i1, block_rows):
            for j0 in range(q * unit_cols, j_end, chunk):
                w = min(chunk, j_end - j0)
                # the SIMD phases 2 and 3 work on 3 vectors of columns at a time
                wpad = -(-w // (3 * lanes(G))) * 3 * lanes(G) if USE_SIMD else w
                phase1(G, data, Bp, Ap, Apk, b0, block_rows, j0, w, wpad, m, prefetch_rows)
                # ---- pointwise: loss value and G = dL/dZ; G = 0 off the mask and past m
                for ii in range(block_rows):
                    i = b0 + ii
                    row = G[ii]
                    if i >= m:
                        row[:wpad] = 0.0
                        continue
                    for jj in range(w):
                        y = labels_y[i, j0 + jj] if LABELS else row[jj]
                        value, grad = pointwise(row[jj], y, delta)
                        if MASKED:
                            # multiply by the 0/1 mask instead of branching: the loop
                            # stays vectorisable (a branch here cost 1.5-2x)
                            keep = np.float64(mask[i, j0 + jj])
                            value = value * keep
                            grad = grad * keep
                        row[jj] = grad  # rounded to the data's dtype
                        g = np.float64(row[jj])
                        loss_sum += value
                        g_sq += g * g
                if with_grad:
                    phase2(G, Ap, gB, b0, block_rows, j0, wpad, j0 == q * unit_cols)
                    phase3(G, Bp, gA, b0, block_rows, j0, wpad, b0 == i0)
        scalars[u, 0] = loss_sum
        scalars[u, 1] = g_sq
        if with_grad:
            # the atomic increments order the partials' stores before the merge's loads
            if atomic_add(counters, 1 + q, 1) == npanels - 1:
                merge_tile(gA_parts, Ap, grad_A, q * unit_cols, j_end, norms[q])
            if atomic_add(counters, 1 + ntiles + p, 1) == ntiles - 1:
                merge_panel(gB_parts, Bp, grad_B, i0, i1, norms[ntiles + p])
