"""The CUDA kernels on the host: a test device that runs fused.cu without a GPU.

``HostRuntime`` has the interface of ``launch.CupyRuntime`` (module, kernel, occupancy,
launch, to_host, xp, sm_count, max_smem_per_block, supports_graphs). It compiles a module's
source with g++ behind ``emulation.h`` (each CUDA thread a fiber switched at ``__syncthreads``,
cp.async copies that land only at their wait, shared memory poisoned with NaN before every
block, barriers checked) and works on NumPy arrays. ``device()`` is a CudaDevice on it: the
whole CUDA path (launcher, plans, kernels, run_steps) on a machine without a GPU. It is for
tests: not in the user-facing device table, and slow (a barrier switches 256 fibers), so
small shapes only.

A kernel that misbehaves fails with ``EmulationError`` naming what went wrong (threads at
different barriers, a thread that never reaches its barrier, a misaligned cp.async, __trap(),
a warp collective called from a divergent warp or with a mask that leaves out a calling lane,
a .tf32 mma operand that was never converted) instead of hanging.

Its arrays are ``DeviceArray``s (``HostRuntime.xp``, a NumPy namespace whose results are
DeviceArrays): like CuPy arrays they refuse to be filled from, or combined with, a host NumPy
array, and kernels take only them, so host/device mix-ups fail here as they fail on a GPU.
``HostRuntime(mma_rounding="rn" | "rz" | "aligned")`` picks how an emulated mma (warp.cuh) adds
its exact products: the exact sum rounded to nearest even or toward zero, or every term first
aligned to the largest one's exponent and truncated there (the format's bits below its leading
bit), then summed and truncated: how tensor cores are reported to add (Fasi, Higham, Mikaitis
and Pranesh 2021, "Numerical behavior of NVIDIA tensor cores"). The PTX ISA leaves it open, so
the accuracy tests run under all three. ``HostRuntime(block_order=
"forward" | "reverse")`` picks the order the blocks of a grid run in: a cross-block race (a block
reading what another writes in the same launch) gives different bits under the two. ``tf32_rna`` and
``split_tf32`` are NumPy models of warp.cuh's conversion and 3xTF32 split. ``HostRuntime(flags=["-fsanitize=thread"])`` builds ThreadSanitizer
modules (load them into a process started with ``LD_PRELOAD=$(g++ -print-file-name=libtsan.so)``;
``ci/emulation_tsan.py`` does).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .._dispatch import DeviceUnavailableError
from . import launch

#: g++ flags of every module and of the runtime: C++17 (fold expressions), threads, and no
#: contraction of a * b + c into an fma the kernel did not ask for (results would differ from
#: the GPU's, which contracts only where fused.cu says fma_rn)
FLAGS = ("-std=c++17", "-O1", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-w")
#: seconds a CUDA thread may run without reaching a barrier (or the end of the kernel) before
#: the launch fails
TIMEOUT = float(os.environ.get("LORAKERN_EMULATION_TIMEOUT", "5"))


#: HostRuntime(mma_rounding=...): the emulated mma's rounding of its exact sum
MMA_ROUNDING = {"rn": 0, "rz": 1, "aligned": 2}
#: HostRuntime(block_order=...): the order the blocks of a grid run in, one after another
BLOCK_ORDERS = {"forward": 0, "reverse": 1}


class EmulationError(RuntimeError):
    """An emulated kernel did something a GPU would hang on, trap on, or get wrong."""


def compiler() -> str | None:
    """The g++ the emulation builds with (``$CXX`` if set), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def header() -> str:
    return resources.files(__package__).joinpath("emulation.h").read_text()


# ---- the device's arrays --------------------------------------------------------------------
#: CuPy's message when a host array is assigned into a device array (cupy/_core/core.pyx)
HOST_INTO_DEVICE = "non-scalar numpy.ndarray cannot be used for fill"


class DeviceArray(np.ndarray):
    """An array "on the emulated device": a NumPy array that refuses, as a CuPy array does,
    to be filled from a non-scalar host array (``d[...] = numpy_array`` raises CuPy's
    ``ValueError: non-scalar numpy.ndarray cannot be used for fill``) and to be combined with
    one in an elementwise operation (CuPy: ``TypeError: Unsupported type``). Host data reaches
    the device through ``xp.asarray`` / ``xp.array`` (a copy), and leaves it through
    ``HostRuntime.to_host``, as with CuPy."""

    def get(self):
        """A host (NumPy) copy, as cupy.ndarray.get()."""
        return np.array(self, copy=True).view(np.ndarray)

    def __setitem__(self, key, value):
        if _is_host_array(value):
            raise ValueError(HOST_INTO_DEVICE)
        super().__setitem__(key, value)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        for x in (*inputs, *kwargs.get("out", ())):
            if _is_host_array(x):
                raise TypeError(f"Unsupported type {type(x)} (a host numpy.ndarray in the device "
                                f"operation {ufunc.__name__}; copy it with xp.asarray first)")
        inputs = tuple(x.view(np.ndarray) if isinstance(x, DeviceArray) else x for x in inputs)
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(x.view(np.ndarray) for x in out)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if out is not None:  # NumPy's convention: the out arrays themselves
            return out[0] if len(out) == 1 else out
        return _to_device(result)


def _is_host_array(x) -> bool:
    """A NumPy array that is not on the (emulated) device, and not 0-d (CuPy takes those as
    scalars)."""
    return isinstance(x, np.ndarray) and not isinstance(x, DeviceArray) and x.ndim > 0


def _to_device(x):
    if isinstance(x, tuple):
        return tuple(_to_device(v) for v in x)
    if type(x) is np.ndarray:
        return x.view(DeviceArray)
    return x


class DeviceNumpy:
    """The emulated device's array namespace (``HostRuntime.xp``): NumPy, whose functions
    return DeviceArrays. ``asarray``/``array``/``ascontiguousarray`` of a host array copy it
    (a new device array, as with CuPy), so that host and device never share memory."""

    ndarray = DeviceArray

    def __getattr__(self, name):
        value = getattr(np, name)
        if callable(value) and not isinstance(value, type):
            def on_device(*args, **kwargs):
                return _to_device(value(*args, **kwargs))
            on_device.__name__ = name
            return on_device
        return value

    @staticmethod
    def array(x, dtype=None, copy=True, order="K", **kwargs):
        return np.array(x, dtype=dtype, copy=True, order=order, **kwargs).view(DeviceArray)

    @staticmethod
    def asarray(x, dtype=None, order=None):
        if isinstance(x, DeviceArray):
            return np.asarray(x, dtype=dtype, order=order).view(DeviceArray)
        return np.array(x, dtype=dtype, order=order or "K", copy=True).view(DeviceArray)

    @staticmethod
    def ascontiguousarray(x, dtype=None):
        if isinstance(x, DeviceArray):
            return np.ascontiguousarray(x, dtype=dtype).view(DeviceArray)
        return np.array(x, dtype=dtype, order="C", copy=True).view(DeviceArray)

    @staticmethod
    def asnumpy(x):
        return np.array(x, copy=True).view(np.ndarray)

    def __repr__(self):
        return "<the emulated device's array namespace (NumPy, DeviceArray results)>"


XP = DeviceNumpy()


class HostRuntime:
    """launch.py's runtime interface, with the kernels compiled by g++ for the host.

    Parameters
    ----------
    flags : extra g++ flags for the modules (e.g. ``["-fsanitize=thread", "-g"]``, or
        ``["-O0", "-g"]`` to debug a kernel); also read from ``$LORAKERN_EMULATION_FLAGS``.
    timeout : seconds a CUDA thread may run without reaching a barrier before the launch fails.
    cache : where built modules are kept (keyed by a digest of source and flags).
    mma_rounding : how an emulated mma (warp.cuh) adds its exact products: "rn" (the exact sum
        to nearest even), "rz" (toward zero) or "aligned" (each term truncated at the largest
        one's last bit, then the sum truncated). The PTX ISA does not say; accuracy tests run
        under all three.
    block_order : "forward" (blocks 0, 1, ...) or "reverse": the blocks of a grid run one after
        another, so a kernel whose block reads what another block of the same launch writes
        gives different results under the two; tests require the same bits under both.
    """

    name = "host-emulation"
    supports_graphs = False
    xp = XP
    #: a small "GPU": 3 multiprocessors, one block each, so that default plans have a few blocks
    sm_count = 3
    max_smem_per_block = 227 * 1024

    def __init__(self, *, flags=(), timeout: float | None = None, cache: Path | None = None,
                 mma_rounding: str = "rn", block_order: str = "forward"):
        from_env = os.environ.get("LORAKERN_EMULATION_FLAGS", "").split()
        if mma_rounding not in MMA_ROUNDING:
            raise ValueError(f"mma_rounding must be one of {sorted(MMA_ROUNDING)}, got {mma_rounding!r}")
        self.mma_rounding = mma_rounding
        if block_order not in BLOCK_ORDERS:
            raise ValueError(f"block_order must be one of {sorted(BLOCK_ORDERS)}, got {block_order!r}")
        self.block_order = block_order
        self.flags = (*FLAGS, *flags, *from_env)
        self.timeout = TIMEOUT if timeout is None else float(timeout)
        self.cache = Path(cache or Path(tempfile.gettempdir()) / "lorakern-cuda-emulation")
        self._modules: dict = {}
        self._runtime_library: Path | None = None
        self._dll = None

    def __repr__(self):
        return (f"HostRuntime(flags={self.flags[len(FLAGS):]!r}, timeout={self.timeout}, "
                f"mma_rounding={self.mma_rounding!r}, block_order={self.block_order!r})")

    def check_available(self):
        if compiler() is None:
            raise DeviceUnavailableError("the CUDA host emulation needs g++ (C++17), which was not found")

    # ---- modules and kernels
    def module(self, code: str, names: tuple[str, ...]):
        key = (code, tuple(names))
        if key not in self._modules:
            self._modules[key] = self._build(code, tuple(names))
        return self._modules[key]

    def source(self, code: str, names: tuple[str, ...]) -> str:
        """The translation unit of a module: emulation.h's declarations, the code (fused.cu's
        lines named as such in messages), and a launch and a signature function per name."""
        # compiler messages, barrier and mma sites in the kernel files' own line numbers
        code = _with_line_markers(code, (("fused_common.cuh", launch.common_source()),
                                         ("fused.cu", launch.kernel_source()),
                                         ("fused_mma.cu", launch.mma_kernel_source())))
        wrappers = "\n".join(
            f'extern "C" int emu_kernel_{i}(unsigned g, unsigned b, unsigned s, void** a, double t) '
            f"{{ return lk_emu::launch_kernel(&{name}, g, b, s, a, t); }}\n"
            f'extern "C" int emu_signature_{i}(char* k, int* s) {{ return lk_emu::signature(&{name}, k, s); }}'
            for i, name in enumerate(names))
        return (f'#line 1 "emulation.h"\n{header()}\n#line 1 "module"\n{code}\n'
                f'#line 1 "wrappers"\n{wrappers}\n'
                f'extern "C" const char* emu_error() {{ return lk_emu::last_error(); }}\n')

    def _compile(self, source: str, flags, extra=()) -> Path:
        """g++ source -> a shared library in the cache (named by a digest of source and flags)."""
        gxx = compiler()
        if gxx is None:
            self.check_available()
        flags = list(flags)
        digest = hashlib.sha256((source + "\0" + " ".join([*flags, *extra])).encode()).hexdigest()[:24]
        self.cache.mkdir(parents=True, exist_ok=True)
        lib = self.cache / f"{digest}.so"
        if not lib.exists():
            src = self.cache / f"{digest}.cpp"
            src.write_text(source)
            tmp = self.cache / f"{digest}.{os.getpid()}.so"
            # libraries after the source: with --as-needed, one before it would be dropped
            proc = subprocess.run([gxx, *flags, str(src), *extra, "-o", str(tmp)], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                raise EmulationError(f"g++ failed to build {src}:\n{proc.stderr[-6000:]}")
            tmp.replace(lib)
        return lib

    @property
    def runtime_library(self) -> Path:
        """emulation.h's runtime (fibers, barriers, copies, the launcher): built once, with the
        base flags only. It is never instrumented: under ThreadSanitizer it tells TSan about
        its fibers and barriers through TSan's interface instead."""
        if self._runtime_library is None:
            source = f'#define LORAKERN_EMULATION_RUNTIME 1\n#line 1 "emulation.h"\n{header()}\n'
            self._runtime_library = self._compile(source, FLAGS)
        return self._runtime_library

    @property
    def _runtime_dll(self):
        """The runtime library as loaded (the modules link to it by path: the same copy)."""
        if self._dll is None:
            self._dll = ctypes.CDLL(str(self.runtime_library))
        return self._dll

    def _build(self, code, names):
        runtime = self.runtime_library
        # linked by full path (DT_NEEDED names it), so the module finds this very runtime
        lib = self._compile(self.source(code, names), self.flags, extra=(str(runtime),))
        dll = ctypes.CDLL(str(lib))
        dll.emu_error.restype = ctypes.c_char_p
        functions = {}
        for i, name in enumerate(names):
            f = getattr(dll, f"emu_kernel_{i}")
            f.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p),
                          ctypes.c_double]
            f.restype = ctypes.c_int
            kinds, sizes = ctypes.create_string_buffer(64), (ctypes.c_int * 64)()
            count = getattr(dll, f"emu_signature_{i}")(kinds, sizes)
            functions[name] = SimpleNamespace(
                call=f, name=name, error=dll.emu_error,
                signature=[(kinds.raw[j:j + 1].decode(), sizes[j]) for j in range(count)])
        return SimpleNamespace(dll=dll, path=lib, functions=functions)

    def kernel(self, module, name: str, smem: int):
        return module.functions[name]

    def occupancy(self, kernel, smem: int) -> int:
        return 1

    # ---- launches
    def launch(self, kernel, grid: int, args, smem: int = 0, *, block: int = launch.NT):
        """Run the kernel; arguments marshalled as CuPy would, each checked against the kernel's
        parameter types (a wrong integer width would pass here by luck and break on the GPU)."""
        if len(args) != len(kernel.signature):
            raise TypeError(f"{kernel.name}: {len(args)} arguments for {len(kernel.signature)} parameters")
        keep, pointers = [], []
        for i, (a, (kind, size)) in enumerate(zip(args, kernel.signature)):
            where = f"{kernel.name} argument {i}"
            if isinstance(a, np.ndarray):
                if not isinstance(a, DeviceArray):  # CuPy: TypeError, Unsupported type
                    raise TypeError(f"{where}: a host numpy.ndarray (kernels take device arrays)")
                if kind != "p":
                    raise TypeError(f"{where}: an array for a {kind!r} parameter")
                if not a.flags.c_contiguous:
                    raise ValueError(f"{where}: kernels take C-contiguous arrays")
                value = np.array(a.ctypes.data, dtype=np.uint64)
            elif isinstance(a, np.generic):
                if kind == "p":
                    if not (a.dtype == np.uint64 and a == 0):
                        raise TypeError(f"{where}: a pointer must be an array or null")
                elif (a.dtype.kind == "f") != (kind == "f") or a.dtype.itemsize != size:
                    what = "float" if kind == "f" else "integer"
                    raise TypeError(f"{where}: {a.dtype} for a {size}-byte {what}")
                value = np.array(a)
            else:
                raise TypeError(f"{where}: {type(a).__name__} (kernels take arrays and NumPy scalars)")
            keep.append(value)
            pointers.append(value.ctypes.data)
        argv = (ctypes.c_void_p * len(pointers))(*pointers)
        self._runtime_dll.emu_set_mma_rounding(MMA_ROUNDING[self.mma_rounding])
        self._runtime_dll.emu_set_block_order(BLOCK_ORDERS[self.block_order])
        if kernel.call(int(grid), int(block), int(smem), argv, self.timeout) != 0:
            raise EmulationError(f"{kernel.name}: {kernel.error().decode()}")

    @staticmethod
    def to_host(x):
        """A host copy of a device array (cupy.asnumpy); anything else unchanged."""
        return XP.asnumpy(x) if isinstance(x, DeviceArray) else x


def _with_line_markers(code: str, files) -> str:
    """`code` with #line markers around each (name, text) of `files` found in it: their lines
    named "name:N", the rest "module:N" (line N of `code`)."""
    found = sorted((code.find(text), name, text) for name, text in files if code.find(text) >= 0)
    out, prev = [], 0
    for at, name, text in found:
        if at < prev:  # overlapping (one file's text inside another's): leave it unmarked
            continue
        end = at + len(text)
        after = code[:end].count("\n") + 1  # the line of `code` that goes on after the file
        out += [code[prev:at], f'\n#line 1 "{name}"\n', text, f'\n#line {after} "module"\n']
        prev = end
    out.append(code[prev:])
    return "".join(out)


# ---- NumPy models of the warp-level conversions (warp.cuh), for tests and GPU probes -------------
def tf32_rna_bits(x) -> np.ndarray:
    """cvt.rna.tf32.f32 on float32 values, as uint32 bits (warp.cuh's tf32_rna_model): round to
    nearest, ties away from zero, to 10 mantissa bits; inf kept, NaN -> 0x7fffffff."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    special = (bits & 0x7F800000) == 0x7F800000
    rounded = ((bits.astype(np.uint64) + 0x1000) & 0xFFFFE000).astype(np.uint32)
    nan = (bits & 0x007FFFFF) != 0
    return np.where(special, np.where(nan, np.uint32(0x7FFFFFFF), bits), rounded).astype(np.uint32)


def tf32_rna(x) -> np.ndarray:
    """cvt.rna.tf32.f32 as float32 values."""
    return tf32_rna_bits(x).view(np.float32)


def split_tf32(x) -> tuple[np.ndarray, np.ndarray]:
    """3xTF32's split (warp.cuh's split_tf32): big = tf32(x), small = tf32(x - big)."""
    x = np.asarray(x, dtype=np.float32)
    big = tf32_rna(x)
    return big, tf32_rna(x - big)


def available() -> bool:
    """True where the emulation can build (g++ found)."""
    return compiler() is not None


@lru_cache(maxsize=None)
def device():
    """The emulated CUDA device (one per process): CudaDevice("cuda-emulated") on HostRuntime."""
    from . import CudaDevice

    return CudaDevice("cuda-emulated", runtime=HostRuntime())
