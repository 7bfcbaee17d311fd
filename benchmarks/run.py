"""Time the CPU benchmarks and write benchmarks/results/cpu-<date>.md (with the JSON beside it).

    python benchmarks/run.py            # everything in bench_cpu.py and bench_losses.py
    python benchmarks/run.py --quick    # only m = n = 4096, r = 16 (a few minutes less)
    python benchmarks/run.py -k numpy   # pytest -k passthrough (combined with --quick)
    python benchmarks/run.py -- --benchmark-min-rounds=10   # more pytest options after --

The markdown has one table per kind of benchmark: the "step" groups (lorakern-cpu vs
the plain NumPy step and the reference) with the speed-up over numpy, and the "loss"
groups (masked, huber, logistic vs the squared step) with each one's time relative to
the squared step; pytest-benchmark times each implementation in its own block. Then the
interleaved comparison (``lorakern.benchmarking.interleaved_records``, what ``lorakern bench``
runs): lorakern-cpu and numpy at 4096^2 alternating round by round, as in a program that
mixes them, each ratio the median of the round-by-round ratios with its quartiles (issue 11).
Every table comes from ``lorakern.benchmarking.ratio_table``, the one markdown writer.
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

# kind of group -> (peer, how to compare: "speed-up" = peer / impl, else impl / peer)
KINDS = {
    "step": ("numpy", "speed-up"),
    "loss": ("lorakern-cpu", "relative time"),
}
# the interleaved comparison (lorakern.benchmarking.interleaved_records, as `lorakern bench`)
INTERLEAVED = dict(sizes=((4096, 4096),), ranks=(4, 16, 64), dtypes=("float32", "float64"),
                   impls=("lorakern-cpu", "numpy"), peer="numpy")
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
    parser.add_argument("--no-interleaved", action="store_true",
                        help="skip the interleaved comparison (lorakern-cpu and numpy, round by round)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest options, after --")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from lorakern.benchmarking import MAX_ROUNDS, MIN_ROUNDS, ROUND_BUDGET_S, interleaved_records, machine_line, now

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
        if not args.no_interleaved:
            spec = dict(INTERLEAVED, ranks=(16,) if args.quick else INTERLEAVED["ranks"])
            bench = (f"lorakern bench --m {spec['sizes'][0][0]} --ranks {' '.join(map(str, spec['ranks']))} "
                     f"--dtypes {' '.join(spec['dtypes'])}")
            print("+", bench, "(in this process)", flush=True)
            data = json.loads(json_path.read_text())
            data["lorakern_interleaved"] = {
                "command": bench, "impls": spec["impls"], "peer": spec["peer"],
                "rounds": f"Rounds: as many as fit in ~{ROUND_BUDGET_S:g} s per row, at least "
                          f"{MIN_ROUNDS}, at most {MAX_ROUNDS}, after one warm-up call",
                "records": interleaved_records(**spec)}
            json_path.write_text(json.dumps(data, indent=1))

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
    from lorakern.benchmarking import COMPARISONS, Row, Stats, ratio_table, records_markdown

    by_group: dict[str, dict[str, dict]] = {}
    for bench in data["benchmarks"]:
        impl = bench.get("extra_info", {}).get("impl") or bench["name"]
        by_group.setdefault(bench["group"] or "", {})[impl] = bench["stats"]
    out = [
        "# lorakern CPU benchmarks", "",
        f"- Date: {date}",
        f"- Machine: {machine}",
        f"- Command: `{command}`",
        "- Cells: median time (quartiles) of one full step (gradients, norms, the theorem's eta, the update), "
        "in ms, over pytest-benchmark's rounds (at least 5, after one warm-up call), each "
        "implementation timed in its own block; the last column gives the rounds.", "",
    ]
    kinds: dict[str, list[str]] = {}
    for group in sorted(by_group, key=_group_key):
        kinds.setdefault(_group_key(group)[0], []).append(group)
    order = list(KINDS)
    for kind in sorted(kinds, key=lambda k: (order.index(k) if k in order else len(order), k)):
        groups = kinds[kind]
        peer, meaning = KINDS.get(kind, (None, ""))
        impls = list(dict.fromkeys(i for g in groups for i in by_group[g]))
        impls.sort(key=lambda i: list(COMPARISONS).index(i) if i in COMPARISONS else len(COMPARISONS))
        names = {i: SHORT.get(i, i) for i in impls}
        if kind == "loss" and peer:
            names[peer] = "squared"
        out += [f"## {kind} (blocks)", ""]
        if peer in impls:
            out.append(f"Ratios: {peer}'s median over each one's (> 1: faster than {peer})."
                       if meaning == "speed-up" else
                       f"Ratios: each one's median over the {names[peer]} step's ({names[peer]} is "
                       f"{peer}; > 1: slower than {names[peer]}).")
            out.append("")
        rows = [Row(cells=[group.partition(" ")[2] or group],
                    times={i: Stats.from_pytest(s) for i, s in by_group[group].items()})
                for group in groups]
        out += ratio_table(rows, labels=["group"], impls=impls, peer=peer, names=names,
                           direction="peer/impl" if meaning == "speed-up" else "impl/peer")
        out.append("")
    interleaved = data.get("lorakern_interleaved")
    if interleaved:
        out += ["## step (interleaved: what a user sees)", "",
                f"Command: `{interleaved['command']}`. {interleaved['rounds']}. Each round runs every "
                "implementation once, in the same order, so each runs right after the other as in "
                "a program that mixes them; the ratio is taken round by round.", ""]
        out += records_markdown(interleaved["records"], interleaved["impls"], interleaved["peer"])
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
