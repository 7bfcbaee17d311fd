"""The command line: ``lorakern demo``, ``lorakern bench`` and ``lorakern warmup`` (also
``python -m lorakern``).

Argument parsing only: ``demo`` runs ``lorakern.demo.run`` (a built-in problem, fitted and
checked against the paper's inequalities; ``--plot`` draws ``lorakern.plot``'s comparison of
step sizes); ``bench`` prints ``lorakern.benchmarking.table`` (the fused step against plain
NumPy, interleaved, with the spread of each ratio); ``warmup`` compiles the kernels a user
names into the on-disk cache, in parallel (``lorakern.warmup``). Bad options fail here, before any work,
with an argparse error naming the option.
"""
from __future__ import annotations

import argparse
import importlib
import math

from .demo import PROBLEMS
from .plot import CONSTANT_FACTOR, PLOT_HINT


# -- argument types ------------------------------------------------------------------------

def _step_size(text: str):
    if text in ("theorem", "certified", "exact", "armijo"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'certified', 'theorem', 'exact', 'armijo' or a positive number, "
            f"got {text!r}") from None
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


def _seed(text: str) -> int:
    """A seed: a non-negative integer (NumPy's generators take no negative seed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value
_positive_float = _positive(float, "a positive finite number")


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


# -- demo ------------------------------------------------------------------------------

def _cmd_demo(args, parser) -> int:
    from . import _dispatch, demo

    if args.constant is not None and args.problem == "digits":
        parser.error("--constant sets the constant step of the synthetic problem's --plot "
                     "comparison; the digits demo has none (for a constant step in it use "
                     "--step-size ETA)")
    if args.constant is not None and args.plot is None:
        parser.error("--constant sets the constant step of the --plot comparison, so it needs "
                     "--plot FILE.png; for a constant step in the demo itself use --step-size ETA")
    if args.plot is not None:
        from .plot import check_format, check_path

        why = check_path(args.plot)
        if why is not None:
            parser.error(f"--plot: {why}")
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            parser.error(f"--plot needs matplotlib: {PLOT_HINT}")
        why = check_format(args.plot)
        if why is not None:
            parser.error(f"--plot: {why}")
    if args.step_size is None:
        args.step_size = "certified"
    if args.step_size == "exact" and (args.loss != "squared" or args.problem == "digits"):
        parser.error(f"--step-size exact needs the squared loss of the synthetic problem (then "
                     f"J(V - eta grad J) is a quartic in eta); use --step-size certified, which "
                     f"backtracks for {args.loss if args.problem != 'digits' else 'digits'}")
    if args.problem == "digits":  # a LinearProblem on scikit-learn's digits: lorakern/digits.py
        from .digits import run_demo

        return run_demo(args, parser)
    args.steps = 300 if args.steps is None else args.steps
    args.rank = 8 if args.rank is None else args.rank
    from .adapters import FIT_COPIES, check_rank_fits

    try:  # a rank whose adapters cannot be allocated fails here, before any work
        check_rank_fits(args.m, args.n, args.rank, FIT_COPIES * (8 if args.dtype == "float64" else 4),
                        "the adapters, their gradients and iterates")
    except ValueError as exc:
        parser.error(f"--rank: {exc}")
    try:
        # the built-in problems are NumPy arrays: "auto" is the CPU
        device = _dispatch.resolve(args.device).name
    except _dispatch.DeviceUnavailableError as exc:
        parser.error(str(exc))
    return demo.run(args, device)


# -- bench -------------------------------------------------------------------------------

def _cmd_bench(args, parser) -> int:
    try:
        benchmarking = importlib.import_module("lorakern.benchmarking")
    except ImportError as exc:
        parser.error(f"the benchmark table needs lorakern.benchmarking ({exc})")
    kwargs = dict(sizes=((args.m, args.n if args.n is not None else args.m),), ranks=tuple(args.ranks),
                  dtypes=tuple(args.dtypes))
    if args.repeat is not None:
        kwargs["repeat"] = args.repeat
    if args.impls is not None:
        kwargs["impls"] = tuple(args.impls)
    if args.peer is not None:
        kwargs["peer"] = args.peer
    try:
        text = benchmarking.table(**kwargs)
    except ValueError as exc:  # an unknown implementation, or one this machine cannot run
        parser.error(str(exc))
    print(text.rstrip("\n"))
    return 0


# -- warmup ------------------------------------------------------------------------------

def _cmd_warmup(args, parser) -> int:
    from .warmup import DEFAULT_TASKS, tasks_for, warm

    named = (args.kinds, args.losses, args.dtypes) != (None, None, None) or args.mask
    if named:
        tasks = tasks_for(args.kinds or ["matrix"], args.losses or ["squared"],
                          args.dtypes or ["float32"], args.mask)
        if not tasks:
            parser.error("nothing to compile: the matrix kind has no cross_entropy loss "
                         "(add --kind linear)")
    else:
        tasks = DEFAULT_TASKS
    try:
        warm(tasks, jobs=args.jobs)
    except KeyboardInterrupt:  # warm said what was done; no traceback
        return 130
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench,warmup}")

    demo = sub.add_parser(
        "demo", help="fit a built-in synthetic problem and check the paper's inequalities",
        description="Plant a rank-r shift S in a random 'pretrained' W0 (Y = W0 + S + small noise, "
                    "or Y = sign(W0 + S) for the logistic loss), start LoRA from B = 0, run "
                    "gradient descent with a progress bar, print t, J, eta, ||grad J||^2, ||V||^2 "
                    "at about 10 steps, and check Lemma 2 at every step and Theorem 3's bound. "
                    "Exit code 1 if an inequality the step size guarantees failed or the fit "
                    "diverged (the loss stopped being finite), with the reason on stderr; 2 for "
                    "a bad option.",
        formatter_class=_Help)
    demo.add_argument("--problem", choices=sorted(PROBLEMS) + ["digits"], default="synthetic",
                      help="synthetic: the planted matrix problem below; digits: fine-tune a "
                           "classifier on scikit-learn's digits with cross-entropy "
                           "(lorakern.LinearProblem; needs the digits extra); --m, --n, --loss, "
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
    demo.add_argument("--seed", type=_seed, default=0,
                      help="seed of the problem, a non-negative integer (adapters use seed + 1)")
    demo.add_argument("--loss", choices=sorted(LOSSES), default="squared",
                      help="entrywise loss; logistic fits labels sign(W0 + S)")
    demo.add_argument("--delta", type=_positive_float, default=1.0, help="Huber threshold")
    demo.add_argument("--observed", "--mask", dest="observed", type=_fraction, default=None,
                      metavar="FRACTION",
                      help="observe only a random FRACTION of the entries (matrix completion); "
                           "default: all")
    demo.add_argument("--step-size", type=_step_size, default=None,
                      metavar="{certified,theorem,exact,armijo,ETA}",
                      help="certified: the fastest step with the paper's guarantees (a line "
                           "search taking Lemma 2's decrease with eta >= eta_t; the default); "
                           "theorem: the paper's eta_t, to reproduce the paper; exact: the "
                           "certified exact line search (squared loss only); Armijo "
                           "backtracking; or a constant ETA")
    demo.add_argument("--plot", metavar="FILE.png", default=None,
                      help="also run the theorem, constant, armijo and certified steps and plot their losses "
                           f"against steps and seconds (needs matplotlib: {PLOT_HINT})")
    demo.add_argument("--constant", type=_positive_float, default=None, metavar="ETA",
                      help="the constant step of the --plot comparison (needs --plot); default "
                           f"{CONSTANT_FACTOR:g} / (max(L,1) (||V_0||^2 + ||G_0||_F)), or --step-size's ETA")
    demo.set_defaults(run=_cmd_demo, parser=demo)

    bench = sub.add_parser(
        "bench", help="time the fused step against plain NumPy and print a markdown ratio table",
        description="Time one full step (gradients, norms, eta, update) of each implementation, "
                    "interleaved round by round in one process (as a program that mixes them "
                    "runs them), and print the markdown table of median times and of each "
                    "ratio's median with its quartiles; a ratio whose spread is wide is marked "
                    "and explained (lorakern.benchmarking.table).",
        formatter_class=_Help)
    bench.add_argument("--m", type=_positive_int, default=4096, help="rows")
    bench.add_argument("--n", type=_positive_int, default=None, help="columns (default: m)")
    bench.add_argument("--ranks", "--rank", dest="ranks", type=_positive_int, nargs="+",
                       default=[4, 16, 64], metavar="R", help="LoRA ranks")
    bench.add_argument("--dtypes", "--dtype", dest="dtypes", choices=("float32", "float64"), nargs="+",
                       default=["float32", "float64"], metavar="DTYPE", help="float32 and/or float64")
    bench.add_argument("--repeat", type=_positive_int, default=None, metavar="ROUNDS",
                       help="interleaved rounds per row after a warm-up call; default: as many as "
                            "fit in about 2 s, at least 9 and at most 101 (cheap rows get more)")
    bench.add_argument("--impls", nargs="+", default=None, metavar="NAME",
                       help="implementations from lorakern.benchmarking.COMPARISONS "
                            "(default: lorakern-cpu numpy; torch: PyTorch's step, on the GPU "
                            "where there is one, else on the CPU; torch-cpu: on the CPU)")
    bench.add_argument("--peer", default=None, metavar="NAME",
                       help="the implementation the ratios are against (default: numpy)")
    bench.set_defaults(run=_cmd_bench, parser=bench)

    warmup = sub.add_parser(
        "warmup", help="compile the CPU kernels ahead of time into the on-disk cache",
        description="Compile the kernels that first fits of the named kinds, losses and dtypes "
                    "use, one process per (kind, loss, dtype, mask) and as many at once as "
                    "there are cores, into the on-disk cache that later processes load "
                    "(lorakern.warmup). Without options: what the README's examples use "
                    "(matrix squared float32 and float64, huber, a mask; linear cross_entropy); "
                    "with any, the product of --kind, --loss and --dtype (defaults matrix, "
                    "squared, float32), masked too with --mask.",
        formatter_class=_Help)
    warmup.add_argument("--kind", dest="kinds", nargs="+", choices=("matrix", "linear"),
                        default=None, help="problem kinds")
    warmup.add_argument("--loss", dest="losses", nargs="+", default=None,
                        choices=sorted(set(LOSSES) | {"cross_entropy"}), help="losses")
    warmup.add_argument("--dtype", "--dtypes", dest="dtypes", nargs="+", default=None,
                        choices=("float32", "float64"), help="data types")
    warmup.add_argument("--mask", action="store_true",
                        help="also the masked kernels (matrix completion; the matrix kind)")
    warmup.add_argument("--jobs", type=_positive_int, default=None,
                        help="processes at once (default: the cores)")
    warmup.set_defaults(run=_cmd_warmup, parser=warmup)
    return parser


def _plain_warnings():
    """A ``warnings.showwarning`` that prints "lorakern: warning: <message>" on stderr, each
    message once: a command-line user needs the problem in their options, not the file and
    line of lorakern (or of site-packages) that noticed it."""
    import sys

    said = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text not in said:
            said.add(text)
            print(f"lorakern: warning: {text}", file=sys.stderr if file is None else file)

    return show


def main(argv=None) -> int:
    """Run the command line with ``argv`` (default sys.argv[1:]); returns the exit code."""
    import warnings

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        with warnings.catch_warnings():
            warnings.showwarning = _plain_warnings()
            return args.run(args, args.parser)
    except SystemExit as exc:  # argparse: --help, --version (0) and usage errors (2)
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
