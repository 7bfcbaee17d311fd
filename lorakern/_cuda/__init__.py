"""The CUDA device: CuPy arrays, CUDA C kernels (fused.cu) launched through a *runtime*.

Importing this package imports nothing from CuPy; ``check_available`` probes the driver
through ctypes first and imports CuPy only where a device answers, and the runtime (CuPy) is
made on first use. Scalars stay on the device (host_scalars = False): a step never waits for
the host. The runtime is the device's: ``launch.CupyRuntime`` on a GPU, or the host emulation
of the same kernels (``emulation.HostRuntime``), which the tests use as a device of its own.
"""
from __future__ import annotations

import contextlib
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
            f"for CUDA 12 (CUDA 12 and 13 drivers run it); pip install \".[cuda13]\" installs CuPy "
            f"built for CUDA 13")
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


def gpu_count() -> int:
    """The GPUs CuPy sees (after check_available passed)."""
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


class CudaDevice:
    """A Device whose arrays live on a GPU (or in the host emulation of one: ``runtime``)."""

    kernels_name = "cuda"
    host_scalars = False  # scalars are 0-d device arrays; the driver looks only when asked

    def __init__(self, name: str = "cuda", runtime=None, ordinal: int | None = None):
        self.name, self._runtime, self.ordinal = name, runtime, ordinal

    def __repr__(self):
        return f"CudaDevice({self.name!r})"

    def on(self, ordinal: int) -> "CudaDevice":
        """This device on GPU ``ordinal`` ("cuda:1"): its own runtime, made on first use."""
        return CudaDevice(f"{self.name.partition(':')[0]}:{ordinal}", None, ordinal)

    def context(self):
        """GPU ``ordinal`` made CuPy's current device (a no-op for "cuda", the current one,
        and for a host runtime)."""
        if self.ordinal is None or getattr(self._runtime, "name", "cupy") != "cupy":
            return contextlib.nullcontext()
        import cupy

        return cupy.cuda.Device(self.ordinal)

    @property
    def runtime(self):
        if self._runtime is None:
            with self.context():  # CupyRuntime reads the current GPU's attributes
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
            try:
                check_available()
            except DeviceUnavailableError as exc:
                if self.ordinal is None:
                    raise
                raise DeviceUnavailableError(f"device={self.name!r} (GPU {self.ordinal}) is "
                                             f"unavailable: {exc}") from None
            if self.ordinal is not None:
                count = gpu_count()
                if self.ordinal >= count:
                    raise DeviceUnavailableError(
                        f"device={self.name!r} asks for GPU {self.ordinal}, but {count} "
                        f"GPU{'s are' if count != 1 else ' is'} visible (indices 0 to "
                        f"{count - 1}; CUDA_VISIBLE_DEVICES selects and renumbers them)")
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
