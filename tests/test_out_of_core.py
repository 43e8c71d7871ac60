"""Out of core: a 1.5 GiB table on disk standardized with 64 MiB chunks and 2 dask threads, with the
process's anonymous memory growing by well under 400 MiB (RssAnon, sampled during the run).

Writes ~3 GiB to a temporary directory and takes ~1 minute: runs only with FASTNORM_BIG_TESTS=1.
"""
import os
import sys
import time

import numpy as np
import pytest

import fastnorm

if os.environ.get("FASTNORM_BIG_TESTS") != "1":
    pytest.skip("1.5 GiB on disk: set FASTNORM_BIG_TESTS=1", allow_module_level=True)
pytest.importorskip("dask.array")
if not os.path.exists("/proc/self/status"):
    pytest.skip("RssAnon needs Linux's /proc", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from scale_a_large_table import MIB, PeakAnonMemory, standardize_on_disk, write_table  # noqa: E402


def reference_stats(path, block=1 << 16):
    """Per-column mean and std of the table in float64, two passes of NumPy over blocks of rows."""
    table = np.load(path, mmap_mode="r")
    n = table.shape[0]
    total = sum(table[i:i + block].sum(axis=0, dtype=np.float64) for i in range(0, n, block))
    mean = total / n
    m2 = sum(((table[i:i + block] - mean) ** 2).sum(axis=0) for i in range(0, n, block))
    return mean, np.sqrt(m2 / n)


def test_standardize_a_table_larger_than_the_memory_budget(tmp_path):
    rows, features = 1_572_864, 256                     # 1.5 GiB of float32
    src, dst = tmp_path / "table.npy", tmp_path / "out.npy"
    write_table(src, rows, features)
    with PeakAnonMemory() as memory:
        start = time.perf_counter()
        standardize_on_disk(src, dst, chunk_mib=64, threads=2, progress=False)
        seconds = time.perf_counter() - start
    print(f"\n1.5 GiB standardized out of core in {seconds:.1f} s; RssAnon grew by at most "
          f"{memory.peak_growth / MIB:.0f} MiB")
    assert memory.peak_growth < 300 * MIB
    mean, std = reference_stats(src)
    table, out = np.load(src, mmap_mode="r"), np.load(dst, mmap_mode="r")
    for rows_ in (slice(0, 4096), slice(rows // 2, rows // 2 + 4096), slice(rows - 4096, rows)):
        want = (table[rows_] - mean) / std
        np.testing.assert_allclose(out[rows_], want, rtol=0, atol=2e-6 * np.abs(want).max())
    m = fastnorm.moments(out)
    assert np.abs(m.mean).max() < 1e-5 and np.abs(m.std() - 1).max() < 1e-5
