"""The restructuring into kinds x devices (issue 8) kept every result's bits.

``data/golden_bits.json`` holds sha256 digests of fit results on fixed seeds, on the machine
named there: the reference device's computed by the code before the restructuring (commit
a4591c1); the CPU device's were too, then re-recorded when issue 11's CPU kernel changed how
it rounds (``recorded_by`` in the file says so). The same code on another CPU, NumPy or BLAS
may round differently, so there the test skips and says why.
"""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import numpy as np
import pytest

import lorakern

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_bits.json").read_text())

#: (m, n, r, dtype, loss, masked, seed, step_size)
CASES = [
    (37, 101, 5, np.float32, "squared", False, 0, "theorem"),
    (64, 48, 8, np.float64, "huber", True, 1, "armijo"),
    (33, 29, 3, np.float32, "logistic", True, 2, 0.05),
    (200, 130, 16, np.float64, "squared", False, 3, "theorem"),
]


def machine() -> str:
    """The CPU model, NumPy's version and, where the CPU has it, AVX-512: "AMD EPYC" names
    both the Zen 2 machine the digests were recorded on and a Zen 4 one, where OpenBLAS
    takes other kernels (SkylakeX) and LLVM vectorises the kernels' loops wider."""
    return f"{platform.machine()} {_cpu_model()} numpy {np.__version__}{' avx512f' * _has_avx512()}"


def _has_avx512() -> bool:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return "avx512f" in line.split()
    except OSError:
        pass
    return False


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def digest(device, m, n, r, dtype, loss, masked, seed, step_size) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((m, n)).astype(dtype)
    Y = (np.where(rng.random((m, n)) < .5, -1., 1.) if loss == "logistic"
         else W0 + rng.standard_normal((m, n))).astype(dtype)
    mask = rng.random((m, n)) < .7 if masked else None
    problem = lorakern.Problem(W0, Y, loss=loss, mask=mask,
                               **({"delta": 0.7} if loss == "huber" else {}))
    B, A = lorakern.init_adapters(m, n, r, dtype=dtype, seed=seed + 1, init="gaussian")
    res = lorakern.fit(problem, B, A, steps=6, device=device, step_size=step_size)
    h = hashlib.sha256()
    for x in (res.B, res.A, res.history.loss, res.history.eta, res.history.grad_sq,
              res.history.v_sq, res.history.g_norm, np.float64(res.final_loss)):
        h.update(np.ascontiguousarray(x).tobytes())
    key = (f"{device}/{m}x{n}x{r}/{np.dtype(dtype).name}/{loss}/"
           f"{'masked' if masked else 'dense'}/{step_size}")
    return key, h.hexdigest()[:32]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[4]}")
@pytest.mark.parametrize("device", ["reference", "cpu"])
def test_same_bits_as_before_the_restructuring(device, case, cpu_threads):
    if machine() != GOLDEN["machine"]:
        pytest.skip(f"digests were recorded on {GOLDEN['machine']}; this is {machine()}")
    if device == "cpu" and cpu_threads != GOLDEN["cpu_threads"]:
        pytest.skip(f"CPU digests were recorded with {GOLDEN['cpu_threads']} Numba threads")
    key, got = digest(device, *case)
    assert got == GOLDEN["digests"][key], f"{key}: the results' bits changed"
