"""The CPU kernels' worker threads: a pool kept between passes, shared by the problem kinds.

A pass's kernel is a nogil Numba function that takes work units (or row parts) from an
atomic counter until none is left; ``run`` calls it on this thread and on ``count() - 1``
threads of the pool at once. The units, not the workers, fix the order of every sum, so
the number of workers never changes the bits. Unlike Numba's parallel loops (OpenMP or TBB
threads that keep spinning after a loop), the pool's idle threads sleep: a NumPy call
right after a step finds its cores free (benchmarks/NOTES.md, v7).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from . import blas_threads, compiling, threads

#: Workers of a pass: threads() of them, WORKERS_PER_CORE per core when threads() is every
#: core of the machine. More workers than cores get a larger share of a core that another
#: process is using, as the OS shares a core per thread (one core busy: 11-22 % faster;
#: against OpenBLAS's threads spinning after a NumPy product it does not help, see
#: benchmarks/NOTES.md). A smaller threads() is a limit the caller set
#: (numba.set_num_threads, a Dask worker's threads) and is kept.
WORKERS_PER_CORE = 2

_pool: tuple[ThreadPoolExecutor, int] | None = None  # (the pool, its threads)
_pool_lock = threading.Lock()


def _forget_pool_in_child():
    """A forked child has none of the pool's threads: it makes its own on its first pass."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def count() -> int:
    """The workers a pass runs on (before the cap by its number of units)."""
    n = threads()
    return n * WORKERS_PER_CORE if n >= cores() else n


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run(work, args, workers: int, flops: float = 0.0) -> None:
    """``work(*args)`` on ``workers`` threads at once: this one and workers - 1 of a pool
    kept between passes (its idle threads sleep; they never spin). A pass of ``flops``
    first ends OpenBLAS's idle threads where that is safe and worth it (blas_threads.py)."""
    global _pool
    if hasattr(work, "overloads"):  # a Numba dispatcher: a first call compiles, stoppably
        compiling.ensure(work, args)
    blas_threads.quiet(flops)
    futures = []
    if workers > 1:
        with _pool_lock:
            if _pool is None or _pool[1] < workers - 1:
                if _pool is not None:
                    _pool[0].shutdown(wait=False)  # its threads end once idle
                _pool = ThreadPoolExecutor(workers - 1, thread_name_prefix="lorakern-cpu"), workers - 1
            pool = _pool[0]
        futures = [pool.submit(work, *args) for _ in range(workers - 1)]
    try:
        work(*args)
    finally:
        # every unit is taken now: a pool thread that has not started yet would find none,
        # so it is not waited for (on a busy core its wake-up can take longer than the pass)
        _wait_all(futures)


def _wait_all(futures) -> None:
    """Wait for the pool threads still in the pass, even through a KeyboardInterrupt (a
    second Ctrl-C, see _interrupt.py), raised once they are done: a thread left running
    would write into the workspace that the problem's next pass reuses."""
    interrupted = None
    for future in futures:
        if future.cancel():
            continue
        while True:
            try:
                future.result()
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
    if interrupted is not None:
        raise interrupted
