"""Turn the pytest-benchmark JSON of bench_cuda.py into the markdown table of benchmarks/results.

    python benchmarks/gpu_table.py benchmarks/results/gpu-<date>.json > benchmarks/results/gpu-<date>.md

Times are the medians of CUDA-event timings of back-to-back runs (extra_info["event_ms_all"]);
where a run has none (--benchmark-disable), pytest-benchmark's. Ratios "x / lorakern-cuda" are
x's median over lorakern-cuda's (> 1: lorakern is faster), with the quartiles. The markdown
is written by lorakern.benchmarking.ratio_table, the writer of the CPU tables too. The floor of a
step is max(bytes of R read once / copy bandwidth, 6 m n r flops / fp32 FMA rate), both rates
measured in the same run (group "cuda floor"); "of floor" is the floor over lorakern's time.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lorakern.benchmarking import Row, Stats, ratio_table  # noqa: E402  (the one markdown writer)

PEERS = ("lorakern-cuda-loop", "cupy", "torch")


def stats(bench: dict) -> Stats:
    """Seconds: the CUDA-event timings where the run has them, else pytest-benchmark's."""
    info = bench.get("extra_info", {})
    if info.get("event_ms_all"):
        return Stats.of(info["event_ms_all"]).scaled(1e-3)
    if "event_ms" in info:
        return Stats.of([info["event_ms"]]).scaled(1e-3)
    return Stats.from_pytest(bench["stats"])


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
    lines += ["", "Median ms of CUDA-event timings of back-to-back runs; `x / lorakern-cuda` is x's "
              "time over lorakern-cuda's (> 1: lorakern faster).", ""]

    def floor_s(row):
        e = row.info
        itemsize = 4 if e.get("dtype", "float32") == "float32" else 8
        return max(e["m"] * e["n"] * itemsize / (bandwidth * 1e9), 6 * e["m"] * e["n"] * e["r"] / (fma * 1e12))

    extra = {}
    if bandwidth and fma:
        extra = {"floor (ms)": lambda row: f"{floor_s(row) * 1e3:.3f}",
                 "of floor": lambda row: f"{100 * floor_s(row) / row.times['lorakern-cuda'].median:.0f}%"}
    rows = []
    for name in sorted(g for g in groups if g.startswith("cuda step")):
        impls = groups[name]
        if "lorakern-cuda" in impls:
            rows.append(Row(cells=[name.removeprefix("cuda step ")],
                            times={i: stats(b) for i, b in impls.items()},
                            info=impls["lorakern-cuda"]["extra_info"]))
    if rows:
        lines += ratio_table(rows, labels=["step"], impls=["lorakern-cuda", *PEERS], peer="lorakern-cuda",
                             direction="impl/peer", extra=extra)
    for name in sorted(g for g in groups if g.startswith("cuda fit")):
        impls = groups[name]
        order = [i for i in ("fused_step x200", "fit", "run_steps") if i in impls]
        lines += ["", f"**{name}** (ms for all the steps)", ""]
        lines += ratio_table([Row(cells=[name.removeprefix("cuda fit ")],
                                  times={i: stats(impls[i]) for i in order})],
                             labels=["run"], impls=order, peer="fused_step x200", direction="impl/peer")
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
