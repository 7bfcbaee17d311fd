"""OpenBLAS's idle threads, ended before a large CPU pass so that they do not spin on its cores.

After each threaded call, the worker threads of a pthreads OpenBLAS (NumPy's wheels bundle
one) wait for the next call by spinning on their cores for 2^28 TSC cycles, about 0.1 s
(OpenBLAS's ``YIELDING`` is a few ``nop`` on x86-64), and only then sleep. A pass started in
that window, as in any program that calls NumPy between steps, shares its cores with them
and loses up to half its speed (benchmarks/NOTES.md, v8). So before a large pass ``quiet``
calls OpenBLAS's own ``blas_thread_shutdown_``, the function OpenBLAS itself runs before
every ``fork()``: it ends the worker threads, and OpenBLAS starts them again, as many as
before, on its next threaded call. What the user's NumPy code computes, and on how many
threads, is unchanged (tests/test_blas_threads.py); the next NumPy product pays the start of
its threads (tens of microseconds).

It is done only where it is safe: on Linux, for an OpenBLAS built with pthreads, and only
while no Python thread exists but the caller and lorakern's own pool (one that might be
inside OpenBLAS at that moment could deadlock with the shutdown; Dask workers, Jupyter and
threaded programs therefore never get it). ``ENABLED = False``, or LORAKERN_QUIET_BLAS=0 in
the environment, turns it off.

``one_thread`` is the other half: a block in which every OpenBLAS call runs on its caller's
thread alone, under the same conditions. The linear kind's exact norm runs its products in
it, tile by tile on lorakern's own workers (_cpu/linear.py). A threaded OpenBLAS call splits
its work evenly between its threads and its caller spins until the last is done: with
another process busy on one of 2 cores, (8 x 1024) @ (1024 x 1024) in float64 took 24 ms
on 2 threads against 0.75 ms on one, (16 x 4096) @ (4096 x 4096) 85-92 ms against 20-24
(benchmarks/NOTES.md, "The linear kind on a busy machine"); lorakern's workers take tiles
from a counter, so a worker whose core is busy takes fewer. The block writes OpenBLAS's
``blas_cpu_number`` (the count each call reads, through ``num_cpu_avail``; what
``openblas_get_num_threads`` returns) and puts it back: ``openblas_set_num_threads`` would
start the threads that ``quiet`` ended, and a new thread spins before it sleeps, and on a
busy core each start and end waits for a time slice (a step of the small case of
benchmarks/linear_threads.py took 3x longer that way).
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager

ENABLED = os.environ.get("LORAKERN_QUIET_BLAS", "1") != "0"
#: passes of fewer flops (6 m n r for the matrix kind) are left alone: the shutdown and the
#: restart of the threads cost ~0.1 ms together, under 2 % of a pass this large
MIN_FLOPS = 4e8
#: the prefix of lorakern's threads: the pool's (workers.py), which call BLAS only inside a
#: pass that the caller waits for (linear.on_workers), never while ``quiet`` runs, and a
#: compile's (compiling.py), which never does
POOL_PREFIX = "lorakern-cpu"

_found: list | None = None  # (blas_thread_shutdown_, blas_cpu_number) of each OpenBLAS, once
_lock = threading.Lock()


def _openblas_paths() -> list[str]:
    """The OpenBLAS shared libraries mapped into this process (Linux: /proc/self/maps)."""
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)  # address perms offset dev inode path
                path = fields[5].strip() if len(fields) == 6 else ""
                name = os.path.basename(path)
                if "openblas" in name and ".so" in name and path not in paths:
                    paths.append(path)
    except OSError:  # not Linux
        pass
    return paths


def _symbol(lib, stem: str):
    """OpenBLAS's function ``stem`` under any of the names its builds give it."""
    for name in (f"openblas_{stem}", f"openblas_{stem}64_", f"scipy_openblas_{stem}64_",
                 f"scipy_openblas_{stem}"):
        f = getattr(lib, name, None)
        if f is not None:
            return f
    return None


def _find() -> list:
    """(blas_thread_shutdown_, its blas_cpu_number as a ctypes int or None) of each pthreads
    OpenBLAS in the process."""
    found = []
    for path in _openblas_paths():
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)  # never a new copy
        except OSError:
            continue
        shutdown, parallel = getattr(lib, "blas_thread_shutdown_", None), _symbol(lib, "get_parallel")
        if shutdown is None or parallel is None:
            continue
        parallel.restype = ctypes.c_int
        if parallel() != 1:  # 0: single-threaded build, 2: OpenMP threads (not OpenBLAS's own)
            continue
        shutdown.restype = ctypes.c_int
        try:
            count = ctypes.c_int.in_dll(lib, "blas_cpu_number")
        except ValueError:  # not exported by this build: one_thread is not done
            count = None
        found.append((shutdown, count))
    return found


def _openblas() -> list:
    global _found
    if _found is None:
        with _lock:
            if _found is None:
                _found = _find()
    return _found


def _alone() -> bool:
    """Whether no Python thread but this one and lorakern's idle pool exists."""
    ours = {threading.get_ident()}
    ours.update(t.ident for t in threading.enumerate() if t.name.startswith(POOL_PREFIX))
    return set(sys._current_frames()) <= ours


def quiet(flops: float) -> bool:
    """End OpenBLAS's idle threads before a pass of ``flops``, where that is safe and worth
    it; whether it was done."""
    if not ENABLED or flops < MIN_FLOPS:
        return False
    found = _openblas()
    if not found or not _alone():
        return False
    for shutdown, _ in found:
        shutdown()
    return True


@contextmanager
def one_thread():
    """``with one_thread() as done:`` every OpenBLAS call of the block runs on its caller's
    thread alone, where that is safe (Linux, a pthreads OpenBLAS that exports
    ``blas_cpu_number``, no Python thread but this one and lorakern's pool, ENABLED);
    ``done`` says whether it was done. OpenBLAS's threads are neither started nor ended; its
    count is put back on leaving, whatever happens inside."""
    found = _openblas() if ENABLED else []
    if not found or any(count is None for _, count in found) or not _alone():
        yield False
        return
    before = [count.value for _, count in found]
    for _, count in found:
        count.value = 1
    try:
        yield True
    finally:
        for (_, count), value in zip(found, before):
            count.value = value
