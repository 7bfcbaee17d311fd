"""Every device in helpers.DEVICES (devices(), and the CUDA kernels in the host emulation)
against the NumPy reference, squared loss (issue 2).

Other losses and masks: test_losses.py. Tolerances: lorakern.testing.RTOL, relative to the scale of
each quantity.
"""
from __future__ import annotations

import numpy as np
import pytest

import lorakern
from lorakern import reference

from helpers import (device_pass, DEVICES, DTYPES, assert_bitwise, assert_close, compare_pass, compare_step,
                      host, make_case, random_data)

#: odd shapes (m, n, r): 1x1x1 up to primes; none a multiple of the tile (16 patched, 64+)
SHAPES = [(1, 1, 1), (2, 3, 1), (7, 13, 3), (37, 101, 5), (257, 263, 17), (131, 67, 64)]
#: "a few thousand": one shape, default tiles only, to keep CI time reasonable
BIG = (2053, 1031, 16)


@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device, dtype, shape, tiles, request):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    problem, B, A = make_case(shape, dtype, seed=sum(shape), device=device)
    compare_pass(problem, B, A, device)
    compare_step(problem, B, A, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_few_thousand(device, dtype):
    problem, B, A = make_case(BIG, dtype, seed=7, device=device)
    compare_pass(problem, B, A, device)
    compare_step(problem, B, A, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("device", DEVICES)
def test_lora_init_b_zero(device, dtype, small_tiles):
    """B = 0 as LoRA starts: grad_A = B^T G = 0 exactly, grad_B = G A^T is not."""
    problem, B, A = make_case((37, 101, 5), dtype, seed=3, init="lora", device=device)
    assert not B.any() and A.any()
    compare_pass(problem, B, A, device)
    got, _ = compare_step(problem, B, A, device)
    p = device_pass(problem, device, B, A)
    assert not host(p.grad_A).any() and host(p.grad_B).any()
    assert_bitwise(host(got.A), A, "A after a step from B = 0")  # A moves by eta * 0


@pytest.mark.parametrize("lipschitz", [0.3, 7.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("device", DEVICES)
def test_lipschitz_below_and_above_one(device, dtype, lipschitz, small_tiles):
    problem, B, A = make_case((37, 101, 5), dtype, seed=4, lipschitz=lipschitz, device=device)
    got, _ = compare_step(problem, B, A, device)
    # eta uses max(L, 1): L = 0.3 gives the L = 1 step, L = 7 a seventh of it (eta < 1 here)
    one = lorakern.step(lorakern.Problem(problem.R, np.zeros_like(problem.R)), B, A, device=device, step_size="theorem")
    assert one.eta < 1
    assert_close(got.eta, one.eta / max(lipschitz, 1.0), dtype, "eta")


@pytest.mark.parametrize("eta", [1e-3, 0.05])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("device", DEVICES)
def test_constant_step_size(device, dtype, eta, small_tiles):
    problem, B, A = make_case((37, 101, 5), dtype, seed=5, device=device)
    got, _ = compare_step(problem, B, A, device, step_size=eta)
    assert got.eta == eta


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("device", DEVICES)
def test_armijo_step(device, dtype, small_tiles):
    """One Armijo step from the same cap: the same number of trials and the same eta."""
    problem, B, A = make_case((37, 101, 5), dtype, seed=6, device=device)
    got, want = compare_step(problem, B, A, device, step_size=lorakern.Armijo(cap=4.0, c=0.1))
    assert got.trials == want.trials >= 2  # cap 4 is too long here: it backtracks


def _noncontiguous(x, order_f):
    """The same values as a Fortran-order copy or a strided view into a larger array."""
    if order_f:
        out = np.asfortranarray(x)
        assert not out.flags.c_contiguous or x.shape[0] == 1 or x.shape[1] == 1
        return out
    big = np.full((2 * x.shape[0] + 1, 3 * x.shape[1] + 2), np.nan, x.dtype)
    view = big[1::2, 2::3]
    view[...] = x
    assert not view.flags.c_contiguous and not view.flags.f_contiguous
    return view


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(device, dtype, small_tiles):
    """Fortran-order W0 and A, strided views of Y and B: the results of contiguous inputs."""
    _, B, A = make_case((37, 101, 5), dtype, seed=8, device=device)
    W0, Y, _ = random_data((37, 101), dtype, seed=8)
    nc = lorakern.Problem(_noncontiguous(W0, True), _noncontiguous(Y, False))
    Bn, An = _noncontiguous(B, False), _noncontiguous(A, True)
    got = lorakern.step(nc, Bn, An, device=device, step_size="theorem")
    want = lorakern.step(lorakern.Problem(W0, Y), B, A, device=device, step_size="theorem")
    assert_bitwise(host(got.B), host(want.B), "B")
    assert_bitwise(host(got.A), host(want.A), "A")
    assert (got.eta, got.loss, got.grad_sq, got.v_sq) == (want.eta, want.loss, want.grad_sq, want.v_sq)
    compare_step(nc, Bn, An, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device, dtype):
    """The same inputs give the same bits on every call (same thread count)."""
    problem, B, A = make_case((257, 263, 17), dtype, seed=9, device=device)
    runs = [device_pass(problem, device, B, A)
            for _ in range(2)]
    assert_bitwise(host(runs[0].grad_B), host(runs[1].grad_B), "grad_B")
    assert_bitwise(host(runs[0].grad_A), host(runs[1].grad_A), "grad_A")
    for name in ("loss", "g_sq", "grad_sq", "v_sq"):
        assert float(getattr(runs[0], name)) == float(getattr(runs[1], name)), name
    s1, s2 = (lorakern.step(problem, B, A, device=device, step_size="theorem") for _ in range(2))
    assert_bitwise(host(s1.B), host(s2.B), "B")
    assert_bitwise(host(s1.A), host(s2.A), "A")
    assert s1.eta == s2.eta


def test_auto_device_is_cpu_for_numpy():
    problem, B, A = make_case((7, 13, 3), np.float64, seed=10)
    auto = lorakern.step(problem, B, A, device="auto", step_size="theorem")
    cpu = lorakern.step(problem, B, A, device="cpu", step_size="theorem")
    assert type(auto.B) is np.ndarray
    assert_bitwise(auto.B, cpu.B, "B")
    assert_bitwise(auto.A, cpu.A, "A")


def test_reference_device_is_reference_step():
    """device='reference' (the generic step on the reference backend) == reference.step."""
    problem, B, A = make_case((7, 13, 3), np.float64, seed=11)
    got = lorakern.step(problem, B, A, device="reference", step_size="theorem")
    want = reference.step(problem, B, A)
    assert_close(got.eta, want.eta, np.float64, "eta")
    assert_close(got.B, want.B, np.float64, "B")
    assert_close(got.A, want.A, np.float64, "A")
