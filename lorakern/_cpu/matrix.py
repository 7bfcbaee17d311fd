"""The matrix kind on the CPU: the launcher of the fused Numba pass (kernels.py)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..results import PassResult
from . import kernels, threads

#: The tile of A and the chunk's grad_A partial for it (2 * r4 * tile values) should fit in
#: the per-core L2: tile = CACHE_BYTES / (2 r4 itemsize), clamped to [MIN_TILE, MAX_TILE].
#: Measured at 4096x4096, one thread (benchmarks/NOTES.md): r=16 fp32 takes 45 ms with
#: tile 160 (the old L1 rule), 33 ms at 512, 29.7 at 1024, 32 at 2048; r=64 fp32 is best
#: at 1024 (108 ms vs 146 at 256, 127 at 2048).
CACHE_BYTES = 512 * 1024
MIN_TILE, MAX_TILE = 16, 1024


def prepare(problem, device):
    if problem.xp is not np:
        raise TypeError("device='cpu' needs NumPy arrays; the problem holds CuPy arrays "
                        "(use device='cuda', or build the Problem from NumPy arrays)")
    one = np.zeros((1, 1), problem.dtype)
    return SimpleNamespace(
        data=problem.base,
        labels_y=problem.labels if problem.labels is not None else one,
        mask=problem.mask if problem.mask is not None else np.zeros((1, 1), np.uint8),
    )


def tile_width(r4: int, itemsize: int) -> int:
    tile = CACHE_BYTES // (2 * r4 * itemsize)
    return int(min(max(tile // 16 * 16, MIN_TILE), MAX_TILE))


def _padded(B, A):
    """B, A copied into zero-padded contiguous arrays: B to (m4, r4), A to (r4, n)."""
    (m, r), n = B.shape, A.shape[1]
    r4, m4 = -(-r // 4) * 4, -(-m // kernels.ROWS) * kernels.ROWS
    Bp = np.zeros((m4, r4), B.dtype)
    Bp[:m, :r] = B
    Ap = np.zeros((r4, n), A.dtype)
    Ap[:r] = A
    return Bp, Ap


def _run(problem, data, B, A, with_grad):
    Bp, Ap = _padded(B, A)
    (r4, n), m4 = Ap.shape, Bp.shape[0]
    nchunks = max(1, min(threads(), m4 // kernels.ROWS))
    kernel = kernels.fused_kernel(problem.loss, problem.loss.labels, problem.mask is not None)
    grad_B = np.zeros((m4, r4), B.dtype)
    parts = np.empty((nchunks, r4, n) if with_grad else (nchunks, 1, 1), B.dtype)
    scalars = np.zeros((nchunks, 2), np.float64)
    kernel(data.data, data.labels_y, data.mask, Bp, Ap, problem.delta,
           tile_width(r4, Ap.itemsize), B.dtype.type(0), with_grad, grad_B, parts, scalars)
    return Bp, Ap, grad_B, parts, scalars


def fused_pass(problem, data, B, A, *, norm="exact"):
    """Gradients and norms at (B, A) in one pass over the data (||G|| is always exact here)."""
    (m, r) = B.shape
    Bp, Ap, grad_B, parts, scalars = _run(problem, data, B, A, True)
    grad_A = np.empty_like(Ap)
    out = np.empty(4, np.float64)
    kernels.merge(parts, grad_A, grad_B, Bp, Ap, scalars, out)
    return PassResult(grad_B=grad_B[:m, :r], grad_A=grad_A[:r], loss=float(out[0]),
                      g_sq=float(out[1]), grad_sq=float(out[2]), v_sq=float(out[3]))


def loss_pass(problem, data, B, A):
    """J(B, A) alone: one read of the data, no gradient work."""
    return float(_run(problem, data, B, A, False)[4][:, 0].sum())

