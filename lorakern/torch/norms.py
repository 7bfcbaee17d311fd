"""The step's norms: ||G||_F over all layers (exact or bound), ||V'||^2 and ||grad J(V')||^2.

All in float64, with each layer's scaling s_l folded in as the package docstring derives.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from .._validate import as_array
from .capture import local

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
        return (record.scale * float(record.bound) * (1.0 + BOUND_MARGIN)) ** 2
    if record.dense is not None:  # a float32 G raised by its rounding bound (never below)
        value = float(torch.linalg.vector_norm(record.dense, dtype=torch.float64))
        return (record.scale * (value * (1.0 + 2.0 ** -40) + record.dense_margin())) ** 2
    rows = record.stacked_rows()
    if rows is None:
        return 0.0
    X, D = rows
    return record.scale ** 2 * layer_norm_sq(D, X, "exact")


def layer_norm_sq(D, X, norm: str) -> float:
    """||D^T X||_F^2, or an upper bound of it that is tight to float32 rounding (norm="exact"
    on float32/bf16/fp16 rows), or (sum_i ||d_i|| ||x_i||)^2 raised by its rounding
    (norm="bound"). Never below the true value but for float64 rounding (module docstring)."""
    if norm == "bound":
        return row_norm_sum(D, X) ** 2
    if D.dtype not in (torch.float32, torch.float64):  # bf16/fp16: what Numba/CuPy read
        D = D.float()
    if X.dtype != D.dtype:
        X = X.to(D.dtype)
    N, m = D.shape
    n = X.shape[1]
    # the Gram identity costs N^2 (m + n) / 2 multiply-adds (X X^T is new every step),
    # the tiles of Delta^T X cost N m n: take the cheaper one
    gram = N * (m + n) < 2 * m * n
    if not D.is_cuda and D.dtype == torch.float32 and not gram:
        return float32_norm_sq(D, X)
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


def row_norm_sum(D, X) -> float:
    """U = sum_i ||d_i|| ||x_i|| >= ||D^T X||_F, raised by its rounding: a certified bound.

    The row norms are taken in the rows' precision (float32 for float32/bf16/fp16 rows: each
    norm's relative error is below (k/2 + 2) u_32 for k entries, so their product's below
    (m + n + 8) / 2 u_32 <= (max(m, n) + 4) 2^-23), their products and the sum in float64
    (relative error below N 2^-53, inside BOUND_MARGIN for N < 2^30). O(N (m + n)) work.
    (Row norms cast to float64 first cost 2-3x more: 0.47 against 0.36 ms at 3328 x 192,
    and ~0.9 ms a call on the busy machine.)
    """
    if D.dtype not in (torch.float32, torch.float64):
        D = D.float()
    if X.dtype != D.dtype:
        X = X.to(D.dtype)
    d = torch.linalg.vector_norm(D, dim=1).double()
    x = torch.linalg.vector_norm(X, dim=1).double()
    raise_by = BOUND_MARGIN
    if D.dtype != torch.float64:
        raise_by += (max(D.shape[1], X.shape[1]) + 4) * 2.0 ** -23
    return float(torch.dot(d, x)) * (1.0 + raise_by)


def float32_norm_sq(D, X) -> float:
    """An upper bound of ||D^T X||_F^2 from the float32 product, tight to float32 rounding.

    fl(D^T X) = D^T X + E with |E| <= gamma_N |D|^T |X| entrywise for any order of the N
    float32 multiply-adds of an entry (blocked, FMA: gamma_N = N u / (1 - N u), u = 2^-24), so
    ||E||_F <= gamma_N || |D|^T |X| ||_F <= gamma_N sum_i ||d_i|| ||x_i|| = gamma_N U and
    ||D^T X||_F <= ||fl(D^T X)||_F + gamma_N U. ||fl(D^T X)||_F is summed in float64 from the
    float32 entries (relative error below m n 2^-53, inside the factor 1 + 2^-40). The bound
    is what eta_t reads: a larger ||G|| gives a smaller eta_t, which keeps Lemma 2 (module
    docstring of lorakern.torch). One float32 GEMM of N m n multiply-adds, about a third of
    the float64 one's time on the CPU, and O(N (m + n)) for U.
    """
    N = D.shape[0]
    u = 2.0 ** -24
    gamma = N * u / (1.0 - N * u)
    G = D.T @ X
    value = float(torch.linalg.vector_norm(G, dtype=torch.float64)) * (1.0 + 2.0 ** -40)
    return (value + gamma * row_norm_sum(D, X)) ** 2


def v_and_grad_sq(layers):
    """(||V'||^2, ||grad J(V')||^2), float64, scaling folded in (package docstring).

    One ``torch._foreach_norm`` over all A, B and their gradients (each cast to float64
    before its sum of squares, as ``sq``) and one read of the results: the per-tensor
    reductions and reads were ~0.5 ms a step on the 12 tensors of a 2-layer GPT-2.
    """
    tensors, weights = [], []  # ||t||^2 enters v_sq with weight s, grad_sq with 1/s
    for layer in layers:
        for B, A, s in layer.pairs:
            for t, w in ((A, (s, 0.0)), (B, (s, 0.0)), (A.grad, (0.0, 1.0 / s)),
                         (B.grad, (0.0, 1.0 / s))):
                if t is not None:  # FSDP2: the rank's shard (the optimizer sums the ranks')
                    tensors.append(local(t).detach())
                    weights.append(w)
    if not tensors:
        return 0.0, 0.0
    by_device = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    v_sq = grad_sq = 0.0
    for indices in by_device.values():
        found = torch._foreach_norm([tensors[i] for i in indices], 2, dtype=torch.float64)
        for i, value in zip(indices, torch.stack(found).tolist()):
            v_sq += weights[i][0] * value * value
            grad_sq += weights[i][1] * value * value
    return v_sq, grad_sq


def v_dot_grad(grads, old) -> float:
    """<V', grad J(V')> = sum over pairs of <B, grad_B> + <A, grad_A> (the scalings cancel:
    sqrt(s) B . grad_B / sqrt(s)), for the line search's guard on ||V'||^2; ``grads`` holds
    (B, A, s, grad_B, grad_A) and ``old`` (B, A) as the optimizer keeps them. Each product in
    the tensors' precision (the guard is a heuristic bound, not part of the certificate),
    the sum in float64: one vdot a tensor and one read. FSDP2: the rank's shards (the
    optimizer sums the ranks').
    """
    def flat(t):  # bf16/fp16 read in float32
        return (t if t.dtype in (torch.float32, torch.float64) else t.float()).reshape(-1)

    products = [torch.vdot(flat(local(v)), flat(local(g))).double()
                for (_, _, _, gB, gA), (B0, A0) in zip(grads, old)
                for v, g in ((B0, gB), (A0, gA))]
    return float(torch.stack(products).sum()) if products else 0.0


def sq(t) -> float:
    """||t||_F^2 in float64 (0 for None)."""
    if t is None:
        return 0.0
    return float(torch.sum(torch.square(t.detach().double())))
