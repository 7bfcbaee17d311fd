"""What a pass, a step and a fit return: typed, with named fields.

``PassResult`` is what every kernel's ``fused_pass`` hands back. Its scalars live where the
device keeps them: Python floats on a host device, 0-d float64 device arrays on a GPU (so a
step never waits for the host); ``Device.to_host`` brings them back when the driver looks.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np


@dataclass
class PassResult:
    """Gradients and norms at V_t = (B_t, A_t), from one fused pass over the data."""

    grad_B: object    # (m, r) = G A^T, on the device, dtype of the data
    grad_A: object    # (r, n) = B^T G
    loss: object      # J(V_t)
    g_sq: object      # ||G_t||_F^2 (or the square of a certified upper bound, see Theorem(norm=))
    grad_sq: object   # ||grad_B||_F^2 + ||grad_A||_F^2 = ||grad J(V_t)||^2
    v_sq: object      # ||A_t||_F^2 + ||B_t||_F^2 = ||V_t||^2


@dataclass
class StepResult:
    """One step from V_t: the new iterate and the step's numbers, all of the input iterate."""

    B: object
    A: object
    eta: float
    loss: float       # J(V_t)
    grad_sq: float    # ||grad_B||^2 + ||grad_A||^2
    v_sq: float       # ||A_t||^2 + ||B_t||^2
    g_norm: float     # ||G_t||_F
    trials: int = 0   # loss-only passes of a line search


@dataclass
class History:
    """One entry per step t = 0..T-1, values at V_t (float64 arrays; trials int64)."""

    loss: np.ndarray
    eta: np.ndarray
    grad_sq: np.ndarray
    v_sq: np.ndarray
    g_norm: np.ndarray
    trials: np.ndarray
    dtype: np.dtype = np.dtype(np.float64)  # of the data: sets the rounding theory allows
    lipschitz: float = 1.0                   # max(L, 1), as the step size used it

    def __len__(self):
        return len(self.loss)

    def truncated(self, steps: int) -> "History":
        """The first ``steps`` entries."""
        return History(**{name: getattr(self, name)[:steps] for name in HISTORY_FIELDS},
                       dtype=self.dtype, lipschitz=self.lipschitz)


#: the per-step columns of a History
HISTORY_FIELDS = tuple(f.name for f in fields(History) if f.name not in ("dtype", "lipschitz"))

#: the columns of a device-side loop's history, in the order fused.cu's ``finalize`` writes
#: them (one row per step); ``history_from_columns`` is the one place that reads them
DEVICE_HISTORY_COLUMNS = ("loss", "g_sq", "grad_sq", "v_sq", "eta")


def history_from_columns(table, *, dtype, lipschitz) -> History:
    """A History from a (steps x 5) array laid out as DEVICE_HISTORY_COLUMNS."""
    table = np.asarray(table, dtype=np.float64).reshape(-1, len(DEVICE_HISTORY_COLUMNS))
    col = {name: table[:, i].copy() for i, name in enumerate(DEVICE_HISTORY_COLUMNS)}
    return History(loss=col["loss"], eta=col["eta"], grad_sq=col["grad_sq"], v_sq=col["v_sq"],
                   g_norm=np.sqrt(col["g_sq"]), trials=np.zeros(len(table), np.int64),
                   dtype=np.dtype(dtype), lipschitz=lipschitz)


@dataclass
class DeviceRun:
    """What a device-side loop (``Kernels.run_steps``) returns."""

    B: object                      # V_T, or the last iterate whose loss was finite
    A: object
    history: np.ndarray            # steps x 5, DEVICE_HISTORY_COLUMNS, on the host
    diverged_at: int | None        # the first t whose J(V_t) was not finite, or None
    B_prev: object = None          # V_{T-1} (when it did not diverge and T > 0): what fit
    A_prev: object = None          # returns if J(V_T) itself is not finite


@dataclass
class FitResult:
    """The iterate V_T after ``steps`` steps, J(V_T), the history, and why the loop ended."""

    B: object
    A: object
    final_loss: float
    steps: int
    history: History
    #: "completed", "converged" (grad_sq <= tol), "diverged" (loss not finite) or
    #: "interrupted" (Ctrl-C: the steps taken before it, see fit)
    status: str = "completed"
    seconds: float = 0.0
    step_size: object = field(default=None, repr=False)  # the policy object the run used
