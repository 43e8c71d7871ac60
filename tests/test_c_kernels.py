"""Builds and runs the C-only kernel test (tests/c/test_kernels.c): the kernels without Python."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
@pytest.mark.parametrize("defines", [[], ["-DFASTNORM_NO_CLONES"]], ids=["dispatch", "portable"])
def test_c_kernels(tmp_path, defines):
    """With the CPU dispatch of the build (vector clones, F16C) and without it (the portable C)."""
    exe = tmp_path / "test_kernels"
    sources = [ROOT / "tests/c/test_kernels.c", *(ROOT / "src" / f for f in ("convert.c", "vector.c", "parallel.c", "group_norm.c", "batch_norm.c"))]
    build = subprocess.run(
        ["cc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-fopenmp-simd", "-pthread", *defines,
         f"-I{ROOT / 'src'}", *map(str, sources), "-lm", "-o", str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout
    assert run.stdout.strip().endswith("0 failed"), run.stdout


def test_float16_rounding_matches_numpy():
    """The kernels' float -> float16 rounding (round to nearest even, subnormals, overflow to Inf)
    equals NumPy's: layer norm with weight 0 returns exactly the bias, rounded to float16."""
    import numpy as np

    import fastnorm

    rng = np.random.default_rng(0)
    bias = np.concatenate([
        rng.standard_normal(4000) * 10.0 ** rng.integers(-9, 6, 4000),   # subnormal .. overflow
        np.float16(np.arange(1, 2000)).astype(np.float64) * 2.0 ** -24 * 1.5,  # halfway subnormals
        [65504.0, 65519.0, 65520.0, 70000.0, -65520.0, 0.0, 2.0 ** -25, 2.0 ** -24 * 1.5],
    ]).astype(np.float32).astype(np.float64)                             # exactly representable in float32
    x = np.ones((1, bias.size), dtype=np.float16)
    y = fastnorm.layer_norm(x, np.zeros(bias.size), bias)
    with np.errstate(over="ignore"):
        expected = bias.astype(np.float32).astype(np.float16)
    np.testing.assert_array_equal(y[0].view(np.uint16), expected.view(np.uint16))
