"""What a pass, a step and a fit return: typed, with named fields.

``PassResult`` is what every kernel's ``fused_pass`` hands back. Its scalars live where the
device keeps them: Python floats on a host device, 0-d float64 device arrays on a GPU (so a
step never waits for the host); ``Device.to_host`` brings them back when the driver looks.

Equality is identity: ``==`` on a StepResult, History, FitResult or FitProgress is ``is``
(they hold arrays, whose ``==`` is elementwise; compare fields with ``np.array_equal`` to
compare by value). Their reprs are one line and never print an array's entries.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np


@dataclass(eq=False)
class PassResult:
    """Gradients and norms at V_t = (B_t, A_t), from one fused pass over the data."""

    grad_B: object    # (m, r) = G A^T, on the device, dtype of the data
    grad_A: object    # (r, n) = B^T G
    loss: object      # J(V_t)
    g_sq: object      # ||G_t||_F^2 (or the square of a certified upper bound, see Theorem(norm=))
    grad_sq: object   # ||grad_B||_F^2 + ||grad_A||_F^2 = ||grad J(V_t)||^2
    v_sq: object      # ||A_t||_F^2 + ||B_t||_F^2 = ||V_t||^2


def describe_array(x) -> str:
    """An array in a few words for a repr: its type, shape and dtype (never its entries)."""
    if x is None:
        return "None"
    shape = "x".join(str(int(s)) for s in getattr(x, "shape", ()))
    return f"{type(x).__name__}({shape or 'scalar'}, {getattr(x, 'dtype', '?')})"


@dataclass(repr=False, eq=False)
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

    def __repr__(self):
        return (f"StepResult(loss={self.loss:.6g}, eta={self.eta:.4g}, grad_sq={self.grad_sq:.4g}, "
                f"v_sq={self.v_sq:.4g}, g_norm={self.g_norm:.4g}, trials={self.trials}, "
                f"B={describe_array(self.B)}, A={describe_array(self.A)})")


@dataclass(repr=False, eq=False)
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

    def __repr__(self):
        if len(self) == 0:
            return f"History(0 steps, {self.dtype}, lipschitz={self.lipschitz:g})"
        eta = (f"eta={self.eta[0]:.4g}" if np.all(self.eta == self.eta[0]) else
               f"eta in [{np.min(self.eta):.4g}, {np.max(self.eta):.4g}]")
        trials = f", {int(np.sum(self.trials))} trials" if np.any(self.trials) else ""
        # the history holds values at V_0 .. V_{T-1}: J(V_T) is the FitResult's final_loss
        last = len(self) - 1
        return (f"History({len(self)} steps, loss at V_0..V_{last}: {self.loss[0]:.6g} -> "
                f"{self.loss[-1]:.6g}, {eta}{trials}, {self.dtype}, lipschitz={self.lipschitz:g})")


#: the per-step columns of a History
HISTORY_FIELDS = tuple(f.name for f in fields(History) if f.name not in ("dtype", "lipschitz"))

#: the columns of a device-side loop's history, in the order fused.cu's ``tail`` writes
#: them (one row per step); ``history_from_columns`` is the one place that reads them
DEVICE_HISTORY_COLUMNS = ("loss", "g_sq", "grad_sq", "v_sq", "eta")


def history_from_columns(table, *, dtype, lipschitz) -> History:
    """A History from a (steps x 5) array laid out as DEVICE_HISTORY_COLUMNS."""
    table = np.asarray(table, dtype=np.float64).reshape(-1, len(DEVICE_HISTORY_COLUMNS))
    col = {name: table[:, i].copy() for i, name in enumerate(DEVICE_HISTORY_COLUMNS)}
    return History(loss=col["loss"], eta=col["eta"], grad_sq=col["grad_sq"], v_sq=col["v_sq"],
                   g_norm=np.sqrt(col["g_sq"]), trials=np.zeros(len(table), np.int64),
                   dtype=np.dtype(dtype), lipschitz=lipschitz)


@dataclass(eq=False)
class DeviceRun:
    """What a device-side loop (``Kernels.run_steps``) returns."""

    B: object                      # V_T, or the last iterate whose loss was finite
    A: object
    history: np.ndarray            # steps x 5, DEVICE_HISTORY_COLUMNS, on the host
    diverged_at: int | None        # the first t whose J(V_t) was not finite, or None
    B_prev: object = None          # V_{T-1} (when it did not diverge and T > 0): what fit
    A_prev: object = None          # returns if J(V_T) itself is not finite


@dataclass(repr=False, eq=False)
class FitProgress:
    """What fit's ``callback`` receives at V_t, between steps t - 1 and t."""

    t: int            # steps done: this is V_t
    B: object         # the iterate, arrays of the device (read them; NumPy's are read-only)
    A: object
    loss: float       # J(V_t)
    grad_sq: float    # ||grad J(V_t)||^2
    eta: float        # eta_{t-1}, the step that led here
    seconds: float    # since the fit began

    def __repr__(self):
        return (f"FitProgress(t={self.t}, loss={self.loss:.6g}, grad_sq={self.grad_sq:.4g}, "
                f"eta={self.eta:.4g}, seconds={self.seconds:.3g}, B={describe_array(self.B)}, "
                f"A={describe_array(self.A)})")


@dataclass(repr=False, eq=False)
class FitResult:
    """The iterate V_T after ``steps`` steps, J(V_T), the history, and why the loop ended.

    ``state`` is the step-size policy's state at V_T (Armijo: the last accepted eta, from
    which its next search starts); ``fit(problem, r.B, r.A, steps=k, step_size=r.step_size,
    state=r.state)`` continues the run exactly where it stopped.

    ``W0`` is the fitted problem's own W0 where it keeps one (a LinearProblem, a Problem
    with the logistic loss; None for a residual loss, which keeps only W0 - Y): the same
    array, not a copy, which ``merged()`` reads. A result keeps nothing else of the problem:
    not its data (R, X, Y, the mask), nor what a device prepared from them (a GPU's copy,
    a Gram), so dropping the problem frees them while its results live on, and a result
    pickles as its iterate, history and policy (plus W0 where it is kept).
    """

    B: object
    A: object
    final_loss: float
    steps: int
    history: History
    #: "completed", "converged" (grad_sq <= tol), "stopped" (the callback asked),
    #: "diverged" (loss not finite) or "interrupted" (Ctrl-C: the steps taken before it)
    status: str = "completed"
    seconds: float = 0.0
    step_size: object = None   # the policy object the run used
    state: dict = field(default_factory=dict)  # the policy's state at V_T (see above)
    W0: object = None          # the problem's own W0, for merged() (None: it keeps W0 - Y)

    def merged(self, W0=None):
        """The merged weight W0 + B A at the result's iterate, a new array where B lives.

        Parameters
        ----------
        W0 : (m, n) array of the problem's dtype, or None to take the problem's own W0
            (``self.W0``). A matrix Problem with a residual loss ("squared", "huber") keeps
            only W0 - Y, so it needs W0 passed; a LinearProblem, or a Problem with the
            logistic loss, keeps W0.

        Returns
        -------
        W0 + B A, as ``lorakern.merge(W0, result.B, result.A)`` returns it.

        Raises
        ------
        ValueError : W0 is None and the problem did not keep W0.
        TypeError, ValueError : W0 of the wrong dtype or shape (as ``lorakern.merge``).
        """
        from .adapters import merge

        if W0 is None:
            W0 = self.W0
            if W0 is None:
                raise ValueError(
                    "the problem fitted keeps only the residual W0 - Y (a Problem with the "
                    "squared or Huber loss), not W0: pass it, result.merged(W0)")
        return merge(W0, self.B, self.A)

    def __repr__(self):
        return (f"FitResult(status={self.status!r}, steps={self.steps}, "
                f"final_loss={self.final_loss:.6g} at V_{self.steps}, B={describe_array(self.B)}, "
                f"A={describe_array(self.A)}, seconds={self.seconds:.3g}, "
                f"step_size={self.step_size!r})")
