"""Checks shared by the problem kinds: each raises naming the argument and what it expected.

Also the one place where arrays of other libraries come in and go back out (``as_array``,
``returner``): any object with ``__dlpack__`` (a torch tensor, an ``nn.Parameter``, a JAX
array) is read through DLPack, without a copy (NumPy and CuPy read any strides, so the
layout never forces one here; the problem kinds and the driver then make their own copies,
as they do of NumPy arrays, and never write to the caller's memory). Results go back as the
kind of array the caller gave (``returner``). No library is imported to recognise its arrays:
an array of it can only exist if it is in ``sys.modules`` (as array-api-compat does).
"""
from __future__ import annotations

import importlib
import math
import numbers
import sys

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class InputWarning(UserWarning):
    """Input that is valid but almost surely not what was meant (an all-False mask, a rank
    above min(m, n)); ``warnings.simplefilter("error", lorakern.InputWarning)`` makes it an
    error, ``"ignore"`` silences it."""


def array_namespace(x):
    """numpy or cupy, by the array's type; never imports cupy (it is in sys.modules if x is one)."""
    if type(x).__module__.split(".")[0] == "cupy":
        return sys.modules["cupy"]
    return np


#: DLPack device types (dlpack.h, DLDeviceType) lorakern reads: host memory, and NVIDIA GPUs
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13

#: array library -> "module:function" making an array of that library from a DLPack producer:
#: how results go back to the kind of array the caller passed (torch in, torch out)
RETURNERS: dict[str, str] = {
    "torch": "torch.utils.dlpack:from_dlpack",
    "jax": "jax.numpy:from_dlpack",
    "jaxlib": "jax.numpy:from_dlpack",
}

#: libraries whose arrays lorakern reads natively (no DLPack)
NATIVE = ("numpy", "cupy", "dask")


def library(x) -> str:
    """The top-level module of x's type: "numpy", "cupy", "torch", "jaxlib", ..."""
    return type(x).__module__.split(".")[0]


def as_array(name: str, x, *, hint: str = "dtype=np.float32"):
    """x as a NumPy or CuPy array (or a dask array), reading DLPack producers without a copy.

    NumPy, CuPy and dask arrays (and anything else without ``__dlpack__``) come back as
    they are, for the checks that follow to judge. A torch tensor that requires grad (an
    ``nn.Parameter``) is detached first (its data, not its graph: no copy). Host memory is read
    by ``np.from_dlpack``, GPU memory by CuPy (``cuda_from_dlpack``: the stream handover).
    The array returned is a read-only view of the caller's memory: nothing in lorakern can
    write to it. Lists, tuples and pandas objects get a TypeError that says how to convert.
    """
    lib = library(x)
    if isinstance(x, np.ndarray) or lib in NATIVE:
        return x
    if isinstance(x, (list, tuple)):
        raise TypeError(f"{name} is a Python {type(x).__name__}; lorakern takes arrays: "
                        f"convert it with np.asarray({name}, {hint})")
    if lib == "pandas":
        raise TypeError(f"{name} is a pandas {type(x).__name__}; lorakern takes arrays: "
                        f"convert it with {name}.to_numpy({hint})")
    if not hasattr(x, "__dlpack__"):
        return x
    if lib == "torch":
        x = x.detach()  # an nn.Parameter / a tensor in a graph: its data, shared
    try:
        kind, ordinal = x.__dlpack_device__()
    except Exception as exc:  # noqa: BLE001 - a producer's own error, re-raised named
        raise TypeError(f"{name} ({type(x).__name__}) offers __dlpack__ but not "
                        f"__dlpack_device__ ({exc})") from exc
    if kind in (KDL_CUDA, KDL_CUDA_MANAGED):
        return cuda_from_dlpack(name, x, int(ordinal))
    if kind not in (KDL_CPU, KDL_CUDA_HOST):
        raise TypeError(f"{name} ({type(x).__name__}) lives on DLPack device type {kind}, "
                        f"which lorakern cannot read; move it to the CPU or an NVIDIA GPU")
    try:
        a = np.from_dlpack(x)
    except (BufferError, TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} ({type(x).__name__}, dtype {getattr(x, 'dtype', '?')}) could "
                        f"not be read through DLPack: {exc}; convert it to float32 or "
                        f"float64 first") from exc
    a = a.view()
    a.flags.writeable = False
    return a


def dlpack_stream(ptr: int) -> int:
    """The ``stream=`` a consumer passes to ``__dlpack__`` for its CUDA stream ``ptr``: the
    pointer itself, except the legacy default stream (pointer 0), which DLPack spells 1
    (0 is not a valid value for CUDA in the array API standard)."""
    return 1 if ptr == 0 else int(ptr)


class StreamHandover:
    """A DLPack producer whose ``__dlpack__`` always names ``stream``, the consumer's stream.

    By the DLPack protocol the producer (PyTorch) then makes that stream wait for the work
    queued on its own current stream (an event recorded there, waited on by the consumer's
    stream), so a kernel lorakern launches on CuPy's stream reads the tensor only after
    PyTorch's pending writes to it. Spelled out here rather than left to a default.
    """

    def __init__(self, producer, stream: int):
        self.producer, self.stream = producer, stream

    def __dlpack__(self, stream=None, **kwargs):
        try:
            return self.producer.__dlpack__(stream=self.stream, **kwargs)
        except TypeError:
            if not kwargs:
                raise
            return self.producer.__dlpack__(stream=self.stream)  # a producer before DLPack 1.0

    def __dlpack_device__(self):
        return self.producer.__dlpack_device__()


def cuda_from_dlpack(name: str, x, ordinal: int):
    """A GPU DLPack producer as a CuPy array on GPU ``ordinal``, without a copy.

    Streams: the handover is explicit (``StreamHandover``): CuPy's current stream on that
    GPU, where lorakern launches its kernels, waits for PyTorch's current stream before
    anything of lorakern's reads the tensor; results go back the other way in ``returner``.
    """
    try:
        import cupy
    except ImportError as exc:
        from ._cuda import _INSTALL
        from ._dispatch import DeviceUnavailableError

        raise DeviceUnavailableError(
            f"{name} is a GPU array ({type(x).__name__}); reading it needs CuPy: "
            f"{_INSTALL}") from exc
    with cupy.cuda.Device(ordinal):
        stream = dlpack_stream(cupy.cuda.get_current_stream().ptr)
        return cupy.from_dlpack(StreamHandover(x, stream))


def returner(like):
    """The function that turns a result array (NumPy or CuPy) into the kind of ``like``.

    Identity unless ``like`` belongs to a library in RETURNERS (and then that library is
    already imported: the caller made one of its arrays). A torch result is on ``like``'s
    device: a NumPy result for a CUDA tensor (device="cpu" was asked) is moved there.
    """
    lib = library(like)
    if lib not in RETURNERS or lib not in sys.modules:
        return lambda a: a
    module, _, attr = RETURNERS[lib].partition(":")
    make = getattr(importlib.import_module(module), attr)
    if lib != "torch":
        return lambda a: None if a is None else make(a)
    torch, target = sys.modules["torch"], like.device

    def back(a):
        if a is None:
            return None
        if library(a) == "cupy":
            # the other half of the handover: PyTorch's current stream waits for CuPy's
            stream = torch.cuda.current_stream(a.device.id).cuda_stream
            t = make(a.__dlpack__(stream=dlpack_stream(stream)))
        else:
            t = torch.from_numpy(np.ascontiguousarray(a))  # a fresh result: shared, no copy
        return t if t.device == target else t.to(target)

    return back


def reject_masked(name: str, x, *, takes_mask: bool = False):
    """TypeError for a NumPy masked array, whose hidden entries would be used as numbers;
    ``takes_mask``: the caller has a ``mask=`` argument, and the message points to it."""
    if isinstance(x, np.ma.MaskedArray):
        fix = (f"pass {name}.data and give the observed entries as "
               f"mask=~np.ma.getmaskarray({name})" if takes_mask
               else f"pass a plain array, such as {name}.filled(value)")
        raise TypeError(f"{name} is a NumPy masked array, whose hidden entries would be used "
                        f"as numbers; {fix}")


def astype_hint(name: str, dtype, like=None) -> str:
    """How to convert ``name`` to ``dtype`` in the caller's library (``like``: the object the
    caller passed, before ``as_array``): ``B.to(torch.float64)`` for a torch tensor,
    ``B.astype(np.float64)`` otherwise (NumPy, CuPy, JAX and dask arrays have astype)."""
    dtype = np.dtype(dtype)
    if library(like) == "torch":
        return f"{name}.to(torch.{dtype})"
    return f"{name}.astype(np.{dtype})"


def check_matrix(name: str, x, dtype=None, *, takes_mask: bool = False, like=None):
    """Raise TypeError/ValueError unless x is a finite 2-D float32/float64 array (of ``dtype``)
    and not a masked array (``takes_mask``: see reject_masked). ``like``: what the caller
    passed, if ``as_array`` converted it (the conversion hint is given in its library)."""
    reject_masked(name, x, takes_mask=takes_mask)
    xp = array_namespace(x)
    if xp is np and not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy or CuPy array, or an array with __dlpack__ "
                        f"(a torch tensor, a JAX array), got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the problem is {dtype}; "
                        f"convert it with {astype_hint(name, dtype, like)}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.size and not bool(xp.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def positive_float(name: str, value) -> float:
    """value as a float > 0 and finite; TypeError for a non-number, ValueError otherwise."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{name} must be a real number > 0, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number > 0, got {type(value).__name__}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return value


def positive_int(name: str, value, *, allow_none: bool = False):
    """value as an int >= 1: TypeError for a non-number (None, a string, a bool), ValueError
    for a number that is not a positive integer (2.5, 2.0, 0)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value}")
    return int(value)


def check_delta(loss, delta):
    """The Huber threshold: positive and finite, and given only to a loss that reads it."""
    if delta is None:
        return 1.0
    if not loss.uses_delta:
        names = sorted(_losses_with_delta())
        raise ValueError(f"delta={delta!r} was given, but loss {loss.name!r} has no delta "
                         f"(only {', '.join(names)} {'uses' if len(names) == 1 else 'use'} it)")
    return positive_float("delta", delta)


def _losses_with_delta():
    from .losses import LOSSES

    return [name for name, loss in LOSSES.items() if loss.uses_delta]
