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
# src/fastnorm.h), NumPy's allocator, NumPy's own size check (a float64 copy of a float16 view).
MESSAGES = ("fastnorm: cannot allocate the scratch memory", "Unable to allocate",
            "array is too big; `arr.size * arr.dtype.itemsize` is larger than the maximum possible size")


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


# The functions whose huge cases reach a C kernel (the others stop at a NumPy allocation first):
# there the kernel itself must refuse the scratch, with fastnorm's message, for every dtype.
KERNEL_REACHED = {"layer_norm", "rms_norm", "instance_norm", "group_norm", "batch_norm",
                  "instance_norm_backward", "group_norm_backward", "batch_norm_backward", "data"}


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
