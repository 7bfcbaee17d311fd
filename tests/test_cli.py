"""The command line: `lorakern demo`, `lorakern bench` and `lorakern warmup`, run in-process
through cli.main (warmup's cache also from subprocesses).

Most demo runs use device="reference" (NumPy): they test the command, not the kernels, and
need no Numba compile. One run and the plot use the CPU backend with the squared float32
kernels that the other test files compile anyway.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from lorakern import cli, demo, plot, theory
from lorakern.testing import make_case

SMALL = ["--m", "40", "--n", "30", "--rank", "3", "--steps", "20"]
ROOT = Path(__file__).resolve().parents[1]


def run_main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> list[int]:
    """The t of each row of the printed table (the '(final)' row included)."""
    rows, inside = [], False
    for line in out.splitlines():
        if line.startswith("------"):
            inside = True
            continue
        if inside:
            first = line.split()[0] if line.split() else ""
            if not first.isdigit():
                break
            rows.append(int(first))
    return rows


def assert_demo_output(out: str, steps: int = 20):
    assert "J(V_t)" in out and "eta_t" in out and "||grad J||^2" in out and "||V_t||^2" in out
    rows = table_rows(out)
    assert rows[0] == 0 and rows[-2] == steps - 1 and rows[-1] == steps, rows
    assert 5 <= len(rows) <= demo.TABLE_ROWS + 1 and rows == sorted(set(rows)), rows
    assert f"J(V_{steps}) = " in out and "time      fit" in out
    assert "verdict" in out


def test_demo_cpu(capsys):
    code, out, err = run_main(capsys, "demo", *SMALL)
    assert code == 0, out + err
    assert_demo_output(out)
    assert "device    cpu (Numba" in out and "loading the cpu kernels ..." in out
    assert "compiled in" in out or "loaded from the cache in" in out
    assert "Lemma 2   " in out and "held at all 20 steps" in out and "Theorem 3 " in out
    assert "verdict   every guaranteed inequality held" in out
    assert "20/20 steps" in err  # the progress bar


def test_demo_says_whether_it_compiled(capsys, monkeypatch):
    """Once the kernels are in memory (or on disk) the demo says it loaded them; when Numba
    compiled something during the warm-up it says it compiled (issue 24)."""
    code, out, _ = run_main(capsys, "demo", *SMALL)  # compiled or loaded by now
    code, out, _ = run_main(capsys, "demo", *SMALL)
    assert code == 0
    assert "loaded from the cache in" in out and "compiled in" not in out
    assert "s loading the kernels" in out and "one-time compile" not in out

    import numba

    warm_up = demo.warm_up

    def warm_up_and_compile(*args):
        seconds = warm_up(*args)
        numba.njit(lambda x: x + 1)(1)  # a new function: Numba compiles it
        return seconds

    monkeypatch.setattr(demo, "warm_up", warm_up_and_compile)
    code, out, _ = run_main(capsys, "demo", *SMALL)
    assert code == 0
    assert "compiled in" in out and "loaded from the cache" not in out
    assert "one-time compile" in out


def test_numba_compiles_records_compiles_only():
    import numba

    def add(x):
        return x + 1

    fn = numba.njit(add)
    with demo.numba_compiles() as first:
        fn(1)
    with demo.numba_compiles() as second:
        fn(2)
    assert len(first) == 1 and first[0].py_func is add and not second


@pytest.mark.parametrize("loss, extra", [
    ("squared", []),
    ("huber", ["--delta", "0.5"]),
    ("logistic", []),
    ("squared", ["--observed", "0.4"]),
    ("logistic", ["--mask", "0.5", "--dtype", "float64"]),
])
def test_demo_theorem_each_loss(capsys, loss, extra):
    code, out, err = run_main(capsys, "demo", *SMALL, "--device", "reference", "--loss", loss,
                              "--step-size", "theorem", *extra)
    assert code == 0, out + err
    assert_demo_output(out)
    assert f"{loss} loss" in out and "held at all 20 steps" in out
    assert "Theorem 3 min_t ||grad J(V_t)||^2 <= 5 (J(V_0) - 0) / sum_t eta_t" in out
    if "--observed" in extra or "--mask" in extra:
        assert "observed entries" in out
    assert "verdict   every guaranteed inequality held" in out


def test_demo_default_reaches_the_optimum(capsys):
    """The default demo (512 x 384, rank 8, 300 steps, float32, cpu) under its default step,
    the certified search: J(V_300) within 1 % of the rank-8 optimum J* (SVD), every
    guaranteed inequality held, and the theorem's step shown beside it, far above J*."""
    code, out, err = run_main(capsys, "demo")
    assert code == 0, out + err
    assert "step size certified: exact line search" in out
    assert "optimum   J* = " in out and "(within 1 %)" in out.split("optimum   J* = ")[1].splitlines()[0]
    final = float(out.split("final     J(V_300) = ")[1].split()[0])
    optimum = float(out.split("optimum   J* = ")[1].split()[0])
    assert optimum > 0 and final <= 1.01 * optimum
    assert "eta >= eta_t of eq. (8) (the theorem's step at V_t): held at all 300 steps" in out
    assert "Lemma 2   J(V_t+1) <= J(V_t) - eta/5 ||grad J(V_t)||^2: held at all 300 steps" in out
    beside = out.split("beside    the theorem step from the same start: J(V_300) = ")[1]
    assert float(beside.split(",")[0]) > 10 * optimum
    assert "verdict   every guaranteed inequality held" in out


@pytest.mark.parametrize("loss, extra", [("squared", []), ("huber", ["--observed", "0.5"]),
                                         ("logistic", []), ("squared", ["--observed", "0.5"])])
def test_demo_certified(capsys, loss, extra):
    """The default step on each loss: the exact search for the squared loss, backtracking
    else; the theorem's step is run beside it; no optimum is claimed where there is no
    closed form (another loss or a mask)."""
    code, out, err = run_main(capsys, "demo", *SMALL, "--device", "reference", "--loss", loss, *extra)
    assert code == 0, out + err
    assert_demo_output(out)
    assert "step size certified" in out and "held at all 20 steps" in out
    assert "eta >= eta_t of eq. (8) (the theorem's step at V_t): held at all 20 steps" in out
    assert "beside    the theorem step" in out
    assert ("optimum   J* = " in out) == (loss == "squared" and not extra)
    assert "verdict   every guaranteed inequality held" in out


@pytest.mark.parametrize("loss, extra", [("squared", []), ("huber", ["--observed", "0.5"]),
                                         ("logistic", [])])
def test_demo_armijo(capsys, loss, extra):
    code, out, err = run_main(capsys, "demo", *SMALL, "--device", "reference", "--loss", loss,
                              "--step-size", "armijo", *extra)
    assert code == 0, out + err
    assert_demo_output(out)
    assert "trials" in out and "line-search passes" in out
    assert "the Armijo c = 0.0001" in out and "(the Armijo condition): held at all 20 steps" in out
    assert "verdict   every guaranteed inequality held" in out


def test_demo_constant(capsys):
    code, out, err = run_main(capsys, "demo", *SMALL, "--device", "reference", "--step-size", "0.001")
    assert code == 0, out + err
    assert_demo_output(out)
    assert "constant eta = 0.001" in out and "a constant step has none" in out
    assert "loss decreased monotonically: yes, at all 20 steps" in out
    # the words of theory.check(result).summary() for the same run: no guarantee, and the
    # inequalities checked for reference (here they held)
    assert "verdict   no guarantee for the constant step; checked for reference, every inequality held" in out


def test_constant_step_cli_and_theory_check_agree():
    """A stable constant step: theory.check says all_hold, and says (as the CLI does) that a
    constant step has no guarantee and the inequalities were checked for reference."""
    import lorakern

    args = demo_args(1e-3)
    lines = []
    assert demo.run(args, "reference", out=lambda *a, **k: lines.append(" ".join(map(str, a)))) == 0
    problem = demo.synthetic_problem(40, 30, 3).problem
    B, A = demo.synthetic_problem(40, 30, 3).B, demo.synthetic_problem(40, 30, 3).A
    report = theory.check(lorakern.fit(problem, B, A, steps=20, device="reference", step_size=1e-3))
    assert report.all_hold and not report.guaranteed
    assert str(report).startswith("no guarantee for a constant step; checked for reference")
    assert "no guarantee for the constant step; checked for reference, every inequality held" in lines[-1]


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_demo_constant_that_diverges_exits_1_with_the_reason(capsys):
    """A constant step that diverges: the fit's warning printed plainly (no file path), the
    verdict and a one-line reason on stderr, exit code 1."""
    code, out, err = run_main(capsys, "demo", *SMALL, "--device", "reference", "--step-size", "1e3")
    assert code == 1, out + err
    assert "loss decreased monotonically: NO" in out and "stopped being finite" in out
    assert "verdict   the fit diverged: the loss stopped being finite after step" in out
    assert "lorakern: warning: the loss stopped being finite" in err and ".py:" not in err
    assert err.strip().splitlines()[-1].startswith("lorakern demo: the fit diverged: ")


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_demo_exits_1_when_a_guarantee_fails(capsys, monkeypatch):
    # a theorem step 1000x too large breaks Lemma 2; the demo must say so and exit 1
    from lorakern import step_size

    monkeypatch.setattr(step_size, "THEOREM", step_size.Theorem(constant=5e-3))
    code, out, err = run_main(capsys, "demo", *SMALL, "--device", "reference",
                              "--step-size", "theorem")
    assert code == 1, out + err
    assert "FAILED" in out and "verdict   a guaranteed inequality FAILED" in out
    assert "stopped being finite" in err  # it also diverges


@pytest.mark.parametrize("argv, message", [
    (["--rank", "0"], "--rank: expected a positive integer"),
    (["--steps", "x"], "--steps: expected a positive integer"),
    (["--observed", "1.5"], "--observed/--mask: expected a fraction"),
    (["--step-size", "-1"], "--step-size: a constant step size must be positive"),
    (["--step-size", "newton"], "--step-size: expected 'certified', 'theorem', 'exact', 'armijo'"),
    (["--loss", "hinge"], "--loss: invalid choice"),
    (["--step-size", "exact", "--loss", "huber"], "--step-size exact needs the squared loss"),
    (["--device", "tpu"], "--device: invalid choice"),
    (["--seed", "-1"], "--seed: expected a non-negative integer, got -1"),
    (["--seed", "1.5"], "--seed: expected a non-negative integer"),
    (["--m", "-5"], "--m: expected a positive integer, got -5"),
    (["--n", "0"], "--n: expected a positive integer, got 0"),
    (["--steps", "-3"], "--steps: expected a positive integer"),
    (["--delta", "-1"], "--delta: expected a positive finite number"),
    (["--rank", "100000"], "--rank: rank 100000 is more than 64x min(m, n) = 384"),
    (["--problem", "digits", "--rank", "100000"], "--rank: rank 100000 is more than 64x"),
    (["--m", "1000000000", "--n", "1000000000", "--rank", "100000"], "--rank: rank 100000 does not fit in memory"),
])
def test_demo_bad_arguments_exit_2(capsys, argv, message):
    """argparse's two lines (usage, then the error naming the option), no traceback."""
    if "digits" in argv:
        pytest.importorskip("sklearn")
    code, out, err = run_main(capsys, "demo", *argv)
    assert code == 2
    assert message in err and err.strip().splitlines()[-1].startswith("lorakern demo: error:")
    assert "Traceback" not in err


@pytest.mark.filterwarnings("default::lorakern.InputWarning")
def test_rank_above_min_warns_once_about_the_users_problem(capsys):
    """--rank past min(m, n): one plain warning about the user's problem (not the warm-up's
    tiny one, no file path), a header saying J* = 0 plainly, and the gap read as a value."""
    code, out, err = run_main(capsys, "demo", "--m", "40", "--n", "30", "--rank", "50",
                              "--steps", "5")
    assert code == 0, out + err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == ["lorakern: warning: rank 50 is above min(m, n) = 30 (W0 is 40x30): BA can "
                        "have rank at most 30, so the adapters are rank-deficient by construction; "
                        "rank 30 fits the same weights for less"], err
    assert "J* = 0 (rank 50 >= min(m, n) = 30: BA can equal Y - W0 exactly" in out
    assert "noise keeps it above 0" not in out
    assert re.search(r"optimum   J\* = 0 at rank 50: J\(V_T\) is [\d.e+]+ above it", out), out


def test_gap_words_read_right():
    assert demo.gap_words(100.5, 100.0) == "J(V_T) is 0.5 % above it (within 1 %)"
    assert demo.gap_words(150.0, 100.0) == "J(V_T) is 50 % above it"
    assert demo.gap_words(4390.0, 100.0) == "J(V_T) is 43.9x it"
    # a float32 J a few ulps below the float64 J*: rounding, not a negative gap
    below = demo.gap_words(100.0 * (1 - 3e-9), 100.0)
    assert below == "J(V_T) is at it to rounding, |J(V_T) - J*| / J* = 3.0e-09 (within 1 %)"
    assert " % above" not in below
    assert demo.gap_words(2.5, 0.0) == "J(V_T) is 2.5 above it"


def test_help(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and "demo" in out and "bench" in out and "Mu & Klabjan" in out
    code, out, _ = run_main(capsys, "demo", "--help")
    assert code == 0
    for option in ("--device", "--rank", "--steps", "--m", "--n", "--dtype", "--seed", "--loss",
                   "--delta", "--observed", "--step-size", "--plot", "--constant"):
        assert option in out, option
    code, _, err = run_main(capsys)
    assert code == 2 and "required" in err


def test_demo_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "compare.png"
    code, out, err = run_main(capsys, "demo", *SMALL, "--plot", str(path))
    assert code == 0, out + err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot      {path}: theorem, constant" in out


def test_plot_without_matplotlib_says_how_to_get_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    code, out, err = run_main(capsys, "demo", *SMALL, "--device", "reference",
                              "--plot", str(tmp_path / "x.png"))
    assert code == 2 and 'pip install ".[plot]" in a clone' in err
    assert out == ""  # it fails before any work


@pytest.mark.parametrize("problem", ["synthetic", "digits"])
@pytest.mark.parametrize("where, message", [
    ("missing", "--plot: the folder {tmp}/missing does not exist"),
    ("folder", "--plot: {tmp} is a directory"),
])
def test_plot_path_checked_before_the_demo(capsys, tmp_path, where, message, problem):
    path = tmp_path / "missing" / "x.png" if where == "missing" else tmp_path
    code, out, err = run_main(capsys, "demo", "--problem", problem, *SMALL, "--device", "reference",
                              "--plot", str(path))
    assert code == 2 and message.format(tmp=tmp_path) in err, err
    assert out == ""  # nothing ran


def test_plot_in_a_read_only_folder(capsys, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write to any folder")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code, out, err = run_main(capsys, "demo", *SMALL, "--plot", str(folder / "x.png"))
    finally:
        folder.chmod(0o700)
    assert code == 2 and "is not writable" in err and out == ""


@pytest.mark.parametrize("problem", ["synthetic", "digits"])
def test_plot_format_checked_before_the_demo(capsys, tmp_path, problem):
    pytest.importorskip("matplotlib")
    code, out, err = run_main(capsys, "demo", "--problem", problem, *SMALL,
                              "--plot", str(tmp_path / "x.foo"))
    assert code == 2 and "--plot: matplotlib cannot write .foo files" in err and out == ""


def test_constant_without_plot_is_rejected(capsys):
    code, out, err = run_main(capsys, "demo", *SMALL, "--device", "reference", "--constant", "0.1")
    assert code == 2 and "--constant sets the constant step of the --plot comparison" in err
    assert "--step-size ETA" in err and out == ""


def test_constant_with_digits_is_rejected(capsys, tmp_path):
    """The digits demo's comparison has no constant step: --constant is not silently ignored."""
    code, out, err = run_main(capsys, "demo", "--problem", "digits", "--constant", "0.1",
                              "--plot", str(tmp_path / "x.png"))
    assert code == 2 and "the digits demo has none" in err and "--step-size ETA" in err
    assert out == ""


# -- a policy the CLI helpers have never seen -------------------------------------------------

class Halved:
    """Half the theorem's eta: declares Lemma 2's decrease (a smaller step keeps it), has no
    eq. (8) constant, runs on the device."""

    decrease = 0.2
    host_loop = False
    norm = "exact"

    def choose(self, engine, B, A, p, state):
        from lorakern.step_size import THEOREM

        eta, _ = THEOREM.choose(engine, B, A, p, state)
        return 0.5 * eta, 0

    def device_loop(self, problem):
        from lorakern.step_size import THEOREM_CONSTANT

        return {"eta_scale": 2 * THEOREM_CONSTANT * problem.eta_lipschitz}


class Tiny:
    """A fixed small eta chosen on the host: no guarantee declared."""

    decrease = None
    host_loop = True
    norm = "exact"

    def choose(self, engine, B, A, p, state):
        return 1e-4, 0

    def device_loop(self, problem):
        return None


def demo_args(step_size, **extra):
    return types.SimpleNamespace(**{
        "problem": "synthetic", "m": 40, "n": 30, "rank": 3, "dtype": "float32", "seed": 0,
        "loss": "squared", "delta": 1.0, "observed": None, "steps": 20, "step_size": step_size,
        "plot": None, "constant": None, **extra})


@pytest.mark.parametrize("policy, says, verdict", [
    (Halved(), ["step size halved (Halved: declares J(V_t+1) <= J(V_t) - 0.2 eta_t",
                "Lemma 2   J(V_t+1) <= J(V_t) - eta_t/5 ||grad J(V_t)||^2: held at all 20 steps",
                "(not guaranteed for halved)"], "every guaranteed inequality held"),
    (Tiny(), ["step size tiny (Tiny: no descent guarantee; runs a host loop)",
              "a tiny step has none", "loss decreased monotonically: yes"],
     "no guarantee for the tiny step; checked for reference, every inequality held"),
])
def test_demo_with_a_user_defined_policy(capsys, tmp_path, policy, says, verdict):
    lines = []
    plotting = importlib.util.find_spec("matplotlib") is not None
    args = demo_args(policy, plot=str(tmp_path / "p.png") if plotting else None)
    code = demo.run(args, "reference", out=lambda *a, **k: lines.append(" ".join(map(str, a))))
    out = "\n".join(lines)
    assert code == 0, out
    for text in says + ["verdict   " + verdict]:
        assert text in out, text
    if plotting:  # its own curve beside the theorem, constant, armijo and certified ones
        assert "theorem, constant (eta = " in out
        assert f"armijo, certified and {theory.policy_name(policy)} steps" in out


def test_verdict_reads_the_policy():
    """theory.verdict judges a run by what its policy declares (no isinstance)."""
    import lorakern

    problem, B, A = make_case((30, 20, 3), np.float64, seed=4)
    for policy, guaranteed in ((Halved(), True), (Tiny(), False), (lorakern.Armijo(), True),
                               (lorakern.Constant(1e-3), False), (lorakern.Theorem(), True)):
        result = lorakern.fit(problem, B, A, steps=15, device="reference", step_size=policy)
        lines, ok = theory.verdict(result)
        assert ok, lines
        text = "\n".join(lines)
        assert ("Lemma 2   " in text) == guaranteed, text
        assert ("has none" in text) == (not guaranteed), text


def test_elapsed_spreads_measured_time():
    from lorakern.step_size import Armijo, Constant, Theorem

    def run(policy, seconds, trials):
        T = len(trials)
        history = types.SimpleNamespace(trials=np.asarray(trials))
        return types.SimpleNamespace(step_size=policy, seconds=seconds, steps=T, history=history)

    runs = {"theorem": run(Theorem(), 1.0, [0] * 4), "constant": run(Constant(0.1), 2.0, [0] * 4),
            "armijo": run(Armijo(), 3.0, [1, 3, 0, 0])}
    t = plot.elapsed(runs)
    np.testing.assert_allclose(t["theorem"], [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(t["constant"], [0, 0.5, 1.0, 1.5, 2.0])
    # fused pass 0.25 s, loss-only pass (3 - 4 x 0.25) / 4 trials = 0.5 s
    np.testing.assert_allclose(t["armijo"], [0, 0.75, 2.5, 2.75, 3.0])


def test_synthetic_problem_is_fittable_and_seeded():
    a = demo.synthetic_problem(40, 30, 3, seed=5)
    b = demo.synthetic_problem(40, 30, 3, seed=5)
    assert np.array_equal(a.problem.R, b.problem.R) and np.array_equal(a.A, b.A)
    assert not a.B.any()  # LoRA's start
    # at the planted shift only the noise is left: J = 1/2 ||noise||^2 ~ 1/2 NOISE^2 m n
    expected = 0.5 * (demo.NOISE * demo.SHIFT_RMS) ** 2 * 40 * 30
    assert 0.7 * expected < a.planted_loss < 1.3 * expected
    labels = demo.synthetic_problem(40, 30, 3, loss="logistic", observed=0.5)
    assert set(np.unique(labels.problem.Y)) == {-1.0, 1.0} and labels.problem.mask is not None


def test_python_m_lorakern_demo():
    # the module entry point, in a fresh interpreter (reference device: no Numba compile)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "lorakern", "demo", "--m", "30", "--n", "20", "--rank", "2",
         "--steps", "5", "--device", "reference"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_demo_output(proc.stdout, steps=5)
    assert "verdict   every guaranteed inequality held" in proc.stdout


def test_bench_passes_its_options_to_the_table(capsys, monkeypatch):
    calls = []
    stub = types.ModuleType("lorakern.benchmarking")

    def table(**kwargs):
        calls.append(kwargs)
        return "| m | n | r | dtype |\n|---:|---:|---:|---|\n| 64 | 48 | 2 | float64 |\n"

    stub.table = table
    monkeypatch.setitem(sys.modules, "lorakern.benchmarking", stub)
    code, out, err = run_main(capsys, "bench", "--m", "64", "--n", "48", "--ranks", "2", "3",
                              "--dtypes", "float64", "--repeat", "1")
    assert code == 0, err
    assert calls == [dict(sizes=((64, 48),), ranks=(2, 3), dtypes=("float64",), repeat=1)]
    assert "| 64 | 48 | 2 | float64 |" in out
    code, out, err = run_main(capsys, "bench", "--m", "64", "--rank", "2", "--impls", "numpy",
                              "--peer", "reference")
    assert code == 0 and calls[-1]["sizes"] == ((64, 64),)
    assert calls[-1]["impls"] == ("numpy",) and calls[-1]["peer"] == "reference"


def test_bench_real_table(capsys):
    pytest.importorskip("lorakern.benchmarking")
    code, out, err = run_main(capsys, "bench", "--m", "64", "--ranks", "2", "--dtypes", "float32",
                              "--repeat", "1")
    assert code == 0, err
    assert "| 64 | 64 | 2 | float32 |" in out and "lorakern-cpu" in out
    assert "numpy / lorakern-cpu" in out and "x (" in out  # each ratio with its quartiles
    assert "Only 1 round(s)" in out
    code, out, err = run_main(capsys, "bench", "--m", "64", "--impls", "nope", "--repeat", "1")
    assert code == 2 and "unknown implementation" in err


def test_bench_compares_with_torch_on_the_cpu(capsys):
    """`bench --impls torch` without a GPU times PyTorch's step on the CPU (not an error)."""
    torch = pytest.importorskip("torch")
    import lorakern

    code, out, err = run_main(capsys, "bench", "--m", "64", "--ranks", "2", "--dtypes", "float32",
                              "--impls", "lorakern-cpu", "torch", "--repeat", "1")
    assert code == 0, err
    assert "numpy / torch" in out and "| 64 | 64 | 2 | float32 |" in out
    if "cuda" not in lorakern.devices() or not torch.cuda.is_available():
        assert f"PyTorch {torch.__version__}: torch on the CPU (" in out


def test_the_certified_step_says_what_it_runs_on_the_device():
    """On a device without the quartic pass (CUDA; here its host emulation) the demo's line
    says the certified step backtracks, step by step from the host: never silently another."""
    import lorakern
    from lorakern._cuda import emulation

    problem = demo.synthetic_problem(40, 30, 3).problem
    on_cpu = demo.describe_policy(lorakern.Certified(), problem, "cpu")
    assert "exact line search" in on_cpu and "from the host" not in on_cpu
    if not emulation.available():
        pytest.skip("no g++ for the CUDA host emulation")
    on_cuda = demo.describe_policy(lorakern.Certified(), problem, emulation.device())
    assert "backtracking (halving) line search" in on_cuda and "step by step from the host" in on_cuda


# ---- warmup ----------------------------------------------------------------------------------
COUNT_COMPILES = """
import sys, numpy as np, lorakern
from numba.core import event

compiled = []
class Count(event.Listener):
    def on_start(self, ev):
        compiled.append(ev.data["dispatcher"].py_func.__qualname__)
    def on_end(self, ev):
        pass
event.register("numba:compile", Count())
rng = np.random.default_rng(5)
W0 = rng.standard_normal((70, 50)); Y = rng.standard_normal((70, 50))
problem = lorakern.Problem(W0, Y, loss="huber", delta=0.5)
B, A = lorakern.init_adapters(70, 50, rank=4, dtype=np.float64, seed=2, init="gaussian")
for step_size in ("theorem", "certified", "armijo"):
    lorakern.fit(problem, B, A, steps=3, device="cpu", step_size=step_size)
print("compiled:", ",".join(compiled))
"""


def test_warmup_fills_the_cache_a_second_process_reads(tmp_path):
    """`lorakern warmup` for one family (matrix huber float64) in a fresh cache: it reports
    its progress, and a second process fitting such a problem (another shape, each step
    size) compiles nothing. Without the warmup the same process does compile (the count
    is not vacuous)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    cold = subprocess.run([sys.executable, "-c", COUNT_COMPILES], capture_output=True, text=True,
                          env={**env, "NUMBA_CACHE_DIR": str(tmp_path / "empty")}, timeout=600)
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert "work" in cold.stdout.split("compiled:")[1].strip().split(","), cold.stdout  # the kernel

    warm = subprocess.run([sys.executable, "-m", "lorakern", "warmup", "--kind", "matrix", "--loss",
                           "huber", "--dtype", "float64"], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path)
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert "1/1 compiled" in warm.stderr and "matrix huber float64" in warm.stderr, warm.stderr

    after = subprocess.run([sys.executable, "-c", COUNT_COMPILES], capture_output=True, text=True,
                           env=env, timeout=600)
    assert after.returncode == 0, after.stderr[-3000:]
    assert after.stdout.strip() == "compiled:", after.stdout


def test_warmup_tasks():
    from lorakern.warmup import DEFAULT_TASKS, Task, tasks_for

    got = tasks_for(["matrix", "linear"], ["squared", "cross_entropy"], ["float64"], mask=True)
    assert got == [Task("matrix", "squared", "float64"), Task("matrix", "squared", "float64", True),
                   Task("linear", "squared", "float64"), Task("linear", "cross_entropy", "float64")]
    assert Task("linear", "cross_entropy", "float32") in DEFAULT_TASKS
    assert str(Task("matrix", "huber", "float32", True)) == "matrix huber float32 masked"


@pytest.mark.parametrize("argv, message", [
    (["warmup", "--kind", "matrix", "--loss", "cross_entropy"], "nothing to compile"),
    (["warmup", "--dtype", "float16"], "invalid choice"),
    (["warmup", "--jobs", "0"], "positive integer")])
def test_warmup_bad_arguments_exit_2(capsys, argv, message):
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_warmup_stops_at_ctrl_c(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) ends `lorakern warmup` and
    its worker processes at once: exit code 130, a line saying so, no traceback."""
    import signal
    import time

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from lorakern.cli import main; raise SystemExit(main(['warmup']))")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        time.sleep(4.0)  # the workers start and compile (the whole set takes far longer)
        assert child.poll() is None, child.communicate()
        sent = time.perf_counter()
        os.killpg(child.pid, signal.SIGINT)
        _, err = child.communicate(timeout=60)
        waited = time.perf_counter() - sent
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
    assert child.returncode == 130 and "lorakern warmup: stopped" in err, err
    assert "Traceback" not in err and waited < 5, (waited, err)
