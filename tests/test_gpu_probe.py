"""benchmarks/gpu_probe.py, the next GPU session's script, run on the host emulation: its
kernels (warp.cuh + gpu_probe.cu) and its verdicts, so that the GPU's minutes are not spent on
a bug of the script. Its exact-rounding model (Python fractions) and the emulation's (emulation.h's
fixed-point sum) are two implementations of one definition; they must agree under every policy.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lorakern._cuda import emulation

pytestmark = pytest.mark.skipif(not emulation.available(), reason="g++ not found")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("gpu_probe", ROOT / "benchmarks" / "gpu_probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_probe"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("policy", ["rn", "rz", "aligned"])
def test_probe_finds_the_emulations_accumulation(probe, policy):
    """The probe's models (Python fractions) and the emulation's (emulation.h's fixed-point
    sums): one definition each, the same bits on every output; the other models differ on
    some of the random tiles' outputs, so the probe tells them apart."""
    dev = probe.Device(True, mma_rounding=policy)
    result = probe.probe_mma(dev, tiles=2)
    for kind in ("tf32", "f64"):
        assert result[kind]["layout_on_integers"] == "exact"
        assert result[kind]["accumulation"] == policy, result
        assert result[kind]["mismatches"][policy] == 0, result
        assert all(n > 0 for p, n in result[kind]["mismatches"].items() if p != policy), result


def test_probe_reports_neither(probe, monkeypatch):
    """Hardware unlike every model: "neither", with the counts, and the table shows them."""
    dev = probe.Device(True, mma_rounding="rn")
    real = probe.mma_models
    monkeypatch.setattr(probe, "mma_models", lambda A, B, C, bits: {
        model: out * (1 + 2.0**-20) for model, out in real(A, B, C, bits).items()})  # off in fp32 too
    result = probe.probe_mma(dev, tiles=1)
    for kind in ("tf32", "f64"):
        assert result[kind]["accumulation"] == "neither", result
        assert min(result[kind]["mismatches"].values()) > 0, result


def test_aligned_truncate(probe):
    # 1 + 2^-24 + 2^-30: the largest term 1, its 24 bits end at 2^-23: both small terms dropped
    assert probe.aligned_truncate([1.0, 2.0**-24, 2.0**-30], 24) == 1.0
    # exact sum 1 + 2^-23 (RZ keeps it); aligned: each half truncated away first
    assert probe.exact_round([1.0, 2.0**-24, 2.0**-24], 24, "rz") == 1 + 2.0**-23
    assert probe.aligned_truncate([1.0, 2.0**-24, 2.0**-24], 24) == 1.0
    # negative terms truncate toward zero too: -(2^-24 + 2^-40) -> 0 at 1's alignment
    assert probe.aligned_truncate([1.0, -(2.0**-24 + 2.0**-40)], 24) == 1.0
    assert probe.exact_round([1.0, -(2.0**-24 + 2.0**-40)], 24, "rz") == 1 - 2.0**-23


def test_probe_cvt_on_the_emulation(probe):
    result = probe.probe_cvt(probe.Device(True), count=2**13, start=0x7F7FF000)  # up to the NaNs
    assert result["verdict"] == "bit-exact" and result["mismatches"] == 0, result


def test_cvt_verdicts(probe):
    """A mismatch on subnormal inputs only (the GPU's -ftz=true) is told from a rounding error."""
    sub = ["0x00001000 -> 0x00000000 (expected 0x00002000)"]
    assert probe.verdict_cvt(0, 0, [], 0, True) == "bit-exact"
    assert probe.verdict_cvt(50, 0, sub, 50, True).startswith("bit-exact on normal inputs; 50")
    assert probe.verdict_cvt(51, 0, sub, 50, True) == "DIFFERS"  # one normal input differs
    assert probe.verdict_cvt(50, 0, ["0x3f801000 -> 0x3f800000 (expected 0x3f802000)"], 50, True) == "DIFFERS"
    assert probe.verdict_cvt(50, 0, sub, 50, False) == "DIFFERS"  # not the whole range: unknown
    assert probe.verdict_cvt(0, 1, [], 0, True) == "DIFFERS"


def test_exact_round(probe):
    from fractions import Fraction

    assert probe.exact_round([1.0, 2.0**-24], 24, "rn") == 1.0  # a tie: to even
    assert probe.exact_round([1.0, 2.0**-24, 2.0**-40], 24, "rn") == 1 + 2.0**-23
    assert probe.exact_round([1.0, 2.0**-24, 2.0**-40], 24, "rz") == 1.0
    assert probe.exact_round([-1.0, -(2.0**-24), -(2.0**-40)], 24, "rz") == -1.0
    assert probe.exact_round([Fraction(1, 3)], 53, "rn") == 1 / 3


def test_selftest_and_table(probe, tmp_path):
    """The whole calibrate path on the emulation, and the table of a made-up timing."""
    results = probe.calibrate(tmp_path, emulated=True)
    assert not [k for k, v in results.items() if isinstance(v, dict) and "error" in v], results
    floor = {"floor_ms": 0.065, "memory_ms": 0.065, "compute_ms": 0.059}
    (tmp_path / "timing.json").write_text(json.dumps(
        {"steps": 200, "rows": {
            "8192 r16 float32": {"ms_per_step": 0.46, "loss_last": 2.0, "floor": floor,
                                 "mma": {"ms_per_step": 0.13, "loss_last": 2.0 + 2e-6, "stages": 3},
                                 "mma_2_stages": {"ms_per_step": 0.15},
                                 "mma_128x64": {"ms_per_step": 0.11, "tile": "128x64"}},
            "8192 r64 float32": {"ms_per_step": 2.0, "floor": floor, "mma": {"error": "Traceback"}},
            "8192 r4 float32": {"ms_per_step": 0.3, "floor": floor},
            "seconds": {"8192 r16 float32": 12.5}}}))  # section() records each row's time here
    (tmp_path / "linear.json").write_text(json.dumps(
        {"rows": {"8192 4096 r16 float32 squared": {
            "strategy": "moments", "exact": {"ms_per_step": 0.5, "min": 0.49, "max": 0.52},
            "errors": {"loss": 1e-8, "g_sq": 3e-7, "grad_B": 2e-7, "grad_A": 1e-7, "tolerance": 1e-4,
                       "verdict": "ok"},
            "bound": {"ms_per_step": 0.25, "min": 0.24, "max": 0.3},
            "torch": {"ms_per_step": 11.0, "min": 10.9, "max": 11.2}},
            "8192 4096 r16 float32 huber": {"error": "Traceback"},
            "seconds": {"8192 4096 r16 float32 squared": 20.0}}}))
    text = probe.table(tmp_path)
    assert "| 8192 | 16 | float32 | 0.460 | 0.130 | 0.065 (0.065 / 0.059) | 14 % | 50 % | 3.54x | 1.0e-06 |" in text
    assert "| 8192 | 64 | float32 | 2.000 | error |" in text
    assert "| 8192 | 4 | float32 | 0.300 | - |" in text
    assert ("| 8192 | 4096 | 16 | float32 | squared | moments | 0.500 (0.490-0.520) | 0.250 (0.240-0.300) "
            "| 11.000 (10.900-11.200) | 22.0x | 44.0x | ok (max 3.0e-07) |") in text
    assert "| 8192 | 4096 | 16 | float32 | huber | error |" in text
    assert "- 8192 r16 float32: 3 stages 0.130 ms, 2 stages 0.150 ms" in text
    assert "- 8192 r16 float32: 64x64 0.130 ms, 128x64 0.110 ms" in text
    assert "cvt.rna.tf32 over 16384 inputs: bit-exact" in text
    calib = {"bandwidth": {"a": {"best_tb_per_s": 4.0}, "copy": {"best_tb_per_s": 9.0}},
             "rates": {"tf32": {"best_tflops": 300.0}, "f64": {"best_tflops": 60.0}}}
    floor = probe.floor_ms(8192, 16, "float32", calib)
    assert floor["memory_ms"] == pytest.approx((8192**2 + 6 * 8192 * 16) * 4 / 4e12 * 1e3, abs=1e-4)
    assert floor["compute_ms"] == pytest.approx(6 * 8192**2 * 16 / 100e12 * 1e3, abs=1e-4)


def test_timing_path_on_the_emulated_device(probe):
    """time_row's path (problem, binding, run_steps with NumPy adapters) on the emulated device."""
    result = probe.time_row(37, 3, "float32", device=emulation.device(), steps=2)
    assert result["ms_per_step"] > 0 and len(result["all"]) == 3
    both = probe.time_both(37, 3, "float32", {}, device=emulation.device(), steps=2)
    assert both["kernel"] == "simt" and both["mma"]["kernel"] == "mma", both
    assert both["mma"]["loss_last"] == pytest.approx(both["loss_last"], rel=1e-5)
    two = probe.time_row(37, 3, "float32", device=emulation.device(), steps=2, kernel="mma", stages=(2,))
    assert two["stages"] == 2 and both["mma"]["stages"] == 3, (two, both)
    wide = probe.time_row(150, 3, "float32", device=emulation.device(), steps=2, kernel="mma", tiles=((128, 64),))
    assert wide["tile"] == "128x64" and both["mma"]["tile"] == "64x64", (wide, both)
    probe._ENGINES.clear()


@pytest.mark.parametrize("loss", ["squared", "huber"])
def test_linear_path_on_the_emulated_device(probe, loss):
    """time_linear's path (data, binding, exact and bound host loops) on the emulated device."""
    result = probe.time_linear(40, 12, 3, "float32", loss, device=emulation.device(), steps=2, rounds=1)
    assert result["strategy"] in (("moments",) if loss == "squared" else ("gram", "tiles")), result
    for norm in ("exact", "bound"):
        assert result[norm]["ms_per_step"] > 0 and result[norm]["loss_last"] > 0, result
    assert "torch" not in result  # the PyTorch peer runs on a GPU only
    assert result["errors"]["verdict"] == "ok", result["errors"]


def test_sanitize_linear_on_the_emulated_device(probe, capsys):
    """The linear cases compute-sanitizer runs (GPU_SANITIZE=1), on the emulated device."""
    probe.sanitize_linear(emulation.device())
    assert capsys.readouterr().out.count(": ok") == 4
