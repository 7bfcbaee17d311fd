"""A device that wraps another one: a Problem built from dask arrays, sharded by rows.

The problem's rows are split into shards (its dask chunks, whole rows each). Each shard is
validated and prepared (residual, mask) once on a worker, where it stays (problem.py). A
step then runs the *wrapped* device's own fused pass on every shard, as one Dask task per
shard, and merges the partials in shard order on the client (matrix.py):

    shard s (rows lo..hi):  grad_B[lo:hi] = G_s A^T,  P_s = B[lo:hi]^T G_s,  J_s,  ||G_s||^2
    client:                 grad_A = P_0 + P_1 + ...,  J = sum J_s,  ||G||^2 = sum ||G_s||^2
                            grad_sq, v_sq from the merged gradients and (B, A);  eta;  update

The iterate (B, A) lives on the client, as NumPy arrays: it is small, every task receives
its rows of B and all of A as arguments, and a worker that dies takes nothing with it that
the next step needs (Dask recomputes a lost shard from its source and reruns its task).

Nothing here imports dask until a dask-backed problem or a DaskDevice is made; the rule
that picks this device is ``_dispatch.WRAPPERS`` (arrays of the library "dask"), and a
Problem on dask arrays is filled in by ``_dispatch.WRAPPED_PROBLEMS`` (problem.py).
"""
from __future__ import annotations

import sys

import numpy as np

from .. import _dispatch
from .._dispatch import DeviceUnavailableError
from .._host import HostDevice

INSTALL = 'pip install ".[dask]" in a clone of lorakern'


def distributed():
    """The dask.distributed module, or DeviceUnavailableError saying what to install."""
    try:
        import dask.array  # noqa: F401
        import distributed as dist
    except ImportError as exc:
        raise DeviceUnavailableError(
            f"a Problem on dask arrays runs on a Dask cluster, which needs dask and "
            f"dask.distributed ({exc}); install them with: {INSTALL}") from None
    return dist


def is_dask_array(x) -> bool:
    """True for a dask array; never imports dask (it is in sys.modules if x is one)."""
    return "dask" in sys.modules and type(x).__module__.split(".")[0] == "dask"


def default_client(client=None):
    """``client``, or the current dask.distributed Client, connected; else a clear error."""
    dist = distributed()
    if client is None:
        try:
            client = dist.Client.current()  # the one of `with client.as_current():`, or the latest
        except ValueError:
            raise DeviceUnavailableError(
                "a Problem on dask arrays runs on a Dask cluster, and no Client is connected; "
                "connect one first: Client('tcp://<scheduler>:8786') for a running cluster "
                "(`dask scheduler`, `dask worker tcp://<scheduler>:8786`), or "
                "Client(LocalCluster()) on this machine") from None
    elif not isinstance(client, dist.Client):
        raise TypeError(f"client must be a dask.distributed Client, got {type(client).__name__}")
    if client.status != "running":
        raise DeviceUnavailableError(
            f"the Dask client is not connected to its scheduler (status {client.status!r}, "
            f"scheduler {_address(client)}); reconnect it or make a new Client")
    return client


def _address(client) -> str:
    try:
        return str(client.scheduler.address)
    except Exception:  # a closed client may have no scheduler comm left
        return "unknown"


class DaskDevice:
    """Runs a problem built from dask arrays on a Dask cluster, shard by shard.

    Parameters
    ----------
    client : a dask.distributed Client, or None for the current one (that of
        ``with client.as_current():``, else the one most recently connected).
    inner : what each worker runs on its shards: "cpu" (the Numba kernels), "cuda" (for
        CuPy-backed chunks), "reference", or a Device object that pickles.
    threads : Numba threads per shard task on a "cpu" worker (default 1: the worker's own
        threads run shards side by side). Fixed, so a shard's bits do not depend on the
        worker that computes it.

    ``fit(problem, B, A, device="cpu")`` on a dask-backed problem makes one of these with the
    current client; pass one yourself to pick the client or the threads.
    """

    kernels_name = "dask"
    host_scalars = True

    def __init__(self, client=None, inner="cpu", *, threads: int = 1):
        from .._validate import positive_int

        if isinstance(inner, DaskDevice):
            raise TypeError("a DaskDevice can not wrap another DaskDevice")
        inner = _worker_device(inner)
        if not isinstance(inner, str) and _dispatch.DEVICES.get(inner.name) and _dispatch._load(
                _dispatch.DEVICES[inner.name]) is inner:
            inner = inner.name  # a registered device travels as its name: workers load theirs
        self.client = default_client(client)
        self.inner = inner
        self.threads = positive_int("threads", threads)
        self.inner_name = inner if isinstance(inner, str) else inner.name
        self.name = f"dask[{self.inner_name}]"
        self._checked = False

    @property
    def xp(self):
        return np

    @property
    def key(self):
        inner = self.inner if isinstance(self.inner, str) else self.inner.key
        return ("dask", self.client.id, inner, self.threads)

    def check_available(self) -> None:
        """The client is connected and every worker can run the inner device (asked once)."""
        default_client(self.client)
        if self._checked:
            return
        try:
            answers = self.client.run(_inner_problem, self.inner)
        except Exception as exc:
            raise DeviceUnavailableError(
                f"could not ask the Dask workers whether they can run device "
                f"{self.inner_name!r}: {type(exc).__name__}: {exc}") from exc
        if not answers:
            raise DeviceUnavailableError(
                f"the Dask cluster at {_address(self.client)} has no workers; start some with "
                f"`dask worker {_address(self.client)}`")
        bad = {w: why for w, why in answers.items() if why}
        if bad:
            worker, why = sorted(bad.items())[0]
            raise DeviceUnavailableError(
                f"{len(bad)} of {len(answers)} Dask workers can not run device "
                f"{self.inner_name!r}; {worker}: {why}")
        self._checked = True

    def asarray(self, x, dtype):
        if is_dask_array(x):
            x = x.compute()  # B and A are small; they live on the client
        if type(x).__module__.split(".")[0] == "cupy":
            x = x.get()
        return np.array(x, dtype=dtype, copy=True, order="C")

    # B, A and the merged gradients live on the client as NumPy arrays: the host's eq. (3)
    to_host = HostDevice.to_host
    update = HostDevice.update

    def __repr__(self):
        return f"DaskDevice({self.inner_name!r}, scheduler={_address(self.client)})"


def _worker_device(spec):
    """``spec`` if it names a registered device or is a Device object, else a clear error."""
    if isinstance(spec, str):
        if spec not in _dispatch.DEVICES:
            raise ValueError(f"unknown device {spec!r} for the workers; known devices: "
                             f"{sorted(_dispatch.DEVICES) + ['auto']}")
    elif not isinstance(spec, _dispatch.Device):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda', or a Device object, "
                        f"got {type(spec).__name__}")
    return spec


def _inner_problem(inner) -> str:
    """On a worker: why ``inner`` can not run there ('' if it can)."""
    try:
        if isinstance(inner, str):
            _dispatch.device(inner)
        else:
            inner.check_available()
        import lorakern  # noqa: F401  (the workers need the package itself)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def wrap(spec, arrays) -> DaskDevice:
    """The device for arrays of which some are dask arrays: ``spec`` run on every shard.

    "auto" runs "cuda" where the chunks are CuPy arrays, else "cpu"; a name or a Device
    object is the device each worker runs; a DaskDevice is taken as it is.
    """
    if isinstance(spec, DaskDevice):
        spec.check_available()
        return spec
    if isinstance(spec, str) and spec == "auto":
        metas = [getattr(a, "_meta", a) for a in arrays if a is not None]
        spec = "cuda" if any(_dispatch._is_cupy(m) for m in metas) else "cpu"
    spec = _worker_device(spec)
    client = default_client()
    key = (client.id, spec if isinstance(spec, str) else spec.key)
    dev = _made.get(key)
    if dev is None or dev.client is not client:
        dev = _made[key] = DaskDevice(client, inner=spec)
    dev.check_available()  # asks the workers once per device
    return dev


#: the devices wrap() made, by (client id, inner device): a step or fit on the same client
#: reuses one, and with it the problem's prepared data and the answer of check_available
_made: dict = {}
