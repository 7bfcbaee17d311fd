#!/usr/bin/env bash
# The GPU session's one prepared script (at most ~7 minutes, the table printed last), on a
# machine with an NVIDIA GPU and CuPy. Results go to $OUT (the device tool's folder) or to
# benchmarks/results/gpu-<date>/:
#   1. calibrate (~1-2 min): the tensor-core design's assumptions first (benchmarks/gpu_probe.py):
#      CuPy's kernel cache across two processes, cvt.rna.tf32 on all 2^32 inputs against the
#      emulation's model, mma layouts and their accumulation (RN or RZ), mma.sync TF32 and DMMA
#      rates, read bandwidth in tile order against a CuPy copy;
#   2. correctness (~2-3 min): tests/test_cuda.py (the GPU cases; the five that failed on the
#      H200 before run_steps copied NumPy inputs to the device among them), tests/test_cuda_warp.py
#      and tests/test_gpu_probe.py (host-only: the models the probes compare against);
#   3. timing (~2 min): the fused step, 200-step device loop, each row of the goals, today's kernel
#      (simt) and v2 (mma) beside it (and its knock-outs: 2 copy stages, 128 x 64 fp32 tiles),
#      with the floor from step 1's rates (GPU_FULL=1 adds
#      benchmarks/bench_cuda.py's CuPy and PyTorch comparisons, several minutes more);
#   3b. the linear kind (~30 s): its step (exact norm, bound) against PyTorch's at N = 8192,
#      m = n = 4096, r = 16, fp32 (benchmarks/gpu_probe.py linear);
#   4. the tensor-core pass v2's correctness (~1 min, mostly NVRTC): tests/test_cuda_mma.py's GPU
#      cases (launch.KERNEL = "mma": every loss and mask, ranks 1-128, copy stages, fp32 accuracy
#      against the fp32 FMA kernel on random and near-converged data, bitwise reruns, run_steps);
#   5. the torch CUDA-tensor tests (~40 s): tests/test_dlpack.py, tests/test_torch.py -k cuda;
#   6. the table.
# GPU_SANITIZE=1 adds compute-sanitizer memcheck and racecheck over small passes of both kernels
# and the linear kind's three routes (benchmarks/gpu_probe.py sanitize; several minutes: a run of
# its own).
# Each step has its own time limit, so that one hang cannot eat the others' minutes; a step that
# fails is reported and the next still runs. The limits add up to 7 minutes (420 s); the timing
# saves each row as it goes, so a cut-off loses only the last rows. Fails at once if no GPU answers.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/results/gpu-$(date -u +%Y-%m-%d)}"
mkdir -p "$out"
status=0

python - <<'PY' || exit 1
import sys
try:
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # noqa: BLE001
    sys.exit(f"ci/gpu.sh needs CuPy and a CUDA device: {exc}")
if count < 1:
    sys.exit("ci/gpu.sh: no CUDA device")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv | tee "$out/nvidia-smi.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -40
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

step calibrate 70 python benchmarks/gpu_probe.py calibrate --out "$out"
step tests 95 python -m pytest tests/test_cuda.py tests/test_cuda_warp.py tests/test_gpu_probe.py \
    -k "not emulated" -q -rs -p no:cacheprovider --junitxml="$out/tests.xml"
step timing 105 python benchmarks/gpu_probe.py timing --out "$out"
# the linear kind against PyTorch's step (N = 8192, m = n = 4096, r = 16 fp32; squared: the
# moments norm, huber: gram or tiles by cost; exact and bound)
step linear 35 python benchmarks/gpu_probe.py linear --out "$out"
# v2 (fused_mma.cu) on the GPU: its own cases only ("gpu" in the id; the emulated ones are for
# CI). After the timing: its ~35 NVRTC modules must not cost the table its rows
step mma-tests 80 python -m pytest tests/test_cuda_mma.py -k "gpu" -q -rs -p no:cacheprovider \
    --junitxml="$out/mma-tests.xml"
# CUDA tensors through lorakern (DLPack intake, the stream handovers, cuda:<i>, the optimizer's
# CuPy norms): written without a GPU, never run on one before (issue 23)
step torch 35 python -m pytest tests/test_dlpack.py tests/test_torch.py -k "cuda" -q -rs \
    -p no:cacheprovider --junitxml="$out/torch.xml"
if [ "${GPU_SANITIZE:-0}" = 1 ]; then  # compute-sanitizer over small passes of both kernels, linear routes
    for tool in memcheck racecheck; do
        step "sanitize-$tool" 240 compute-sanitizer --tool "$tool" --error-exitcode 1 \
            python benchmarks/gpu_probe.py sanitize
    done
fi
if [ "${GPU_FULL:-0}" = 1 ]; then  # the CuPy and PyTorch comparisons too (several more minutes)
    step bench 600 python -m pytest benchmarks/bench_cuda.py -q -p no:cacheprovider \
        --benchmark-enable --benchmark-json="$out/bench.json" --benchmark-columns=median,iqr,rounds
    python benchmarks/gpu_table.py "$out/bench.json" > "$out/bench.md" || status=1
fi
echo
python benchmarks/gpu_probe.py table --out "$out" || status=1
exit $status
