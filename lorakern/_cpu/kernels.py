"""Numba kernels for the fused LoRA step: the pieces, and the on-disk cache of the kernels.

Work units. The m x n data are cut into fixed units of ``unit_rows`` rows x ``unit_cols``
columns (matrix.geometry: about 64 units, a function of the shape, the rank and the dtype,
never of the thread count). Threads take units one at a time from an atomic counter, so a
thread whose core is busy for a while (another library's spinning threads, another
process) takes fewer units instead of holding up the step (benchmarks/NOTES.md). Unit
(p, q) writes its own partials: grad_A_part[p][:, its columns], grad_B_part[q][its rows].
The thread that finishes the last unit of column tile q adds grad_A's partials for those
columns in panel order (``merge_tile``), and likewise for row panel p (``merge_panel``):
the bits do not depend on the thread count or on which thread ran which unit.

Memory plan of one unit. It walks its rows in blocks of ``block_rows`` rows; for each block
and each chunk of ``chunk`` columns (the block of G stays in L1 between the phases):

    G[block, chunk] = R[block, chunk] + B[block, :] @ A[:, chunk]        phase 1  (2 r flops/entry)
    value, G        = loss(G)        -> loss, ||G||^2 in float64         pointwise
    grad_B_part[q][block, :]  (+)= G @ A[:, chunk]^T                     phase 2  (2 r)
    grad_A_part[p][:, chunk]  (+)= B[block, :]^T @ G                     phase 3  (2 r)

R is read from memory once (phase 1 prefetches the next block's rows); the phases are the
6 m n r flops of the three matrix products of the unfused step, with no m x n temporary.
Each phase has two implementations with the same arguments: SIMD micro-kernels (simd.py;
register blocks of 12 explicit AVX2 vectors and FMAs) and portable loops for CPUs without
AVX2/FMA. They round differently; each is deterministic on its own.

B and A arrive padded with zeros (B to the units' rows x r4, A to r4 x n rounded up to 24
columns; r4 = r rounded up to 4), so the phases need no remainder loops over the rank or in
phases 2 and 3. Rows past m read row m - 1 of the data and get G = 0; columns past n get
G = 0.

The kernel for a (loss, layout, SIMD or not) is generated from _fused.py with the loss's
scalar code pasted in, written as a module into a cache directory and imported, so that
Numba's ``cache=True`` finds it on disk in the next process (``fused_kernel``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import math  # noqa: F401  (used by the generated loss functions)
import os
import re
import sys
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import numba
import numpy as np

from . import simd
from .simd import lanes, prefetch, vbroadcast_at, vfma, vload, vstore, vsum, vzeros

# reassociation lets LLVM vectorise the portable loops' reductions; no 'nnan'/'ninf', so
# non-finite values propagate and the driver can see them
FASTMATH = {"reassoc", "contract", "nsz"}

#: The SIMD micro-kernels' register blocks: phase 1 4 rows x 3 vectors, phase 2 3 rows x 4
#: ranks, phase 3 4 ranks x 3 vectors. So the rows of a block come in multiples of
#: BLOCK_MULTIPLE = 12, a chunk's columns are padded to a multiple of 3 vectors (24 float32,
#: 12 float64; chunks are multiples of COLUMN_MULTIPLE = 24, which covers both), and r4 is a
#: multiple of 4.
BLOCK_MULTIPLE = 12
COLUMN_MULTIPLE = 24

#: True where this CPU has AVX2 and FMA: use the SIMD micro-kernels (tests switch it off)
SIMD = simd.available()


@numba.njit(inline="always")  # no fast-math: (1 + x) - 1 must not be simplified to x
def _log1p(x):
    """log(1 + x) to a few ulps with one log (Goldberg 1991, Theorem 4): libm's log1p
    takes 14 ns per call here against 6 for log, and the logistic loss calls it per entry."""
    u = 1.0 + x
    return x if u == 1.0 else math.log(u) * (x / (u - 1.0))


#: libm calls in the generated scalar code replaced by faster equivalents
_SCALAR_REPLACEMENTS = {"math.log1p(": "_log1p("}


def _scalar_source(loss, fname: str = "pointwise") -> str:
    source = loss.scalar_source(fname)
    for slow, fast in _SCALAR_REPLACEMENTS.items():
        source = source.replace(slow, fast)
    return source


# ---- phase 1: G[:, :w] = data[rows, j0:j0 + w] + Bp[b0:b0 + nb] @ Ap[:, j0:j0 + w] -----------
# rows past m read row m - 1 (the pointwise step zeroes them); G[:, w:wpad] = 0.
# Apk is Ap packed by groups of 3 vectors of columns (pack_groups): row g r4 + k holds
# Ap[k, 3 L g:3 L (g + 1)], so the rank loop of one register block reads r4 x 3 L contiguous
# values instead of r4 rows n apart (one page each: r = 64 ran at 61 % of the FMA peak
# unpacked, at 95-100 % packed; benchmarks/NOTES.md, v9).

@numba.njit(inline="always", fastmath=FASTMATH)
def _phase1_tail(G, data, Bp, Ap, b0, nb, j0, jfirst, w, wpad, m):
    """Columns [jfirst, w) with loops LLVM vectorises (the portable path's whole phase 1),
    then zeros up to wpad."""
    r4 = Ap.shape[0]
    for ii in range(nb):
        src = data[min(b0 + ii, m - 1)]
        row = G[ii]
        for jj in range(jfirst, w):
            row[jj] = src[j0 + jj]
        for k in range(0, r4, 4):
            b0k, b1k, b2k, b3k = Bp[b0 + ii, k], Bp[b0 + ii, k + 1], Bp[b0 + ii, k + 2], Bp[b0 + ii, k + 3]
            a0, a1, a2, a3 = Ap[k], Ap[k + 1], Ap[k + 2], Ap[k + 3]
            for jj in range(jfirst, w):
                j = j0 + jj
                row[jj] += b0k * a0[j] + b1k * a1[j] + b2k * a2[j] + b3k * a3[j]
        for jj in range(w, wpad):
            row[jj] = 0.0


def pack_groups(Ap, Apk):
    """Apk[g, k, :] = Ap[k, 3 L g:3 L (g + 1)] (Apk: groups x r4 x 3 L, L the lanes)."""
    r4, ncols = Ap.shape
    Apk[...] = Ap.reshape(r4, ncols // Apk.shape[2], Apk.shape[2]).transpose(1, 0, 2)


@numba.njit(nogil=True)
def _phase1_simd(G, data, Bp, Ap, Apk, b0, nb, j0, w, wpad, m, ahead):
    """4 rows x 3 vectors of accumulators (12 FMA chains: with 5 cycles of FMA latency and
    2 FMAs per cycle, 8 chains would cap at 80 %) held across the rank loop: per rank 3
    loads of A (from the packed Apk), 4 broadcasts of B, 12 FMAs. ``ahead`` > 0: prefetch
    the rows ``ahead`` below, so the next block's R arrives while phases 2 and 3 run."""
    L = lanes(G)
    r4 = Ap.shape[0]
    wfull = w // (3 * L) * (3 * L)
    for ii in range(0, nb, 4):
        i = b0 + ii
        s0, s1, s2, s3 = min(i, m - 1), min(i + 1, m - 1), min(i + 2, m - 1), min(i + 3, m - 1)
        for jj in range(0, wfull, 3 * L):
            j = j0 + jj
            g = j // (3 * L) * r4  # the group's first row in Apk (j0 is a multiple of 3 L)
            c00, c01, c02 = vload(data, s0, j), vload(data, s0, j + L), vload(data, s0, j + 2 * L)
            c10, c11, c12 = vload(data, s1, j), vload(data, s1, j + L), vload(data, s1, j + 2 * L)
            c20, c21, c22 = vload(data, s2, j), vload(data, s2, j + L), vload(data, s2, j + 2 * L)
            c30, c31, c32 = vload(data, s3, j), vload(data, s3, j + L), vload(data, s3, j + 2 * L)
            if ahead:
                for t in range(4):
                    row = min(i + ahead + t, m - 1)
                    prefetch(data, row, j)
                    prefetch(data, row, j + 2 * L)
            for k in range(r4):
                a0, a1, a2 = vload(Apk, g + k, 0), vload(Apk, g + k, L), vload(Apk, g + k, 2 * L)
                b = vbroadcast_at(Bp, i, k)
                c00, c01, c02 = vfma(b, a0, c00), vfma(b, a1, c01), vfma(b, a2, c02)
                b = vbroadcast_at(Bp, i + 1, k)
                c10, c11, c12 = vfma(b, a0, c10), vfma(b, a1, c11), vfma(b, a2, c12)
                b = vbroadcast_at(Bp, i + 2, k)
                c20, c21, c22 = vfma(b, a0, c20), vfma(b, a1, c21), vfma(b, a2, c22)
                b = vbroadcast_at(Bp, i + 3, k)
                c30, c31, c32 = vfma(b, a0, c30), vfma(b, a1, c31), vfma(b, a2, c32)
            vstore(G, ii, jj, c00)
            vstore(G, ii, jj + L, c01)
            vstore(G, ii, jj + 2 * L, c02)
            vstore(G, ii + 1, jj, c10)
            vstore(G, ii + 1, jj + L, c11)
            vstore(G, ii + 1, jj + 2 * L, c12)
            vstore(G, ii + 2, jj, c20)
            vstore(G, ii + 2, jj + L, c21)
            vstore(G, ii + 2, jj + 2 * L, c22)
            vstore(G, ii + 3, jj, c30)
            vstore(G, ii + 3, jj + L, c31)
            vstore(G, ii + 3, jj + 2 * L, c32)
    _phase1_tail(G, data, Bp, Ap, b0, nb, j0, wfull, w, wpad, m)


@numba.njit(nogil=True, fastmath=FASTMATH)
def _phase1_portable(G, data, Bp, Ap, Apk, b0, nb, j0, w, wpad, m, ahead):
    _phase1_tail(G, data, Bp, Ap, b0, nb, j0, 0, w, wpad, m)


# ---- phase 2: grad_B[b0:b0 + nb, :] (+)= G[:, :wpad] @ Ap[:, j0:j0 + wpad]^T -------------------

@numba.njit(nogil=True, fastmath=FASTMATH)
def _phase2_portable(G, Ap, gB, b0, nb, j0, wpad, first):
    r4 = Ap.shape[0]
    for ii in range(nb):
        row = G[ii]
        for k in range(r4):
            a = Ap[k]
            s = row[0] * a[j0]
            for jj in range(1, wpad):
                s += row[jj] * a[j0 + jj]
            gB[b0 + ii, k] = s if first else gB[b0 + ii, k] + s


@numba.njit(nogil=True)
def _phase2_simd(G, Ap, gB, b0, nb, j0, wpad, first):
    """3 rows x 4 ranks of vector dot products (12 chains): per vector of columns 3 loads
    of G, 4 of A, 12 FMAs; the lanes are summed once per chunk (vsum, a fixed order)."""
    L = lanes(G)
    r4 = Ap.shape[0]
    for ii in range(0, nb, 3):
        i = b0 + ii
        for k in range(0, r4, 4):
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = s20 = s21 = s22 = s23 = vzeros(G)
            for jj in range(0, wpad, L):
                j = j0 + jj
                g0, g1, g2 = vload(G, ii, jj), vload(G, ii + 1, jj), vload(G, ii + 2, jj)
                a = vload(Ap, k, j)
                s00, s10, s20 = vfma(g0, a, s00), vfma(g1, a, s10), vfma(g2, a, s20)
                a = vload(Ap, k + 1, j)
                s01, s11, s21 = vfma(g0, a, s01), vfma(g1, a, s11), vfma(g2, a, s21)
                a = vload(Ap, k + 2, j)
                s02, s12, s22 = vfma(g0, a, s02), vfma(g1, a, s12), vfma(g2, a, s22)
                a = vload(Ap, k + 3, j)
                s03, s13, s23 = vfma(g0, a, s03), vfma(g1, a, s13), vfma(g2, a, s23)
            _add_sums(gB, i, k, first, vsum(s00), vsum(s01), vsum(s02), vsum(s03))
            _add_sums(gB, i + 1, k, first, vsum(s10), vsum(s11), vsum(s12), vsum(s13))
            _add_sums(gB, i + 2, k, first, vsum(s20), vsum(s21), vsum(s22), vsum(s23))


@numba.njit(inline="always")
def _add_sums(gB, i, k, first, x0, x1, x2, x3):
    """gB[i, k:k + 4] = (x0, x1, x2, x3), or += if not ``first``."""
    if first:
        gB[i, k], gB[i, k + 1], gB[i, k + 2], gB[i, k + 3] = x0, x1, x2, x3
    else:
        gB[i, k] += x0
        gB[i, k + 1] += x1
        gB[i, k + 2] += x2
        gB[i, k + 3] += x3


# ---- phase 3: grad_A[:, j0:j0 + wpad] (+)= Bp[b0:b0 + nb]^T @ G[:, :wpad] ---------------------

@numba.njit(nogil=True, fastmath=FASTMATH)
def _phase3_portable(G, Bp, gA, b0, nb, j0, wpad, first):
    r4 = gA.shape[0]
    for k in range(r4):
        out = gA[k, j0:j0 + wpad]
        if first:
            out[:] = 0.0
        for ii in range(nb):
            b = Bp[b0 + ii, k]
            row = G[ii]
            for jj in range(wpad):
                out[jj] += b * row[jj]


@numba.njit(nogil=True)
def _phase3_simd(G, Bp, gA, b0, nb, j0, wpad, first):
    """4 ranks x 3 vectors of accumulators (12 chains) held across the rows: per row 3
    loads of G, 4 broadcasts of B, 12 FMAs."""
    L = lanes(G)
    r4 = gA.shape[0]
    for k in range(0, r4, 4):
        for jj in range(0, wpad, 3 * L):
            j = j0 + jj
            if first:
                c00 = c01 = c02 = c10 = c11 = c12 = c20 = c21 = c22 = c30 = c31 = c32 = vzeros(G)
            else:
                c00, c01, c02 = vload(gA, k, j), vload(gA, k, j + L), vload(gA, k, j + 2 * L)
                c10, c11, c12 = vload(gA, k + 1, j), vload(gA, k + 1, j + L), vload(gA, k + 1, j + 2 * L)
                c20, c21, c22 = vload(gA, k + 2, j), vload(gA, k + 2, j + L), vload(gA, k + 2, j + 2 * L)
                c30, c31, c32 = vload(gA, k + 3, j), vload(gA, k + 3, j + L), vload(gA, k + 3, j + 2 * L)
            for ii in range(nb):
                g0, g1, g2 = vload(G, ii, jj), vload(G, ii, jj + L), vload(G, ii, jj + 2 * L)
                i = b0 + ii
                b = vbroadcast_at(Bp, i, k)
                c00, c01, c02 = vfma(b, g0, c00), vfma(b, g1, c01), vfma(b, g2, c02)
                b = vbroadcast_at(Bp, i, k + 1)
                c10, c11, c12 = vfma(b, g0, c10), vfma(b, g1, c11), vfma(b, g2, c12)
                b = vbroadcast_at(Bp, i, k + 2)
                c20, c21, c22 = vfma(b, g0, c20), vfma(b, g1, c21), vfma(b, g2, c22)
                b = vbroadcast_at(Bp, i, k + 3)
                c30, c31, c32 = vfma(b, g0, c30), vfma(b, g1, c31), vfma(b, g2, c32)
            vstore(gA, k, j, c00)
            vstore(gA, k, j + L, c01)
            vstore(gA, k, j + 2 * L, c02)
            vstore(gA, k + 1, j, c10)
            vstore(gA, k + 1, j + L, c11)
            vstore(gA, k + 1, j + 2 * L, c12)
            vstore(gA, k + 2, j, c20)
            vstore(gA, k + 2, j + L, c21)
            vstore(gA, k + 2, j + 2 * L, c22)
            vstore(gA, k + 3, j, c30)
            vstore(gA, k + 3, j + L, c31)
            vstore(gA, k + 3, j + 2 * L, c32)


#: (phase1, phase2, phase3) of each path, same arguments; the generated kernel takes one.
#: They are Numba functions of their own, called once per block (the call costs nothing
#: next to a block's work), so Numba types and lowers them once per dtype and process; LLVM
#: still optimises them into every kernel (a first kernel compiled in 17 s instead of 21,
#: each further loss or layout in 7-8 s, on the shared 2-core machine).
SIMD_PHASES = (_phase1_simd, _phase2_simd, _phase3_simd)
PORTABLE_PHASES = (_phase1_portable, _phase2_portable, _phase3_portable)

@numba.njit(inline="always", fastmath=FASTMATH)
def squared_pointwise(t, y, delta):
    """The squared loss's (value, grad): the default loss of the _fused.py template."""
    return 0.5 * t * t, t


#: COPY_BY_LOOP. The kernels copy arrays with loops, never ``dst[:] = src``: Numba compiles an
#: array-to-slice assignment with its shape-mismatch error message, an f-string of the two
#: shapes, which drags Numba's whole string implementation (str, join, repr of ints) into the
#: kernel's compile: 7.5 s of a first squared fp32 kernel's 19 s and 4.4 s of the linear
#: kind's first compile (issue 31; a scalar fill such as ``out[:] = 0.0`` does not do it).

# ---- the merge: partials added in unit order, by the thread that finishes a tile's or a
# panel's last unit; the norms of each tile and panel in float64 -----------------------------

@numba.njit(nogil=True, fastmath=FASTMATH)
def merge_tile(gA_parts, Ap, grad_A, j0, j1, norms):
    """grad_A[:, j0:j1] = the row panels' partials added in panel order;
    norms = (||grad_A[:, j0:j1]||^2, ||A[:, j0:j1]||^2)."""
    grad_sq = 0.0
    v_sq = 0.0
    for k in range(grad_A.shape[0]):
        dst = grad_A[k, j0:j1]
        first = gA_parts[0, k, j0:j1]
        for j in range(j1 - j0):  # a loop, not dst[:] = ...: see COPY_BY_LOOP
            dst[j] = first[j]
        for p in range(1, gA_parts.shape[0]):
            src = gA_parts[p, k, j0:j1]
            for j in range(j1 - j0):
                dst[j] += src[j]
        for j in range(j1 - j0):
            grad_sq += np.float64(dst[j]) ** 2
            v_sq += np.float64(Ap[k, j0 + j]) ** 2
    norms[0] = grad_sq
    norms[1] = v_sq


@numba.njit(nogil=True, fastmath=FASTMATH)
def merge_panel(gB_parts, Bp, grad_B, i0, i1, norms):
    """grad_B[i0:i1] = the column tiles' partials added in tile order;
    norms = (||grad_B[i0:i1]||^2, ||B[i0:i1]||^2)."""
    r4 = grad_B.shape[1]
    grad_sq = 0.0
    v_sq = 0.0
    for i in range(i0, i1):
        dst = grad_B[i]
        first = gB_parts[0, i]
        for k in range(r4):  # a loop, not dst[:] = ...: see COPY_BY_LOOP
            dst[k] = first[k]
        for q in range(1, gB_parts.shape[0]):
            src = gB_parts[q, i]
            for k in range(r4):
                dst[k] += src[k]
        for k in range(r4):
            grad_sq += np.float64(dst[k]) ** 2
            v_sq += np.float64(Bp[i, k]) ** 2
    norms[0] = grad_sq
    norms[1] = v_sq


# ---- the generated kernels and their on-disk cache -------------------------------------------

_TEMPLATE = Path(__file__).with_name("_fused.py")
_BEGIN, _END = "# ---- generated: begin", "# ---- generated: end"
_lock = threading.Lock()


def cache_dir() -> Path | None:
    """Where the generated kernel modules (and, beside them, Numba's cache) are kept.

    NUMBA_CACHE_DIR/lorakern if that is set, else $XDG_CACHE_HOME/lorakern (~/.cache/lorakern),
    else a folder in the temporary directory; None if none is writable.
    """
    candidates = []
    if numba.config.CACHE_DIR:
        candidates.append(Path(numba.config.CACHE_DIR) / "lorakern")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    candidates.append(Path(xdg) / "lorakern")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    candidates.append(Path(tempfile.gettempdir()) / f"lorakern-{uid}")
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    return None


def generated_source(template: Path, loss, constants: dict, label: str | None = None) -> str:
    """``template`` (a kernel module such as _fused.py) with its generated block replaced by
    the ``constants`` and the loss's scalar function ``pointwise``."""
    text = template.read_text()
    head, rest = text.split(_BEGIN, 1)
    _, tail = rest.split(_END, 1)
    block = "\n".join([
        _BEGIN + f" (loss {label or loss.name!r}, from lorakern/_cpu/kernels.py)",
        *(f"{name} = {value!r}" for name, value in constants.items()),
        "",
        "",
        "@numba.njit(inline='always', fastmath=FASTMATH)",
        _scalar_source(loss).rstrip(),
        "",
        "",
        _END,
    ])
    return head + block + tail


def kernel_source(loss, labels: bool, masked: bool, use_simd: bool) -> str:
    """The source of the fused kernel for one loss and layout: _fused.py with its generated
    block replaced by the layout constants and the loss's scalar function."""
    return generated_source(_TEMPLATE, loss, {"LABELS": bool(labels), "MASKED": bool(masked),
                                              "USE_SIMD": bool(use_simd)})


def fingerprint(source: str, depends=()) -> str:
    """Changes when the generated source, the helpers it inlines (kernels.py, simd.py and the
    files in ``depends``) or Numba change (Numba's cache checks only the kernel's own file,
    not the functions it calls)."""
    h = hashlib.sha256(source.encode())
    for path in (Path(__file__), Path(simd.__file__), *depends):
        h.update(Path(path).read_bytes())
    h.update(f"{numba.__version__} {sys.version}".encode())
    return h.hexdigest()[:16]


def _import_generated(name: str, source: str):
    """Write ``source`` as module ``name`` in cache_dir() (unless it is there already, so its
    time stamp, which Numba's cache checks, does not change) and import it; None if no
    folder is writable."""
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"{name}.py"
    try:
        if not path.exists() or path.read_text() != source:
            tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_text(source)
            os.replace(tmp, path)
    except OSError:
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def fused_kernel(loss, labels: bool, masked: bool, use_simd: bool):
    """The fused pass for one loss and data layout, compiled once per machine.

    ``labels``: the data are W0 and Y (z = W0 + BA) instead of R (d = R + BA).
    ``masked``: entries with mask == 0 add nothing. ``use_simd``: the AVX2/FMA
    micro-kernels, else the portable loops. These are module constants of the generated
    kernel, so each combination compiles separately and branches on them cost nothing; the
    kernel's ``with_grad`` argument is a run-time flag (False: the loss-only pass).
    """
    source = kernel_source(loss, labels, masked, use_simd)
    slug = re.sub(r"\W", "_", loss.name)
    name = (f"lorakern_fused_{slug}_{'labels' if labels else 'residual'}_"
            f"{'masked' if masked else 'dense'}_{'simd' if use_simd else 'portable'}_{fingerprint(source)}")
    return load_generated(name, source)


def load_generated(name: str, source: str):
    """The ``work`` function of the generated module ``name``: imported from the cache
    folder (Numba then finds its compiled code on disk), or compiled in memory where no
    folder is writable."""
    with _lock:
        module = sys.modules.get(name) or _import_generated(name, source)
        if module is None:  # no writable folder: compile in memory, as before
            namespace = {"__name__": name}
            source = source.replace("cache=True", "cache=False")
            exec(compile(source, f"<{name}>", "exec"), namespace)
            return namespace["work"]
    return module.work
