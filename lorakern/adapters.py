"""The adapters B (m x r) and A (r x n): LoRA's initialisation and their validation."""
from __future__ import annotations

import math

import numpy as np

from ._validate import check_matrix, positive_float, positive_int


def check_adapters(problem, B, A):
    """TypeError/ValueError unless B is (m, r) and A is (r, n), finite, of the problem's dtype."""
    from .problems import ProblemKind

    if not isinstance(problem, ProblemKind):
        raise TypeError(f"problem must be a lorakern.Problem (or another problem kind), "
                        f"got {type(problem).__name__}")
    check_matrix("B", B, dtype=problem.dtype)
    check_matrix("A", A, dtype=problem.dtype)
    (m, n), (mb, rb), (ra, na) = problem.adapter_shape(), B.shape, A.shape
    if mb != m:
        raise ValueError(f"B must have m = {m} rows (W0 is {m}x{n}), got shape {(mb, rb)}")
    if na != n:
        raise ValueError(f"A must have n = {n} columns (W0 is {m}x{n}), got shape {(ra, na)}")
    if rb != ra:
        raise ValueError(f"B is {mb}x{rb} and A is {ra}x{na}: their ranks differ ({rb} != {ra})")
    if rb < 1:
        raise ValueError("the rank r must be at least 1")


def init_adapters(m: int, n: int, rank: int, *, dtype=np.float32, seed=None, init: str = "lora",
                  scale: float | None = None):
    """Adapters (B, A) of shapes (m, rank) and (rank, n).

    Parameters
    ----------
    m, n, rank : positive integers.
    dtype : float32 or float64.
    seed : None, or a non-negative integer for numpy.random.default_rng.
    init : "lora": B = 0 and A Gaussian with standard deviation ``scale`` (default
        1/sqrt(n)), as LoRA starts, so that BA = 0. "gaussian": both Gaussian with standard
        deviation ``scale`` (default 1/sqrt(max(m, n))).

    Raises
    ------
    TypeError, ValueError : an argument that is not what is listed above, named.
    """
    for name, value in (("m", m), ("n", n), ("rank", rank)):
        positive_int(name, value)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    if seed is not None:
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be None or a non-negative integer, got {seed!r}")
        if seed < 0:
            raise ValueError(f"seed must be None or a non-negative integer, got {seed}")
    if scale is not None:
        scale = positive_float("scale", scale)
    rng = np.random.default_rng(seed)
    if init == "lora":
        scale = 1.0 / math.sqrt(n) if scale is None else scale
        return np.zeros((m, rank), dtype), (scale * rng.standard_normal((rank, n))).astype(dtype)
    if init == "gaussian":
        scale = 1.0 / math.sqrt(max(m, n)) if scale is None else scale
        return ((scale * rng.standard_normal((m, rank))).astype(dtype),
                (scale * rng.standard_normal((rank, n))).astype(dtype))
    raise ValueError(f"unknown init {init!r}; use 'lora' or 'gaussian'")
