"""step() and fit(): LoRA gradient descent on any device, for any problem kind.

A step is one fused pass (gradients and norms at V_t), the policy's eta, and the update
B_{t+1} = B_t - eta grad_B, A_{t+1} = A_t - eta grad_A, both from the old iterate (eq. 3).
Nothing here knows a problem kind or a device: it talks to an Engine (_dispatch.py).
"""
from __future__ import annotations

import math
import numbers
import time
import warnings

import numpy as np

from . import _dispatch
from ._interrupt import DeferredInterrupt, FitInterrupted
from ._progress import Progress
from ._validate import RETURNERS, library, positive_int, returner
from .adapters import check_adapters
from .results import (HISTORY_FIELDS, FitProgress, FitResult, History, StepResult,
                      history_from_columns)
from .step_size import as_policy, check_state

#: let kernels with ``run_steps`` (CUDA) run a whole fit on the device, history included,
#: when nothing needs the host between steps (no tol, no progress bar, a policy with a
#: device loop); tests switch it off to compare with the step-by-step loop
DEVICE_LOOP = True


def _start(problem, B, A, device, step_size):
    B, A = check_adapters(problem, B, A)
    policy = as_policy(step_size)
    engine = _dispatch.bind(problem, device, B, A)
    with engine.scope():
        return engine, policy, engine.asarray(B), engine.asarray(A)


def step(problem, B, A, *, device="auto", step_size="certified") -> StepResult:
    """One step of LoRA gradient descent.

    Parameters
    ----------
    problem : a Problem (or another problem kind).
    B, A : (m, r) and (r, n) adapters of the problem's dtype; never modified. NumPy or CuPy
        arrays, or any array with ``__dlpack__`` (torch tensors, ``nn.Parameter``, JAX
        arrays), read without a copy (the step works on its own copy, as for NumPy arrays).
    device : "cpu", "cuda", "cuda:<i>" (GPU i; "cuda" is "cuda:0"), "reference", "auto"
        (where the arrays live), a ``torch.device`` (by its name), or a Device object.
    step_size : "certified" (the default: a line search keeping Lemma 2's decrease with
        eta >= eta_t; "exact" forces its quartic search), "theorem" (the paper's eta_t
        literally: to reproduce the paper, or for a GPU fit run as one device-side loop),
        "armijo", a positive float, or a policy object. Until 2026-12 the default was
        "theorem", whose steps are short: pass it by name to get the old behaviour.

    Returns
    -------
    StepResult with the new B and A (new arrays on the device; of B's kind when B is a torch
    tensor or a JAX array: torch in, torch out, on B's device) and Python floats.

    Raises
    ------
    TypeError, ValueError : bad arrays or arguments (inputs are left untouched).
    DeviceUnavailableError : the device cannot be used here.
    """
    back = returner(B)
    engine, policy, B, A = _start(problem, B, A, device, step_size)
    with engine.scope():  # "cuda:i": GPU i current while the step runs
        p = engine.fused_pass(B, A, norm=policy.norm)
        eta, trials = policy.choose(engine, B, A, p, {})
        B_next, A_next = engine.update(B, A, p.grad_B, p.grad_A, eta)
    return StepResult(B=back(B_next), A=back(A_next), eta=float(eta), loss=float(p.loss),
                      grad_sq=float(p.grad_sq), v_sq=float(p.v_sq),
                      g_norm=math.sqrt(float(p.g_sq)), trials=int(trials))


def _check_fit_args(steps, tol, check_every):
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an integer, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if tol is not None:
        if isinstance(tol, (bool, np.bool_)) or not isinstance(tol, numbers.Real):
            raise TypeError(f"tol must be None or a number >= 0, got {tol!r}")
        if not tol >= 0:
            raise ValueError(f"tol must be None or a number >= 0, got {tol}")
    return positive_int("check_every", check_every, allow_none=True)


def fit(problem, B, A, *, steps: int, device="auto", step_size="certified",
        tol: float | None = None, progress: bool = False, check_every: int | None = None,
        state: dict | None = None, callback=None, callback_every: int = 1) -> FitResult:
    """Run ``steps`` steps of LoRA gradient descent from (B, A).

    Parameters
    ----------
    problem, B, A, device, step_size : as for ``step``. The default, "certified", is a line
        search: it needs J at its trial points on the host at every step, so on a GPU it runs
        the step-by-step loop (one host round trip per step). "theorem" (the paper's eta_t)
        and a constant eta are the steps a GPU runs as one device-side loop, the whole fit
        without the host; name one of them for that (``_fit_on_device``).
    steps : the number of steps T (>= 0).
    tol : stop early, before stepping, once grad_sq <= tol at the current iterate.
    progress : show progress on stderr: a bar redrawn in place on a terminal; elsewhere (a
        log file, a pipe, CI) a line at every tenth of the steps, and at least every 30 s,
        with the rate and the time left.
    check_every : on a device whose scalars stay on it (CUDA), how often the host looks at
        the numbers (tol, progress, divergence); default: every step on the CPU, every 50 on
        a GPU when ``tol`` or ``progress`` asks for it, else only at the end.
    state : the step-size policy's state to start from: a previous result's ``state``, to
        resume a fit exactly (below). Copied: the dict passed is not changed. A key the
        policy does not keep (Armijo and Certified keep "eta", the others nothing) or a
        value that is not a positive step size raises ValueError/TypeError.
    callback : called as ``callback(info)`` at t = k, 2k, ... < T (k = ``callback_every``),
        between steps, with a ``FitProgress``: ``t`` (steps done), ``B``, ``A`` (the
        iterate V_t, arrays of the device, or of B's kind when B is a torch tensor or a JAX
        array: the fit's own iterate, to read, not write; NumPy arrays come as read-only
        views), ``loss`` J(V_t),
        ``grad_sq``, ``eta`` (of the step that led to V_t) and ``seconds``. If it returns
        True (or raises StopIteration, as SciPy's ``minimize`` callbacks may) the fit stops
        there, before stepping, with status "stopped" and V_t as its result. The final
        iterate V_T is the returned result, not a callback. A callback needs the host
        between steps, so a fit with one runs the step-by-step loop, never a device-side
        loop (CUDA's ``run_steps``), and on a GPU waits for the host every k steps.
        If the callback raises any other exception, the fit stops and the exception
        propagates with the fit so far attached as ``exc.result``: a FitResult of the steps
        taken, status "stopped", V_t as its iterate (resume from it as from any result).
    callback_every : k above, a positive integer.

    Returns
    -------
    FitResult (B and A of B's kind, as ``step`` returns them). If the loss stops being finite,
    at any step or at V_T, the loop stops, keeps the last iterate with a finite loss, sets
    status "diverged" and warns.

    Ctrl-C (SIGINT) does not lose the steps taken: the loop stops at the end of the current
    step and returns a FitResult with status "interrupted", the last completed iterate, its
    loss and the history so far (``theory.check`` covers those steps), and warns
    (``FitInterrupted``) with how to resume: ``fit(problem, result.B, result.A,
    steps=<remaining>, ...)``, which for "theorem" or a constant step size continues the
    same iterates bit for bit. A second Ctrl-C raises KeyboardInterrupt at once. The device
    loop of a GPU (CUDA graphs) is asked between chunks of ``_cuda.matrix.STOP_EVERY`` steps,
    so it stops within that many steps. This holds where fit runs on the main thread and
    SIGINT has Python's default handler; elsewhere KeyboardInterrupt propagates as usual
    (lorakern/_interrupt.py). The caller's arrays are never written, on any path.

    Raises
    ------
    TypeError, ValueError : bad arrays or arguments, named (inputs are left untouched).
    DeviceUnavailableError : the device cannot be used here.

    Notes
    -----
    **Resuming.** A fit continues from a result ``r`` with

        more = fit(problem, r.B, r.A, steps=k, step_size=r.step_size, state=r.state)

    and that is the same computation as one longer fit: on the same device, two fits of
    150 steps chained this way end at the same iterate, bit for bit, as one fit of 300
    steps. The theorem's eta_t and a constant depend on V_t alone; Armijo's search starts
    from twice the last accepted eta, which ``state`` carries. ``more.history`` holds the
    new steps only (t counts from 0 again).
    """
    check_every = _check_fit_args(steps, tol, check_every)
    callback_every = positive_int("callback_every", callback_every)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    back = returner(B)
    if callback is not None:  # it sees B's kind of array, NumPy's read-only
        callback = _presenting(callback, back if library(B) in RETURNERS else _read_only)
    engine, policy, B, A = _start(problem, B, A, device, step_size)
    state = check_state(state, policy)  # a copy: the caller's dict is never changed
    try:
        with DeferredInterrupt() as stop, engine.scope():  # "cuda:i": GPU i current meanwhile
            result = _fit(engine, policy, B, A, steps, tol, progress, check_every, stop,
                          state, callback, callback_every)
    except Exception as exc:  # the callback raised: its exception carries the fit so far
        so_far = getattr(exc, "result", None)
        if isinstance(so_far, FitResult) and getattr(exc, "_lorakern_fit", None) is so_far:
            so_far.B, so_far.A = back(so_far.B), back(so_far.A)
            del exc._lorakern_fit
        raise
    result.B, result.A = back(result.B), back(result.A)  # torch in, torch out
    if result.status == "interrupted":
        warnings.warn(f"fit was interrupted (Ctrl-C) after {result.steps} of {steps} steps and "
                      f"returned the last completed iterate; to go on, call fit(problem, "
                      f"result.B, result.A, steps={steps - result.steps}, "
                      f"step_size=result.step_size, state=result.state)", FitInterrupted,
                      stacklevel=2)
    return result


def _presenting(callback, show):
    """``callback`` given FitProgress with B and A passed through ``show``: the caller's kind
    of array (``returner``: a torch tensor sharing the device array's memory, no copy on the
    CPU), or ``_read_only``."""
    def call(progress):
        progress.B, progress.A = show(progress.B), show(progress.A)
        return callback(progress)

    return call


def _read_only(a):
    """A NumPy array as a read-only view: the fit's own iterate, which a callback writing
    into it would change under the fit (CuPy arrays have no such flag: as they are)."""
    if isinstance(a, np.ndarray):
        a = a.view()
        a.flags.writeable = False
    return a


def _fit(engine, policy, B, A, steps, tol, progress, check_every, stop, state, callback,
         callback_every) -> FitResult:
    """fit()'s loops, with SIGINT deferred to a step boundary (``stop.requested``)."""
    problem = engine.problem
    loop_args = policy.device_loop(problem)
    if (DEVICE_LOOP and engine.run_steps is not None and tol is None and not progress
            and check_every is None and loop_args is not None and callback is None):
        return _fit_on_device(engine, policy, B, A, steps, loop_args, stop, state)
    xp, to_host = engine.xp, engine.device.to_host
    if check_every is None:
        check_every = 1 if engine.device.host_scalars else (50 if tol is not None or progress
                                                            else steps + 1)
    bar = Progress(steps) if progress else None
    rows = {name: [] for name in HISTORY_FIELDS}
    status, t0 = "completed", time.perf_counter()
    # V_{t-1} while J(V_t) is checked; kept on the device so no step waits for the host
    B_kept, A_kept, finite = B, A, xp.asarray(True)
    last = raised = None
    for t in range(steps):
        if stop.requested:  # Ctrl-C: V_t, the last completed iterate, is the answer
            status = "interrupted"
            break
        p = engine.fused_pass(B, A, norm=policy.norm)
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
        if callback is not None and t > 0 and t % callback_every == 0:
            if not bool(finite):
                status = "diverged"
                break
            try:
                stop_here = _call_back(callback, t, B, A, p, rows["eta"][-1], t0)
            except Exception as exc:  # propagated below, with the steps taken attached
                status, last, raised = "stopped", p, exc
                break
            if stop_here:
                status, last = "stopped", p
                break
        eta, trials = policy.choose(engine, B, A, p, state)
        for name, value in (("loss", p.loss), ("eta", eta), ("grad_sq", p.grad_sq),
                            ("v_sq", p.v_sq), ("g_norm", xp.sqrt(xp.asarray(p.g_sq))),
                            ("trials", trials)):
            rows[name].append(value)
        B_prev, A_prev = B, A
        B, A = engine.update(B, A, p.grad_B, p.grad_A, eta)
    history = _history(rows, xp, to_host, problem)
    if status in ("converged", "stopped"):
        # stopped before stepping at t: history holds steps 0..t-1, V_t is the answer
        # (tol checks run on the host, every step on the CPU, so nothing is recorded past t)
        steps_taken, final_loss = len(history), float(last.loss)
    else:
        ok = np.isfinite(history.loss)
        first_bad = len(history) if ok.all() else int(np.argmin(ok))
        if status == "diverged" or first_bad < len(history):
            # J(V_t) was not finite at t = first_bad: V_{t-1} is the last finite iterate
            steps_taken, B, A = max(first_bad - 1, 0), B_kept, A_kept
            final_loss = float(engine.loss_pass(B, A))
        else:
            steps_taken, final_loss = len(history), float(engine.loss_pass(B, A))
            if not math.isfinite(final_loss) and steps_taken:
                # the last step blew up: V_{T-1} is the last iterate with a finite loss
                steps_taken -= 1
                B, A, final_loss = B_prev, A_prev, float(history.loss[steps_taken])
        if steps_taken < len(history) or status == "diverged":
            status, history = "diverged", history.truncated(steps_taken)
            _warn_diverged(steps_taken, stacklevel=4)
    if bar:
        bar.close(steps_taken, final_loss, status)
    result = FitResult(B=B, A=A, final_loss=final_loss, steps=steps_taken, history=history,
                       status=status, seconds=time.perf_counter() - t0, step_size=policy,
                       state=state, W0=getattr(problem, "W0", None))
    if raised is not None:
        # the callback's exception, with the fit so far: ``exc.result`` (fit() hands its B and
        # A back as the caller's kind of array; the marker tells it the result is this fit's)
        try:
            raised.result = raised._lorakern_fit = result
        except AttributeError:  # an exception type that takes no attributes: as it is
            pass
        raise raised
    return result


def _call_back(callback, t, B, A, p, eta, t0) -> bool:
    """Call fit's callback at V_t; True if it asks the fit to stop."""
    info = FitProgress(t=t, B=B, A=A, loss=float(p.loss), grad_sq=float(p.grad_sq),
                       eta=float(eta), seconds=time.perf_counter() - t0)
    try:
        answer = callback(info)
    except StopIteration:
        return True
    return isinstance(answer, (bool, np.bool_)) and bool(answer)  # True only: not any truthy


def _fit_on_device(engine, policy, B, A, steps, loop_args, stop, state) -> FitResult:
    """fit() as one device-side loop (Kernels.run_steps): no host round trip per step (but
    one per chunk of steps where a Ctrl-C can stop it: ``stop``)."""
    problem, t0 = engine.problem, time.perf_counter()
    run = engine.run_steps(problem, engine.data, B, A, steps, **loop_args,
                           stop=stop if stop.installed else None)
    history = history_from_columns(run.history, dtype=problem.dtype,
                                   lipschitz=problem.eta_lipschitz)
    B, A, steps_taken = run.B, run.A, len(history)
    if run.diverged_at is not None:
        # as in the host loop: keep V_{t-1}, the last iterate whose loss was finite
        steps_taken = max(run.diverged_at - 1, 0)
    final_loss = float(engine.loss_pass(B, A))
    if run.diverged_at is None and not math.isfinite(final_loss) and len(history) > 0:
        steps_taken = len(history) - 1  # the last step blew up
        B, A, final_loss = run.B_prev, run.A_prev, float(history.loss[steps_taken])
    status = "completed" if len(history) == steps else "interrupted"  # stopped by Ctrl-C
    if steps_taken < len(history):
        status, history = "diverged", history.truncated(steps_taken)
        _warn_diverged(steps_taken, stacklevel=5)
    return FitResult(B=B, A=A, final_loss=final_loss, steps=steps_taken, history=history,
                     status=status, seconds=time.perf_counter() - t0, step_size=policy,
                     state=state, W0=getattr(problem, "W0", None))


def _warn_diverged(steps_taken: int, stacklevel: int):
    """Warn at fit's caller (``stacklevel`` counts the frames from here up to it)."""
    warnings.warn(f"the loss stopped being finite after step {steps_taken}; returning the "
                  f"last iterate with a finite loss", RuntimeWarning, stacklevel=stacklevel)


def _history(rows, xp, to_host, problem) -> History:
    arrays = {}
    for name, values in rows.items():
        kind = np.int64 if name == "trials" else np.float64
        if values and xp is not np:
            values = to_host(xp.stack([xp.asarray(v, dtype=kind) for v in values]))
        arrays[name] = np.asarray([float(v) for v in values] if kind is np.float64 else values,
                                  dtype=kind).reshape(-1)
    return History(**arrays, dtype=problem.dtype, lipschitz=problem.eta_lipschitz)
