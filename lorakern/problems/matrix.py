"""The matrix kind: J(B, A) = sum over (observed) entries of loss(W0 + BA, Y), Y an m x n target.

The problem is validated once and stored in the form the kernels read: for a *residual* loss
(squared, huber) the residual R = W0 - Y alone (d = R + BA), for a *label* loss (logistic)
W0 and Y (z = W0 + BA). ``base`` is the array the pass adds BA to, ``labels`` the second
array or None.
"""
from __future__ import annotations

import warnings

import numpy as np

from .. import _dispatch
from ..losses import LOSSES, Loss
from .._validate import (InputWarning, array_namespace, as_array, check_delta, check_matrix,
                         positive_float, reject_masked)
from ._common import KindBase


class Problem(KindBase):
    """J(B, A) = sum over (observed) entries of loss(W0 + BA, Y).

    Parameters
    ----------
    W0, Y : (m, n) float32 or float64 arrays, same dtype; NumPy, CuPy, or dask arrays (the
        problem is then sharded by rows and kept on the workers of a Dask cluster; see
        lorakern._dask), or any array with ``__dlpack__`` (torch tensors, ``nn.Parameter``,
        JAX arrays), read without a copy (GPU ones as CuPy arrays); the problem keeps its own
        copy of what it needs, as it does of NumPy arrays.
    loss : "squared" (the default, J = 1/2 ||W0 + BA - Y||_F^2), "huber" or "logistic".
    mask : optional (m, n) boolean array; entries where it is False add nothing. A mask
        that is False everywhere warns (InputWarning): nothing is observed, J = 0.
    delta : the Huber threshold (> 0; default 1). Only "huber" takes it.
    lipschitz : L of the loss's gradient; None takes the loss's own (1, 1, 1/4).
        The step size uses max(L, 1), as Assumption 1 of the paper needs L >= 1.

    Notes
    -----
    A Problem pickles with its data and comes back working (``pickle``, ``multiprocessing``,
    ``concurrent.futures``, joblib): the arrays it keeps travel (R = W0 - Y for a residual
    loss, W0 and Y for a label loss, the mask as one byte per entry), so the pickle is about
    their bytes; the copies and workspaces its devices prepared, and their locks, are
    rebuilt on first use. A Problem on dask arrays does not pickle (TypeError): its data are
    futures of one Dask client.

    Raises
    ------
    TypeError : non-float or mixed dtypes, a NumPy masked array (for W0 and Y: use ``mask=``).
    ValueError : shapes that differ, non-finite entries or a residual W0 - Y that overflows,
        an unknown loss, delta or lipschitz not positive and finite (or delta for a loss
        without one), labels outside {-1, +1} for "logistic", a bad mask.
    """

    kind = "matrix"

    def __init__(self, W0, Y, *, loss: str = "squared", mask=None, delta: float | None = None,
                 lipschitz: float | None = None):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known losses: {sorted(LOSSES)}")
        Y_in = Y
        W0, Y = as_array("W0", W0), as_array("Y", Y)
        if mask is not None:
            mask = as_array("mask", mask, hint="dtype=bool")
        # dask arrays: checked and kept on the workers, by rows (the dispatch table knows how)
        fill = _dispatch.wrapped_problem(self.kind, W0, Y, mask)
        if fill is not None:
            self._set_loss(loss, delta, lipschitz)
            fill(self, W0, Y, mask, self._shard_kwargs())
            return
        check_matrix("W0", W0, takes_mask=True)
        check_matrix("Y", Y, dtype=W0.dtype, takes_mask=True, like=Y_in)
        if W0.shape != Y.shape:
            raise ValueError(f"W0 has shape {tuple(W0.shape)} but Y has shape {tuple(Y.shape)}")
        if W0.size == 0:
            raise ValueError(f"W0 and Y must be non-empty, got shape {tuple(W0.shape)}")
        self._set_loss(loss, delta, lipschitz)
        xp = array_namespace(W0)
        if array_namespace(Y) is not xp:
            raise TypeError("W0 and Y must both be NumPy arrays or both CuPy arrays")
        if self.loss.labels and not bool(((Y == 1) | (Y == -1)).all()):
            raise ValueError(f"loss {loss!r} needs labels Y in {{-1, +1}}")
        self.shape = tuple(int(s) for s in W0.shape)
        self.dtype = np.dtype(W0.dtype)
        if self.loss.labels:  # the problem's own copies
            W0, Y = xp.ascontiguousarray(W0).copy(), xp.ascontiguousarray(Y).copy()
        self._set_layout(W0, Y, self._residual)
        self.mask = None if mask is None else _check_mask(mask, self.shape, xp)
        if self.mask is not None and not bool(self.mask.any()):
            warn_all_false_mask(stacklevel=3)
        self._prepared: dict = {}  # device key -> that device's copy of the data

    def _set_layout(self, W0, Y, residual) -> None:
        """The arrays the kernels read (see the module docstring): W0 and Y for a label loss,
        ``residual(W0, Y)`` alone for a residual loss. (The Dask device's Problem passes
        lazy arrays and W0 - Y.)"""
        if self.loss.labels:
            self.W0, self.Y, self.R = W0, Y, None
        else:
            self.R, self.W0, self.Y = residual(W0, Y), None, None

    def _residual(self, W0, Y):
        xp = array_namespace(W0)
        with np.errstate(over="ignore", invalid="ignore"):
            R = xp.ascontiguousarray(W0 - Y)
        if not bool(xp.isfinite(R).all()):
            raise ValueError(
                f"the residual W0 - Y overflows {self.dtype} (finite inputs, infinite "
                f"difference); build the problem in float64, or rescale W0 and Y")
        return R

    def _set_loss(self, loss, delta, lipschitz):
        self.loss: Loss = LOSSES[loss]
        self.delta = check_delta(self.loss, delta)
        self.lipschitz = (self.loss.lipschitz if lipschitz is None
                          else positive_float("lipschitz", lipschitz))

    def _shard_kwargs(self) -> dict:
        """What a Problem on some of the rows takes besides the arrays."""
        return dict(loss=self.loss.name, lipschitz=self.lipschitz,
                    delta=self.delta if self.loss.uses_delta else None)

    # -- the layout the kernels read ---------------------------------------------------------
    @property
    def base(self):
        """The m x n array the pass adds BA to: R (residual losses) or W0 (label losses)."""
        return self.W0 if self.loss.labels else self.R

    @property
    def labels(self):
        """Y for a label loss, else None."""
        return self.Y if self.loss.labels else None

    @property
    def eta_lipschitz(self) -> float:
        """max(L, 1): the constant the paper's step size uses."""
        return max(self.lipschitz, 1.0)

    @property
    def xp(self):
        return array_namespace(self.base)

    def arrays(self) -> tuple:
        """The arrays whose home decides device="auto"."""
        return (self.base,)

    def __getstate__(self) -> dict:
        if "shards" in self.__dict__:
            raise TypeError(
                "a Problem on dask arrays does not pickle: its data are futures held by one "
                "Dask client and its cluster's workers. Pickle the dask arrays (or the paths "
                "they are read from) and build the Problem where it is used, or build a "
                "NumPy Problem from W0.compute() and Y.compute()")
        return super().__getstate__()

    def __repr__(self):
        m, n = self.shape
        mask = "" if self.mask is None else ", masked"
        return f"Problem({m}x{n} {self.dtype}, loss={self.loss.name!r}{mask}, L={self.lipschitz})"


def warn_all_false_mask(stacklevel: int) -> None:
    """InputWarning: no entry is observed (``stacklevel`` counts from here to the caller)."""
    warnings.warn("the mask is False everywhere: no entry is observed, so the loss is 0 and "
                  "its gradient 0 for any adapters (nothing to fit)", InputWarning,
                  stacklevel=stacklevel)


def _check_mask(mask, shape, xp):
    reject_masked("mask", mask)
    if array_namespace(mask) is not xp:
        raise TypeError("mask must live where W0 and Y live (NumPy or CuPy)")
    dtype = getattr(mask, "dtype", None)  # a list or other non-array has none
    if dtype != np.bool_:
        raise TypeError(f"mask must be a boolean array, got "
                        f"{type(mask).__name__ if dtype is None else dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but W0 has shape {shape}")
    return xp.ascontiguousarray(mask).view(xp.uint8).copy()
