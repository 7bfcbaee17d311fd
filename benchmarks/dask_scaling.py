"""The fused step on a Dask cluster against one worker and against one process (issue 10).

    python benchmarks/dask_scaling.py                      # 8192 x 8192, r=16, fp32, 9 rounds
    python benchmarks/dask_scaling.py --long 1000          # and per-step time over 1000 steps
    python benchmarks/dask_scaling.py --out benchmarks/results/dask-<date>.md

Configurations, all on the same data (two row shards of m/2 rows, made on the workers by
dask's random generator; the one-process runs compute the same arrays locally):

    dask 2x1     LocalCluster, 2 worker processes with 1 thread each (1 Numba thread a task)
    dask 1x1     LocalCluster, 1 worker process with 1 thread: the same two shards in turn
    cpu 2 thr    lorakern's CPU step in this process, 2 Numba threads (the one-machine fit)
    cpu 1 thr    the same with 1 Numba thread: what one worker's kernel time would be

A round times ``--steps`` steps of each configuration (the pass, the theorem's eta and the
update, as fit runs them) and the order rotates every round; cells are the median ms per
step over the rounds, with min-max. The engine's per-step overhead is given two ways: dask
1x1 minus cpu 1 thr (the same single-thread kernel work), and the step time of a problem of
one row per shard (same n, r, shard count: nothing left but the engine). The load average
of the machine is printed with the results: other jobs on a shared machine skew timings.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lorakern  # noqa: E402
from lorakern import _dispatch  # noqa: E402
from lorakern.step_size import THEOREM  # noqa: E402


#: Dask settings for a cluster whose scheduler, client and workers share the cores that run
#: the kernels (this benchmark's LocalClusters on a 2-core machine): the periodic work each
#: Dask process does while idle, made rarer. Measured on the 2-core development machine, CPU
#: ms per second of a LocalCluster of 2 workers doing nothing (main process; each worker):
#: Dask's defaults 55-88; 50-53; these settings 13; 5. ``--dask-defaults`` runs without them.
QUIET = {
    "distributed.admin.tick.interval": "1s",               # event-loop health check, 20 ms
    "distributed.worker.profile.enabled": False,           # stack samples every 10 ms
    "distributed.admin.system-monitor.interval": "5s",     # CPU/memory/network plots, 500 ms
    "distributed.worker.memory.monitor-interval": "1s",    # spill/pause/terminate checks, 100 ms
}


#: seconds over which the clusters' CPU use is measured while idle
IDLE_S = 4.0


def cluster(workers: int):
    """(LocalCluster, Client): ``workers`` processes, 1 thread each (the current Dask
    settings are passed on to the worker processes)."""
    import distributed

    c = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                 dashboard_address=":0", silence_logs=40)
    return c, distributed.Client(c, set_as_default=False)


def random_arrays(m, n, dtype, shards, seed=0):
    """W0, Y as dask arrays of ``shards`` row chunks, drawn on the workers."""
    import dask.array as da

    rng = da.random.default_rng(seed)
    chunks = (-(-m // shards), n)
    return (rng.standard_normal((m, n), dtype=dtype, chunks=chunks),
            rng.standard_normal((m, n), dtype=dtype, chunks=chunks))


def sharded_problem(client, W0, Y):
    with client.as_current():
        return lorakern.Problem(W0, Y)


def engine_for(problem, client=None):
    """The Engine fit uses: the problem on a DaskDevice of ``client``, or on the CPU."""
    if client is None:
        return _dispatch.bind(problem, "cpu")
    from lorakern._dask import DaskDevice

    return _dispatch.bind(problem, DaskDevice(client, "cpu"))


def run_steps(engine, B, A, steps):
    """``steps`` steps as fit runs them (pass, the theorem's eta, update); the last iterate."""
    for _ in range(steps):
        p = engine.fused_pass(B, A)
        eta, _ = THEOREM.choose(engine, B, A, p, {})
        B, A = engine.update(B, A, p.grad_B, p.grad_A, eta)
    return B, A


def timed(fn, *args):
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=5, help="steps per configuration per round")
    ap.add_argument("--long", type=int, default=0, help="steps of the long run (dask 2x1)")
    ap.add_argument("--out", help="also write the markdown here")
    ap.add_argument("--dask-defaults", action="store_true",
                    help="run the clusters with Dask's default settings instead of QUIET")
    args = ap.parse_args(argv)
    import dask
    import numba

    if not args.dask_defaults:
        dask.config.set(QUIET)

    m, n, r, dtype = args.m, args.n, args.r, np.dtype(args.dtype)
    (c2, client2), (c1, client1) = cluster(2), cluster(1)
    W0, Y = random_arrays(m, n, dtype, shards=2)
    problems = {"dask 2x1": sharded_problem(client2, W0, Y),
                "dask 1x1": sharded_problem(client1, W0, Y)}
    local = lorakern.Problem(W0.compute(scheduler="threads"), Y.compute(scheduler="threads"))
    B, A = lorakern.init_adapters(m, n, r, dtype=dtype, seed=1, init="gaussian")
    engines = {"dask 2x1": engine_for(problems["dask 2x1"], client2),
               "dask 1x1": engine_for(problems["dask 1x1"], client1),
               "cpu 2 thr": engine_for(local), "cpu 1 thr": engine_for(local)}
    threads = {"cpu 2 thr": min(2, numba.config.NUMBA_NUM_THREADS), "cpu 1 thr": 1}
    tiny = engine_for(sharded_problem(client2, *random_arrays(2, n, dtype, shards=2)), client2)
    Bt, At = lorakern.init_adapters(2, n, r, dtype=dtype, seed=1, init="gaussian")

    import psutil

    procs = [psutil.Process()] + [psutil.Process(nanny.process.process.pid)
                                  for c in (c2, c1) for nanny in c.workers.values()]
    cpu_ms = {}  # name -> CPU ms per step of this process and every worker, per round

    def cpu_seconds():
        return sum(t.user + t.system for t in (p.cpu_times() for p in procs))

    def one(name, steps):
        engine, b, a = (tiny, Bt, At) if name == "engine only" else (engines[name], B, A)
        numba.set_num_threads(threads.get(name, numba.config.NUMBA_NUM_THREADS))
        before = cpu_seconds()
        wall = timed(run_steps, engine, b, a, steps) / steps
        cpu_ms.setdefault(name, []).append((cpu_seconds() - before) / steps * 1e3)
        return wall

    names = list(engines) + ["engine only"]
    for name in names:  # warm-up: compile on every worker and here
        one(name, 1)
    # the same iterate everywhere: the shard layout's bits, to rounding of the one-process fit
    got = run_steps(engines["dask 2x1"], B, A, 3)
    want = run_steps(engines["cpu 2 thr"], B, A, 3)
    drift = max(float(np.max(np.abs(g - w)) / np.max(np.abs(w))) for g, w in zip(got, want))
    # what the two clusters (this process: client, schedulers, nannies; and the 3 workers)
    # burn while nothing runs: taken from the cores the kernels run on
    time.sleep(1.0)
    before = cpu_seconds()
    time.sleep(IDLE_S)
    idle_ms = (cpu_seconds() - before) / IDLE_S * 1e3

    times = {name: [] for name in names}
    loads = []
    for k in range(args.rounds):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            times[name].append(one(name, args.steps) * 1e3)
        loads.append(os.getloadavg()[0])
        print(f"round {k + 1}/{args.rounds}: " + ", ".join(
            f"{name} {times[name][-1]:.1f}" for name in names) + f" ms; load {loads[-1]:.1f}",
            file=sys.stderr)

    med = {name: statistics.median(v) for name, v in times.items()}
    lines = [
        f"# lorakern on Dask: {m} x {n}, r = {r}, {dtype}",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{platform.machine()}, {os.cpu_count()} cores; load average (1 min) over the "
        f"rounds: {min(loads):.1f} to {max(loads):.1f} (median {statistics.median(loads):.1f})",
        f"- Command: `python benchmarks/dask_scaling.py {' '.join(argv or sys.argv[1:])}`",
        f"- {args.rounds} interleaved rounds of {args.steps} steps per configuration; ms per step "
        f"(median, min-max). Two row shards of {-(-m // 2)} rows.",
        "- Dask settings: " + ("Dask's defaults" if args.dask_defaults else
                               ", ".join(f"`{k}: {v}`" for k, v in QUIET.items())),
        f"- Both clusters idle: {idle_ms:.0f} CPU ms per second (this process and the 3 workers)",
        f"- dask 2x1 after 3 steps against cpu 2 thr: max |difference| / max |value| = "
        f"{drift:.1e} (B and A)",
        "",
        "| configuration | ms / step | min-max |",
        "|---|---:|---|",
    ]
    for name in names:
        label = {"engine only": "dask 2x1, 1 row per shard (engine only)"}.get(name, name)
        lines.append(f"| {label} | {med[name]:.1f} | {min(times[name]):.1f}-"
                     f"{max(times[name]):.1f} |")
    per_round = {key: [a / b for a, b in zip(times[x], times[y])]
                 for key, (x, y) in {"1x1 / 2x1": ("dask 1x1", "dask 2x1"),
                                     "2x1 / cpu 2 thr": ("dask 2x1", "cpu 2 thr")}.items()}
    cpu_med = {name: statistics.median(v[-args.rounds:]) for name, v in cpu_ms.items()}
    lines += ["", "CPU time per step of this process and all workers (median over the rounds; "
              "unlike wall time, it does not count waiting for a core):", "",
              "| configuration | CPU ms / step |", "|---|---:|"]
    lines += [f"| {name} | {cpu_med[name]:.1f} |" for name in names]
    lines += [
        "",
        f"- engine CPU per step: dask 1x1 - cpu 1 thr = "
        f"{cpu_med['dask 1x1'] - cpu_med['cpu 1 thr']:.1f} ms; dask 2x1 - cpu 1 thr = "
        f"{cpu_med['dask 2x1'] - cpu_med['cpu 1 thr']:.1f} ms",
        f"- speed-up of 2 workers over 1 (dask 1x1 / dask 2x1): {med['dask 1x1'] / med['dask 2x1']:.2f}x "
        f"(per round {min(per_round['1x1 / 2x1']):.2f}-{max(per_round['1x1 / 2x1']):.2f}; aim >= 1.6)",
        f"- dask 2x1 / cpu 2 thr: {med['dask 2x1'] / med['cpu 2 thr']:.2f}x "
        f"(per round {min(per_round['2x1 / cpu 2 thr']):.2f}-{max(per_round['2x1 / cpu 2 thr']):.2f}; "
        f"aim <= 1.3)",
        f"- engine overhead per step: dask 1x1 - cpu 1 thr = "
        f"{med['dask 1x1'] - med['cpu 1 thr']:.1f} ms; a step of 1 row per shard = "
        f"{med['engine only']:.1f} ms",
    ]
    lines += ["", *task_bodies(engines["dask 2x1"], client2, B, A, 2 * args.steps)]
    if args.long:
        lines += ["", *long_run(engines["dask 2x1"], client2, B, A, args.long)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    for c in (client2, client1):
        c.close()
    for c in (c2, c1):
        c.close()


def _time_tasks(on: bool) -> list:
    """On a worker: wrap lorakern's shard task so that it records its wall-clock and CPU time
    (on), or unwrap it and return the (wall, cpu) seconds recorded (off)."""
    import lorakern._dask.matrix as mx

    if on and not hasattr(mx, "_untimed"):
        mx._untimed, mx._task_times = mx.shard_pass, []

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return mx._untimed(*args, **kwargs)
            finally:
                mx._task_times.append((time.perf_counter() - wall, time.thread_time() - cpu))

        mx.shard_pass = timed  # the tasks find it by name when they are unpickled
    elif not on and hasattr(mx, "_untimed"):
        mx.shard_pass = mx.__dict__.pop("_untimed")
        return mx.__dict__.pop("_task_times")
    return []


def task_bodies(engine, client, B, A, steps):
    """Where a dask 2x1 step goes: each worker's task body, wall-clock against its own CPU
    time (a task on 1 thread: the difference is time it waited for a core)."""
    client.run(_time_tasks, True)
    t = time.perf_counter()
    run_steps(engine, B, A, steps)
    step = (time.perf_counter() - t) / steps * 1e3
    recorded = client.run(_time_tasks, False)
    out = [f"Task bodies of dask 2x1 over {steps} steps ({step:.1f} ms per step), median per "
           "worker: wall-clock, the task thread's CPU time, and their difference (waiting for "
           "a core):", ""]
    for worker, times in sorted(recorded.items()):
        if not times:
            out.append(f"- {worker}: no task recorded")
            continue
        wall = statistics.median(w for w, _ in times) * 1e3
        cpu = statistics.median(c for _, c in times) * 1e3
        out.append(f"- {worker}: {len(times)} tasks, wall {wall:.1f} ms, CPU {cpu:.1f} ms, "
                   f"waiting {wall - cpu:.1f} ms")
    return out


def _held(dask_scheduler):
    """What the scheduler keeps: tasks, task groups (one per key prefix and token)."""
    return len(dask_scheduler.tasks), len(dask_scheduler.task_groups)


def long_run(engine, client, B, A, steps, block=100):
    """Per-step time over ``steps`` steps of one fit, in blocks, with the machine's load
    average at the end of each block; what the scheduler and the client hold, before and
    after."""
    time.sleep(1.0)  # let releases in flight arrive before counting
    before = client.run_on_scheduler(_held), len(client.futures)
    stamps, loads = [time.perf_counter()], []
    for t in range(steps):
        B, A = run_steps(engine, B, A, 1)
        stamps.append(time.perf_counter())
        if (t + 1) % block == 0 or t == steps - 1:
            loads.append(os.getloadavg()[0])
    time.sleep(1.0)
    after = client.run_on_scheduler(_held), len(client.futures)
    dt = np.diff(stamps) * 1e3
    blocks = [dt[i:i + block] for i in range(0, steps, block)]
    out = [f"## Long run: {steps} steps of dask 2x1 (ms per step by block of {block})", "",
           "| steps | mean | median | max | load average at its end |",
           "|---|---:|---:|---:|---:|"]
    for i, (b, load) in enumerate(zip(blocks, loads)):
        out.append(f"| {i * block}-{i * block + len(b) - 1} | {b.mean():.1f} | "
                   f"{np.median(b):.1f} | {b.max():.1f} | {load:.1f} |")
    first, last = np.median(blocks[0]), np.median(blocks[-1])
    out += ["", f"- last block's median / first block's: {last / first:.2f}",
            f"- held before / after: scheduler tasks {before[0][0]} / {after[0][0]}, task groups "
            f"{before[0][1]} / {after[0][1]}, client futures {before[1]} / {after[1]}"]
    return out


if __name__ == "__main__":
    main()
