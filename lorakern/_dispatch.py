"""Device name -> backend module, imported on first use and cached.

A backend module provides NAME, ``xp`` (its array namespace), ``available()``,
``prepare(problem)``, ``asarray(x, dtype)``, ``fused_pass(problem, data, B, A)``,
``loss_pass(problem, data, B, A)``, ``update(B, A, grad_B, grad_A, eta)`` and
SYNC_EVERY (1 if its scalars live on the host, else None).
"""
from __future__ import annotations

import importlib

from .problem import is_device_array

BACKENDS = {
    "reference": "lorakern.reference",
    "cpu": "lorakern._cpu",
    "cuda": "lorakern._cuda",
}
DEVICES = ("cpu", "cuda", "auto", "reference")

_loaded: dict = {}


class DeviceUnavailableError(RuntimeError):
    """The requested device cannot be used here; the message says what is missing."""


def backend(name: str):
    """The backend module for a device name (not 'auto')."""
    if name not in BACKENDS:
        raise ValueError(f"unknown device {name!r}; known devices: {sorted(BACKENDS) + ['auto']}")
    if name not in _loaded:
        try:
            module = importlib.import_module(BACKENDS[name])
        except ModuleNotFoundError as exc:
            if exc.name != BACKENDS[name]:
                raise
            module = None
        if getattr(module, "check_available", None) is None:
            # not built into this install (an empty folder imports as a namespace package)
            raise DeviceUnavailableError(
                f"device {name!r} is not available: this lorakern has no {name} backend; "
                f"install a release that has it with pip install 'lorakern[{name}]'")
        module.check_available()  # raises DeviceUnavailableError with what to install
        _loaded[name] = module
    return _loaded[name]


def resolve(device, *arrays):
    """The backend for ``device``; 'auto' picks 'cuda' if any array is a CuPy array."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda', got {type(device).__name__}")
    if device == "auto":
        device = "cuda" if any(is_device_array(a) for a in arrays if a is not None) else "cpu"
    return backend(device)


def devices() -> tuple[str, ...]:
    """The devices that work on this machine, e.g. ('cpu',) or ('cpu', 'cuda')."""
    found = []
    for name in ("cpu", "cuda"):
        try:
            backend(name)
        except DeviceUnavailableError:
            continue
        found.append(name)
    return tuple(found)
