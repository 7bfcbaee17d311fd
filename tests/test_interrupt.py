"""Ctrl-C during fit (lorakern/_interrupt.py): the loop stops at a step boundary and fit
returns the steps taken, status "interrupted", with a warning saying how to resume.

In-process tests deliver SIGINT to this process from inside a chosen fused pass (so the step
it lands in is known); ``test_sigint_from_outside`` sends a real one to a child process
mid-fit. Every interrupted iterate is compared, bit for bit, with an uninterrupted fit of the
same number of steps.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import lorakern
from lorakern import _dispatch
from lorakern._cuda import launch
from lorakern._cuda import matrix as cuda_kernels
from lorakern.results import HISTORY_FIELDS
from lorakern.testing import random_linear_data

from helpers import EMULATED, assert_bitwise, make_case

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30


def matrix_case(dtype, seed=0):
    return make_case((37, 29, 3), dtype, loss="huber", seed=seed)


def linear_case(dtype, seed=0):
    N, n, m, r = 23, 19, 11, 3
    rng = np.random.default_rng([seed, N, n, m, r])
    X, Y, W0 = random_linear_data(rng, N, n, m, dtype, loss="cross_entropy",
                                  w0_scale=1 / math.sqrt(n))
    B = (0.5 * rng.standard_normal((m, r))).astype(dtype)
    A = (0.5 * rng.standard_normal((r, n))).astype(dtype)
    return lorakern.LinearProblem(X, Y, W0, loss="cross_entropy"), B, A


CASES = {"matrix": matrix_case, "linear": linear_case}


@pytest.fixture(autouse=True)
def default_sigint():
    """Every test starts and must end with Python's own SIGINT handler in place. (A process
    started in the background by a non-interactive shell, as a CI runner may start pytest,
    inherits SIGINT ignored; Python then leaves it ignored, and so does fit: the tests set
    Python's handler, as an interactive start has it, and put the inherited one back.)"""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "a handler was left"
    finally:
        signal.signal(signal.SIGINT, inherited)


def sigint_during_pass(monkeypatch, call: int, times: int = 1, seen: list | None = None):
    """SIGINT (``times`` of them) delivered to this process inside fit's ``call``-th fused
    pass (1-based): the pass is that of step t = call - 1. ``seen`` collects the SIGINT
    handler each pass finds."""
    real = _dispatch.Engine.fused_pass
    count = [0]

    def fused_pass(self, B, A, **kwargs):
        count[0] += 1
        if seen is not None:
            seen.append(signal.getsignal(signal.SIGINT))
        if count[0] == call:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        return real(self, B, A, **kwargs)

    monkeypatch.setattr(_dispatch.Engine, "fused_pass", fused_pass)


def assert_same_run(got, want, device=None):
    to_host = np.asarray if device is None else device.to_host
    assert got.steps == want.steps and len(got.history) == len(want.history)
    assert_bitwise(to_host(got.B), to_host(want.B), "B")
    assert_bitwise(to_host(got.A), to_host(want.A), "A")
    assert_bitwise(got.final_loss, want.final_loss, "final_loss")
    for name in HISTORY_FIELDS:
        assert_bitwise(getattr(got.history, name), getattr(want.history, name), name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_ctrl_c_returns_the_steps_taken(monkeypatch, capsys, kind, dtype):
    problem, B, A = CASES[kind](dtype)
    B0, A0 = B.copy(), A.copy()
    seen = []
    sigint_during_pass(monkeypatch, call=5, seen=seen)  # during step t = 4
    with pytest.warns(lorakern.FitInterrupted,
                      match=rf"after 5 of {STEPS} steps.*fit\(problem, result.B, result.A, "
                            rf"steps={STEPS - 5}, step_size=result.step_size, state=result.state\)"):
        got = lorakern.fit(problem, B, A, steps=STEPS, device="cpu", step_size="theorem")
    assert "stopping at the end of this step" in capsys.readouterr().err
    assert seen[0] is not signal.default_int_handler  # fit's handler was in place
    assert got.status == "interrupted" and got.steps == 5 and len(got.history) == 5
    assert_bitwise(B, B0, "caller's B")
    assert_bitwise(A, A0, "caller's A")
    monkeypatch.undo()

    # the iterate is that of an uninterrupted fit of as many steps, its loss and history too
    want = lorakern.fit(problem, B, A, steps=5, device="cpu", step_size="theorem")
    assert want.status == "completed"
    assert_same_run(got, want)
    # the theory check covers the steps taken, and they keep the paper's guarantees
    report = lorakern.theory.check(got)
    assert report.lemma2.size == 5 and report.all_hold
    # resuming as the warning says continues the same iterates, bit for bit
    rest = lorakern.fit(problem, got.B, got.A, steps=STEPS - 5, device="cpu", step_size="theorem")
    full = lorakern.fit(problem, B, A, steps=STEPS, device="cpu", step_size="theorem")
    assert_bitwise(rest.B, full.B, "resumed B")
    assert_bitwise(rest.A, full.A, "resumed A")
    assert_bitwise(np.concatenate([got.history.loss, rest.history.loss]), full.history.loss,
                   "resumed loss history")


@pytest.mark.parametrize("step_size", [0.02, "armijo"])
def test_ctrl_c_with_other_policies(monkeypatch, step_size):
    problem, B, A = matrix_case(np.float64, seed=1)
    sigint_during_pass(monkeypatch, call=3)
    with pytest.warns(lorakern.FitInterrupted):
        got = lorakern.fit(problem, B, A, steps=STEPS, device="cpu", step_size=step_size)
    monkeypatch.undo()
    assert got.status == "interrupted" and got.steps == 3
    assert_same_run(got, lorakern.fit(problem, B, A, steps=3, device="cpu", step_size=step_size))
    # resumed as the warning says (Armijo's last eta travels in result.state): the same bits
    rest = lorakern.fit(problem, got.B, got.A, steps=STEPS - 3, device="cpu",
                        step_size=got.step_size, state=got.state)
    full = lorakern.fit(problem, B, A, steps=STEPS, device="cpu", step_size=step_size)
    assert_bitwise(rest.B, full.B, "resumed B")
    assert_bitwise(rest.A, full.A, "resumed A")
    assert_bitwise(np.concatenate([got.history.trials, rest.history.trials]),
                   full.history.trials, "trials")


@pytest.mark.parametrize("search", ["exact", "backtrack"])
def test_ctrl_c_with_the_certified_step_a_callback_and_progress(monkeypatch, capsys, search):
    """The pieces together: a certified fit with a callback every 3 steps and progress lines
    is interrupted during step t = 7. It returns the 7 steps taken (the callback saw t = 3
    and 6), its log ends by saying so, theory.check certifies those steps (eta >= eta_t
    included), and resuming with result.state ends at the bits of one whole fit."""
    problem, B, A = make_case((37, 29, 3), np.float64, seed=2)  # squared: exact applies
    policy = lorakern.Certified(search=search)
    seen = []
    sigint_during_pass(monkeypatch, call=8)  # step t = 7
    with pytest.warns(lorakern.FitInterrupted, match="after 8 of"):
        got = lorakern.fit(problem, B, A, steps=STEPS, device="cpu", step_size=policy,
                           progress=True, callback=lambda info: seen.append(info.t),
                           callback_every=3)
    monkeypatch.undo()
    assert got.status == "interrupted" and got.steps == 8 and seen == [3, 6]
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"fit interrupted  8/{STEPS}")
    assert_same_run(got, lorakern.fit(problem, B, A, steps=8, device="cpu", step_size=policy))
    report = lorakern.theory.check(got)
    assert report.all_hold and report.eta_floor.size == 8 and report.eta_floor.all()
    assert set(got.state) == {"eta"}  # both searches keep the last eta taken
    rest = lorakern.fit(problem, got.B, got.A, steps=STEPS - 8, device="cpu",
                        step_size=got.step_size, state=got.state)
    full = lorakern.fit(problem, B, A, steps=STEPS, device="cpu", step_size=policy)
    assert_bitwise(rest.B, full.B, "resumed B")
    assert_bitwise(rest.A, full.A, "resumed A")


def test_ctrl_c_during_the_first_step(monkeypatch):
    """A request that arrives during the first pass still returns that step (a step is the
    unit); none is lost and none is half-done."""
    problem, B, A = matrix_case(np.float32)
    sigint_during_pass(monkeypatch, call=1)
    with pytest.warns(lorakern.FitInterrupted, match="after 1 of"):
        got = lorakern.fit(problem, B, A, steps=STEPS, device="cpu", step_size="theorem")
    monkeypatch.undo()
    assert got.steps == 1
    assert_same_run(got, lorakern.fit(problem, B, A, steps=1, device="cpu", step_size="theorem"))


def test_second_ctrl_c_raises_at_once(monkeypatch):
    problem, B, A = matrix_case(np.float64)
    B0, A0 = B.copy(), A.copy()
    sigint_during_pass(monkeypatch, call=3, times=2)
    with pytest.raises(KeyboardInterrupt):
        lorakern.fit(problem, B, A, steps=STEPS, device="cpu", step_size="theorem")
    assert_bitwise(B, B0, "caller's B")
    assert_bitwise(A, A0, "caller's A")
    # (the fixture checks that the default handler is back)
    monkeypatch.undo()
    # nothing half-written is left in the problem: it fits as a fresh one does
    fresh, _, _ = matrix_case(np.float64)
    assert_same_run(lorakern.fit(problem, B, A, steps=4, device="cpu", step_size="theorem"),
                    lorakern.fit(fresh, B, A, steps=4, device="cpu", step_size="theorem"))


def test_pool_threads_are_waited_for_through_ctrl_c():
    """A KeyboardInterrupt while the CPU pass waits for its pool threads is raised only once
    they are done (a thread left running would write into the problem's workspace)."""
    from lorakern._cpu import workers

    class Running:
        def __init__(self):
            self.waits = 0

        def cancel(self):
            return False

        def result(self):
            self.waits += 1
            if self.waits == 1:
                raise KeyboardInterrupt
            return None

    futures = [Running(), Running()]
    with pytest.raises(KeyboardInterrupt):
        workers._wait_all(futures)
    assert [f.waits for f in futures] == [2, 2]


def test_normal_fit_installs_and_restores(monkeypatch):
    problem, B, A = linear_case(np.float32)
    B0, A0 = B.copy(), A.copy()
    seen = []
    sigint_during_pass(monkeypatch, call=0, seen=seen)  # never signals
    got = lorakern.fit(problem, B, A, steps=4, device="cpu", step_size="theorem")
    assert got.status == "completed" and got.steps == 4
    assert len(seen) == 4 and all(h is not signal.default_int_handler for h in seen)
    assert_bitwise(B, B0, "caller's B")
    assert_bitwise(A, A0, "caller's A")


def test_program_handler_is_left_in_charge(monkeypatch):
    """A program that handles SIGINT itself keeps its handler during and after fit."""
    problem, B, A = matrix_case(np.float32)
    calls = []

    def mine(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGINT, mine)
    try:
        sigint_during_pass(monkeypatch, call=2)
        got = lorakern.fit(problem, B, A, steps=4, device="cpu", step_size="theorem")
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls == [signal.SIGINT] and got.status == "completed" and got.steps == 4


def test_off_the_main_thread_signals_are_untouched(monkeypatch):
    problem, B, A = matrix_case(np.float64)
    seen, out = [], {}
    sigint_during_pass(monkeypatch, call=0, seen=seen)
    worker = threading.Thread(target=lambda: out.update(
        result=lorakern.fit(problem, B, A, steps=3, device="cpu", step_size="theorem")))
    worker.start()
    worker.join()
    assert out["result"].status == "completed" and out["result"].steps == 3
    assert seen == [signal.default_int_handler] * 3


# ---- the CUDA device loop (run_steps): it stops between chunks of STOP_EVERY steps ---------

needs_emulation = pytest.mark.skipif(EMULATED is None, reason="g++ not found (no CUDA emulation)")


@needs_emulation
def test_device_loop_stops_between_chunks(monkeypatch):
    monkeypatch.setattr(launch, "TILES", ((32, 32),))
    monkeypatch.setattr(cuda_kernels, "STOP_EVERY", 3)
    problem, B, A = make_case((20, 24, 3), np.float64, seed=5)
    B0, A0 = B.copy(), A.copy()
    real, count = launch.Plan.fused, [0]

    def fused(self, data, B, A, grad=True):
        count[0] += 1
        if count[0] == 4:  # step t = 3, in the second chunk (steps 3, 4, 5)
            signal.raise_signal(signal.SIGINT)
        return real(self, data, B, A, grad)

    monkeypatch.setattr(launch.Plan, "fused", fused)
    with pytest.warns(lorakern.FitInterrupted, match="after 6 of 40 steps"):
        got = lorakern.fit(problem, B, A, steps=40, device=EMULATED, step_size="theorem")
    monkeypatch.setattr(launch.Plan, "fused", real)
    assert got.status == "interrupted" and got.steps == 6 and len(got.history) == 6
    assert_bitwise(B, B0, "caller's B")
    assert_bitwise(A, A0, "caller's A")
    want = lorakern.fit(problem, B, A, steps=6, device=EMULATED, step_size="theorem")
    assert_same_run(got, want, EMULATED)
    report = lorakern.theory.check(got)
    assert report.lemma2.size == 6 and report.all_hold


class GraphRuntime:
    """The emulation's runtime with CUDA graphs modelled: capture records the step without
    running it, replay runs the recorded steps in order (and logs each replay's length)."""

    supports_graphs = True

    def __init__(self, rt):
        self._rt, self.replays = rt, []

    def __getattr__(self, name):
        return getattr(self._rt, name)

    def capture(self, fn):
        return fn

    def replay(self, graphs, order):
        self.replays.append(len(order))
        for i in order:
            graphs[i]()


@needs_emulation
def test_graph_replay_stops_between_chunks(monkeypatch):
    monkeypatch.setattr(launch, "TILES", ((32, 32),))
    monkeypatch.setattr(cuda_kernels, "STOP_EVERY", 3)
    problem, B, A = make_case((20, 24, 3), np.float32, seed=6)
    data = SimpleNamespace(**vars(problem.data(EMULATED, cuda_kernels)))
    data.rt, data.plans = GraphRuntime(data.rt), {}
    asked = []

    def stop():
        asked.append(1)
        return len(asked) == 3  # asked before chunks 1, 2, 3: stop before the third

    run = cuda_kernels.run_steps(problem, data, B, A, 10, stop=stop)
    assert data.rt.replays == [3, 3] and len(run.history) == 6 and run.diverged_at is None
    whole = cuda_kernels.run_steps(problem, data, B, A, 6)  # one replay of six steps
    assert data.rt.replays == [3, 3, 6]
    for got, want, name in ((run.B, whole.B, "B"), (run.A, whole.A, "A"),
                            (run.B_prev, whole.B_prev, "B_prev"), (run.history, whole.history, "history")):
        assert_bitwise(got, want, name)
    never = cuda_kernels.run_steps(problem, data, B, A, 10, stop=lambda: False)
    assert data.rt.replays[3:] == [3, 3, 3, 1] and len(never.history) == 10


# ---- a real SIGINT, from another process ------------------------------------------------------

CHILD = textwrap.dedent("""
    import signal, sys, warnings
    import numpy as np
    import lorakern
    from lorakern import _dispatch
    from lorakern.testing import make_case

    signal.signal(signal.SIGINT, signal.default_int_handler)  # not the SIG_IGN a background parent passes on

    problem, B, A = make_case((160, 120, 8), np.float64, loss="squared", seed=7)
    B0, A0 = B.copy(), A.copy()
    lorakern.step(problem, B, A, device="cpu")  # kernels loaded before the fit starts
    real, passes = _dispatch.Engine.fused_pass, [0]

    def fused_pass(self, *args, **kwargs):
        passes[0] += 1
        if passes[0] == 3:  # inside fit's loop, with its handler: the parent may signal
            print("stepping", flush=True)
        return real(self, *args, **kwargs)

    _dispatch.Engine.fused_pass = fused_pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = lorakern.fit(problem, B, A, steps=10**7, device="cpu", step_size="theorem")
    report = lorakern.theory.check(result)
    np.savez(sys.argv[1], B=result.B, A=result.A, steps=result.steps, status=result.status,
             final_loss=result.final_loss, history_len=len(result.history),
             loss=result.history.loss, eta=result.history.eta,
             warnings=np.array([f"{w.category.__name__}: {w.message}" for w in caught]),
             checked=report.lemma2.size, all_hold=report.all_hold,
             restored=signal.getsignal(signal.SIGINT) is signal.default_int_handler,
             untouched=np.array_equal(B, B0) and np.array_equal(A, A0))
    print("done", flush=True)
""")


def test_sigint_from_outside(tmp_path):
    """SIGINT sent to a child mid-fit (10^7 steps asked): it returns the steps taken, and
    they equal an uninterrupted fit of as many steps here, bit for bit."""
    out = tmp_path / "interrupted.npz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    watchdog = threading.Timer(240, child.kill)  # a child that never starts or never stops
    watchdog.start()
    try:
        line = child.stdout.readline()
        assert line.strip() == "stepping", (line, child.stderr.read())
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=200)
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0 and "done" in stdout, stderr
    assert "stopping at the end of this step" in stderr
    got = np.load(out)
    steps = int(got["steps"])
    print(f"child stopped after {steps} steps")
    assert str(got["status"]) == "interrupted" and 2 <= steps < 10**7
    assert int(got["history_len"]) == steps and int(got["checked"]) == steps
    assert bool(got["all_hold"]) and bool(got["restored"]) and bool(got["untouched"])
    [warning] = got["warnings"]
    assert warning.startswith("FitInterrupted:") and f"steps={10**7 - steps}" in warning

    problem, B, A = make_case((160, 120, 8), np.float64, loss="squared", seed=7)
    want = lorakern.fit(problem, B, A, steps=steps, device="cpu", step_size="theorem")
    assert want.status == "completed" and want.steps == steps
    assert_bitwise(got["B"], want.B, "B")
    assert_bitwise(got["A"], want.A, "A")
    assert_bitwise(got["final_loss"], np.float64(want.final_loss), "final_loss")
    assert_bitwise(got["loss"], want.history.loss, "history.loss")
    assert_bitwise(got["eta"], want.history.eta, "history.eta")


COMPILING_CHILD = textwrap.dedent("""
    import signal, sys, time
    import numpy as np
    import lorakern

    signal.signal(signal.SIGINT, signal.default_int_handler)  # not the SIG_IGN a background parent passes on
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((40, 30)).astype(np.float32)
    Y = rng.standard_normal((40, 30)).astype(np.float32)
    B, A = lorakern.init_adapters(40, 30, rank=3, dtype=np.float32, seed=1)
    problem = lorakern.Problem(W0, Y, loss=sys.argv[1])
    print("compiling", flush=True)
    start = time.perf_counter()
    try:
        lorakern.{call}
    finally:
        print(f"left after {{time.perf_counter() - start:.2f}} s", flush=True)
    print("done", flush=True)
""")


@pytest.mark.parametrize("call", ["fit(problem, B, A, steps=3, device='cpu')",
                                  "step(problem, B, A, device='cpu')"], ids=["fit", "step"])
def test_sigint_during_a_compile(tmp_path, call):
    """Ctrl-C while the first step's kernel compiles (an empty Numba cache: seconds of
    compiling) ends the process within a second or two, with a KeyboardInterrupt, in fit
    (whose handler defers the first Ctrl-C to a step boundary) and in step (Python's)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    child = subprocess.Popen([sys.executable, "-c", COMPILING_CHILD.format(call=call), "huber"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             cwd=tmp_path)
    try:
        assert child.stdout.readline().strip() == "compiling", child.stderr.read()
        time.sleep(1.0)  # into the compile, which takes several seconds from an empty cache
        assert child.poll() is None, "the compile ended within a second: nothing was tested"
        sent = time.perf_counter()
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=60)
        waited = time.perf_counter() - sent
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert "KeyboardInterrupt" in stderr and "done" not in stdout, (stdout, stderr)
    assert waited < 2.5, f"the process took {waited:.2f} s to stop after SIGINT"
