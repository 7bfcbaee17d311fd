"""Problem kinds: one module each. A kind validates its inputs once, keeps them in the layout
its kernels read, and carries its constants (the loss's L, max(L, 1) for eta).

Every kind provides what ``ProblemKind`` lists; its kernels per device are the rows of
``lorakern._dispatch.KERNELS`` keyed by its ``kind``.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from .linear import LinearProblem
from .matrix import Problem


@runtime_checkable
class ProblemKind(Protocol):
    kind: str            # the row of KERNELS: "matrix", "linear", ...
    shape: tuple         # the weight's (m, n)
    dtype: Any           # float32 or float64
    lipschitz: float     # L of the gradient of J in W
    eta_lipschitz: float  # max(L, 1), what eta uses
    loss: Any            # the losses.Loss

    def arrays(self) -> tuple:
        """The arrays whose home decides device="auto"."""

    def adapter_shape(self) -> tuple:
        """(m, n): B is m x r and A is r x n."""

    def data(self, device, kernels) -> Any:
        """The data as ``kernels`` on ``device`` read it, prepared once per device."""


__all__ = ["LinearProblem", "Problem", "ProblemKind"]
