"""The matrix kind on CUDA: the fused pass of fused.cu through the device's runtime.

Beyond the Kernels interface of lorakern._dispatch, two faster paths for a training loop:

* ``fused_step``: pass, eta_t and update in three kernel launches, nothing on the host;
* ``run_steps``: ``steps`` steps of two launches each (the pass, the tail: fused.cu), replayed
  from CUDA graphs, the history kept on the device and copied back once at the end.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from ..results import DEVICE_HISTORY_COLUMNS, DeviceRun, PassResult
from ..step_size import THEOREM  # eta_t = 1 / max(c max(L, 1) (||V||^2 + ||G||), 1)
from . import launch

#: with ``stop`` (fit on the main thread: Ctrl-C) the device loop runs in chunks of this many
#: steps, waits for each, and asks stop() before the next, so a Ctrl-C ends the run within
#: one chunk. The cost is one host round trip per chunk (~10-20 us of idle GPU, against the
#: >= 32 steps of at least tens of us each); not yet measured on a GPU.
STOP_EVERY = 32


# ---- the Kernels interface ------------------------------------------------------------------
def prepare(problem, device):
    """The problem's arrays on the device: NumPy arrays copied once, CuPy arrays kept."""
    rt = device.runtime
    xp = rt.xp

    def on_device(a):
        return None if a is None else xp.ascontiguousarray(xp.asarray(a))

    return SimpleNamespace(rt=rt, x=on_device(problem.base), y=on_device(problem.labels),
                           mask=on_device(problem.mask), plans={})


def fused_pass(problem, data, B, A, *, norm="exact"):
    """grad_B, grad_A and the step's norms at (B, A) in one pass over the data.

    The scalars of the PassResult are 0-d float64 device arrays (no host synchronisation).
    """
    xp = data.rt.xp
    B, A = xp.ascontiguousarray(B), xp.ascontiguousarray(A)
    plan = launch.plan(problem, data, B.shape[1])
    grad_B, grad_A = xp.empty(B.shape, B.dtype), xp.empty(A.shape, A.dtype)
    out = xp.empty(5, np.float64)  # fresh per pass: the 0-d views below outlive it
    plan.fused(data, B, A)
    plan.tail(B, A, out, grad_B=grad_B, grad_A=grad_A)  # no update; its eta is not used here
    plan.finish(out)
    col = {name: out[i] for i, name in enumerate(DEVICE_HISTORY_COLUMNS)}
    return PassResult(grad_B=grad_B, grad_A=grad_A, loss=col["loss"], g_sq=col["g_sq"],
                      grad_sq=col["grad_sq"], v_sq=col["v_sq"])


def loss_pass(problem, data, B, A):
    """J(B, A) alone (0-d float64 device array): one read of the data, no gradient work."""
    xp = data.rt.xp
    B, A = xp.ascontiguousarray(B), xp.ascontiguousarray(A)
    plan = launch.plan(problem, data, B.shape[1])
    out = xp.empty(5, np.float64)
    plan.fused(data, B, A, grad=False)
    plan.tail(B, A, out, grad=False)
    return out[DEVICE_HISTORY_COLUMNS.index("loss")]


# ---- faster paths for a training loop -------------------------------------------------------
def _eta_args(eta_scale: float | None, eta_fixed: float | None) -> dict:
    if eta_fixed is not None:
        if not (math.isfinite(eta_fixed) and eta_fixed > 0):
            raise ValueError(f"a constant eta must be positive and finite, got {eta_fixed}")
        return {"eta_fixed": float(eta_fixed)}
    return {"eta_scale": float(eta_scale)}


def _default_scale(problem, eta_scale):
    """eta_scale, or the theorem's (its device_loop: c max(L, 1)) where it is None."""
    return THEOREM.device_loop(problem)["eta_scale"] if eta_scale is None else eta_scale


def fused_step(problem, data, B, A, *, eta_scale: float | None = None, eta_fixed: float | None = None):
    """One step V_t -> V_{t+1} on the device: pass, eta_t = 1 / max(eta_scale (||V||^2 +
    ||G||), 1) (default: the theorem's), or the constant ``eta_fixed``, and the update.

    Three kernel launches and no host round trip. Returns a namespace with the new B and A
    and 0-d float64 device arrays loss, g_sq, grad_sq, v_sq, eta (all at V_t).
    """
    xp = data.rt.xp
    B, A = xp.ascontiguousarray(B), xp.ascontiguousarray(A)
    plan = launch.plan(problem, data, B.shape[1])
    B_out, A_out = xp.empty_like(B), xp.empty_like(A)
    out = xp.empty(5, np.float64)
    plan.fused(data, B, A)
    plan.tail(B, A, out, B_out=B_out, A_out=A_out, **_eta_args(_default_scale(problem, eta_scale), eta_fixed))
    plan.finish(out)
    eta_at = DEVICE_HISTORY_COLUMNS.index("eta")
    return SimpleNamespace(B=B_out, A=A_out, eta=out[eta_at],
                           **{name: out[i] for i, name in enumerate(DEVICE_HISTORY_COLUMNS)
                              if name != "eta"})


def run_steps(problem, data, B, A, steps: int, *, eta_scale: float | None = None,
              eta_fixed: float | None = None, graph: bool = True, stop=None) -> DeviceRun:
    """``steps`` steps of LoRA gradient descent with the history kept on the device.

    Each step is two launches writing into preallocated buffers: the pass and the tail, which
    updates the iterate (it alternates between two buffers) and appends a row
    (DEVICE_HISTORY_COLUMNS) to the history at a device-side counter, with the previous row's
    ||grad J||^2; one ``finish`` after the last step completes the last row. With ``graph``
    (and a runtime that has them), the two alternating steps are captured once as CUDA graphs
    and replayed. The host waits once, at the end.

    ``stop``: None (the default), or a callable asked before each chunk of STOP_EVERY
    steps, after the previous chunk has finished on the device; once it returns True no
    further step is launched and the run is that of the steps done (the history has one
    row each). The iterates are the same bits as in one uninterrupted run.

    Once J(V_t) is not finite the device stops updating, so the buffers still hold V_{t-1}.
    Returns a DeviceRun: V_steps (or the last iterate whose loss was finite), V_{steps-1} in
    B_prev / A_prev, the history and the first t with a non-finite loss (or None).
    """
    rt = data.rt
    plan = launch.plan(problem, data, B.shape[1])
    ws = launch.workspace(rt, B.shape, A.shape, problem.dtype, steps)
    # B, A may be host (NumPy) arrays: copied to the device first (CuPy refuses to fill a
    # device array from a non-scalar NumPy array: "cannot be used for fill")
    ws.B[0][...] = rt.xp.asarray(B)
    ws.A[0][...] = rt.xp.asarray(A)
    eta_args = _eta_args(_default_scale(problem, eta_scale), eta_fixed)

    def one(src: int):  # step t reads buffer src = t % 2, writes 1 - src (iterate, ok, norms)
        dst = 1 - src
        plan.fused(data, ws.B[src], ws.A[src])
        plan.tail(ws.B[src], ws.A[src], ws.history, B_out=ws.B[dst], A_out=ws.A[dst], parity=src,
                  counter=ws.counter, ok_in=ws.ok[src:src + 1], ok_out=ws.ok[dst:dst + 1], **eta_args)

    if steps > 0:
        graphs = None
        if graph and getattr(rt, "supports_graphs", False):
            graphs = [rt.capture(lambda: one(0)), rt.capture(lambda: one(1))]
        done, chunk = 0, steps if stop is None else STOP_EVERY
        while done < steps and not (stop is not None and stop()):
            end = min(done + chunk, steps)
            if graphs is not None:
                rt.replay(graphs, [t % 2 for t in range(done, end)])
            else:
                for t in range(done, end):
                    one(t % 2)
            if stop is not None:
                rt.to_host(ws.counter)  # wait for the chunk: stop() is asked about done steps
            done = end
        steps = done
        if steps > 0:  # the last row's ||grad J||^2 (each earlier row got it from the next tail)
            plan.finish(ws.history, parity=(steps - 1) % 2, counter=ws.counter)
    history = np.asarray(rt.to_host(ws.history))[:steps]
    bad = np.flatnonzero(~np.isfinite(history[:, DEVICE_HISTORY_COLUMNS.index("loss")]))
    if bad.size:
        t_bad = int(bad[0])
        keep = 0 if t_bad == 0 else (t_bad - 1) % 2
        return DeviceRun(B=ws.B[keep], A=ws.A[keep], B_prev=None, A_prev=None,
                         history=history, diverged_at=t_bad)
    last, prev = steps % 2, (steps - 1) % 2
    return DeviceRun(B=ws.B[last], A=ws.A[last], B_prev=ws.B[prev] if steps else None,
                     A_prev=ws.A[prev] if steps else None, history=history, diverged_at=None)


def kernel_info(problem, data, r: int) -> dict:
    """The launch configuration chosen for this problem at rank r (for benchmarks, reports)."""
    return launch.plan(problem, data, r).describe()
