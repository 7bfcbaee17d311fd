"""The matrix kind on a Dask cluster: the inner device's fused pass per row shard, merged.

Per pass: one task per shard, pinned to the worker that holds the shard, running the inner
device's own ``fused_pass`` on the shard's rows. The task takes B[lo:hi] (rows x r) and A
(r x n) as arguments and returns grad_B[lo:hi], the shard's r x n partial
P_s = B[lo:hi]^T G_s of grad_A, J_s and ||G_s||^2. The partials are added in shard order,
in float64 (a fixed order: the bits do not depend on which task ends first); up to FAN_IN
shards on the client, more in a fixed tree of FAN_IN-way merge tasks on the workers, so the
client receives O(r n) per pass however many shards there are. The step's norms are then
formed from the merged pieces (eq. 8):

    grad_sq = ||grad_B||^2 + ||grad_A||^2,   v_sq = ||A||^2 + ||B||^2   (float64, client)

Each pass's tasks have fresh keys and are released once the next pass is submitted: the
graph the scheduler holds is the shards' and at most two passes', whatever the number of
steps. No m x n data moves after the shards are built: only B's rows, A, and the r x n
partials travel.
"""
from __future__ import annotations

import traceback
import uuid
from types import SimpleNamespace

import numpy as np

from .. import _dispatch
from .._host import ordered_sum
from ..results import PassResult
from . import DaskDevice, distributed

#: partials merged per merge task (and on the client when there are at most this many
#: shards): 8 r x n float64 arrays in flight per merge
FAN_IN = 8
#: how often (seconds) the client checks, while a pass runs, that its workers are alive
WATCH_S = 1.0


def prepare(problem, device):
    """The problem's shards (made when the Problem was built) and what the tasks run."""
    shards = getattr(problem, "shards", None)
    if shards is None or not isinstance(device, DaskDevice):
        raise TypeError("the dask device runs a Problem built from dask arrays; build it from "
                        "dask.array arrays (e.g. da.from_zarr(...), da.from_array(W0, "
                        "chunks=(rows, -1)))")
    if shards.client is not device.client:
        raise ValueError("the problem's shards live on another Dask client than the device's; "
                         "build the Problem and fit it with the same client")
    return SimpleNamespace(shards=shards, client=device.client, inner=device.inner,
                           threads=device.threads, previous=None)


def fused_pass(problem, data, B, A, *, norm="exact"):
    """grad_B, grad_A and the norms at (B, A): one task per shard, merged in shard order."""
    parts = _merged(data, _run(data, B, A, norm, True))
    grad_B = np.concatenate(parts.grad_B, axis=0) if len(parts.grad_B) > 1 else parts.grad_B[0]
    grad_A = parts.grad_A.astype(A.dtype)
    grad_sq = _sq(grad_B) + _sq(grad_A)
    return PassResult(grad_B=grad_B, grad_A=grad_A, loss=parts.loss, g_sq=parts.g_sq,
                      grad_sq=grad_sq, v_sq=_sq(A) + _sq(B))


def loss_pass(problem, data, B, A):
    """J(B, A) alone: one loss-only task per shard, the J_s added in shard order."""
    futures = _run(data, B, A, "exact", False)
    return ordered_sum(data.client.gather(futures, direct=True))  # as merge() adds them


def _sq(x) -> float:
    """||x||_F^2 in float64, without BLAS (whose idle threads would spin on the client's
    cores, which the workers may share)."""
    x = np.ascontiguousarray(x).ravel()
    return float(np.einsum("i,i->", x, x, dtype=np.float64))


def _run(data, B, A, norm, with_grad):
    """One task per shard, each pinned to the worker that holds its shard; their futures,
    finished, in shard order.

    Pinned (a strict worker restriction) because Dask's work stealing would otherwise move
    a queued task, and its shard with it, to an idle worker. A pinned task whose worker
    died would wait forever, so while the tasks run the client looks every WATCH_S seconds
    for pinned workers that are gone, and submits those shards' tasks again unpinned: Dask
    rebuilds a lost shard from its source and runs the task where the shard now is.
    """
    dist, client, shards = distributed(), data.client, data.shards
    tag = uuid.uuid4().hex
    B, A = np.ascontiguousarray(B), np.ascontiguousarray(A)
    args = (data.inner, data.threads, norm, with_grad)

    def submit(i, worker, retry=0):
        lo, hi = shards.bounds[i]
        return client.submit(shard_pass, shards.futures[i], B[lo:hi], A, *args,
                             key=f"lorakern-pass-{tag}-{i}-{retry}",
                             workers=None if worker is None else [worker],
                             allow_other_workers=False)

    placement = shards.placement()
    futures = [submit(i, worker) for i, worker in enumerate(placement)]
    # the previous pass's futures are released here, right after this pass's submission, so
    # that both go out in one batch: the client sends at most one batch per interval (10 ms),
    # and a release sent at the end of a pass would hold the next submission back by up to that
    data.previous = futures
    retries = 0
    while not _finished(dist, client, futures):  # still running after WATCH_S: are the
        # workers they are pinned to alive?
        live = set(client.ncores())
        lost = [i for i, f in enumerate(futures)
                if not f.done() and placement[i] is not None and placement[i] not in live]
        if lost:
            retries += 1
            for i in lost:
                futures[i].cancel()
                futures[i], placement[i] = submit(i, None, retries), None
    if retries:
        shards.forget_placement()  # lost shards were rebuilt elsewhere: ask again next pass
    return futures


def _finished(dist, client, futures) -> bool:
    """True once every future is done (or failed); False if some still run after WATCH_S."""
    if all(f.done() for f in futures):
        return True  # (a wait with a tiny timeout may expire before it looks at them)
    try:
        with client.as_current():  # wait() asks for the current client
            dist.wait(futures, timeout=WATCH_S)
    except dist.TimeoutError as exc:
        # the error's frames refer to one another and to the futures: clear them, or the
        # futures (and their tasks on the scheduler) live until the garbage collector runs
        traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
        return False
    return True


def _merged(data, futures):
    """The shards' results merged in shard order: a fixed tree of FAN_IN-way merges."""
    level = 0
    while len(futures) > FAN_IN:
        tag = uuid.uuid4().hex
        futures = [data.client.submit(merge, *futures[i:i + FAN_IN],
                                      key=f"lorakern-merge-{tag}-{level}-{i}")
                   for i in range(0, len(futures), FAN_IN)]
        level += 1
    return merge(*data.client.gather(futures, direct=True))


# ---- what runs on the workers ------------------------------------------------------------------
def shard_pass(shard, B_rows, A, inner, threads, norm, with_grad):
    """On a worker: the inner device's fused pass on one shard's rows.

    Returns the shard's piece of the pass (grad_B rows, the partial of grad_A, J_s,
    ||G_s||^2) as host arrays and floats, or J_s alone for a loss-only pass.
    """
    dev = _dispatch.device(inner) if isinstance(inner, str) else inner
    kernels = _dispatch.kernels(shard.problem.kind, dev)
    with _thread_limit(dev, threads):
        data = shard.problem.data(dev, kernels)
        dtype = shard.problem.dtype
        if dev.xp is np:  # the task's own fresh copies: no second copy needed
            B_d, A_d = np.ascontiguousarray(B_rows, dtype), np.ascontiguousarray(A, dtype)
        else:
            B_d, A_d = dev.asarray(B_rows, dtype), dev.asarray(A, dtype)
        if not with_grad:
            return float(dev.to_host(kernels.loss_pass(shard.problem, data, B_d, A_d)))
        p = kernels.fused_pass(shard.problem, data, B_d, A_d, norm=norm)
        return SimpleNamespace(grad_B=[np.asarray(dev.to_host(p.grad_B))],
                               grad_A=np.asarray(dev.to_host(p.grad_A)),
                               loss=float(dev.to_host(p.loss)), g_sq=float(dev.to_host(p.g_sq)))


def merge(*parts):
    """Pieces of consecutive shards, in order, as one piece: grad_B rows listed in order,
    partials and scalars added left to right (float64)."""
    grad_A = parts[0].grad_A.astype(np.float64)  # a copy, in float64
    loss, g_sq, rows = parts[0].loss, parts[0].g_sq, []
    for p in parts[1:]:
        grad_A += p.grad_A
        loss += p.loss
        g_sq += p.g_sq
    for p in parts:
        rows.extend(p.grad_B)
    return SimpleNamespace(grad_B=rows, grad_A=grad_A, loss=loss, g_sq=g_sq)


class _thread_limit:
    """Numba threads of this worker thread set to ``threads`` for a "cpu" pass (a fixed
    count: the CPU kernel's bits depend on it), restored afterwards."""

    def __init__(self, dev, threads):
        self.active = dev.kernels_name == "cpu"
        self.threads = threads

    def __enter__(self):
        if self.active:
            import numba

            self.before = numba.get_num_threads()
            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))

    def __exit__(self, *exc):
        if self.active:
            import numba

            numba.set_num_threads(self.before)
