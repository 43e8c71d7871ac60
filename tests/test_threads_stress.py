"""Thread and fork stress: many Python threads calling every public function at once, fastnorm's own
threads (set_num_threads 1 vs 2), large inputs from several Python threads, batch-norm running
buffers per thread, and fork in the middle of use (after threaded calls, and while another Python
thread is inside a fastnorm call).

What is claimed (fastnorm.h, _threads.py, docs/decisions.md) and pinned here:

* calls from several Python threads on shared inputs give exactly (bitwise) the serial results and
  leave the inputs unchanged;
* "a result depends on the thread count but never on timing": repeated calls with the same thread
  count are bitwise equal; 1 and 2 threads agree to rounding (bitwise for the per-group kernels);
* batch norm with one pair of running buffers per thread gives exactly the serial result; shared
  buffers race like NumPy's ``+=`` (updates may be lost, values are never corrupted);
* a child forked after threaded calls, or while another thread is inside a call, works.

The whole file takes ~10-20 s on 2 cores.
"""
import os
import sys
import threading
import time

import numpy as np
import pytest

import fastnorm

N_THREADS = 8


@pytest.fixture(autouse=True)
def restore_threads():
    n = fastnorm.get_num_threads()
    yield
    fastnorm.set_num_threads(n)


def _inputs(seed=0):
    """Shared inputs big enough (>= 2**17 elements) for fastnorm to split a call across threads,
    in several layouts (C, Fortran, strided, byte-swapped) and dtypes."""
    rng = np.random.default_rng(seed)
    x2 = (rng.standard_normal((512, 512)) * 3 + 10).astype(np.float32)              # (N, C)
    x4 = rng.standard_normal((8, 16, 32, 64)) * 2 - 1                                 # (N, C, H, W)
    x3h = (rng.standard_normal((16, 128, 128)) + 4).astype(np.float16)                # (N, L, D)
    big = rng.standard_normal((1024, 600))
    return {
        "x2": x2,
        "x2F": np.asfortranarray(x2),
        "x4": x4,
        "x4T": np.ascontiguousarray(x4.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),  # channels-last memory
        "x3h": x3h,
        "strided": big[::2, ::2][:, :256],                                              # (512, 256) view
        "swapped": x2.astype(x2.dtype.newbyteorder("S")),
        "mask2": rng.random(512) < 0.8,
        "mask3": rng.random((16, 128)) < 0.7,
        "dy2": rng.standard_normal((512, 512)).astype(np.float32),
        "dy4": rng.standard_normal((8, 16, 32, 64)),
        "w512": (0.5 + rng.random(512)).astype(np.float32),
        "b512": rng.standard_normal(512).astype(np.float32),
        "w16": 0.5 + rng.random(16),
        "rm": rng.standard_normal(16),
        "rv": 0.5 + rng.random(16),
        "g": rng.random(512) + 0.5,
        "lengths": rng.integers(0, 128, size=16),
    }


def every_function(d):
    """Every public function on the shared inputs: name -> tuple of arrays (read-only use of d)."""
    r = {}
    y, mean, rstd = fastnorm.layer_norm(d["x2"], d["w512"], d["b512"], return_stats=True)
    r["layer_norm"] = (y, mean, rstd)
    r["layer_norm_backward"] = fastnorm.layer_norm_backward(d["dy2"], d["x2"], mean, rstd, d["w512"])
    r["layer_norm_fast"] = (fastnorm.layer_norm(d["x2"]),)
    r["layer_norm_F"] = (fastnorm.layer_norm(d["x2F"], axis=0),)
    r["layer_norm_tuple"] = fastnorm.layer_norm(d["x4"], axis=(1, 3), return_stats=True)
    r["layer_norm_masked_f16"] = fastnorm.layer_norm(d["x3h"], mask=d["mask3"], return_stats=True)
    r["layer_norm_strided"] = (fastnorm.layer_norm(d["strided"]),)
    r["layer_norm_swapped"] = (fastnorm.layer_norm(d["swapped"]),)
    y, rstd = fastnorm.rms_norm(d["x2"], d["w512"], return_stats=True)
    r["rms_norm"] = (y, rstd)
    r["rms_norm_backward"] = fastnorm.rms_norm_backward(d["dy2"], d["x2"], rstd, d["w512"])
    y, mean, rstd = fastnorm.batch_norm(d["x4"], d["w16"], axis=1, return_stats=True)
    r["batch_norm"] = (y, mean, rstd)
    r["batch_norm_backward"] = fastnorm.batch_norm_backward(d["dy4"], d["x4"], mean, rstd, d["w16"], axis=1)
    r["batch_norm_eval"] = fastnorm.batch_norm(d["x4T"], axis=1, running_mean=d["rm"], running_var=d["rv"],
                                               training=False, return_stats=True)
    r["batch_norm_rows_masked"] = fastnorm.batch_norm(d["x2"], mask=d["mask2"], return_stats=True)
    y, mean, rstd = fastnorm.instance_norm(d["x4"], axis=1, return_stats=True)
    r["instance_norm"] = (y, mean, rstd)
    r["instance_norm_backward"] = fastnorm.instance_norm_backward(d["dy4"], d["x4"], mean, rstd, axis=1)
    y, mean, rstd = fastnorm.group_norm(d["x4T"], 4, d["w16"], axis=1, return_stats=True)
    r["group_norm"] = (y, mean, rstd)
    r["group_norm_backward"] = fastnorm.group_norm_backward(d["dy4"], d["x4T"], mean, rstd, 4, d["w16"], axis=1)
    r["standardize"] = (fastnorm.standardize(d["x2"], axis=1),)
    r["min_max_scale"] = (fastnorm.min_max_scale(d["x2"], axis=1),)
    w = fastnorm.weight_norm(d["x2"], d["g"], axis=0)
    r["weight_norm"] = (w,)
    r["weight_norm_backward"] = fastnorm.weight_norm_backward(d["dy2"], d["x2"], d["g"], axis=0)
    r["mask_from_lengths"] = (fastnorm.mask_from_lengths(d["lengths"], 128),)
    layer = fastnorm.LayerNorm(512, dtype=np.float32)                # a layer per call: no shared state
    r["LayerNorm"] = (layer(d["x2"]), layer.backward(d["dy2"]), layer.dweight, layer.dbias)
    return r


def assert_same(got, want, exact=True, what=""):
    assert got.keys() == want.keys()
    for name in want:
        assert len(got[name]) == len(want[name]), name
        for a, b in zip(got[name], want[name]):
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape, f"{what}{name}"
            if exact:
                assert np.array_equal(a, b, equal_nan=True), f"{what}{name}: not bitwise equal"
            else:
                tol = {2: 2e-3, 4: 2e-6}.get(a.dtype.itemsize, 1e-12)
                scale = max(1.0, float(np.nanmax(np.abs(b.astype(np.float64)))) if b.size else 1.0)
                np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=tol, atol=tol * scale,
                                           equal_nan=True, err_msg=f"{what}{name}")


def run_threads(target, n):
    """Start n threads on target(i) together (a barrier), join, re-raise the first error."""
    barrier = threading.Barrier(n)
    errors = []

    def run(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as err:  # noqa: BLE001 - reported in the main thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------- Python threads

@pytest.mark.parametrize("fastnorm_threads", [1, 2])
def test_many_python_threads_every_function_matches_serial(fastnorm_threads):
    fastnorm.set_num_threads(fastnorm_threads)
    d = _inputs()
    before = {k: v.copy() for k, v in d.items()}
    serial = every_function(d)
    results = [[] for _ in range(N_THREADS)]

    def work(i):
        for _ in range(2):
            results[i].append(every_function(d))

    run_threads(work, N_THREADS)
    for i, rs in enumerate(results):
        for rep, r in enumerate(rs):
            assert_same(r, serial, exact=True, what=f"thread {i} call {rep}: ")
    for k in d:
        assert np.array_equal(d[k], before[k], equal_nan=True), f"shared input {k} was modified"


def test_threads_writing_out_into_separate_rows_of_one_array():
    """Each thread writes its own slice of one shared output array (out=): no interference."""
    d = _inputs(1)
    x = d["x4"]
    out = np.full_like(x, np.nan)
    want = fastnorm.layer_norm(x, axis=(2, 3))

    def work(i):
        for n in range(i, x.shape[0], N_THREADS):
            fastnorm.layer_norm(x[n], axis=(1, 2), out=out[n])

    run_threads(work, N_THREADS)
    assert np.array_equal(out, want)


def test_set_num_threads_1_and_2_agree_and_results_never_depend_on_timing():
    d = _inputs(2)
    fastnorm.set_num_threads(1)
    one = every_function(d)
    fastnorm.set_num_threads(2)
    two = [every_function(d) for _ in range(3)]
    for r in two[1:]:
        assert_same(r, two[0], exact=True, what="2 threads, repeated: ")
    assert_same(two[0], one, exact=False, what="1 vs 2 threads: ")
    # the per-group kernels split groups between threads, never a group: bitwise equal
    per_group = ["layer_norm", "layer_norm_fast", "layer_norm_F", "layer_norm_tuple", "layer_norm_masked_f16",
                 "layer_norm_strided", "layer_norm_swapped", "rms_norm", "instance_norm", "group_norm",
                 "batch_norm_eval"]
    assert_same({k: two[0][k] for k in per_group}, {k: one[k] for k in per_group}, exact=True,
                what="1 vs 2 threads, per-group kernel: ")


def test_set_num_threads_changed_while_other_threads_compute():
    """Flipping the thread count during calls is allowed: every result equals the 1- or 2-thread one."""
    d = _inputs(3)
    fastnorm.set_num_threads(1)
    one = every_function(d)
    fastnorm.set_num_threads(2)
    two = every_function(d)
    stop = threading.Event()

    def flipper():
        k = 0
        while not stop.is_set():
            fastnorm.set_num_threads(1 + k % 2)
            k += 1
            time.sleep(0.0005)

    f = threading.Thread(target=flipper)
    f.start()
    try:
        outs = [[] for _ in range(4)]
        run_threads(lambda i: outs[i].append(every_function(d)), 4)
    finally:
        stop.set()
        f.join()
    # A function that runs several kernels (batch norm backward: sums, then combine) reads the
    # count once per kernel, so a flip between them mixes the two: compare those to rounding.
    single_kernel = {"layer_norm", "layer_norm_fast", "layer_norm_F", "layer_norm_tuple", "layer_norm_masked_f16",
                     "layer_norm_strided", "layer_norm_swapped", "rms_norm", "instance_norm", "group_norm",
                     "batch_norm_eval"}
    for o in outs:
        r = o[0]
        for name in r:
            if name in single_kernel:
                ok = any(all(np.array_equal(a, b, equal_nan=True) for a, b in zip(r[name], ref[name]))
                         for ref in (one, two))
                assert ok, f"{name}: neither the 1-thread nor the 2-thread result"
        assert_same(r, two, exact=False, what="thread count flipped during the call: ")


def test_large_inputs_from_several_python_threads_with_two_fastnorm_threads():
    fastnorm.set_num_threads(2)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((1024, 2048)) * 5 + 100).astype(np.float32)      # 2M elements, 8 MB
    x4 = rng.standard_normal((16, 32, 64, 64))                                 # 2M elements, 16 MB
    calls = {
        "layer": lambda: fastnorm.layer_norm(x),
        "layer_axis0": lambda: fastnorm.layer_norm(x, axis=0),
        "batch": lambda: fastnorm.batch_norm(x, return_stats=True),
        "batch4": lambda: fastnorm.batch_norm(x4, axis=1, return_stats=True),
        "group4": lambda: fastnorm.group_norm(x4, 8, axis=1, return_stats=True),
        "rms4": lambda: fastnorm.rms_norm(x4, axis=(2, 3)),
    }
    serial = {k: f() for k, f in calls.items()}
    names = list(calls)
    got = [dict() for _ in range(4)]

    def work(i):
        for k in names[i % 2::2] + names:
            got[i][k] = calls[k]()

    run_threads(work, 4)
    for g in got:
        for k in names:
            a, b = (g[k], serial[k]) if isinstance(g[k], tuple) else ((g[k],), (serial[k],))
            for u, v in zip(a, b):
                assert np.array_equal(u, v), k


# --------------------------------------------------------------------------- batch-norm running buffers

def test_batch_norm_separate_running_buffers_per_thread_are_exact():
    """One (running_mean, running_var) pair per thread, each thread its own batches: the buffers end
    exactly where a serial run of that thread's batches puts them (docs/decisions.md)."""
    fastnorm.set_num_threads(2)
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((64, 32, 128)) * (1 + i) + i for i in range(N_THREADS)]   # (N, C, L)

    def train(x, rm, rv, steps=6):
        ys = []
        for s in range(steps):
            ys.append(fastnorm.batch_norm(x[s % 2::2], axis=1, running_mean=rm, running_var=rv, momentum=0.2))
        return ys

    want = []
    for x in batches:
        rm, rv = np.zeros(32), np.ones(32)
        ys = train(x, rm, rv)
        want.append((rm, rv, ys))
    bufs = [(np.zeros(32), np.ones(32)) for _ in range(N_THREADS)]
    outs = [None] * N_THREADS

    def work(i):
        outs[i] = train(batches[i], *bufs[i])

    run_threads(work, N_THREADS)
    for i in range(N_THREADS):
        assert np.array_equal(bufs[i][0], want[i][0]) and np.array_equal(bufs[i][1], want[i][1]), i
        for a, b in zip(outs[i], want[i][2]):
            assert np.array_equal(a, b)


def test_batch_norm_shared_running_buffers_race_but_never_corrupt():
    """Shared buffers race on the in-place update (documented, like NumPy's +=): updates may be lost,
    but every element ends at r_k = (1-m)**k r0 + (1-(1-m)**k) s for some k <= number of calls,
    never a torn or NaN value, and the normalized outputs (batch statistics) are all exact."""
    x = np.random.default_rng(6).standard_normal((4096, 8)) + 3
    m, calls_per_thread = 0.1, 20
    y_want, mean, rstd = fastnorm.batch_norm(x, return_stats=True)
    var_unbiased = x.var(axis=0, ddof=1)
    rm, rv = np.zeros(8), np.ones(8)
    outs = [[] for _ in range(N_THREADS)]

    def work(i):
        for _ in range(calls_per_thread):
            outs[i].append(fastnorm.batch_norm(x, running_mean=rm, running_var=rv, momentum=m))

    run_threads(work, N_THREADS)
    for o in outs:
        for y in o:
            assert np.array_equal(y, y_want)
    total = N_THREADS * calls_per_thread
    # the sequence of values one element can take (computed as the library does: float64, in order)
    seq_m, seq_v = [np.zeros(8)], [np.ones(8)]
    for _ in range(total):
        seq_m.append((1 - m) * seq_m[-1] + m * mean)
        seq_v.append((1 - m) * seq_v[-1] + m * var_unbiased)
    seq_m, seq_v = np.array(seq_m), np.array(seq_v)
    for c in range(8):
        assert np.isclose(seq_m[1:, c], rm[c], rtol=1e-12, atol=1e-15).any(), (c, rm[c])
        assert np.isclose(seq_v[1:, c], rv[c], rtol=1e-12, atol=1e-15).any(), (c, rv[c])


# --------------------------------------------------------------------------- fork

def _wait_child(pid, timeout=60.0):
    """Exit status of child pid; kills it and fails if it has not finished within timeout s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child {pid} hung (killed after {timeout} s)")


def _child_check(d, want):
    """In a forked child: recompute everything (fastnorm with 2 threads) and compare; never returns."""
    code = 1
    try:
        fastnorm.set_num_threads(2)
        got = every_function(d)
        assert_same(got, want, exact=True)
        code = 0
    except BaseException:  # noqa: BLE001
        code = 1
    finally:
        sys.stdout.flush()
        os._exit(code)


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@needs_fork
def test_fork_after_threaded_calls_leaves_a_working_child():
    fastnorm.set_num_threads(2)
    d = _inputs(7)
    want = every_function(d)                      # fastnorm threads and Python threads have run
    run_threads(lambda i: every_function(d), 4)
    pid = os.fork()
    if pid == 0:
        _child_check(d, want)
    assert _wait_child(pid) == 0, "the child's results differ from the parent's (or it failed)"
    assert_same(every_function(d), want, exact=True, what="parent after fork: ")


@needs_fork
def test_fork_while_another_thread_is_inside_a_fastnorm_call():
    fastnorm.set_num_threads(2)
    d = _inputs(8)
    want = every_function(d)
    big = np.random.default_rng(9).standard_normal((2048, 2048))      # 4M elements: calls of ~10 ms
    big_want = fastnorm.batch_norm(big)
    stop, inside, errors = threading.Event(), threading.Event(), []

    def busy():
        try:
            while not stop.is_set():
                inside.set()
                y = fastnorm.batch_norm(big)          # GIL released inside: main thread forks meanwhile
                if not np.array_equal(y, big_want):
                    errors.append("busy thread got a different result")
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    t = threading.Thread(target=busy)
    t.start()
    statuses = []
    try:
        inside.wait(10)
        for k in range(3):
            time.sleep(0.003 * (k + 1))
            pid = os.fork()
            if pid == 0:
                _child_check(d, want)
            statuses.append(_wait_child(pid))
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    assert statuses == [0, 0, 0], f"child exit statuses {statuses}"
