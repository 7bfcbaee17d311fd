"""A CPU step never imports CuPy or Dask; a missing CUDA backend is a clear error (STYLE.md)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lorakern

SCRIPT = """
import sys
import numpy as np
import lorakern

rng = np.random.default_rng(0)
W0, Y = rng.standard_normal((5, 6)), rng.standard_normal((5, 6))
B, A = lorakern.init_adapters(5, 6, 2, dtype=np.float64, seed=0, init="gaussian")
result = lorakern.step(lorakern.Problem(W0, Y), B, A, device="cpu")
assert np.isfinite(result.B).all()
assert "cupy" not in sys.modules, "a CPU step imported cupy"
for name in ("dask", "distributed", "torch", "jax", "pandas"):
    assert name not in sys.modules, f"a CPU step on NumPy arrays imported {name}"
problem = lorakern.LinearProblem(rng.standard_normal((7, 6)), rng.standard_normal((7, 5)), W0)
lorakern.fit(problem, B, A, steps=2, device="cpu")
lorakern.reference.step(problem, B, A)
for name in ("torch", "jax", "pandas"):
    assert name not in sys.modules, f"a CPU fit on NumPy arrays imported {name}"
found = lorakern.devices()
assert "cpu" in found
if "cuda" not in found:
    assert "cupy" not in sys.modules, "devices() imported cupy and found no CUDA"
print("ok", found)
"""


def test_cpu_step_does_not_import_cupy_dask_or_torch():
    root = str(Path(lorakern.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def test_import_lorakern_is_light():
    """Importing the package loads neither Numba's kernels nor CuPy nor torch."""
    code = ("import sys, lorakern; print('cupy' in sys.modules, 'lorakern._cpu' in sys.modules, "
            "'torch' in sys.modules)")
    root = str(Path(lorakern.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "False", "False"]


def test_public_api():
    for name in ("Problem", "step", "fit", "init_adapters", "devices", "DeviceUnavailableError",
                 "Theorem", "Constant", "Armijo", "reference", "theory"):
        assert hasattr(lorakern, name), name
    assert set(lorakern.__all__) <= set(dir(lorakern))
