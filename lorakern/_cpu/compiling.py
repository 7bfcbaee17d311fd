"""Numba compiles that Ctrl-C can stop.

A Numba kernel compiles on its first call with its argument types, for seconds (with an
empty cache a first squared-loss step compiled for 5-13 s on this shared 2-core machine),
and most of that time is spent inside LLVM, in C calls during which Python runs no signal
handler: a Ctrl-C used to wait the compile out. So on the main thread a compile runs on a
helper thread (``ensure``), and the main thread waits for it in steps of POLL_S, where a
KeyboardInterrupt (Python's own handler) or a stop asked for by fit's first Ctrl-C
(_interrupt.py) ends the wait at once: KeyboardInterrupt is raised, nothing having been
computed. The compile goes on in the background (Numba cannot stop it) and its thread is a
daemon, so the process exits without waiting for it; Numba writes its cache files whole
(a temporary file, then a rename), so an abandoned compile leaves no broken cache behind.
Off the main thread (Dask workers, the pool) the call compiles as before.
"""
from __future__ import annotations

import sys
import threading

try:  # Numba's C function behind its own dispatch (not public API: checked, with a fallback)
    from numba._dispatcher import compute_fingerprint
except ImportError:  # pragma: no cover - a Numba without it: every check takes typeof's path
    def compute_fingerprint(value):
        raise TypeError("no fingerprints in this Numba")

from .. import _interrupt

#: seconds between the main thread's looks at a pending Ctrl-C while a compile runs
POLL_S = 0.05

#: (id of a dispatcher, its arguments' Numba fingerprints) known to be compiled: the check of
#: a later call, 17 fingerprints of the fused kernel's arguments at ~0.6 us each, where
#: Numba's Python typeof takes ~45 us per argument (0.8 ms a pass). The dispatchers are
#: module-level or cached for the process's life, so their ids are never reused.
_compiled: set = set()


def ensure(dispatcher, args) -> None:
    """Compile ``dispatcher`` (a Numba CPUDispatcher) for the types of ``args`` unless it has
    that signature already: on a helper thread, the main thread waiting interruptibly."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        key = (id(dispatcher), tuple(compute_fingerprint(a) for a in args))
    except (TypeError, ValueError, NotImplementedError):  # a type without a fingerprint
        key = None
    if key in _compiled:
        return
    signature = tuple(dispatcher.typeof_pyval(a) for a in args)
    if signature in dispatcher.overloads:
        if key is not None:
            _compiled.add(key)
        return
    done = threading.Event()
    failure = []

    def compile_():
        try:
            dispatcher.compile(signature)  # or loads it from Numba's cache on disk
        except BaseException as exc:  # re-raised on the main thread
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=compile_, name="lorakern-cpu-compile", daemon=True).start()
    while not done.wait(POLL_S):  # a KeyboardInterrupt from Python's handler lands here
        if _interrupt.stop_requested():  # fit's first Ctrl-C: no step to finish yet
            sys.stderr.write("lorakern: Ctrl-C during a kernel compile: stopped before the "
                             "first step\n")
            sys.stderr.flush()
            raise KeyboardInterrupt("Ctrl-C during a kernel compile")
    if failure:
        raise failure[0]
    if key is not None:
        _compiled.add(key)


def call(dispatcher, *args):
    """``dispatcher(*args)``, compiled first by ``ensure``."""
    ensure(dispatcher, args)
    return dispatcher(*args)
