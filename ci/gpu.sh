#!/usr/bin/env bash
# The GPU session's one prepared script, on a machine with an NVIDIA GPU and CuPy: at most 8
# minutes (480 s, every step at its limit), the table printed last. Results go to $OUT (the
# device tool's folder, which brings back 8 files) or to benchmarks/results/gpu-<date>/:
# calibrate.json, timing.json, linear.json, table.md, steps.txt and logs.tgz (each step's log
# and junit XML). In order, what it measures:
#   1. precompile: every NVRTC module the later steps ask for (benchmarks/gpu_modules.py:
#      launch.all_modules("sm_90") and the probe's, 294) compiled at once over the machine's
#      cores into CuPy's disk cache (lorakern._cuda.precompile), and the Numba kernels
#      of the CPU comparisons warmed into Numba's cache beside it; each later step reports the
#      modules it still had to compile ("compiled in the step").
#   2. calibrate (benchmarks/gpu_probe.py): CuPy's kernel cache across two processes;
#      cvt.rna.tf32 on all 2^32 inputs against the emulation's model; the mma layouts on
#      integer tiles and the accumulation's rounding measured on random tiles (RN, RZ or
#      neither, with the mismatch counts); mma.sync TF32 and DMMA rates; read bandwidth in
#      tile order against a CuPy copy.
#   3. tests: tests/test_cuda.py's GPU cases (the five run_steps cases that failed on the H200
#      among them).
#   4. timing: the 200-step device loop at each row of the goals, today's kernel (simt) and the
#      tensor-core pass (mma) beside it, the knock-outs (2 copy stages; 128 x 64 fp32 tiles), the
#      floor from step 2's rates.
#   5. linear: the linear kind's step (exact norm, bound) against PyTorch's, N = 8192,
#      m = n = 4096, r = 16, fp32, squared and huber.
#   6. mma-tests: tests/test_cuda_mma.py's GPU cases (every loss and mask, ranks 1-128, copy
#      stages, 128 x 64 tiles, fp32 accuracy against the fp32 FMA kernel, bitwise reruns).
#   7. torch: CUDA tensors through lorakern (tests/test_dlpack.py, tests/test_torch.py, and
#      lorakern.torch's GPU cases: the optimizer, the line search, the taps; -k cuda).
#   8. the table.
# The host-only tests (tests/test_cuda_warp.py, tests/test_gpu_probe.py: the emulation's
# models) run in CI, not here.
#
# Each step has its own limit, at least twice its predicted time (benchmarks/NOTES.md, "ci/gpu.sh
# fits its minutes", says how each is predicted); a step that fails or runs out is reported and
# the next still runs; the limits, each with its 5 s kill grace, and the preflight add up to at
# most 480 s. Fails at once if no GPU answers.
#
#   bash ci/gpu.sh              the run (on the GPU machine)
#   bash ci/gpu.sh --plan       the steps, predictions and limits, checked (no GPU, no Python)
#   bash ci/gpu.sh --dry-run    (or GPU_DRY_RUN=1) no GPU: the plan; every module of the first
#                               step through NVRTC's front end for sm_90 where CuPy imports
#                               (GPU_DRY_RUN_FULL=1: whole cubins), else one of each kind by nvcc,
#                               else skipped, said so; every import of the probe; every pytest
#                               line collected with its -k; stops before the first launch
# GPU_SANITIZE=1 adds compute-sanitizer memcheck and racecheck (benchmarks/gpu_probe.py sanitize),
# GPU_FULL=1 benchmarks/bench_cuda.py's CuPy and PyTorch comparisons: each several minutes, a run
# of its own, outside the 480 s.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

MODE=run
case "${1:-}" in
    "") [ "${GPU_DRY_RUN:-0}" = 1 ] && MODE=dry ;;
    --dry-run) MODE=dry ;;
    --plan) MODE=plan ;;
    *) echo "usage: bash ci/gpu.sh [--plan | --dry-run]" >&2; exit 2 ;;
esac

BUDGET=480   # seconds for the whole run
PREFLIGHT=15 # seconds before the first step: CuPy's import and device count, nvidia-smi
GRACE=5      # timeout's --kill-after for a step that ignores SIGTERM
PY=${PYTHON:-python}
# pytest without the project's addopts (pyproject's "--benchmark-disable" exits 4 where
# pytest-benchmark is missing): plugins change nothing on these lines
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider -o addopts=)
JOBS=$(nproc 2>/dev/null || echo 4)

status=0
planned=0
plan_lines=()
last_step=""

# step NAME PREDICTED LIMIT KIND ARGS...: KIND "probe" (gpu_probe.py ARGS), "pytest" (pytest
# ARGS), "precompile" (gpu_modules.py compile)
step() {
    local name=$1 predicted=$2 limit=$3 kind=$4
    shift 4
    last_step=$name
    if [ "$MODE" = plan ]; then
        planned=$((planned + limit + GRACE))
        local ok=ok
        [ "$limit" -ge $((2 * predicted)) ] || { ok="LIMIT UNDER 2 x PREDICTED"; status=1; }
        plan_lines+=("$(printf '%-10s predicted %4d s  limit %4d s  %s' "$name" "$predicted" "$limit" "$ok")")
        return
    fi
    local cmd
    case $kind in
        precompile) cmd=("$PY" benchmarks/gpu_modules.py compile --jobs "$JOBS" --warm-numba "$@") ;;
        probe) cmd=("$PY" benchmarks/gpu_probe.py "$@" --out "$out") ;;
        pytest) cmd=("${PYTEST[@]}" "$@" --junitxml="$logs/$name.xml") ;;
    esac
    if [ "$MODE" = dry ]; then
        case $kind in
            precompile) cmd=("$PY" benchmarks/gpu_modules.py compile --dry-run --arch sm_90 --jobs "$JOBS"
                             ${GPU_DRY_RUN_FULL:+--full}) ;;
            probe) cmd+=(--dry-run) ;;
            pytest) cmd=("${PYTEST[@]}" "$@" --collect-only) ;;
        esac
        echo "== dry $name: ${cmd[*]}"
        local start=$SECONDS
        "${cmd[@]}" > "$logs/$name.log" 2>&1
        local rc=$?
        tail -3 "$logs/$name.log"
        echo "== dry $name: exit $rc after $((SECONDS - start)) s"
        # pytest exits 5 when nothing is collected (a -k or a path that selects nothing)
        [ "$rc" -eq 0 ] || { echo "== dry $name: FAILED (exit $rc)"; tail -30 "$logs/$name.log"; status=1; }
        return
    fi
    local start=$SECONDS
    echo "== $name (predicted ${predicted} s, limit ${limit} s)"
    local shown=40
    [ "$name" = table ] && shown=1000  # the table whole: the run's last output
    timeout --kill-after=$GRACE "$limit" "${cmd[@]}" 2>&1 | tee "$logs/$name.log" | tail -n $shown
    local rc=${PIPESTATUS[0]}
    local compiled=""
    if [ "$kind" != precompile ] && [ -e "$cached" ]; then
        # the modules the cache gained in the step: by name, not by mtime (a file written within
        # the filesystem's timestamp granularity of the last listing would not be -newer it)
        compiled=", compiled in the step: $(cache_files | LC_ALL=C comm -13 "$cached" - | wc -l) modules"
    fi
    local line="== $name: exit $rc after $((SECONDS - start)) s (predicted ${predicted} s, limit ${limit} s$compiled)"
    echo "$line" >> "$out/steps.txt"
    [ "$name" = table ] && [ "$rc" -eq 0 ] || echo "$line"  # the table stays the last output
    [ "$rc" -eq 0 ] || status=1
    [ "$kind" = precompile ] || [ -e "$cached" ] && cache_files > "$cached"
}

cache_files() {  # CuPy's cache entries, sorted, without its names files and partial writes
    find "$CUPY_CACHE_DIR" -type f ! -name '*.names.json' ! -name '*.tmp' 2>/dev/null | LC_ALL=C sort
}

# the run: name, predicted seconds, limit, what (predictions: benchmarks/NOTES.md, 2026-12-07)
steps() {
    step precompile 40 80 precompile
    step calibrate 20 40 probe calibrate
    step tests 25 50 pytest tests/test_cuda.py -k "not emulated"
    step timing 55 110 probe timing
    step linear 20 45 probe linear
    step mma-tests 20 45 pytest tests/test_cuda_mma.py -k gpu
    step torch 15 30 pytest tests/test_dlpack.py tests/test_torch.py tests/test_torch_optimizer.py \
        tests/test_torch_search.py tests/test_torch_capture.py -k cuda
    [ "$MODE" = run ] && extras
    step table 3 10 probe table
}

extras() {  # GPU_SANITIZE=1, GPU_FULL=1: outside the 480 s, before the table
    if [ "${GPU_SANITIZE:-0}" = 1 ]; then  # compute-sanitizer over small passes of both kernels, linear routes
        for tool in memcheck racecheck; do
            echo "== sanitize-$tool"
            timeout --kill-after=$GRACE 240 compute-sanitizer --tool "$tool" --error-exitcode 1 \
                "$PY" benchmarks/gpu_probe.py sanitize 2>&1 | tee "$logs/sanitize-$tool.log" | tail -20
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        done
    fi
    if [ "${GPU_FULL:-0}" = 1 ]; then  # the CuPy and PyTorch comparisons too (several more minutes)
        timeout 600 "${PYTEST[@]}" benchmarks/bench_cuda.py --benchmark-enable --benchmark-json="$logs/bench.json" \
            --benchmark-columns=median,iqr,rounds || status=1
        "$PY" benchmarks/gpu_table.py "$logs/bench.json" > "$out/bench.md" || status=1
        cat "$out/bench.md"
    fi
    return 0
}

check_plan() {
    local saved=$MODE
    MODE=plan
    planned=$PREFLIGHT
    plan_lines=()
    steps
    MODE=$saved
    printf '%s\n' "${plan_lines[@]}"
    echo "preflight ${PREFLIGHT} s + limits + ${GRACE} s kill grace each: ${planned} s of ${BUDGET} s"
    [ "$planned" -le "$BUDGET" ] || { echo "ci/gpu.sh: the limits add up to more than ${BUDGET} s"; status=1; }
    [ "$last_step" = table ] || { echo "ci/gpu.sh: the table must be the last step"; status=1; }
}

check_plan
if [ "$MODE" = plan ] || [ "$status" -ne 0 ]; then
    exit $status
fi

if [ "$MODE" = dry ]; then
    out=$(mktemp -d "${TMPDIR:-/tmp}/lorakern-gpu-dry.XXXXXX")
    logs=$out
    echo "== dry run (no GPU): logs in $out"
    bash -n "$0" || status=1
    steps
    echo "== dry run: $([ "$status" -eq 0 ] && echo ok || echo FAILED); stopped before the first launch"
    exit $status
fi

# $OUT keeps few files (the device tool brings back 8): the probe's JSON files, table.md,
# steps.txt and logs.tgz (every step's log and junit XML, nvidia-smi), packed at the end
out="${OUT:-benchmarks/results/gpu-$(date -u +%Y-%m-%d)}"
logs="$out/logs"
mkdir -p "$out" "$logs"
cached=$(mktemp "${TMPDIR:-/tmp}/lorakern-gpu-cached.XXXXXX") && rm -f "$cached"  # listed after the precompile
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-$HOME/.cupy/kernel_cache}"
mkdir -p "$CUPY_CACHE_DIR"
"$PY" - <<'PY' || exit 1
import sys
try:
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # noqa: BLE001
    sys.exit(f"ci/gpu.sh needs CuPy and a CUDA device: {exc}")
if count < 1:
    sys.exit("ci/gpu.sh: no CUDA device")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total \
    --format=csv | tee "$logs/nvidia-smi.txt"

steps
tar czf "$out/logs.tgz" -C "$out" logs && rm -rf "$logs"
rm -f "$cached"
exit $status
