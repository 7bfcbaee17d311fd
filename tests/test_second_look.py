"""A new user's second look: the default step, results, sizes, hints, a raising callback.

Everything here runs on the reference device (NumPy, no compile) unless the CPU's default
path is the point.
"""
from __future__ import annotations

import pickle
import time

import numpy as np
import pytest

import lorakern
from lorakern import theory

from helpers import make_case


def _readme_problem():
    """The README's main example, as written there (512 x 384, a rank-8 shift, rank 8)."""
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((512, 384)).astype(np.float32)
    Y = W0 + rng.standard_normal((512, 8)) @ rng.standard_normal((8, 384)) / 8
    return lorakern.Problem(W0, Y.astype(np.float32)), W0, Y.astype(np.float32)


# -- the default step -------------------------------------------------------------------------

def test_default_step_is_certified_and_ends_at_the_rank_8_optimum():
    """The README's main fit with the default step ends within 1 % of the rank-8 optimum,
    J* = 1/2 sum_{i > 8} sigma_i(Y - W0)^2 (Eckart-Young, by SVD here)."""
    problem, W0, Y = _readme_problem()
    B, A = lorakern.init_adapters(512, 384, rank=8, dtype=np.float32, seed=1)
    result = lorakern.fit(problem, B, A, steps=300, device="cpu", tol=1e-6)
    assert isinstance(result.step_size, lorakern.Certified)
    sigma = np.linalg.svd((Y - W0).astype(np.float64), compute_uv=False)
    optimum = 0.5 * float(np.sum(sigma[8:] ** 2))
    assert result.final_loss <= optimum + 0.01 * max(optimum, 1e-3 * result.history.loss[0])
    assert theory.check(result).all_hold
    # the theorem's step stays one word away, and is the short step it was
    theorem = lorakern.fit(problem, B, A, steps=30, device="cpu", step_size="theorem")
    assert isinstance(theorem.step_size, lorakern.Theorem)
    assert theorem.final_loss > 100 * result.final_loss


def test_step_default_is_certified():
    problem, B, A = make_case((30, 20, 3), np.float64, seed=3)
    default = lorakern.step(problem, B, A, device="reference")
    certified = lorakern.step(problem, B, A, device="reference", step_size="certified")
    theorem = lorakern.step(problem, B, A, device="reference", step_size="theorem")
    assert default.eta == certified.eta and np.array_equal(default.B, certified.B)
    assert default.eta > theorem.eta


# -- results ----------------------------------------------------------------------------------

def _results():
    problem, B, A = make_case((30, 20, 3), np.float64, seed=5)
    result = lorakern.fit(problem, B, A, steps=12, device="reference")
    return result, lorakern.step(problem, B, A, device="reference")


def test_results_compare_by_identity():
    """== on a FitResult, History or StepResult is identity: it never raises (their fields are
    arrays), a result equals itself, and a copy with the same numbers does not equal it."""
    result, s = _results()
    for obj in (result, result.history, s):
        twin = pickle.loads(pickle.dumps(obj))
        assert obj == obj and not (obj != obj)
        assert (obj == twin) is False and obj != twin
        assert {obj: 1}[obj] == 1  # hashable, by identity
    assert result.history != result.history.truncated(len(result.history))


def test_reprs_are_short_and_say_which_iterate():
    result, s = _results()
    T = result.steps
    for obj in (result, result.history, s, theory.check(result)):
        text = repr(obj)
        assert "\n" not in text and len(text) < 400, text
        assert "array([" not in text and "..." not in text, text  # no entries printed
    # History holds V_0 .. V_{T-1}; the result's final loss is J(V_T)
    assert f"loss at V_0..V_{T - 1}: {result.history.loss[0]:.6g} -> " in repr(result.history)
    assert f"final_loss={result.final_loss:.6g} at V_{T}," in repr(result)


def test_print_report_prints_the_summary(capsys):
    result, _ = _results()
    report = theory.check(result)
    print(report)
    assert capsys.readouterr().out.strip() == report.summary()
    assert len(report.summary()) < 400


def test_devices_lists_every_device_a_call_accepts():
    found = lorakern.devices()
    assert "reference" in found and "cpu" in found
    problem, B, A = make_case((9, 7, 2), np.float64, seed=1)
    for name in found:
        assert lorakern.step(problem, B, A, device=name, step_size="theorem").B.shape == B.shape


@pytest.mark.parametrize("device", ["reference", "cpu"])
def test_certified_exact_keeps_eta_in_its_state(device):
    """As the README says: Certified keeps "eta" (the exact search as the backtracking)."""
    problem, B, A = make_case((30, 20, 3), np.float32, seed=6)
    result = lorakern.fit(problem, B, A, steps=5, device=device,
                          step_size=lorakern.Certified(search="exact"))
    assert set(result.state) == {"eta"} and result.state["eta"] == result.history.eta[-1]
    more = lorakern.fit(problem, result.B, result.A, steps=5, device=device,
                        step_size=result.step_size, state=result.state)
    one = lorakern.fit(problem, B, A, steps=10, device=device,
                       step_size=lorakern.Certified(search="exact"))
    np.testing.assert_array_equal(more.B, one.B)


# -- sizes and hints --------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [10**7, 10**9])
def test_a_rank_that_cannot_fit_is_refused_before_allocating(rank):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=f"rank {rank} is more than 64x min\\(m, n\\) = 48"):
        lorakern.init_adapters(64, 48, rank=rank)
    assert time.perf_counter() - t0 < 0.5  # nothing was drawn


def test_adapters_larger_than_memory_are_refused():
    from lorakern.adapters import available_memory

    have = available_memory()
    assert have is None or have > 0
    if have is None:
        pytest.skip("this platform reports no available memory")
    m = n = 10**9  # (m + n) r 12 bytes > what is available, for r well under 64 min(m, n)
    rank = int(have // ((m + n) * 12)) + 10
    with pytest.raises(ValueError, match="does not fit in memory: the adapters"):
        lorakern.init_adapters(m, n, rank=rank)


def test_cross_entropy_hint_matches_the_array():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 6)).astype(np.float32)
    W0 = rng.standard_normal((4, 6)).astype(np.float32)
    labels = rng.integers(0, 4, 20)
    one_hot = np.eye(4, dtype=np.float32)[labels]
    for Y, error in ((one_hot, TypeError), (one_hot.astype(np.int64), ValueError)):
        with pytest.raises(error, match=r"pass Y\.argmax\(axis=1\)") as info:
            lorakern.LinearProblem(X, Y, W0, loss="cross_entropy")
        assert "astype(np.int64)" not in str(info.value)
    # the hint works: the argmax of the one-hot rows is accepted
    lorakern.LinearProblem(X, one_hot.argmax(axis=1), W0, loss="cross_entropy")
    with pytest.raises(TypeError, match=r"Y\.astype\(np\.int64\)"):
        lorakern.LinearProblem(X, labels.astype(np.float32), W0, loss="cross_entropy")


# -- a callback that raises -------------------------------------------------------------------

class Boom(Exception):
    pass


@pytest.mark.parametrize("device", ["reference", "cpu"])
@pytest.mark.parametrize("step_size", ["certified", "theorem"])
def test_a_raising_callback_keeps_the_fit_so_far(device, step_size):
    """The callback's exception propagates with exc.result: the steps taken, status "stopped",
    V_t as its iterate, resumable bit for bit."""
    problem, B, A = make_case((30, 20, 3), np.float64, seed=7)

    def callback(info):
        if info.t == 6:
            raise Boom("disk full")

    with pytest.raises(Boom, match="disk full") as caught:
        lorakern.fit(problem, B, A, steps=20, device=device, step_size=step_size,
                     callback=callback)
    so_far = caught.value.result
    assert isinstance(so_far, lorakern.FitResult)
    assert so_far.status == "stopped" and so_far.steps == 6 and len(so_far.history) == 6
    six = lorakern.fit(problem, B, A, steps=6, device=device, step_size=step_size)
    np.testing.assert_array_equal(so_far.B, six.B)
    assert so_far.final_loss == six.final_loss
    assert not hasattr(caught.value, "_lorakern_fit")
    assert theory.check(so_far).all_hold


def test_a_raising_callback_on_torch_tensors_gives_tensors():
    torch = pytest.importorskip("torch")
    problem, B, A = make_case((30, 20, 3), np.float64, seed=8)

    def callback(info):
        raise Boom("at once")

    with pytest.raises(Boom) as caught:
        lorakern.fit(problem, torch.from_numpy(B), torch.from_numpy(A), steps=5,
                     device="reference", callback=callback)
    assert isinstance(caught.value.result.B, torch.Tensor) and caught.value.result.steps == 1
