"""The CPU device: NumPy arrays, Numba kernels (one launcher module per problem kind).

Importing this package imports no Numba; the kernels compile on first use.
"""
from .._host import HostDevice

DEVICE = HostDevice("cpu", "cpu")


def threads() -> int:
    """The Numba threads the kernels run on (NUMBA_NUM_THREADS, or numba.set_num_threads)."""
    import numba

    return numba.get_num_threads()
