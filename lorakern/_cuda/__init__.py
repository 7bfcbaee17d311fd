"""CUDA backend: the fused pass as CUDA C kernels (fused.cu) loaded through CuPy.

Importing this module imports nothing from CuPy; ``check_available`` probes the driver through
ctypes first and imports CuPy only where a device answers, and ``xp`` (CuPy) is looked up on
first use. Scalars stay on the device (SYNC_EVERY = None): a step never waits for the host.

Beyond the backend interface of lorakern._dispatch, two faster paths for a training loop:

* ``fused_step``: pass, eta_t and update in four kernel launches, nothing on the host;
* ``run_steps``: ``steps`` such steps replayed from a CUDA graph, the history kept on the
  device and copied back once at the end.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import math
import sys
from types import SimpleNamespace

import numpy as np

from .._dispatch import DeviceUnavailableError
from ..step_size import THEOREM_CONSTANT  # eta_t = 1 / max(c max(L, 1) (||V||^2 + ||G||), 1)
from . import launch

NAME = "cuda"
SYNC_EVERY = None  # scalars live on the device; the driver looks at them only when asked


_INSTALL = 'pip install "lorakern[cuda]"'


def __getattr__(name):
    if name == "xp":  # CuPy, imported on first use (PEP 562)
        return launch.runtime().xp
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- availability ---------------------------------------------------------------------------
def _driver_problem() -> str | None:
    """Why the CUDA driver cannot run kernels here, or None if it can.

    Asks libcuda directly (cuInit, cuDeviceGetCount) so that a machine without a GPU never
    imports CuPy to find out.
    """
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    found = ctypes.util.find_library("cuda")
    if found:
        names.append(found)
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return ("no NVIDIA driver was found (libcuda could not be loaded); device='cuda' needs "
                "an NVIDIA GPU with its driver installed")
    rc = lib.cuInit(0)
    if rc == 100:  # CUDA_ERROR_NO_DEVICE
        return "no CUDA-capable GPU was found (the NVIDIA driver is installed but reports no device)"
    if rc != 0:
        text = ctypes.c_char_p()
        lib.cuGetErrorName(rc, ctypes.byref(text))
        err = text.value.decode() if text.value else f"error {rc}"
        return (f"the NVIDIA driver failed to initialise ({err} from cuInit); check that the "
                f"driver is installed, loaded and supports this GPU")
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "no CUDA-capable GPU was found (cuDeviceGetCount reports none)"
    return None


def check_available():
    """Raise DeviceUnavailableError saying what is missing for device='cuda'."""
    if importlib.util.find_spec("cupy") is None:
        raise DeviceUnavailableError(
            f"device='cuda' needs CuPy, which is not installed: {_INSTALL} "
            f"(CuPy for CUDA 12; for another CUDA version install the matching cupy-cudaXXx)")
    problem = _driver_problem()
    if problem is not None:
        raise DeviceUnavailableError(f"device='cuda' is unavailable: {problem}")
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # ImportError, CUDARuntimeError, ...: CuPy cannot reach the GPU
        raise DeviceUnavailableError(
            f"device='cuda' is unavailable: CuPy is installed but cannot use a GPU "
            f"({type(exc).__name__}: {exc}); check the NVIDIA driver and that the CuPy package "
            f"matches its CUDA version ({_INSTALL} installs CuPy for CUDA 12)") from exc
    if count < 1:
        raise DeviceUnavailableError("device='cuda' is unavailable: CuPy sees no CUDA device")


# ---- the backend interface ------------------------------------------------------------------
def prepare(problem):
    """The problem's arrays on the device: NumPy arrays copied once, CuPy arrays kept."""
    xp = launch.runtime().xp

    def on_device(a):
        return None if a is None else xp.ascontiguousarray(xp.asarray(a))

    labels = problem.loss.labels
    return SimpleNamespace(
        x=on_device(problem.W0 if labels else problem.R),
        y=on_device(problem.Y) if labels else None,
        mask=on_device(problem.mask),
        plans={},
    )


def asarray(x, dtype):
    """A C-contiguous device copy of x (NumPy or CuPy)."""
    return launch.runtime().xp.array(x, dtype=dtype, copy=True, order="C")


def _contiguous(x):
    return launch.runtime().xp.ascontiguousarray(x)


def fused_pass(problem, data, B, A):
    """grad_B, grad_A and the step's norms at (B, A) in one pass over the data.

    Returns a namespace with grad_B (m, r), grad_A (r, n) and loss, g_sq, grad_sq, v_sq as
    0-d float64 device arrays (no host synchronisation).
    """
    rt = launch.runtime()
    xp = rt.xp
    B, A = _contiguous(B), _contiguous(A)
    plan = launch.plan(problem, data, B.shape[1])
    grad_B, grad_A = xp.empty(B.shape, B.dtype), xp.empty(A.shape, A.dtype)
    out = xp.empty(5, np.float64)  # fresh per pass: the 0-d views below outlive it
    plan.fused(data, B, A)
    plan.reduce(B, A, grad_B, grad_A)
    plan.finalize(out, eta_scale=THEOREM_CONSTANT * problem.eta_lipschitz)
    return SimpleNamespace(grad_B=grad_B, grad_A=grad_A, loss=out[0], g_sq=out[1],
                           grad_sq=out[2], v_sq=out[3])


def loss_pass(problem, data, B, A):
    """J(B, A) alone (0-d float64 device array): one read of the data, no gradient work."""
    xp = launch.runtime().xp
    B, A = _contiguous(B), _contiguous(A)
    plan = launch.plan(problem, data, B.shape[1])
    out = xp.empty(5, np.float64)
    plan.fused(data, B, A, grad=False)
    plan.finalize(out, grad=False)
    return out[0]


def update(B, A, grad_B, grad_A, eta):
    """(B - eta grad_B, A - eta grad_A) as new arrays, rounded as NumPy rounds them.

    eta: a 0-d device array (read on the device, no synchronisation) or a number.
    """
    rt = launch.runtime()
    xp = rt.xp
    B, A, grad_B, grad_A = (_contiguous(v) for v in (B, A, grad_B, grad_A))
    B_out, A_out = xp.empty_like(B), xp.empty_like(A)
    if isinstance(eta, xp.ndarray):
        eta_ptr, eta_value = xp.ascontiguousarray(eta, dtype=np.float64).reshape(1), 0.0
    else:
        eta_ptr, eta_value = None, float(eta)
    launch.update(rt, launch.update_kernel(B.dtype), B, A, grad_B, grad_A, B_out, A_out,
                  eta_ptr=eta_ptr, eta_value=eta_value)
    return B_out, A_out


# ---- faster paths for a training loop -------------------------------------------------------
def _eta_args(problem, constant: float, eta: float | None) -> dict:
    if eta is not None:
        if not (math.isfinite(eta) and eta > 0):
            raise ValueError(f"a constant eta must be positive and finite, got {eta}")
        return {"eta_fixed": float(eta)}
    return {"eta_scale": float(constant) * problem.eta_lipschitz}


def fused_step(problem, data, B, A, *, constant: float = THEOREM_CONSTANT, eta: float | None = None):
    """One step V_t -> V_{t+1} on the device: pass, eta_t (or the constant ``eta``), update.

    Four kernel launches and no host round trip. Returns a namespace with the new B and A
    and 0-d float64 device arrays loss, g_sq, grad_sq, v_sq, eta (all at V_t).
    """
    xp = launch.runtime().xp
    B, A = _contiguous(B), _contiguous(A)
    plan = launch.plan(problem, data, B.shape[1])
    grad_B, grad_A = xp.empty(B.shape, B.dtype), xp.empty(A.shape, A.dtype)
    B_out, A_out = xp.empty_like(B), xp.empty_like(A)
    out = xp.empty(5, np.float64)
    plan.fused(data, B, A)
    plan.reduce(B, A, grad_B, grad_A)
    plan.finalize(out, **_eta_args(problem, constant, eta))
    plan.update(B, A, grad_B, grad_A, B_out, A_out, eta_ptr=out[4:])
    return SimpleNamespace(B=B_out, A=A_out, loss=out[0], g_sq=out[1], grad_sq=out[2],
                           v_sq=out[3], eta=out[4])


def run_steps(problem, data, B, A, steps: int, *, constant: float = THEOREM_CONSTANT,
              eta: float | None = None, graph: bool = True):
    """``steps`` steps of LoRA gradient descent with the history kept on the device.

    Each step is the four launches of ``fused_step`` writing into preallocated buffers: the
    iterate alternates between two buffers, finalize appends (loss, g_sq, grad_sq, v_sq, eta)
    to the history at a device-side counter. With ``graph`` (and CuPy), the two alternating
    steps are captured once as CUDA graphs and replayed. The host waits once, at the end.

    Once J(V_t) is not finite the device stops updating, so the buffers still hold V_{t-1}.

    Returns
    -------
    Namespace with B, A (V_steps, or the last iterate whose loss was finite), ``history``
    (steps x 5 NumPy float64 array: loss, g_sq, grad_sq, v_sq, eta at V_t) and
    ``diverged_at`` (the first t with a non-finite loss, or None).
    """
    rt = launch.runtime()
    plan = launch.plan(problem, data, B.shape[1])
    ws = launch.workspace(rt, B.shape, A.shape, problem.dtype, steps)
    ws.B[0][...] = B
    ws.A[0][...] = A
    eta_args = _eta_args(problem, constant, eta)

    def one(src: int):
        dst = 1 - src
        plan.fused(data, ws.B[src], ws.A[src])
        plan.reduce(ws.B[src], ws.A[src], ws.grad_B, ws.grad_A)
        plan.finalize(ws.history, counter=ws.counter, current=ws.current, ok=ws.ok, **eta_args)
        plan.update(ws.B[src], ws.A[src], ws.grad_B, ws.grad_A, ws.B[dst], ws.A[dst],
                    eta_ptr=ws.current, ok=ws.ok)

    if steps > 0:
        if graph and getattr(rt, "supports_graphs", False):
            graphs = [rt.capture(lambda: one(0)), rt.capture(lambda: one(1))]
            rt.replay(graphs, [t % 2 for t in range(steps)])
        else:
            for t in range(steps):
                one(t % 2)
    history = np.asarray(rt.to_host(ws.history))[:steps]
    bad = np.flatnonzero(~np.isfinite(history[:, 0]))
    if bad.size:
        t_bad = int(bad[0])
        keep = 0 if t_bad == 0 else (t_bad - 1) % 2
        return SimpleNamespace(B=ws.B[keep], A=ws.A[keep], history=history, diverged_at=t_bad)
    return SimpleNamespace(B=ws.B[steps % 2], A=ws.A[steps % 2], history=history, diverged_at=None)


def kernel_info(problem, data, r: int) -> dict:
    """The launch configuration chosen for this problem at rank r (for benchmarks, reports)."""
    return launch.plan(problem, data, r).describe()
