"""The CPU floor of one fused step: max(bytes of R / read bandwidth, 6 m n r / FMA rate).

    python benchmarks/floor.py [--m 4096 --n 4096 --rank 16]

Measures the read bandwidth of a large array on all Numba threads (a float64 sum, which is
bandwidth-bound) and the FMA rate as NumPy's BLAS reaches it on a large square matrix
product (2 N^3 flops; BLAS runs near the machine's peak there). Prints both rates and the
floor for fp32 and fp64. Numbers are best-of-N and noisy on a shared machine.
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np


@numba.njit(parallel=True, fastmath=True)
def _read(x, parts):
    n = x.shape[0]
    nchunks = parts.shape[0]
    for c in numba.prange(nchunks):
        s = 0.0
        for i in range(c * n // nchunks, (c + 1) * n // nchunks):
            s += x[i]
        parts[c] = s


def _best(f, repeat=7):
    f()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth() -> float:
    """Bytes per second read from memory, all threads."""
    x = np.random.default_rng(0).random(32 * 2**20)  # 256 MiB of float64
    parts = np.zeros(numba.get_num_threads())
    return x.nbytes / _best(lambda: _read(x, parts))


def fma_rate(dtype, size: int = 2048) -> float:
    """Flops per second of a BLAS matrix product (all BLAS threads)."""
    rng = np.random.default_rng(0)
    a, b = rng.random((size, size)).astype(dtype), rng.random((size, size)).astype(dtype)
    return 2.0 * size**3 / _best(lambda: a @ b, repeat=5)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    m, n, r = args.m, args.n, args.rank
    bandwidth = read_bandwidth()
    print(f"threads {numba.get_num_threads()}; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    for dtype in (np.float32, np.float64):
        rate = fma_rate(dtype)
        itemsize = np.dtype(dtype).itemsize
        t_bytes, t_flops = m * n * itemsize / bandwidth, 6.0 * m * n * r / rate
        print(f"{np.dtype(dtype).name}: FMA rate {rate / 1e9:.1f} GFLOP/s; floor at {m}x{n} r={r}: "
              f"memory {t_bytes * 1e3:.2f} ms, flops {t_flops * 1e3:.2f} ms -> {max(t_bytes, t_flops) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
