"""Sizes: zero-stride arrays of 2**59 to 2**62 elements give MemoryError or ValueError, never a crash.

Each public function runs its cases (tests/size_cases.py) in a child process, so a segfault or an
abort fails one test instead of ending the suite. Under scripts/sanitize.sh the child inherits the
preloaded ASan runtime; `allocator_may_return_null=1` lets an impossible allocation return NULL (as
glibc's malloc does) instead of being reported, and `log_path=stderr` keeps the warning ASan still
prints for each (and any real report, which also ends the child) in the child's stderr, shown when
the test fails, instead of the report files scripts/sanitize.sh counts.
"""
import json
import os
import subprocess
import sys

import pytest

from size_cases import CASES

HERE = os.path.dirname(os.path.abspath(__file__))

# Where each accepted message comes from: fastnorm's kernels and fast path (scratch sizes checked in
# src/fastnorm.h), NumPy's allocator, NumPy's own size check (a float64 copy of a float16 view), and
# the check that refuses an `out` whose elements share memory (a zero-stride `out` is one).
MESSAGES = ("fastnorm: cannot allocate the scratch memory", "Unable to allocate",
            "array is too big; `arr.size * arr.dtype.itemsize` is larger than the maximum possible size",
            "out has elements that share memory")


def run_cases(name):
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = ":".join(filter(None, [env.get("ASAN_OPTIONS"), "allocator_may_return_null=1:log_path=stderr"]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "size_cases.py"), name], capture_output=True,
                          text=True, timeout=120, env=env)
    lines = proc.stdout.splitlines()
    started = [line[len("START "):] for line in lines if line.startswith("START ")]
    assert proc.returncode == 0, (f"{name}: the child died with status {proc.returncode} in case "
                                  f"{started[-1] if started else None!r}:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in lines if line.startswith("{")]


# The public functions refuse a zero-stride `out` before any kernel runs, and allocating any other
# output of these shapes fails in NumPy first; the kernels' own refusal of such views (checked
# scratch sizes, FN_ENOMEM) is tested in tests/c/test_kernels.c and, through the glue, below.
KERNEL_REACHED: set[str] = set()


@pytest.mark.parametrize("name", list(CASES))
def test_zero_stride_huge_shapes_raise_cleanly(name):
    results = run_cases(name)
    ran = [r for r in results if not r.get("skipped")]
    assert ran, f"{name}: every case was skipped"
    for r in ran:
        assert r["raised"] in ("MemoryError", "ValueError"), r
        assert any(m in r["message"] for m in MESSAGES), r
    if name in KERNEL_REACHED:
        by_kernel = [r for r in ran if r["raised"] == "MemoryError" and r["message"].startswith("fastnorm:")]
        assert {r["case"].split()[-2] for r in by_kernel} == {"float16", "float32", "float64"}, name


GLUE_CASE = """
import numpy as np
from numpy.lib.stride_tricks import as_strided
from fastnorm import _core
n = 2**59 + 1
x = np.broadcast_to(np.ones((), np.{dtype}), (1, 1, n, 1))
y = as_strided(np.zeros(1, np.{dtype}), (1, 1, n, 1), (0, 0, 0, 0))
try:
    _core.group_forward(y, x, None, None, None, np.empty(1), np.empty(1), 1e-5, False, 1)
except MemoryError as err:
    print("MemoryError:", err)
"""


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_a_kernel_given_a_huge_zero_stride_view_raises_memory_error(dtype):
    """The kernels' own check, through the glue: a group of 2**59 + 1 elements needs scratch no
    allocation can give (the public functions refuse such an `out` before reaching it)."""
    proc = subprocess.run([sys.executable, "-c", GLUE_CASE.format(dtype=dtype)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("MemoryError: fastnorm: cannot allocate the scratch memory"), proc.stdout
