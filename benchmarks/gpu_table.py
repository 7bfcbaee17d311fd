"""Turn the pytest-benchmark JSON of bench_cuda.py into the markdown table of benchmarks/results.

    python benchmarks/gpu_table.py benchmarks/results/gpu-<date>.json > benchmarks/results/gpu-<date>.md

Times are the medians of CUDA-event timings of back-to-back runs (extra_info["event_ms"]);
where a run has none (--benchmark-disable), pytest-benchmark's median is used. Ratios
"x / lorakern" are x's median over lorakern-cuda's (> 1: lorakern is faster). The floor of a
step is max(bytes of R read once / copy bandwidth, 6 m n r flops / fp32 FMA rate), both rates
measured in the same run (group "cuda floor"); "of floor" is the floor over lorakern's time.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def median_ms(bench: dict) -> float:
    info = bench.get("extra_info", {})
    if "event_ms" in info:
        return float(info["event_ms"])
    return float(bench["stats"]["median"]) * 1e3


def table(report: dict) -> str:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in report["benchmarks"]:
        groups[bench["group"]][bench["extra_info"].get("impl", bench["name"])] = bench
    info = next((b["extra_info"] for b in report["benchmarks"] if "gpu" in b.get("extra_info", {})), {})
    floor = groups.get("cuda floor", {})
    bandwidth = floor["copy"]["extra_info"].get("GB_per_s") if "copy" in floor else None
    fma = floor["fma"]["extra_info"].get("TFLOP_per_s") if "fma" in floor else None

    lines = ["# GPU benchmarks", ""]
    gpu = info.get("gpu", "unknown GPU")
    lines.append(f"GPU: {gpu} ({info.get('sm_count', '?')} SMs), CUDA runtime {info.get('cuda_runtime', '?')}, "
                 f"driver {info.get('cuda_driver', '?')}, CuPy {info.get('cupy', '?')}"
                 + (f", PyTorch {info['torch']}" if "torch" in info else "")
                 + f". Date: {report.get('datetime', '?')}.")
    if bandwidth and fma:
        lines.append(f"Floor rates: copy bandwidth {bandwidth:.0f} GB/s, fp32 FMA {fma:.1f} TFLOP/s.")
    lines += ["", "Median ms of CUDA-event timings of back-to-back runs; `x / lorakern` is x's time over "
              "lorakern-cuda's (> 1: lorakern faster).", ""]

    peers = ["lorakern-cuda-loop", "cupy", "torch"]
    header = ["step", "lorakern-cuda (ms)"] + [f"{p} (ms)" for p in peers] + \
             [f"{p} / lorakern" for p in peers] + ["floor (ms)", "of floor"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * (len(header) - 1))
    for name in sorted(g for g in groups if g.startswith("cuda step")):
        impls = groups[name]
        if "lorakern-cuda" not in impls:
            continue
        ours = median_ms(impls["lorakern-cuda"])
        cells = [name.removeprefix("cuda step "), f"{ours:.3f}"]
        cells += [f"{median_ms(impls[p]):.3f}" if p in impls else "-" for p in peers]
        cells += [f"{median_ms(impls[p]) / ours:.2f}x" if p in impls else "-" for p in peers]
        e = impls["lorakern-cuda"]["extra_info"]
        if bandwidth and fma:
            itemsize = 4 if e.get("dtype", "float32") == "float32" else 8
            floor_ms = max(e["m"] * e["n"] * itemsize / (bandwidth * 1e9),
                           6 * e["m"] * e["n"] * e["r"] / (fma * 1e12)) * 1e3
            cells += [f"{floor_ms:.3f}", f"{100 * floor_ms / ours:.0f}%"]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")

    for name in sorted(g for g in groups if g.startswith("cuda fit")):
        impls = groups[name]
        lines += ["", f"**{name}** (ms for all steps; per step in parentheses)", "",
                  "| implementation | ms | vs fused_step x200 |", "|---|---:|---:|"]
        base = median_ms(impls["fused_step x200"]) if "fused_step x200" in impls else None
        for impl, bench in impls.items():
            ms, steps = median_ms(bench), bench["extra_info"].get("steps", 1)
            ratio = f"{ms / base:.3f}" if base else "-"
            lines.append(f"| {impl} | {ms:.2f} ({ms / steps:.3f}) | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        sys.stdout.write(table(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
