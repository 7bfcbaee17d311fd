"""Checks shared by the problem kinds: each raises naming the argument and what it expected."""
from __future__ import annotations

import math
import numbers
import sys

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class InputWarning(UserWarning):
    """Input that is valid but almost surely not what was meant (an all-False mask, a rank
    above min(m, n)); ``warnings.simplefilter("error", lorakern.InputWarning)`` makes it an
    error, ``"ignore"`` silences it."""


def array_namespace(x):
    """numpy or cupy, by the array's type; never imports cupy (it is in sys.modules if x is one)."""
    if type(x).__module__.split(".")[0] == "cupy":
        return sys.modules["cupy"]
    return np


def reject_masked(name: str, x, *, takes_mask: bool = False):
    """TypeError for a NumPy masked array, whose hidden entries would be used as numbers;
    ``takes_mask``: the caller has a ``mask=`` argument, and the message points to it."""
    if isinstance(x, np.ma.MaskedArray):
        fix = (f"pass {name}.data and give the observed entries as "
               f"mask=~np.ma.getmaskarray({name})" if takes_mask
               else f"pass a plain array, such as {name}.filled(value)")
        raise TypeError(f"{name} is a NumPy masked array, whose hidden entries would be used "
                        f"as numbers; {fix}")


def check_matrix(name: str, x, dtype=None, *, takes_mask: bool = False):
    """Raise TypeError/ValueError unless x is a finite 2-D float32/float64 array (of ``dtype``)
    and not a masked array (``takes_mask``: see reject_masked)."""
    reject_masked(name, x, takes_mask=takes_mask)
    xp = array_namespace(x)
    if xp is np and not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the problem is {dtype}; "
                        f"convert it with {name}.astype(np.{dtype})")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.size and not bool(xp.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def positive_float(name: str, value) -> float:
    """value as a float > 0 and finite; TypeError for a non-number, ValueError otherwise."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{name} must be a real number > 0, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number > 0, got {type(value).__name__}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return value


def positive_int(name: str, value, *, allow_none: bool = False):
    """value as an int >= 1: TypeError for a non-number (None, a string, a bool), ValueError
    for a number that is not a positive integer (2.5, 2.0, 0)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value}")
    return int(value)


def check_delta(loss, delta):
    """The Huber threshold: positive and finite, and given only to a loss that reads it."""
    if delta is None:
        return 1.0
    if not loss.uses_delta:
        names = sorted(_losses_with_delta())
        raise ValueError(f"delta={delta!r} was given, but loss {loss.name!r} has no delta "
                         f"(only {', '.join(names)} {'uses' if len(names) == 1 else 'use'} it)")
    return positive_float("delta", delta)


def _losses_with_delta():
    from .losses import LOSSES

    return [name for name, loss in LOSSES.items() if loss.uses_delta]
