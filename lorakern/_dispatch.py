"""The two tables: devices, and kernels per (problem kind, device).

A *device* says where arrays live and how the iterate is updated there (``Device``). The
*kernels* of a problem kind on a device compute its fused pass (``Kernels``). Both are looked
up by name, imported on first use and cached; a missing entry raises DeviceUnavailableError
naming what exists. Adding a problem kind is a module per device plus rows in ``KERNELS``;
adding a device is a module with a ``DEVICE`` plus rows in ``DEVICES`` and ``KERNELS``
(docs/architecture.md says which files to touch).

Devices may be objects (a device that wraps another needs its own state); the strings are
shortcuts for the registered instances. A device object not in the table finds its kernels
through ``KERNELS[(kind, device.kernels_name)]``.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Any, Protocol, runtime_checkable

#: device name -> "module:attribute" of its Device instance
DEVICES: dict[str, str] = {
    "reference": "lorakern.reference:DEVICE",
    "cpu": "lorakern._cpu:DEVICE",
    "cuda": "lorakern._cuda:DEVICE",
}

#: (problem kind, device's kernels_name) -> module implementing Kernels for that pair
KERNELS: dict[tuple[str, str], str] = {
    ("matrix", "reference"): "lorakern.reference.matrix",
    ("matrix", "cpu"): "lorakern._cpu.matrix",
    ("matrix", "cuda"): "lorakern._cuda.matrix",
    ("matrix", "dask"): "lorakern._dask.matrix",
    ("linear", "reference"): "lorakern.reference.linear",
    ("linear", "cpu"): "lorakern._cpu.linear",
    ("linear", "cuda"): "lorakern._cuda.linear",
}

#: array library -> "module:function" making the device for arrays of that library out of the
#: device the user named: wrap(spec, arrays) -> Device. A problem on dask arrays runs the
#: named device on each of its row shards (lorakern._dask).
WRAPPERS: dict[str, str] = {
    "dask": "lorakern._dask:wrap",
}

#: (problem kind, array library) -> "module:function" filling in a problem of that kind from
#: arrays of that library: fill(problem, *arrays, kwargs), with the problem's loss already
#: set. A problem kind asks this table (``wrapped_problem``) and never imports the wrapping
#: device's modules itself, so no problem module depends on a device (no import circle).
WRAPPED_PROBLEMS: dict[tuple[str, str], str] = {
    ("matrix", "dask"): "lorakern._dask.problem:init_sharded",
}

#: the device names a user can pass: the table's and "auto" (where the arrays live); a
#: device with several units also takes an index, "cuda:1" (PyTorch's spelling)
DEVICE_NAMES = ("cpu", "cuda", "auto", "reference")


class DeviceUnavailableError(RuntimeError):
    """The requested device cannot be used here; the message says what is missing."""


@runtime_checkable
class Device(Protocol):
    """Where arrays live, and the update of the iterate there."""

    name: str            # shown to users: "cpu", "cuda", "reference", ...
    kernels_name: str    # the device column of KERNELS
    host_scalars: bool   # True: a pass's scalars are host numbers (the driver may look every step)

    @property
    def xp(self) -> Any:
        """The array namespace (numpy or cupy)."""

    @property
    def key(self) -> Any:
        """Hashable: a Problem keeps one prepared copy of its data per key."""

    def check_available(self) -> None:
        """Raise DeviceUnavailableError saying what is missing."""

    def asarray(self, x, dtype) -> Any:
        """A C-contiguous copy of x on this device."""

    def to_host(self, x) -> Any:
        """x (an array or a 0-d scalar of this device) as NumPy."""

    def update(self, B, A, grad_B, grad_A, eta) -> tuple:
        """(B - eta grad_B, A - eta grad_A) as new arrays, rounded as NumPy rounds them."""


@runtime_checkable
class Kernels(Protocol):
    """One problem kind's fused pass on one device.

    Optional: ``run_steps(problem, data, B, A, steps, *, eta_scale=None, eta_fixed=None,
    stop=None) -> results.DeviceRun``, a whole fit on the device for policies that need no
    host; ``stop`` (a callable or None) is asked between chunks of steps and ends the run
    early when it returns True (Ctrl-C, lorakern/_interrupt.py);
    ``line_quartic(problem, data, B, A, grad_B, grad_A) -> (a2, a3, a4)``, the coefficients
    of J(V - eta grad J) as a quartic in eta (squared loss; step_size.Certified's exact search).
    """

    def prepare(self, problem, device) -> Any:
        """The problem's data as these kernels read it, made once per device."""

    def fused_pass(self, problem, data, B, A, *, norm: str = "exact") -> Any:
        """results.PassResult at (B, A). ``norm="bound"`` lets the kernels put a certified
        upper bound on ||G||_F in ``g_sq`` where the exact value is costly."""

    def loss_pass(self, problem, data, B, A) -> Any:
        """J(B, A) alone (a scalar of the device)."""


_cache: dict[str, Any] = {}


def _load(target: str):
    if target not in _cache:
        module, _, attr = target.partition(":")
        obj = importlib.import_module(module)
        _cache[target] = getattr(obj, attr) if attr else obj
    return _cache[target]


def parse_device(name: str) -> tuple[str, int | None]:
    """("cuda", 1) for "cuda:1", ("cpu", None) for "cpu": a table name and a unit index.

    ValueError for a name not in DEVICES, or an index that is not a non-negative integer.
    """
    base, sep, index = name.partition(":")
    if base not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known devices: "
                         f"{sorted(DEVICES) + ['auto']} (a GPU by index: 'cuda:0', 'cuda:1', ...)")
    if not sep:
        return base, None
    if not (index.isascii() and index.isdigit()):
        raise ValueError(f"device {name!r}: the index after {base + ':'!r} must be a "
                         f"non-negative integer, such as {base + ':0'!r}")
    return base, int(index)


def device(name: str) -> Device:
    """The registered Device for a name (not "auto"), checked to be usable here.

    "cuda:i" is the CUDA device on GPU i (its own instance, kept); a device without units
    ("cpu") refuses an index.
    """
    base, index = parse_device(name)
    dev = _load(DEVICES[base])
    if index is not None:
        if not hasattr(dev, "on"):
            raise ValueError(f"device {base!r} has no units to pick by index; use {base!r}")
        key = f"{DEVICES[base]}@{index}"
        if key not in _cache:
            _cache[key] = dev.on(index)
        dev = _cache[key]
    dev.check_available()  # raises DeviceUnavailableError with what to install
    return dev


def resolve(spec, *arrays) -> Device:
    """A device name ("auto": "cuda" if any array is a CuPy array, else "cpu") or object.

    Arrays of a library in WRAPPERS (dask) get that library's device, wrapped around ``spec``.
    A ``torch.device`` is taken by its name (``tensor.device``: "cpu", "cuda", "cuda:1").
    """
    if type(spec).__module__ == "torch" and type(spec).__name__ == "device":
        spec = str(spec)  # torch is imported: the caller made one of its objects
    library = _wrapping_library(arrays)
    if library is not None:
        return _load(WRAPPERS[library])(spec, arrays)
    if isinstance(spec, str):
        if spec == "auto":
            gpu = [a for a in arrays if a is not None and _is_cupy(a)]
            spec = f"cuda:{gpu[0].device.id}" if gpu else "cpu"  # the GPU the arrays are on
        return device(spec)
    if isinstance(spec, Device):
        spec.check_available()
        return spec
    raise TypeError(f"device must be a string such as 'cpu', 'cuda' or 'cuda:1', a "
                    f"torch.device, or a Device object, got {type(spec).__name__}")


def kernels(kind: str, dev: Device) -> Kernels:
    """The kernels of problem kind ``kind`` on ``dev``."""
    key = (kind, dev.kernels_name)
    if key not in KERNELS:
        here = sorted(d for k, d in KERNELS if k == kind)
        raise DeviceUnavailableError(
            f"problem kind {kind!r} has no kernels for device {dev.name!r}; "
            f"it runs on: {', '.join(here) or 'no device'}")
    return _load(KERNELS[key])


def devices() -> tuple[str, ...]:
    """The devices that work on this machine, every name ``step`` and ``fit`` accept as
    ``device=`` here: ('cpu', 'reference') or ('cpu', 'cuda', 'reference'). ("auto" picks
    one of them by where the arrays live; "cuda:<i>" names GPU i of "cuda".)"""
    found = []
    for name in ("cpu", "cuda", "reference"):
        try:
            device(name)
        except DeviceUnavailableError:
            continue
        found.append(name)
    return tuple(found)


def array_library(x) -> str:
    """The top-level module of x's type: "numpy", "cupy", "dask", ..."""
    return type(x).__module__.split(".")[0]


def wrapped_problem(kind: str, *arrays):
    """The WRAPPED_PROBLEMS function for a problem of ``kind`` on ``arrays``, or None when no
    array is of a wrapping library (dask); raises TypeError if the kind has no such entry."""
    library = _wrapping_library(arrays)
    if library is None:
        return None
    if (kind, library) not in WRAPPED_PROBLEMS:
        have = sorted(k for k, lib in WRAPPED_PROBLEMS if lib == library)
        raise TypeError(f"a {kind!r} problem cannot be built from {library} arrays; "
                        f"{library} arrays make: {', '.join(have) or 'no problem kind'}")
    return _load(WRAPPED_PROBLEMS[(kind, library)])


def _wrapping_library(arrays) -> str | None:
    # never imports the library: an array of it can only exist if it is in sys.modules
    for a in arrays:
        if a is not None and array_library(a) in WRAPPERS and array_library(a) in sys.modules:
            return array_library(a)
    return None


def _is_cupy(x) -> bool:
    # never imports cupy: an array of it can only exist if cupy is in sys.modules
    return "cupy" in sys.modules and type(x).__module__.split(".")[0] == "cupy"


class Engine:
    """A problem bound to a device and that kind's kernels there, its data prepared once.

    What the driver and the step-size policies call: ``fused_pass``, ``loss_pass`` and
    ``update`` on arrays of the device; ``run_steps`` is None where the kernels have none.
    """

    def __init__(self, problem, dev: Device):
        self.problem, self.device = problem, dev
        self.kernels = kernels(problem.kind, dev)
        with self.scope():
            self.data = problem.data(dev, self.kernels)
        self.run_steps = getattr(self.kernels, "run_steps", None)
        #: the exact line search's pass, or None where the kernels have none
        self.has_line_quartic = getattr(self.kernels, "line_quartic", None) is not None

    @property
    def xp(self):
        return self.device.xp

    def scope(self):
        """The context the device's work runs in: its GPU made current for "cuda:i"."""
        context = getattr(self.device, "context", None)
        return context() if context is not None else contextlib.nullcontext()

    def asarray(self, x):
        return self.device.asarray(x, self.problem.dtype)

    def fused_pass(self, B, A, *, norm: str = "exact"):
        return self.kernels.fused_pass(self.problem, self.data, B, A, norm=norm)

    def loss_pass(self, B, A):
        return self.kernels.loss_pass(self.problem, self.data, B, A)

    def update(self, B, A, grad_B, grad_A, eta):
        return self.device.update(B, A, grad_B, grad_A, eta)

    def line_quartic(self, B, A, grad_B, grad_A):
        """(a2, a3, a4): J(V - eta grad J) = J - eta ||grad J||^2 + a2 eta^2 + a3 eta^3 + a4 eta^4."""
        return self.kernels.line_quartic(self.problem, self.data, B, A, grad_B, grad_A)


def bind(problem, spec="auto", *arrays) -> Engine:
    """The Engine for ``problem`` on device ``spec`` (a name or a Device)."""
    return Engine(problem, resolve(spec, *problem.arrays(), *arrays))
