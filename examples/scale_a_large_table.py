"""Standardize a table larger than a memory budget, out of core, with fastnorm on dask arrays.

The table is a float32 ``.npy`` file of (rows, features), written here first (each feature with
its own mean and scale). ``dask.array.from_array`` cuts it into chunks of rows (read from a memory
map when a task needs them, see ``NpyFile``), ``fastnorm.standardize`` gives a lazy dask array, and
``dask.array.store`` writes it chunk by chunk into a second ``.npy`` file:

1. every chunk's per-feature count, mean, m2, min and max (one pass of fastnorm's C kernel),
   merged by one tree reduction into the statistics of the whole table;
2. every chunk standardized with them and written out.

Only a few chunks are in memory at a time: the peak growth of the process's anonymous memory
(RssAnon: the pages of the memory-mapped files do not count, the kernel can drop them at any
time) stays around chunk size times threads, not the table's size. The script prints the time,
the throughput and that peak, and checks the result (every feature: mean 0, std 1).

    python examples/scale_a_large_table.py [--gib 1.5] [--budget-mib 512] [--chunk-mib 64] [--threads 2]
"""
# gallery arguments: --gib 0.125 --budget-mib 64 --chunk-mib 8
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import numpy as np

import fastnorm

MIB = 1 << 20


def rss_anon_bytes() -> int:
    """This process's resident anonymous memory (Linux: RssAnon in /proc/self/status), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakAnonMemory:
    """Samples RssAnon every `interval` seconds while in the `with` block: `peak_growth` is the
    largest increase over the value at entry, in bytes."""

    def __init__(self, interval=0.01):
        self.interval, self.peak_growth = interval, 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak_growth = max(self.peak_growth, rss_anon_bytes() - self.start)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = rss_anon_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_growth = max(self.peak_growth, rss_anon_bytes() - self.start)


def write_table(path, rows, features, seed=0, block_rows=1 << 16):
    """A float32 (rows, features) .npy file: feature j is normal with mean 10 j and std 1 + j / 10."""
    rng = np.random.default_rng(seed)
    table = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, features))
    mean, std = 10.0 * np.arange(features), 1.0 + np.arange(features) / 10.0
    for lo in range(0, rows, block_rows):
        n = min(block_rows, rows - lo)
        table[lo:lo + n] = rng.standard_normal((n, features), dtype=np.float32) * std + mean
    table.flush()
    del table


class NpyFile:
    """A .npy file as dask.array.from_array takes it, read a chunk at a time.

    A memory map (``np.load(path, mmap_mode="r")``) would do, except that recent versions of dask
    copy any array given to ``from_array`` that has a ``copy`` method, which for a memory map reads
    the whole file into memory. This object has what ``from_array`` needs (shape, dtype, ndim and
    slicing) and no ``copy``. A chunk is a read-only view of the map: its pages are the file's, which
    the operating system reads on demand and may drop again, not the process's own memory. It
    pickles as its path, so distributed workers open the file themselves."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._map = np.load(self.path, mmap_mode="r")
        self.shape, self.dtype, self.ndim = self._map.shape, self._map.dtype, self._map.ndim

    def __getitem__(self, index):
        return np.asarray(self._map[index])

    def __reduce__(self):
        return NpyFile, (self.path,)

    def __dask_tokenize__(self):
        info = os.stat(self.path)
        return self.path, info.st_mtime_ns, info.st_size


def standardize_on_disk(src, dst, chunk_mib=64, threads=2, progress=True):
    """Standardize the .npy table `src` per feature into a new .npy file `dst`, out of core.
    Returns the seconds taken."""
    import dask
    import dask.array as da
    from dask.diagnostics import ProgressBar

    table = NpyFile(src)
    rows_per_chunk = max(1, chunk_mib * MIB // (table.shape[1] * table.dtype.itemsize))
    X = da.from_array(table, chunks=(rows_per_chunk, table.shape[1]))
    Y = fastnorm.standardize(X)                    # lazy: nothing is read yet
    out = np.lib.format.open_memmap(dst, mode="w+", dtype=Y.dtype, shape=Y.shape)
    start = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=threads), ProgressBar(out=None if progress else open(
            os.devnull, "w")):
        da.store(Y, out, lock=False)
    out.flush()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--gib", type=float, default=1.5, help="table size in GiB (default 1.5)")
    parser.add_argument("--budget-mib", type=float, default=512, help="memory budget in MiB (default 512)")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--chunk-mib", type=int, default=64, help="chunk size in MiB (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="dask threads (default 2)")
    parser.add_argument("--dir", default=None, help="where to write the tables (default: a temporary directory)")
    args = parser.parse_args()
    rows = int(args.gib * (1 << 30)) // (4 * args.features)
    table_bytes = rows * args.features * 4
    if table_bytes <= args.budget_mib * MIB:
        parser.error(f"the table ({table_bytes / MIB:.0f} MiB) must be larger than the budget ({args.budget_mib} MiB)")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src, dst = os.path.join(tmp, "table.npy"), os.path.join(tmp, "standardized.npy")
        print(f"writing a {rows} x {args.features} float32 table ({table_bytes / MIB:.0f} MiB) to {src}")
        write_table(src, rows, args.features)
        print(f"standardizing it in {args.chunk_mib} MiB chunks with {args.threads} threads "
              f"(memory budget {args.budget_mib:.0f} MiB)")
        with PeakAnonMemory() as memory:
            seconds = standardize_on_disk(src, dst, args.chunk_mib, args.threads)
        print(f"time {seconds:.2f} s, throughput {table_bytes / seconds / (1 << 30):.2f} GiB/s of table "
              f"(read twice, written once)")
        print(f"peak anonymous memory growth {memory.peak_growth / MIB:.0f} MiB "
              f"({'within' if memory.peak_growth <= args.budget_mib * MIB else 'OVER'} the budget; "
              f"table {table_bytes / MIB:.0f} MiB)")
        m = fastnorm.moments(np.load(dst, mmap_mode="r"))
        print(f"check: per-feature mean within {np.abs(m.mean).max():.1e} of 0, "
              f"std within {np.abs(m.std() - 1).max():.1e} of 1")


if __name__ == "__main__":
    main()
