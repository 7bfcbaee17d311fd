#!/usr/bin/env bash
# The GPU checks of issue 3 in one call, on a machine with an NVIDIA GPU and CuPy:
#   1. the CUDA tests (equivalence with the reference, bit-identical reruns, fit on the GPU
#      against fit on the CPU, no per-step synchronisation) and the nvcc compile checks;
#   2. the GPU benchmarks, timed, into benchmarks/results/gpu-<date>.json and a markdown table
#      (GPU name, date, ratios, fraction of the floor) in benchmarks/results/gpu-<date>.md.
# Fails at once if no GPU answers (the tests alone would skip).
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import sys
try:
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # noqa: BLE001
    sys.exit(f"ci/gpu.sh needs CuPy and a CUDA device: {exc}")
if count < 1:
    sys.exit("ci/gpu.sh: no CUDA device")
props = cupy.cuda.runtime.getDeviceProperties(0)
print("GPU:", props["name"].decode() if isinstance(props["name"], bytes) else props["name"])
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv || true

python -m pytest tests/test_cuda.py tests/test_cuda_compile.py -q -rs -p no:cacheprovider

stamp=$(date -u +%Y-%m-%d)
out=benchmarks/results/gpu-$stamp
mkdir -p benchmarks/results
python -m pytest benchmarks/bench_cuda.py -q -p no:cacheprovider \
    --benchmark-enable --benchmark-json="$out.json" --benchmark-columns=median,iqr,rounds
python benchmarks/gpu_table.py "$out.json" > "$out.md"
cat "$out.md"
echo "wrote $out.json and $out.md"
