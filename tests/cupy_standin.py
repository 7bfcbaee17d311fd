"""The real CuPy with its driver-level calls replaced, so that lorakern's loader runs through
CuPy's own compile and cache code (cupy/cuda/compiler.py, NVRTC) on a machine without a GPU.

Replaced, and nothing else:

* loading a cubin into a CUDA module (``function.Module.load``: the image is kept as bytes)
  and the per-device memo of the ``-arch`` option: ``precompile.compile_only``;
* the device: ``compiler._get_arch`` (its compute capability) and ``cupy.cuda.Device`` (id,
  attributes, compute_capability);
* ``cupy.RawModule``: ``StandInRawModule`` makes the call the real one makes
  (cupy/_core/raw.pyx, _get_raw_module: ``cupy._core.core.compile_with_cache(code, options,
  prepend_cupy_headers=False, ..., name_expressions=...)``) without its per-device memo, and
  hands out ``StandInKernel``s (function get: the mangled name must be in the cubin; launch:
  recorded).

tests/test_cuda_cupy.py checks these names and call shapes against the installed CuPy, so
that a removed or renamed function fails in CI, not on the GPU.
"""
from __future__ import annotations

ARCH = "90"  # the GPU the stand-in pretends to be (H100/H200: sm_90)
ATTRIBUTES = {"MultiProcessorCount": 132, "MaxSharedMemoryPerBlockOptin": 232448,
              "MaxSharedMemoryPerMultiprocessor": 233472, "MaxRegistersPerMultiprocessor": 65536,
              "MaxThreadsPerMultiProcessor": 2048}


class StandInKernel:
    """cupy.RawKernel's attributes that lorakern uses: num_regs, max_dynamic_shared_size_bytes,
    __call__(grid, block, args, *, shared_mem=0)."""

    num_regs = 128

    def __init__(self, name: str):
        self.name, self.calls = name, []
        self.max_dynamic_shared_size_bytes = 0

    def __call__(self, grid, block, args, *, shared_mem=0):
        self.calls.append((grid, block, args, shared_mem))


class StandInRawModule:
    """cupy.RawModule(code=None, *, options=(), name_expressions=None): compiled on first use
    through the real CuPy compile path; get_function(name expression or mangled name)."""

    def __init__(self, code=None, *, options=(), name_expressions=None):
        if not isinstance(options, tuple):  # the real one declares ``tuple options``
            raise TypeError(f"Argument 'options' has incorrect type (expected tuple, got {type(options).__name__})")
        self.code, self.options = code, options
        self.name_expressions = None if name_expressions is None else tuple(name_expressions)
        self._module = None

    @property
    def module(self):
        if self._module is None:
            from cupy._core import core

            self._module = core.compile_with_cache(self.code, self.options, prepend_cupy_headers=False,
                                                   name_expressions=self.name_expressions)
        return self._module

    def get_function(self, name: str):
        module = self.module
        if self.name_expressions is not None and name in self.name_expressions:
            name = module.mapping[name]
        if name.encode() not in getattr(module, "image", b""):
            raise RuntimeError(f"CUDA_ERROR_NOT_FOUND: named symbol not found ({name})")
        return StandInKernel(name)


class StandInDevice:
    """cupy.cuda.Device(): the current device's id, attributes and compute capability."""

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        self.attributes = dict(ATTRIBUTES)
        self.compute_capability = ARCH

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def install(setattr=setattr):
    """Replace the driver-level calls of the imported CuPy (``setattr``: monkeypatch.setattr
    in a test, so that they are put back after it; plain setattr in a child process)."""
    import cupy
    from cupy.cuda import compiler

    from lorakern._cuda import precompile

    precompile.compile_only(compiler, setattr)
    setattr(compiler, "_get_arch", lambda: ARCH)
    setattr(cupy, "RawModule", StandInRawModule)
    setattr(cupy.cuda, "Device", StandInDevice)
    return cupy


def nvrtc_counter(setattr=setattr) -> list:
    """Count NVRTC compiles of module sources from now on (precompile.count_nvrtc)."""
    from cupy.cuda import compiler

    from lorakern._cuda import precompile

    return precompile.count_nvrtc(compiler, setattr)
