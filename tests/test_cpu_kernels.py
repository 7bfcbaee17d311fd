"""The CPU kernels (issue 11): the SIMD and the portable path against the reference, the
same bits whatever the Numba thread count, the on-disk cache of the generated kernels
(issue 12, item 7), and NumPy's BLAS left as the user set it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import lorakern
from lorakern import reference
from lorakern._cpu import kernels, simd

from helpers import (DTYPES, LOSS_NAMES, assert_bitwise, compare_pass, compare_step, device_pass,
                     make_case)

ROOT = Path(lorakern.__file__).resolve().parents[1]

#: odd shapes (m, n, r): none a multiple of a tile, a block or a unit; r = 64 and r not a
#: multiple of 4 included
SHAPES = [(1, 1, 1), (5, 3, 2), (37, 101, 5), (67, 131, 9), (131, 67, 64)]


def _env(**extra):
    # the package under test (installed or this checkout) and this tests/ folder (helpers.py):
    # under CI the package is installed, so tests/ is not beside it
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (str(ROOT), tests, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture(params=["simd", "portable"])
def path(request, monkeypatch):
    """Each kernel path in turn (the SIMD one only where the CPU has AVX2 and FMA)."""
    if request.param == "simd" and not simd.available():
        pytest.skip("this CPU has no AVX2/FMA: only the portable kernels run here")
    monkeypatch.setattr(kernels, "SIMD", request.param == "simd")
    return request.param


@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_path_matches_reference(path, dtype, shape, tiles, request):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    problem, B, A = make_case(shape, dtype, seed=sum(shape) + 1)
    compare_pass(problem, B, A, "cpu")
    compare_step(problem, B, A, "cpu")


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_path_losses_and_mask_match_reference(path, dtype, loss, small_tiles):
    problem, B, A = make_case((45, 77, 6), dtype, loss=loss, masked=True, seed=31, delta=0.5)
    compare_pass(problem, B, A, "cpu")
    compare_step(problem, B, A, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_loss_pass_is_the_fused_pass_loss(path, dtype, small_tiles):
    """The loss-only pass (line searches, J(V_T)) adds the same units' losses in the same order."""
    problem, B, A = make_case((37, 101, 5), dtype, loss="huber", masked=True, seed=32, delta=0.3)
    from lorakern._dispatch import bind

    engine = bind(problem, "cpu")
    assert engine.loss_pass(B, A) == engine.fused_pass(B, A).loss
    assert engine.loss_pass(B, A) == pytest.approx(reference.loss_pass(problem, None, B, A), rel=1e-5)


def test_simd_lane_sum_order():
    """vsum adds halves pairwise (a fixed order), and vfma rounds once."""
    import numba

    from lorakern._cpu.simd import vfma, vload, vstore, vsum

    @numba.njit
    def run(x, y, out):
        vstore(out, 0, 0, vfma(vload(x, 0, 0), vload(y, 0, 0), vload(out, 0, 0)))
        return vsum(vload(x, 0, 0))

    x = np.array([[1e8, 1.0, -1e8, 1.0, 3.0, 5.0, 7.0, 11.0]], np.float32)
    y = np.full((1, 8), 1 + 2.0**-12, np.float32)
    out = np.full((1, 8), -1.0, np.float32)
    total = run(x, y, out)
    pairs = x[0, :4] + x[0, 4:]
    pairs = pairs[:2] + pairs[2:]
    assert total == pairs[0] + pairs[1]
    exact = x.astype(np.float64) * y.astype(np.float64) - 1.0
    np.testing.assert_array_equal(out, exact.astype(np.float32))


BITS_SCRIPT = r"""
import hashlib, json, sys
import numba, numpy as np
from lorakern._cpu import kernels, matrix
from lorakern._cpu import workers as workers_module
from lorakern._dispatch import bind
from helpers import make_case

def digest(p, loss_only):
    h = hashlib.sha256()
    for x in (p.grad_B, p.grad_A):
        h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.array([p.loss, p.g_sq, p.grad_sq, p.v_sq, loss_only]).tobytes())
    return h.hexdigest()

cases = [((37, 101, 5), "float32", "squared", False), ((131, 67, 64), "float64", "huber", True),
         ((300, 520, 16), "float32", "logistic", True), ((257, 263, 17), "float64", "squared", False)]
out = {}
for path in sys.argv[1].split(","):
    kernels.SIMD = path == "simd"
    for tiles in ("default", "small"):
        if tiles == "small":
            matrix.MIN_TILE = matrix.MAX_TILE = 24
            matrix.BLOCK_ROWS, matrix.MAX_UNIT_ROWS, matrix.MAX_UNIT_COLS = 12, 24, 48
            matrix.LARGE_RANK_BLOCK_ROWS = 12
        for shape, dtype, loss, masked in cases:
            problem, B, A = make_case(shape, np.dtype(dtype), loss=loss, masked=masked, seed=5, delta=0.5)
            engine = bind(problem, "cpu")
            key = f"{path}/{tiles}/{shape}/{dtype}/{loss}/{masked}"
            for threads in (1, 2, 3):
                numba.set_num_threads(threads)
                assert numba.get_num_threads() == threads
                d = digest(engine.fused_pass(B, A), engine.loss_pass(B, A))
                out.setdefault(key, {})[f"threads {threads}"] = d
            own = workers_module.count
            for workers in (1, 4, 7):  # the pass's worker threads, whatever threads() says
                workers_module.count = lambda: workers
                d = digest(engine.fused_pass(B, A), engine.loss_pass(B, A))
                out[key][f"workers {workers}"] = d
            workers_module.count = own
print(json.dumps(out))
"""


def test_same_bits_for_1_2_3_threads():
    """Fixed work units merged in unit order: the same bits on 1, 2 and 3 Numba threads and
    on 1, 4 and 7 worker threads, for both paths, default and small tiles, every loss, with
    and without a mask."""
    paths = "simd,portable" if simd.available() else "portable"
    proc = subprocess.run([sys.executable, "-c", BITS_SCRIPT, paths], capture_output=True, text=True,
                          env=_env(NUMBA_NUM_THREADS="3"), timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 8 * len(paths.split(","))
    differ = {key: d for key, d in results.items() if len(set(d.values())) != 1}
    assert not differ, f"bits depend on the thread count: {differ}"


CACHE_SCRIPT = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
import lorakern
from lorakern._cpu import kernels
rng = np.random.default_rng(0)
W0, Y = rng.standard_normal((40, 30)), rng.standard_normal((40, 30))
B, A = lorakern.init_adapters(40, 30, rank=4, dtype=np.float64, seed=1, init="gaussian")
problem = lorakern.Problem(W0, Y)
lorakern.step(problem, B, A, device="cpu", step_size="theorem")
seconds = time.perf_counter() - t0
X, Yl = rng.standard_normal((50, 30)), rng.standard_normal((50, 40))
linear = lorakern.LinearProblem(X, Yl, W0, loss="huber")
lorakern.step(linear, B, A, device="cpu", step_size="theorem")
from lorakern._cpu import linear_kernels
fused = kernels.fused_kernel(problem.loss, False, False, kernels.SIMD)
sweep = linear_kernels.sweep_kernel(linear.loss)
stats = {name: (sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values()))
         for name, f in (("fused", fused), ("sweep", sweep))}
print(json.dumps({"seconds": seconds, "stats": stats, "file": fused.py_func.__code__.co_filename,
                  "sweep file": sweep.py_func.__code__.co_filename}))
"""


def test_second_process_reuses_the_compiled_kernels(tmp_path):
    """A new process loads the kernels that an earlier one compiled (Numba's cache), instead of
    compiling them again (issue 12, item 7): the matrix kind's fused pass and the linear
    kind's sweep."""
    env = _env(NUMBA_CACHE_DIR=str(tmp_path))
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", CACHE_SCRIPT], capture_output=True, text=True,
                              env=env, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    for file in (first["file"], first["sweep file"]):
        assert Path(file).parent == tmp_path / "lorakern", file
    for kernel in ("fused", "sweep"):
        assert first["stats"][kernel][1] >= 1, f"the first process did not compile? {first}"
        hits, misses = second["stats"][kernel]
        assert hits >= 1 and misses == 0, f"the second process compiled the {kernel} again: {second}"
    print(f"first step of a process: {first['seconds']:.2f} s compiling, "
          f"{second['seconds']:.2f} s from the cache")


def test_blas_threads_untouched():
    """A step leaves NumPy's BLAS thread pool as it was (issue 11: lorakern must not change
    what the user's own NumPy code does)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def pools():
        return [(p["internal_api"], p["filepath"], p["num_threads"]) for p in threadpoolctl.threadpool_info()]

    problem, B, A = make_case((67, 131, 9), np.float32, seed=33)
    before = pools()
    lorakern.step(problem, B, A, device="cpu", step_size="theorem")
    lorakern.fit(problem, B, A, steps=2, device="cpu", step_size="armijo")
    assert pools() == before


def test_concurrent_calls_on_one_problem(small_tiles):
    """Two Python threads stepping the same problem (its kept workspace is locked; the second
    gets its own) give the bits of one call alone."""
    problem, B, A = make_case((67, 131, 9), np.float64, seed=34)
    alone = device_pass(problem, "cpu", B, A)
    got = [None] * 4

    def work(i):
        got[i] = device_pass(problem, "cpu", B, A)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(got))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in got:
        assert_bitwise(p.grad_B, alone.grad_B, "grad_B")
        assert_bitwise(p.grad_A, alone.grad_A, "grad_A")
        assert (p.loss, p.g_sq, p.grad_sq, p.v_sq) == (alone.loss, alone.g_sq, alone.grad_sq, alone.v_sq)


FORK_SCRIPT = r"""
import os, signal, sys
import numpy as np
from lorakern._cpu import matrix, workers
from lorakern._dispatch import bind
from helpers import make_case

matrix.MAX_UNIT_ROWS, matrix.MAX_UNIT_COLS = 24, 48   # many units
workers.count = lambda: 3                           # and a pool of 2 threads
problem, B, A = make_case((150, 130, 6), np.dtype("float32"), seed=7)
before = bind(problem, "cpu").fused_pass(B, A)
pid = os.fork()
if pid == 0:                                         # the child: the pool's threads are not here
    signal.alarm(60)                                 # a pass waiting on them would hang
    p = bind(problem, "cpu").fused_pass(B, A)
    os._exit(0 if np.array_equal(p.grad_A, before.grad_A) and p.loss == before.loss else 1)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_makes_its_own_workers():
    """A process forked after a pass (multiprocessing's default on Linux) runs its own passes:
    it does not wait on worker threads that only its parent has."""
    proc = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True,
                          env=_env(), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "0", "the forked child's pass hung or differed"
