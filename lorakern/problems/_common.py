"""What every problem kind shares."""
from __future__ import annotations


class KindBase:
    """The adapters' shape and the per-device cache of prepared data (keyed by device.key)."""

    shape: tuple

    def adapter_shape(self) -> tuple[int, int]:
        """(m, n): B is m x r and A is r x n."""
        return self.shape

    def data(self, device, kernels):
        """The problem's data as ``kernels`` on ``device`` read it, prepared once and kept."""
        prepared = self.__dict__.setdefault("_prepared", {})
        if device.key not in prepared:
            prepared[device.key] = kernels.prepare(self, device)
        return prepared[device.key]
