"""What every problem kind shares."""
from __future__ import annotations


class KindBase:
    """The adapters' shape, the per-device cache of prepared data (keyed by device.key), and
    pickling.

    A problem pickles with its data and comes back working: the validated arrays it keeps
    (and its constants) travel, so the pickle is about their bytes; what its devices
    prepared from them (copies, workspaces, the locks that guard them) and the caches named
    in ``_CACHES`` stay behind and are rebuilt on first use in the new process. ``copy.copy``
    and ``copy.deepcopy`` go the same way: a copy shares no cache or lock with its original.
    """

    shape: tuple
    #: per-process attributes, never pickled: rebuilt on first use (a kind adds its own)
    _CACHES: tuple[str, ...] = ("_prepared",)

    def adapter_shape(self) -> tuple[int, int]:
        """(m, n): B is m x r and A is r x n."""
        return self.shape

    def data(self, device, kernels):
        """The problem's data as ``kernels`` on ``device`` read it, prepared once and kept."""
        prepared = self.__dict__.setdefault("_prepared", {})
        if device.key not in prepared:
            prepared[device.key] = kernels.prepare(self, device)
        return prepared[device.key]

    def __getstate__(self) -> dict:
        # a device's prepared data hold locks (which do not pickle) and copies of the arrays
        # (which would double the pickle); both are remade where the problem is used
        return {k: v for k, v in self.__dict__.items() if k not in self._CACHES}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._prepared = {}
