"""The fused step on a Dask cluster (issue 10), as pytest-benchmark groups.

Group "dask step m=n=8192 r=16 float32": dask-2x1 (a LocalCluster of 2 worker processes, 1
thread each), dask-1x1 (1 worker, 1 thread; the same two row shards in turn), and
lorakern-cpu (this process, 2 Numba threads). One timed call is one step as fit runs it.
The interleaved ratios, the engine's overhead and the long run are in dask_scaling.py
(``python benchmarks/dask_scaling.py --long 1000``), which this file shares its set-up with.

CI runs this file with --benchmark-disable: the case shrinks to 256 x 256, dask-2x1 and
lorakern-cpu run one step each, checked against the reference (dask-1x1 only times).
"""
from __future__ import annotations

import numpy as np
import pytest

import lorakern

pytest.importorskip("distributed")

from dask_scaling import cluster, engine_for, random_arrays, run_steps, sharded_problem  # noqa: E402

M = N = 8192
R, DTYPE = 16, np.dtype(np.float32)
SMOKE = 256
IMPLS = ("dask-2x1", "dask-1x1", "lorakern-cpu")


@pytest.fixture(scope="module")
def setup(request):
    """Clusters, problems and adapters for the size the run asks for (built once)."""
    disabled = request.config.getoption("benchmark_disable")
    m = n = SMOKE if disabled else M
    made, closers = {}, []
    W0, Y = random_arrays(m, n, DTYPE, shards=2)
    B, A = lorakern.init_adapters(m, n, R, dtype=DTYPE, seed=1, init="gaussian")
    local = lorakern.Problem(W0.compute(scheduler="threads"), Y.compute(scheduler="threads"))

    def get(impl):
        if impl not in made:
            if impl == "lorakern-cpu":
                made[impl] = engine_for(local)
            else:
                c, client = cluster(2 if impl == "dask-2x1" else 1)
                closers.extend([client.close, c.close])
                made[impl] = engine_for(sharded_problem(client, W0, Y), client)
        return made[impl]

    yield disabled, get, local, B, A
    for close in closers:
        close()


@pytest.mark.parametrize("impl", IMPLS)
def test_dask_step(benchmark, setup, cpu_threads_2, impl):
    disabled, get, local, B, A = setup
    if disabled and impl == "dask-1x1":
        pytest.skip("dask-1x1 only times (a third worker process to compile for)")
    engine = get(impl)
    benchmark.group = f"dask step m=n={M} r={R} {DTYPE}"
    benchmark.extra_info.update(impl=impl, m=M, n=N, r=R, dtype=str(DTYPE))
    if disabled:
        got = benchmark(run_steps, engine, B, A, 1)
        want = lorakern.reference.step(local, B, A)
        for g, w in zip(got, (want.B, want.A)):
            scale = float(np.max(np.abs(w)))
            assert float(np.max(np.abs(g - w))) <= 1e-5 * scale
    else:
        run_steps(engine, B, A, 1)  # warm-up: compiles here and on the workers
        benchmark(run_steps, engine, B, A, 1)


@pytest.fixture
def cpu_threads_2():
    """This process's Numba threads at 2 (lorakern-cpu's peer setting), restored after."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    yield
    numba.set_num_threads(before)
