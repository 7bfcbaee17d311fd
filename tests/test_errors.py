"""Bad input (issue 2 "Bad input", issue 4 validation): each case raises at once, the right
type (ValueError for shapes and values, TypeError for dtypes), a message naming the
argument, and every input left as it was."""
from __future__ import annotations

import math

import numpy as np
import pytest

import lorakern
from lorakern import reference

from helpers import DEVICES, assert_bitwise, random_data

M, N, R = 7, 13, 3


def arrays():
    """Fresh valid inputs: W0, Y (fp64), labels (+-1), mask, B, A."""
    W0, Y, mask = random_data((M, N), np.float64, seed=60, masked=True)
    _, labels, _ = random_data((M, N), np.float64, loss="logistic", seed=60)
    B, A = lorakern.init_adapters(M, N, R, dtype=np.float64, seed=60, init="gaussian")
    return dict(W0=W0, Y=Y, labels=labels, mask=mask, B=B, A=A)


def _with(d, name, value):
    """Pass ``value`` as an input of the case, and remember its state before the call."""
    d["made"].append((name, value, value.copy()))
    return value


def _nan_at(x, value=np.nan):
    x = x.copy()
    x.flat[x.size // 2] = value
    return x


P = lorakern.Problem  # short names for the table
step, fit = lorakern.step, lorakern.fit

CASES = {
    # -- Problem: shapes, dtypes, values ---------------------------------------------------
    "W0/Y shapes": (lambda d: P(d["W0"], _with(d, "Y2", d["Y"][:, :-1].copy())), ValueError, "Y has shape"),
    "W0 1-D": (lambda d: P(_with(d, "v", d["W0"][0].copy()), d["Y"][0].copy()), ValueError, "W0 must be 2-D"),
    "W0 3-D": (lambda d: P(_with(d, "v", d["W0"][None].copy()), d["Y"][None].copy()), ValueError, "W0 must be 2-D"),
    "Y 1-D": (lambda d: P(d["W0"], _with(d, "v", d["Y"].ravel().copy())), ValueError, "Y must be 2-D"),
    "W0 int": (lambda d: P(_with(d, "v", d["W0"].astype(np.int64)), d["Y"]), TypeError, "W0 must be float32 or float64"),
    "W0 float16": (lambda d: P(_with(d, "v", d["W0"].astype(np.float16)), d["Y"]), TypeError, "W0 must be float32"),
    "W0 complex": (lambda d: P(_with(d, "v", d["W0"].astype(complex)), d["Y"]), TypeError, "W0 must be float32"),
    "W0 list": (lambda d: P(d["W0"].tolist(), d["Y"]), TypeError, r"W0 is a Python list; .*np\.asarray\(W0, dtype=np\.float32\)"),
    "mixed dtypes": (lambda d: P(d["W0"], _with(d, "v", d["Y"].astype(np.float32))), TypeError, "Y has dtype float32"),
    "W0 NaN": (lambda d: P(_with(d, "v", _nan_at(d["W0"])), d["Y"]), ValueError, "W0 contains NaN or inf"),
    "W0 inf": (lambda d: P(_with(d, "v", _nan_at(d["W0"], np.inf)), d["Y"]), ValueError, "W0 contains NaN or inf"),
    "Y NaN": (lambda d: P(d["W0"], _with(d, "v", _nan_at(d["Y"]))), ValueError, "Y contains NaN or inf"),
    "Y -inf": (lambda d: P(d["W0"], _with(d, "v", _nan_at(d["Y"], -np.inf))), ValueError, "Y contains NaN or inf"),
    "empty": (lambda d: P(np.zeros((0, 3)), np.zeros((0, 3))), ValueError, "non-empty"),
    "lipschitz 0": (lambda d: P(d["W0"], d["Y"], lipschitz=0.0), ValueError, "lipschitz must be positive"),
    "lipschitz < 0": (lambda d: P(d["W0"], d["Y"], lipschitz=-1.0), ValueError, "lipschitz must be positive"),
    "lipschitz nan": (lambda d: P(d["W0"], d["Y"], lipschitz=math.nan), ValueError, "lipschitz must be positive"),
    "lipschitz inf": (lambda d: P(d["W0"], d["Y"], lipschitz=math.inf), ValueError, "lipschitz must be positive"),
    "lipschitz str": (lambda d: P(d["W0"], d["Y"], lipschitz="big"), TypeError, "lipschitz must be a real number"),
    "unknown loss": (lambda d: P(d["W0"], d["Y"], loss="hinge"), ValueError, "unknown loss 'hinge'"),
    "delta 0": (lambda d: P(d["W0"], d["Y"], loss="huber", delta=0.0), ValueError, "delta must be positive"),
    "delta < 0": (lambda d: P(d["W0"], d["Y"], loss="huber", delta=-0.5), ValueError, "delta must be positive"),
    "delta nan": (lambda d: P(d["W0"], d["Y"], loss="huber", delta=math.nan), ValueError, "delta must be positive"),
    "labels not +-1": (lambda d: P(d["W0"], d["Y"], loss="logistic"), ValueError, "labels Y in"),
    "labels 0/1": (lambda d: P(d["W0"], _with(d, "v", (d["labels"] > 0).astype(np.float64)), loss="logistic"),
                   ValueError, "labels Y in"),
    "mask shape": (lambda d: P(d["W0"], d["Y"], mask=_with(d, "v", d["mask"][:, :-1].copy())), ValueError, "mask has shape"),
    "mask transposed": (lambda d: P(d["W0"], d["Y"], mask=_with(d, "v", d["mask"].T.copy())), ValueError, "mask has shape"),
    "mask float": (lambda d: P(d["W0"], d["Y"], mask=_with(d, "v", d["mask"].astype(np.float64))), TypeError, "mask must be a boolean"),
    "mask int": (lambda d: P(d["W0"], d["Y"], mask=_with(d, "v", d["mask"].astype(np.int8))), TypeError, "mask must be a boolean"),
    "mask list": (lambda d: P(d["W0"], d["Y"], mask=d["mask"].tolist()), TypeError, r"mask is a Python list; .*np\.asarray\(mask, dtype=bool\)"),
    # -- step / fit: adapters ----------------------------------------------------------------
    "B rows": (lambda d: step(P(d["W0"], d["Y"]), _with(d, "v", d["B"][:-1].copy()), d["A"]), ValueError, "B must have m = 7 rows"),
    "A cols": (lambda d: step(P(d["W0"], d["Y"]), d["B"], _with(d, "v", d["A"][:, :-1].copy())), ValueError, "A must have n = 13 columns"),
    "rank mismatch": (lambda d: step(P(d["W0"], d["Y"]), d["B"], _with(d, "v", d["A"][:-1].copy())), ValueError, "ranks differ"),
    "rank 0": (lambda d: step(P(d["W0"], d["Y"]), np.zeros((M, 0)), np.zeros((0, N))), ValueError, "rank"),
    "B 1-D": (lambda d: step(P(d["W0"], d["Y"]), d["B"].ravel(), d["A"]), ValueError, "B must be 2-D"),
    "A 3-D": (lambda d: step(P(d["W0"], d["Y"]), d["B"], d["A"][None]), ValueError, "A must be 2-D"),
    "B float32": (lambda d: step(P(d["W0"], d["Y"]), _with(d, "v", d["B"].astype(np.float32)), d["A"]), TypeError, "B has dtype float32"),
    "A int": (lambda d: step(P(d["W0"], d["Y"]), d["B"], _with(d, "v", d["A"].astype(np.int32))), TypeError, "A must be float32"),
    "B NaN": (lambda d: step(P(d["W0"], d["Y"]), _with(d, "v", _nan_at(d["B"])), d["A"]), ValueError, "B contains NaN or inf"),
    "A inf": (lambda d: step(P(d["W0"], d["Y"]), d["B"], _with(d, "v", _nan_at(d["A"], np.inf))), ValueError, "A contains NaN or inf"),
    "problem not a Problem": (lambda d: step((d["W0"], d["Y"]), d["B"], d["A"]), TypeError, "problem must be a lorakern.Problem"),
    "fit B rows": (lambda d: fit(P(d["W0"], d["Y"]), d["B"][:-1], d["A"], steps=2), ValueError, "B must have m"),
    "fit A NaN": (lambda d: fit(P(d["W0"], d["Y"]), d["B"], _with(d, "v", _nan_at(d["A"])), steps=2), ValueError, "A contains NaN"),
    # -- step / fit: arguments ---------------------------------------------------------------
    "unknown device": (lambda d: step(P(d["W0"], d["Y"]), d["B"], d["A"], device="tpu"), ValueError, "unknown device 'tpu'"),
    "device not str": (lambda d: step(P(d["W0"], d["Y"]), d["B"], d["A"], device=0), TypeError, "device must be a string"),
    "fit unknown device": (lambda d: fit(P(d["W0"], d["Y"]), d["B"], d["A"], steps=2, device="gpu"), ValueError, "unknown device"),
    "steps < 0": (lambda d: fit(P(d["W0"], d["Y"]), d["B"], d["A"], steps=-1), ValueError, "steps must be >= 0"),
    "steps float": (lambda d: fit(P(d["W0"], d["Y"]), d["B"], d["A"], steps=2.0), TypeError, "steps must be an integer"),
    "steps bool": (lambda d: fit(P(d["W0"], d["Y"]), d["B"], d["A"], steps=True), TypeError, "steps must be an integer"),
    "steps None": (lambda d: fit(P(d["W0"], d["Y"]), d["B"], d["A"], steps=None), TypeError, "steps must be an integer"),
    "tol < 0": (lambda d: fit(P(d["W0"], d["Y"]), d["B"], d["A"], steps=2, tol=-1.0), ValueError, "tol must be"),
    "tol nan": (lambda d: fit(P(d["W0"], d["Y"]), d["B"], d["A"], steps=2, tol=math.nan), ValueError, "tol must be"),
    "unknown step_size": (lambda d: step(P(d["W0"], d["Y"]), d["B"], d["A"], step_size="fast"), ValueError, "unknown step_size 'fast'"),
    "negative constant step": (lambda d: step(P(d["W0"], d["Y"]), d["B"], d["A"], step_size=-0.1), ValueError, "step_size must be positive"),
    "fit negative step": (lambda d: fit(P(d["W0"], d["Y"]), d["B"], d["A"], steps=2, step_size=-1.0), ValueError, "step_size must be positive"),
    "reference B rows": (lambda d: reference.step(P(d["W0"], d["Y"]), d["B"][:-1], d["A"]), ValueError, "B must have m"),
    # -- init_adapters -------------------------------------------------------------------------
    "init rank 0": (lambda d: lorakern.init_adapters(M, N, 0), ValueError, "rank must be a positive integer"),
    "init m float": (lambda d: lorakern.init_adapters(7.0, N, 2), ValueError, "m must be a positive integer"),
    "init dtype int": (lambda d: lorakern.init_adapters(M, N, 2, dtype=np.int32), TypeError, "dtype must be float32"),
    "init unknown": (lambda d: lorakern.init_adapters(M, N, 2, init="kaiming"), ValueError, "unknown init"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises(case):
    call, error, match = CASES[case]
    d = arrays()
    snapshot = [(name, x, x.copy()) for name, x in d.items()]
    d["made"] = []  # inputs the case builds, with their state before the call
    with pytest.raises(error, match=match):
        call(d)
    for name, array, before in snapshot + d["made"]:
        assert_bitwise(array, before, f"{name} after the error")


def test_unknown_device_lists_the_known_ones():
    d = arrays()
    with pytest.raises(ValueError, match=r"known devices: .*'cpu'.*'cuda'"):
        step(P(d["W0"], d["Y"]), d["B"], d["A"], device="tpu")


@pytest.mark.skipif("cuda" in DEVICES, reason="a CUDA backend works here")
def test_cuda_unavailable_raises_device_error():
    """device='cuda' without a usable CUDA backend: DeviceUnavailableError saying what to do."""
    d = arrays()
    problem = P(d["W0"], d["Y"])
    with pytest.raises(lorakern.DeviceUnavailableError, match=r"(?i)cuda"):
        step(problem, d["B"], d["A"], device="cuda")
    with pytest.raises(lorakern.DeviceUnavailableError, match=r"(?i)cuda"):
        fit(problem, d["B"], d["A"], steps=2, device="cuda")
    assert issubclass(lorakern.DeviceUnavailableError, RuntimeError)
    assert "cuda" not in lorakern.devices() and "cpu" in lorakern.devices()
