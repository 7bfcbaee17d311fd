"""Fixtures shared by the tests; plain helpers are in helpers.py (a module named
``conftest`` can not be imported by tests while benchmarks/ has its own conftest.py)."""
import pytest


def pytest_make_parametrize_id(config, val, argname):
    """A Device object (the emulated CUDA device) is shown by its name in test ids."""
    if not isinstance(val, str) and hasattr(val, "kernels_name") and hasattr(val, "name"):
        return val.name
    return None


@pytest.fixture
def small_tiles(monkeypatch):
    """Small tiles, so that small inputs cross tile edges: CPU work units of 24 rows x 48
    columns, in blocks of 12 rows and chunks of 24 columns (the defaults are hundreds), so
    small inputs cross chunk, block and unit edges; CUDA tiles of 32 x 32 (default 64 x 64) and
    super-tiles of 2 x 3 tiles, so that a 37 x 101 problem runs two blocks, one with a partial
    super-tile."""
    import lorakern._cpu.matrix as cpu
    from lorakern._cuda import launch

    monkeypatch.setattr(cpu, "MIN_TILE", 24)
    monkeypatch.setattr(cpu, "MAX_TILE", 24)
    monkeypatch.setattr(cpu, "BLOCK_ROWS", 12)
    monkeypatch.setattr(cpu, "LARGE_RANK_BLOCK_ROWS", 12)
    monkeypatch.setattr(cpu, "MAX_UNIT_ROWS", 24)
    monkeypatch.setattr(cpu, "MAX_UNIT_COLS", 48)
    assert cpu.geometry(1000, 100, 64, 4) == (24, 48, 12, 24)
    monkeypatch.setattr(launch, "TILES", ((32, 32),))
    monkeypatch.setattr(launch, "ROWS_PER_BLOCK", 2)
    monkeypatch.setattr(launch, "COLS_PER_BLOCK", 3)
    return 24


@pytest.fixture
def cpu_threads():
    """The Numba thread count, 2 where the machine has 2 or more (the CI machine's count)."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    yield numba.get_num_threads()
    numba.set_num_threads(before)
