"""What FSDP2 adds to ``opt.step()`` over DDP: 2 processes (gloo, CPU), one torch thread each.

    python benchmarks/torch_fsdp.py

Two models, each under DDP and under FSDP2 (``fully_shard``): the tests' MLP (LoRALinear
64 -> 64 -> 4, r = 3, 16 rows a rank) and a LoRALinear 768 -> 768 -> 4 (r = 8, 128 rows a
rank). Each round times 10 ``opt.step()`` calls of each (after a forward and backward, a
barrier before each step; rank 0's clock) and keeps their median; 11 rounds, DDP and FSDP2
interleaved. Prints the medians of the rounds with their range, and of the per-round
ratio FSDP2 / DDP. FSDP2's extra work (lorakern/torch/distributed.py): one all-gather of
the shards for the whole pairs, a few float64 all-gathers for the shard sums, DTensor
dispatch on the clones of B, A and their gradients, ``reshard()``.
"""
from __future__ import annotations

import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from lorakern.torch import LoRALinear, LoRAStepOptimizer


def mlp(n_in, hidden, r):
    torch.manual_seed(0)
    first = LoRALinear.from_linear(torch.nn.Linear(n_in, hidden), r, alpha=2 * r)
    model = torch.nn.Sequential(first,
                                torch.nn.Tanh(),
                                LoRALinear.from_linear(torch.nn.Linear(hidden, 4), r, alpha=2 * r))
    with torch.no_grad():
        model[0].lora_B.normal_(0.0, 0.1)
        model[2].lora_B.normal_(0.0, 0.1)
    return model


def worker(rank, port):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for name, n_in, r, rows in (("64-64-4, r=3", 64, 3, 16), ("768-768-4, r=8", 768, 8, 128)):
            g = torch.Generator().manual_seed(rank)
            X, Y = torch.randn(rows, n_in, generator=g), torch.randn(rows, 4, generator=g)
            ddp = torch.nn.parallel.DistributedDataParallel(mlp(n_in, n_in, r))
            sharded = mlp(n_in, n_in, r)
            fully_shard(sharded)
            runs = (("DDP", ddp, LoRAStepOptimizer(ddp)),
                    ("FSDP2", sharded, LoRAStepOptimizer(sharded)))
            times = {key: [] for key, _, _ in runs}
            for _ in range(11):
                for key, model, opt in runs:
                    steps = []
                    for _ in range(10):
                        opt.zero_grad()
                        torch.mean((model(X) - Y) ** 2).backward()
                        dist.barrier()
                        start = time.perf_counter()
                        opt.step()
                        steps.append(time.perf_counter() - start)
                    times[key].append(statistics.median(steps) * 1e3)
            if rank == 0:
                for key, values in times.items():
                    print(f"{name} {key}: opt.step() {statistics.median(values):.2f} ms "
                          f"(rounds {min(values):.2f}-{max(values):.2f})")
                ratios = [f / d for f, d in zip(times["FSDP2"], times["DDP"])]
                print(f"{name} FSDP2 / DDP: {statistics.median(ratios):.2f} "
                      f"({min(ratios):.2f}-{max(ratios):.2f})")
    finally:
        dist.destroy_process_group()


def main():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(port,), nprocs=2)


if __name__ == "__main__":
    main()
