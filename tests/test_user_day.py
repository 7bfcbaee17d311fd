"""The rest of a new user's day (issue 24): merging, resuming, callbacks, progress lines,
short reprs, a Generator as the seed, warnings on input that fits nothing, a 0-step check."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

import lorakern
from lorakern import theory
from lorakern._progress import Progress

from helpers import DTYPES, EMULATED, assert_bitwise, host, make_case, random_data

SHAPE = (37, 29, 3)
FIELDS = ("loss", "eta", "grad_sq", "v_sq", "g_norm", "trials")
DT_IDS = {"ids": lambda d: np.dtype(d).name}


# -- merging ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, **DT_IDS)
def test_merged_squared_loss_needs_w0(dtype):
    """A residual loss keeps only W0 - Y: merged() asks for W0, merged(W0) is W0 + B A."""
    m, n, r = SHAPE
    W0, Y, _ = random_data((m, n), dtype, seed=3)
    problem = lorakern.Problem(W0, Y)
    assert problem.W0 is None
    B, A = lorakern.init_adapters(m, n, r, dtype=dtype, seed=4, init="gaussian")
    result = lorakern.fit(problem, B, A, steps=3, device="reference", step_size="theorem")
    with pytest.raises(ValueError, match=r"keeps only the residual W0 - Y.*result.merged\(W0\)"):
        result.merged()
    W0_before = W0.copy()
    merged = result.merged(W0)
    assert merged.dtype == dtype and merged.shape == (m, n)
    assert_bitwise(merged, W0 + result.B @ result.A, "merged")
    assert_bitwise(W0, W0_before, "W0 (the caller's)")
    assert not np.array_equal(merged, W0)  # the fit moved BA away from 0
    assert_bitwise(lorakern.merge(W0, result.B, result.A), merged, "lorakern.merge")


def test_merged_takes_the_problems_own_w0():
    """A LinearProblem and a logistic Problem keep W0: merged() needs no argument."""
    rng = np.random.default_rng(5)
    X, Y = rng.standard_normal((50, 9)), rng.standard_normal((50, 6))
    W0 = rng.standard_normal((6, 9))
    B, A = lorakern.init_adapters(6, 9, 2, dtype=np.float64, seed=rng, init="gaussian")
    result = lorakern.fit(lorakern.LinearProblem(X, Y, W0), B, A, steps=2, device="reference", step_size="theorem")
    assert_bitwise(result.merged(), W0 + result.B @ result.A, "linear merged")
    problem, B, A = make_case((8, 7, 2), np.float64, loss="logistic", seed=6)
    result = lorakern.fit(problem, B, A, steps=2, device="reference", step_size="theorem")
    assert_bitwise(result.merged(), problem.W0 + result.B @ result.A, "logistic merged")


@pytest.mark.parametrize("call, error, match", [
    (lambda W0, B, A: lorakern.merge(W0.astype(np.float32), B, A), TypeError,
     "B has dtype float64"),
    (lambda W0, B, A: lorakern.merge(W0[:-1], B, A), ValueError, "W0 is 7x7, B is 8x2"),
    (lambda W0, B, A: lorakern.merge(W0, B, A[:1]), ValueError, "A is 1x7"),
    (lambda W0, B, A: lorakern.merge(W0.tolist(), B, A), TypeError, "W0 is a Python list; .*np.asarray"),
])
def test_merge_bad_input(call, error, match):
    rng = np.random.default_rng(7)
    W0, B, A = rng.standard_normal((8, 7)), rng.standard_normal((8, 2)), rng.standard_normal((2, 7))
    copies = [x.copy() for x in (W0, B, A)]
    with pytest.raises(error, match=match):
        call(W0, B, A)
    for x, before in zip((W0, B, A), copies):
        assert_bitwise(x, before, "input")


# -- resuming --------------------------------------------------------------------------------

def _resume_devices():
    return ["reference", "cpu"]


@pytest.mark.parametrize("step_size", ["armijo", "theorem"])
@pytest.mark.parametrize("dtype", DTYPES, **DT_IDS)
@pytest.mark.parametrize("device", _resume_devices())
def test_two_chained_fits_are_one_fit(device, dtype, step_size):
    """fit(r.B, r.A, step_size=r.step_size, state=r.state) continues bit for bit: 15 + 15
    steps end where 30 do, with the same history (Armijo's trials included)."""
    problem, B, A = make_case(SHAPE, dtype, seed=11, adapter_scale=0.3)
    one = lorakern.fit(problem, B, A, steps=30, device=device, step_size=step_size)
    first = lorakern.fit(problem, B, A, steps=15, device=device, step_size=step_size)
    state = dict(first.state)
    second = lorakern.fit(problem, first.B, first.A, steps=15, device=device,
                          step_size=first.step_size, state=first.state)
    assert first.state == state  # the caller's dict is copied, not changed
    assert_bitwise(host(second.B), host(one.B), "B")
    assert_bitwise(host(second.A), host(one.A), "A")
    assert second.final_loss == one.final_loss
    for name in FIELDS:
        chained = np.concatenate([getattr(first.history, name), getattr(second.history, name)])
        assert_bitwise(chained, getattr(one.history, name), f"history.{name}")
    if step_size == "armijo":
        assert set(first.state) == {"eta"} and first.state["eta"] == first.history.eta[-1]
        # without the state Armijo starts again from its cap: more trials (the test can fail)
        fresh = lorakern.fit(problem, first.B, first.A, steps=15, device=device,
                             step_size=first.step_size)
        assert fresh.history.trials[0] > second.history.trials[0]
        # and the state sets the step: a tiny last eta starts the search below eta_t
        tiny = lorakern.fit(problem, first.B, first.A, steps=1, device=device,
                            step_size=first.step_size, state={"eta": 1e-12})
        assert tiny.history.eta[0] < second.history.eta[0] and tiny.history.trials[0] == 0
    else:
        assert first.state == {}


@pytest.mark.skipif(EMULATED is None, reason="no g++ for the CUDA emulation")
def test_chained_device_loop_fits_are_one_fit():
    """The theorem step on the (emulated) CUDA device runs the device-side loop: chained, too,
    it ends where one fit does."""
    problem, B, A = make_case((21, 17, 2), np.float64, seed=12)
    one = lorakern.fit(problem, B, A, steps=6, device=EMULATED, step_size="theorem")
    first = lorakern.fit(problem, B, A, steps=3, device=EMULATED, step_size="theorem")
    second = lorakern.fit(problem, first.B, first.A, steps=3, device=EMULATED,
                          step_size=first.step_size, state=first.state)
    assert_bitwise(host(second.B), host(one.B), "B")
    assert_bitwise(host(second.A), host(one.A), "A")


def test_state_must_be_a_dict():
    problem, B, A = make_case((6, 5, 2), np.float64)
    with pytest.raises(TypeError, match="state must be None or a dict"):
        lorakern.fit(problem, B, A, steps=2, device="reference", state=0.5, step_size="theorem")


@pytest.mark.parametrize("step_size, state, error, words", [
    ("armijo", {"eta": -1.0}, ValueError, r"state\['eta'\] must be positive and finite"),
    ("armijo", {"eta": float("nan")}, ValueError, r"state\['eta'\] must be positive"),
    ("armijo", {"eta": "0.5"}, TypeError, r"state\['eta'\] must be a real number"),
    ("armijo", {"eta": 0.5, "step": 3}, ValueError, "state has 'step' but Armijo keeps 'eta'"),
    ("certified", {"etta": 0.5}, ValueError, "state has 'etta' but Certified keeps 'eta'"),
    ("theorem", {"eta": 0.5}, ValueError, "state has 'eta' but Theorem keeps nothing: "
                                          r"pass the state of a fit with the same step size"),
])
def test_bad_state_is_named_and_left_alone(step_size, state, error, words):
    """A state that its policy does not keep, or a step size in it that is not one, is an
    error naming the key; the caller's dict and arrays are not changed."""
    problem, B, A = make_case((6, 5, 2), np.float64)
    before, B0, A0 = dict(state), B.copy(), A.copy()
    with pytest.raises(error, match=words):
        lorakern.fit(problem, B, A, steps=2, device="reference", step_size=step_size,
                     state=state)
    assert state.keys() == before.keys() and all(
        state[k] is before[k] for k in state)
    assert_bitwise(B, B0, "B")
    assert_bitwise(A, A0, "A")
    kept = {"eta": None}  # None: no search yet (as a fresh fit)
    lorakern.fit(problem, B, A, steps=2, device="reference", step_size="armijo", state=kept)
    assert kept == {"eta": None}


# -- the callback ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, **DT_IDS)
def test_callback_every_k_steps(dtype):
    """Called at t = k, 2k, ... < T with V_t, J(V_t), ||grad J(V_t)||^2 and eta_{t-1}."""
    problem, B, A = make_case(SHAPE, dtype, seed=13)
    seen = []
    result = lorakern.fit(problem, B, A, steps=10, device="cpu", step_size="armijo",
                          callback=seen.append, callback_every=3)
    assert [info.t for info in seen] == [3, 6, 9] and result.status == "completed"
    h = result.history
    for info in seen:
        assert info.loss == h.loss[info.t] and info.grad_sq == h.grad_sq[info.t]
        assert info.eta == h.eta[info.t - 1] and info.seconds >= 0
        upto = lorakern.fit(problem, B, A, steps=info.t, device="cpu", step_size="armijo")
        assert_bitwise(host(info.B), host(upto.B), f"B at t = {info.t}")
        assert_bitwise(host(info.A), host(upto.A), f"A at t = {info.t}")
    assert "FitProgress(t=3" in repr(seen[0]) and len(repr(seen[0])) < 300


@pytest.mark.parametrize("how", ["return True", "raise StopIteration"])
def test_callback_stops_the_fit(how):
    problem, B, A = make_case(SHAPE, np.float64, seed=14)

    def stop_at_4(info):
        if info.t == 4:
            if how == "return True":
                return True
            raise StopIteration
        return None

    result = lorakern.fit(problem, B, A, steps=10, device="cpu", callback=stop_at_4,
                          callback_every=2, step_size="theorem")
    full = lorakern.fit(problem, B, A, steps=4, device="cpu", step_size="theorem")
    assert (result.status, result.steps, len(result.history)) == ("stopped", 4, 4)
    assert_bitwise(result.B, full.B, "B = V_4")
    assert_bitwise(result.A, full.A, "A = V_4")
    assert result.final_loss == lorakern.fit(problem, B, A, steps=5, device="cpu", step_size="theorem").history.loss[4]


def test_callback_truthy_but_not_true_does_not_stop():
    problem, B, A = make_case(SHAPE, np.float64, seed=15)
    result = lorakern.fit(problem, B, A, steps=5, device="cpu", callback=lambda info: "logged", step_size="theorem")
    assert result.status == "completed" and result.steps == 5


@pytest.mark.parametrize("device", ["cpu", "reference"])
def test_callback_cannot_write_into_the_fit(device):
    """info.B and info.A are the fit's own iterate: NumPy gives them read-only, so a
    callback that writes into them fails at once instead of changing the run under it; the
    caller's arrays are untouched, and a callback that only reads changes nothing."""
    problem, B, A = make_case(SHAPE, np.float64, seed=15)
    B0, A0 = B.copy(), A.copy()

    def scale_in_place(info):
        info.B *= 0.5

    with pytest.raises(ValueError, match="read-only"):
        lorakern.fit(problem, B, A, steps=5, device=device, callback=scale_in_place, step_size="theorem")
    assert_bitwise(B, B0, "caller's B")
    assert_bitwise(A, A0, "caller's A")
    seen = []
    read = lorakern.fit(problem, B, A, steps=5, device=device,
                        callback=lambda info: seen.append(float(info.B.sum())), step_size="theorem")
    plain = lorakern.fit(problem, B, A, steps=5, device=device, step_size="theorem")
    assert len(seen) == 4 and np.array_equal(read.B, plain.B) and np.array_equal(read.A, plain.A)


@pytest.mark.skipif(EMULATED is None, reason="no g++ for the CUDA emulation")
def test_callback_runs_the_host_loop_on_cuda():
    """A device-side loop cannot call back: with a callback the CUDA fit steps on the host."""
    problem, B, A = make_case((21, 17, 2), np.float64, seed=16)
    seen = []
    result = lorakern.fit(problem, B, A, steps=4, device=EMULATED,
                          callback=lambda info: seen.append((info.t, info.loss)), step_size="theorem")
    assert [t for t, _ in seen] == [1, 2, 3]
    assert [loss for _, loss in seen] == list(result.history.loss[1:])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"callback": 3}, TypeError, "callback must be callable"),
    ({"callback": print, "callback_every": 0}, ValueError, "callback_every must be a positive"),
    ({"callback": print, "callback_every": 1.5}, ValueError, "callback_every must be a positive"),
])
def test_callback_bad_arguments(kwargs, error, match):
    problem, B, A = make_case((6, 5, 2), np.float64)
    with pytest.raises(error, match=match):
        lorakern.fit(problem, B, A, steps=2, device="reference", **kwargs)


# -- progress --------------------------------------------------------------------------------

def test_progress_off_a_terminal_prints_lines_with_an_eta(capsys):
    """stderr captured by pytest is no terminal: a whole line at every tenth of the steps."""
    problem, B, A = make_case(SHAPE, np.float64, seed=17)
    lorakern.fit(problem, B, A, steps=1, device="cpu", step_size="theorem")  # compiled before the clock starts
    capsys.readouterr()
    lorakern.fit(problem, B, A, steps=20, device="cpu", progress=True, step_size="theorem")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    timed = [line for line in lines if "ETA" in line]
    assert len(timed) == 9, lines  # 2/20, 4/20, ..., 18/20; the end has its own line
    assert [line.split()[2] for line in timed] == [f"{k}/20" for k in range(2, 20, 2)]
    assert lines[-1].startswith("fit done  20/20 steps")


def test_progress_last_line_says_why_the_fit_ended(capsys):
    """A fit that a callback stopped (or Ctrl-C interrupted, or tol converged) does not end
    its log with "done"."""
    problem, B, A = make_case(SHAPE, np.float64, seed=17)
    capsys.readouterr()
    result = lorakern.fit(problem, B, A, steps=20, device="cpu", progress=True,
                          callback=lambda info: info.t == 5, step_size="theorem")
    assert result.status == "stopped"
    assert capsys.readouterr().err.splitlines()[-1].startswith("fit stopped  5/20 steps")


def test_progress_lines_at_least_every_interval(monkeypatch):
    """A slow fit writes a line every LOG_INTERVAL seconds even between tenths."""
    from lorakern import _progress

    clock = iter(float(s) for s in range(0, 10_000, 40))  # 40 s between calls
    monkeypatch.setattr(_progress.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    bar = Progress(1000, stream=out)
    for done in (1, 2, 3):
        bar.update(done, 1.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "1/1000 steps" in lines[0] and "ETA" in lines[0]
    assert "ETA 11 h 6 min" in lines[0]  # 999 steps left at 1 step / 40 s


def test_progress_on_a_terminal_redraws_one_line():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = Progress(5, stream=out)
    bar.update(1, 2.0)
    bar.close(5, 1.0)
    text = out.getvalue()
    assert text.startswith("\r[") and text.count("\n") == 1 and "5/5 steps" in text


# -- reprs -----------------------------------------------------------------------------------

def test_reprs_summarise():
    problem, B, A = make_case((120, 90, 4), np.float32, seed=18)
    result = lorakern.fit(problem, B, A, steps=3, device="reference", step_size="armijo")
    text = repr(result)
    assert len(text) < 300, text
    for part in ("status='completed'", "steps=3", f"final_loss={result.final_loss:.6g}",
                 "B=ndarray(120x4, float32)", "A=ndarray(4x90, float32)", "seconds=",
                 "step_size=Armijo("):
        assert part in text, (part, text)
    history = repr(result.history)
    assert history.startswith("History(3 steps, loss ") and "float32" in history
    assert len(history) < 200, history
    assert repr(lorakern.fit(problem, B, A, steps=0, device="reference", step_size="theorem").history).startswith(
        "History(0 steps")
    step = repr(lorakern.step(problem, B, A, device="reference", step_size="theorem"))
    assert "B=ndarray(120x4, float32)" in step and len(step) < 300, step


# -- the seed --------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["lora", "gaussian"])
def test_init_adapters_takes_a_generator(init):
    """A Generator is used as it is (so init_adapters(seed=default_rng(s)) == seed=s) and is
    advanced: a second call draws different adapters."""
    rng = np.random.default_rng(21)
    B1, A1 = lorakern.init_adapters(9, 7, 2, seed=rng, init=init)
    B2, A2 = lorakern.init_adapters(9, 7, 2, seed=rng, init=init)
    Bs, As = lorakern.init_adapters(9, 7, 2, seed=21, init=init)
    assert_bitwise(A1, As, "A from default_rng(21) and from seed=21")
    assert_bitwise(B1, Bs, "B")
    assert not np.array_equal(A1, A2)  # the generator moved on
    with pytest.raises(TypeError, match="seed must be None or a non-negative integer"):
        lorakern.init_adapters(9, 7, 2, seed=np.random.RandomState(0))


# -- warnings --------------------------------------------------------------------------------

def test_all_false_mask_warns():
    W0, Y, _ = random_data((6, 5), np.float64, seed=22)
    with pytest.warns(lorakern.InputWarning, match="mask is False everywhere") as record:
        problem = lorakern.Problem(W0, Y, mask=np.zeros((6, 5), bool))
    assert record[0].filename == __file__  # at the caller's line
    B, A = lorakern.init_adapters(6, 5, 2, dtype=np.float64, seed=1, init="gaussian")
    assert lorakern.step(problem, B, A, device="reference", step_size="theorem").loss == 0.0
    some = np.zeros((6, 5), bool)
    some[2, 3] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakern.Problem(W0, Y, mask=some)


def test_rank_above_min_m_n_warns():
    with pytest.warns(lorakern.InputWarning, match=r"rank 6 is above min\(m, n\) = 5") as rec:
        B, A = lorakern.init_adapters(8, 5, 6, dtype=np.float64, seed=1, init="gaussian")
    assert rec[0].filename == __file__
    W0, Y, _ = random_data((8, 5), np.float64, seed=23)
    problem = lorakern.Problem(W0, Y)
    for run in (lambda: lorakern.fit(problem, B, A, steps=1, device="reference", step_size="theorem"),
                lambda: lorakern.step(problem, B, A, device="reference", step_size="theorem")):
        with pytest.warns(lorakern.InputWarning, match="rank-deficient") as rec:
            run()
        assert rec[0].filename == __file__
    assert issubclass(lorakern.InputWarning, UserWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        B, A = lorakern.init_adapters(8, 5, 5, dtype=np.float64, seed=1, init="gaussian")
        lorakern.fit(problem, B, A, steps=1, device="reference", step_size="theorem")


# -- a 0-step check --------------------------------------------------------------------------

def test_zero_step_check_says_nothing_to_check():
    problem, B, A = make_case((6, 5, 2), np.float64, seed=24)
    result = lorakern.fit(problem, B, A, steps=0, device="reference", step_size="theorem")
    summary = theory.check(result).summary()
    assert summary.startswith("nothing to check") and "nan" not in summary, summary
    lines, ok = theory.verdict(result)
    assert ok and len(lines) == 1 and "nothing to check" in lines[0]
    # one step has something to check
    assert "Lemma 2 held" in theory.check(lorakern.fit(problem, B, A, steps=1,
                                                       device="reference", step_size="theorem")).summary()
