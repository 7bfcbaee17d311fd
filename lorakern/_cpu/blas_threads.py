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
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading

ENABLED = os.environ.get("LORAKERN_QUIET_BLAS", "1") != "0"
#: passes of fewer flops (6 m n r for the matrix kind) are left alone: the shutdown and the
#: restart of the threads cost ~0.1 ms together, under 2 % of a pass this large
MIN_FLOPS = 4e8
#: the prefix of lorakern's pool threads (workers.py), which never call BLAS
POOL_PREFIX = "lorakern-cpu"

_shutdowns: list | None = None  # blas_thread_shutdown_ of each OpenBLAS found, once
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
        found.append(shutdown)
    return found


def _alone() -> bool:
    """Whether no Python thread but this one and lorakern's idle pool exists."""
    ours = {threading.get_ident()}
    ours.update(t.ident for t in threading.enumerate() if t.name.startswith(POOL_PREFIX))
    return set(sys._current_frames()) <= ours


def quiet(flops: float) -> bool:
    """End OpenBLAS's idle threads before a pass of ``flops``, where that is safe and worth
    it; whether it was done."""
    global _shutdowns
    if not ENABLED or flops < MIN_FLOPS:
        return False
    if _shutdowns is None:
        with _lock:
            if _shutdowns is None:
                _shutdowns = _find()
    if not _shutdowns or not _alone():
        return False
    for shutdown in _shutdowns:
        shutdown()
    return True
