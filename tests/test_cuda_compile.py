"""The CUDA sources compile for sm_80 and sm_90, with their register and spill counts shown.

No GPU needed: nvcc compiles to cubin only (-cubin), one translation unit per loss,
architecture and fused kernel (launch.KERNELS: "simt", fused.cu; "mma", warp.cuh + fused.cu +
fused_mma.cu), made as launch.py assembles them, with the template instances the launcher asks
NVRTC for. Each instance is pinned by taking its
address in a __device__ variable, as NVRTC's name expressions do. Skipped only without nvcc.
Run with -s to see the table of registers and spills (also attached as user properties).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from lorakern import LOSSES
from lorakern._cuda import launch

NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc",) if os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

ARCHS = ("sm_80", "sm_90")
DTYPES = (np.float32, np.float64)
# a fused instance that spills more than this many bytes per thread fails the test
MAX_SPILL_BYTES = 64
#: fused_pass_mma at rank bound 128 keeps 64 running grad_B sums per thread (fp32) on top of
#: ~156 registers without them, and spills 16-60 B stores (ptxas 13, sm_90; benchmarks/NOTES.md,
#: "v2 (mma) kernel"): allowed up to this many bytes (stores + loads) until a GPU run has timed it
#: against keeping those sums in shared memory. Other mma instances may spill up to
#: MAX_SPILL_BYTES (3 copy stages at rank 64: 12 B); fused.cu's none.
MMA_RK128_SPILL_BYTES = 128


def spill_budget(name: str) -> int:
    """Bytes of spill stores + loads an instance may have (its short demangled name)."""
    if name.startswith("fused_pass_mma<") and name.split(",")[1].strip() == "128":
        return MMA_RK128_SPILL_BYTES
    return MAX_SPILL_BYTES


#: shared memory per block each architecture allows (cudaDevAttrMaxSharedMemoryPerBlockOptin
#: of the A100 and the H100): the launcher picks tiles against it
SMEM_LIMIT = launch.SMEM_LIMITS


#: the fused kernels (launch.KERNELS): fused.cu's "simt" and fused_mma.cu's "mma"
KERNELS = launch.KERNELS


def default_tile(arch, dtype, rk, labels=False, kernel="simt"):
    """(BM, BN, copy stages) the launcher picks on this architecture."""
    return launch.choose_config(np.dtype(dtype).itemsize, rk, labels, SMEM_LIMIT[arch], kernel)


def instances(loss, arch: str, kernel: str = "simt") -> list[str]:
    """The name expressions the launcher can request for this loss (see launch.kernel_names):
    every loss x dtype x mask x pass kind at rank bound 16; for the squared loss every rank
    bound of the kernel, and the 32 x 32 tile the tests patch in (mma: 128 x 64 fp32 tiles up to
    rank 32); update and linear_pointwise."""
    names: list[str] = []
    bounds = launch.MMA_RANK_BOUNDS if kernel == "mma" else launch.RANK_BOUNDS
    configs = [(dtype, 16, *default_tile(arch, dtype, 16, loss.labels, kernel)) for dtype in DTYPES]
    if loss.name == "squared":
        configs += [(dtype, rk, *default_tile(arch, dtype, rk, kernel=kernel)) for dtype in DTYPES
                    for rk in bounds]
        configs += [(dtype, 16, 32, 32, launch.MMA_STAGES[0]) for dtype in DTYPES]
        if kernel == "mma":  # 128 x 64 fp32 tiles (gpu_probe.py times them), ranks up to 32
            configs += [(np.float32, rk, 128, 64, next(
                st for st in launch.MMA_STAGES
                if launch.smem_bytes_mma(4, rk, 128, 64, True, False, st) <= SMEM_LIMIT[arch]))
                for rk in (8, 16, 32)]
    for dtype, rk, bm, bn, stages in dict.fromkeys(configs):
        for masked in (False, True):
            if masked and rk != 16:
                continue
            names.extend(launch.kernel_names(dtype, rk, bm, bn, loss.labels, masked, kernel, stages).values())
    if kernel == "simt":  # the device's update and the linear kind's pointwise (modules of their own)
        for dtype in DTYPES:
            t = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[np.dtype(dtype)]
            names += [f"lorakern::update<{t}>",
                      f"lorakern::linear_pointwise<{t}, {'true' if loss.labels else 'false'}>"]
    return list(dict.fromkeys(names))


def translation_unit(loss, arch: str, kernel: str = "simt") -> str:
    keep = "\n".join(f"__device__ void* lorakern_keep_{i} = (void*)&{name};"
                     for i, name in enumerate(instances(loss, arch, kernel)))
    return f"{launch.module_source(loss, kernel)}\n// instances the launcher requests\n{keep}\n"


def compile_unit(loss, arch: str, workdir: Path, kernel: str = "simt"):
    src = workdir / f"{loss.name}_{arch}_{kernel}.cu"
    src.write_text(translation_unit(loss, arch, kernel))
    cmd = [NVCC, "-cubin", f"-arch={arch}", "-std=c++17", "-Xptxas", "-v", "-Xptxas", "-warn-spills",
           str(src), "-o", str(src.with_suffix(".cubin"))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return cmd, proc


def parse_ptxas(log: str) -> dict[str, dict]:
    """{mangled kernel: {registers, spill_stores, spill_loads, smem}} from ptxas -v output."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current["spill_stores"], current["spill_loads"] = int(m.group(1)), int(m.group(2))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(s.group(1)) if s else 0
            current = None
    return out


def demangle(names):
    if shutil.which("c++filt") is None:
        return {n: n for n in names}
    proc = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, proc.stdout.splitlines()))


def short(demangled: str) -> str:
    """lorakern::fused_pass<float, 16, 64, 64, false, true, true>(...) -> fused_pass<...>"""
    name = demangled.split("(")[0].replace("lorakern::", "")
    return name.removeprefix("void ").replace("(bool)", "").replace("(int)", "")


def built(loss: str, arch: str, kernel: str) -> bool:
    """Every unit but the mma kernel's other losses on sm_80 (the squared loss's unit has its
    every rank bound there; the losses differ only in the pointwise): less nvcc time in CI."""
    return not (kernel == "mma" and arch == "sm_80" and loss != "squared")


@pytest.fixture(scope="module")
def builds():
    """Compile every loss for every architecture once (in parallel)."""
    workdir = Path(tempfile.mkdtemp(prefix="lorakern-nvcc-"))
    jobs = [(loss, arch, kernel) for loss in LOSSES.values() for arch in ARCHS for kernel in KERNELS
            if built(loss.name, arch, kernel)]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda job: compile_unit(job[0], job[1], workdir, job[2]), jobs))
    yield {(loss.name, arch, kernel): result for (loss, arch, kernel), result in zip(jobs, results)}
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_nvcc_compiles(builds, loss, arch, kernel, record_property):
    if not built(loss, arch, kernel):
        pytest.skip("built for sm_90 only (see built())")
    cmd, proc = builds[(loss, arch, kernel)]
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{log}"
    table = parse_ptxas(log)
    names = demangle(list(table))
    # spills are judged by spill_budget below; any other warning fails
    allowed = [m for m in table if short(names[m]).startswith("fused_pass_mma<") and spill_budget(short(names[m])) > 0]
    warnings = [line for line in log.splitlines()
                if re.search(r"\bwarning\b", line, re.I) and "ptxas info" not in line
                and not ("Registers are spilled" in line and any(f"'{m}'" in line for m in allowed))]
    assert not warnings, "compiler warnings:\n" + "\n".join(warnings)

    expected = {short(n) for n in instances(LOSSES[loss], arch, kernel)}
    compiled = {short(names[k]) for k in table}
    missing = {e.replace(" ", "") for e in expected} - {c.replace(" ", "") for c in compiled}
    assert not missing, f"instances not compiled: {sorted(missing)}"

    lines = [f"nvcc -arch={arch}, loss {loss!r}, kernel {kernel!r}: registers and spills per thread"]
    spilling = []
    for mangled, info in sorted(table.items(), key=lambda kv: short(names[kv[0]])):
        spills = info.get("spill_stores", 0) + info.get("spill_loads", 0)
        lines.append(f"  {short(names[mangled]):<58} {info.get('registers', 0):>4} regs  "
                     f"spill {info.get('spill_stores', 0):>3}/{info.get('spill_loads', 0):<3} B  "
                     f"static smem {info.get('static_smem', 0)} B")
        record_property(f"{arch} {short(names[mangled])}", f"{info.get('registers')} regs, "
                        f"spill {info.get('spill_stores', 0)}/{info.get('spill_loads', 0)} B")
        if spills > spill_budget(short(names[mangled])):
            spilling.append(f"{short(names[mangled])}: {spills} bytes")
    print("\n" + "\n".join(lines))
    assert not spilling, "instances spill more than the budget:\n" + "\n".join(spilling)


SMEM_PROBE = r"""
#include <cstdio>
int main() {
%s
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_shared_memory_sizes_agree_with_the_launcher(tmp_path):
    """launch.smem_bytes mirrors Fused<...>::SMEM_BYTES for every tile the launcher may pick
    (the kernel traps when given less than it computes)."""
    from lorakern._cuda import emulation

    cases = [(dtype, rk, bm, bn, grad, labels) for dtype in DTYPES for rk in launch.RANK_BOUNDS
             for bm, bn in launch.TILES for grad in (True, False) for labels in (True, False)]
    prints = []
    for dtype, rk, bm, bn, grad, labels in cases:
        t = "float" if dtype is np.float32 else "double"
        prints.append(f'    std::printf("%lld\\n", lorakern::Fused<{t}, {rk}, {bm}, {bn}, '
                      f'{str(labels).lower()}, {str(grad).lower()}>::SMEM_BYTES);')
    # the emulation's header with its runtime, so that the probe links as a program of its own
    source = ("#define LORAKERN_EMULATION_RUNTIME 1\n" + emulation.header()
              + launch.module_source(LOSSES["squared"]) + SMEM_PROBE % "\n".join(prints))
    (tmp_path / "probe.cpp").write_text(source)
    subprocess.run(["g++", "-std=c++17", "-pthread", "-w", str(tmp_path / "probe.cpp"), "-o",
                    str(tmp_path / "probe")], check=True)
    got = [int(v) for v in subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True,
                                          check=True).stdout.split()]
    want = [launch.smem_bytes(np.dtype(d).itemsize, rk, bm, bn, grad, labels)
            for d, rk, bm, bn, grad, labels in cases]
    mismatched = [(c, g, w) for c, g, w in zip(cases, got, want) if g != w]
    assert not mismatched, f"(config, kernel, launcher): {mismatched}"


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_mma_shared_memory_sizes_agree_with_the_launcher(tmp_path):
    """launch.smem_bytes_mma mirrors FusedMma<...>::SMEM_BYTES (fused_mma.cu) likewise."""
    from lorakern._cuda import emulation

    cases = [(dtype, rk, bm, bn, grad, labels, st) for dtype in DTYPES for rk in launch.MMA_RANK_BOUNDS
             for bm, bn in launch.TILES for grad in (True, False) for labels in (True, False)
             for st in (2, 3, 4)]
    prints = []
    for dtype, rk, bm, bn, grad, labels, st in cases:
        t = "float" if dtype is np.float32 else "double"
        prints.append(f'    std::printf("%lld\\n", lorakern::FusedMma<{t}, {rk}, {bm}, {bn}, {st}, '
                      f'{str(labels).lower()}, {str(grad).lower()}>::SMEM_BYTES);')
    source = ("#define LORAKERN_EMULATION_RUNTIME 1\n" + emulation.header()
              + launch.module_source(LOSSES["squared"], "mma") + SMEM_PROBE % "\n".join(prints))
    (tmp_path / "probe.cpp").write_text(source)
    subprocess.run(["g++", "-std=c++17", "-pthread", "-w", str(tmp_path / "probe.cpp"), "-o",
                    str(tmp_path / "probe")], check=True)
    got = [int(v) for v in subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True,
                                          check=True).stdout.split()]
    want = [launch.smem_bytes_mma(np.dtype(d).itemsize, rk, bm, bn, grad, labels, st)
            for d, rk, bm, bn, grad, labels, st in cases]
    mismatched = [(c, g, w) for c, g, w in zip(cases, got, want) if g != w]
    assert not mismatched, f"(config, kernel, launcher): {mismatched}"


@pytest.mark.parametrize("arch", ARCHS)
def test_mma_kernel_ptx_has_the_tensor_core_instructions(arch, tmp_path):
    """fused_mma.cu's PTX takes the asm branches of warp.cuh (not the trap): mma.sync TF32 and
    f64, cvt.rna.tf32.f32, and no trap in the fused passes."""
    loss = LOSSES["squared"]
    src = tmp_path / f"mma_{arch}.cu"
    src.write_text(translation_unit(loss, arch, "mma"))
    ptx = src.with_suffix(".ptx")
    proc = subprocess.run([NVCC, "-ptx", f"-arch={arch}", "-std=c++17", str(src), "-o", str(ptx)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = ptx.read_text()
    for instruction in ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
                        "mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64", "cvt.rna.tf32.f32"):
        assert instruction in text, f"{instruction} not in the PTX of fused_mma.cu for {arch}"
    # the only traps: the shared-memory check at the top of each fused pass
    entries = len(set(re.findall(r"\.entry (_ZN8lorakern14fused_pass_mma\w+)", text)))
    assert entries == len([n for n in instances(loss, arch, "mma") if "fused_pass_mma" in n])
    assert text.count("trap;") <= entries, "a trap branch of warp.cuh was compiled in"


# ---- NVRTC, as cupy.RawModule compiles at run time (only where libnvrtc can be found) ------------
def _find_nvrtc():
    """libnvrtc: $LORAKERN_NVRTC, the pip package nvidia-cuda-nvrtc-cu12, or the loader's path."""
    import ctypes.util
    import importlib.util

    candidates = [os.environ.get("LORAKERN_NVRTC")]
    spec = importlib.util.find_spec("nvidia.cuda_nvrtc") if importlib.util.find_spec("nvidia") else None
    if spec and spec.submodule_search_locations:
        lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
        candidates += sorted(str(p) for p in lib.glob("libnvrtc.so*") if "builtins" not in p.name)
    candidates.append(ctypes.util.find_library("nvrtc"))
    for path in filter(None, candidates):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


NVRTC = _find_nvrtc()


@pytest.mark.skipif(NVRTC is None, reason="libnvrtc not found (set LORAKERN_NVRTC to its path)")
@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_compiles_every_module(arch):
    """Each module the launcher builds (loss prelude + fused.cu, its name expressions) compiles
    with NVRTC and no headers, and every name expression resolves to a kernel."""
    import ctypes

    def check(rc, what, prog=None):
        if rc != 0:
            log = ""
            if prog is not None:
                size = ctypes.c_size_t()
                NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
                buf = ctypes.create_string_buffer(size.value)
                NVRTC.nvrtcGetProgramLog(prog, buf)
                log = buf.value.decode()
            raise AssertionError(f"{what} failed with NVRTC error {rc}\n{log}")

    for loss in LOSSES.values():
        for dtype in DTYPES:
            for masked, kernel in ((False, "simt"), (True, "simt"), (False, "mma"), (True, "mma")):
                bm, bn, stages = default_tile(arch, dtype, 16, loss.labels, kernel)
                names = list(launch.kernel_names(dtype, 16, bm, bn, loss.labels, masked, kernel, stages).values())
                prog = ctypes.c_void_p()
                check(NVRTC.nvrtcCreateProgram(ctypes.byref(prog), launch.module_source(loss, kernel).encode(),
                                               b"fused.cu", 0, None, None), "nvrtcCreateProgram")
                try:
                    for name in names:
                        check(NVRTC.nvrtcAddNameExpression(prog, name.encode()), "nvrtcAddNameExpression")
                    opts = [o.encode() for o in launch.OPTIONS] + [f"-arch={arch}".encode()]
                    check(NVRTC.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)),
                          f"compiling {loss.name} {np.dtype(dtype)} masked={masked} {kernel}", prog)
                    for name in names:
                        lowered = ctypes.c_char_p()
                        check(NVRTC.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)), name)
                        assert lowered.value, name
                finally:
                    NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("arch", ARCHS)
def test_warp_instructions_and_gpu_probes_compile(arch, tmp_path, record_property):
    """warp.cuh (the tensor-core groundwork) with benchmarks/gpu_probe.cu, as gpu_probe.py hands
    them to NVRTC: compiled, no spill, and the mma instructions in the PTX (not the trap branch)."""
    src = tmp_path / f"probe_{arch}.cu"
    src.write_text(launch.warp_source() + (Path(__file__).resolve().parents[1] / "benchmarks" /
                                           "gpu_probe.cu").read_text())
    cmd = [NVCC, "-cubin", f"-arch={arch}", "-std=c++17", "-Xptxas", "-v", "-Xptxas", "-warn-spills",
           str(src), "-o", str(src.with_suffix(".cubin"))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = parse_ptxas(proc.stderr + proc.stdout)
    assert set(report) >= {"cvt_exhaustive", "mma_tf32_tiles", "mma_f64_tiles", "mma_tf32_rate", "read_tiles"}
    for name, info in report.items():
        record_property(f"{arch} {name}", f"{info['registers']} registers, {info['spill_stores']} B spill")
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (name, info)
    ptx = subprocess.run([NVCC, "-ptx", f"-arch={arch}", "-std=c++17", str(src), "-o", "-"],
                         capture_output=True, text=True, check=True).stdout
    for instruction in ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
                        "mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64", "cvt.rna.tf32.f32"):
        assert instruction in ptx, instruction
    assert "trap;" not in ptx
    print(f"\n{arch}: " + ", ".join(f"{n} {i['registers']} regs" for n, i in sorted(report.items())))


@pytest.mark.skipif(NVRTC is None, reason="libnvrtc not found (set LORAKERN_NVRTC to its path)")
def test_nvrtc_compiles_the_gpu_probes():
    """gpu_probe.py's module as CupyRuntime.module hands it to NVRTC: no headers, launch.OPTIONS,
    the extern "C" kernels as name expressions, each resolving to its own name."""
    import ctypes

    probe_cu = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_probe.cu"
    source = launch.warp_source() + probe_cu.read_text()
    names = re.findall(r'extern "C" __global__ void (\w+)\(', source)
    assert len(names) == 7
    prog = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"gpu_probe.cu", 0, None, None) == 0
    try:
        for name in names:
            assert NVRTC.nvrtcAddNameExpression(prog, name.encode()) == 0
        opts = [o.encode() for o in launch.OPTIONS] + [b"-arch=sm_90"]
        rc = NVRTC.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if rc != 0:
            size = ctypes.c_size_t()
            NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            NVRTC.nvrtcGetProgramLog(prog, log)
            raise AssertionError(log.value.decode())
        for name in names:
            lowered = ctypes.c_char_p()
            assert NVRTC.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)) == 0
            assert lowered.value.decode() == name
    finally:
        NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))
