"""The conventions of a scientific Python package: ``__version__`` from the installed metadata,
``show_config()``, threadpoolctl seeing and limiting fastnorm's threads, ``python -m fastnorm bench``.

Every value is checked against an independent source: the metadata and pyproject.toml, the CPU
flags in /proc/cpuinfo, the thread and cache setters, NumPy float64 references."""

import io
import os
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

import fastnorm
import fastnorm._bench as fbench
import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code):
    """Run `code` in a fresh interpreter (outside the source tree); return its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(ROOT),
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def restore_settings():
    threads, cache = fastnorm.get_num_threads(), fastnorm.get_output_cache()
    yield
    fastnorm.set_num_threads(threads)
    fastnorm.set_output_cache(cache)


# ---- version ---------------------------------------------------------------------------------------

def test_version_is_the_installed_distributions():
    assert fastnorm.__version__ == metadata.version("fastnorm-numpy")
    pyproject = os.path.join(ROOT, "pyproject.toml")
    if os.path.exists(pyproject):              # a checkout or an sdist; a copied test dir has it too
        tomllib = pytest.importorskip("tomllib")
        with open(pyproject, "rb") as f:
            assert tomllib.load(f)["project"]["version"] == fastnorm.__version__


# ---- show_config -----------------------------------------------------------------------------------

def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_show_config_reports_the_cpu_variant_the_cpu_flags_call_for():
    cpu = fastnorm.show_config("dicts")["cpu"]
    flags = _cpu_flags()
    if flags is None or not cpu["multiversioned"]:
        pytest.skip("no /proc/cpuinfo or a build without x86-64 multiversioning")
    assert cpu["features"] == {name: name in flags for name in ("avx512f", "avx2", "f16c")}
    expected_loops = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "default"
    expected_halves = "avx512f" if "avx512f" in flags else "f16c" if "f16c" in flags else "scalar"
    assert (cpu["vector_loops"], cpu["float16_conversion"]) == (expected_loops, expected_halves)


def test_show_config_follows_the_thread_and_cache_settings(restore_settings):
    fastnorm.set_num_threads(1)
    fastnorm.set_output_cache(0)                                      # drops a block kept before
    assert fastnorm.show_config("dicts")["output_cache"] == {"max_bytes": 0, "kept_bytes": 0,
                                                             "FASTNORM_OUTPUT_CACHE": os.environ.get("FASTNORM_OUTPUT_CACHE")}
    fastnorm.set_output_cache(8 << 20)
    y = fastnorm.layer_norm(np.ones((512, 1024), np.float32))       # a 2 MiB output, then freed
    del y
    info = fastnorm.show_config("dicts")
    assert info["threads"]["num_threads"] == 1
    assert info["threads"]["available_cores"] == len(os.sched_getaffinity(0))
    assert info["output_cache"]["max_bytes"] == 8 << 20
    assert info["output_cache"]["kept_bytes"] == 512 * 1024 * 4
    assert info["numpy"]["version"] == np.__version__
    assert info["fastnorm"] == {"version": metadata.version("fastnorm-numpy"), "distribution": "fastnorm-numpy",
                                "location": os.path.dirname(fastnorm.__file__)}
    fastnorm.set_num_threads(3)
    assert fastnorm.show_config("dicts")["threads"]["num_threads"] == 3


def test_show_config_prints_the_same_values(capsys, restore_settings):
    fastnorm.set_num_threads(2)
    assert fastnorm.show_config() is None
    lines = capsys.readouterr().out.splitlines()
    assert f"  version: {fastnorm.__version__}" in lines
    assert "  num_threads: 2" in lines
    assert f"  vector_loops: {fastnorm.show_config('dicts')['cpu']['vector_loops']}" in lines
    with pytest.raises(ValueError, match="mode must be 'stdout' or 'dicts'; got 'json'"):
        fastnorm.show_config("json")


# ---- threadpoolctl ---------------------------------------------------------------------------------

def test_import_fastnorm_does_not_import_threadpoolctl_or_the_metadata_reader():
    out = _run("import sys, fastnorm; print('threadpoolctl' in sys.modules, 'importlib.metadata' in sys.modules); "
               "print(fastnorm.__version__)")
    assert out.split() == ["False", "False", metadata.version("fastnorm-numpy")]


@pytest.mark.parametrize("order", ["import fastnorm, threadpoolctl", "import threadpoolctl, fastnorm"])
def test_threadpoolctl_sees_fastnorm_whichever_is_imported_first(order):
    pytest.importorskip("threadpoolctl")
    out = _run(f"""{order}
import os
from threadpoolctl import threadpool_info, threadpool_limits
fastnorm.set_num_threads(2)
mine = [i for i in threadpool_info() if i["internal_api"] == "fastnorm"]
assert len(mine) == 1 and mine[0]["num_threads"] == 2, mine
assert mine[0]["filepath"] == os.path.realpath(fastnorm._core.__file__), mine
with threadpool_limits(1):
    print(fastnorm.get_num_threads())
print(fastnorm.get_num_threads())""")
    assert out.split() == ["1", "2"]


def test_threadpool_limits_limits_fastnorm_and_restores_it(restore_settings):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x = (np.random.default_rng(5).standard_normal((4096, 1024)) + 3).astype(np.float32)   # large: threaded
    fastnorm.set_num_threads(1)
    one_thread = fastnorm.layer_norm(x)
    fastnorm.set_num_threads(4)
    with threadpoolctl.threadpool_limits(limits=1):
        assert fastnorm.get_num_threads() == 1
        limited = fastnorm.layer_norm(x)
    assert fastnorm.get_num_threads() == 4
    np.testing.assert_array_equal(limited, one_thread)       # the same split of the work, the same bits
    with threadpoolctl.threadpool_limits(limits={"fastnorm": 2}):
        assert fastnorm.get_num_threads() == 2
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert fastnorm.get_num_threads() == 4                # other APIs' limits leave fastnorm alone
    controller = threadpoolctl.ThreadpoolController().select(internal_api="fastnorm")
    assert controller.info()[0]["version"] == fastnorm.__version__
    assert "registered (threadpoolctl" in fastnorm.show_config("dicts")["threads"]["threadpoolctl"]


# ---- bench -----------------------------------------------------------------------------------------

def test_bench_numpy_code_matches_the_float64_reference():
    """The NumPy side of the table computes what fastnorm computes (checked in float64)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 10)) * 3 + 2
    w, b = rng.uniform(0.5, 2, 10), rng.standard_normal(10)
    np.testing.assert_allclose(fbench._np_layer_norm(x, w, b), ref.layer_norm(x, w, b)[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fbench._np_rms_norm(x, w), ref.rms_norm(x, w)[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fbench._np_batch_norm(x, w, b), ref.batch_norm(x, w, b)[0], rtol=1e-12, atol=1e-12)
    img = rng.standard_normal((2, 8, 3, 3))
    wi, bi = rng.uniform(0.5, 2, 8), rng.standard_normal(8)
    np.testing.assert_allclose(fbench._np_group_norm(img, 4, wi, bi), ref.group_norm(img, 4, wi, bi, axis=1)[0],
                               rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(x.shape)
    for axis, fn in ((-1, fastnorm.layer_norm), (0, fastnorm.batch_norm)):
        _, mean, rstd = fn(x, w, b, return_stats=True)
        shape = (-1, 1) if axis == -1 else (1, -1)
        got = fbench._np_norm_backward(dy, x, mean.reshape(shape), rstd.reshape(shape), w, axis)
        want = (fastnorm.layer_norm_backward(dy, x, mean, rstd, w) if axis == -1
                else fastnorm.batch_norm_backward(dy, x, mean, rstd, w))
        for g, h in zip(got, want):
            np.testing.assert_allclose(g, h, rtol=1e-10, atol=1e-12)


def test_bench_prints_a_table_of_measured_ratios(capsys):
    table = io.StringIO()
    rows = fastnorm.bench(quick=True, file=table, progress=True)
    assert [r["name"] for r in rows] == ["layer_norm", "layer_norm", "rms_norm", "batch_norm",
                                         "group_norm G=8, axis=1", "layer_norm_backward", "batch_norm_backward"]
    lines = table.getvalue().splitlines()
    assert lines[0].startswith(f"fastnorm {fastnorm.__version__} vs NumPy {np.__version__}: float32, "
                               f"{fastnorm.get_num_threads()} thread(s)")
    for row, line in zip(rows, lines[4:]):
        assert row["fastnorm"] > 0 and row["numpy"] > 0
        assert row["speed"] == row["numpy"] / row["fastnorm"]
        assert row["difference"] < 1e-5                          # float32 results agree
        assert line.split()[-1] == f"{row['speed']:.1f}" and row["name"] in line
    assert len(lines) == 4 + len(rows)
    progress = capsys.readouterr().err
    assert f"] {len(rows)}/{len(rows)}" in progress and "] 0/7 layer_norm (32, 768)" in progress


def test_python_m_fastnorm_bench():
    done = subprocess.run([sys.executable, "-m", "fastnorm", "bench", "--quick"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"fastnorm {fastnorm.__version__} vs NumPy")
    assert "layer_norm_backward" in done.stdout and done.stderr == ""     # no progress bar when not a terminal
