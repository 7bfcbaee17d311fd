"""Compile, configure and launch the kernels of ``fused.cu``.

A ``Plan`` holds, for one problem and rank, the compiled kernels, the launch geometry and the
workspace the partial sums live in; it is made once and kept on the problem's device data.
Everything goes through the device's *runtime*: ``CupyRuntime`` (cupy.RawModule, CuPy arrays)
on a GPU, or the host emulation (``emulation.HostRuntime``: the same fused.cu compiled by g++,
a fiber per CUDA thread), so that this launcher, the kernels' index arithmetic, tails and
reductions are checked without a GPU.

Memory plan of one fused step (m x n data, rank r padded to RK, tiles BM x BN, a grid of
nrs x ncs blocks, each owning rpb x cpb tiles):

    read    R (or W0 and Y), the mask if any: once, 16-byte copies where rows are aligned
    write   gB_part  ncs x m_ld x RK    gA_part  nrs x RK x n_ld    (partial sums, dtype of data)
    read    the partials once more in the tail; write B and A (grad_B, grad_A too where asked)

so the DRAM traffic beyond one read of R is RK (ncs m + nrs n) elements each way: at
m = n = 8192, r = 16 on 132 SMs (11 x 12 blocks, one per SM) 12 MB each way next to R's 268 MB.
The tuning constants below are chosen on paper and by the compiler's register counts
(tests/test_cuda_compile.py prints them); they have not been timed on a GPU yet.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from functools import cached_property
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import numpy as np

NT = 256  # threads per block (fused.cu: NT)
#: ranks the kernels are compiled for; r is padded with zeros up to the next one
RANK_BOUNDS = (4, 8, 16, 32, 64, 128)
#: tile shapes (BM, BN) in order of preference; the first whose shared memory fits the budget
#: is used. 64 x 64 gives phase 1 sixteen entries per thread (4 FMAs per shared load).
TILES = ((64, 64), (32, 64), (32, 32))
#: shared memory a block may use; None: what the device allows (A100 163 KB, H100 227 KB)
SMEM_BUDGET: int | None = None
#: tiles per block along rows and columns; None: chosen so that one wave of blocks fills the
#: GPU (resident blocks per multiprocessor x multiprocessors). Tests patch them to 1 or 2 so
#: that small shapes cross many blocks.
ROWS_PER_BLOCK: int | None = None
COLS_PER_BLOCK: int | None = None
#: grid-stride kernels (tail, update) use at most this many blocks; a constant, so the
#: order of the norm sums does not depend on the GPU
MAX_SMALL_GRID = 1024
#: NVRTC options; name_expressions needs a C++ standard
OPTIONS = ("-std=c++17",)
#: the fused pass's kernel: "simt" (fused.cu's fused_pass, FMA on CUDA cores: the default) or
#: "mma" (fused_mma.cu's fused_pass_mma: tensor cores, 3xTF32 for fp32 and DMMA for fp64; correct
#: in the emulation, not yet timed on a GPU). Both fill the same partials, so the tail kernels and
#: matrix.py are shared. A Plan reads it when it is made (the plan cache key has it).
KERNELS = ("simt", "mma")
KERNEL = os.environ.get("LORAKERN_CUDA_KERNEL", "simt")
#: rank bounds of the mma kernel: its products take ranks 8 at a time
MMA_RANK_BOUNDS = (8, 16, 32, 64, 128)
#: copy stages of the mma kernel (tiles whose cp.async copies are in flight + 1), in order of
#: preference for each tile of TILES: 3 keeps two tiles' copies in flight per SM (the design's
#: Little's-law argument, cuda-floor.md), 2 is fused.cu's double buffer. Not yet timed on a GPU.
MMA_STAGES = (3, 2)

# ---- compiled once per machine: CuPy's disk cache -----------------------------------------
# NVRTC takes 1-2 s per module (one per dtype, loss, mask, rank bound and tile), so a module
# must be compiled once per machine, not once per process. CuPy keeps each compiled module in
# its kernel cache (``$CUPY_CACHE_DIR``, default ``~/.cupy/kernel_cache``; none when
# ``CUPY_CACHE_IN_MEMORY=1``) under a SHA-1 of the source, the options (CuPy adds
# ``-ftz=true`` and its include directories; 13.x also ``--device-as-default-execution-space``
# for NVRTC >= 12), the architecture, the NVRTC version and CuPy's header checksum. Our kernels
# are templates, named by name expressions, and the two CuPy versions differ there
# (cupy/cuda/compiler.py, _compile_with_cache_cuda):
#
# * CuPy >= 14 adds the sorted name expressions to the key and stores the mangled names in
#   the entry (``_encode_cache_payload``): a module made with name expressions is read from the
#   cache. We use that as it is (``native`` below).
# * CuPy 13 keys by source and options only and *never reads* the cache for a module made with
#   name expressions ("We force recompiling to retrieve C++ mangled names"). So the first
#   process compiles with the name expressions (CuPy writes the cubin) and records the mangled
#   names beside it (``lorakern-<digest>.names.json`` in CuPy's cache directory); every later
#   process loads the module *without* name expressions (a cache hit: same source, same
#   options) and looks the kernels up by their mangled names. A stale or missing entry (a
#   kernel not found) falls back to compiling with the name expressions.
#
# One fused.cu serves every rank, tile and mask of a loss (and update<T> the squared loss's
# source): on CuPy 13 those variants would share one cache key and overwrite each other's
# entry. So NVRTC is given ``keyed_source(code, names)``: the module's source with its name
# expressions appended as a comment, one key per variant on both versions.
#
# A hit needs the very same bytes in every process: module_source() and kernel_names() depend
# only on the kernel files, the loss's body and the arguments (no dict order, id(), path, time or
# float repr that could change), and OPTIONS is a constant; tests/test_cuda_cache.py checks
# it in two processes with different hash seeds and working directories, and
# tests/test_cuda_cupy.py runs the loader through the real CuPy 13 and 14 cache code.
# lorakern/_cuda/precompile.py fills the cache for a GPU run in parallel processes.


def module_digest(code: str, names) -> str:
    """A digest of everything NVRTC is given for one module (source, OPTIONS, names)."""
    h = hashlib.sha256()
    for part in (code, "\0".join(OPTIONS), "\0".join(names)):
        h.update(part.encode("utf-8"))
        h.update(b"\1")
    return h.hexdigest()


def keyed_source(code: str, names) -> str:
    """The source NVRTC compiles for a module: ``code`` with its name expressions appended as a
    comment, so that each variant has a cache key of its own (CuPy 13 keys by source only)."""
    return f"{code}\n// lorakern module: {'; '.join(names)}\n"


def caches_name_expressions(compiler) -> bool:
    """Whether this CuPy reads modules made with name expressions from its disk cache (CuPy
    >= 14: the entry holds the mangled names, cupy/cuda/compiler.py _encode_cache_payload).
    A feature probe, not a version test; where it errs (a later CuPy renames the helper) the
    names-file path below still loads correctly, at one extra compile per process."""
    return callable(getattr(compiler, "_encode_cache_payload", None))


def cupy_cache_dir(compiler) -> Path | None:
    """CuPy's kernel cache directory, or None where CuPy keeps none (CUPY_CACHE_IN_MEMORY) or
    it cannot be told: 13.x has compiler.get_cache_dir(); 14.x dropped it (its disk backend
    read $CUPY_CACHE_DIR, default ~/.cupy/kernel_cache, when cupy.cuda.compiler was imported)."""
    if os.environ.get("CUPY_CACHE_IN_MEMORY", "0") not in ("", "0"):
        return None
    try:
        get = getattr(compiler, "get_cache_dir", None)
        if callable(get):
            return Path(get())
        # 14.x: the disk backend made at import (it read $CUPY_CACHE_DIR then)
        backend_dir = getattr(getattr(compiler, "_kernel_cache_backend", None), "_cache_dir", None)
        if isinstance(backend_dir, str):
            return Path(backend_dir)
        return Path(os.environ.get("CUPY_CACHE_DIR") or os.path.expanduser("~/.cupy/kernel_cache"))
    except Exception:  # noqa: BLE001 - no cache directory: compile (the cache is an optimisation)
        return None


def names_path(cache_dir: Path | None, source: str, names) -> Path | None:
    """Where the mangled names of a module are kept beside CuPy 13's cubin (None: nowhere)."""
    if cache_dir is None:
        return None
    return cache_dir / f"lorakern-{module_digest(source, names)[:32]}.names.json"


def read_names(path: Path | None, names) -> dict | None:
    """The mangled names recorded at ``path`` for every name expression, or None (no file, a
    partial or unreadable one)."""
    if path is None:
        return None
    try:
        mangled = json.loads(path.read_text())
        if isinstance(mangled, dict) and all(isinstance(mangled.get(n), str) for n in names):
            return {n: mangled[n] for n in names}
    except (OSError, ValueError):
        pass
    return None


def write_names(path: Path | None, mangled: dict) -> None:
    """Record the mangled names (atomically: a temporary file renamed); a read-only or missing
    cache directory records nothing (later processes then compile, as before)."""
    if path is None:
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(mangled, indent=0, sort_keys=True))
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def count_entries(cache_dir: Path | None) -> int | None:
    """Files in CuPy's cache directory (to tell a compile, which adds one, from a hit)."""
    try:
        return None if cache_dir is None else sum(1 for _ in os.scandir(cache_dir))
    except OSError:
        return None


class CachedModule:
    """A cupy.RawModule made without name expressions, with their mangled names beside it
    (the interface launch.py uses: get_function by name expression)."""

    def __init__(self, raw, mangled: dict):
        self.raw, self.mangled = raw, mangled

    def get_function(self, name: str):
        return self.raw.get_function(self.mangled[name])


class CupyRuntime:
    """Kernels compiled by NVRTC through cupy.RawModule, launched on CuPy's current stream."""

    name = "cupy"
    supports_graphs = True

    def __init__(self):
        import cupy
        from cupy.cuda import compiler

        self.xp = cupy
        self._modules: dict = {}
        #: modules loaded from CuPy's disk cache / compiled by NVRTC in this process (where CuPy
        #: caches name expressions itself: told apart by a new file in its cache directory)
        self.cache_hits = self.compiles = 0
        self._stream = None
        self.native = caches_name_expressions(compiler)
        self._compiler = compiler

    @property
    def cache_dir(self) -> Path | None:
        return cupy_cache_dir(self._compiler)

    @cached_property
    def _attributes(self):
        return self.xp.cuda.Device().attributes

    @property
    def sm_count(self) -> int:
        return int(self._attributes["MultiProcessorCount"])

    @property
    def max_smem_per_block(self) -> int:
        return int(self._attributes["MaxSharedMemoryPerBlockOptin"])

    def module(self, code: str, names: tuple[str, ...]):
        key = (code, names, self.xp.cuda.Device().id)
        if key not in self._modules:
            self._modules[key] = self._load(code, tuple(names))
        return self._modules[key]

    def names_file(self, code: str, names) -> Path | None:
        """Where the mangled names of this module are kept (CuPy 13: beside its cubin in CuPy's
        cache directory), or None when they are not needed (CuPy >= 14 keeps them itself) or
        CuPy keeps no disk cache."""
        if self.native:
            return None
        return names_path(self.cache_dir, keyed_source(code, names), names)

    def _load(self, code: str, names: tuple[str, ...]):
        """The module from CuPy's disk cache where this machine compiled it before (see
        "compiled once per machine" above), else compiled with the name expressions. Only
        NVRTC's own errors (a kernel that does not compile) raise."""
        source = keyed_source(code, names)
        cache_dir = self.cache_dir
        before = count_entries(cache_dir)
        path = self.names_file(code, names)
        mangled = read_names(path, names)
        if mangled is not None:
            try:
                module = CachedModule(self.xp.RawModule(code=source, options=OPTIONS), mangled)
                for name in names:  # loads the cached cubin; a kernel missing from it raises
                    module.get_function(name)
                self.cache_hits += 1
                return module
            except Exception:  # noqa: BLE001 - a stale entry: compile again below
                before = count_entries(cache_dir)
        module = self.xp.RawModule(code=source, options=OPTIONS, name_expressions=names)
        for name in names:  # compiles (NVRTC) or, on CuPy >= 14, loads CuPy's entry
            module.get_function(name)
        if self.native:
            after = count_entries(cache_dir)
            if before is not None and after is not None and after == before:
                self.cache_hits += 1
                return module
        else:
            try:
                write_names(path, {name: str(module.module.mapping[name]) for name in names})
            except Exception:  # noqa: BLE001 - no mapping to record: later processes compile too
                pass
        self.compiles += 1
        return module

    def kernel(self, module, name: str, smem: int):
        kernel = module.get_function(name)
        if smem > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = smem
        return kernel

    def occupancy(self, kernel, smem: int) -> int:
        """Blocks of NT threads resident per multiprocessor, from registers and shared memory
        (num_regs also forces the kernel to compile and load, before any graph capture)."""
        a = self._attributes
        regs = -(-int(kernel.num_regs) * 32 // 256) * 256 * (NT // 32)  # per-warp granularity
        by_regs = int(a.get("MaxRegistersPerMultiprocessor", 65536)) // max(regs, 1)
        by_smem = int(a["MaxSharedMemoryPerMultiprocessor"]) // (smem + 1024)  # 1 KB per block reserved
        by_threads = int(a.get("MaxThreadsPerMultiProcessor", 2048)) // NT
        return max(1, min(by_regs, by_smem, by_threads))

    def launch(self, kernel, grid: int, args, smem: int = 0):
        kernel((grid,), (NT,), tuple(args), shared_mem=smem)

    # ---- CUDA graphs for the on-device loop
    def capture(self, fn):
        if self._stream is None:
            self._stream = self.xp.cuda.Stream(non_blocking=True)
        stream = self._stream
        with stream:
            stream.begin_capture()
            try:
                fn()
            finally:
                graph = stream.end_capture()
        return graph

    def replay(self, graphs, order):
        """Launch graphs[i] for i in order on the capture stream, ordered after and before the
        current stream's work, without waiting on the host."""
        current = self.xp.cuda.get_current_stream()
        self._stream.wait_event(current.record())
        for i in order:
            graphs[i].launch(stream=self._stream)
        current.wait_event(self._stream.record())

    def to_host(self, x):
        return self.xp.asnumpy(x)


def ptr(array):
    """A kernel pointer argument: the array, or a null pointer for None."""
    return np.uint64(0) if array is None else array


# ---- configuration ------------------------------------------------------------------------
def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"the CUDA fused kernel is one of {KERNELS} (launch.KERNEL, "
                         f"$LORAKERN_CUDA_KERNEL), got {kernel!r}")
    return kernel


def rank_bound(r: int, kernel: str = "simt") -> int:
    for bound in (MMA_RANK_BOUNDS if check_kernel(kernel) == "mma" else RANK_BOUNDS):
        if r <= bound:
            return bound
    raise ValueError(f"device='cuda' supports ranks up to {RANK_BOUNDS[-1]}, got r = {r}")


def _round128(x: int) -> int:
    return (x + 127) // 128 * 128


def smem_bytes(itemsize: int, rk: int, bm: int, bn: int, grad: bool, labels: bool = False) -> int:
    """Dynamic shared memory of fused_pass; mirrors Fused<...>::SMEM_BYTES in fused.cu
    (the kernel traps if it gets less than it computes)."""
    acc0 = 32 if itemsize == 4 else 16
    acc2 = max(acc0, bm * rk // NT)
    kt2 = min(rk, 8)
    rt2 = min(acc2 // kt2, bm)
    s2 = min(NT // ((rk // kt2) * (bm // rt2)), bn // 4)
    acc3 = max(acc0, rk * bn // NT)
    kt3 = min(rk, acc3 // 4)
    cp3 = acc3 // kt3 // 4
    s3 = min(NT // ((rk // kt3) * (bn // 4 // cp3)), bm)
    a_bytes = _round128(2 * rk * (bn + 4) * itemsize)
    b_bytes = _round128((2 if itemsize * rk <= 256 else 1) * bm * (rk + 4) * itemsize)
    x_bytes = _round128(2 * bm * (bn + 4) * itemsize)
    red = 2 * NT * 8
    if grad:
        work = max(bm * (bn + 4) * itemsize, max(s2 * bm * rk, s3 * rk * bn) * itemsize, red)
    else:
        work = red
    return a_bytes + b_bytes + x_bytes * (2 if labels else 1) + _round128(work)


def smem_bytes_mma(itemsize: int, rk: int, bm: int, bn: int, grad: bool, labels: bool = False,
                   stages: int = 2) -> int:
    """Dynamic shared memory of fused_pass_mma; mirrors FusedMma<...>::SMEM_BYTES in
    fused_mma.cu (the kernel traps if it gets less than it computes)."""
    mm = 16 if itemsize == 4 else 8  # the mma's M
    nb3 = (bn // mm) * (rk // 8)
    s3 = 1 if nb3 >= NT // 32 else (NT // 32) // nb3
    a_bytes = _round128(stages * rk * (bn + 8) * itemsize)
    b_bytes = _round128((stages if itemsize * rk <= 256 else 1) * bm * (rk + 4) * itemsize)
    x_bytes = _round128(stages * bm * (bn + 4) * itemsize)
    red = 2 * NT * 8
    if grad:  # the G tile, phase 3's split sums where S3 > 1 (else they go to the A buffer)
        g_bytes = _round128(bm * (bn + 8) * itemsize)
        work = max(g_bytes + (s3 * rk * bn * itemsize if s3 > 1 else 0), red)
    else:
        work = red
    return a_bytes + b_bytes + x_bytes * (2 if labels else 1) + _round128(work)


def kernel_smem(kernel: str, itemsize: int, rk: int, bm: int, bn: int, grad: bool,
                labels: bool = False, stages: int = 2) -> int:
    if check_kernel(kernel) == "mma":
        return smem_bytes_mma(itemsize, rk, bm, bn, grad, labels, stages)
    return smem_bytes(itemsize, rk, bm, bn, grad, labels)


def choose_config(itemsize: int, rk: int, labels: bool, limit: int,
                  kernel: str = "simt", tiles=None, stages=None) -> tuple[int, int, int]:
    """(BM, BN, stages): the first tile of ``tiles`` (default TILES), and for the mma kernel the
    first of ``stages`` (default MMA_STAGES), whose shared memory fits ``limit`` (fused.cu's
    kernel: always 2 stages)."""
    tiles = TILES if tiles is None else tiles
    stage_choices = (MMA_STAGES if stages is None else stages) if check_kernel(kernel) == "mma" else (2,)
    for bm, bn in tiles:
        for st in stage_choices:
            if kernel_smem(kernel, itemsize, rk, bm, bn, True, labels, st) <= limit:
                return bm, bn, st
    raise ValueError(f"no tile in {tiles} fits {limit} bytes of shared memory at rank bound {rk}")


def choose_tile(itemsize: int, rk: int, labels: bool, limit: int, kernel: str = "simt") -> tuple[int, int]:
    for bm, bn in TILES:
        if any(kernel_smem(kernel, itemsize, rk, bm, bn, True, labels, st) <= limit
               for st in (MMA_STAGES if kernel == "mma" else (2,))):
            return bm, bn
    raise ValueError(f"no tile in {TILES} fits {limit} bytes of shared memory at rank bound {rk}")


def super_tile(ntr: int, ntc: int, slots: int) -> tuple[int, int]:
    """Tiles per block (rows, columns): about `slots` blocks of near-square super-tiles."""
    if ROWS_PER_BLOCK is not None or COLS_PER_BLOCK is not None:
        return min(ntr, ROWS_PER_BLOCK or 1), min(ntc, COLS_PER_BLOCK or 1)
    slots = max(1, slots)
    nrs = max(1, min(ntr, round(math.sqrt(slots * ntr / ntc))))
    ncs = max(1, min(ntc, slots // nrs))
    return -(-ntr // nrs), -(-ntc // ncs)


def _ctype(dtype) -> str:
    return {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[np.dtype(dtype)]


def _flag(b: bool) -> str:
    return "true" if b else "false"


def kernel_names(dtype, rk: int, bm: int, bn: int, labels: bool, masked: bool,
                 kernel: str = "simt", stages: int = MMA_STAGES[0]) -> dict:
    """The name expressions of one module: both fused passes, the tail and finish
    (``stages``: the mma kernel's copy stages)."""
    t = _ctype(dtype)
    if check_kernel(kernel) == "mma":
        fused = f"lorakern::fused_pass_mma<{t}, {rk}, {bm}, {bn}, {stages}, {_flag(labels)}, {_flag(masked)}, "
    else:
        fused = f"lorakern::fused_pass<{t}, {rk}, {bm}, {bn}, {_flag(labels)}, {_flag(masked)}, "
    return {
        "grad": fused + "true>",
        "loss": fused + "false>",
        "tail": f"lorakern::tail<{t}>",
        "finish": "lorakern::finish",
    }


_SOURCE = None


def kernel_source() -> str:
    global _SOURCE
    if _SOURCE is None:
        _SOURCE = resources.files(__package__).joinpath("fused.cu").read_text()
    return _SOURCE


def common_source() -> str:
    """fused_common.cuh: what both fused passes share (helpers, copy wrappers, partials); the
    text before fused.cu in every module."""
    return resources.files(__package__).joinpath("fused_common.cuh").read_text()


def mma_kernel_source() -> str:
    """fused_mma.cu: the tensor-core fused pass (needs warp.cuh, fused_common.cuh and fused.cu
    before it)."""
    return resources.files(__package__).joinpath("fused_mma.cu").read_text()


def warp_source() -> str:
    """warp.cuh: the TF32 conversion, the mma fragments and wrappers (a module's first text)."""
    return resources.files(__package__).joinpath("warp.cuh").read_text()


def module_source(loss, kernel: str = "simt") -> str:
    """The loss's device function, then the kernels (cupyx/ndimage prepends #defines alike):
    fused_common.cuh and fused.cu; for the "mma" kernel warp.cuh first and fused_mma.cu after
    fused.cu (whose tail kernels it uses). The headers go in as text, not #include, so that the
    source (and the disk cache's digest of it) holds every byte NVRTC compiles."""
    head = f"// loss {loss.name!r}, from lorakern/losses.py\n{loss.cuda_source()}\n"
    if check_kernel(kernel) == "mma":
        return f"{head}{warp_source()}\n{common_source()}\n{kernel_source()}\n{mma_kernel_source()}"
    return f"{head}{common_source()}\n{kernel_source()}"


#: shared memory per block of each architecture a GPU run may have (the opt-in limit,
#: cudaDevAttrMaxSharedMemoryPerBlockOptin: A100 and H100/H200); all_modules(arch) picks tiles
#: against it as a Plan does on that GPU
SMEM_LIMITS = {"sm_80": 166912, "sm_90": 232448}

#: the (TILES, MMA_STAGES) settings a GPU run patches in besides the launcher's own (None: the
#: module constant), each with the kernels, dtypes, losses, masks and rank bounds it is used at
#: (None: all). The tests' small tiles (conftest.small_tiles, test_cuda*.small_blocks) for every
#: variant; the mma kernel's knock-outs only where tests/test_cuda_mma.py and
#: benchmarks/gpu_probe.py (timing) use them.
RUN_SETTINGS = (
    # (tiles, stages, kernels, dtypes, losses, masks, rank bounds)
    (None, None, None, None, None, None, None),                      # the launcher's own choice
    (((32, 32),), None, None, None, None, None, None),               # the tests' small tiles
    (((32, 32),), (2,), ("mma",), None, ("squared",), (True,), (8, 128)),   # test_copy_stages(2)
    (None, (2,), ("mma",), None, ("squared",), (False,), (16,)),    # gpu_probe's 2-stage knock-out
    (((128, 64),), None, ("mma",), ("float32",), None, None, (8, 16, 32)),  # 128 x 64 (WIDE)
)


def _variants(arch: str | None):
    """(dtype, loss, kernel, masked, rk, bm, bn, stages or None) of every fused module: all of
    the launcher's variants (arch None), or those a GPU run on ``arch`` asks for."""
    from ..losses import LOSSES

    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        for loss in LOSSES.values():
            for kernel in KERNELS:
                for masked in (False, True):
                    for rk in (MMA_RANK_BOUNDS if kernel == "mma" else RANK_BOUNDS):
                        if arch is None:
                            for bm, bn in TILES:
                                for stages in (MMA_STAGES if kernel == "mma" else (None,)):
                                    yield dtype, loss, kernel, masked, rk, bm, bn, stages
                            continue
                        seen = set()
                        for tiles, stages, *only in RUN_SETTINGS:
                            wanted = (kernel, str(dtype), loss.name, masked, rk)
                            if any(o is not None and w not in o for o, w in zip(only, wanted)):
                                continue
                            try:
                                bm, bn, st = choose_config(dtype.itemsize, rk, loss.labels, SMEM_LIMITS[arch],
                                                           kernel, tiles, stages)
                            except ValueError:  # no tile of this setting fits: the run cannot ask for it
                                continue
                            config = (bm, bn, st if kernel == "mma" else None)
                            if config not in seen:
                                seen.add(config)
                                yield (dtype, loss, kernel, masked, rk, *config)


def all_modules(arch: str | None = None):
    """(label, code, names) of every module the launcher can ask NVRTC for (arch None: each
    dtype, loss, kernel, mask, rank bound, tile and copy-stage count of a Plan), or of every
    module a GPU run on ``arch`` ("sm_80", "sm_90") asks for: the Plans at the tile the
    launcher picks on that GPU and at the RUN_SETTINGS the tests and gpu_probe patch in; then
    update_kernel's and linear_pointwise_kernel's modules. The single list: precompile.py
    compiles it, tests/test_cuda_cache.py and tests/test_cuda_cupy.py check it."""
    from ..losses import LOSSES

    if arch is not None and arch not in SMEM_LIMITS:
        raise ValueError(f"arch is one of {tuple(SMEM_LIMITS)}, got {arch!r}")
    for dtype, loss, kernel, masked, rk, bm, bn, stages in _variants(arch):
        names = tuple(kernel_names(dtype, rk, bm, bn, loss.labels, masked, kernel,
                                   MMA_STAGES[0] if stages is None else stages).values())
        tag = "" if kernel == "simt" else f" kernel={kernel}"
        st = "" if stages is None else f" stages={stages}"
        yield (f"{dtype} {loss.name} masked={masked} rk={rk} tile={bm}x{bn}{tag}{st}",
               module_source(loss, kernel), names)
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        yield (f"{dtype} update", module_source(LOSSES["squared"]), (f"lorakern::update<{_ctype(dtype)}>",))
        for loss in LOSSES.values():  # the pointwise losses (cross-entropy is the linear kind's own)
            yield (f"{dtype} {loss.name} linear_pointwise", module_source(loss),
                   (f"lorakern::linear_pointwise<{_ctype(dtype)}, {_flag(bool(loss.labels))}>",))


# ---- one problem and rank -----------------------------------------------------------------
class Plan:
    """Kernels, geometry and workspace for fused passes on one problem at rank r."""

    def __init__(self, rt, problem, r: int, kernel: str | None = None):
        (m, n), dtype = problem.shape, problem.dtype
        self.rt, self.m, self.n, self.r, self.dtype = rt, m, n, r, dtype
        self.kernel = check_kernel(KERNEL if kernel is None else kernel)
        self.rk = rank_bound(r, self.kernel)
        limit = rt.max_smem_per_block if SMEM_BUDGET is None else min(SMEM_BUDGET, rt.max_smem_per_block)
        self.labels, self.masked = problem.loss.labels, problem.mask is not None
        self.bm, self.bn, self.stages = choose_config(dtype.itemsize, self.rk, self.labels, limit, self.kernel)
        shape = (dtype.itemsize, self.rk, self.bm, self.bn)
        self.smem_grad = kernel_smem(self.kernel, *shape, True, self.labels, self.stages)
        self.smem_loss = kernel_smem(self.kernel, *shape, False, self.labels, self.stages)
        self.delta = float(problem.delta)
        self.names = kernel_names(dtype, self.rk, self.bm, self.bn, self.labels, self.masked, self.kernel,
                                  self.stages)
        module = rt.module(module_source(problem.loss, self.kernel), tuple(self.names.values()))
        smem = {"grad": self.smem_grad, "loss": self.smem_loss}
        self.kernels = {key: rt.kernel(module, name, smem.get(key, 0)) for key, name in self.names.items()}

        self.ntr, self.ntc = -(-m // self.bm), -(-n // self.bn)
        self.rpb, self.cpb = super_tile(self.ntr, self.ntc, self._slots())
        self.nrs, self.ncs = -(-self.ntr // self.rpb), -(-self.ntc // self.cpb)
        self.grid = self.nrs * self.ncs
        self.m_ld, self.n_ld = self.ntr * self.bm, self.ntc * self.bn
        total = m * r + r * n
        self.small_grid = small_grid(total)
        xp = rt.xp
        self.gB_part = xp.empty(self.ncs * self.m_ld * self.rk, dtype)
        self.gA_part = xp.empty(self.nrs * self.rk * self.n_ld, dtype)
        self.scal_part = xp.empty(3 * self.grid, np.float64)  # (loss, ||G||^2, ||V||^2 share) per block
        # the tail's ||grad J||^2 shares: two sets, so that the on-device loop's step reads the
        # previous step's while it writes its own
        self.norm_part = [xp.empty(self.small_grid, np.float64), xp.empty(self.small_grid, np.float64)]

    def _slots(self) -> int:
        """Blocks resident at once on the whole GPU (one wave)."""
        per_sm = self.rt.occupancy(self.kernels["grad"], self.smem_grad)
        return max(1, per_sm) * self.rt.sm_count

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in ("kernel", "rk", "bm", "bn", "stages", "rpb", "cpb", "nrs", "ncs",
                                              "grid")}

    # ---- launches (no allocation: usable inside a CUDA graph capture)
    def fused(self, data, B, A, grad: bool = True):
        """fused_pass: partials of grad_B, grad_A and (loss, ||G||^2) per block."""
        self.rt.launch(
            self.kernels["grad" if grad else "loss"], self.grid,
            (data.x, ptr(data.y), ptr(data.mask), B, A, np.int32(self.m), np.int32(self.n),
             np.int32(self.r), np.float64(self.delta), np.int32(self.rpb), np.int32(self.cpb),
             self.gB_part, self.gA_part, np.int64(self.m_ld), np.int64(self.n_ld), self.scal_part),
            self.smem_grad if grad else self.smem_loss)

    def tail(self, B, A, out, *, grad_B=None, grad_A=None, B_out=None, A_out=None, eta_scale: float = 0.0,
             eta_fixed: float = 0.0, parity: int = 0, counter=None, ok_in=None, ok_out=None,
             grad: bool = True):
        """fused.cu's tail after a pass at (B, A): eta_t, the gradients (stored where grad_B,
        grad_A are given), the update into B_out, A_out (where given) and the step's row of
        ``out`` but its ||grad J||^2 (``finish``; in the on-device loop the next step's tail).
        ``parity`` picks the norm_part this tail writes (the other is the previous step's, read
        where ``counter`` is given); ``grad=False`` after a loss-only pass: the row alone."""
        nothing = ptr(None)
        self.rt.launch(
            self.kernels["tail"], self.small_grid if grad else 1,
            (self.gB_part if grad else nothing, self.gA_part if grad else nothing, np.int32(self.ncs),
             np.int32(self.nrs), np.int32(self.rk), np.int64(self.m_ld), np.int64(self.n_ld),
             np.int32(self.m), np.int32(self.n), np.int32(self.r), B, A, self.scal_part, np.int32(self.grid),
             np.float64(eta_scale), np.float64(eta_fixed), ptr(grad_B), ptr(grad_A), ptr(B_out), ptr(A_out),
             ptr(ok_in), ptr(ok_out), self.norm_part[parity],
             ptr(None if counter is None else self.norm_part[1 - parity]), np.int32(self.small_grid), out,
             ptr(counter)))

    def finish(self, out, *, parity: int = 0, counter=None):
        """The ||grad J||^2 of the row the last tail wrote (its norm_part[parity])."""
        self.rt.launch(self.kernels["finish"], 1,
                       (self.norm_part[parity], np.int32(self.small_grid), out, ptr(counter)))

def update(rt, kernel, B, A, grad_B, grad_A, B_out, A_out, *, eta_ptr=None, eta_value=0.0, ok=None):
    total = B.size + A.size
    rt.launch(kernel, small_grid(total),
              (B, A, grad_B, grad_A, np.int64(B.size), np.int64(A.size), ptr(eta_ptr),
               np.float64(eta_value), ptr(ok), B_out, A_out))


def plan(problem, data, r: int) -> Plan:
    """The problem's plan at rank r, made on first use and kept with its device data.

    The plan's geometry reads the module-level tuning constants when it is made; tests
    that patch them small get a fresh key, so a plan never outlives its constants."""
    key = (r, TILES, ROWS_PER_BLOCK, COLS_PER_BLOCK, SMEM_BUDGET, KERNEL, MMA_STAGES)
    if key not in data.plans:
        data.plans[key] = Plan(data.rt, problem, r)
    return data.plans[key]


def update_kernel(rt, dtype):
    """update<T> alone (on runtime ``rt``), for updates whose gradients did not come from a plan."""
    name = f"lorakern::update<{_ctype(dtype)}>"
    from ..losses import LOSSES  # any loss: the prelude is needed to compile the file

    module = rt.module(module_source(LOSSES["squared"]), (name,))
    return rt.kernel(module, name, 0)


def linear_pointwise_kernel(rt, dtype, loss):
    """fused.cu's linear_pointwise<T, LABELS> for this loss (not cross-entropy), on runtime rt."""
    name = f"lorakern::linear_pointwise<{_ctype(dtype)}, {_flag(bool(loss.labels))}>"
    return rt.kernel(rt.module(module_source(loss), (name,)), name, 0)


def linear_pointwise(rt, kernel, Z0, PB, Y, delta: float, Delta, part):
    """Delta = loss'(Z0 + PB) and part[block] = (loss sum, ||Delta||^2) over grid blocks
    (``part`` holds 2 x grid float64: grid = len(part) // 2, at most MAX_SMALL_GRID)."""
    rt.launch(kernel, part.size // 2, (Z0, PB, ptr(Y), np.int64(Z0.size), np.float64(delta), Delta, part))


def small_grid(count: int) -> int:
    """Blocks of a grid-stride kernel over ``count`` entries (a constant cap: fixed sum order)."""
    return max(1, min(-(-count // NT), MAX_SMALL_GRID))


def workspace(rt, shape_B, shape_A, dtype, steps: int) -> SimpleNamespace:
    """Buffers of the on-device loop: two iterates (ping-pong), history, counter and flags."""
    xp = rt.xp
    return SimpleNamespace(
        B=[xp.empty(shape_B, dtype), xp.empty(shape_B, dtype)],
        A=[xp.empty(shape_A, dtype), xp.empty(shape_A, dtype)],
        history=xp.zeros((max(steps, 1), 5), np.float64),
        # ok[t % 2]: J stayed finite up to step t - 1; step t's tail reads it and writes the other
        counter=xp.zeros(1, np.int32), ok=xp.ones(2, np.int32),
    )
