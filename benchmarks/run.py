"""Time the CPU benchmarks and write benchmarks/results/cpu-<date>.md (with the JSON beside it).

    python benchmarks/run.py            # everything in bench_cpu.py and bench_losses.py
    python benchmarks/run.py --quick    # only m = n = 4096, r = 16 (a few minutes less)
    python benchmarks/run.py -k numpy   # pytest -k passthrough (combined with --quick)
    python benchmarks/run.py -- --benchmark-min-rounds=10   # more pytest options after --

The markdown has one table per kind of benchmark: the "step" groups (lorakern-cpu vs
the plain NumPy step and the reference) with the speed-up over numpy, and the "loss"
groups (masked, huber, logistic vs the squared step) with each one's time relative to
the squared step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FILES = ("bench_cpu.py", "bench_losses.py")
QUICK = "m4096 and r16"

# kind of group -> (peer, how to compare, column heading of a ratio)
KINDS = {
    "step": ("numpy", "speed-up", "{peer} / {impl}"),
    "loss": ("lorakern-cpu", "relative time", "{impl} / {peer}"),
}
SHORT = {"lorakern-cpu-masked": "masked", "lorakern-cpu-huber": "huber",
         "lorakern-cpu-logistic": "logistic"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only m = n = 4096, r = 16")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="folder for the .md and .json (default benchmarks/results)")
    parser.add_argument("--name", help="file name without extension "
                        "(default cpu-<date>, cpu-<date>-quick with --quick)")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="do not run: write the markdown for an existing JSON file")
    parser.add_argument("pytest_args", nargs="*", help="more pytest options, after --")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from lorakern.benchmarking import machine_line, now

    if args.from_json:
        json_path = args.from_json
        md_path = json_path.with_suffix(".md")
        command = "(from an earlier run)"
    else:
        date = datetime.date.today().isoformat()
        name = args.name or f"cpu-{date}" + ("-quick" if args.quick else "")
        args.out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = args.out / f"{name}.json", args.out / f"{name}.md"
        keyword = " and ".join(f"({k})" for k in (args.keyword, QUICK if args.quick else None) if k)
        cmd = [sys.executable, "-m", "pytest", *(f"benchmarks/{f}" for f in FILES),
               "--benchmark-enable", f"--benchmark-json={json_path}", "-p", "no:cacheprovider"]
        if keyword:
            cmd += ["-k", keyword]
        cmd += args.pytest_args
        command = "python " + shlex.join(cmd[1:]).replace(str(ROOT) + os.sep, "")
        print("+", command, flush=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        if not json_path.exists():
            print(f"pytest exited with {rc} and wrote no {json_path}", file=sys.stderr)
            return rc or 1
        if rc:
            print(f"warning: pytest exited with {rc}; the table has what did run", file=sys.stderr)

    data = json.loads(json_path.read_text())
    info = data.get("machine_info", {}).get("lorakern")
    try:
        when = datetime.datetime.fromisoformat(data["datetime"]).astimezone()
        date = when.strftime("%Y-%m-%d %H:%M %Z")
    except (KeyError, ValueError):
        date = now()
    md = markdown(data, machine_line(info), date, command)
    md_path.write_text(md)
    print(md)
    print(f"wrote {md_path} and {json_path}")
    return 0


def _group_key(group: str):
    """'step m=n=4096 r=16 float32' -> ('step', (4096, 16, 'float32'))."""
    kind, _, rest = group.partition(" ")
    found = re.match(r"m=n=(\d+) r=(\d+) (\w+)", rest)
    return kind, ((int(found[1]), int(found[2]), found[3]) if found else (0, 0, rest))


def markdown(data: dict, machine: str, date: str, command: str) -> str:
    from lorakern.benchmarking import COMPARISONS

    by_group: dict[str, dict[str, dict]] = {}
    for bench in data["benchmarks"]:
        impl = bench.get("extra_info", {}).get("impl") or bench["name"]
        by_group.setdefault(bench["group"] or "", {})[impl] = bench["stats"]
    out = [
        "# lorakern CPU benchmarks", "",
        f"- Date: {date}",
        f"- Machine: {machine}",
        f"- Command: `{command}`",
        "- Cells: median time of one full step (gradients, norms, the theorem's eta, the update), "
        "in ms, over pytest-benchmark's rounds (at least 5, after one warm-up call); "
        "the last column gives the rounds.", "",
    ]
    kinds: dict[str, list[str]] = {}
    for group in sorted(by_group, key=_group_key):
        kinds.setdefault(_group_key(group)[0], []).append(group)
    order = list(KINDS)
    for kind in sorted(kinds, key=lambda k: (order.index(k) if k in order else len(order), k)):
        groups = kinds[kind]
        peer, meaning, heading = KINDS.get(kind, (None, "", ""))
        impls = list(dict.fromkeys(i for g in groups for i in by_group[g]))
        impls.sort(key=lambda i: list(COMPARISONS).index(i) if i in COMPARISONS else len(COMPARISONS))
        others = [i for i in impls if i != peer] if peer in impls else []
        label = {i: SHORT.get(i, i) for i in impls}
        if kind == "loss" and peer:
            label[peer] = "squared"
        out.append(f"## {kind}")
        out.append("")
        if others:
            if meaning == "speed-up":
                out.append(f"Ratios: {peer}'s median over each one's (> 1: faster than {peer}).")
            else:
                out.append(f"Ratios: each one's median over the {label[peer]} step's "
                           f"({label[peer]} is {peer}; > 1: slower than {label[peer]}).")
            out.append("")
        head = ["group"] + [f"{label[i]} (ms)" for i in impls]
        head += [heading.format(peer=label[peer], impl=label[i]) for i in others] + ["rounds"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|---|" + "---:|" * (len(head) - 1))
        for group in groups:
            stats = by_group[group]
            med = {i: s["median"] for i, s in stats.items()}
            cells = [group.partition(" ")[2] or group]
            cells += [f"{med[i] * 1e3:.1f}" if i in med else "-" for i in impls]
            for i in others:
                if i in med and peer in med:
                    ratio = med[peer] / med[i] if meaning == "speed-up" else med[i] / med[peer]
                    cells.append(f"{ratio:.2f}x")
                else:
                    cells.append("-")
            cells.append("/".join(str(stats[i]["rounds"]) for i in impls if i in stats))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
