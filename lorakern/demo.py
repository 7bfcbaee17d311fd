"""``lorakern demo``: fit a built-in problem, print the run, check it against the paper.

A built-in problem is a function in ``PROBLEMS`` that takes the parsed options and returns a
``Demo``: the Problem, the starting adapters, a reference level of the loss and the lines
that describe it. ``run`` fits it with the chosen step size (progress bar), prints a table of
t, J, eta, ||grad J||^2 and ||V||^2 at about TABLE_ROWS steps and ``theory.verdict``'s lines,
and with ``--plot`` hands over to ``lorakern.plot`` for the comparison of step sizes. To add a
built-in problem: write its builder, add it to PROBLEMS (``--problem`` offers every key).
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np

#: the planted shift S has entries of this RMS, the same size as W0's (N(0, 1)) entries, so that
#: for the logistic loss sign(W0 + S) differs from sign(W0) in a good share of the entries.
#: (Under the theorem's eta the squared loss falls to ~10% in 300 steps at any scale from
#: 0.02 up: eta shrinks like 1/||G|| while the gradient grows like ||G||.)
SHIFT_RMS = 1.0
#: standard deviation of the noise added to Y, relative to SHIFT_RMS ("small")
NOISE = 0.05
#: rows of the printed history table (log-spaced in t, the first and last included)
TABLE_ROWS = 10


@dataclass
class Demo:
    """A built-in problem: the Problem, the starting adapters, and what to say about it."""

    problem: object
    B: np.ndarray
    A: np.ndarray
    planted_loss: float | None   # a reference level of J (here: J at the planted shift), or None
    description: list            # lines printed before the fit
    twin: object = None          # a tiny problem that compiles the same kernels (see warm_up)
    planted_label: str = "J at the planted shift BA = S"
    #: the least J over adapters of this rank where it is known (the squared loss without a
    #: mask: the best rank-r fit of Y - W0, Eckart-Young), else None
    optimum: float | None = None
    title: str = ""              # the plot's title
    what: str = "a synthetic fine-tuning problem"   # the headline: "LoRA gradient descent on ..."


# -- the built-in problems -----------------------------------------------------------------

def synthetic_problem(m: int = 512, n: int = 384, rank: int = 8, *, dtype="float32", seed: int = 0,
                      loss: str = "squared", delta: float = 1.0, observed: float | None = None) -> Demo:
    """A seeded fine-tuning problem that LoRA of rank ``rank`` can fit.

    W0 has N(0, 1) entries; S = U diag(s) V^T has rank min(rank, m, n), orthonormal U and V and
    singular values s falling linearly from 1 to 1/2 (relative), scaled so that S's entries have
    RMS ``SHIFT_RMS``. Y = W0 + S + noise (N(0, (NOISE SHIFT_RMS)^2)) for the residual losses,
    Y = sign(W0 + S) in {-1, +1} for "logistic". ``observed`` (a fraction in (0, 1]) masks a
    random share of the entries. B = 0, A ~ N(0, 1/n): LoRA's start, so BA = 0.
    """
    from .adapters import init_adapters
    from .problems import Problem

    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    # the draws come in a fixed order, so every loss and mask sees the same W0, S and noise
    W0 = rng.standard_normal((m, n))
    k = min(rank, m, n)
    U = np.linalg.qr(rng.standard_normal((m, k)))[0]
    V = np.linalg.qr(rng.standard_normal((n, k)))[0]
    s = np.linspace(1.0, 0.5, k)
    s *= SHIFT_RMS * math.sqrt(m * n) / np.linalg.norm(s)
    S = (U * s) @ V.T
    noise = NOISE * SHIFT_RMS * rng.standard_normal((m, n))
    if loss == "logistic":
        Y = np.where(W0 + S >= 0, 1.0, -1.0)
    else:
        Y = W0 + S + noise
    mask = None if observed is None else rng.random((m, n)) < observed
    problem = Problem(W0.astype(dtype), Y.astype(dtype), loss=loss, mask=mask,
                      delta=delta if loss == "huber" else None)
    B, A = init_adapters(m, n, rank, dtype=dtype, seed=seed + 1, init="lora")
    # J at the planted shift, through the reference (NumPy, no compile)
    root = np.sqrt(s)
    planted = _reference_loss(problem, (U * root).astype(dtype), (root[:, None] * V.T).astype(dtype))
    optimum = rank_optimum(problem, rank)

    target = ("Y = sign(W0 + S) in {-1, +1}" if loss == "logistic" else
              f"Y = W0 + S + noise, noise ~ N(0, {NOISE * SHIFT_RMS:g}^2)")
    where = ("all entries" if mask is None else
             f"{int(mask.sum()):,} observed entries ({observed:.0%}, random mask)")
    lossname = f"huber loss (delta = {delta:g})" if loss == "huber" else f"{loss} loss"
    description = [
        f"problem   W0 {m}x{n} {dtype}, entries N(0, 1); S of rank {k} (singular values "
        f"{s[0]:.4g} .. {s[-1]:.4g}, entry RMS {SHIFT_RMS:g}); {target}",
        f"          {lossname} on {where}; seed {seed}",
        f"adapters  rank {rank}: B = 0 ({m}x{rank}), A ~ N(0, 1/{n}) ({rank}x{n}), the LoRA start",
        f"          J at the planted shift BA = S: {planted:.6g}"
        + (" (not the minimum: larger margins lower it)" if loss == "logistic" else ""),
    ]
    if optimum is not None and rank >= min(m, n):
        description.append(f"          the optimum at rank {rank}: J* = 0 (rank {rank} >= min(m, n) = "
                           f"{min(m, n)}: BA can equal Y - W0 exactly, noise and all)")
    elif optimum is not None:
        description.append(f"          the optimum at rank {rank}: J* = {optimum:.6g} (the best rank-{rank} "
                           f"fit of Y - W0 by SVD; the noise keeps it above 0)")
    title = (f"{m}x{n} {dtype}, {loss} loss"
             + ("" if observed is None else f", {observed:.0%} observed") + f", rank {rank}")
    return Demo(problem, B, A, planted, description, twin=_tiny_twin(problem), title=title,
                optimum=optimum)


def rank_optimum(problem, rank: int) -> float | None:
    """min J over B (m x rank), A (rank x n) for the squared loss without a mask: J* =
    1/2 sum_{i > rank} sigma_i(R)^2, R = W0 - Y (the best rank-``rank`` approximation of -R,
    Eckart-Young); None for another loss or a mask (no closed form)."""
    if problem.loss.name != "squared" or problem.mask is not None:
        return None
    sigma = np.linalg.svd(np.asarray(problem.R, dtype=np.float64), compute_uv=False)
    return 0.5 * float(np.sum(sigma[rank:] ** 2))


def _synthetic(args) -> Demo:
    return synthetic_problem(args.m, args.n, args.rank, dtype=args.dtype, seed=args.seed,
                             loss=args.loss, delta=args.delta, observed=args.observed)


#: --problem NAME -> builder(parsed options) -> Demo
PROBLEMS: dict[str, Callable[..., Demo]] = {
    "synthetic": _synthetic,
}


def _reference_loss(problem, B, A) -> float:
    from . import reference

    return float(reference.loss_pass(problem, None, B, A))


def _tiny_twin(problem):
    """An 8x8 matrix problem with the same loss, dtype and masking: compiles the same kernels."""
    from .problems import Problem

    shape = (min(problem.shape[0], 8), min(problem.shape[1], 8))
    W0, Y = np.zeros(shape, problem.dtype), np.ones(shape, problem.dtype)
    mask = None if problem.mask is None else np.ones(shape, bool)
    return Problem(W0, Y, loss=problem.loss.name, mask=mask,
                   delta=problem.delta if problem.loss.uses_delta else None)


def warm_up(twin, rank: int, device: str, step_size) -> float:
    """Compile the kernels a fit will use: a 1-step fit on ``twin`` (a tiny problem of the same
    kind, loss, dtype and masking) runs the fused pass, the loss-only pass that gives J(V_T)
    and a line search's trials. Returns the seconds."""
    from .adapters import init_adapters
    from .descent import fit

    import warnings

    from ._validate import InputWarning
    from .adapters import RANK_CEILING

    m, n = twin.adapter_shape()
    rank = min(rank, RANK_CEILING * min(m, n))  # the most the tiny twin accepts
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # the twin is ours: its rank > 8 is no news to the user
        warnings.simplefilter("ignore", InputWarning)
        B, A = init_adapters(m, n, rank, dtype=twin.dtype, seed=0, init="gaussian")
        fit(twin, B, A, steps=1, device=device, step_size=step_size)
    return time.perf_counter() - t0


@contextmanager
def numba_compiles():
    """Record what Numba compiles inside the block: a list of the dispatchers it compiled,
    filled when the block ends. Numba announces a "numba:compile" event only when it
    compiles: a kernel loaded from its on-disk cache (or already in memory) announces none,
    so an empty list means the kernels were loaded, not compiled."""
    found: list = []
    try:
        from numba.core import event
    except ImportError:  # no Numba: nothing it could compile
        yield found
        return
    with event.install_recorder("numba:compile") as recorder:
        yield found
    found.extend(e.data["dispatcher"] for _, e in recorder.buffer if e.is_start)


def _kept_note(device: str) -> str:
    """Where the compiled CPU kernels are kept, if on disk (the next run then loads them)."""
    if device != "cpu":
        return ""
    from ._cpu.kernels import cache_dir

    return " (kept on disk: the next run loads them)" if cache_dir() is not None else ""


# -- what is printed -------------------------------------------------------------------------

#: a relative gap to J* below this is rounding, not distance: J(V_T) is summed in the data's
#: dtype, J* in float64, so a float32 run at the optimum can land a few ulps below it
AT_OPTIMUM = 1e-5


def gap_words(loss: float, optimum: float) -> str:
    """How far J is above the optimum J*: "0.37 % above it (within 1 %)", "43.9x it", "at it
    (to rounding)", or for J* = 0 the value itself."""
    if optimum <= 0:
        return f"J(V_T) is {loss:.4g} above it"
    gap = (loss - optimum) / optimum
    if abs(gap) <= AT_OPTIMUM:
        return f"J(V_T) is at it to rounding, |J(V_T) - J*| / J* = {abs(gap):.1e} (within 1 %)"
    if loss <= 2 * optimum:
        return f"J(V_T) is {100 * gap:.3g} % above it" + (" (within 1 %)" if gap <= 0.01 else "")
    return f"J(V_T) is {loss / optimum:.3g}x it"


def compare_with(policy):
    """The policy the demo runs beside the chosen one: the theorem's eta_t beside a certified
    line search, the certified search beside the theorem's step; None beside anything else."""
    from .step_size import THEOREM, Certified, Theorem

    if isinstance(policy, Certified):
        return THEOREM
    if isinstance(policy, Theorem):
        return Certified()
    return None


def describe_policy(policy, problem, device=None) -> str:
    """One line on the step size, from what the policy declares.

    A policy may describe itself (``policy.describe(problem) -> str``, or with a ``device``
    parameter ``describe(problem, device=...)``: what it runs there); the built-in ones are
    recognised by their parameters; any other by its name and its declared guarantee.
    """
    import inspect

    from .theory import policy_name

    own = getattr(policy, "describe", None)
    if callable(own):
        takes_device = device is not None and "device" in inspect.signature(own).parameters
        return f"step size {own(problem, device=device) if takes_device else own(problem)}"
    decrease = getattr(policy, "decrease", None)
    if getattr(policy, "constant", None) is not None and decrease is not None:
        return (f"step size eta_t = min{{1 / ({policy.constant:.4g} max(L, 1) (||V_t||^2 + ||G_t||_F)), 1}}"
                f" (the theorem's, eq. 8), L = {problem.lipschitz:g}")
    if decrease is None and getattr(policy, "eta", None) is not None:
        return f"step size constant eta = {policy.eta:g} (no descent guarantee)"
    if all(hasattr(policy, a) for a in ("cap", "c")):
        return (f"step size {policy_name(policy)}: first trial min({policy.cap:g}, 2 eta_(t-1)), halved until "
                f"J drops by c eta ||grad J||^2, c = {policy.c:g}")
    guarantee = ("no descent guarantee" if decrease is None else
                 f"declares J(V_t+1) <= J(V_t) - {decrease:g} eta_t ||grad J||^2")
    loop = "a host loop" if getattr(policy, "host_loop", True) else "a device loop"
    return f"step size {policy_name(policy)} ({type(policy).__name__}: {guarantee}; runs {loop})"


def counts_trials(result) -> bool:
    """Whether the run's policy spends loss-only passes (a line search)."""
    return bool(getattr(result.step_size, "host_loop", False)) or bool(np.any(result.history.trials))


def history_table(result) -> str:
    """About TABLE_ROWS rows at log-spaced t (first and last included), then J(V_T)."""
    h, T = result.history, len(result.history)
    trials = counts_trials(result)
    # eta_t is eq. (8)'s step: only the theorem's policy (with its ``constant``) takes it
    eta = "eta_t" if getattr(result.step_size, "constant", None) is not None else "eta"
    head = f"{'t':>6}  {'J(V_t)':>12}  {eta:>10}  {'||grad J||^2':>12}  {'||V_t||^2':>10}"
    lines = [head + (f"  {'trials':>6}" if trials else ""), "-" * (len(head) + (8 if trials else 0))]
    rows = np.unique(np.round(np.geomspace(1, T, min(TABLE_ROWS, T))).astype(int)) - 1 if T else []
    for t in rows:
        line = (f"{t:>6}  {h.loss[t]:>12.6g}  {h.eta[t]:>10.4g}  {h.grad_sq[t]:>12.4g}  "
                f"{h.v_sq[t]:>10.4g}")
        lines.append(line + (f"  {h.trials[t]:>6}" if trials else ""))
    lines.append(f"{result.steps:>6}  {result.final_loss:>12.6g}  (final)")
    return "\n".join(lines)


def device_line(name: str) -> str:
    if name == "cpu":
        import numba

        return f"device    cpu (Numba, {numba.get_num_threads()} threads)"
    if name == "reference":
        return "device    reference (NumPy, float64 inside)"
    return f"device    {name}"


def run(args, device: str, out=print) -> int:
    """The demo, with the parsed options ``args`` on ``device`` (a resolved name); the exit
    code: 1 if an inequality that the run's step size guarantees failed, else 0."""
    from .descent import fit
    from .step_size import as_policy
    from .theory import check, policy_name, verdict

    demo = PROBLEMS[getattr(args, "problem", "synthetic")](args)
    problem = demo.problem
    if demo.twin is None:
        demo.twin = _tiny_twin(problem)
    policy = as_policy(args.step_size)
    rank = demo.B.shape[1]
    out(f"lorakern demo: LoRA gradient descent on {demo.what}")
    for line in demo.description + [describe_policy(policy, problem, device), device_line(device)]:
        out(line)
    compile_s, compiled = 0.0, []
    if device != "reference":
        out(f"          loading the {device} kernels ...", end=" ", flush=True)
        with numba_compiles() as compiled:
            compile_s = warm_up(demo.twin, rank, device, policy)
        out(f"compiled in {compile_s:.1f} s" + _kept_note(device) if compiled else
            f"loaded from the cache in {compile_s:.1f} s" if device == "cpu" else
            f"{compile_s:.1f} s")
    out(f"fit       {args.steps} steps", flush=True)
    result = fit(problem, demo.B, demo.A, steps=args.steps, device=device, step_size=policy,
                 progress=True)
    h = result.history
    out(history_table(result))
    j0 = h.loss[0] if len(h) else result.final_loss
    share = f" ({result.final_loss / j0:.3g} of J(V_0))" if j0 > 0 else ""
    planted = "" if demo.planted_loss is None else f"; {demo.planted_label}: {demo.planted_loss:.6g}"
    out(f"final     J(V_{result.steps}) = {result.final_loss:.6g}{share}{planted}")
    if demo.optimum is not None:
        out(f"optimum   J* = {demo.optimum:.6g} at rank {rank}: {gap_words(result.final_loss, demo.optimum)}")
    per_step = result.seconds / max(result.steps, 1) * 1e3
    trials = (f", {int(h.trials.sum())} line-search passes" if counts_trials(result) else "")
    out(f"time      fit {result.seconds:.2f} s ({result.steps} steps, {per_step:.2f} ms/step{trials})"
        + (f" + {compile_s:.1f} s one-time compile" if compiled else
           f" + {compile_s:.1f} s loading the kernels" if compile_s else ""))
    lines, ok = verdict(result)
    for line in lines:
        out(line)
    other = compare_with(policy)
    if other is not None and args.plot is None:
        if device != "reference":
            warm_up(demo.twin, rank, device, other)
        beside = fit(problem, demo.B, demo.A, steps=args.steps, device=device, step_size=other)
        gap = ("" if demo.optimum is None else
               f", {gap_words(beside.final_loss, demo.optimum)}")
        out(f"beside    the {policy_name(other)} step from the same start: J(V_{beside.steps}) = "
            f"{beside.final_loss:.6g}{gap}, {beside.seconds:.2f} s")
    if args.plot is not None:
        from . import plot

        runs, compile_more = plot.comparison_runs(demo, args.steps, device, result,
                                                  constant=args.constant, warm_up=warm_up)
        constant = runs["constant"].step_size.eta
        note = plot.constant_note(constant, "--constant" if args.constant is not None else
                                  "--step-size" if isinstance(args.step_size, float) else None)
        path = plot.save_comparison_plot(runs, args.plot, title=f"{demo.title}, {device}",
                                         constant_note=note, planted=demo.planted_loss,
                                         planted_label=demo.planted_label)
        names = [f"{k} (eta = {constant:.4g})" if k == "constant" else k for k in runs]
        out(f"plot      {path}: " + ", ".join(names[:-1]) + f" and {names[-1]} steps"
            + (f" (+ {compile_more:.1f} s compile)" if compile_more >= 0.05 else ""))
    guaranteed = getattr(policy, "decrease", None) is not None
    if result.status == "diverged":
        # one line on stderr for whoever reads the exit code, the verdict line on stdout
        reason = (f"the fit diverged: the loss stopped being finite after step {result.steps} "
                  f"of {args.steps} ({policy_name(policy)} step"
                  + (f" eta = {policy.eta:g}: try a smaller one, or --step-size certified)"
                     if not guaranteed and getattr(policy, "eta", None) is not None else ")"))
        out("verdict   " + ("a guaranteed inequality FAILED: " if guaranteed else "") + reason)
        print(f"lorakern demo: {reason}", file=sys.stderr)
        return 1
    if ok and not guaranteed:
        # the same words as theory.check(result).summary(): no guarantee, checked for reference
        held = check(result).all_hold
        out(f"verdict   no guarantee for the {policy_name(policy)} step; checked for reference, "
            + ("every inequality held" if held else "not every inequality held"))
        return 0
    out("verdict   " + ("every guaranteed inequality held" if ok else "a guaranteed inequality FAILED"))
    return 0 if ok else 1
