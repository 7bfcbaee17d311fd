"""The implementations that the benchmarks, ``benchmarks/run.py`` and ``lorakern bench`` time.

``COMPARISONS`` maps a name to a setup function: ``COMPARISONS[name](case)`` does the
untimed work (building the Problem, copying data) and returns a zero-argument callable
that performs one full step (gradients, norms, the theorem's eta, the update) and returns
``(B_next, A_next, eta)``. Every benchmark and the ``table`` below use this one table.

    >>> from lorakern.benchmarking import COMPARISONS, Case, table
    >>> run = COMPARISONS["lorakern-cpu"](Case(1024, 1024, 16, "float32"))
    >>> B1, A1, eta = run()
    >>> print(table(sizes=((1024, 1024),), ranks=(16,)))
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from .step_size import THEOREM_CONSTANT


@dataclass(frozen=True)
class Case:
    """One benchmark input: fresh seeded random data of shape (m, n), rank r, one dtype.

    W0, Y ~ N(0, 1); B ~ N(0, 1) (not the LoRA zero init: B = 0 would make B @ A and
    grad_A trivial), A ~ N(0, 1/r) so BA is of the same size as the residual. Each array
    has its own random stream, so it does not depend on which arrays were built first.
    Arrays are built on first use and kept; problems are built once per (loss, mask).
    """

    m: int
    n: int
    r: int
    dtype: str = "float32"
    seed: int = 0

    def _rng(self, stream: int):
        return np.random.default_rng([self.seed, stream, self.m, self.n, self.r])

    def _normal(self, stream: int, shape, scale: float = 1.0):
        x = self._rng(stream).standard_normal(shape, dtype=np.dtype(self.dtype).type)
        if scale != 1.0:
            x *= np.dtype(self.dtype).type(scale)
        return x

    @cached_property
    def W0(self) -> np.ndarray:
        return self._normal(1, (self.m, self.n))

    @cached_property
    def Y(self) -> np.ndarray:
        return self._normal(2, (self.m, self.n))

    @cached_property
    def R(self) -> np.ndarray:
        """The residual W0 - Y, as a user of plain NumPy would keep it."""
        return self.W0 - self.Y

    @cached_property
    def B(self) -> np.ndarray:
        return self._normal(3, (self.m, self.r))

    @cached_property
    def A(self) -> np.ndarray:
        return self._normal(4, (self.r, self.n), 1.0 / math.sqrt(self.r))

    @cached_property
    def mask(self) -> np.ndarray:
        """Boolean (m, n), about half the entries observed."""
        return self._rng(5).random((self.m, self.n), dtype=np.float32) < 0.5

    @cached_property
    def labels(self) -> np.ndarray:
        """Labels in {-1, +1} of the data's dtype, for the logistic loss."""
        y = np.where(self._rng(6).random((self.m, self.n), dtype=np.float32) < 0.5, -1, 1)
        return y.astype(self.dtype)

    def problem(self, loss: str = "squared", masked: bool = False):
        """The lorakern.Problem for ``loss`` (with ``mask`` if ``masked``), built once."""
        from .problems import Problem

        cache = self.__dict__.setdefault("_problems", {})
        key = (loss, masked)
        if key not in cache:
            Y = self.labels if loss == "logistic" else self.Y
            cache[key] = Problem(self.W0, Y, loss=loss, mask=self.mask if masked else None)
        return cache[key]

    def smaller(self, size: int) -> "Case":
        """The same case with m and n cut to at most ``size`` (smoke runs)."""
        return Case(min(self.m, size), min(self.n, size), self.r, self.dtype, self.seed)


# -- the implementations -------------------------------------------------------------------

#: name -> (loss, masked): the problem each implementation solves (for checks against the reference)
VARIANTS: dict[str, tuple[str, bool]] = {
    "lorakern-cpu": ("squared", False),
    "numpy": ("squared", False),
    "reference": ("squared", False),
    "lorakern-cpu-masked": ("squared", True),
    "lorakern-cpu-huber": ("huber", False),
    "lorakern-cpu-logistic": ("logistic", False),
}

#: implementations too slow to time on large inputs: name -> the most m * n elements
MAX_ELEMENTS: dict[str, int] = {"reference": 2048 * 2048}


def _lorakern(name: str, device: str = "cpu") -> Callable[[Case], Callable[[], object]]:
    loss, masked = VARIANTS[name]

    def setup(case: Case):
        from . import descent

        problem, B, A = case.problem(loss, masked), case.B, case.A

        def run():
            result = descent.step(problem, B, A, device=device)
            return result.B, result.A, result.eta

        return run

    return setup


def _reference(case: Case):
    from . import reference

    problem, B, A = case.problem(), case.B, case.A

    def run():
        result = reference.step(problem, B, A)
        return result.B, result.A, result.eta

    return run


def _numpy(case: Case):
    """The plain NumPy step a user would write, in the data's dtype, with the theorem's eta."""
    R, B, A = case.R, case.B, case.A
    norm = np.linalg.norm

    def run():
        G = R + B @ A
        grad_B = G @ A.T
        grad_A = B.T @ G
        g_sq = float(norm(G)) ** 2
        loss = 0.5 * g_sq  # noqa: F841  (a user would report it; it costs nothing)
        grad_sq = float(norm(grad_B)) ** 2 + float(norm(grad_A)) ** 2  # noqa: F841
        v_sq = float(norm(A)) ** 2 + float(norm(B)) ** 2
        eta = min(1.0 / (THEOREM_CONSTANT * 1.0 * (v_sq + math.sqrt(g_sq))), 1.0)
        return B - eta * grad_B, A - eta * grad_A, eta

    return run


COMPARISONS: dict[str, Callable[[Case], Callable[[], object]]] = {
    "lorakern-cpu": _lorakern("lorakern-cpu"),
    "numpy": _numpy,
    "reference": _reference,
    "lorakern-cpu-masked": _lorakern("lorakern-cpu-masked"),
    "lorakern-cpu-huber": _lorakern("lorakern-cpu-huber"),
    "lorakern-cpu-logistic": _lorakern("lorakern-cpu-logistic"),
}


def too_large(name: str, case: Case) -> bool:
    """True if ``name`` is not timed at this size (see MAX_ELEMENTS)."""
    return case.m * case.n > MAX_ELEMENTS.get(name, math.inf)


def expected(name: str, case: Case):
    """(B_next, A_next, eta) of the reference step on the problem ``name`` solves."""
    from . import reference

    result = reference.step(case.problem(*VARIANTS[name]), case.B, case.A)
    return result.B, result.A, result.eta


#: (rtol, atol relative to the largest entry) when comparing a timed step with the reference
TOLERANCES = {"float32": (2e-3, 2e-4), "float64": (1e-8, 1e-10)}


def check(name: str, case: Case, out) -> None:
    """AssertionError unless ``out`` (what COMPARISONS[name](case)() returned) matches the reference."""
    rtol, atol = TOLERANCES[case.dtype]
    want_B, want_A, want_eta = expected(name, case)
    for got, want, what in zip(out[:2], (want_B, want_A), ("B", "A")):
        assert got.dtype == np.dtype(case.dtype), f"{name}: {what} has dtype {got.dtype}"
        scale = float(np.max(np.abs(want))) or 1.0
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale,
                                   err_msg=f"{name}: {what} differs from the reference")
    assert math.isclose(out[2], want_eta, rel_tol=rtol), f"{name}: eta {out[2]} != {want_eta}"


# -- machine and timing ----------------------------------------------------------------------

def machine() -> dict:
    """What the timings depend on: CPU model, cores, threads, library versions."""
    import numba

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
        blas = f"{blas['name']} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001  (older NumPy: not worth failing a benchmark for)
        blas = "unknown BLAS"
    return {
        "cpu": cpu or platform.processor() or platform.machine(),
        "cores": usable,
        "numba_threads": numba.get_num_threads(),
        "numpy": f"{np.__version__} ({blas})",
        "numba": numba.__version__,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.machine()}",
    }


def machine_line(info: dict | None = None) -> str:
    info = info or machine()
    return (f"{info['cpu']}, {info['cores']} cores, numba {info['numba']} with "
            f"{info['numba_threads']} threads, numpy {info['numpy']}, Python {info['python']}, "
            f"{info['system']}")


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def measure(runs: dict[str, Callable[[], object]], repeat: int = 5) -> dict[str, dict]:
    """Time each callable: one warm-up call (Numba compiles there), then ``repeat`` rounds.

    The rounds interleave the implementations (a, b, a, b, ...) so that a noisy machine
    slows them alike. Returns name -> {"best": s, "median": s, "times": [s, ...]}.
    """
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(max(int(repeat), 1)):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: {"best": min(ts), "median": statistics.median(ts), "times": ts}
            for name, ts in times.items()}


def table(sizes=((4096, 4096),), ranks=(4, 16, 64), dtypes=("float32", "float64"),
          impls=("lorakern-cpu", "numpy"), peer="numpy", repeat=5) -> str:
    """Time ``impls`` side by side and return a markdown table of medians and ratios.

    Parameters
    ----------
    sizes : (m, n) pairs (an int m means m = n).
    ranks, dtypes : the ranks r and dtypes ("float32", "float64") to time.
    impls : names from COMPARISONS; ``peer`` is timed too if not among them.
    peer : the implementation the others are compared with: each other implementation
        gets a column "peer / impl", the peer's median over its median (> 1: faster).
    repeat : timed rounds after one warm-up call; the table shows the median (ms).

    Implementations in MAX_ELEMENTS are left out (shown as "-") above their size.
    """
    impls = list(dict.fromkeys(impls))
    for name in impls + [peer]:
        if name not in COMPARISONS:
            raise ValueError(f"unknown implementation {name!r}; known: {sorted(COMPARISONS)}")
    timed = impls if peer in impls else impls + [peer]
    others = [name for name in timed if name != peer]
    header = (["m", "n", "r", "dtype"] + [f"{name} (ms)" for name in timed]
              + [f"{peer} / {name}" for name in others])
    rows, skipped = [], set()
    for size in sizes:
        m, n = (size, size) if isinstance(size, (int, np.integer)) else size
        for r in ranks:
            for dtype in dtypes:
                case = Case(int(m), int(n), int(r), str(np.dtype(dtype)))
                runs = {}
                for name in timed:
                    if too_large(name, case):
                        skipped.add(name)
                    else:
                        runs[name] = COMPARISONS[name](case)
                stats = measure(runs, repeat)
                med = {name: s["median"] for name, s in stats.items()}
                cells = [str(m), str(n), str(r), case.dtype]
                cells += [f"{med[name] * 1e3:.1f}" if name in med else "-" for name in timed]
                cells += [f"{med[peer] / med[name]:.2f}x" if peer in med and name in med else "-"
                          for name in others]
                rows.append(cells)
                del case, runs
    lines = [
        f"Machine: {machine_line()}. Date: {now()}.",
        f"Median of {repeat} interleaved rounds after one warm-up call (time.perf_counter); "
        f"'{peer} / x' is {peer}'s median over x's (> 1: x is faster).",
    ]
    if skipped:
        lines.append("'-': " + ", ".join(sorted(skipped)) + " not timed above "
                     + ", ".join(f"{MAX_ELEMENTS[s]:,} elements" for s in sorted(skipped)) + ".")
    lines.append("")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i == 3 else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"
