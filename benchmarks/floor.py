"""The CPU floor of one fused step: max(bytes of R / read bandwidth, 6 m n r / FMA rate).

    python benchmarks/floor.py [--m 4096 --n 4096 --rank 16]

Measures the read bandwidth of a large array on all Numba threads (a float64 sum with vector
loads and four accumulators, which is bandwidth-bound) and the FMA rate as NumPy's BLAS reaches it on a large square matrix
product (2 N^3 flops; BLAS runs near the machine's peak there). Prints both rates and the
floor for fp32 and fp64. Numbers are best-of-N and noisy on a shared machine.
"""
from __future__ import annotations

import argparse
import threading
import time

import numba
import numpy as np

from lorakern._cpu.simd import lanes, vadd, vload, vsum, vzeros


@numba.njit(nogil=True, cache=True)
def _read_rows(x, lo, hi):
    """Sum of rows lo..hi of x, four vector accumulators wide: vector loads and no single
    dependent chain, so it reads as fast as the memory system delivers (a scalar sum of one
    accumulator is bound by the add latency and reads a third of that)."""
    width = lanes(x)
    a0 = a1 = a2 = a3 = vzeros(x)
    for i in range(lo, hi):
        for j in range(0, x.shape[1], 4 * width):
            a0 = vadd(a0, vload(x, i, j))
            a1 = vadd(a1, vload(x, i, j + width))
            a2 = vadd(a2, vload(x, i, j + 2 * width))
            a3 = vadd(a3, vload(x, i, j + 3 * width))
    return vsum(vadd(vadd(a0, a1), vadd(a2, a3)))


def _read(x, nthreads):
    rows = x.shape[0]
    parts = [(k * rows // nthreads, (k + 1) * rows // nthreads) for k in range(nthreads)]
    threads = [threading.Thread(target=_read_rows, args=(x, lo, hi)) for lo, hi in parts[1:]]
    for t in threads:
        t.start()
    _read_rows(x, *parts[0])
    for t in threads:
        t.join()


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
    x = np.random.default_rng(0).random((8192, 4096))  # 256 MiB of float64, rows of 32 KiB
    nthreads = numba.get_num_threads()
    return x.nbytes / _best(lambda: _read(x, nthreads))


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
