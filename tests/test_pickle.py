"""Every public object pickles and comes back working (lorakern/problems/_common.py).

Problems travel with their data (the pickle is about the arrays' bytes); what a device
prepared from them, and the locks guarding it, are rebuilt on first use. A round-tripped
problem fits to the same bits as the original, and a process pool (spawn) fits problems to
the same bits as the same fits done here.
"""
from __future__ import annotations

import copy
import gc
import math
import multiprocessing
import pickle
import weakref
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

import lorakern
from lorakern.testing import random_linear_data

from helpers import assert_bitwise, make_case

DTYPES = (np.float32, np.float64)
STEPS = 6


def matrix_case(dtype, loss="squared", masked=False, seed=0):
    return make_case((37, 29, 3), dtype, loss=loss, masked=masked, seed=seed)


def linear_case(dtype, loss="squared", seed=0, norm_strategy="gram"):
    """The exact norm by the Gram (or the moments): a cache that must not travel is made."""
    N, n, m, r = 23, 19, 11, 3
    rng = np.random.default_rng([seed, N, n, m, r])
    X, Y, W0 = random_linear_data(rng, N, n, m, dtype, loss=loss, w0_scale=1 / math.sqrt(n))
    B = (0.5 * rng.standard_normal((m, r))).astype(dtype)
    A = (0.5 * rng.standard_normal((r, n))).astype(dtype)
    return lorakern.LinearProblem(X, Y, W0, loss=loss, norm_strategy=norm_strategy), B, A


CASES = {
    "matrix-squared": lambda dtype: matrix_case(dtype),
    "matrix-logistic-masked": lambda dtype: matrix_case(dtype, "logistic", masked=True, seed=1),
    "linear-squared": lambda dtype: linear_case(dtype),
    "linear-cross_entropy": lambda dtype: linear_case(dtype, "cross_entropy", seed=2),
    "linear-squared-moments": lambda dtype: linear_case(dtype, seed=3, norm_strategy="moments"),
}
#: the caches a problem keeps beside its data (none travels in a pickle)
CACHE_NAMES = ("gram", "moments")


def data_bytes(problem) -> int:
    """The bytes of the arrays a problem keeps (what must travel)."""
    names = ("X", "W0", "Y") if problem.kind == "linear" else ("R", "W0", "Y", "mask")
    return sum(getattr(problem, a).nbytes for a in names if getattr(problem, a) is not None)


def assert_same_fit(got, want):
    assert got.status == want.status and got.steps == want.steps
    assert_bitwise(got.B, want.B, "B")
    assert_bitwise(got.A, want.A, "A")
    assert_bitwise(got.final_loss, want.final_loss, "final_loss")
    for name in lorakern.results.HISTORY_FIELDS:
        assert_bitwise(getattr(got.history, name), getattr(want.history, name), name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fitted", [False, True])
def test_problem_round_trip_fits_to_the_same_bits(case, dtype, fitted):
    problem, B, A = CASES[case](dtype)
    want = lorakern.fit(problem, B, A, steps=STEPS, device="cpu", step_size="theorem")
    if not fitted:
        problem, B, A = CASES[case](dtype)  # never fitted: no device cache, no Gram yet
    if fitted:  # what must stay behind is there: the device's data (with a lock), the Gram
        # or the moments
        assert problem._prepared
        assert problem.kind != "linear" or problem.norm_strategy in problem.__dict__
    blob = pickle.dumps(problem)
    back = pickle.loads(blob)
    assert type(back) is type(problem) and back.kind == problem.kind
    assert back.shape == problem.shape and back.dtype == problem.dtype
    assert back.loss == problem.loss and back.lipschitz == problem.lipschitz
    assert back._prepared == {} and not any(name in back.__dict__ for name in CACHE_NAMES)
    # the data travel: the pickle is the arrays' bytes and a little more, never the
    # device's copies (which would double it) nor the Gram
    assert data_bytes(problem) <= len(blob) <= data_bytes(problem) + 2048, (len(blob), data_bytes(problem))
    assert_same_fit(lorakern.fit(back, B, A, steps=STEPS, device="cpu", step_size="theorem"), want)
    # the original keeps working after it was pickled, and so do copies of it
    assert_same_fit(lorakern.fit(problem, B, A, steps=STEPS, device="cpu", step_size="theorem"), want)
    assert_same_fit(lorakern.fit(copy.deepcopy(problem), B, A, steps=STEPS, device="cpu", step_size="theorem"), want)



@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_pickle_drops_the_moments(dtype):
    """A linear problem whose exact norm used the moments (C0: 8 m n bytes, Sigma: 8 n^2)
    pickles to its data alone; the copy makes them again on its first exact pass, to the
    same bits, and fits as the original does."""
    N, n, m, r = 40, 64, 48, 4
    rng = np.random.default_rng([6, N, n, m, r])
    X, Y, W0 = random_linear_data(rng, N, n, m, dtype, loss="squared", w0_scale=1 / math.sqrt(n))
    B = (0.5 * rng.standard_normal((m, r))).astype(dtype)
    A = (0.5 * rng.standard_normal((r, n))).astype(dtype)
    problem = lorakern.LinearProblem(X, Y, W0, norm_strategy="moments")
    want = lorakern.fit(problem, B, A, steps=STEPS, device="cpu", step_size="theorem")
    C0, Sigma = problem.__dict__["moments"]
    blob = pickle.dumps(problem)
    assert len(blob) <= data_bytes(problem) + 2048 < data_bytes(problem) + C0.nbytes, len(blob)
    back = pickle.loads(blob)
    assert "moments" not in back.__dict__
    assert_same_fit(lorakern.fit(back, B, A, steps=STEPS, device="cpu", step_size="theorem"), want)
    assert_bitwise(back.__dict__["moments"][0], C0, "C0 remade")
    assert_bitwise(back.__dict__["moments"][1], Sigma, "Sigma remade")


def test_linear_pickle_from_before_the_norm_option():
    """A LinearProblem pickled before ``norm_strategy=`` existed (no ``_norm_forced`` in its
    state) comes back choosing by cost ("auto")."""
    problem, B, A = linear_case(np.float64, norm_strategy="auto")
    state = problem.__getstate__()
    del state["_norm_forced"]
    back = lorakern.LinearProblem.__new__(lorakern.LinearProblem)
    back.__setstate__(state)
    assert back.norm_strategy == problem.norm_strategy
    assert_same_fit(lorakern.fit(back, B, A, steps=STEPS, device="cpu", step_size="theorem"),
                    lorakern.fit(problem, B, A, steps=STEPS, device="cpu", step_size="theorem"))

def test_pickle_size_is_the_data():
    """A 300 x 200 float32 problem fitted once pickles to its residual's 240 000 bytes plus
    under 1 KB (the device's copy of the data and its workspace stay behind)."""
    problem, B, A = make_case((300, 200, 8), np.float32, seed=3)
    lorakern.fit(problem, B, A, steps=2, device="cpu", step_size="theorem")
    blob = pickle.dumps(problem)
    assert problem.R.nbytes == 300 * 200 * 4
    assert problem.R.nbytes < len(blob) < problem.R.nbytes + 1024, len(blob)


def test_fit_result_keeps_no_problem():
    """A FitResult keeps the problem's W0 where the problem has one (for merged()) and
    nothing else of it: dropping the problem frees its data and what a device prepared,
    and the result pickles to its iterate and history, not to the problem's data."""
    problem, B, A = make_case((300, 200, 8), np.float32, seed=3)
    result = lorakern.fit(problem, B, A, steps=2, device="cpu", step_size="theorem")
    assert result.W0 is None  # the squared loss keeps only W0 - Y
    blob = pickle.dumps(result)
    iterate = result.B.nbytes + result.A.nbytes
    assert iterate < len(blob) < iterate + 4096, (len(blob), iterate, problem.R.nbytes)
    alive = weakref.ref(problem)
    del problem
    gc.collect()
    assert alive() is None, "a FitResult kept its problem (and its m x n data) alive"

    problem, B, A = matrix_case(np.float64, "logistic", seed=1)
    result = lorakern.fit(problem, B, A, steps=2, device="cpu", step_size="theorem")
    assert result.W0 is problem.W0  # the problem's own array, not a copy
    back = pickle.loads(pickle.dumps(result))
    assert_bitwise(back.merged(), result.merged(), "merged after a round trip")


@pytest.mark.parametrize("policy", [lorakern.Theorem(), lorakern.Theorem(constant=4.0, norm="bound"),
                                    lorakern.Constant(0.02), lorakern.Armijo(cap=0.5, c=1e-3)],
                         ids=lambda p: type(p).__name__)
def test_policies_round_trip(policy):
    back = pickle.loads(pickle.dumps(policy))
    assert back == policy and type(back) is type(policy)
    assert back.decrease == policy.decrease and back.norm == policy.norm
    problem, B, A = matrix_case(np.float64)
    assert_same_fit(lorakern.fit(problem, B, A, steps=4, device="cpu", step_size=back),
                    lorakern.fit(problem, B, A, steps=4, device="cpu", step_size=policy))


def test_losses_round_trip():
    """A registered loss travels as its name and comes back as the registered object (so a
    problem's pickle does not carry the loss's parsed body); another travels by value."""
    from lorakern.losses import LINEAR_LOSSES, LOSSES, Loss

    for loss in LINEAR_LOSSES.values():
        loss.uses_delta  # parses and caches the body of an entrywise loss
        blob = pickle.dumps(loss)
        assert pickle.loads(blob) is loss and len(blob) < 100
    mine = Loss("mine", 2.0, False, LOSSES["squared"].body)
    back = pickle.loads(pickle.dumps(mine))
    assert back == mine and back.scalar_source("f") == mine.scalar_source("f")


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_round_trip(dtype):
    problem, B, A = matrix_case(dtype, "huber", seed=4)
    s = lorakern.step(problem, B, A, device="cpu", step_size="theorem")
    back = pickle.loads(pickle.dumps(s))
    assert isinstance(back, lorakern.StepResult)
    assert_bitwise(back.B, s.B, "B")
    assert_bitwise(back.A, s.A, "A")
    assert (back.eta, back.loss, back.grad_sq, back.v_sq, back.g_norm, back.trials) == (
        s.eta, s.loss, s.grad_sq, s.v_sq, s.g_norm, s.trials)

    result = lorakern.fit(problem, B, A, steps=STEPS, device="cpu", step_size="armijo")
    h = pickle.loads(pickle.dumps(result.history))
    assert isinstance(h, lorakern.History) and len(h) == STEPS
    assert h.dtype == np.dtype(dtype) and h.lipschitz == result.history.lipschitz
    back = pickle.loads(pickle.dumps(result))
    assert isinstance(back, lorakern.FitResult) and back.step_size == result.step_size
    assert back.seconds == result.seconds
    assert_same_fit(back, result)
    assert lorakern.theory.check(back).all_hold
    assert np.array_equal(lorakern.theory.check(back).lemma2_slack,
                          lorakern.theory.check(result).lemma2_slack)


def test_spawned_pool_fits_to_the_same_bits():
    """Four problems fitted by two spawned processes (each imports lorakern afresh and
    receives the problems pickled) equal the same fits done here, bit for bit."""
    cases = [CASES["matrix-squared"](np.float32), CASES["matrix-logistic-masked"](np.float64),
             CASES["linear-squared"](np.float64), CASES["linear-cross_entropy"](np.float32)]
    serial = [lorakern.fit(p, B, A, steps=STEPS, device="cpu", step_size="theorem") for p, B, A in cases]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(lorakern.fit, p, B, A, steps=STEPS, device="cpu", step_size="theorem")
                   for p, B, A in cases]
        pooled = [f.result(timeout=120) for f in futures]
    for got, want in zip(pooled, serial):
        assert_same_fit(got, want)


def test_dask_problem_refuses_to_pickle_clearly():
    """A Problem on dask arrays holds futures of one client: pickling it is a TypeError that
    says what to do instead, not a socket error from deep inside distributed."""
    da = pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(5)
    W0, Y = rng.standard_normal((40, 24)), rng.standard_normal((40, 24))
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        problem = lorakern.Problem(da.from_array(W0, chunks=(20, 24)), da.from_array(Y, chunks=(20, 24)))
        with pytest.raises(TypeError, match="Problem on dask arrays does not pickle.*compute"):
            pickle.dumps(problem)
