"""Ending OpenBLAS's idle threads before a large CPU pass (lorakern/_cpu/blas_threads.py,
issue 11): the user's NumPy code computes the same bits on as many threads as before, the
threads come back, nothing leaks, and it is never done while another Python thread exists.

Each check runs in a fresh process, so that the threads other tests leave behind (a Dask
client's, say) do not decide the outcome."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, threading
import numpy as np
import lorakern
from lorakern._cpu import blas_threads, workers

def tasks():
    return len(os.listdir("/proc/self/task"))

def openblas():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [(p["filepath"], p["num_threads"]) for p in threadpool_info()
            if p["internal_api"] == "openblas" and p.get("threading_layer") == "pthreads"]

out = {"openblas": openblas()}
rng = np.random.default_rng(0)
a, b = rng.standard_normal((384, 384)), rng.standard_normal((384, 384))
big = blas_threads.MIN_FLOPS

first = a @ b
out["tasks_running"] = tasks()
out["done"] = blas_threads.quiet(big)
out["tasks_quiet"] = tasks()
second = a @ b
out["tasks_again"] = tasks()
out["same_bits"] = first.tobytes() == second.tobytes()
out["openblas_after"] = openblas()
out["small"] = blas_threads.quiet(big / 2)

# a user's thread (idle or not) turns it off
event = threading.Event()
other = threading.Thread(target=event.wait)
other.start()
a @ b
out["with_other_thread"] = blas_threads.quiet(big)
out["tasks_other_thread"] = tasks()
event.set()
other.join()

# many shutdowns and restarts: no memory lost
for _ in range(50):
    a @ b
    blas_threads.quiet(big)
def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
rss = rss_kib()
for _ in range(400):
    a @ b
    blas_threads.quiet(big)
out["rss_growth_kib"] = rss_kib() - rss

# one_thread: OpenBLAS on one thread inside, no thread started or ended, the count put back
before = openblas()
first = a @ b
tasks_before = tasks()
with blas_threads.one_thread() as done:
    out["one_thread_done"] = done
    out["one_thread_inside"] = openblas()
    out["one_thread_same_bits"] = (a @ b).tobytes() == first.tobytes()
    out["one_thread_tasks"] = tasks() - tasks_before
out["one_thread_after"] = openblas() == before
event = threading.Event()
other = threading.Thread(target=event.wait)
other.start()
with blas_threads.one_thread() as done:
    out["one_thread_with_other_thread"] = done
event.set()
other.join()

# a fit large enough to do it, with a NumPy product between its steps, against one without it
calls = []
quiet = blas_threads.quiet
blas_threads.quiet = lambda flops: calls.append(quiet(flops)) or calls[-1]
W0 = rng.standard_normal((1024, 1040)).astype(np.float32)
B, A = lorakern.init_adapters(1024, 1040, rank=64, dtype=np.float32, seed=1, init="gaussian")
problem = lorakern.Problem(W0, np.zeros_like(W0))
runs = []
for enabled in (True, False):
    blas_threads.ENABLED = enabled
    Bt, At, products = B, A, []
    for _ in range(3):
        products.append((a @ b).tobytes())
        result = lorakern.fit(problem, Bt, At, steps=1, device="cpu", step_size="theorem")
        Bt, At = result.B, result.A
    runs.append((Bt.tobytes(), At.tobytes(), products))
out["fit_quieted"] = calls[:3]
out["fit_same_bits"] = runs[0] == runs[1]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def report():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def pthreads_openblas(report):
    if not sys.platform.startswith("linux"):
        pytest.skip("done on Linux only")
    if not report["openblas"]:
        pytest.skip("NumPy's BLAS here is not a pthreads OpenBLAS (or threadpoolctl is missing)")
    return report


def test_threads_end_and_come_back(pthreads_openblas):
    r = pthreads_openblas
    assert r["done"] is True
    workers = sum(n - 1 for _, n in r["openblas"])  # OpenBLAS's threads beside the caller
    assert r["tasks_running"] - r["tasks_quiet"] == workers, r  # ended
    assert r["tasks_again"] == r["tasks_running"], r  # and started again by the next product
    assert r["openblas_after"] == r["openblas"]  # as many threads as before
    assert r["same_bits"]


def test_never_beside_another_python_thread(pthreads_openblas):
    r = pthreads_openblas
    assert r["with_other_thread"] is False
    assert r["tasks_other_thread"] == r["tasks_running"] + 1  # the pool left running


def test_one_thread(pthreads_openblas):
    """Inside one_thread OpenBLAS reports one thread and computes the same bits; no thread is
    started or ended; the count comes back; beside another Python thread it is not done."""
    r = pthreads_openblas
    assert r["one_thread_done"] is True
    assert [n for _, n in r["one_thread_inside"]] == [1] * len(r["openblas"]), r
    assert r["one_thread_same_bits"] and r["one_thread_tasks"] == 0 and r["one_thread_after"], r
    assert r["one_thread_with_other_thread"] is False


LINEAR = r"""
import hashlib, json, sys
import numpy as np
import lorakern
from lorakern._cpu import blas_threads, linear, workers
from lorakern._dispatch import bind
from lorakern.testing import random_linear_data

digests = {}
# sizes above _cpu/linear.py's SERIAL_WORK: the exact norm's BLAS tiles on the workers
for strategy, (N, n, m, r) in (("moments", (64, 520, 512, 8)), ("gram", (300, 160, 150, 4)),
                               ("tiles", (300, 160, 150, 4))):
    rng = np.random.default_rng([N, n, m, r])
    X, Y, W0 = random_linear_data(rng, N, n, m, np.float32, loss="squared")
    B = (0.1 * rng.standard_normal((m, r))).astype(np.float32)
    A = (0.1 * rng.standard_normal((r, n))).astype(np.float32)
    problem = lorakern.LinearProblem(X, Y, W0, norm_strategy=strategy)
    if strategy == "moments":  # made once, by BLAS's own threads: not what is compared here
        with blas_threads.one_thread():
            problem.moments
    engine = bind(problem, "cpu")
    real_count = workers.count
    # the default tile, and tiles patched small so that every strategy crosses several tiles
    # and ends on a partial one (160 = 3 x 48 + 16, 300 = 6 x 48 + 12, 512 = 10 x 48 + 32)
    for tile in (linear.NORM_TILE, 48):
        linear.NORM_TILE = tile
        for count in (real_count(), 1, 2, 3):
            workers.count = lambda count=count: count
            p = engine.fused_pass(engine.asarray(B), engine.asarray(A))
            digests[f"{strategy} tile {tile} workers {count}"] = float(p.g_sq).hex()
        workers.count = real_count
    linear.NORM_TILE = 256
print(json.dumps(digests))
"""


def test_linear_norm_does_not_depend_on_blas_threads():
    """The linear kind's exact norm (moments, Gram, tiles, on the BLAS path) gives the same bits
    with OpenBLAS's default threads and with OPENBLAS_NUM_THREADS=1, on 1, 2, 3 or all workers, at the default tile and at tiles
    patched small (several tiles, a partial last one).
    (The moments C0 and Sigma, made once per problem by threaded BLAS products, can differ in
    the last bit between thread counts; the script makes them on one thread in both runs.)"""
    import os

    runs = []
    for env in ({}, {"OPENBLAS_NUM_THREADS": "1"}):
        proc = subprocess.run([sys.executable, "-c", LINEAR], capture_output=True, text=True,
                              timeout=600, cwd=ROOT, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1], runs
    for strategy in ("moments", "gram", "tiles"):
        for tile in (256, 48):  # same bits on 1, 2, 3 and all workers, at each tiling
            prefix = f"{strategy} tile {tile} "
            assert len({v for k, v in runs[0].items() if k.startswith(prefix)}) == 1, runs[0]


def test_small_passes_left_alone(pthreads_openblas):
    assert pthreads_openblas["small"] is False


def test_no_memory_lost(pthreads_openblas):
    # 400 shutdowns and restarts; each restart maps the threads' stacks and buffers again
    assert pthreads_openblas["rss_growth_kib"] < 8 * 1024, pthreads_openblas


def test_fit_bits_unchanged(pthreads_openblas):
    """A fit whose passes end the threads: the user's products between its steps and its
    own results are the bits of a fit that never does."""
    r = pthreads_openblas
    assert r["fit_quieted"] == [True, True, True], r["fit_quieted"]
    assert r["fit_same_bits"]
