"""Builds and runs the C-only kernel test (tests/c/test_kernels.c): the kernels without Python."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_c_kernels(tmp_path):
    exe = tmp_path / "test_kernels"
    sources = [ROOT / "tests/c/test_kernels.c", *(ROOT / "src" / f for f in ("convert.c", "parallel.c", "group_norm.c", "batch_norm.c"))]
    build = subprocess.run(
        ["cc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-fopenmp-simd", "-pthread", f"-I{ROOT / 'src'}",
         *map(str, sources), "-lm", "-o", str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout
    assert run.stdout.strip().endswith("0 failed"), run.stdout
