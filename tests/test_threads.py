"""fastnorm's own threads: results match one thread, Python threads share inputs safely, fork works."""
import os
import threading

import numpy as np
import pytest

import fastnorm


@pytest.fixture
def restore_threads():
    n = fastnorm.get_num_threads()
    yield
    fastnorm.set_num_threads(n)


def _all_functions(x):
    """Every function on x (N, C, L) big enough to be split across threads."""
    y, mean, rstd = fastnorm.layer_norm(x, return_stats=True)
    b, bmean, brstd = fastnorm.batch_norm(x, axis=1, return_stats=True)
    return {
        "layer_norm": y,
        "rms_norm": fastnorm.rms_norm(x),
        "batch_norm": b,
        "instance_norm": fastnorm.instance_norm(x, axis=1),
        "group_norm": fastnorm.group_norm(x, 4, axis=1),
        "layer_norm_backward": fastnorm.layer_norm_backward(x, x, mean, rstd)[0],
        "batch_norm_backward": fastnorm.batch_norm_backward(x, x, bmean, brstd, axis=1)[0],
    }


def test_two_threads_match_one_thread_and_numpy(restore_threads):
    x = np.random.default_rng(0).standard_normal((64, 8, 1024)) * 3 + 1   # 2**19 elements
    fastnorm.set_num_threads(1)
    one = _all_functions(x)
    fastnorm.set_num_threads(2)
    two = _all_functions(x)
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-12, atol=1e-12, err_msg=name)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(two["layer_norm"], ref, atol=1e-12)
    ref_bn = (x - x.mean((0, 2), keepdims=True)) / np.sqrt(x.var((0, 2), keepdims=True) + 1e-5)
    np.testing.assert_allclose(two["batch_norm"], ref_bn, atol=1e-12)


def test_python_threads_on_shared_inputs_match_serial_calls():
    x = np.random.default_rng(1).standard_normal((16, 8, 2048)).astype(np.float32)
    serial = _all_functions(x)
    results, errors = [None] * 6, []

    def work(i):
        try:
            results[i] = _all_functions(x)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        for name in serial:
            np.testing.assert_array_equal(r[name], serial[name], err_msg=name)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_in_the_middle_of_use_leaves_a_working_child():
    x = np.random.default_rng(2).standard_normal((512, 1024))
    expected = fastnorm.layer_norm(x)          # threads have run in the parent
    pid = os.fork()
    if pid == 0:                               # child: the same call must work and agree
        ok = np.allclose(fastnorm.layer_norm(x), expected, rtol=0, atol=1e-12)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1, ValueError), (2**31, ValueError), (4097, ValueError),
                                        (1.5, TypeError), ("2", TypeError), (True, TypeError), (None, TypeError),
                                        (np.float64(2.0), TypeError)])
def test_set_num_threads_rejects_bad_counts(bad, error):
    before = fastnorm.get_num_threads()
    with pytest.raises(error, match=r"set_num_threads: n must be an int"):
        fastnorm.set_num_threads(bad)
    assert fastnorm.get_num_threads() == before
    fastnorm.layer_norm(np.ones((2, 3)))        # later calls still work


@pytest.mark.parametrize("n", [np.int64(2), np.uint8(1), np.int32(4096), 4096])
def test_set_num_threads_takes_any_int(n):
    before = fastnorm.get_num_threads()
    try:
        fastnorm.set_num_threads(n)
        assert fastnorm.get_num_threads() == int(n) and type(fastnorm.get_num_threads()) is int
        x = np.random.default_rng(0).standard_normal((300, 1000))
        np.testing.assert_allclose(fastnorm.layer_norm(x, axis=0), (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5),
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(fastnorm.layer_norm(x), ((x.T - x.mean(1)) / np.sqrt(x.var(1) + 1e-5)).T,
                                   rtol=0, atol=1e-12)
    finally:
        fastnorm.set_num_threads(before)


@pytest.mark.parametrize("value, threads, warns", [("1", 1, False), ("3", 3, False), ("4096", 4096, False),
                                                   ("0", None, True), ("4097", None, True),
                                                   (str(2**31), None, True), ("many", None, True)])
def test_the_environment_variable_sets_the_thread_count(value, threads, warns):
    import subprocess
    import sys
    code = ("import warnings; warnings.simplefilter('always'); import fastnorm; "
            "print(fastnorm.get_num_threads(), fastnorm._threads._available_cores())")
    env = dict(os.environ, FASTNORM_NUM_THREADS=value)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    got, cores = map(int, run.stdout.split())
    assert got == (threads if threads is not None else cores)
    assert ("FASTNORM_NUM_THREADS" in run.stderr) == warns
