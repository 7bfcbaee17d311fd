"""A Problem on dask arrays, fitted on a LocalCluster (issue 10).

One cluster for the module: 2 worker processes, 1 thread each, as a 2-core CI machine has.
Every worker compiles the Numba kernels it runs (4-9 s each), so the tests share a few
(loss, mask, dtype) cases. The fault test kills a worker of that cluster (its nanny starts a
new one) and the memory-limit test makes a cluster of its own, so both come last.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import lorakern
from lorakern.step_size import THEOREM

from helpers import assert_bitwise, assert_close, random_adapters, random_data

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

#: the dask fit against the one-machine fit after STEPS steps, as a multiple of helpers.RTOL
#: (fp32: 1e-6 of the largest entry; fp64: 1e-13). grad_A's partials are added per shard
#: (in float64) instead of per thread, so each step rounds differently and the iterates
#: drift apart by a fraction of an ulp a step. Measured over the cases of this file
#: (on the 2-core CI machine): worst 0.006x RTOL after 8 steps, 0.013x after 30.
DRIFT = 0.1
STEPS = 8

#: odd shards: a shard of 1 row, sizes that are not multiples of the CPU kernel's 4-row group
ROW_CHUNKS = (1, 6, 13, 17)
M, N, R = sum(ROW_CHUNKS), 29, 3


#: each worker's memory limit: room for the worker itself (Python, and ~17 MiB per Numba
#: kernel it compiles: ~330 MiB after this file's) and half of the memory test's problem,
#: under Dask's spill threshold (70% of the limit), beyond which it would spill shards to
#: disk, and pause at 80%
MEMORY_LIMIT = 1280 * 2**20


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  memory_limit=MEMORY_LIMIT, dashboard_address=":0",
                                  silence_logs=40) as cluster:
        with distributed.Client(cluster) as c:
            yield c


def _dask(x, chunks=ROW_CHUNKS):
    return None if x is None else da.from_array(x, chunks=(chunks, -1))


def _pair(dtype=np.float32, loss="squared", masked=False, seed=0, chunks=ROW_CHUNKS):
    """(dask-backed problem, the same problem on NumPy, B, A)."""
    W0, Y, mask = random_data((M, N), dtype, loss=loss, seed=seed, masked=masked)
    kw = dict(loss=loss, delta=0.5 if loss == "huber" else None)
    sharded = lorakern.Problem(_dask(W0, chunks), _dask(Y, chunks), mask=_dask(mask, chunks),
                               **kw)
    local = lorakern.Problem(W0, Y, mask=mask, **kw)
    B, A = random_adapters(M, N, R, dtype, seed=seed)
    return sharded, local, B, A


def _assert_fits_close(got, want, dtype, factor=DRIFT):
    assert got.status == want.status == "completed" and got.steps == want.steps
    assert isinstance(got.B, np.ndarray) and got.B.dtype == dtype and got.A.dtype == dtype
    assert_close(got.B, want.B, dtype, "B", factor)
    assert_close(got.A, want.A, dtype, "A", factor)
    for name in ("loss", "eta", "grad_sq", "v_sq", "g_norm"):
        assert_close(getattr(got.history, name), getattr(want.history, name), dtype, name, factor)
    assert_close(got.final_loss, want.final_loss, dtype, "final_loss", factor)
    assert (got.history.trials == want.history.trials).all()


@pytest.mark.parametrize("loss, masked", [("squared", False), ("squared", True),
                                          ("huber", False), ("logistic", False)])
def test_fit_matches_one_machine(client, loss, masked):
    sharded, local, B, A = _pair(loss=loss, masked=masked, seed=3)
    assert len(sharded.shards) == len(ROW_CHUNKS)
    got = lorakern.fit(sharded, B, A, steps=STEPS, device="cpu", step_size="theorem")
    want = lorakern.fit(local, B, A, steps=STEPS, device="cpu", step_size="theorem")
    _assert_fits_close(got, want, np.float32)
    assert lorakern.theory.check(got).all_hold
    # the same shard layout gives the same bits, run after run
    again = lorakern.fit(sharded, B, A, steps=STEPS, device="cpu", step_size="theorem")
    assert_bitwise(again.B, got.B, "B")
    assert_bitwise(again.A, got.A, "A")
    assert_bitwise(again.history.loss, got.history.loss, "history.loss")


def test_many_shards_merge_in_a_tree(client):
    """More shards than FAN_IN: the partials are merged by tasks on the workers, in a fixed
    tree, and the result is still the one-machine fit's, with the same bits every run."""
    from lorakern._dask import matrix

    chunks = (3,) * 12 + (1,)  # 13 shards > FAN_IN = 8
    assert len(chunks) > matrix.FAN_IN
    sharded, local, B, A = _pair(seed=12, chunks=chunks)
    got = lorakern.fit(sharded, B, A, steps=STEPS, device="cpu", step_size="theorem")
    _assert_fits_close(got, lorakern.fit(local, B, A, steps=STEPS, device="cpu", step_size="theorem"), np.float32)
    again = lorakern.fit(sharded, B, A, steps=STEPS, device="cpu", step_size="theorem")
    assert_bitwise(again.B, got.B, "B")
    assert_bitwise(again.A, got.A, "A")


def test_wraps_any_device(client):
    """device="reference" on a dask problem: the NumPy reference's pass on every shard."""
    sharded, local, B, A = _pair(seed=13, dtype=np.float64, loss="huber", masked=True)
    got = lorakern.fit(sharded, B, A, steps=4, device="reference", step_size="theorem")
    _assert_fits_close(got, lorakern.fit(local, B, A, steps=4, device="reference", step_size="theorem"), np.float64)


def test_table_entries_follow_the_protocols(client):
    from lorakern import _dispatch
    from lorakern._dask import DaskDevice

    assert isinstance(DaskDevice(client, "cpu"), _dispatch.Device)
    assert isinstance(_dispatch._load(_dispatch.KERNELS[("matrix", "dask")]), _dispatch.Kernels)
    assert callable(_dispatch._load(_dispatch.WRAPPERS["dask"]))


def test_pass_matches_reference(client):
    """One pass, against the float64 reference: gradients and the four norms."""
    from helpers import compare_pass
    from lorakern import reference

    sharded, local, B, A = _pair(dtype=np.float64, seed=4)
    got = lorakern._dispatch.bind(sharded, "cpu").fused_pass(B, A)
    want = reference.fused_pass(local, None, B, A)
    for name in ("grad_B", "grad_A", "loss", "g_sq", "grad_sq", "v_sq"):
        assert_close(getattr(got, name), getattr(want, name), np.float64, name)
    compare_pass(local, B, A, "cpu")  # and the one-machine pass, for the same inputs


def test_step_armijo_and_column_chunks(client):
    """step() and the line search (loss-only passes) on a problem chunked by columns, which
    the Problem rechunks to whole rows."""
    W0, Y, _ = random_data((M, N), np.float32, seed=5)
    sharded = lorakern.Problem(da.from_array(W0, chunks=(10, 10)), da.from_array(Y, chunks=7))
    assert sharded.R.numblocks[1] == 1
    B, A = random_adapters(M, N, R, np.float32, seed=5)
    got = lorakern.fit(sharded, B, A, steps=4, device="cpu", step_size="armijo")
    want = lorakern.fit(lorakern.Problem(W0, Y), B, A, steps=4, device="cpu", step_size="armijo")
    _assert_fits_close(got, want, np.float32)
    assert got.history.trials.sum() > 0  # the line search ran loss-only passes
    s = lorakern.step(sharded, B, A, device="auto", step_size="theorem")
    assert isinstance(s.B, np.ndarray) and isinstance(s.loss, float)


def test_problem_from_zarr(client, tmp_path):
    """The README's 'More than one machine' flow: W0 and Y in zarr stores chunked by rows, read by the workers."""
    pytest.importorskip("zarr")
    W0, Y, _ = random_data((M, N), np.float32, seed=10)
    for name, x in (("w0", W0), ("y", Y)):
        da.from_array(x, chunks=(10, -1)).to_zarr(str(tmp_path / f"{name}.zarr"))
    sharded = lorakern.Problem(da.from_zarr(str(tmp_path / "w0.zarr")),
                               da.from_zarr(str(tmp_path / "y.zarr")))
    assert [hi - lo for lo, hi in sharded.shards.bounds] == [10, 10, 10, M - 30]
    B, A = random_adapters(M, N, R, np.float32, seed=10)
    got = lorakern.fit(sharded, B, A, steps=STEPS, device="cpu", step_size="theorem")
    want = lorakern.fit(lorakern.Problem(W0, Y), B, A, steps=STEPS, device="cpu", step_size="theorem")
    _assert_fits_close(got, want, np.float32)


@pytest.mark.parametrize("watch_s", [None, 1e-4], ids=["quick-passes", "every-wait-times-out"])
def test_no_data_moves_and_graph_does_not_grow(client, monkeypatch, watch_s):
    """30 steps hold no more tasks on the scheduler than 1 step, without the garbage collector.

    With watch_s=1e-4 every wait for a pass times out first (as on a slow or busy machine),
    the path whose errors once kept each pass's futures alive in reference cycles.
    """
    import gc

    import lorakern._dask.matrix as dask_matrix

    if watch_s is not None:
        monkeypatch.setattr(dask_matrix, "WATCH_S", watch_s)
    sharded, _, B, A = _pair(seed=6)
    lorakern.fit(sharded, B, A, steps=1, device="cpu", step_size="theorem")  # the shards are built and placed

    def shard_keys_received(dask_worker):
        return [str(k) for log in dask_worker.transfer_incoming_log for k in log["keys"]
                if "lorakern-shard" in str(k)]

    def held():
        return client.run_on_scheduler(
            lambda dask_scheduler: sorted(str(k) for k in dask_scheduler.tasks))

    before = client.run(shard_keys_received)
    gc.collect()
    tasks_before = held()
    gc.disable()
    try:
        lorakern.fit(sharded, B, A, steps=30, device="cpu", step_size="theorem")
        assert client.run(shard_keys_received) == before, "a shard moved between workers"
        # the scheduler forgets released tasks asynchronously (slowly on a busy machine): give
        # it a few seconds to settle before counting
        deadline = time.monotonic() + 20
        while True:
            tasks_after = held()
            if len(tasks_after) <= len(tasks_before) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        gc.enable()
    new = sorted(set(tasks_after) - set(tasks_before))
    assert len(tasks_after) == len(tasks_before), f"held after 30 steps, not before: {new}"


def test_bad_input(client):
    W0, Y, mask = random_data((M, N), np.float32, seed=7, masked=True)
    bad = W0.copy()
    bad[20, 3] = np.nan  # in the fourth shard
    with pytest.raises(ValueError, match="W0 contains NaN or inf"):
        lorakern.Problem(_dask(bad), _dask(Y))
    with pytest.raises(ValueError, match="labels Y in"):
        lorakern.Problem(_dask(W0), _dask(Y), loss="logistic")
    with pytest.raises(TypeError, match="Y has dtype float64"):
        lorakern.Problem(_dask(W0), _dask(Y.astype(np.float64)))
    with pytest.raises(TypeError, match="both be dask arrays"):
        lorakern.Problem(_dask(W0), Y)
    with pytest.raises(ValueError, match="Y has shape"):
        lorakern.Problem(_dask(W0), _dask(Y)[:, :-1])
    with pytest.raises(TypeError, match="mask must be a boolean"):
        lorakern.Problem(_dask(W0), _dask(Y), mask=_dask(mask.astype(np.float32)))
    huge = np.full((M, N), 3e38, np.float32)  # issue 12, item 2: finite inputs, W0 - Y = -inf
    with pytest.raises(ValueError, match="residual W0 - Y overflows float32.*float64"):
        lorakern.Problem(_dask(huge), _dask(-huge))
    sharded = lorakern.Problem(_dask(W0), _dask(Y))
    with pytest.raises(ValueError, match="A must have n"):
        lorakern.fit(sharded, np.zeros((M, R), np.float32), np.zeros((R, N + 1), np.float32),
                     steps=1, step_size="theorem")
    with pytest.raises(ValueError, match="unknown device"):
        lorakern.fit(sharded, *random_adapters(M, N, R, np.float32), steps=1, device="tpu", step_size="theorem")
    if "cuda" not in lorakern.devices():  # the workers (this machine) have no GPU either
        with pytest.raises(lorakern.DeviceUnavailableError, match="can not run device 'cuda'"):
            lorakern.fit(sharded, *random_adapters(M, N, R, np.float32), steps=1, device="cuda", step_size="theorem")


@pytest.mark.parametrize("dtype, steps, eta", [
    (np.float32, 1, 1e20), (np.float64, 1, 1e200), (np.float32, 5, 0.9)])
def test_last_step_blow_up_is_diverged(client, dtype, steps, eta):
    """Issue 12, item 1 on the Dask device: the issue's reproducers (a blow-up on the last
    step, or before it) stop with the last iterate whose loss is finite, "diverged", a warning."""
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((40, 30)).astype(np.float32).astype(dtype)
    B, A = (x.astype(dtype) for x in lorakern.init_adapters(40, 30, rank=4, dtype=np.float32,
                                                             seed=1, init="gaussian"))
    chunks = (1, 6, 13, 20)
    problem = lorakern.Problem(_dask(W0, chunks), _dask(W0 + 1, chunks))
    before = (B.copy(), A.copy())
    with pytest.warns(RuntimeWarning, match="stopped being finite"):
        result = lorakern.fit(problem, B, A, steps=steps, device="cpu", step_size=eta)
    assert result.status == "diverged" and np.isfinite(result.final_loss)
    assert np.isfinite(result.B).all() and np.isfinite(result.A).all()
    assert len(result.history) == result.steps < steps
    replay = lorakern.fit(problem, B, A, steps=result.steps, device="cpu", step_size=eta)
    assert replay.status == "completed" and result.final_loss == replay.final_loss
    assert_bitwise(result.B, replay.B, "B")
    assert_bitwise(result.A, replay.A, "A")
    assert_bitwise(B, before[0], "caller's B")
    assert_bitwise(A, before[1], "caller's A")


SCRIPT_NO_CLIENT = """
import numpy as np, dask.array as da, lorakern
try:
    lorakern.Problem(da.ones((4, 3), chunks=2), da.zeros((4, 3), chunks=2))
except lorakern.DeviceUnavailableError as exc:
    print("error:", exc)
"""

SCRIPT_NO_DISTRIBUTED = """
import sys
sys.modules["distributed"] = None  # as if dask.distributed were not installed
import numpy as np, dask.array as da, lorakern
try:
    lorakern.Problem(da.ones((4, 3), chunks=2), da.zeros((4, 3), chunks=2))
except lorakern.DeviceUnavailableError as exc:
    print("error:", exc)
"""


@pytest.mark.parametrize("script, says", [
    (SCRIPT_NO_CLIENT, "no Client is connected"),
    (SCRIPT_NO_DISTRIBUTED, 'pip install ".[dask]" in a clone'),
])
def test_no_cluster_is_a_clear_error(script, says):
    root = str(Path(lorakern.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("error:") and says in out.stdout, out.stdout


def test_closed_client_is_a_clear_error(client):
    from lorakern._dask import DaskDevice

    sharded, _, B, A = _pair(seed=8)
    other = distributed.Client(client.scheduler.address, set_as_default=False)
    dev = DaskDevice(other, "cpu")
    other.close()
    with pytest.raises(lorakern.DeviceUnavailableError, match="not connected"):
        lorakern.fit(sharded, B, A, steps=1, device=dev, step_size="theorem")
    with pytest.raises(ValueError, match="another Dask client"):  # shards live on `client`
        with distributed.Client(client.scheduler.address, set_as_default=False) as third:
            lorakern.fit(sharded, B, A, steps=1, device=DaskDevice(third, "cpu"), step_size="theorem")


def test_larger_than_one_workers_memory(client):
    """W0 and Y together larger than either worker's memory limit: the shards (R, half the
    bytes) spread over both workers, each within its limit, and the fit runs."""
    m, n, r = 10300, 8192, 4  # W0, Y: 644 MiB each (fp64); R: 644 MiB
    limits = {w: info["memory_limit"] for w, info in client.scheduler_info()["workers"].items()}
    assert set(limits.values()) == {MEMORY_LIMIT}
    rng = da.random.default_rng(11)  # made on the workers: the client never holds it
    W0 = rng.standard_normal((m, n), chunks=(400, n))
    Y = rng.standard_normal((m, n), chunks=(400, n))
    assert W0.nbytes + Y.nbytes > MEMORY_LIMIT
    sharded = lorakern.Problem(W0, Y)
    B, A = random_adapters(m, n, r, np.float64, seed=11)
    result = lorakern.fit(sharded, B, A, steps=3, device="cpu", step_size="theorem")
    held = client.run_on_scheduler(lambda dask_scheduler: {
        ws.address: sum(ts.nbytes for ts in ws.has_what if "lorakern-shard" in str(ts.key))
        for ws in dask_scheduler.workers.values()})
    spilled = client.run(lambda dask_worker: len(getattr(dask_worker.data, "slow", ())))
    rss = client.run(lambda: __import__("psutil").Process().memory_info().rss)
    assert result.status == "completed" and lorakern.theory.check(result).all_hold
    assert result.final_loss < result.history.loss[0]
    assert sum(held.values()) >= m * n * 8  # every shard's R is held, and counted
    assert all(0 < b < MEMORY_LIMIT / 2 for b in held.values()), held
    assert set(held) == set(limits), "a worker was restarted (killed for memory?)"
    # (on a busy machine, data left by earlier tests on this module's cluster may make a
    # worker spill some keys to disk: Dask's managed memory doing its job, not a failure)
    print(f"keys spilled to disk per worker: {spilled}; RSS {rss}")
    del sharded


class _KillWorkerAt:
    """The theorem's eta, and at step ``at`` a SIGKILL to the worker process that holds the
    first shard, sent from another thread while the next pass is being submitted."""

    decrease = THEOREM.decrease
    host_loop = False
    norm = "exact"

    def __init__(self, at, client, cluster, shard):
        self.at, self.client, self.cluster, self.shard = at, client, cluster, shard
        self.killed = None

    def choose(self, engine, B, A, p, state):
        state["t"] = state.get("t", -1) + 1
        if state["t"] == self.at:
            (address,) = self.client.who_has([self.shard])[self.shard.key]
            nanny = next(n for n in self.cluster.workers.values()
                         if n.worker_address == address)
            self.killed = nanny.process.process.pid
            threading.Thread(target=os.kill, args=(self.killed, signal.SIGKILL)).start()
        return THEOREM.choose(engine, B, A, p, state)

    def device_loop(self, problem):
        return None


def test_worker_killed_mid_fit(client):
    """Dask rebuilds the lost shards from their source and reruns their tasks elsewhere:
    the fit completes, every step, with the bits of an undisturbed run."""
    import psutil

    sharded, _, B, A = _pair(seed=9)
    undisturbed = lorakern.fit(sharded, B, A, steps=STEPS, device="cpu", step_size="theorem")
    cluster = client.cluster
    policy = _KillWorkerAt(3, client, cluster, sharded.shards.futures[0])
    got = lorakern.fit(sharded, B, A, steps=STEPS, device="cpu", step_size=policy)
    assert policy.killed is not None
    psutil.Process(policy.killed).wait(timeout=30) if psutil.pid_exists(policy.killed) else None
    assert not psutil.pid_exists(policy.killed)
    assert got.status == "completed" and got.steps == STEPS and len(got.history) == STEPS
    assert_bitwise(got.B, undisturbed.B, "B")
    assert_bitwise(got.A, undisturbed.A, "A")
    assert_bitwise(got.history.loss, undisturbed.history.loss, "history.loss")
    client.wait_for_workers(2, timeout=120)  # the nanny's new worker, for the tests after


def test_all_false_mask_warns(client):
    """As for NumPy arrays (issue 24): a dask mask False everywhere warns at the caller; one
    whose False shards are only some of them does not."""
    W0, Y, _ = random_data((M, N), np.float32, seed=31)
    mask = np.zeros((M, N), bool)
    with pytest.warns(lorakern.InputWarning, match="mask is False everywhere") as record:
        lorakern.Problem(_dask(W0), _dask(Y), mask=_dask(mask))
    assert record[0].filename == __file__
    mask[-1, 0] = True  # observed in the last shard only
    with warnings.catch_warnings():
        warnings.simplefilter("error", lorakern.InputWarning)
        lorakern.Problem(_dask(W0), _dask(Y), mask=_dask(mask))
