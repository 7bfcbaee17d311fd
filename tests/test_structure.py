"""The two tables and their Protocols (issue 8): every registered entry conforms, a missing pair
says what exists, policies are objects with behaviour, and a user's own policy works."""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import numpy as np
import pytest

import lorakern
from lorakern import _dispatch, theory
from lorakern._dispatch import DEVICES, KERNELS, Device, Kernels
from lorakern.problems import ProblemKind
from lorakern.step_size import Armijo, Constant, StepSize, Theorem

from helpers import make_case


def missing(obj, protocol) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks, looked up without running properties
    (isinstance on a runtime_checkable Protocol would evaluate CudaDevice.xp: import CuPy)."""
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n in vars(protocol) if not n.startswith("_")}
    return sorted(n for n in names if inspect.getattr_static(obj, n, _ABSENT) is _ABSENT)


_ABSENT = object()


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_every_device_conforms(name):
    module, _, attr = DEVICES[name].partition(":")
    dev = getattr(importlib.import_module(module), attr)  # no availability check: CUDA too
    assert not missing(dev, Device), f"{name}: {type(dev).__name__} lacks {missing(dev, Device)}"
    assert dev.name == name
    assert any(device == dev.kernels_name for _, device in KERNELS), f"{name} has no kernels"


@pytest.mark.parametrize("pair", sorted(KERNELS), ids=lambda p: "-".join(p))
def test_every_kernels_entry_conforms(pair):
    module = importlib.import_module(KERNELS[pair])
    assert not missing(module, Kernels), f"{KERNELS[pair]} lacks {missing(module, Kernels)}"


def test_problem_kinds_conform():
    problem, _, _ = make_case((5, 4, 2), np.float64)
    assert not missing(problem, ProblemKind) and problem.kind == "matrix"


def test_missing_pair_names_what_exists(monkeypatch):
    problem, B, A = make_case((5, 4, 2), np.float64)
    monkeypatch.setattr(problem, "kind", "tensor", raising=False)
    monkeypatch.setitem(KERNELS, ("tensor", "reference"), "lorakern.reference.matrix")
    with pytest.raises(lorakern.DeviceUnavailableError, match=r"'tensor' has no kernels for device 'cpu'.*reference"):
        lorakern.step(problem, B, A, device="cpu", step_size="theorem")


def test_unknown_device_object_is_a_type_error():
    problem, B, A = make_case((5, 4, 2), np.float64)
    with pytest.raises(TypeError, match="device must be a string"):
        lorakern.step(problem, B, A, device=object(), step_size="theorem")


def test_problem_data_is_prepared_once_per_device():
    problem, B, A = make_case((6, 5, 2), np.float64)
    first = _dispatch.bind(problem, "cpu").data
    assert _dispatch.bind(problem, "cpu").data is first
    assert _dispatch.bind(problem, "reference").data is not first or first is None


@pytest.mark.parametrize("policy, decrease, host_loop", [
    (Theorem(), 0.2, False), (Constant(0.01), None, False), (Armijo(c=0.05), 0.05, True)])
def test_policies_say_what_they_need(policy, decrease, host_loop):
    assert isinstance(policy, StepSize)
    assert policy.decrease == decrease and policy.host_loop is host_loop
    problem, _, _ = make_case((5, 4, 2), np.float64)
    assert (policy.device_loop(problem) is None) == host_loop


@dataclass(frozen=True)
class HalfTheorem:
    """A user's policy: half the theorem's eta. Lemma 2's decrease still holds (smaller eta)."""

    decrease = 0.2
    host_loop = False
    norm = "exact"

    def choose(self, engine, B, A, p, state):
        eta, trials = lorakern.Theorem().choose(engine, B, A, p, state)
        state["calls"] = state.get("calls", 0) + 1
        return 0.5 * eta, trials

    def device_loop(self, problem):
        return None  # its eta is not one the device loop knows: fit runs on the host


@pytest.mark.parametrize("device", ["reference", "cpu"])
def test_user_defined_policy(device):
    problem, B, A = make_case((23, 17, 3), np.float64, seed=4)
    assert isinstance(HalfTheorem(), StepSize)
    half = lorakern.fit(problem, B, A, steps=8, device=device, step_size=HalfTheorem())
    full = lorakern.fit(problem, B, A, steps=8, device=device, step_size="theorem")
    assert half.step_size == HalfTheorem()
    np.testing.assert_allclose(half.history.eta[0], 0.5 * full.history.eta[0], rtol=1e-15)
    assert theory.check(half).all_hold
    one = lorakern.step(problem, B, A, device=device, step_size=HalfTheorem())
    np.testing.assert_allclose(one.eta, 0.5 * full.history.eta[0], rtol=1e-15)


@dataclass(frozen=True)
class HalfTheoremSubclass(Theorem):
    """A user's policy made by subclassing a built-in one: its own choose() is what runs."""

    def choose(self, engine, B, A, p, state):
        eta, trials = super().choose(engine, B, A, p, state)
        return 0.5 * eta, trials


def test_reference_step_runs_a_subclass_policy_own_choose():
    """reference.step writes the built-in policies out literally; a subclass of one may
    override choose(), so it is not taken for the built-in (it halved nothing before)."""
    problem, B, A = make_case((23, 17, 3), np.float64, seed=4)
    full = lorakern.reference.step(problem, B, A).eta
    got = lorakern.reference.step(problem, B, A, step_size=HalfTheoremSubclass())
    want = lorakern.step(problem, B, A, device="reference", step_size=HalfTheoremSubclass())
    assert got.eta == want.eta == 0.5 * full


@pytest.mark.parametrize("device", ["reference", "cpu"])
def test_theory_check_reads_the_armijo_constant(device):
    """The issue's reproduction: an Armijo run checked with c = 1/5 'failed' 10 of 30 steps."""
    problem, B, A = make_case((9, 11, 2), np.float64, seed=0)
    result = lorakern.fit(problem, B, A, steps=30, device=device, step_size=Armijo(c=1e-4))
    report = theory.check(result)
    assert report.all_hold, report.summary()
    strict = theory.check(result, decrease=0.2)  # Lemma 2's 1/5 is not what Armijo guarantees
    assert not strict.lemma2.all(), "the check at c = 1/5 can fail: the default must be c"


def test_the_conformance_check_can_fail():
    import types

    assert missing(object(), Device)
    half = types.SimpleNamespace(prepare=None, fused_pass=None)  # no loss_pass
    assert missing(half, Kernels) == ["loss_pass"]


@pytest.mark.parametrize("pair", sorted(_dispatch.WRAPPED_PROBLEMS), ids=lambda p: "-".join(p))
def test_every_wrapped_problem_entry_conforms(pair):
    """A WRAPPED_PROBLEMS row: a callable, for a kind with kernels and a library in WRAPPERS."""
    kind, library = pair
    assert callable(_dispatch._load(_dispatch.WRAPPED_PROBLEMS[pair]))
    assert library in _dispatch.WRAPPERS
    assert any(k == kind for k, _ in KERNELS), f"{kind} has no kernels"


def test_wrapped_problem_for_a_kind_without_a_row():
    """A kind the table cannot build from dask arrays says which kinds it can."""
    da = pytest.importorskip("dask.array")
    x = da.ones((4, 3), chunks=2)
    assert _dispatch.wrapped_problem("matrix", np.ones((4, 3))) is None
    assert callable(_dispatch.wrapped_problem("matrix", x))
    with pytest.raises(TypeError, match="'tensor' problem cannot be built from dask.*matrix"):
        _dispatch.wrapped_problem("tensor", np.ones((4, 3)), x)
