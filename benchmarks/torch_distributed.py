"""What the global ||G|| costs under DDP: ``distributed.reduce_records`` timed on 2 processes
(gloo, CPU), for one LoRA layer m x n, at a row count that takes each route.

    python benchmarks/torch_distributed.py                 # m = n = 768, r = 8
    python benchmarks/torch_distributed.py --m 256 --n 256 --repeats 30

Each process fills one Record by a real forward and backward through a LoRALinear (N rows
of its own), then times ``reduce_records`` (``--repeats`` calls after 3 warm-ups, median and
quartiles in ms, rank 0's clock) for N small enough that the rows travel (all-gather,
W N (m + n) < 2 m n) and for N large enough that G travels (all-reduce of m n float64), and
prints the numbers each route moves. One torch thread a process.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import time

import numpy as np
import torch
import torch.distributed as dist

from lorakern.torch import LoRALinear, LoRAStepOptimizer
from lorakern.torch.distributed import reduce_records


def worker(rank, port, args):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    m, n, r = args.m, args.n, args.r
    for rows in (args.small, args.large):
        torch.manual_seed(rank)
        layer = LoRALinear(n, m, r)
        with torch.no_grad():
            layer.lora_B.normal_()
        opt = LoRAStepOptimizer(layer, process_group=dist.group.WORLD)
        x = torch.randn(rows, n)
        torch.mean(layer(x) ** 2).backward()
        times = []
        for i in range(args.repeats + 3):
            dist.barrier()
            t0 = time.perf_counter()
            _, _, route = reduce_records(dist.group.WORLD, opt.layers, "exact", "cpu")
            times.append(time.perf_counter() - t0)
        t = np.array(times[3:]) * 1e3
        # bytes a rank receives: rows (float32, all-gather: (W - 1) N (m + n)) or G (float64,
        # ring all-reduce: 2 (W - 1) / W m n), plus the predicted gradients (float64, r (m + n))
        moved = (4 * (2 - 1) * rows * (m + n) if route[0] == "rows"
                 else 8 * 2 * (2 - 1) / 2 * m * n) + 8 * 2 * (2 - 1) / 2 * r * (m + n)
        if rank == 0:
            print(f"m={m} n={n} r={r} N={rows} a rank: route {route[0]}, "
                  f"{moved / 2**20:.2f} MiB a rank through the collectives, "
                  f"{np.median(t):.2f} ms (quartiles "
                  f"{np.percentile(t, 25):.2f}-{np.percentile(t, 75):.2f})", flush=True)
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=768)
    parser.add_argument("--n", type=int, default=768)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--small", type=int, default=128, help="rows a rank (rows route)")
    parser.add_argument("--large", type=int, default=2048, help="rows a rank (G route)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(port, args), nprocs=2)


if __name__ == "__main__":
    main()
