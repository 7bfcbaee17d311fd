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
