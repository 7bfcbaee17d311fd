"""step() and fit(): LoRA gradient descent on any backend.

A step is one fused pass (gradients and norms at V_t), the policy's eta, and the update
B_{t+1} = B_t - eta grad_B, A_{t+1} = A_t - eta grad_A, both from the old iterate (eq. 3).
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import _dispatch
from .problem import Problem, check_matrix
from .step_size import Constant, Theorem, as_policy

HISTORY_FIELDS = ("loss", "eta", "grad_sq", "v_sq", "g_norm", "trials")

#: let a backend with ``run_steps`` (CUDA) run a whole fit on the device, history included,
#: when nothing needs the host between steps (no tol, no progress bar, theorem or constant
#: step); tests switch it off to compare with the step-by-step loop
DEVICE_LOOP = True


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


@dataclass
class FitResult:
    """The iterate V_T after ``steps`` steps, J(V_T), the history, and why the loop ended."""

    B: object
    A: object
    final_loss: float
    steps: int
    history: History
    status: str = "completed"  # or "converged" (grad_sq <= tol) or "diverged" (loss not finite)
    seconds: float = 0.0
    step_size: object = field(default=None, repr=False)


def check_adapters(problem: Problem, B, A):
    """TypeError/ValueError unless B is (m, r) and A is (r, n), finite, of the problem's dtype."""
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a lorakern.Problem, got {type(problem).__name__}")
    check_matrix("B", B, dtype=problem.dtype)
    check_matrix("A", A, dtype=problem.dtype)
    (m, n), (mb, rb), (ra, na) = problem.shape, B.shape, A.shape
    if mb != m:
        raise ValueError(f"B must have m = {m} rows (W0 is {m}x{n}), got shape {(mb, rb)}")
    if na != n:
        raise ValueError(f"A must have n = {n} columns (W0 is {m}x{n}), got shape {(ra, na)}")
    if rb != ra:
        raise ValueError(f"B is {mb}x{rb} and A is {ra}x{na}: their ranks differ ({rb} != {ra})")
    if rb < 1:
        raise ValueError("the rank r must be at least 1")


def _start(problem, B, A, device, step_size):
    check_adapters(problem, B, A)
    policy = as_policy(step_size)
    backend = _dispatch.resolve(device, problem.R if problem.R is not None else problem.W0, B, A)
    data = problem.data(backend)
    return backend, data, policy, backend.asarray(B, problem.dtype), backend.asarray(A, problem.dtype)


def step(problem: Problem, B, A, *, device: str = "auto", step_size="theorem") -> StepResult:
    """One step of LoRA gradient descent.

    Parameters
    ----------
    problem : the Problem.
    B, A : (m, r) and (r, n) adapters of the problem's dtype; never modified.
    device : "cpu", "cuda", "reference" or "auto" (where the arrays live).
    step_size : "theorem" (the paper's eta_t), "armijo", a positive float, or a policy object.

    Returns
    -------
    StepResult with the new B and A (new arrays on the device) and Python floats.

    Raises
    ------
    TypeError, ValueError : bad arrays or arguments (inputs are left untouched).
    DeviceUnavailableError : the device cannot be used here.
    """
    backend, data, policy, B, A = _start(problem, B, A, device, step_size)
    p = backend.fused_pass(problem, data, B, A)
    eta, trials = policy.choose(backend, problem, data, B, A, p, {})
    B_next, A_next = backend.update(B, A, p.grad_B, p.grad_A, eta)
    return StepResult(B=B_next, A=A_next, eta=float(eta), loss=float(p.loss),
                      grad_sq=float(p.grad_sq), v_sq=float(p.v_sq),
                      g_norm=math.sqrt(float(p.g_sq)), trials=int(trials))


def fit(problem: Problem, B, A, *, steps: int, device: str = "auto", step_size="theorem",
        tol: float | None = None, progress: bool = False, check_every: int | None = None) -> FitResult:
    """Run ``steps`` steps of LoRA gradient descent from (B, A).

    Parameters
    ----------
    steps : the number of steps T (>= 0).
    tol : stop early, before stepping, once grad_sq <= tol at the current iterate.
    progress : show a progress bar on stderr.
    check_every : on a device backend, how often the host looks at the numbers (tol,
        progress, divergence); default: every step on the CPU, every 50 on a GPU when
        ``tol`` or ``progress`` asks for it, else only at the end.

    Returns
    -------
    FitResult. If the loss stops being finite, the loop stops, keeps the last iterate with
    a finite loss, sets status "diverged" and warns.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an integer, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if tol is not None and not (tol >= 0):
        raise ValueError(f"tol must be >= 0 or None, got {tol}")
    backend, data, policy, B, A = _start(problem, B, A, device, step_size)
    if (DEVICE_LOOP and hasattr(backend, "run_steps") and tol is None and not progress
            and check_every is None and isinstance(policy, (Theorem, Constant))):
        return _fit_on_device(backend, problem, data, policy, B, A, steps)
    xp = backend.xp
    if check_every is None:
        check_every = backend.SYNC_EVERY or (50 if tol is not None or progress else steps + 1)
    bar = _Progress(steps) if progress else None
    rows = {name: [] for name in HISTORY_FIELDS}
    state: dict = {}
    status, t0 = "completed", time.perf_counter()
    # Iterate with a finite loss, kept on the device so no step waits for the host.
    B_kept, A_kept, finite = B, A, xp.asarray(True)
    last = None
    for t in range(steps):
        p = backend.fused_pass(problem, data, B, A)
        finite = finite & xp.isfinite(xp.asarray(p.loss))
        B_kept, A_kept = xp.where(finite, B, B_kept), xp.where(finite, A, A_kept)
        if (t + 1) % check_every == 0 or t == steps - 1:
            if not bool(finite):
                status = "diverged"
                break
            if tol is not None and float(p.grad_sq) <= tol:
                status, last = "converged", p
                break
            if bar:
                bar.update(t + 1, float(p.loss))
        eta, trials = policy.choose(backend, problem, data, B, A, p, state)
        for name, value in (("loss", p.loss), ("eta", eta), ("grad_sq", p.grad_sq),
                            ("v_sq", p.v_sq), ("g_norm", xp.sqrt(xp.asarray(p.g_sq))),
                            ("trials", trials)):
            rows[name].append(value)
        B, A = backend.update(B, A, p.grad_B, p.grad_A, eta)
    history = _history(rows, xp, problem)
    if status == "converged":
        # stopped before stepping at t: history holds steps 0..t-1, V_t is the answer
        # (tol checks run on the host, every step on the CPU, so nothing is recorded past t)
        steps_taken = len(history)
        final_loss = float(last.loss)
    else:
        ok = np.isfinite(history.loss)
        steps_taken = int(np.argmin(ok)) if not ok.all() else len(history)
        if steps_taken < len(history) or status == "diverged":
            # V_{steps_taken} is the last iterate whose loss was finite: keep it
            status = "diverged"
            steps_taken = max(steps_taken - 1, 0)
            history = _truncate(history, steps_taken)
            B, A = B_kept, A_kept
            final_loss = float(backend.loss_pass(problem, data, B, A))
            _warn_diverged(steps_taken, stacklevel=3)
        else:
            final_loss = float(backend.loss_pass(problem, data, B, A))
    if bar:
        bar.close(steps_taken, final_loss)
    return FitResult(B=B, A=A, final_loss=final_loss, steps=steps_taken, history=history,
                     status=status, seconds=time.perf_counter() - t0, step_size=policy)


def _fit_on_device(backend, problem, data, policy, B, A, steps) -> FitResult:
    """fit() as one device-side loop (backend.run_steps): no host round trip per step."""
    t0 = time.perf_counter()
    kwargs = ({"constant": policy.constant} if isinstance(policy, Theorem)
              else {"eta": float(policy.eta)})
    run = backend.run_steps(problem, data, B, A, steps, **kwargs)
    h = np.asarray(run.history, dtype=np.float64)  # columns: loss, g_sq, grad_sq, v_sq, eta
    history = History(loss=h[:, 0].copy(), eta=h[:, 4].copy(), grad_sq=h[:, 2].copy(),
                      v_sq=h[:, 3].copy(), g_norm=np.sqrt(h[:, 1]),
                      trials=np.zeros(len(h), np.int64), dtype=problem.dtype,
                      lipschitz=problem.eta_lipschitz)
    status, steps_taken = "completed", len(history)
    if run.diverged_at is not None:
        # as in the host loop: keep V_{t-1}, the last iterate whose loss was finite
        status, steps_taken = "diverged", max(run.diverged_at - 1, 0)
        history = _truncate(history, steps_taken)
        _warn_diverged(steps_taken, stacklevel=4)
    final_loss = float(backend.loss_pass(problem, data, run.B, run.A))
    return FitResult(B=run.B, A=run.A, final_loss=final_loss, steps=steps_taken, history=history,
                     status=status, seconds=time.perf_counter() - t0, step_size=policy)


def _warn_diverged(steps_taken: int, stacklevel: int):
    """Warn at fit's caller (``stacklevel`` counts the frames from here up to it)."""
    warnings.warn(f"the loss stopped being finite after step {steps_taken}; returning the "
                  f"last iterate with a finite loss", RuntimeWarning, stacklevel=stacklevel)


def _history(rows, xp, problem) -> History:
    arrays = {}
    for name, values in rows.items():
        kind = np.int64 if name == "trials" else np.float64
        if values and xp is not np:
            values = xp.stack([xp.asarray(v, dtype=kind) for v in values]).get()
        arrays[name] = np.asarray([float(v) for v in values] if kind is np.float64 else values,
                                  dtype=kind).reshape(-1)
    return History(**arrays, dtype=problem.dtype, lipschitz=problem.eta_lipschitz)


def _truncate(history: History, steps: int) -> History:
    return History(**{name: getattr(history, name)[:steps] for name in HISTORY_FIELDS},
                   dtype=history.dtype, lipschitz=history.lipschitz)


def init_adapters(m: int, n: int, rank: int, *, dtype=np.float32, seed=None, init: str = "lora",
                  scale: float | None = None):
    """Adapters (B, A) of shapes (m, rank) and (rank, n).

    init="lora": B = 0 and A Gaussian with standard deviation ``scale`` (default
    1/sqrt(n)), as LoRA starts, so that BA = 0. init="gaussian": both Gaussian with
    standard deviation ``scale`` (default 1/sqrt(max(m, n))).
    """
    for name, value in (("m", m), ("n", n), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    rng = np.random.default_rng(seed)
    if init == "lora":
        scale = 1.0 / math.sqrt(n) if scale is None else float(scale)
        return np.zeros((m, rank), dtype), (scale * rng.standard_normal((rank, n))).astype(dtype)
    if init == "gaussian":
        scale = 1.0 / math.sqrt(max(m, n)) if scale is None else float(scale)
        return ((scale * rng.standard_normal((m, rank))).astype(dtype),
                (scale * rng.standard_normal((rank, n))).astype(dtype))
    raise ValueError(f"unknown init {init!r}; use 'lora' or 'gaussian'")


class _Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second on a terminal;
    elsewhere (CI logs, pipes) only the final line is written."""

    def __init__(self, total: int):
        self.total, self.start, self.drawn = total, time.perf_counter(), 0.0
        self.live = sys.stderr.isatty()

    def update(self, done: int, loss: float, force: bool = False):
        now = time.perf_counter()
        if not force and (not self.live or now - self.drawn < 0.1):
            return
        self.drawn = now
        width, frac = 30, done / max(self.total, 1)
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        rate = done / max(now - self.start, 1e-9)
        sys.stderr.write(f"\r[{bar}] {done}/{self.total} steps  loss {loss:.6g}  {rate:.1f} it/s")
        sys.stderr.flush()

    def close(self, done: int, loss: float):
        self.update(done, loss, force=True)
        sys.stderr.write("\n")
