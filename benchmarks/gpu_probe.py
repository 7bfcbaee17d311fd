"""The next GPU session's measurements, in the order the design needs them (ci/gpu.sh runs it).

    python benchmarks/gpu_probe.py calibrate --out DIR   # assumptions of the tensor-core design
    python benchmarks/gpu_probe.py timing --out DIR      # the fused step per row of the goals: today's
                                                         # kernel ("simt") and v2 ("mma") beside it
    python benchmarks/gpu_probe.py linear --out DIR      # the linear kind's step against PyTorch's
    python benchmarks/gpu_probe.py table --out DIR       # the table, printed last
    python benchmarks/gpu_probe.py sanitize              # small passes of both kernels, to run
                                                         # under compute-sanitizer (GPU_SANITIZE=1)
    python benchmarks/gpu_probe.py selftest              # the probes' logic on the host emulation

calibrate (about a minute) measures, each section on its own (an error is recorded, the rest
goes on), written to DIR/calibrate.json after every section:

* ``device``: GPU, SMs, clocks, versions.
* ``kernel_cache``: two fresh processes build the same lorakern module against an empty
  CUPY_CACHE_DIR; the second must load it from the cache (no NVRTC: CupyRuntime.compiles == 0)
  and take well under the first's time.
* ``cvt``: cvt.rna.tf32.f32 on every one of the 2^32 bit patterns against warp.cuh's model
  (the host emulation's), bit for bit; NaN inputs must give a NaN; the hand cases of
  tests/test_cuda_warp.py and what the hardware does with NaN payloads.
* ``mma``: m16n8k8 TF32 and m8n8k4 f64 through warp.cuh's fragments: integer tiles must equal
  NumPy exactly (the layouts), and random tiles are compared with three accumulation models (the
  emulation's "rn", "rz", "aligned"): the outputs unlike each model are counted and reported,
  and the accumulation is the model(s) every output matches, or "neither". Nothing depends on
  the answer: the accuracy tests (tests/test_cuda_mma.py) bound the error, whatever the model.
* ``rates``: mma.sync TF32 and DMMA throughput (TFLOP/s) against warps per SM.
* ``bandwidth``: reading an m x n array in tile order (64x64 and 128x64 fp32, 64x64 fp64
  tiles; several blocks per SM) and in whole rows, against a CuPy device-to-device copy.

timing (2-3 minutes) times lorakern's 200-step device loop (run_steps, CUDA graphs) at the
rows of the issue's goals with CUDA events, for today's fused pass (launch.KERNEL = "simt") and
the tensor-core pass beside it ("mma": fused_mma.cu, 3xTF32 / DMMA; never timed before), the
last loss of each run (the two kernels must agree to fp32/fp64 rounding), and the floor of each
row from calibrate's rates: max(bytes of R / best read bandwidth, 6 m n r / best accurate rate).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorakern._cuda import emulation, launch  # noqa: E402

PROBE_SOURCE = (ROOT / "benchmarks" / "gpu_probe.cu").read_text()
NAMES = ("cvt_exhaustive", "cvt_list", "mma_tf32_tiles", "mma_f64_tiles", "mma_tf32_rate", "mma_f64_rate",
         "read_tiles")
#: the issue's rows: (m = n, r, dtype)
ROWS = [(8192, 4, "float32"), (8192, 16, "float32"), (8192, 64, "float32"), (16384, 4, "float32"),
        (16384, 16, "float32"), (16384, 64, "float32"), (8192, 4, "float64"), (8192, 16, "float64"),
        (8192, 64, "float64"), (4096, 16, "float32"), (2048, 16, "float32")]
STEPS = 200


# ---- where the kernels run: a GPU (CuPy) or the host emulation ----------------------------------------
class Device:
    def __init__(self, emulated: bool, mma_rounding: str = "rn"):
        self.emulated = emulated
        if emulated:
            self.rt = emulation.HostRuntime(timeout=30.0, mma_rounding=mma_rounding)
        else:
            self.rt = launch.CupyRuntime()
        self.xp = self.rt.xp
        module = self.rt.module(launch.warp_source() + PROBE_SOURCE, NAMES)
        self.k = {name: self.rt.kernel(module, name, 0) for name in NAMES}

    def launch(self, name, grid, block, args):
        if self.emulated:
            self.rt.launch(self.k[name], grid, args, 0, block=block)
        else:
            self.k[name]((grid,), (block,), tuple(args))

    def host(self, x):
        return self.rt.to_host(x) if not self.emulated else np.asarray(x.get())

    def sync(self):
        if not self.emulated:
            self.xp.cuda.Device().synchronize()

    def time_ms(self, fn, reps=10, warmup=2):
        """Median milliseconds of fn() by CUDA events (the host clock in the emulation)."""
        for _ in range(warmup):
            fn()
        self.sync()
        return statistics.median(elapsed_ms(self.xp, self.emulated, fn) for _ in range(reps))


def elapsed_ms(xp, emulated: bool, fn) -> float:
    """Milliseconds of one fn() on the GPU by CUDA events around it (the host clock on the
    emulated device, whose launches are synchronous)."""
    if emulated:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, stop = xp.cuda.Event(), xp.cuda.Event()
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return xp.cuda.get_elapsed_time(start, stop)


def sm_count(dev) -> int:
    return dev.rt.sm_count


# ---- cvt.rna.tf32 ---------------------------------------------------------------------------
#: (input, cvt.rna.tf32 by hand) as in tests/test_cuda_warp.py
HAND = [(0x3F800000, 0x3F800000), (0x3F800FFF, 0x3F800000), (0x3F801000, 0x3F802000),
        (0xBF801000, 0xBF802000), (0x3F803000, 0x3F804000), (0x3F801001, 0x3F802000),
        (0x3FFFFFFF, 0x40000000), (0x7F7FEFFF, 0x7F7FE000), (0x7F7FFFFF, 0x7F800000),
        (0xFF7FFFFF, 0xFF800000), (0x00001000, 0x00002000), (0x00000FFF, 0x00000000),
        (0x80000FFF, 0x80000000), (0x807FFFFF, 0x80800000), (0x7F800000, 0x7F800000),
        (0xFF800000, 0xFF800000)]
NANS = [0x7FC00000, 0x7F800001, 0xFF801FFF, 0x7FFFE000, 0x7FBFFFFF]


#: the fp32 subnormal bit patterns, positive and negative: CuPy compiles with -ftz=true, so the
#: probe counts their mismatches apart (a flush there is -ftz's, not the rounding's)
SUBNORMALS = ((0x00000001, 0x007FFFFF), (0x80000001, 0x007FFFFF))  # (start, count)


def probe_cvt(dev, count=2**32, start=0, subnormal_count=None) -> dict:
    """cvt.rna.tf32 on `count` bit patterns from `start` against the model, then on the
    subnormal patterns alone (the first `subnormal_count` of each sign; default all): the
    verdict tells a mismatch on subnormal inputs only (-ftz) from one on normal inputs."""
    xp = dev.xp
    grid, block = (sm_count(dev) * 8, 256) if not dev.emulated else (2, 64)
    n = grid * block

    def run(start, count):
        mism, nanb = xp.zeros(n, np.uint64), xp.zeros(n, np.uint64)
        first = xp.zeros(n, np.uint32)
        dev.launch("cvt_exhaustive", grid, block, (np.uint64(start), np.uint64(count), mism, nanb, first))
        dev.sync()
        return dev.host(mism), dev.host(nanb), dev.host(first)

    t0 = time.perf_counter()
    mism, nanb, first = run(start, count)
    seconds = time.perf_counter() - t0
    firsts = sorted({int(f) for f, m in zip(first, mism) if m})[:8]
    subnormal_bad = sum(int(run(lo, min(c, subnormal_count or c))[0].sum()) for lo, c in SUBNORMALS)
    inputs = np.array([i for i, _ in HAND] + NANS, np.uint32)
    out = xp.zeros(inputs.size, np.uint32)
    dev.launch("cvt_list", 1, 32, (xp.asarray(inputs), out, np.int32(inputs.size)))
    got = dev.host(out)
    hand_bad = [f"0x{i:08x} -> 0x{g:08x} (expected 0x{e:08x})"
                for (i, e), g in zip(HAND, got[:len(HAND)]) if g != e]
    return {"inputs": count, "mismatches": int(mism.sum()), "nan_not_nan": int(nanb.sum()),
            "first_mismatches": [f"0x{f:08x}" for f in firsts], "hand_cases_wrong": hand_bad,
            "nan_results": {f"0x{i:08x}": f"0x{int(g):08x}" for i, g in zip(NANS, got[len(HAND):])},
            "seconds": round(seconds, 3), "subnormal_mismatches": subnormal_bad,
            "verdict": verdict_cvt(int(mism.sum()), int(nanb.sum()), hand_bad, subnormal_bad,
                                   count == 2**32)}


def verdict_cvt(mismatches, nan_bad, hand_bad, subnormal_bad, whole) -> str:
    """"bit-exact"; "bit-exact on normal inputs" when every mismatch of the whole range is a
    subnormal input's (-ftz's flush); else "DIFFERS"."""
    if not mismatches and not nan_bad and not hand_bad:
        return "bit-exact"
    subnormal_hand = all(int(case.split()[0], 16) & 0x7F800000 == 0 for case in hand_bad)
    if whole and not nan_bad and mismatches == subnormal_bad and subnormal_hand:
        return f"bit-exact on normal inputs; {subnormal_bad} subnormal inputs differ (-ftz)"
    return "DIFFERS"


# ---- mma: layouts and accumulation -----------------------------------------------------------
def exponent(x: Fraction) -> int:
    """floor(log2(x)) of a positive Fraction, exactly (the float estimate corrected)."""
    e = math.floor(math.log2(x.numerator) - math.log2(x.denominator))
    while Fraction(2) ** e > x:
        e -= 1
    while Fraction(2) ** (e + 1) <= x:
        e += 1
    return e


def exact_round(terms, bits: int, mode: str) -> float:
    """sum(terms) exactly, rounded once to a float of `bits` significand bits (24, 53), to
    nearest even ("rn") or toward zero ("rz"); normal range only (the probe's data)."""
    s = sum((Fraction(t) for t in terms), Fraction(0))  # floats and Fractions, exactly
    if s == 0:
        return 0.0
    sign, s = (-1 if s < 0 else 1), abs(s)
    ulp = Fraction(2) ** (exponent(s) - bits + 1)
    q, rest = divmod(s, ulp)
    if mode == "rn" and (rest > ulp / 2 or (rest == ulp / 2 and q % 2 == 1)):
        q += 1
    return sign * float(q * ulp)


#: the accumulation models the probe tells apart (emulation.MMA_ROUNDING's policies)
MODELS = ("rn", "rz", "aligned")


def aligned_truncate(terms, bits: int) -> float:
    """The "aligned" model: each term truncated toward zero at the `bits`-th bit below the
    largest term's leading bit, the exact sum of those truncated (emulation.h, mode 2)."""
    terms = [Fraction(t) for t in terms]
    largest = max(abs(t) for t in terms)
    if largest == 0:
        return 0.0
    quantum = Fraction(2) ** (exponent(largest) - bits + 1)
    kept = [(abs(t) // quantum) * quantum * (1 if t >= 0 else -1) for t in terms]
    return exact_round(kept, bits, "rz")


def mma_models(A, B, C, bits) -> dict:
    """{model: outputs} of each output C + sum_k A B by each accumulation model of MODELS (exact
    products; RN and RZ: one rounding of the exact sum; aligned: terms truncated first)."""
    m, n = C.shape
    out = {model: np.empty((m, n)) for model in MODELS}
    for i in range(m):
        for j in range(n):
            terms = [Fraction(float(C[i, j]))] + [Fraction(float(A[i, k])) * Fraction(float(B[k, j]))
                                                 for k in range(A.shape[1])]
            out["rn"][i, j] = exact_round(terms, bits, "rn")
            out["rz"][i, j] = exact_round(terms, bits, "rz")
            out["aligned"][i, j] = aligned_truncate(terms, bits)
    return out


def probe_mma(dev, tiles=8) -> dict:
    """Layouts on integer tiles (exact under every model), then which accumulation model the
    hardware's random tiles match: the mismatch count against each model is reported as
    measured; "neither" (no model matches every output) is a result, not an error, and nothing
    downstream depends on the answer (the accuracy tests bound the error instead)."""
    xp, rng = dev.xp, np.random.default_rng(22)
    out = {}
    for kind, (m, n, k), dtype, bits in (("tf32", (16, 8, 8), np.float32, 24), ("f64", (8, 8, 4), np.float64, 53)):
        def run(A, B, C):
            D = xp.zeros(C.shape, dtype)
            dev.launch(f"mma_{kind}_tiles", 1, 32 * A.shape[0], (xp.asarray(A), xp.asarray(B), xp.asarray(C), D))
            dev.sync()
            return dev.host(D)

        A = rng.integers(-8, 9, (tiles, m, k)).astype(dtype)
        B = rng.integers(-8, 9, (tiles, k, n)).astype(dtype)
        C = rng.integers(-64, 65, (tiles, m, n)).astype(dtype)
        layout_ok = bool(np.array_equal(run(A, B, C), A @ B + C))
        # random data with wide exponents (no subnormal: |terms| >= ~1e-9), operands TF32 for the
        # tf32 kind; C signed, so that sums cancel and the models differ
        A = rng.standard_normal((tiles, m, k)) * 2.0 ** rng.integers(-8, 9, (tiles, m, k))
        B = rng.standard_normal((tiles, k, n))
        C = rng.standard_normal((tiles, m, n)) * 4
        A, B, C = A.astype(dtype), B.astype(dtype), C.astype(dtype)
        if kind == "tf32":
            A, B = emulation.tf32_rna(A), emulation.tf32_rna(B)
        D = run(A, B, C)
        same = dict.fromkeys(MODELS, 0)
        for t in range(tiles):
            models = mma_models(A[t], B[t], C[t], bits)
            for model in MODELS:
                same[model] += int((D[t] == models[model].astype(dtype)).sum())
        total = D.size
        matching = [p for p in MODELS if same[p] == total]
        out[kind] = {"layout_on_integers": "exact" if layout_ok else "WRONG",
                     "random_outputs": total, "equal_to": same,
                     "mismatches": {p: total - same[p] for p in MODELS},
                     "accumulation": " = ".join(matching) if matching else "neither"}
    return out


# ---- rates and bandwidth ---------------------------------------------------------------------
def probe_rates(dev, iters=1024) -> dict:
    xp, sms = dev.xp, sm_count(dev)
    out = {}
    for kind, flops_per_mma, otype in (("tf32", 2 * 16 * 8 * 8, np.float32), ("f64", 2 * 8 * 8 * 4, np.float64)):
        best, by_warps = 0.0, {}
        for warps_per_sm in ((4, 8, 16, 32) if not dev.emulated else (1,)):
            block = 128 if not dev.emulated else 32
            grid = sms * warps_per_sm * 32 // block if not dev.emulated else 1
            n_iters = iters if not dev.emulated else 2
            sink = xp.zeros(grid * block, otype)
            ms = dev.time_ms(lambda: dev.launch(f"mma_{kind}_rate", grid, block, (np.int32(n_iters), sink)),
                             reps=5, warmup=1)
            flops = grid * block // 32 * n_iters * 8 * flops_per_mma
            tflops = flops / (ms * 1e-3) / 1e12
            by_warps[warps_per_sm] = round(tflops, 1)
            best = max(best, tflops)
        out[kind] = {"tflops_by_warps_per_sm": by_warps, "best_tflops": round(best, 1)}
    return out


def probe_bandwidth(dev) -> dict:
    xp, sms = dev.xp, sm_count(dev)
    size = 8192 if not dev.emulated else 128
    out = {}
    cases = [("fp32 64x64", 4, 64, 64), ("fp32 128x64", 4, 128, 64), ("fp64 64x64", 8, 64, 64),
             ("fp32 rows", 4, 1, size)]
    arrays = {}
    for label, itemsize, tr, tc in cases:
        if itemsize not in arrays:
            arrays[itemsize] = xp.ones((size, size * itemsize // 16, 4), np.uint32)
        x = arrays[itemsize]
        row_vecs, tile_vecs = size * itemsize // 16, tc * itemsize // 16
        best = {}
        for blocks_per_sm in ((2, 4, 8) if not dev.emulated else (1,)):
            grid = sms * blocks_per_sm if not dev.emulated else 2
            block = 256 if not dev.emulated else 64
            sink = xp.zeros(grid * block, np.uint32)
            ms = dev.time_ms(lambda: dev.launch("read_tiles", grid, block, (x, np.int32(size), np.int32(row_vecs),
                                                                             np.int32(tr), np.int32(tile_vecs), sink)))
            best[blocks_per_sm] = round(size * size * itemsize / (ms * 1e-3) / 1e12, 3)
        out[label] = {"tb_per_s_by_blocks_per_sm": best, "best_tb_per_s": max(best.values())}
    src = arrays[4]
    dst = xp.empty_like(src)
    if not dev.emulated:
        ms = dev.time_ms(lambda: dst.__setitem__(Ellipsis, src))
        out["cupy copy (read + write)"] = {"best_tb_per_s": round(2 * src.nbytes / (ms * 1e-3) / 1e12, 3)}
    return out


# ---- the device, and the kernel cache --------------------------------------------------------
def probe_device(dev) -> dict:
    if dev.emulated:
        return {"gpu": "host emulation"}
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    info = {"gpu": name, "sm_count": props["multiProcessorCount"], "cupy": cupy.__version__,
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cupy.cuda.runtime.driverGetVersion()}
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        info["nvidia_smi"] = repr(exc)
    return info


CACHE_CHILD = r"""
import json, time
t0 = time.perf_counter()
from lorakern._cuda import launch
from lorakern import LOSSES
import numpy as np
rt = launch.CupyRuntime()
names = tuple(launch.kernel_names(np.float32, 16, 64, 64, False, False).values())
t1 = time.perf_counter()
module = rt.module(launch.module_source(LOSSES["squared"]), names)
for name in names:
    rt.kernel(module, name, 0).num_regs
t2 = time.perf_counter()
print(json.dumps({"module_s": round(t2 - t1, 3), "compiles": rt.compiles, "cache_hits": rt.cache_hits}))
"""


def probe_kernel_cache(out_dir: Path) -> dict:
    import tempfile

    cache = Path(tempfile.mkdtemp(prefix="lorakern-cupy-cache-"))  # empty; not under $OUT (cubins)
    env = {**os.environ, "CUPY_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("CUPY_CACHE_IN_MEMORY", None)
    runs = []
    for seed in ("1", "2"):
        proc = subprocess.run([sys.executable, "-c", CACHE_CHILD], env={**env, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            return {"error": proc.stderr[-2000:]}
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    ok = second["compiles"] == 0 and second["cache_hits"] == 1
    return {"first_process": first, "second_process": second,
            "verdict": "cache hit in the second process" if ok else "NO CACHE HIT"}


# ---- timing of today's kernel ---------------------------------------------------------------
_ENGINES: dict = {}


def time_row(m, r, dtype, device="cuda", steps=STEPS, kernel="simt", stages=None, tiles=None) -> dict:
    """ms per step of run_steps (``steps`` steps, CUDA graphs), median of 3 after a first run
    (compile, capture), with the fused kernel ``kernel`` (launch.KERNEL; ``stages``: the mma
    kernel's launch.MMA_STAGES, default the launcher's; ``tiles``: launch.TILES, default the
    launcher's), and the run's last loss. ``device``: "cuda", or the emulated device (the
    self-test)."""
    from lorakern._cuda import launch, matrix
    from lorakern.results import DEVICE_HISTORY_COLUMNS
    from lorakern._dispatch import bind
    from lorakern.testing import make_case, random_adapters

    if (m, dtype) not in _ENGINES:  # one problem (its data on the GPU) per size and dtype
        _ENGINES.clear()
        _ENGINES[m, dtype] = bind(make_case((m, m, 1), dtype, seed=0)[0], device)
    engine = _ENGINES[m, dtype]
    B, A = random_adapters(m, m, r, dtype, seed=1)
    emulated = device != "cuda"

    last = {}

    def run():
        saved = launch.KERNEL, launch.MMA_STAGES, launch.TILES
        launch.KERNEL = kernel
        launch.MMA_STAGES = launch.MMA_STAGES if stages is None else stages
        launch.TILES = launch.TILES if tiles is None else tiles
        try:
            result = matrix.run_steps(engine.problem, engine.data, B, A, steps)
            plan = launch.plan(engine.problem, engine.data, r)
            last["stages"], last["tile"] = plan.stages, f"{plan.bm}x{plan.bn}"
        finally:
            launch.KERNEL, launch.MMA_STAGES, launch.TILES = saved
        assert result.diverged_at is None, f"diverged at step {result.diverged_at}"
        last["loss"] = float(result.history[-1, DEVICE_HISTORY_COLUMNS.index("loss")])

    run()  # compile, capture
    times = [elapsed_ms(engine.xp, emulated, run) / steps for _ in range(3)]
    return {"ms_per_step": round(statistics.median(times), 4), "all": [round(t, 4) for t in times],
            "kernel": kernel, "loss_last": last["loss"], "tile": last["tile"],
            **({"stages": last["stages"]} if kernel == "mma" else {})}

#: rows where the mma kernel is also timed with 2 copy stages (fused.cu's double buffer): the
#: pipeline depth's knock-out
KNOCKOUT_ROWS = [(8192, 16, "float32"), (8192, 16, "float64")]
#: fp32 rows where the mma kernel is also timed on 128 x 64 tiles (one warp column; not the
#: launcher's default yet: cuda-floor.md's tile for fp32 at small ranks)
WIDE_ROWS = [(8192, 4, "float32"), (8192, 16, "float32"), (16384, 16, "float32")]


def time_both(m, r, dtype, calib, device="cuda", steps=STEPS) -> dict:
    """Today's kernel, the floor, and the mma kernel beside it (its failure recorded apart)."""
    out = {**time_row(m, r, dtype, device, steps), "floor": floor_ms(m, r, dtype, calib)}
    try:
        out["mma"] = time_row(m, r, dtype, device, steps, kernel="mma")
        if (m, r, dtype) in KNOCKOUT_ROWS and out["mma"].get("stages") != 2:
            out["mma_2_stages"] = time_row(m, r, dtype, device, steps, kernel="mma", stages=(2,))
        if (m, r, dtype) in WIDE_ROWS:
            out["mma_128x64"] = time_row(m, r, dtype, device, steps, kernel="mma", tiles=((128, 64),))
    except Exception:  # noqa: BLE001 - keep today's timing of the row
        out["mma"] = {**out.get("mma", {}), "error": traceback.format_exc()[-3000:]}
    return out


def floor_ms(m, r, dtype, calib) -> dict | None:
    try:
        bw = max(v["best_tb_per_s"] for k, v in calib["bandwidth"].items() if "copy" not in k) * 1e12
        rates = calib["rates"]
        rate = (rates["tf32"]["best_tflops"] / 3 if dtype == "float32" else rates["f64"]["best_tflops"]) * 1e12
    except (KeyError, TypeError, ValueError):
        return None
    itemsize = 4 if dtype == "float32" else 8
    memory = (m * m + 3 * 2 * m * r) * itemsize / bw * 1e3
    compute = 6 * m * m * r / rate * 1e3
    return {"memory_ms": round(memory, 4), "compute_ms": round(compute, 4), "floor_ms": round(max(memory, compute), 4)}


# ---- the linear kind against PyTorch ------------------------------------------------------------
#: the issue's linear rows: (N, n = m, r, dtype, loss). Squared takes the "moments" exact norm
#: (C0 + B (A Sigma), float64), huber the cheaper of "gram" and "tiles" on the device's costs.
LINEAR_ROWS = [(8192, 4096, 16, "float32", "squared"), (8192, 4096, 16, "float32", "huber")]


def time_linear(N, n, r, dtype, loss, device="cuda", steps=10, rounds=5) -> dict:
    """ms per step of the linear kind's host loop (fused_pass, theorem eta, update; nothing
    waits for the host) with the exact norm and with the certified bound, and of PyTorch's
    step of the same LoRA layer (TF32 off; forward X W0^T + (X A^T) B^T, the loss, autograd,
    an SGD update) where torch has CUDA: the median of ``rounds`` rounds of ``steps`` steps
    after one warm-up round, CUDA events (perf_counter on the emulated device)."""
    import lorakern
    from lorakern._dispatch import bind
    from lorakern.testing import random_adapters, random_linear_data

    emulated = device != "cuda"
    rng = np.random.default_rng([N, n, r])
    X, Y, W0 = random_linear_data(rng, N, n, n, np.dtype(dtype), loss=loss, w0_scale=1 / math.sqrt(n))
    problem = lorakern.LinearProblem(X, Y, W0, loss=loss)
    B0, A0 = random_adapters(n, n, r, dtype, seed=1)
    engine = bind(problem, device)
    xp = engine.xp

    def timed(body):
        body()  # the first round compiles and prepares
        times = [elapsed_ms(xp, emulated, body) / steps for _ in range(rounds)]
        return {"ms_per_step": round(statistics.median(times), 4), "min": round(min(times), 4),
                "max": round(max(times), 4)}

    out = {"strategy": problem.norm_strategy_for("cuda", r),
           "errors": _linear_errors(engine, problem, X, Y, W0, B0, A0)}
    for norm in ("exact", "bound"):
        policy = lorakern.Theorem(norm=norm)
        last = {}

        def run(policy=policy, norm=norm, last=last):
            B, A = engine.asarray(B0), engine.asarray(A0)
            for _ in range(steps):
                p = engine.fused_pass(B, A, norm=norm)
                eta, _ = policy.choose(engine, B, A, p, {})
                B, A = engine.update(B, A, p.grad_B, p.grad_A, eta)
            last["loss"] = float(p.loss)

        out[norm] = {**timed(run), "loss_last": last.get("loss")}
    if not emulated:
        out["torch"] = _torch_linear_step(X, Y, W0, B0, A0, loss, problem.delta, timed, steps)
    return out


def _linear_errors(engine, problem, X, Y, W0, B0, A0) -> dict:
    """The device's exact pass at (B0, A0) against the same numbers in float64 on the device's
    own arrays (a residual loss: Delta = loss'(X (W0 + B A)^T - Y), G = Delta^T X / N): relative
    errors, and the verdict against lorakern.testing.tolerance (fp32 rounding of the data)."""
    from lorakern.testing import tolerance

    xp = engine.xp
    X64, Y64, W64, B64, A64 = (xp.asarray(a, dtype=np.float64) for a in (X, Y, W0, B0, A0))
    N = X64.shape[0]
    d = X64 @ (W64 + B64 @ A64).T - Y64
    value, Delta = problem.loss.array_pointwise(xp, d, None, problem.delta)
    del d
    G = (Delta.T @ X64) / N
    want = {"loss": float(value.sum()) / N, "g_sq": float(xp.sum(G * G)),
            "grad_B": G @ A64.T, "grad_A": B64.T @ G}
    p = engine.fused_pass(engine.asarray(B0), engine.asarray(A0))
    errors = {}
    for name, w in want.items():
        got = getattr(p, name)
        if isinstance(w, float):
            errors[name] = abs(float(got) - w) / max(abs(w), 1e-300)
        else:
            diff = xp.asarray(got, dtype=np.float64) - w
            errors[name] = float(xp.sqrt(xp.sum(diff * diff) / xp.sum(w * w)))
    limit = tolerance(problem.dtype)
    return {**{k: float(f"{v:.2e}") for k, v in errors.items()}, "tolerance": limit,
            "verdict": "ok" if max(errors.values()) <= limit else "TOO FAR"}


def _torch_linear_step(X, Y, W0, B0, A0, loss, delta, timed, steps) -> dict:
    """PyTorch's step of the same layer on the GPU, TF32 off, as a LoRA user writes it."""
    try:
        import torch
    except ImportError as exc:
        return {"error": f"no torch: {exc}"}
    if not torch.cuda.is_available():
        return {"error": "torch has no CUDA"}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    Xt, Yt, Wt = (torch.as_tensor(a, device=dev) for a in (X, Y, W0))
    N = Xt.shape[0]

    def run():
        B = torch.as_tensor(B0, device=dev).clone().requires_grad_(True)
        A = torch.as_tensor(A0, device=dev).clone().requires_grad_(True)
        for _ in range(steps):
            Z = Xt @ Wt.T + (Xt @ A.T) @ B.T
            if loss == "squared":
                J = 0.5 * ((Z - Yt) ** 2).sum() / N
            else:
                J = torch.nn.functional.huber_loss(Z, Yt, reduction="sum", delta=delta) / N
            gB, gA = torch.autograd.grad(J, (B, A))
            with torch.no_grad():
                B -= 1e-3 * gB
                A -= 1e-3 * gA

    return timed(run)


def sanitize(device="cuda"):
    """A few small fused passes and steps of both kernels (every dtype, a mask, labels, odd
    shapes, two rank bounds, several blocks), each checked against the reference: run under
    compute-sanitizer --tool memcheck / racecheck (ci/gpu.sh with GPU_SANITIZE=1)."""
    import lorakern
    from lorakern._cuda import launch
    from lorakern.testing import compare_pass, make_case

    if device == "cuda":
        import lorakern._cuda as cuda_backend
        device = cuda_backend.DEVICE
    cases = [((300, 260, 16), "float32", "squared", False), ((257, 263, 5), "float32", "huber", True),
             ((130, 150, 33), "float64", "logistic", True), ((200, 190, 16), "float64", "squared", False)]
    saved = launch.KERNEL
    try:
        for kernel in launch.KERNELS:
            launch.KERNEL = kernel
            for shape, dtype, loss, masked in cases:
                problem, B, A = make_case(shape, np.dtype(dtype), loss=loss, masked=masked, seed=1, delta=0.5)
                compare_pass(problem, B, A, device)
                lorakern.fit(problem, B, A, steps=2, device=device, step_size="theorem")
                print(f"sanitize: {kernel} {'x'.join(map(str, shape))} {dtype} {loss}"
                      f"{' masked' if masked else ''}: ok", flush=True)
    finally:
        launch.KERNEL = saved
    sanitize_linear(device)


def sanitize_linear(device):
    """The linear kind's three CUDA routes (the fused pass on (Z0, X A^T, B^T), the float64
    moments pass, linear_pointwise for a kept Delta) at an odd shape, against the reference."""
    import lorakern
    from lorakern import reference
    from lorakern._dispatch import bind
    from lorakern.testing import assert_close, random_linear_data

    N, n, m, r = 301, 67, 45, 5
    for loss, strategy, norm, dtype in (("squared", "moments", "exact", "float32"),
                                        ("huber", "tiles", "exact", "float64"),
                                        ("logistic", "gram", "exact", "float32"),
                                        ("logistic", "auto", "bound", "float64")):
        dt = np.dtype(dtype)
        rng = np.random.default_rng([N, n, m, r])
        X, Y, W0 = random_linear_data(rng, N, n, m, dt, loss=loss, w0_scale=1 / math.sqrt(n))
        problem = lorakern.LinearProblem(X, Y, W0, loss=loss, norm_strategy=strategy)
        B = (0.5 * rng.standard_normal((m, r))).astype(dt)
        A = (0.5 * rng.standard_normal((r, n))).astype(dt)
        engine = bind(problem, device)
        got = engine.fused_pass(engine.asarray(B), engine.asarray(A), norm=norm)
        want = reference.fused_pass(problem, None, B, A, norm=norm)
        for name in ("grad_B", "grad_A", "loss", "g_sq"):
            value = getattr(got, name)
            value = np.asarray(device.to_host(value)) if hasattr(value, "shape") and value.shape else float(value)
            assert_close(value, getattr(want, name), dt, name)
        print(f"sanitize: linear {N}x{n}x{m}x{r} {dtype} {loss} {strategy} {norm}: ok", flush=True)


# ---- the commands ----------------------------------------------------------------------------
def save(path: Path, data: dict):
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def section(results: dict, name: str, fn, path: Path | None):
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception:  # noqa: BLE001 - record and go on: one failed probe must not cost the others
        results[name] = {"error": traceback.format_exc()[-3000:]}
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 2)
    print(f"[{name}] {json.dumps(results[name])[:400]}", flush=True)
    if path is not None:
        save(path, results)


def calibrate(out_dir: Path, emulated=False):
    dev = Device(emulated)
    path = out_dir / "calibrate.json"
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    section(results, "device", lambda: probe_device(dev), path)
    if not emulated:
        section(results, "kernel_cache", lambda: probe_kernel_cache(out_dir), path)
    section(results, "cvt", lambda: probe_cvt(dev, count=2**32 if not emulated else 2**14,
                                              start=0 if not emulated else 0x3F7FE000,
                                              subnormal_count=None if not emulated else 2**10), path)
    section(results, "mma", lambda: probe_mma(dev, tiles=8 if not emulated else 2), path)
    section(results, "rates", lambda: probe_rates(dev), path)
    section(results, "bandwidth", lambda: probe_bandwidth(dev), path)
    return results


def timing(out_dir: Path):
    path = out_dir / "timing.json"
    calib = json.loads((out_dir / "calibrate.json").read_text()) if (out_dir / "calibrate.json").exists() else {}
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "steps": STEPS, "rows": {}}
    for m, r, dtype in ROWS:
        key = f"{m} r{r} {dtype}"
        section(results["rows"], key, lambda: time_both(m, r, dtype, calib), None)
        save(path, results)
    return results


def linear(out_dir: Path):
    path = out_dir / "linear.json"
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": {}}
    for N, n, r, dtype, loss in LINEAR_ROWS:
        key = f"{N} {n} r{r} {dtype} {loss}"
        section(results["rows"], key, lambda: time_linear(N, n, r, dtype, loss), None)
        save(path, results)
    return results


def linear_table(rows: dict) -> list[str]:
    """The linear rows' lines of the table (``linear.json``'s rows)."""
    if not rows:
        return []
    lines = ["", "The linear kind, per step of the host loop (fused_pass, theorem eta, update) against "
                 "PyTorch's step (TF32 off); median of 5 rounds of 10 steps (min-max):", "",
             "| N | n = m | r | dtype | loss | exact norm | exact ms | bound ms | torch ms "
             "| torch / exact | torch / bound | against float64 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, v in rows.items():
        if key == "seconds":  # section()'s record of each row's time
            continue
        N, n, r, dtype, loss = key.split()
        if "exact" not in v:
            lines.append(f"| {N} | {n} | {r[1:]} | {dtype} | {loss} | error | | | | | | |")
            continue
        torch_ = v.get("torch") or {}

        def cell(x):
            return f"{x['ms_per_step']:.3f} ({x['min']:.3f}-{x['max']:.3f})" if "ms_per_step" in x else "error"

        def ratio(x):
            return (f"{torch_['ms_per_step'] / x['ms_per_step']:.1f}x"
                    if "ms_per_step" in torch_ and "ms_per_step" in x else "-")

        err = v.get("errors") or {}
        errors = (f"{err.get('verdict')} (max {max(x for k, x in err.items() if k not in ('verdict', 'tolerance')):.1e})"
                  if "verdict" in err else "?")
        lines.append(f"| {N} | {n} | {r[1:]} | {dtype} | {loss} | {v.get('strategy')} | {cell(v['exact'])} "
                     f"| {cell(v['bound'])} | {cell(torch_) if torch_ else '-'} | {ratio(v['exact'])} "
                     f"| {ratio(v['bound'])} | {errors} |")
    return lines


def table(out_dir: Path) -> str:
    calib = json.loads((out_dir / "calibrate.json").read_text()) if (out_dir / "calibrate.json").exists() else {}
    timing_ = json.loads((out_dir / "timing.json").read_text()) if (out_dir / "timing.json").exists() else {}
    lines = [f"# GPU probe, {calib.get('date', '?')}: {calib.get('device', {}).get('gpu', '?')}", ""]
    steps = out_dir / "steps.txt"  # ci/gpu.sh's line per step: exit, seconds, limit, NVRTC misses
    if steps.exists():
        lines += [f"- {line.strip('= ')}" for line in steps.read_text().splitlines() if line.strip()] + [""]
    cvt, mma = calib.get("cvt", {}), calib.get("mma", {})
    lines += [f"- kernel cache: {calib.get('kernel_cache', {}).get('verdict', calib.get('kernel_cache'))}",
              f"- cvt.rna.tf32 over {cvt.get('inputs', '?')} inputs: {cvt.get('verdict', cvt.get('error', '?'))} "
              f"(mismatches {cvt.get('mismatches')}, of them on subnormal inputs "
              f"{cvt.get('subnormal_mismatches')}, NaN not NaN {cvt.get('nan_not_nan')}, "
              f"NaN results {cvt.get('nan_results')})"]
    for kind in ("tf32", "f64"):
        v = mma.get(kind, {})
        counts = ", ".join(f"{p} {n}" for p, n in (v.get("mismatches") or {}).items())
        lines.append(f"- mma {kind}: layout {v.get('layout_on_integers')}, accumulation {v.get('accumulation')} "
                     f"(outputs unlike each model, of {v.get('random_outputs')}: {counts or '?'})")
    for kind, v in calib.get("rates", {}).items():
        if isinstance(v, dict) and "best_tflops" in v:
            lines.append(f"- mma {kind} rate: {v['best_tflops']} TFLOP/s (by warps per SM {v['tflops_by_warps_per_sm']})")
    for label, v in calib.get("bandwidth", {}).items():
        if isinstance(v, dict) and "best_tb_per_s" in v:
            lines.append(f"- read {label}: {v['best_tb_per_s']} TB/s {v.get('tb_per_s_by_blocks_per_sm', '')}")
    lines += ["", f"Per step of the {timing_.get('steps', STEPS)}-step device loop (run_steps, CUDA events, "
                  "median of 3): today's kernel (simt) and the tensor-core kernel (mma, v2); "
                  "'last loss' is the mma run's relative difference from the simt run's:", "",
              "| m = n | r | dtype | simt ms | mma ms | floor ms (memory / compute) | simt of floor "
              "| mma of floor | mma speed-up | last loss |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key, v in timing_.get("rows", {}).items():
        if key == "seconds":  # section()'s record of each row's time
            continue
        m, r, dtype = key.split()
        if "ms_per_step" not in v:
            lines.append(f"| {m} | {r[1:]} | {dtype} | error | | | | | | |")
            continue
        f = v.get("floor") or {}
        frac = f"{100 * f['floor_ms'] / v['ms_per_step']:.0f} %" if f else "?"
        mma = v.get("mma") or {}
        if "ms_per_step" in mma:
            mma_ms, mma_frac = f"{mma['ms_per_step']:.3f}", (f"{100 * f['floor_ms'] / mma['ms_per_step']:.0f} %"
                                                             if f else "?")
            speedup = f"{v['ms_per_step'] / mma['ms_per_step']:.2f}x"
            a, b = v.get("loss_last"), mma.get("loss_last")
            agree = f"{abs(b - a) / max(abs(a), 1e-300):.1e}" if a is not None and b is not None else "?"
        else:
            mma_ms, mma_frac, speedup, agree = ("error" if "error" in mma else "-"), "", "", ""
        lines.append(f"| {m} | {r[1:]} | {dtype} | {v['ms_per_step']:.3f} | {mma_ms} | "
                     f"{f.get('floor_ms', '?')} ({f.get('memory_ms', '?')} / {f.get('compute_ms', '?')}) | {frac} "
                     f"| {mma_frac} | {speedup} | {agree} |")
    linear_ = json.loads((out_dir / "linear.json").read_text()) if (out_dir / "linear.json").exists() else {}
    lines += linear_table(linear_.get("rows", {}))
    # the mma kernel's knock-outs: (timing key, title, the default's label, the knock-out's label)
    for name, title, default_label, label in (
            ("mma_2_stages", "Copy stages of the mma kernel (launch.MMA_STAGES):",
             lambda v: f"{v.get('stages', '?')} stages", "2 stages"),
            ("mma_128x64", "Tiles of the mma kernel (launch.TILES):",
             lambda v: v.get("tile", "64x64"), "128x64")):
        rows = [(key, v["mma"], v[name]) for key, v in timing_.get("rows", {}).items()
                if key != "seconds" and "ms_per_step" in v.get(name, {}) and "ms_per_step" in v.get("mma", {})]
        if rows:
            lines += ["", title, ""]
            lines += [f"- {key}: {default_label(default)} {default['ms_per_step']:.3f} ms, "
                      f"{label} {knock['ms_per_step']:.3f} ms" for key, default, knock in rows]
    return "\n".join(lines)


def check_imports() -> list[str]:
    """Every import statement of this file (the commands import inside their functions) resolved
    here: a module or name that moved fails on this machine, not on the GPU's. CuPy and torch
    are the GPU machine's (reported when absent here, not failed). Returns the problems."""
    import ast
    import importlib

    optional = ("cupy", "torch")
    problems = []
    for node in ast.walk(ast.parse(Path(__file__).read_text())):
        if isinstance(node, ast.Import):
            pairs = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            pairs = [(node.module, alias.name) for alias in node.names]
        else:
            continue
        for module, name in pairs:
            try:
                found = importlib.import_module(module)
                if name is not None and not hasattr(found, name):
                    importlib.import_module(f"{module}.{name}")  # a submodule
            except ImportError as exc:
                if module.split(".")[0] in optional:
                    print(f"gpu_probe dry run: {module} is not installed here (the GPU machine has it)")
                else:
                    problems.append(f"line {node.lineno}: {module}{'.' + name if name else ''}: {exc}")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("calibrate", "timing", "linear", "table", "selftest", "sanitize"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results/gpu-probe")))
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: resolve every import of the commands; 'table' renders what --out holds")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        problems = check_imports()
        for problem in problems:
            print(f"gpu_probe dry run: cannot import {problem}")
        if args.command == "table":
            print(table(args.out))
        print(f"gpu_probe dry run: {args.command}: {'ok' if not problems else 'FAILED'}")
        sys.exit(1 if problems else 0)
    if args.command == "calibrate":
        calibrate(args.out)
    elif args.command == "timing":
        timing(args.out)
    elif args.command == "linear":
        linear(args.out)
    elif args.command == "sanitize":
        sanitize()
    elif args.command == "table":
        text = table(args.out)
        (args.out / "table.md").write_text(text + "\n")
        print(text)
    else:
        results = calibrate(args.out, emulated=True)
        bad = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
        print(table(args.out))
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
