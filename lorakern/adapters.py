"""The adapters B (m x r) and A (r x n): LoRA's initialisation and their validation."""
from __future__ import annotations

import math

import numpy as np

from ._validate import as_array, check_matrix, positive_float, positive_int, returner


def check_adapters(problem, B, A):
    """(B, A) as NumPy or CuPy arrays (DLPack producers such as torch tensors read without a
    copy, ``_validate.as_array``); TypeError/ValueError unless B is (m, r) and A is (r, n),
    finite, of the problem's dtype."""
    from .problems import ProblemKind

    if not isinstance(problem, ProblemKind):
        raise TypeError(f"problem must be a lorakern.Problem (or another problem kind), "
                        f"got {type(problem).__name__}")
    B, A = as_array("B", B, hint="dtype=np.float32"), as_array("A", A, hint="dtype=np.float32")
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
    return B, A


def init_adapters(m: int, n: int, rank: int, *, dtype=np.float32, seed=None, init: str = "lora",
                  scale: float | None = None, like=None):
    """Adapters (B, A) of shapes (m, rank) and (rank, n).

    Parameters
    ----------
    m, n, rank : positive integers.
    dtype : float32 or float64.
    seed : None, or a non-negative integer for numpy.random.default_rng.
    init : "lora": B = 0 and A Gaussian with standard deviation ``scale`` (default
        1/sqrt(n)), as LoRA starts, so that BA = 0. "gaussian": both Gaussian with standard
        deviation ``scale`` (default 1/sqrt(max(m, n))).
    like : None, or an array of another library (a torch tensor, a JAX array): B and A are
        returned as arrays of that kind, on its device (drawn in NumPy, then handed over).

    Returns
    -------
    (B, A) : NumPy arrays, or arrays of ``like``'s kind.

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
    back = (lambda a: a) if like is None else returner(like)
    if init == "lora":
        scale = 1.0 / math.sqrt(n) if scale is None else scale
        return (back(np.zeros((m, rank), dtype)),
                back((scale * rng.standard_normal((rank, n))).astype(dtype)))
    if init == "gaussian":
        scale = 1.0 / math.sqrt(max(m, n)) if scale is None else scale
        return (back((scale * rng.standard_normal((m, rank))).astype(dtype)),
                back((scale * rng.standard_normal((rank, n))).astype(dtype)))
    raise ValueError(f"unknown init {init!r}; use 'lora' or 'gaussian'")
