"""Host memory and NumPy arrays: the device of the reference and of the CPU kernels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HostDevice:
    """A Device whose arrays are NumPy arrays and whose scalars are Python floats."""

    name: str
    kernels_name: str
    host_scalars: bool = True
    install_hint: str = ""

    @property
    def xp(self):
        return np

    @property
    def key(self):
        return self.name

    def check_available(self) -> None:
        pass

    def asarray(self, x, dtype):
        if type(x).__module__.split(".")[0] == "cupy":
            raise TypeError(f"device={self.name!r} takes NumPy arrays, got a CuPy array "
                            f"(use device='cuda', or copy it with x.get())")
        return np.array(x, dtype=dtype, copy=True, order="C")

    def to_host(self, x):
        return np.asarray(x)

    def update(self, B, A, grad_B, grad_A, eta):
        # eq. (3), both from the old iterate; eta rounded to the data's dtype first, as NumPy
        # would for B - eta * grad_B with a NumPy scalar
        eta = B.dtype.type(eta)
        return B - eta * grad_B, A - eta * grad_A


def ordered_sum(values) -> float:
    """The float64 sum of ``values`` added left to right, one rounding per addition: the fixed
    order in which the devices add their pieces (units, parts, shards). Python's sum() is
    not that: since Python 3.12 it compensates the rounding of floats."""
    total = 0.0
    for x in np.asarray(values, dtype=np.float64).tolist():  # an array, a list of floats
        total += x
    return total
