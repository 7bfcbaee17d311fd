"""lorakern.benchmarking: the one implementation table checked against the reference, the
interleaved timing, and the one markdown writer (CPU tables, GPU tables, `lorakern bench`).

The timing tests use fake callables: they test the order, the rounds and the statistics,
never a speed.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lorakern import benchmarking
from lorakern.benchmarking import (COMPARISONS, Case, Row, Stats, check, interleaved, paired_ratio,
                                   ratio_table, records_markdown, unavailable)
from lorakern.testing import LinearCase, make_case

ROOT = Path(__file__).resolve().parents[1]
ODD = [(1, 1, 1), (37, 53, 5), (64, 33, 17)]


def _cpu_params():
    """Every CPU entry in both dtypes; the other losses and the mask in float64 only (their
    fp32 kernels are checked in test_losses, and each kernel costs a Numba compile)."""
    for name, impl in COMPARISONS.items():
        if impl.needs is None:
            plain = impl.loss == "squared" and not impl.masked
            for dtype in ("float32", "float64") if plain else ("float64",):
                yield pytest.param(name, dtype, id=f"{name}-{dtype}")


@pytest.mark.parametrize("shape", ODD, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name, dtype", list(_cpu_params()))
def test_every_cpu_implementation_matches_the_reference(name, dtype, shape):
    m, n, r = shape
    if COMPARISONS[name].kind == "linear":  # N samples of n features, a layer of m outputs
        case = LinearCase(m + n + 1, n, m, r, dtype, seed=sum(shape))
    else:
        case = Case(m, n, r, dtype, seed=sum(shape))
    check(name, case, COMPARISONS[name](case)())


def test_check_can_fail():
    case = Case(37, 53, 5, "float32", seed=1)
    B, A, eta = COMPARISONS["numpy"](case)()
    check("numpy", case, (B, A, eta))
    with pytest.raises(AssertionError, match="numpy: new B"):
        check("numpy", case, (B * np.float32(1 + 1e-3), A, eta))
    with pytest.raises(AssertionError, match="numpy: eta"):
        check("numpy", case, (B, A, eta * (1 + 1e-3)))
    with pytest.raises(AssertionError, match="dtype"):
        check("numpy", case, (B.astype(np.float64), A, eta))


def test_the_plain_step_written_once_serves_a_device_library():
    """The cupy and torch entries are the NumPy one's body over another library: emulate a
    library that keeps its scalars as 0-d arrays of the data's dtype (as cupy does) with NumPy."""

    def device_like(case):
        return SimpleNamespace(arrays=(case.R, case.B, case.A),
                               norm_sq=lambda x: np.linalg.norm(x) ** 2,   # np.float32 scalars
                               xp=np, cast=lambda eta, like: np.asarray(eta).astype(like.dtype))

    for dtype in ("float32", "float64"):
        case = Case(40, 31, 3, dtype, seed=2)
        out = benchmarking._plain(device_like)(case)()
        assert np.asarray(out[2]).dtype == np.dtype(dtype)
        check("numpy", case, out)


def test_gpu_entries_say_why_they_cannot_run():
    with pytest.raises(ValueError, match="unknown implementation 'nope'"):
        unavailable("nope")
    assert unavailable("numpy") is None and unavailable("lorakern-cpu") is None
    import lorakern

    if "cuda" in lorakern.devices():
        pytest.skip("this machine has a CUDA device")
    for name in ("lorakern-cuda", "lorakern-cuda-loop", "cupy"):
        assert "needs a CUDA device" in unavailable(name)
    with pytest.raises(ValueError, match="cupy needs a CUDA device"):
        benchmarking.table(sizes=((8, 8),), ranks=(1,), dtypes=("float32",), impls=("cupy",))


@pytest.mark.parametrize("name", ["torch", "torch-cpu"])
def test_torch_runs_on_the_cpu_without_a_gpu(name):
    """`lorakern bench --impls torch` on a CPU-only machine compares with PyTorch on the CPU:
    the plain step in torch, checked against the reference like every entry."""
    torch = pytest.importorskip("torch")
    import lorakern

    assert unavailable(name) is None
    for dtype in ("float32", "float64"):
        case = Case(40, 31, 3, dtype, seed=5)
        out = COMPARISONS[name](case)()
        if name == "torch-cpu" or "cuda" not in lorakern.devices() or not torch.cuda.is_available():
            assert out[0].device.type == "cpu"
        check(name, case, out)


def test_case_is_make_case():
    """One seeded factory: a benchmark Case holds make_case's problem and adapters."""
    case = Case(30, 20, 4, "float64", seed=7)
    for loss, masked in (("squared", False), ("logistic", True)):
        problem, B, A = make_case((30, 20, 4), np.float64, loss=loss, masked=masked, seed=7)
        got = case.problem(loss, masked)
        assert got.loss.name == loss and (got.mask is not None) == masked
        np.testing.assert_array_equal(got.base, problem.base)
        np.testing.assert_array_equal(case.B, B)
        np.testing.assert_array_equal(case.A, A)
    assert case.problem() is case.problem()  # built once
    assert case.B.any() and case.A.any()     # never all-zero data


# -- timing ------------------------------------------------------------------------------------

def _fakes(log):
    return {name: (lambda name=name: log.append(name)) for name in ("a", "b")}


def test_interleaved_alternates_and_warms_up():
    log = []
    times = interleaved(_fakes(log), rounds=3)
    assert log == ["a", "b"] * 4  # one warm-up call each, then 3 rounds a, b
    assert [len(t) for t in times.values()] == [3, 3]


def test_interleaved_takes_more_rounds_where_they_are_cheap():
    log = []
    times = interleaved(_fakes(log), budget_s=0.0)           # nothing to spare: the minimum
    assert len(times["a"]) == benchmarking.MIN_ROUNDS == 9
    times = interleaved(_fakes(log), budget_s=10.0, max_rounds=40)   # cheap calls: the maximum
    assert len(times["a"]) == len(times["b"]) == 40


def test_stats_and_paired_ratios():
    s = Stats.of([5, 1, 4, 2, 3])
    assert (s.median, s.q1, s.q3, s.lo, s.hi, s.rounds) == (3, 2, 4, 1, 5, 5)
    assert s.spread == pytest.approx(2 / 3)
    times = {"peer": [2.0, 4.0, 6.0], "x": [1.0, 1.0, 2.0]}
    r = paired_ratio(times, "peer", "x")   # round by round: 2, 4, 3
    assert (r.median, r.lo, r.hi) == (3.0, 2.0, 4.0)
    one = Stats.of([0.5])
    assert one.q1 == one.q3 == 0.5 and one.spread == 0


def test_ratio_table_marks_a_wide_spread():
    steady = {"peer": Stats.of([2.0] * 9), "x": Stats.of([1.0] * 9)}
    noisy = {"peer": Stats.of([2.0] * 9), "x": Stats.of([0.5, 0.6, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 4.0])}
    lines = ratio_table([Row(["steady"], steady), Row(["noisy"], noisy)], labels=["row"],
                        impls=["x", "peer"], peer="peer")
    text = "\n".join(lines)
    assert lines[0] == "| row | x (ms) | peer (ms) | peer / x | rounds |"
    assert "| steady | 1000 (1000-1000) | 2000 (2000-2000) | 2.00x (2.00-2.00) | 9/9 |" in text
    noisy_line = next(line for line in lines if line.startswith("| noisy"))
    assert noisy_line.split("|")[4].strip().endswith("!")
    assert "Wide spread (!)" in text
    # the other direction, and a missing implementation
    lines = ratio_table([Row(["r"], {"peer": Stats.of([2.0]), "x": Stats.of([1.0])}),
                         Row(["s"], {"peer": Stats.of([2.0])})],
                        labels=["row"], impls=["peer", "x"], peer="peer", direction="impl/peer")
    assert "| r | 2000 | 1000 | 0.50x (0.50-0.50) | 1/1 |" in lines
    assert "| s | 2000 | - | - | 1 |" in lines and not any("Wide" in line for line in lines)


def test_records_markdown_uses_the_round_by_round_ratios():
    records = [{"m": 8, "n": 8, "r": 2, "dtype": "float32",
                "times": {"lorakern-cpu": [1.0, 2.0, 1.0], "numpy": [2.0, 4.0, 3.0]}}]
    lines = records_markdown(records, ["lorakern-cpu"], "numpy")
    assert "| 8 | 8 | 2 | float32 | 1000 (1000-1500) | 3000 (2500-3500) | 2.00x (2.00-2.50) ! | 3/3 |" in lines
    assert "(of the round-by-round ratios)" in lines[-2]


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_table_uses_the_same_writer():
    gpu_table = _load(ROOT / "benchmarks" / "gpu_table.py")

    def bench(group, impl, ms, **info):
        return {"group": group, "name": impl, "stats": {"median": ms / 1e3, "rounds": 20},
                "extra_info": {"impl": impl, "event_ms_all": [ms] * 20, **info}}

    step = dict(m=8192, n=8192, r=16, dtype="float32")
    report = {"datetime": "2026-11-23", "benchmarks": [
        bench("cuda step m=n=8192 r=16 float32", "lorakern-cuda", 2.0, gpu="Test GPU", **step),
        bench("cuda step m=n=8192 r=16 float32", "cupy", 5.0, **step),
        bench("cuda fit 200 steps m=n=8192 r=16 float32", "fused_step x200", 400.0, steps=200),
        bench("cuda fit 200 steps m=n=8192 r=16 float32", "run_steps", 380.0, steps=200),
        {"group": "cuda floor", "name": "copy", "stats": {"median": 1.0},
         "extra_info": {"impl": "copy", "GB_per_s": 1000.0}},
        {"group": "cuda floor", "name": "fma", "stats": {"median": 1.0},
         "extra_info": {"impl": "fma", "TFLOP_per_s": 50.0}},
    ]}
    text = gpu_table.table(report)
    assert "GPU: Test GPU" in text
    # floor: max(8192^2 * 4 B / 1000 GB/s, 6 * 8192^2 * 16 / 50 TFLOP/s) = 0.268 ms; 13% of 2 ms
    assert "| m=n=8192 r=16 float32 | 2.00 (2.00-2.00) | - | 5.00 (5.00-5.00) | - | - | 2.50x (2.50-2.50) | - | 0.268 | 13% | 20/20 |" in text
    assert "| 200 steps m=n=8192 r=16 float32 | 400 (400-400) | 380 (380-380) | 0.95x (0.95-0.95) | 20/20 |" in text


def test_run_markdown_has_blocks_and_interleaved():
    run = _load(ROOT / "benchmarks" / "run.py")

    def bench(group, impl, median):
        return {"group": group, "name": impl, "extra_info": {"impl": impl},
                "stats": {"median": median, "q1": median * 0.9, "q3": median * 1.1,
                          "min": median * 0.8, "max": median * 1.3, "rounds": 7}}

    data = {"benchmarks": [bench("step m=n=64 r=2 float32", "lorakern-cpu", 0.001),
                           bench("step m=n=64 r=2 float32", "numpy", 0.003)],
            "lorakern_interleaved": {
                "command": "lorakern bench --m 64", "impls": ["lorakern-cpu"], "peer": "numpy",
                "rounds": "Rounds: 3",
                "records": [{"m": 64, "n": 64, "r": 2, "dtype": "float32",
                             "times": {"lorakern-cpu": [1e-3] * 3, "numpy": [3e-3] * 3}}]}}
    md = run.markdown(data, "a machine", "today", "cmd")
    assert "## step (blocks)" in md and "## step (interleaved: what a user sees)" in md
    # blocks: the ratio interval from the quartiles; interleaved: round by round
    assert "| m=n=64 r=2 float32 | 1.00 (0.900-1.10) | 3.00 (2.70-3.30) | 3.00x (2.45-3.67) ! | 7/7 |" in md
    assert "| 64 | 64 | 2 | float32 | 1.00 (1.00-1.00) | 3.00 (3.00-3.00) | 3.00x (3.00-3.00) | 3/3 |" in md
    assert math.isfinite(benchmarking.WIDE_SPREAD)


def test_linear_check_can_fail():
    case = LinearCase(40, 23, 17, 3, "float64", seed=2)
    B, A, eta = COMPARISONS["linear-numpy"](case)()
    check("linear-numpy", case, (B, A, eta))
    with pytest.raises(AssertionError, match="linear-numpy: new A"):
        check("linear-numpy", case, (B, A * (1 + 1e-9), eta))


def test_bench_refuses_another_kind():
    with pytest.raises(ValueError, match="linear kind"):
        benchmarking.table(sizes=(8,), ranks=(2,), dtypes=("float32",), impls=("linear-numpy",))
