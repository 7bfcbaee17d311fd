"""The implementations that benchmarks/, their checks and ``lorakern bench`` run; how they are
timed side by side; and the one markdown writer of the results (CPU and GPU).

``COMPARISONS`` maps a name to an ``Impl``: ``COMPARISONS[name](case)`` does the untimed work
(building the Problem, copying data to a GPU) and returns a zero-argument callable that
performs one full step (gradients, norms, the theorem's eta, the update) and returns
``(B_next, A_next, eta)`` on the implementation's device. ``check(name, case, out)`` compares
that with the reference step; every benchmark, its smoke check and ``table`` use this table.

    >>> from lorakern.benchmarking import COMPARISONS, Case, table
    >>> run = COMPARISONS["lorakern-cpu"](Case(1024, 1024, 16, "float32"))
    >>> B1, A1, eta = run()
    >>> print(table(sizes=((1024, 1024),), ranks=(16,)))

Timing (``interleaved``): one untimed warm-up call each, then rounds in which every
implementation runs once, always in the same order, so each runs right after the others as
it would in a program that mixes them (issue 11); at least MIN_ROUNDS rounds, more where a
round is cheap. Ratios are taken per round and reported as the median with the quartiles.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import numpy as np

from .step_size import THEOREM
from .testing import Case, LinearCase, assert_close, host

__all__ = ["COMPARISONS", "Case", "Impl", "check", "unavailable", "Stats", "interleaved",
           "Row", "ratio_table", "table", "interleaved_records", "records_markdown",
           "machine", "machine_line", "now"]

# -- the implementations -------------------------------------------------------------------


@dataclass(frozen=True)
class Impl:
    """One implementation: ``setup(case) -> step`` and what it solves and needs.

    kind : the problem kind it steps: "matrix" (its case a ``Case``) or "linear" (a
        ``LinearCase``: the squared-loss LinearProblem with its certified L).
    norm : the Theorem policy's ||G|| it uses ("exact", or "bound" for the linear kind).
    loss, masked : the problem it solves (for ``check`` against the reference).
    needs : None (runs on the CPU), "cuda" (lorakern's CUDA device) or "torch" (PyTorch: on
        the GPU where there is one, else on the CPU).
    max_elements : the largest m * n it is timed at (a slow reference), inf for no limit.
    tolerance : the name in lorakern.testing.FACTORS that ``check`` compares it with. The
        plain NumPy step needs no more than the kernels: its worst error against the
        reference at 37..1024 x 40..1027, r 4..64 was 0.13x RTOL (fp32), 0.0006x (fp64).
    """

    setup: Callable[[Case], Callable[[], tuple]]
    kind: str = "matrix"
    norm: str = "exact"
    loss: str = "squared"
    masked: bool = False
    needs: str | None = None
    max_elements: float = math.inf
    tolerance: str = "kernel"

    def __call__(self, case: Case) -> Callable[[], tuple]:
        return self.setup(case)


def _lorakern_host(device: str, loss: str, masked: bool):
    """lorakern.step on a host device ("cpu" or "reference")."""

    def setup(case: Case):
        from . import descent

        problem, B, A = case.problem(loss, masked), case.B, case.A

        def run():
            result = descent.step(problem, B, A, device=device, step_size="theorem")
            return result.B, result.A, result.eta

        return run

    return setup


def _lorakern_cuda(case: Case):
    """The CUDA kernels' fused_step: pass, eta and update on the device, nothing on the host."""
    from ._dispatch import bind

    engine = bind(case.problem(), "cuda")
    B, A = engine.asarray(case.B), engine.asarray(case.A)
    fused_step, problem, data = engine.kernels.fused_step, engine.problem, engine.data

    def run():
        s = fused_step(problem, data, B, A)
        return s.B, s.A, s.eta

    return run


def _lorakern_cuda_loop(case: Case):
    """The body of fit's loop on the GPU: fused pass, the Theorem policy on 0-d device arrays,
    the update."""
    from ._dispatch import bind

    engine = bind(case.problem(), "cuda")
    B, A = engine.asarray(case.B), engine.asarray(case.A)

    def run():
        p = engine.fused_pass(B, A)
        eta, _ = THEOREM.choose(engine, B, A, p, {})
        B1, A1 = engine.update(B, A, p.grad_B, p.grad_A, eta)
        return B1, A1, eta

    return run


# The plain step a user writes, once, over an array library: how each library computes a
# squared norm, where its scalars live, and how eta meets the arrays' dtype.
def _numpy_library(case: Case):
    return SimpleNamespace(
        arrays=(case.R, case.B, case.A),
        # host floats, as a NumPy user reports them; eta stays a Python float (weakly typed),
        # so B - eta * grad_B keeps the data's dtype
        norm_sq=lambda x: float(np.linalg.norm(x)) ** 2,
        xp=SimpleNamespace(sqrt=math.sqrt, maximum=max),
        cast=lambda eta, like: eta)


def _cupy_library(case: Case):
    import cupy

    gpu = case.on("cupy")
    return SimpleNamespace(
        arrays=(gpu.R, gpu.B, gpu.A),
        norm_sq=lambda x: cupy.linalg.norm(x) ** 2,   # 0-d device arrays: no host round trip
        xp=cupy,
        cast=lambda eta, like: eta.astype(like.dtype))


def _torch_on_gpu() -> bool:
    """Whether "torch" runs on the GPU here: PyTorch sees CUDA and lorakern has a CUDA device."""
    import torch

    from ._dispatch import devices

    return torch.cuda.is_available() and "cuda" in devices()


def _torch_library(case: Case, cpu: bool = False):
    """The plain step in PyTorch: on the GPU where there is one (``case.on``), else (or with
    ``cpu``) on the CPU, over the case's NumPy arrays without a copy (``torch.from_numpy``)
    and on PyTorch's own CPU threads, as a CPU user's PyTorch step runs."""
    import torch

    if cpu or not _torch_on_gpu():
        arrays = SimpleNamespace(**{k: torch.from_numpy(getattr(case, k)) for k in ("R", "B", "A")})
    else:
        arrays = case.on("torch")
    return SimpleNamespace(
        arrays=(arrays.R, arrays.B, arrays.A),
        norm_sq=lambda x: torch.linalg.vector_norm(x) ** 2,
        xp=SimpleNamespace(sqrt=torch.sqrt, maximum=lambda x, low: torch.clamp(x, min=low)),
        cast=lambda eta, like: eta)


def _plain(library: Callable[[Case], SimpleNamespace]):
    """G = R + B@A; G@A.T; B.T@G; the four norms; the theorem's eta (step_size.Theorem.eta,
    the one place it is written); the update. All in the data's dtype."""

    def setup(case: Case):
        lib = library(case)
        R, B, A = lib.arrays
        norm_sq, xp, cast = lib.norm_sq, lib.xp, lib.cast
        lipschitz = case.problem().eta_lipschitz

        def run():
            G = R + B @ A
            grad_B = G @ A.T
            grad_A = B.T @ G
            g_sq = norm_sq(G)
            loss = 0.5 * g_sq  # noqa: F841  (a user would report it; it costs nothing)
            grad_sq = norm_sq(grad_B) + norm_sq(grad_A)  # noqa: F841
            v_sq = norm_sq(A) + norm_sq(B)
            eta = cast(THEOREM.eta(v_sq, g_sq, lipschitz, xp), B)
            return B - eta * grad_B, A - eta * grad_A, eta

        return run

    return setup


def _plain_linear(case: LinearCase):
    """The linear layer's plain step: every m x n and N x m matrix formed, in the data's dtype:
    Z = X (W0 + BA)^T, Delta = Z - Y, G = Delta^T X / N, G A^T, B^T G, ||G||_F, eta
    (Theorem.eta on Python floats), the update."""
    X, Y, W0, B, A, N = case.X, case.Y, case.W0, case.B, case.A, case.N
    L = case.problem.eta_lipschitz  # max(L, 1), computed once, as a user would
    norm = np.linalg.norm
    host_math = SimpleNamespace(sqrt=math.sqrt, maximum=max)  # eta stays a Python float

    def run():
        Delta = X @ (W0 + B @ A).T - Y
        G = Delta.T @ X / N
        grad_B, grad_A = G @ A.T, B.T @ G
        g_sq = float(norm(G)) ** 2
        loss = 0.5 * float(np.vdot(Delta, Delta)) / N  # noqa: F841  (a user reports it)
        grad_sq = float(norm(grad_B)) ** 2 + float(norm(grad_A)) ** 2  # noqa: F841
        v_sq = float(norm(A)) ** 2 + float(norm(B)) ** 2
        eta = THEOREM.eta(v_sq, g_sq, L, host_math)
        return B - eta * grad_B, A - eta * grad_A, eta

    return run


def _lorakern_linear(norm: str):
    """lorakern.step of the linear kind on the CPU, the theorem's eta with ``norm``."""

    def setup(case: LinearCase):
        from . import descent
        from .step_size import Theorem

        problem, B, A, policy = case.problem, case.B, case.A, Theorem(norm=norm)

        def run():
            result = descent.step(problem, B, A, device="cpu", step_size=policy)
            return result.B, result.A, result.eta

        return run

    return setup


COMPARISONS: dict[str, Impl] = {
    "lorakern-cpu": Impl(_lorakern_host("cpu", "squared", False)),
    "numpy": Impl(_plain(_numpy_library)),
    "reference": Impl(_lorakern_host("reference", "squared", False), max_elements=2048 * 2048),
    "lorakern-cpu-masked": Impl(_lorakern_host("cpu", "squared", True), masked=True),
    "lorakern-cpu-huber": Impl(_lorakern_host("cpu", "huber", False), loss="huber"),
    "lorakern-cpu-logistic": Impl(_lorakern_host("cpu", "logistic", False), loss="logistic"),
    "lorakern-cuda": Impl(_lorakern_cuda, needs="cuda"),
    "lorakern-cuda-loop": Impl(_lorakern_cuda_loop, needs="cuda"),
    "cupy": Impl(_plain(_cupy_library), needs="cuda"),
    # PyTorch's plain step: on the GPU where lorakern and PyTorch see one, else on the CPU
    "torch": Impl(_plain(_torch_library), needs="torch"),
    "torch-cpu": Impl(_plain(lambda case: _torch_library(case, cpu=True)), needs="torch"),
    # the linear kind (benchmarks/bench_linear.py): exact ||G||_F and Theorem(norm="bound")
    "linear-numpy": Impl(_plain_linear, kind="linear"),
    "linear-lorakern-cpu": Impl(_lorakern_linear("exact"), kind="linear"),
    "linear-lorakern-cpu-bound": Impl(_lorakern_linear("bound"), kind="linear", norm="bound"),
}


def unavailable(name: str) -> str | None:
    """Why ``name`` cannot run on this machine, or None if it can (ValueError if unknown)."""
    if name not in COMPARISONS:
        raise ValueError(f"unknown implementation {name!r}; known: {sorted(COMPARISONS)}")
    needs = COMPARISONS[name].needs
    if needs is None:
        return None
    if needs == "torch":  # on the GPU where there is one, else on the CPU
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return f'{name} needs PyTorch: pip install ".[torch]" in a clone of lorakern'
        return None
    from ._dispatch import devices

    if "cuda" not in devices():
        return f"{name} needs a CUDA device (lorakern.devices() has no 'cuda')"
    return None


def too_large(name: str, case: Case) -> bool:
    """True if ``name`` is not timed at this size (its ``max_elements``)."""
    return case.elements > COMPARISONS[name].max_elements


def check(name: str, case: Case, out) -> None:
    """AssertionError unless ``out`` (what COMPARISONS[name](case)() returned) matches the
    reference step on the problem ``name`` solves, within its tolerance (lorakern.testing)."""
    from . import reference

    impl = COMPARISONS[name]
    if impl.kind == "linear":
        from .step_size import Theorem

        want = reference.step(case.problem, case.B, case.A, step_size=Theorem(norm=impl.norm))
    else:
        want = reference.step(case.problem(impl.loss, impl.masked), case.B, case.A)
    for got, expected, what in zip(out[:2], (want.B, want.A), ("B", "A")):
        got = host(got)
        assert got.dtype == np.dtype(case.dtype), f"{name}: {what} has dtype {got.dtype}"
        assert_close(got, expected, case.dtype, f"{name}: new {what}", impl.tolerance)
    assert_close(float(host(out[2])), want.eta, case.dtype, f"{name}: eta", impl.tolerance)


# -- machine and timing ----------------------------------------------------------------------

#: rounds of an interleaved comparison: at least MIN_ROUNDS (the median of 9 is what the
#: developers' guide asks for), as many as fit in ROUND_BUDGET_S seconds, at most MAX_ROUNDS
MIN_ROUNDS = 9
MAX_ROUNDS = 101
ROUND_BUDGET_S = 2.0
#: a ratio whose interquartile range exceeds this fraction of its median is flagged as wide
WIDE_SPREAD = 0.2


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


@dataclass(frozen=True)
class Stats:
    """Median, quartiles and range of a sample (seconds, or ratios), and its size."""

    median: float
    q1: float
    q3: float
    lo: float
    hi: float
    rounds: int

    @classmethod
    def of(cls, samples) -> "Stats":
        xs = sorted(float(x) for x in samples)
        if not xs:
            raise ValueError("no samples")
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
        return cls(statistics.median(xs), q1, q3, xs[0], xs[-1], len(xs))

    @classmethod
    def from_pytest(cls, stats: dict) -> "Stats":
        """From pytest-benchmark's JSON ``stats`` (min, max, median, q1, q3, rounds)."""
        return cls(stats["median"], stats.get("q1", stats["median"]), stats.get("q3", stats["median"]),
                   stats.get("min", stats["median"]), stats.get("max", stats["median"]),
                   int(stats.get("rounds", 1)))

    def scaled(self, factor: float) -> "Stats":
        return Stats(self.median * factor, self.q1 * factor, self.q3 * factor, self.lo * factor,
                     self.hi * factor, self.rounds)

    @property
    def spread(self) -> float:
        """(q3 - q1) / median: the interquartile range relative to the median."""
        return (self.q3 - self.q1) / self.median if self.median else math.inf


def interleave_workers(workers: dict, count: int, rounds: int) -> dict:
    """Time ``count`` cases in worker processes taking turns: ``{name: [[seconds per round]
    per case]}``. Each worker reads a case index on its stdin and answers its seconds on
    stdout; the order of the workers alternates from round to round, so that neither always
    runs right after the other (benchmarks/ab_trees.py, benchmarks/linear_threads.py)."""
    names = list(workers)
    times = {name: [[] for _ in range(count)] for name in names}
    for k in range(rounds):
        order = names if k % 2 == 0 else names[::-1]
        for i in range(count):
            for name in order:
                workers[name].stdin.write(f"{i}\n")
                workers[name].stdin.flush()
                times[name][i].append(float(workers[name].stdout.readline()))
    return times


def ratio_of(num: Stats, den: Stats) -> Stats:
    """num / den from two separately measured samples (no pairing): the median over the
    median, and an interval from the quartiles (q1 / q3 .. q3 / q1), wider than the truth."""
    return Stats(num.median / den.median, num.q1 / den.q3, num.q3 / den.q1, num.lo / den.hi,
                 num.hi / den.lo, min(num.rounds, den.rounds))


def interleaved(runs: dict[str, Callable[[], object]], rounds: int | None = None, *,
                min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS,
                budget_s: float = ROUND_BUDGET_S) -> dict[str, list[float]]:
    """Seconds per call of each callable, measured interleaved.

    One untimed warm-up call each (Numba compiles there); then rounds in which each runs once,
    in the order given, so every implementation runs right after the others, as in a program
    that mixes them. ``rounds`` None: ``min_rounds``, then more while the total stays within
    ``budget_s`` (judged by their median round), at most ``max_rounds``. Returns name -> [seconds].
    """
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}

    def one_round() -> float:
        total = 0.0
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            dt = time.perf_counter() - t0
            times[name].append(dt)
            total += dt
        return total

    done = 0
    if rounds is None:
        spent = [one_round() for _ in range(max(int(min_rounds), 1))]
        done = len(spent)
        rounds = max(min(math.floor(budget_s / max(statistics.median(spent), 1e-9)), max_rounds), done)
    for _ in range(max(int(rounds), 1) - done):
        one_round()
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> Stats:
    """num's time over den's, round by round (the rounds of ``interleaved``), as Stats."""
    return Stats.of(a / b for a, b in zip(times[num], times[den]))


# -- the one markdown writer -------------------------------------------------------------------

@dataclass
class Row:
    """One row of a ratio table: its label cells, each implementation's seconds, and (from an
    interleaved run) each implementation's round-by-round ratio against the peer."""

    cells: list
    times: dict            # impl -> Stats (seconds)
    ratios: dict = field(default_factory=dict)   # impl -> Stats of the paired ratio
    info: dict = field(default_factory=dict)     # anything the extra columns read


def ms(seconds: float) -> str:
    """Milliseconds with about three significant digits."""
    x = seconds * 1e3
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _time_cell(t: Stats) -> str:
    return f"{ms(t.median)} ({ms(t.q1)}-{ms(t.q3)})" if t.rounds > 1 else ms(t.median)


def ratio_table(rows: list[Row], *, labels: list[str], impls: list[str], peer: str | None,
                direction: str = "peer/impl", names: dict | None = None,
                extra: dict | None = None) -> list[str]:
    """Markdown lines: label columns, each implementation's median (ms) with its quartiles, the ratio of each
    other implementation against ``peer`` with its quartiles, ``extra`` columns, the rounds.

    direction : "peer/impl" (the peer's time over each one's: > 1 means faster than the peer)
        or "impl/peer" (each one's over the peer's: > 1 means slower).
    names : display names of the implementations (default: their own).
    extra : heading -> function(row) -> cell text.

    A row's ratio comes from ``row.ratios`` (paired round by round) where it has one, else
    from the two samples' quartiles (``ratio_of``). A ratio whose interquartile range exceeds
    WIDE_SPREAD of its median is marked "!", and a line under the table says what that means.
    """
    names = {i: (names or {}).get(i, i) for i in impls}
    others = [i for i in impls if i != peer] if peer in impls else []
    extra = extra or {}

    def heading(i):
        a, b = (names[peer], names[i]) if direction == "peer/impl" else (names[i], names[peer])
        return f"{a} / {b}"

    head = (list(labels) + [f"{names[i]} (ms)" for i in impls] + [heading(i) for i in others]
            + list(extra) + ["rounds"])
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if k < len(labels) else "---:" for k in range(len(head))) + "|"]
    wide = False
    for row in rows:
        cells = [str(c) for c in row.cells]
        cells += [_time_cell(row.times[i]) if i in row.times else "-" for i in impls]
        for i in others:
            if i not in row.times or peer not in row.times:
                cells.append("-")
                continue
            r = row.ratios.get(i)
            if r is None:
                num, den = (peer, i) if direction == "peer/impl" else (i, peer)
                r = ratio_of(row.times[num], row.times[den])
            flag = " !" if r.spread > WIDE_SPREAD else ""
            wide = wide or bool(flag)
            cells.append(f"{r.median:.2f}x ({r.q1:.2f}-{r.q3:.2f}){flag}")
        cells += [fn(row) for fn in extra.values()]
        cells.append("/".join(str(row.times[i].rounds) for i in impls if i in row.times))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Times: the median with the quartiles in parentheses, over the rounds.")
    lines.append("Ratios: the median with the quartiles in parentheses" +
                 (" (of the round-by-round ratios)." if any(r.ratios for r in rows) else
                  " (q1/q3 .. q3/q1 of the two samples)."))
    if wide:
        lines.append(f"Wide spread (!): the ratio's interquartile range is over {WIDE_SPREAD:.0%} "
                     "of it; the machine was busy or the implementations slow each other. "
                     "Rerun, or time more rounds, before quoting it.")
    return lines


# -- the interleaved comparison: lorakern bench and benchmarks/run.py --------------------------

def interleaved_records(sizes=((4096, 4096),), ranks=(4, 16, 64), dtypes=("float32", "float64"),
                        impls=("lorakern-cpu", "numpy"), peer="numpy", repeat=None) -> list[dict]:
    """Time ``impls`` (and ``peer``) interleaved on each (m, n, r, dtype): a list of records
    {"m", "n", "r", "dtype", "times": {impl: [seconds per round]}} (JSON-ready).

    ValueError for an unknown implementation or one this machine cannot run.
    """
    timed = list(dict.fromkeys(list(impls) + [peer]))
    for name in timed:
        why = unavailable(name)  # ValueError if unknown
        if why:
            raise ValueError(why)
        if COMPARISONS[name].kind != "matrix":
            raise ValueError(f"{name} steps the {COMPARISONS[name].kind} kind; this table times "
                             f"the matrix kind (benchmarks/bench_linear.py times the linear one)")
    records = []
    for size in sizes:
        m, n = (size, size) if isinstance(size, (int, np.integer)) else size
        for r in ranks:
            for dtype in dtypes:
                case = Case(int(m), int(n), int(r), str(np.dtype(dtype)))
                runs = {name: COMPARISONS[name](case) for name in timed if not too_large(name, case)}
                times = interleaved(runs, repeat)
                records.append({"m": case.m, "n": case.n, "r": case.r, "dtype": case.dtype,
                                "times": times})
                del case, runs
    return records


def records_markdown(records: list[dict], impls, peer="numpy") -> list[str]:
    """The ratio table of ``interleaved_records`` (markdown lines)."""
    order = list(dict.fromkeys(list(impls) + [peer]))
    rows = []
    for rec in records:
        times = rec["times"]
        rows.append(Row(cells=[rec["m"], rec["n"], rec["r"], rec["dtype"]],
                        times={i: Stats.of(times[i]) for i in order if i in times},
                        ratios={i: paired_ratio(times, peer, i) for i in order
                                if i != peer and i in times and peer in times}))
    return ratio_table(rows, labels=["m", "n", "r", "dtype"], impls=order, peer=peer)


def table(sizes=((4096, 4096),), ranks=(4, 16, 64), dtypes=("float32", "float64"),
          impls=("lorakern-cpu", "numpy"), peer="numpy", repeat=None) -> str:
    """Time ``impls`` interleaved and return a markdown table of medians and ratios.

    Parameters
    ----------
    sizes : (m, n) pairs (an int m means m = n).
    ranks, dtypes : the ranks r and dtypes ("float32", "float64") to time.
    impls : names from COMPARISONS; ``peer`` is timed too if not among them.
    peer : the implementation the others are compared with: each other implementation
        gets a column "peer / impl", the peer's time over its own, round by round (> 1: faster),
        shown as the median with the quartiles.
    repeat : timed rounds after one warm-up call; None: as many as fit in ROUND_BUDGET_S per
        row, at least MIN_ROUNDS, at most MAX_ROUNDS.

    Raises
    ------
    ValueError : an unknown implementation, or one this machine cannot run.
    Implementations with a ``max_elements`` are left out (shown as "-") above it.
    """
    records = interleaved_records(sizes, ranks, dtypes, impls, peer, repeat)
    rounds = (f"as many as fit in ~{ROUND_BUDGET_S:g} s per row, at least {MIN_ROUNDS}, at most "
              f"{MAX_ROUNDS}" if repeat is None else f"{repeat}")
    lines = [
        f"Machine: {machine_line()}. Date: {now()}.",
        f"Interleaved rounds: {rounds}, after one warm-up call (time.perf_counter). Cells: "
        f"median ms (quartiles); '{peer} / x' is {peer}'s time over x's in the same round (> 1: x is faster).",
    ]
    if repeat is not None and repeat < MIN_ROUNDS:
        lines.append(f"Only {repeat} round(s): the spread means little below {MIN_ROUNDS}.")
    torch_rows = [name for name in impls if COMPARISONS[name].needs == "torch"]
    if torch_rows:  # where PyTorch ran: its device is not in the name
        import torch

        where = {name: "cpu" if name == "torch-cpu" or not _torch_on_gpu() else "cuda"
                 for name in torch_rows}
        lines.append("PyTorch " + torch.__version__ + ": " + ", ".join(
            f"{name} on the {'GPU' if dev == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'}"
            for name, dev in where.items()) + ".")
    skipped = sorted({n for rec in records for n in list(impls) + [peer] if n not in rec["times"]})
    if skipped:
        lines.append("'-': " + ", ".join(f"{s} not timed above {COMPARISONS[s].max_elements:,} elements"
                                         for s in skipped) + ".")
    lines.append("")
    lines += records_markdown(records, impls, peer)
    return "\n".join(lines) + "\n"
