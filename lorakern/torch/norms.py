"""The step's norms: ||G||_F over all layers (exact or bound), ||V'||^2 and ||grad J(V')||^2.

All in float64, with each layer's scaling s_l folded in as the package docstring derives.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from .._validate import as_array

#: relative slack on norm="bound": the float64 sums of sum_i ||delta_i|| ||x_i|| carry a
#: relative rounding below (N + max(m, n) + 2) eps_64, far under this for any N < 2^30
BOUND_MARGIN = 2.0 ** -20
#: CPU layers whose exact norm costs fewer multiply-adds than this (N m min(N, n)) get it
#: from two float64 torch products on the model's torch threads; larger ones from
#: lorakern._cpu.linear (NumPy's BLAS, whose own threads a torch loop wakes at every step:
#: 3.1 ms against 0.68 ms at N, m, n = 1347, 64, 64 in float32 between torch work, 13.8
#: against 10.7 ms at 2048, 256, 256, but 87 against 117 ms at 4096, 512, 512 where its
#: float32 products beat float64 ones; one torch thread, benchmarks/NOTES.md)
TORCH_NORM_WORK = 1 << 27


def g_sq(records, norm: str) -> float:
    """sum over the capture's Records of ||G||_F^2 (or the bound's square), float64, from
    what each kept (capture.py's memory plan); one process's data."""
    return sum(record_g_sq(record, norm) for record in records)


def record_g_sq(record, norm: str) -> float:
    """||scale Delta^T X||_F^2 of one Record: from its bound, its G, or its rows."""
    if norm == "bound":
        return (record.scale * record.bound * (1.0 + BOUND_MARGIN)) ** 2
    if record.dense is not None:
        return record.scale ** 2 * sq(record.dense)
    rows = record.stacked_rows()
    if rows is None:
        return 0.0
    X, D = rows
    return record.scale ** 2 * layer_norm_sq(D, X, "exact")


def layer_norm_sq(D, X, norm: str) -> float:
    """||D^T X||_F^2 (norm="exact") or (sum_i ||d_i|| ||x_i||)^2 raised by BOUND_MARGIN."""
    if norm == "bound":
        # U = sum_i ||delta_i|| ||x_i|| >= ||sum_i delta_i x_i^T||_F (package docstring)
        U = (D.double().norm(dim=1) * X.double().norm(dim=1)).sum().item()
        return (U * (1.0 + BOUND_MARGIN)) ** 2
    if D.dtype not in (torch.float32, torch.float64):  # bf16/fp16: what Numba/CuPy read
        D = D.float()
    if X.dtype != D.dtype:
        X = X.to(D.dtype)
    N, m = D.shape
    n = X.shape[1]
    # the Gram identity costs N^2 (m + n) / 2 multiply-adds (X X^T is new every step),
    # the tiles of Delta^T X cost N m n: take the cheaper one
    gram = N * (m + n) < 2 * m * n
    if not D.is_cuda and N * m * min(N, n) < TORCH_NORM_WORK:
        # float64 products: each entry of Delta^T X (or of Delta Delta^T and X X^T) is
        # accumulated in float64 from exact products of the float32/float64 inputs
        D64, X64 = D.double(), X.double()
        if gram:
            return float(torch.sum((D64 @ D64.T) * (X64 @ X64.T)))  # <D D^T, X X^T>
        G = D64.T @ X64
        return float(torch.sum(G * G))
    D_arr, X_arr = as_array("Delta", D.contiguous()), as_array("X", X.contiguous())
    if D.is_cuda:
        from .._cuda import linear as cuda_linear

        xp = sys.modules["cupy"]  # as_array read the CUDA tensors with it
        with xp.cuda.Device(D.device.index):
            K = None
            if gram:
                X64 = X_arr.astype(np.float64)
                K = X64 @ X64.T
            return float(cuda_linear.delta_x_norm_sq(xp, D_arr, X_arr, K))
    from .._cpu import linear as cpu_linear

    K = None
    if gram:
        X64 = X_arr.astype(np.float64)
        K = X64 @ X64.T
    return float(cpu_linear.delta_x_norm_sq(D_arr, X_arr, K))


def v_and_grad_sq(layers):
    """(||V'||^2, ||grad J(V')||^2), float64, scaling folded in (package docstring)."""
    v_sq = grad_sq = 0.0
    for layer in layers:
        for B, A, s in layer.pairs:
            v_sq += s * (sq(A) + sq(B))
            grad_sq += (sq(A.grad) + sq(B.grad)) / s
    return v_sq, grad_sq


def sq(t) -> float:
    """||t||_F^2 in float64 (0 for None)."""
    if t is None:
        return 0.0
    return float(torch.sum(torch.square(t.detach().double())))
