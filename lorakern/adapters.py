"""The adapters B (m x r) and A (r x n): LoRA's initialisation and their validation."""
from __future__ import annotations

import math
import warnings

import numpy as np

from ._validate import (InputWarning, array_namespace, as_array, check_matrix, positive_float,
                        positive_int, returner)


def check_adapters(problem, B, A, stacklevel: int = 4):
    """(B, A) as NumPy or CuPy arrays (DLPack producers such as torch tensors read without a
    copy, ``_validate.as_array``); TypeError/ValueError unless B is (m, r) and A is (r, n),
    finite, of the problem's dtype; InputWarning (at the caller ``stacklevel`` frames up) if
    r > min(m, n)."""
    from .problems import ProblemKind

    if not isinstance(problem, ProblemKind):
        raise TypeError(f"problem must be a lorakern.Problem (or another problem kind), "
                        f"got {type(problem).__name__}")
    hint = f"dtype=np.{problem.dtype}"
    B_in, A_in = B, A
    B, A = as_array("B", B, hint=hint), as_array("A", A, hint=hint)
    check_matrix("B", B, dtype=problem.dtype, like=B_in)
    check_matrix("A", A, dtype=problem.dtype, like=A_in)
    (m, n), (mb, rb), (ra, na) = problem.adapter_shape(), B.shape, A.shape
    if mb != m:
        raise ValueError(f"B must have m = {m} rows (W0 is {m}x{n}), got shape {(mb, rb)}")
    if na != n:
        raise ValueError(f"A must have n = {n} columns (W0 is {m}x{n}), got shape {(ra, na)}")
    if rb != ra:
        raise ValueError(f"B is {mb}x{rb} and A is {ra}x{na}: their ranks differ ({rb} != {ra})")
    if rb < 1:
        raise ValueError("the rank r must be at least 1")
    check_rank_fits(m, n, rb, FIT_COPIES * problem.dtype.itemsize, "a fit's adapters, "
                    "gradients and iterates")
    warn_rank(m, n, rb, stacklevel=stacklevel + 1)
    return B, A


#: the largest rank accepted, as a multiple of min(m, n): BA has rank at most min(m, n), so
#: a rank past this is a mistake (a typo, m and r swapped), refused before any allocation
RANK_CEILING = 64
#: copies of the adapters' size a fit holds at once: B and A, their gradients, the next
#: iterate and the last finite one (fit's divergence guard); init_adapters draws in float64
#: and converts, so it holds one float64 copy beside the result
FIT_COPIES = 4
#: below this many bytes the memory available is not read (/proc/meminfo costs tens of
#: microseconds, which a small step would pay at every call)
MEMORY_CHECK_FROM = 2**28


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation here: MemAvailable of /proc/meminfo
    (Linux: free plus reclaimable), else the free physical pages (os.sysconf), else None."""
    import os

    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_rank_fits(m: int, n: int, rank: int, bytes_per_entry: int, what: str) -> None:
    """ValueError, before anything is allocated, if ``rank`` is past RANK_CEILING x min(m, n)
    or if (m + n) rank ``bytes_per_entry`` bytes (the adapters and the copies ``what`` needs)
    exceed the memory available here."""
    k = min(m, n)
    if rank > RANK_CEILING * k:
        raise ValueError(f"rank {rank} is more than {RANK_CEILING}x min(m, n) = {k} (W0 is "
                         f"{m}x{n}): BA can have rank at most {k}, so use rank <= {k}")
    need = (m + n) * rank * bytes_per_entry
    if need < MEMORY_CHECK_FROM:
        return
    have = available_memory()
    if have is not None and need > have:
        raise ValueError(f"rank {rank} does not fit in memory: {what} (B {m}x{rank}, A "
                         f"{rank}x{n}) need about {need / 2**30:.3g} GiB and "
                         f"{have / 2**30:.3g} GiB is available: rank <= "
                         f"{have // ((m + n) * bytes_per_entry)} fits")


def warn_rank(m: int, n: int, rank: int, stacklevel: int) -> None:
    """InputWarning if rank > min(m, n): BA has rank at most min(m, n) whatever r is, so the
    extra columns of B and rows of A add cost and no expressiveness (and make BA's
    factorisation rank-deficient by construction)."""
    if rank > min(m, n):
        warnings.warn(f"rank {rank} is above min(m, n) = {min(m, n)} (W0 is {m}x{n}): BA can "
                      f"have rank at most {min(m, n)}, so the adapters are rank-deficient by "
                      f"construction; rank {min(m, n)} fits the same weights for less",
                      InputWarning, stacklevel=stacklevel)


def merge(W0, B, A):
    """The merged weight W0 + B A, as a new array where B lives (NumPy or CuPy).

    Parameters
    ----------
    W0 : (m, n) float32 or float64 array, NumPy or CuPy (copied to B's device if it differs),
        or any array with ``__dlpack__`` (torch tensors, JAX arrays), read without a copy.
    B, A : (m, r) and (r, n) adapters of W0's dtype, e.g. a FitResult's ``B`` and ``A``.

    Returns
    -------
    W0 + B @ A, of W0's dtype (B @ A rounded to it, then added), of B's kind (a torch
    tensor for torch tensors, on B's device). No input is modified.

    Raises
    ------
    TypeError, ValueError : arrays that are not finite 2-D float arrays of one dtype, or
        shapes that do not fit, named.
    """
    back = returner(B)
    B_in, A_in = B, A
    W0, B, A = as_array("W0", W0), as_array("B", B), as_array("A", A)
    check_matrix("W0", W0)
    check_matrix("B", B, dtype=W0.dtype, like=B_in)
    check_matrix("A", A, dtype=W0.dtype, like=A_in)
    (m, n), (mb, rb), (ra, na) = W0.shape, B.shape, A.shape
    if (mb, na) != (m, n) or rb != ra:
        raise ValueError(f"W0 is {m}x{n}, B is {mb}x{rb} and A is {ra}x{na}: merging needs "
                         f"B of shape (m, r) and A of shape (r, n) with (m, n) = W0's shape")
    xp = array_namespace(B)
    if array_namespace(A) is not xp:
        raise TypeError("B and A must live on one device (both NumPy or both CuPy)")
    return back(xp.asarray(W0) + B @ A)


def init_adapters(m: int, n: int, rank: int, *, dtype=np.float32, seed=None, init: str = "lora",
                  scale: float | None = None, like=None):
    """Adapters (B, A) of shapes (m, rank) and (rank, n).

    Parameters
    ----------
    m, n, rank : positive integers.
    dtype : float32 or float64.
    seed : None, a non-negative integer for numpy.random.default_rng, or a
        numpy.random.Generator, which is used as it is and so advanced: two calls with one
        generator give different adapters (as two draws from it would).
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
    TypeError, ValueError : an argument that is not what is listed above, named; ValueError
        also for a rank past ``RANK_CEILING`` x min(m, n), or whose adapters would not fit in
        the memory available (checked before anything is allocated).

    Warns
    -----
    InputWarning : rank > min(m, n) (BA cannot have rank above min(m, n)).
    """
    for name, value in (("m", m), ("n", n), ("rank", rank)):
        positive_int(name, value)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    if seed is not None and not isinstance(seed, np.random.Generator):
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be None or a non-negative integer (or a "
                            f"numpy.random.Generator), got {seed!r}")
        if seed < 0:
            raise ValueError(f"seed must be None or a non-negative integer, got {seed}")
    if scale is not None:
        scale = positive_float("scale", scale)
    if init not in ("lora", "gaussian"):
        raise ValueError(f"unknown init {init!r}; use 'lora' or 'gaussian'")
    if like is not None and not (hasattr(like, "__dlpack__") or isinstance(like, np.ndarray)):
        raise TypeError(f"like must be None or an array (a torch tensor, a JAX, NumPy or CuPy "
                        f"array) whose kind and device B and A take, got "
                        f"{type(like).__name__}")
    # the result, and the float64 draw it is converted from
    check_rank_fits(int(m), int(n), int(rank), dtype.itemsize + 8, "the adapters")
    warn_rank(int(m), int(n), int(rank), stacklevel=3)
    # default_rng returns a Generator it is given unchanged: the caller's, advanced below
    rng = np.random.default_rng(seed)
    back = (lambda a: a) if like is None else returner(like)
    if init == "lora":
        scale = 1.0 / math.sqrt(n) if scale is None else scale
        return (back(np.zeros((m, rank), dtype)),
                back((scale * rng.standard_normal((rank, n))).astype(dtype)))
    scale = 1.0 / math.sqrt(max(m, n)) if scale is None else scale  # "gaussian"
    return (back((scale * rng.standard_normal((m, rank))).astype(dtype)),
            back((scale * rng.standard_normal((rank, n))).astype(dtype)))
