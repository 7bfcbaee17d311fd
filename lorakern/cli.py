"""The command line: ``lorakern demo`` and ``lorakern bench`` (also ``python -m lorakern``).

``demo`` plants a low-rank shift in a random "pretrained" matrix, fits it with LoRA gradient
descent, prints the run and checks it against the paper's inequalities (Mu & Klabjan, 2025);
``--plot`` also compares the theorem, constant and Armijo steps on the same problem.
``bench`` prints the ratio table of ``lorakern.benchmarking.table``.
"""
from __future__ import annotations

import argparse
import importlib
import math
import time
from dataclasses import dataclass

import numpy as np

#: the planted shift S has entries of this RMS, the same size as W0's (N(0, 1)) entries, so that
#: for the logistic loss sign(W0 + S) differs from sign(W0) in a good share of the entries.
#: (Under the theorem's eta the squared loss falls to ~10% in 300 steps at any scale from
#: 0.02 up: eta shrinks like 1/||G|| while the gradient grows like ||G||.)
SHIFT_RMS = 1.0
#: standard deviation of the noise added to Y, relative to SHIFT_RMS ("small")
NOISE = 0.05
#: the comparison plot's default constant step, CONSTANT_FACTOR / (max(L, 1) (||V_0||^2 + ||G_0||_F)):
#: 5 sqrt(2) / 2 ~ 3.5 times the theorem's first eta, stable on the demo problems
CONSTANT_FACTOR = 0.5
TABLE_ROWS = 10

PLOT_HINT = 'pip install "lorakern[plot]"'


# -- the synthetic problem -------------------------------------------------------------------

@dataclass
class Demo:
    """A built-in problem: the Problem, the starting adapters, and what to say about it."""

    problem: object
    B: np.ndarray
    A: np.ndarray
    planted_loss: float   # J at the planted shift, BA = S
    description: list


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
    return Demo(problem, B, A, planted, description)


def _reference_loss(problem, B, A) -> float:
    from . import reference

    return float(reference.loss_pass(problem, None, B, A))


def _tiny_twin(problem):
    """An 8x8 problem with the same loss, dtype and masking: compiles the same kernels."""
    from .problems import Problem

    shape = (min(problem.shape[0], 8), min(problem.shape[1], 8))
    W0, Y = np.zeros(shape, problem.dtype), np.ones(shape, problem.dtype)
    mask = None if problem.mask is None else np.ones(shape, bool)
    return Problem(W0, Y, loss=problem.loss.name, mask=mask,
                   delta=problem.delta if problem.loss.uses_delta else None)


def warm_up(problem, rank: int, device: str, step_size) -> float:
    """Compile the kernels a fit will use (a 1-step fit on a tiny twin: the fused pass, the
    loss-only pass that gives J(V_T) and Armijo's trials); returns the seconds."""
    from .adapters import init_adapters
    from .descent import fit

    twin = _tiny_twin(problem)
    B, A = init_adapters(*twin.shape, rank, dtype=problem.dtype, seed=0, init="gaussian")
    t0 = time.perf_counter()
    fit(twin, B, A, steps=1, device=device, step_size=step_size)
    return time.perf_counter() - t0


# -- the demo ----------------------------------------------------------------------------

def _step_size(text: str):
    if text in ("theorem", "armijo"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'theorem', 'armijo' or a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a constant step size must be positive and finite, got {text}")
    return value


def _positive(convert, what: str):
    """An argparse type: ``convert(text)``, positive and finite, else a message naming ``what``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


_positive_int = _positive(int, "a positive integer")
_positive_float = _positive(float, "a positive finite number")


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def _policy_name(policy) -> str:
    from .step_size import Armijo, Constant

    return "armijo" if isinstance(policy, Armijo) else "constant" if isinstance(policy, Constant) else "theorem"


def _describe_policy(policy, problem) -> str:
    kind = _policy_name(policy)
    if kind == "theorem":
        return (f"step size eta_t = min{{1 / ({policy.constant:.4g} max(L, 1) (||V_t||^2 + ||G_t||_F)), 1}}"
                f" (the theorem's, eq. 8), L = {problem.lipschitz:g}")
    if kind == "armijo":
        return (f"step size armijo: first trial min({policy.cap:g}, 2 eta_(t-1)), halved until "
                f"J drops by c eta ||grad J||^2, c = {policy.c:g}")
    return f"step size constant eta = {policy.eta:g} (no descent guarantee)"


def _table(result) -> str:
    """About TABLE_ROWS rows at log-spaced t (first and last included), then J(V_T)."""
    h, T = result.history, len(result.history)
    armijo = _policy_name(result.step_size) == "armijo"
    head = f"{'t':>6}  {'J(V_t)':>12}  {'eta_t':>10}  {'||grad J||^2':>12}  {'||V_t||^2':>10}"
    lines = [head + (f"  {'trials':>6}" if armijo else ""), "-" * (len(head) + (8 if armijo else 0))]
    rows = np.unique(np.round(np.geomspace(1, T, min(TABLE_ROWS, T))).astype(int)) - 1 if T else []
    for t in rows:
        line = (f"{t:>6}  {h.loss[t]:>12.6g}  {h.eta[t]:>10.4g}  {h.grad_sq[t]:>12.4g}  "
                f"{h.v_sq[t]:>10.4g}")
        lines.append(line + (f"  {h.trials[t]:>6}" if armijo else ""))
    lines.append(f"{result.steps:>6}  {result.final_loss:>12.6g}  (final)")
    return "\n".join(lines)


def _monotone(result):
    """(decreased at every step up to rounding, first t where it rose or None)."""
    from .theory import RTOL

    h = result.history
    loss = np.append(h.loss, result.final_loss)
    tol = RTOL[np.dtype(h.dtype)] * float(np.max(np.abs(loss)))
    rose = np.flatnonzero(np.diff(loss) > tol)
    return rose.size == 0, (int(rose[0]) if rose.size else None)


def verdict(result) -> tuple[list, bool]:
    """Lines saying what the theory guarantees for this run and whether it held; ok flag.

    ok is False only if an inequality that the run's step size guarantees failed (or a
    guaranteed-descent run diverged).
    """
    from . import theory

    policy, h = result.step_size, result.history
    kind = _policy_name(policy)
    steps = len(h)
    lines = []
    if kind == "constant":
        mono, first = _monotone(result)
        ref = theory.check(result)
        lines.append("theory    the paper's guarantees are for its eta_t; a constant step has none")
        lines.append("          loss decreased monotonically: " + (
            f"yes, at all {steps} steps (up to {h.dtype} rounding)" if mono
            else f"NO, it first rose at t = {first}"))
        lines.append(f"          for reference, Lemma 2's inequality (c = 1/5) held at "
                     f"{int(ref.lemma2.sum())}/{steps} steps")
        if result.status == "diverged":
            lines.append(f"          the loss stopped being finite after step {result.steps}")
        return lines, True
    if kind == "armijo":
        c = policy.c
        report = theory.check(result, decrease=c)
        lines.append(f"theory    Lemma 2 and Theorem 3 checked with Lemma 2's constant 1/5 replaced by "
                     f"the Armijo c = {c:g}")
        lemma = "J(V_t+1) <= J(V_t) - c eta_t ||grad J(V_t)||^2 (the Armijo condition)"
        bound = "(J(V_0) - 0) / (c sum_t eta_t)"
    else:
        report = theory.check(result, constant=policy.constant)
        lines.append("theory    Mu & Klabjan (2025), checked on every recorded step")
        lemma = "J(V_t+1) <= J(V_t) - eta_t/5 ||grad J(V_t)||^2"
        bound = "5 (J(V_0) - 0) / sum_t eta_t"
    bad = np.flatnonzero(~report.lemma2)
    lines.append(f"Lemma 2   {lemma}: " + (
        f"held at all {steps} steps" if bad.size == 0 else
        f"FAILED at {bad.size}/{steps} steps, first t = {bad[0]} "
        f"(short by {-report.lemma2_slack[bad[0]]:.3g})"))
    lines.append(f"Theorem 3 min_t ||grad J(V_t)||^2 <= {bound}: "
                 f"{report.theorem3_lhs:.4g} <= {report.theorem3_bound:.4g}, "
                 + ("held" if report.theorem3 else "FAILED"))
    growth = "held" if report.v_growth else ("FAILED" if kind == "theorem" else "did not hold")
    lines.append("growth    ||V_t||^2 <= ||V_0||^2 + t/(5 sqrt(2) L) + "
                 + ("(2/c) J(V_0)" if kind == "armijo" else "10 J(V_0)")
                 + f" (proof of Theorem 3): {growth}"
                 + (" (not guaranteed for armijo)" if kind == "armijo" else ""))
    lines.append(f"          slack allowed for {h.dtype} rounding: {report.tolerance:.3g} "
                 f"({theory.RTOL[np.dtype(h.dtype)]:g} x max |J|)")
    ok = bool(report.lemma2.all()) and report.theorem3
    if kind == "theorem":
        ok = ok and report.v_growth
    if result.status == "diverged":
        lines.append(f"          the loss stopped being finite after step {result.steps}: "
                     f"a guaranteed-descent step must not do that")
        ok = False
    return lines, ok


def _device_line(name: str) -> str:
    if name == "cpu":
        import numba

        return f"device    cpu (Numba, {numba.get_num_threads()} threads)"
    if name == "reference":
        return "device    reference (NumPy, float64 inside)"
    return f"device    {name}"


def _cmd_demo(args, parser) -> int:
    from . import _dispatch
    from .descent import fit
    from .step_size import as_policy

    if args.problem == "digits":
        from .digits import run_demo

        return run_demo(args, parser)
    args.steps = 300 if args.steps is None else args.steps
    args.rank = 8 if args.rank is None else args.rank
    if args.plot is not None:
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            parser.error(f"--plot needs matplotlib: {PLOT_HINT}")
    demo = synthetic_problem(args.m, args.n, args.rank, dtype=args.dtype, seed=args.seed,
                             loss=args.loss, delta=args.delta, observed=args.observed)
    problem = demo.problem
    try:
        device = _dispatch.resolve(args.device, *problem.arrays()).name
    except _dispatch.DeviceUnavailableError as exc:
        parser.error(str(exc))
    policy = as_policy(args.step_size)
    print("lorakern demo: LoRA gradient descent on a synthetic fine-tuning problem")
    for line in demo.description + [_describe_policy(policy, problem), _device_line(device)]:
        print(line)
    compile_s = 0.0
    if device != "reference":
        print(f"          compiling the {device} kernels (once per process) ...", end=" ", flush=True)
        compile_s = warm_up(problem, args.rank, device, policy)
        print(f"{compile_s:.1f} s")
    print(f"fit       {args.steps} steps", flush=True)
    result = fit(problem, demo.B, demo.A, steps=args.steps, device=device, step_size=policy,
                 progress=True)
    h = result.history
    print(_table(result))
    j0 = h.loss[0] if len(h) else result.final_loss
    share = f" ({result.final_loss / j0:.3g} of J(V_0))" if j0 > 0 else ""
    print(f"final     J(V_{result.steps}) = {result.final_loss:.6g}{share}; "
          f"J at the planted shift {demo.planted_loss:.6g}")
    per_step = result.seconds / max(result.steps, 1) * 1e3
    trials = f", {int(h.trials.sum())} Armijo loss passes" if _policy_name(policy) == "armijo" else ""
    print(f"time      fit {result.seconds:.2f} s ({result.steps} steps, {per_step:.2f} ms/step{trials})"
          + (f" + {compile_s:.1f} s one-time compile" if compile_s else ""))
    lines, ok = verdict(result)
    for line in lines:
        print(line)
    if args.plot is not None:
        runs, compile_more = _comparison_runs(args, demo, device, result)
        constant = runs["constant"].step_size.eta
        title = (f"{args.m}x{args.n} {args.dtype}, {args.loss} loss"
                 + ("" if args.observed is None else f", {args.observed:.0%} observed")
                 + f", rank {args.rank}, {device}")
        path = save_comparison_plot(runs, args.plot, title=title, constant_note=_constant_note(args, constant),
                                    planted=demo.planted_loss)
        print(f"plot      {path}: theorem, constant (eta = {constant:.4g}) and armijo steps"
              + (f" (+ {compile_more:.1f} s compile)" if compile_more >= 0.05 else ""))
    print("verdict   " + ("every guaranteed inequality held" if ok and _policy_name(policy) != "constant"
                          else "no guarantee to check (constant step)" if ok
                          else "a guaranteed inequality FAILED"))
    return 0 if ok else 1


# -- the comparison plot -----------------------------------------------------------------

def _constant_for(args, result) -> float:
    from .step_size import Constant

    if args.constant is not None:
        return args.constant
    if isinstance(result.step_size, Constant):
        return float(result.step_size.eta)
    h = result.history
    return float(CONSTANT_FACTOR / (h.lipschitz * (h.v_sq[0] + h.g_norm[0])))


def _constant_note(args, constant) -> str:
    if args.constant is not None:
        return f"constant eta = {constant:.4g} (--constant)"
    if isinstance(args.step_size, float):
        return f"constant eta = {constant:.4g} (--step-size)"
    return (f"constant eta = {CONSTANT_FACTOR:g} / (max(L,1) (||V_0||^2 + ||G_0||_F)) = {constant:.4g}, "
            f"{CONSTANT_FACTOR * 5 * math.sqrt(2):.3g}x the theorem's eta_0")


def _comparison_runs(args, demo, device, main_result):
    """The theorem, constant and armijo fits on the demo problem from the same start."""
    from .descent import fit
    from .step_size import Armijo, Constant, Theorem

    constant = _constant_for(args, main_result)
    policies = {"theorem": Theorem(), "constant": Constant(constant), "armijo": Armijo()}
    main_kind = _policy_name(main_result.step_size)
    compile_s = 0.0
    runs = {}
    for kind, policy in policies.items():
        if kind == main_kind and (kind != "constant" or main_result.step_size.eta == constant):
            runs[kind] = main_result
            continue
        if device != "reference":
            compile_s += warm_up(demo.problem, args.rank, device, policy)
        runs[kind] = fit(demo.problem, demo.B, demo.A, steps=args.steps, device=device, step_size=policy)
    return runs, compile_s


def elapsed(runs) -> dict:
    """Cumulative seconds at V_0..V_T for each run, from each fit's measured wall time.

    theorem and constant: one fused pass per step, so the run's time is spread evenly.
    armijo: one fused pass plus ``trials`` loss-only passes per step; the fused pass costs
    what a theorem step cost, the loss-only pass (armijo time - steps x that) / trials.
    """
    out = {}
    theorem = runs["theorem"]
    t_fused = theorem.seconds / max(theorem.steps, 1)
    for kind, result in runs.items():
        T = result.steps
        if kind == "armijo" and T:
            trials = result.history.trials[:T].astype(float)
            t_loss = max(result.seconds - T * t_fused, 0.0) / max(trials.sum(), 1.0)
            cost = t_fused + trials * t_loss
            cum = np.cumsum(cost) * (result.seconds / cost.sum())
        else:
            cum = np.arange(1, T + 1) * (result.seconds / max(T, 1))
        out[kind] = np.concatenate([[0.0], cum])
    return out


def save_comparison_plot(runs, path, *, title: str, constant_note: str, planted: float | None = None) -> str:
    """Two panels, J(V_t) against steps and against seconds, for each run; returns path."""
    from matplotlib.figure import Figure

    seconds = elapsed(runs)
    style = {"theorem": ("C0", "-"), "constant": ("C1", "--"), "armijo": ("C2", "-.")}
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    ax_steps, ax_time = fig.subplots(1, 2)
    for kind, result in runs.items():
        loss = np.append(result.history.loss[:result.steps], result.final_loss)
        if kind == "theorem":
            label = r"theorem: $\eta_t$ of eq. 8"
        elif kind == "constant":
            label = rf"constant: $\eta$ = {result.step_size.eta:.3g}"
        else:
            label = (f"armijo: c = {result.step_size.c:g} "
                     f"({int(result.history.trials.sum())} loss passes)")
        if result.status == "diverged":
            label += f", diverged at t = {result.steps}"
        color, dash = style[kind]
        positive = loss > 0
        ax_steps.plot(np.arange(loss.size)[positive], loss[positive], dash, color=color, label=label)
        ax_time.plot(seconds[kind][positive], loss[positive], dash, color=color, label=label)
    for ax, xlabel in ((ax_steps, "step t"), (ax_time, "seconds (fit wall time, compile excluded)")):
        if planted is not None and planted > 0:
            ax.axhline(planted, color="0.5", lw=0.8, ls=":",
                       label="J at the planted shift BA = S" if ax is ax_steps else None)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(r"loss $J(V_t)$")
        ax.grid(True, which="both", alpha=0.3)
    ax_steps.set_title("against steps")
    ax_time.set_title("against seconds")
    ax_steps.legend(loc="best", fontsize="small")
    fig.suptitle(f"lorakern demo: LoRA gradient descent, {title}")
    fig.text(0.5, -0.01,
             f"{constant_note}.\nSeconds: each fit's measured wall time; theorem and constant spread "
             f"evenly over steps (one fused pass each), armijo spread by its passes\n(one fused pass + "
             f"its trials' loss-only passes, the loss-only pass timed as (armijo - theorem time) / trials).",
             ha="center", va="top", fontsize="small")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return str(path)


# -- bench -------------------------------------------------------------------------------

def _cmd_bench(args, parser) -> int:
    try:
        benchmarking = importlib.import_module("lorakern.benchmarking")
    except ImportError as exc:
        parser.error(f"the benchmark table needs lorakern.benchmarking ({exc})")
    kwargs = dict(sizes=((args.m, args.n if args.n is not None else args.m),), ranks=tuple(args.ranks),
                  dtypes=tuple(args.dtypes), repeat=args.repeat)
    if args.impls is not None:
        kwargs["impls"] = tuple(args.impls)
    if args.peer is not None:
        kwargs["peer"] = args.peer
    try:
        text = benchmarking.table(**kwargs)
    except ValueError as exc:  # an unknown implementation name
        parser.error(str(exc))
    print(text.rstrip("\n"))
    return 0


# -- the parser --------------------------------------------------------------------------

class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what None means)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from ._dispatch import DEVICE_NAMES as DEVICES
    from .losses import LOSSES

    parser = argparse.ArgumentParser(
        prog="lorakern",
        description="Fused kernels for LoRA gradient descent with the provable step size of "
                    "Mu & Klabjan (2025).",
        epilog="examples:\n  lorakern demo\n  lorakern demo --loss logistic --step-size armijo\n"
               "  lorakern demo --observed 0.3 --plot demo.png\n  lorakern bench --m 1024 --ranks 4 16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lorakern {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench}")

    demo = sub.add_parser(
        "demo", help="fit a built-in synthetic problem and check the paper's inequalities",
        description="Plant a rank-r shift S in a random 'pretrained' W0 (Y = W0 + S + small noise, "
                    "or Y = sign(W0 + S) for the logistic loss), start LoRA from B = 0, run "
                    "gradient descent with a progress bar, print t, J, eta, ||grad J||^2, ||V||^2 "
                    "at about 10 steps, and check Lemma 2 at every step and Theorem 3's bound. "
                    "Exit code 1 if an inequality the step size guarantees failed.",
        formatter_class=_Help)
    demo.add_argument("--problem", choices=("synthetic", "digits"), default="synthetic",
                      help="synthetic: the planted matrix problem below; digits: fine-tune a "
                           "classifier on scikit-learn's digits with cross-entropy "
                           "(lorakern.LinearProblem; needs lorakern[digits]); --m, --n, --loss, "
                           "--delta, --observed and --constant are for synthetic only")
    demo.add_argument("--device", choices=DEVICES, default="auto",
                      help="where to run; auto = cpu for this NumPy problem")
    demo.add_argument("--m", type=_positive_int, default=512, help="rows of W0")
    demo.add_argument("--n", type=_positive_int, default=384, help="columns of W0")
    demo.add_argument("--rank", type=_positive_int, default=None,
                      help="LoRA rank r (also the planted rank); default 8, 2 for digits")
    demo.add_argument("--steps", type=_positive_int, default=None,
                      help="gradient steps T; default 300, 2000 for digits")
    demo.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="data type")
    demo.add_argument("--seed", type=int, default=0, help="seed of the problem (adapters use seed + 1)")
    demo.add_argument("--loss", choices=sorted(LOSSES), default="squared",
                      help="entrywise loss; logistic fits labels sign(W0 + S)")
    demo.add_argument("--delta", type=_positive_float, default=1.0, help="Huber threshold")
    demo.add_argument("--observed", "--mask", dest="observed", type=_fraction, default=None,
                      metavar="FRACTION",
                      help="observe only a random FRACTION of the entries (matrix completion); "
                           "default: all")
    demo.add_argument("--step-size", type=_step_size, default="theorem", metavar="{theorem,armijo,ETA}",
                      help="the paper's eta_t, Armijo backtracking, or a constant ETA")
    demo.add_argument("--plot", metavar="FILE.png", default=None,
                      help="also run the theorem, constant and armijo steps and plot their losses "
                           f"against steps and seconds (needs matplotlib: {PLOT_HINT})")
    demo.add_argument("--constant", type=_positive_float, default=None, metavar="ETA",
                      help="the constant step of the --plot comparison; default "
                           f"{CONSTANT_FACTOR:g} / (max(L,1) (||V_0||^2 + ||G_0||_F)), or --step-size's ETA")
    demo.set_defaults(run=_cmd_demo, parser=demo)

    bench = sub.add_parser(
        "bench", help="time the fused step against plain NumPy and print a markdown ratio table",
        description="Time one full step (gradients, norms, eta, update) of each implementation "
                    "side by side and print the markdown table of medians and ratios "
                    "(lorakern.benchmarking.table).",
        formatter_class=_Help)
    bench.add_argument("--m", type=_positive_int, default=4096, help="rows")
    bench.add_argument("--n", type=_positive_int, default=None, help="columns (default: m)")
    bench.add_argument("--ranks", "--rank", dest="ranks", type=_positive_int, nargs="+",
                       default=[4, 16, 64], metavar="R", help="LoRA ranks")
    bench.add_argument("--dtypes", "--dtype", dest="dtypes", choices=("float32", "float64"), nargs="+",
                       default=["float32", "float64"], metavar="DTYPE", help="float32 and/or float64")
    bench.add_argument("--repeat", type=_positive_int, default=5, help="timed rounds after a warm-up")
    bench.add_argument("--impls", nargs="+", default=None, metavar="NAME",
                       help="implementations from lorakern.benchmarking.COMPARISONS "
                            "(default: lorakern-cpu numpy)")
    bench.add_argument("--peer", default=None, metavar="NAME",
                       help="the implementation the ratios are against (default: numpy)")
    bench.set_defaults(run=_cmd_bench, parser=bench)
    return parser


def main(argv=None) -> int:
    """Run the command line with ``argv`` (default sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args, args.parser)
    except SystemExit as exc:  # argparse: --help, --version (0) and usage errors (2)
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
