"""A matrix Problem built from dask arrays: checked, sharded by rows, persisted on the workers.

What is free is checked on the client at once (dtypes, shapes, the loss's arguments). What
needs the data (finite entries, a residual that does not overflow, labels in {-1, +1}) is
checked where the data are, by building each shard: a shard is a ``Problem`` of its own on
its rows, made on a worker by the same constructor that checks a NumPy problem, so the
messages are the same. All shards are built in one Dask computation and kept there
(``client.compute``: futures whose recipe, the dask arrays' graph, stays with the
scheduler, so a shard lost with its worker is rebuilt from its source).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np

from .._validate import FLOAT_DTYPES, InputWarning
from . import default_client, distributed, is_dask_array


class Shard:
    """Rows lo..hi of a dask-backed problem, as a NumPy (or CuPy) Problem, on a worker.

    ``__sizeof__`` tells Dask the bytes it holds (Dask's memory limit and spilling see
    them); a pickled shard leaves behind the copies its devices prepared.
    """

    def __init__(self, problem, lo: int, hi: int):
        self.problem, self.lo, self.hi = problem, lo, hi

    def __sizeof__(self):
        p = self.problem
        arrays = (p.R, p.W0, p.Y, p.mask)
        return 64 + sum(int(a.nbytes) for a in arrays if a is not None)

    def __getstate__(self):
        problem = copy.copy(self.problem)
        problem._prepared = {}
        return {"problem": problem, "lo": self.lo, "hi": self.hi}


def build_shard(W0, Y, mask, lo, hi, kwargs) -> Shard:
    """On a worker: the checked, prepared problem on rows lo..hi (raises as Problem raises)."""
    from ..problems import Problem

    if mask is not None:
        mask = np.asarray(mask) if type(mask).__module__.split(".")[0] != "cupy" else mask
    with warnings.catch_warnings():
        # one shard's rows all masked out is no fault of the whole problem's mask
        warnings.simplefilter("ignore", InputWarning)
        return Shard(Problem(W0, Y, mask=mask, **kwargs), lo, hi)


@dataclass
class Shards:
    """The shards of a problem: futures in row order, their row ranges, their client."""

    client: object
    futures: list
    bounds: list  # (lo, hi) per shard, in row order
    _where: list | None = None

    def __len__(self):
        return len(self.futures)

    def placement(self) -> list:
        """The worker holding each shard (None: none now), asked once and kept."""
        if self._where is None:
            who = self.client.who_has(self.futures)
            self._where = [(who.get(f.key) or [None])[0] for f in self.futures]
        return list(self._where)

    def forget_placement(self):
        self._where = None


def init_sharded(problem, W0, Y, mask, kwargs) -> None:
    """Fill in ``problem`` (a Problem whose loss, delta and lipschitz are set) from dask
    arrays: check what is free, shard by rows, build and check every shard on the workers."""
    distributed()  # dask and distributed installed, or a clear error
    import dask
    import dask.array as da

    for name, x in (("W0", W0), ("Y", Y)):
        if not is_dask_array(x):
            raise TypeError(f"W0 and Y must both be dask arrays or both NumPy/CuPy arrays; "
                            f"{name} is a {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
        if any(np.isnan(s) for s in x.shape):
            raise ValueError(f"{name} has an unknown shape; call {name}.compute_chunk_sizes()")
    if Y.dtype != W0.dtype:
        raise TypeError(f"Y has dtype {Y.dtype} but the problem is {W0.dtype}; "
                        f"convert it with Y.astype(np.{W0.dtype})")
    if W0.shape != Y.shape:
        raise ValueError(f"W0 has shape {tuple(W0.shape)} but Y has shape {tuple(Y.shape)}")
    if W0.size == 0:
        raise ValueError(f"W0 and Y must be non-empty, got shape {tuple(W0.shape)}")
    if mask is not None:
        if getattr(mask, "dtype", None) != np.bool_:
            dtype = getattr(mask, "dtype", None)
            raise TypeError(f"mask must be a boolean array, got "
                            f"{type(mask).__name__ if dtype is None else dtype}")
        if tuple(mask.shape) != tuple(W0.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but W0 has shape "
                             f"{tuple(W0.shape)}")
    client = default_client()

    # whole rows per chunk: the user's row chunks if the columns are whole already, else
    # rows chosen by dask's chunk-size setting; Y and the mask follow W0's rows
    if W0.numblocks[1] != 1:
        W0 = W0.rechunk({0: "auto", 1: -1})
    Y = Y.rechunk(W0.chunks)
    if mask is not None:
        mask = (mask if is_dask_array(mask) else da.from_array(mask)).rechunk(W0.chunks)

    problem.shape = tuple(int(s) for s in W0.shape)
    problem.dtype = np.dtype(W0.dtype)
    # lazy: the shards hold the data, never the client (each shard checks its residual)
    problem._set_layout(W0, Y, lambda W0, Y: W0 - Y)
    problem.mask = mask
    problem._prepared = {}

    starts = np.concatenate([[0], np.cumsum(W0.chunks[0])]).astype(int)
    bounds = [(int(lo), int(hi)) for lo, hi in zip(starts[:-1], starts[1:])]
    w_blocks, y_blocks = W0.to_delayed().ravel(), Y.to_delayed().ravel()
    m_blocks = mask.to_delayed().ravel() if mask is not None else [None] * len(bounds)
    # named by their inputs: the same arrays give the same keys (and share the shards)
    token = dask.base.tokenize(W0, Y, mask, kwargs)
    shards = [dask.delayed(build_shard, pure=True)(w, y, mk, lo, hi, kwargs,
                                                   dask_key_name=f"lorakern-shard-{token}-{i}")
              for i, (w, y, mk, (lo, hi)) in enumerate(zip(w_blocks, y_blocks, m_blocks, bounds))]
    futures = client.compute(shards)
    with client.as_current():
        distributed().wait(futures)
    for f in futures:  # the first failing shard in row order says what is wrong
        if f.status == "error":
            exc = f.exception()
            client.cancel(futures)
            raise exc
    problem.shards = Shards(client=client, futures=futures, bounds=bounds)
    if mask is not None:
        # each worker says whether its shards observe an entry: a few bytes come back
        observed = client.gather([client.submit(_observes_any, f, pure=False) for f in futures])
        if not any(observed):
            from ..problems.matrix import warn_all_false_mask

            warn_all_false_mask(stacklevel=4)  # warn_all_false_mask, here, Problem, its caller


def _observes_any(shard: Shard) -> bool:
    """True if the shard's mask has an entry that is True."""
    return bool(shard.problem.mask.any())
