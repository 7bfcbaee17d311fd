"""The CUDA device: CuPy arrays, CUDA C kernels (fused.cu) launched through a *runtime*.

Importing this package imports nothing from CuPy; ``check_available`` probes the driver
through ctypes first and imports CuPy only where a device answers, and the runtime (CuPy) is
made on first use. Scalars stay on the device (host_scalars = False): a step never waits for
the host. The runtime is the device's: ``launch.CupyRuntime`` on a GPU, or the host emulation
of the same kernels (``emulation.HostRuntime``), which the tests use as a device of its own.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import sys

from .._dispatch import DeviceUnavailableError
from . import launch

_INSTALL = 'pip install ".[cuda]" in a clone of lorakern'


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
            f"device='cuda' needs CuPy, which is not installed: {_INSTALL} installs CuPy "
            f"for CUDA 12; for another CUDA version install the matching cupy-cudaXXx")
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
            f"matches its CUDA version; {_INSTALL} installs CuPy for CUDA 12") from exc
    if count < 1:
        raise DeviceUnavailableError("device='cuda' is unavailable: CuPy sees no CUDA device")


class CudaDevice:
    """A Device whose arrays live on a GPU (or in the host emulation of one: ``runtime``)."""

    kernels_name = "cuda"
    host_scalars = False  # scalars are 0-d device arrays; the driver looks only when asked

    def __init__(self, name: str = "cuda", runtime=None):
        self.name, self._runtime = name, runtime

    def __repr__(self):
        return f"CudaDevice({self.name!r})"

    @property
    def runtime(self):
        if self._runtime is None:
            self._runtime = launch.CupyRuntime()
        return self._runtime

    @property
    def xp(self):
        return self.runtime.xp

    @property
    def key(self):
        return (self.name, id(self._runtime) if self._runtime is not None else None)

    def check_available(self):
        if self._runtime is None:
            check_available()
        elif hasattr(self._runtime, "check_available"):
            self._runtime.check_available()

    def asarray(self, x, dtype):
        """A C-contiguous device copy of x (NumPy or CuPy)."""
        return self.xp.array(x, dtype=dtype, copy=True, order="C")

    def to_host(self, x):
        return self.runtime.to_host(x)

    def update(self, B, A, grad_B, grad_A, eta):
        """(B - eta grad_B, A - eta grad_A) as new arrays, rounded as NumPy rounds them.

        eta: a 0-d device array (read on the device, no synchronisation) or a number.
        """
        rt, xp = self.runtime, self.xp
        B, A, grad_B, grad_A = (xp.ascontiguousarray(v) for v in (B, A, grad_B, grad_A))
        B_out, A_out = xp.empty_like(B), xp.empty_like(A)
        if isinstance(eta, xp.ndarray):
            eta_ptr, eta_value = xp.ascontiguousarray(eta, dtype=xp.float64).reshape(1), 0.0
        else:
            eta_ptr, eta_value = None, float(eta)
        launch.update(rt, launch.update_kernel(rt, B.dtype), B, A, grad_B, grad_A, B_out, A_out,
                      eta_ptr=eta_ptr, eta_value=eta_value)
        return B_out, A_out


DEVICE = CudaDevice()
