"""The fine-tuning problem: validated once, stored in the form the kernels read."""
from __future__ import annotations

import math
import sys

import numpy as np

from .losses import LOSSES, Loss

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def array_namespace(x):
    """numpy or cupy, by the array's type; never imports cupy (it is in sys.modules if x is one)."""
    if type(x).__module__.split(".")[0] == "cupy":
        return sys.modules["cupy"]
    return np


def is_device_array(x) -> bool:
    return array_namespace(x) is not np


def check_matrix(name: str, x, dtype=None):
    """Raise TypeError/ValueError unless x is a finite 2-D float32/float64 array (of ``dtype``)."""
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


class Problem:
    """J(B, A) = sum over (observed) entries of loss(W0 + BA, Y).

    Parameters
    ----------
    W0, Y : (m, n) float32 or float64 arrays, same dtype; NumPy or CuPy.
    loss : "squared" (the default, J = 1/2 ||W0 + BA - Y||_F^2), "huber" or "logistic".
    mask : optional (m, n) boolean array; entries where it is False add nothing.
    delta : the Huber threshold (> 0).
    lipschitz : L of the loss's gradient; None takes the loss's own (1, 1, 1/4).
        The step size uses max(L, 1), as Assumption 1 of the paper needs L >= 1.

    Raises
    ------
    TypeError : non-float or mixed dtypes.
    ValueError : shapes that differ, non-finite entries, an unknown loss, delta or lipschitz
        not positive and finite, labels outside {-1, +1} for "logistic", a bad mask.
    """

    def __init__(self, W0, Y, *, loss: str = "squared", mask=None, delta: float = 1.0,
                 lipschitz: float | None = None):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known losses: {sorted(LOSSES)}")
        check_matrix("W0", W0)
        check_matrix("Y", Y, dtype=W0.dtype)
        if W0.shape != Y.shape:
            raise ValueError(f"W0 has shape {tuple(W0.shape)} but Y has shape {tuple(Y.shape)}")
        if W0.size == 0:
            raise ValueError(f"W0 and Y must be non-empty, got shape {tuple(W0.shape)}")
        self.loss: Loss = LOSSES[loss]
        self.delta = _positive_float("delta", delta)
        self.lipschitz = (self.loss.lipschitz if lipschitz is None
                          else _positive_float("lipschitz", lipschitz))
        xp = array_namespace(W0)
        if array_namespace(Y) is not xp:
            raise TypeError("W0 and Y must both be NumPy arrays or both CuPy arrays")
        if self.loss.labels and not bool(((Y == 1) | (Y == -1)).all()):
            raise ValueError(f"loss {loss!r} needs labels Y in {{-1, +1}}")
        self.shape = tuple(int(s) for s in W0.shape)
        self.dtype = np.dtype(W0.dtype)
        # What a step reads: the residual R = W0 - Y (residual losses, one array) or W0 and Y.
        if self.loss.labels:
            self.W0, self.Y = xp.ascontiguousarray(W0).copy(), xp.ascontiguousarray(Y).copy()
            self.R = None
        else:
            self.R = xp.ascontiguousarray(W0 - Y)
            self.W0 = self.Y = None
        self.mask = None if mask is None else _check_mask(mask, self.shape, xp)
        self._on_device: dict = {}  # backend name -> that backend's copy of the data

    @property
    def eta_lipschitz(self) -> float:
        """max(L, 1): the constant the paper's step size uses."""
        return max(self.lipschitz, 1.0)

    @property
    def xp(self):
        return array_namespace(self.R if self.R is not None else self.W0)

    def data(self, backend):
        """The problem's arrays as ``backend`` wants them, prepared once and kept."""
        if backend.NAME not in self._on_device:
            self._on_device[backend.NAME] = backend.prepare(self)
        return self._on_device[backend.NAME]

    def __repr__(self):
        m, n = self.shape
        mask = "" if self.mask is None else ", masked"
        return f"Problem({m}x{n} {self.dtype}, loss={self.loss.name!r}{mask}, L={self.lipschitz})"


def _positive_float(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return value


def _check_mask(mask, shape, xp):
    if array_namespace(mask) is not xp:
        raise TypeError("mask must live where W0 and Y live (NumPy or CuPy)")
    dtype = getattr(mask, "dtype", None)  # a list or other non-array has none
    if dtype != np.bool_:
        raise TypeError(f"mask must be a boolean array, got "
                        f"{type(mask).__name__ if dtype is None else dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but W0 has shape {shape}")
    return xp.ascontiguousarray(mask).view(xp.uint8).copy()
