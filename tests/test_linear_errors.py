"""Bad input to LinearProblem: a clear exception naming the argument, the inputs untouched."""
from __future__ import annotations

import numpy as np
import pytest

import lorakern
from lorakern.testing import random_linear_data


def _data(loss="squared", dtype=np.float32, N=6, n=5, m=4, seed=0):
    return random_linear_data(np.random.default_rng(seed), N, n, m, dtype, loss=loss)


def _with(data_loss="squared", **changes):
    """Arguments of LinearProblem with some replaced: changes maps X/Y/W0 to a function of
    the valid array, or gives a keyword argument."""
    X, Y, W0 = _data(data_loss)
    arrays = {"X": X, "Y": Y, "W0": W0}
    kwargs = {"loss": data_loss}
    for key, value in changes.items():
        if key in arrays:
            arrays[key] = value(arrays[key])
        else:
            kwargs[key] = value
    return (arrays["X"], arrays["Y"], arrays["W0"]), kwargs


def _nan_at(a):
    a = a.copy()
    a.flat[3] = np.nan
    return a


def _inf_at(a):
    a = a.copy()
    a.flat[1] = -np.inf
    return a


CASES = [
    # (id, loss, changes, exception, words the message must contain)
    ("rows-differ", "squared", {"Y": lambda Y: Y[:5]}, ValueError, ["Y has 5 rows", "X has 6"]),
    ("X-cols-vs-W0", "squared", {"W0": lambda W: W[:, :4]}, ValueError, ["W0 has 4 columns", "X has 5"]),
    ("Y-cols-vs-W0-rows", "squared", {"Y": lambda Y: Y[:, :3]}, ValueError, ["Y has 3 columns", "W0 has 4 rows"]),
    ("logistic-labels", "logistic", {"Y": lambda Y: Y * 0.5}, ValueError, ["labels Y in {-1, +1}"]),
    ("ce-out-of-range", "cross_entropy", {"Y": lambda Y: np.where(np.arange(6) == 2, 4, Y)},
     ValueError, ["outside [0, 4)", "W0.shape[0]"]),
    ("ce-negative", "cross_entropy", {"Y": lambda Y: np.where(np.arange(6) == 0, -1, Y)},
     ValueError, ["outside [0, 4)"]),
    ("ce-float-labels", "cross_entropy", {"Y": lambda Y: Y.astype(np.float32)}, TypeError,
     ["Y must hold integer class indices", "float32"]),
    ("ce-bool-labels", "cross_entropy", {"Y": lambda Y: Y > 1}, TypeError, ["Y must hold integer"]),
    ("ce-2d-labels", "cross_entropy", {"Y": lambda Y: Y[:, None]}, ValueError, ["Y must be 1-D"]),
    ("ce-count", "cross_entropy", {"Y": lambda Y: Y[:5]}, ValueError, ["Y has 5 labels", "X has 6 rows"]),
    ("ce-list", "cross_entropy", {"Y": lambda Y: Y.tolist()}, TypeError, ["Y is a Python list", "np.asarray(Y, dtype=np.int64)"]),
    ("X-nan", "squared", {"X": _nan_at}, ValueError, ["X contains NaN or inf"]),
    ("X-inf", "cross_entropy", {"X": _inf_at}, ValueError, ["X contains NaN or inf"]),
    ("W0-nan", "logistic", {"W0": _nan_at}, ValueError, ["W0 contains NaN or inf"]),
    ("Y-inf", "huber", {"Y": _inf_at}, ValueError, ["Y contains NaN or inf"]),
    ("mixed-W0", "squared", {"W0": lambda W: W.astype(np.float64)}, TypeError,
     ["W0 has dtype float64 but the problem is float32"]),
    ("mixed-Y", "huber", {"Y": lambda Y: Y.astype(np.float64)}, TypeError,
     ["Y has dtype float64 but the problem is float32"]),
    ("X-int", "squared", {"X": lambda X: X.astype(np.int32)}, TypeError, ["X must be float32 or float64"]),
    ("X-1d", "squared", {"X": lambda X: X[:, 0]}, ValueError, ["X must be 2-D"]),
    ("X-list", "squared", {"X": lambda X: X.tolist()}, TypeError, ["X is a Python list", "np.asarray(X, dtype=np.float32)"]),
    ("X-masked", "squared", {"X": lambda X: np.ma.masked_less(X, 0)}, TypeError, ["X is a NumPy masked array"]),
    ("X-empty", "squared", {"X": lambda X: X[:0], "Y": lambda Y: Y[:0]}, ValueError, ["must be non-empty"]),
    ("unknown-loss", "squared", {"loss": "hinge"}, ValueError, ["unknown loss 'hinge'", "cross_entropy"]),
    ("delta-without-huber", "squared", {"delta": 0.5}, ValueError, ["delta=0.5", "only huber"]),
    ("delta-zero", "huber", {"delta": 0.0}, ValueError, ["delta must be positive"]),
    ("delta-text", "huber", {"delta": "1"}, TypeError, ["delta must be a real number"]),
    ("lipschitz-negative", "squared", {"lipschitz": -1.0}, ValueError, ["lipschitz must be positive"]),
    ("lipschitz-nan", "logistic", {"lipschitz": float("nan")}, ValueError, ["lipschitz must be positive"]),
    ("norm-unknown", "squared", {"norm_strategy": "svd"}, ValueError,
     ["unknown norm_strategy 'svd'", "moments", "tiles"]),
    ("norm-moments-huber", "huber", {"norm_strategy": "moments"}, ValueError,
     ["norm_strategy='moments' needs the squared loss", "'huber'"]),
    ("norm-moments-ce", "cross_entropy", {"norm_strategy": "moments"}, ValueError,
     ["needs the squared loss"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(case):
    _, loss, changes, exc, words = case
    args, kwargs = _with(loss, **changes)
    before = [np.array(a, copy=True) if hasattr(a, "shape") else list(a) for a in args]
    with pytest.raises(exc) as info:
        lorakern.LinearProblem(*args, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    for a, b in zip(args, before):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # untouched


def test_overflowing_product_is_named_at_the_first_pass():
    """X W0^T that overflows float32 (finite inputs): ValueError naming it, on every device."""
    X, Y, W0 = _data()
    X = (X * 1e20).astype(np.float32)
    W0 = (W0 * 1e20).astype(np.float32)
    problem = lorakern.LinearProblem(X, Y, W0)
    B, A = lorakern.init_adapters(4, 5, 2, dtype=np.float32, seed=0, init="gaussian")
    for device in ("cpu",):
        with pytest.raises(ValueError, match=r"X W0\^T - Y overflows float32"):
            lorakern.step(problem, B, A, device=device)


@pytest.mark.parametrize("what, make, exc, words", [
    ("B-rows", lambda B, A: (B[:3], A), ValueError, ["B must have m = 4 rows"]),
    ("A-cols", lambda B, A: (B, A[:, :4]), ValueError, ["A must have n = 5 columns"]),
    ("ranks", lambda B, A: (B, A[:1]), ValueError, ["ranks differ"]),
    ("B-dtype", lambda B, A: (B.astype(np.float64), A), TypeError, ["B has dtype float64"]),
])
def test_bad_adapters(what, make, exc, words):
    X, Y, W0 = _data("cross_entropy")
    problem = lorakern.LinearProblem(X, Y, W0, loss="cross_entropy")
    B, A = make(*lorakern.init_adapters(4, 5, 2, dtype=np.float32, seed=1, init="gaussian"))
    copies = (B.copy(), A.copy())
    with pytest.raises(exc) as info:
        lorakern.step(problem, B, A, device="cpu")
    assert all(word in str(info.value) for word in words), str(info.value)
    np.testing.assert_array_equal(B, copies[0])
    np.testing.assert_array_equal(A, copies[1])


def test_matrix_kind_is_unchanged():
    """Cross-entropy is the linear kind's: the matrix Problem and LOSSES do not take it."""
    assert sorted(lorakern.LOSSES) == ["huber", "logistic", "squared"]
    W0 = np.random.default_rng(0).standard_normal((3, 4))
    with pytest.raises(ValueError, match="unknown loss 'cross_entropy'"):
        lorakern.Problem(W0, W0 + 1, loss="cross_entropy")
