"""Compile the CPU kernels ahead of time, in parallel: ``lorakern warmup``.

Numba compiles a kernel on its first use and keeps it in its on-disk cache (the folder of
``lorakern._cpu.kernels.cache_dir()``, or NUMBA_CACHE_DIR), where every later process finds
it. ``warm`` makes those first uses happen now, one task per (kind, loss, dtype, mask), each
in its own process, as many at once as there are cores: a task runs the steps a user's
first fit would run on a small problem of its kind (the theorem's step, the certified and
Armijo searches, for the linear kind each exact-norm strategy at a size below and above the
serial cut, and the bound), so it compiles what they compile, for its dtype. A task whose
kernels are cached already only loads them (about a second).

    lorakern warmup                                    # the README's examples (DEFAULT_TASKS)
    lorakern warmup --kind matrix linear --loss squared huber --dtype float32 float64 --mask
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing import get_context


@dataclass(frozen=True)
class Task:
    """One kernel family to compile: the problem kind, the loss, the dtype, masked or not."""

    kind: str  # "matrix" or "linear"
    loss: str
    dtype: str  # "float32" or "float64"
    masked: bool = False

    def __str__(self) -> str:
        return f"{self.kind} {self.loss} {self.dtype}{' masked' if self.masked else ''}"


#: what the README's examples use: the squared loss in float32 and float64, huber, a mask,
#: and the linear layer's cross-entropy
DEFAULT_TASKS = (Task("matrix", "squared", "float32"), Task("matrix", "squared", "float64"),
                 Task("matrix", "huber", "float32"), Task("matrix", "squared", "float32", True),
                 Task("linear", "cross_entropy", "float32"))


def tasks_for(kinds, losses, dtypes, mask: bool) -> list[Task]:
    """Every valid (kind, loss, dtype, masked) of the product: the matrix kind has no
    cross-entropy, the linear kind no mask (both masked and not with ``mask``)."""
    from .losses import LOSSES

    out = []
    for kind in kinds:
        for loss in losses:
            if loss not in LOSSES and loss != "cross_entropy":
                raise ValueError(f"unknown loss {loss!r}; expected one of "
                                 f"{sorted(set(LOSSES) | {'cross_entropy'})}")
            if kind == "matrix" and loss == "cross_entropy":
                continue
            for dtype in dtypes:
                out.append(Task(kind, loss, dtype))
                if mask and kind == "matrix":
                    out.append(Task(kind, loss, dtype, True))
    return out


def run_task(task: Task) -> tuple[Task, float]:
    """Compile ``task``'s kernels in this process (the steps of a first fit on small problems);
    (task, seconds)."""
    import warnings

    import numpy as np

    import lorakern
    from lorakern.testing import random_linear_data

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    dtype = np.dtype(task.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small problems' own notes are not the user's
        if task.kind == "matrix":
            m, n = 40, 30
            W0 = rng.standard_normal((m, n)).astype(dtype)
            Y = rng.standard_normal((m, n)).astype(dtype)
            if task.loss == "logistic":
                Y = np.where(Y >= 0, 1, -1).astype(dtype)
            mask = rng.random((m, n)) < 0.5 if task.masked else None
            problem = lorakern.Problem(W0, Y, loss=task.loss, mask=mask)
            # a rank of 4 and one not a multiple of 4: the gradients the certified step's
            # quartic reads are then C-contiguous and strided, two signatures
            for r in (3, 4):
                B, A = lorakern.init_adapters(m, n, rank=r, dtype=dtype, seed=1, init="gaussian")
                for step_size in ("theorem", "certified", "armijo"):
                    lorakern.fit(problem, B, A, steps=2, device="cpu", step_size=step_size)
        else:
            strategies = ("moments", "gram", "tiles") if task.loss == "squared" else ("gram", "tiles")
            # N m min(N, n) on each side of _cpu/linear.py's SERIAL_WORK: serial loops, BLAS tiles
            for N, n, m in ((24, 12, 10), (256, 128, 160)):
                X, Y, W0 = random_linear_data(rng, N, n, m, dtype, loss=task.loss)
                B, A = lorakern.init_adapters(m, n, rank=3, dtype=dtype, seed=1, init="gaussian")
                for strategy in strategies:
                    problem = lorakern.LinearProblem(X, Y, W0, loss=task.loss, norm_strategy=strategy)
                    lorakern.fit(problem, B, A, steps=2, device="cpu")
                lorakern.fit(problem, B, A, steps=2, device="cpu",
                             step_size=lorakern.Theorem(norm="bound"))
                lorakern.fit(problem, B, A, steps=2, device="cpu", step_size="certified")
    return task, time.perf_counter() - start


def _leave_sigint_to_the_parent() -> None:
    """A worker ignores Ctrl-C (the terminal sends it to the whole process group): the
    parent ends the workers at once (Pool.terminate) and says what was done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def warm(tasks=DEFAULT_TASKS, jobs: int | None = None, progress=sys.stderr) -> dict[Task, float]:
    """Run ``tasks`` in ``jobs`` processes at once (default: the cores this process may use),
    showing one progress line on ``progress`` (None: silent); {task: seconds}."""
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        return {}
    if jobs is None:
        try:
            jobs = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            jobs = os.cpu_count() or 1
    jobs = max(1, min(jobs, len(tasks)))
    start, done = time.perf_counter(), {}

    def show(last: str) -> None:
        if progress is not None:
            line = (f"lorakern warmup: {len(done)}/{len(tasks)} compiled, {jobs} at once, "
                    f"{time.perf_counter() - start:.1f} s{last}")
            progress.write("\r" + line.ljust(100))
            progress.flush()

    show("")
    # spawn, not fork: a fresh interpreter per worker, whatever threads this one has
    pool = get_context("spawn").Pool(jobs, initializer=_leave_sigint_to_the_parent)
    try:
        for task, seconds in pool.imap_unordered(run_task, tasks):
            done[task] = seconds
            show(f" (last: {task}, {seconds:.1f} s)")
        pool.close()
    except BaseException:  # Ctrl-C: the workers are ended at once, not waited for
        pool.terminate()
        if progress is not None:
            progress.write(f"\nlorakern warmup: stopped; the {len(done)} finished are cached\n")
        raise
    finally:
        pool.join()
    if progress is not None:
        progress.write("\n")
        progress.flush()
    return done
