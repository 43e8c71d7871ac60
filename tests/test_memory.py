"""The output memory: fastnorm keeps the last two freed large outputs (``set_output_cache``) and reuses them.

A reused block holds whatever the previous output left there, so every test here first poisons
the block (fills the dropped output with NaN) and then checks the new output against the float64
reference: a kernel that left any element unwritten would show a NaN. Sizes are >= 1 MiB, where
the cache starts.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastnorm
import grad_reference as gref
import reference as ref
from fastnorm import _core
from forward_checks import at_page_offset
from numpy._core.multiarray import get_handler_name

MIB = 2**20
RNG = np.random.default_rng(11)


@pytest.fixture(autouse=True)
def default_cache():
    """Every test starts with the default limit and nothing kept, and leaves it so."""
    previous = fastnorm.get_output_cache()
    fastnorm.set_output_cache(0)
    fastnorm.set_output_cache(256 * MIB)
    yield
    fastnorm.set_output_cache(0)
    fastnorm.set_output_cache(previous)


def _layer(x):
    w, b = RNG.standard_normal(x.shape[-1]).astype(x.dtype), RNG.standard_normal(x.shape[-1]).astype(x.dtype)
    return (lambda: fastnorm.layer_norm(x, w, b)), ref.layer_norm(x, w, b)[0]


def _rms(x):
    w = RNG.standard_normal(x.shape[-1]).astype(x.dtype)
    return (lambda: fastnorm.rms_norm(x, w)), ref.rms_norm(x, w)[0]


def _batch(x):
    return (lambda: fastnorm.batch_norm(x, axis=1)), ref.batch_norm(x, axis=1)[0]


def _instance(x):
    return (lambda: fastnorm.instance_norm(x, axis=1)), ref.instance_norm(x, axis=1)[0]


def _group(x):
    return (lambda: fastnorm.group_norm(x, 4, axis=1)), ref.group_norm(x, 4, axis=1)[0]


def _layer_backward(x):
    dy = RNG.standard_normal(x.shape).astype(x.dtype)
    _, mean, rstd = fastnorm.layer_norm(x, return_stats=True)
    expected = gref.analytic_grads("layer_norm", dy, x)[0]
    return (lambda: fastnorm.layer_norm_backward(dy, x, mean, rstd)[0]), expected


# (function, shape, dtype, tolerance relative to max|expected|); every output is >= 1 MiB
CASES = [
    (_layer, (512, 1024), np.float32, 1e-5),
    (_layer, (256, 1024), np.float64, 1e-12),
    (_layer, (1024, 1024), np.float16, 2e-3),
    (_rms, (512, 1024), np.float32, 1e-5),
    (_batch, (16, 8, 64, 64), np.float32, 1e-5),
    (_instance, (16, 8, 64, 64), np.float32, 1e-5),
    (_group, (16, 8, 64, 64), np.float32, 1e-5),
    (_layer_backward, (512, 1024), np.float32, 1e-4),
]


@pytest.mark.parametrize("make, shape, dtype, tol", CASES,
                         ids=[f"{c[0].__name__[1:]}-{np.dtype(c[2]).name}" for c in CASES])
def test_a_kept_block_is_reused_and_fully_overwritten(make, shape, dtype, tol):
    x = (RNG.standard_normal(shape) * 3 + 1).astype(dtype)
    call, expected = make(x)
    first = call()
    assert get_handler_name(first) == "fastnorm_output" and first.flags.owndata
    address = first.ctypes.data
    first[...] = np.nan                         # poison the block before it is kept
    del first
    assert _core.kept_output_bytes() >= x.size * x.dtype.itemsize
    second = call()
    assert second.ctypes.data == address        # the same memory came back ...
    assert _core.kept_output_bytes() == 0
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(second, expected, rtol=0, atol=tol * scale)   # ... every element rewritten


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_both_outputs_of_an_add_norm_call_come_back(op):
    """add_layer_norm/add_rms_norm make two large outputs (y, h): both are kept and both reused."""
    x, r = (RNG.standard_normal((2, 512, 1024)) * 3 + 1).astype(np.float32)
    w = RNG.standard_normal(1024).astype(np.float32)
    call = lambda: getattr(fastnorm, op)(x, r, w)                              # noqa: E731
    y, h = call()
    addresses = {y.ctypes.data, h.ctypes.data}
    assert {get_handler_name(y), get_handler_name(h)} == {"fastnorm_output"}
    y[...] = np.nan                              # poison both blocks before they are kept
    h[...] = np.nan
    del y, h
    assert _core.kept_output_bytes() == 2 * x.nbytes
    y, h = call()
    assert {y.ctypes.data, h.ctypes.data} == addresses and _core.kept_output_bytes() == 0
    np.testing.assert_array_equal(h, x + r)
    expected = getattr(ref, op[4:])(x.astype(np.float64) + r, w)[0]
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.max(np.abs(expected)))


def test_the_kept_blocks_share_the_limit_and_the_oldest_goes_first():
    x = RNG.standard_normal((512, 1024)).astype(np.float32)                  # 2 MiB outputs
    first, second = fastnorm.layer_norm(x), fastnorm.layer_norm(x + 1)
    newest = second.ctypes.data
    del first, second                            # second freed last: the newest
    assert _core.kept_output_bytes() == 4 * MIB
    fastnorm.set_output_cache(3 * MIB)           # both no longer fit: the oldest is released
    assert _core.kept_output_bytes() == 2 * MIB
    y = fastnorm.layer_norm(x)
    assert y.ctypes.data == newest and _core.kept_output_bytes() == 0
    a = fastnorm.layer_norm(x)                   # two live 2 MiB outputs under a 3 MiB limit
    newest = y.ctypes.data
    del a, y                                     # y freed last
    assert _core.kept_output_bytes() == 2 * MIB  # only the newest is kept
    z = fastnorm.layer_norm(x)
    assert z.ctypes.data == newest
    np.testing.assert_allclose(z, ref.layer_norm(x)[0], rtol=0, atol=1e-5)


def test_a_freed_block_fills_an_empty_slot_without_pushing_the_other_out():
    x = RNG.standard_normal((512, 1024)).astype(np.float32)                  # 2 MiB outputs
    a, b = fastnorm.layer_norm(x), fastnorm.layer_norm(x + 1)
    del a, b
    assert _core.kept_output_bytes() == 4 * MIB
    y = fastnorm.layer_norm(x)                   # takes one: the other stays
    assert _core.kept_output_bytes() == 2 * MIB
    del y                                        # back into the empty slot
    assert _core.kept_output_bytes() == 4 * MIB
    xb = RNG.standard_normal((1024, 1024)).astype(np.float32)
    big = fastnorm.layer_norm(xb)                # 4 MiB: fits neither, both released
    assert _core.kept_output_bytes() == 0
    np.testing.assert_allclose(big, ref.layer_norm(xb)[0], rtol=0, atol=1e-5)


def test_live_outputs_never_share_memory():
    x = RNG.standard_normal((512, 1024)).astype(np.float32)
    a = fastnorm.layer_norm(x)
    b = fastnorm.layer_norm(x * 2 + 1)
    assert not np.shares_memory(a, b)
    np.testing.assert_allclose(a, ref.layer_norm(x)[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(b, ref.layer_norm(x * 2 + 1)[0], rtol=0, atol=1e-5)


def test_out_and_inputs_are_never_kept():
    x = RNG.standard_normal((512, 1024)).astype(np.float32)
    out = np.empty_like(x)
    fastnorm.layer_norm(x, out=out)
    del out, x
    assert _core.kept_output_bytes() == 0


def test_small_outputs_and_a_different_size_take_fresh_memory():
    x = RNG.standard_normal((8, 768)).astype(np.float32)
    assert get_handler_name(fastnorm.layer_norm(x)) != "fastnorm_output"   # 24 KiB: malloc's own reuse
    big = RNG.standard_normal((512, 1024)).astype(np.float32)
    y = fastnorm.layer_norm(big)
    del y
    assert _core.kept_output_bytes() == 2 * MIB
    z = fastnorm.layer_norm(big[:256])           # half the size: the kept 2 MiB block is released,
    np.testing.assert_allclose(z, ref.layer_norm(big[:256])[0], rtol=0, atol=1e-5)
    assert _core.kept_output_bytes() == 0
    del z
    assert _core.kept_output_bytes() == MIB      # not handed out (it would be kept again as 2 MiB)


def test_lowering_the_limit_releases_the_kept_block():
    y = fastnorm.layer_norm(RNG.standard_normal((512, 1024)).astype(np.float32))   # 2 MiB
    del y
    assert _core.kept_output_bytes() == 2 * MIB
    fastnorm.set_output_cache(4 * MIB)           # still fits: kept
    assert _core.kept_output_bytes() == 2 * MIB
    fastnorm.set_output_cache(MIB)               # below it: released
    assert _core.kept_output_bytes() == 0
    y = fastnorm.layer_norm(RNG.standard_normal((512, 1024)).astype(np.float32))
    assert get_handler_name(y) != "fastnorm_output"   # above the limit: not from the cache at all
    fastnorm.set_output_cache(0)
    assert fastnorm.get_output_cache() == 0


def test_a_cached_output_can_be_resized_and_keeps_its_values():
    x = RNG.standard_normal((512, 1024)).astype(np.float32)
    y = fastnorm.layer_norm(x)
    expected = y.copy()
    y.resize((600, 1024), refcheck=False)        # the handler's realloc; NumPy zero-fills the new rows
    np.testing.assert_array_equal(y[:512], expected)
    assert np.all(y[512:] == 0)
    y.resize((10, 1024), refcheck=False)
    np.testing.assert_array_equal(y, expected[:10])


def test_threads_allocating_and_dropping_outputs_get_correct_values():
    x = RNG.standard_normal((512, 1024)).astype(np.float32)
    expected = ref.layer_norm(x)[0]
    errors = []

    def work():
        for _ in range(20):
            y = fastnorm.layer_norm(x)
            if not np.allclose(y, expected, rtol=0, atol=1e-5):
                errors.append(float(np.nanmax(np.abs(y - expected))))
            y[...] = np.nan
            del y

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_reuses_what_the_parent_kept():
    x = RNG.standard_normal((512, 1024)).astype(np.float32)
    y = fastnorm.layer_norm(x)
    del y
    pid = os.fork()
    if pid == 0:
        ok = _core.kept_output_bytes() == 2 * MIB and np.allclose(fastnorm.layer_norm(x), ref.layer_norm(x)[0],
                                                                    rtol=0, atol=1e-5)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_a_limit_beyond_any_size_is_taken():
    fastnorm.set_output_cache(2**80)
    assert fastnorm.get_output_cache() == 2**80
    y = fastnorm.layer_norm(RNG.standard_normal((512, 1024)).astype(np.float32))
    assert get_handler_name(y) == "fastnorm_output"


def test_set_output_cache_takes_numpy_ints():
    try:
        fastnorm.set_output_cache(np.int64(10 * MIB))
        assert fastnorm.get_output_cache() == 10 * MIB and type(fastnorm.get_output_cache()) is int
    finally:
        fastnorm.set_output_cache(256 * MIB)


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), ("2", TypeError), (True, TypeError),
                                        (None, TypeError)])
def test_set_output_cache_rejects_bad_limits(bad, error):
    with pytest.raises(error, match="set_output_cache: max_bytes must be an int"):
        fastnorm.set_output_cache(bad)
    assert fastnorm.get_output_cache() == 256 * MIB


@pytest.mark.parametrize("value, limit, warns", [("0", 0, False), ("1048576", MIB, False),
                                                  ("lots", 256 * MIB, True), ("-5", 256 * MIB, True)])
def test_the_environment_variable_sets_the_limit(value, limit, warns):
    code = ("import warnings; warnings.simplefilter('always'); import fastnorm; "
            "print(fastnorm.get_output_cache())")
    env = dict(os.environ, FASTNORM_OUTPUT_CACHE=value)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(run.stdout) == limit
    assert ("FASTNORM_OUTPUT_CACHE" in run.stderr) == warns


# ---- streamed outputs ------------------------------------------------------------------------------
# Float32/64 layer/RMS-norm rows and float32 layer-norm dx of half the last-level cache or more
# (and >= 8 MiB) are written with non-temporal stores on AVX-512F CPUs: the same arithmetic, so the same bits as
# the same rows computed in small calls (plain stores). 64 MiB here, above the threshold on the
# dev machine (105 MiB L3); where it is not, these still check the values.
STREAM_ROWS = 16384


def _in_chunks(f, *arrays, rows=256):
    return np.concatenate([f(*(a[i:i + rows] for a in arrays)) for i in range(0, arrays[0].shape[0], rows)])


@pytest.mark.parametrize("D, misalign", [(1024, 0), (1000, 1)], ids=["aligned", "misaligned-odd-rows"])
@pytest.mark.parametrize("op, dtype, param_dtype", [("layer_norm", np.float32, np.float32),
                                                    ("rms_norm", np.float32, np.float32),
                                                    ("layer_norm", np.float32, np.float64),   # the general path
                                                    ("layer_norm", np.float64, np.float64),
                                                    ("layer_norm", np.float16, np.float16),
                                                    ("rms_norm", np.float16, np.float32),
                                                    ("layer_norm", "bfloat16", np.float32)],
                         ids=["layer-f32", "rms-f32", "layer-f32-general", "layer-f64", "layer-f16", "rms-f16",
                              "layer-bf16"])
def test_streamed_rows_have_the_bits_of_small_calls(op, dtype, param_dtype, D, misalign):
    if dtype == "bfloat16":
        dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    itemsize = np.dtype(dtype).itemsize
    rows = (64 << 20) // (itemsize * D) + 1
    x = (RNG.standard_normal((rows, D)) * 2 + 3).astype(dtype)
    w, b = RNG.standard_normal(D).astype(param_dtype), RNG.standard_normal(D).astype(param_dtype)
    f = getattr(fastnorm, op)
    call = (lambda v, out=None: f(v, w, b, out=out))
    raw = np.empty(x.size + 16, dtype)
    out = raw[misalign:misalign + x.size].reshape(x.shape)   # one element off 64-byte alignment when misaligned
    out[...] = np.nan
    y = call(x, out)
    bits = np.dtype(f"u{itemsize}")
    np.testing.assert_array_equal(y.view(bits), _in_chunks(call, x).view(bits))
    sample = slice(0, None, 997)
    expected = getattr(ref, op)(x[sample].astype(np.float64), w, b)[0]
    tol = {8: 1e-13, 4: 2e-5, 2: 2e-3 if dtype == np.float16 else 1.6e-2}[itemsize]
    np.testing.assert_allclose(y[sample].astype(np.float64), expected, rtol=0, atol=tol * np.max(np.abs(expected)))
    fastnorm.set_num_threads(1)
    try:
        np.testing.assert_array_equal(call(x).view(bits), y.view(bits))
    finally:
        fastnorm.set_num_threads(fastnorm._threads._from_environment())


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_streamed_rows_walked_backward_have_the_bits_of_small_calls(op):
    """An output 16 bytes after x modulo 4 KiB is streamed from each row's end backward (4 KiB
    aliasing, src/moments.h walk_backward): every element written, the bits of small calls."""
    x = at_page_offset((STREAM_ROWS, 1024), np.float32, 0)
    x[...] = RNG.standard_normal(x.shape, dtype=np.float32) * 2 + 3
    w, b = at_page_offset((1024,), np.float32, 2048), at_page_offset((1024,), np.float32, 3072)
    w[...], b[...] = RNG.standard_normal(1024), RNG.standard_normal(1024)
    f = getattr(fastnorm, op)
    call = (lambda v, out=None: f(v, w, b, out=out))
    out = at_page_offset(x.shape, np.float32, 16)
    out[...] = np.nan
    assert call(x, out) is out
    np.testing.assert_array_equal(out, _in_chunks(call, x))


@pytest.mark.parametrize("in_place", [False, True], ids=["out", "out=dy"])
def test_streamed_layer_norm_dx_has_the_bits_of_small_calls(in_place):
    x = (RNG.standard_normal((STREAM_ROWS, 1024), dtype=np.float32) * 2 + 3).astype(np.float32)
    dy = RNG.standard_normal(x.shape, dtype=np.float32)
    w = RNG.standard_normal(1024).astype(np.float32)
    _, mean, rstd = fastnorm.layer_norm(x, w, return_stats=True)
    small = _in_chunks(lambda d, v, m, r: fastnorm.layer_norm_backward(d, v, m, r, w)[0], dy, x, mean, rstd)
    dy_copy = dy.copy()
    dx, dweight, dbias = fastnorm.layer_norm_backward(dy, x, mean, rstd, w, out=dy if in_place else None)
    assert (dx is dy) == in_place
    np.testing.assert_array_equal(dx, small)
    sample = slice(0, None, 997)
    expected = gref.analytic_grads("layer_norm", dy_copy[sample], x[sample], w)[0]
    np.testing.assert_allclose(dx[sample], expected, rtol=0, atol=1e-4 * np.max(np.abs(expected)))
    np.testing.assert_allclose(dbias, dy_copy.sum(axis=0, dtype=np.float64), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("C, misalign", [(64, 0), (100, 1)], ids=["aligned", "misaligned-100-channels"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_streamed_batch_norm_rows_have_the_bits_of_plain_stores(backward, C, misalign):
    """Batch norm over rows of C channels, 64 MiB: streamed into a contiguous out, and with plain
    stores into a strided out (rows C + 16 apart, which the streamed pass does not take)."""
    O = (64 << 20) // (4 * C) + 3
    x = (RNG.standard_normal((O, C), dtype=np.float32) * 2 + 3).astype(np.float32)
    w, b = RNG.standard_normal(C).astype(np.float32), RNG.standard_normal(C).astype(np.float32)
    if backward:
        dy = RNG.standard_normal(x.shape, dtype=np.float32)
        _, mean, rstd = fastnorm.batch_norm(x, w, b, return_stats=True)
        call = (lambda out: fastnorm.batch_norm_backward(dy, x, mean, rstd, w, out=out)[0])
    else:
        call = (lambda out: fastnorm.batch_norm(x, w, b, out=out))
    flat = np.empty(x.size + 16, np.float32)
    streamed_out = flat[misalign:misalign + x.size].reshape(x.shape)
    strided_out = np.empty((O, C + 16), np.float32)[:, :C]
    streamed_out[...] = np.nan
    y = call(streamed_out)
    assert y is streamed_out
    np.testing.assert_array_equal(y, call(strided_out))
    rows = slice(0, None, 1009)
    if backward:
        expected = gref.analytic_grads("batch_norm", dy, x, w)[0][rows]
    else:
        expected = ref.batch_norm(x, w, b)[0][rows]
    np.testing.assert_allclose(y[rows], expected, rtol=0, atol=1e-4 * np.max(np.abs(expected)))


@pytest.mark.parametrize("misalign", [0, 1], ids=["aligned", "misaligned"])
def test_streamed_batch_norm_planes_have_the_bits_of_plain_stores(misalign):
    """Batch norm of (N, C, H, W) float32 planes along axis=1, 64 MiB: the channel-block route
    streams its output (fn_scale_shift_streamed); an all-True mask takes the two-pass route with
    plain stores. One thread for both, so the statistics are merged in the same order."""
    x = (RNG.standard_normal((64, 64, 64, 64), dtype=np.float32) * 2 + 3).astype(np.float32)
    w, b = RNG.standard_normal(64).astype(np.float32), RNG.standard_normal(64).astype(np.float32)
    flat = np.empty(x.size + 16, np.float32)
    out = flat[misalign:misalign + x.size].reshape(x.shape)
    out[...] = np.nan
    fastnorm.set_num_threads(1)
    try:
        assert fastnorm.batch_norm(x, w, b, axis=1, out=out) is out
        plain = fastnorm.batch_norm(x, w, b, axis=1, mask=np.ones((64, 64, 64), bool))
    finally:
        fastnorm.set_num_threads(fastnorm._threads._from_environment())
    np.testing.assert_array_equal(out, plain)
    np.testing.assert_array_equal(fastnorm.batch_norm(x, w, b, axis=1), out)    # two threads, allocated
    sample = (slice(None, None, 7), slice(None), slice(None, None, 9))
    stats_mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    stats_var = x.var(axis=(0, 2, 3), dtype=np.float64)
    want = (x[sample] - stats_mean[None, :, None, None]) / np.sqrt(stats_var[None, :, None, None] + 1e-5)
    want = want * w[None, :, None, None] + b[None, :, None, None]
    np.testing.assert_allclose(out[sample], want, rtol=0, atol=2e-5 * np.abs(want).max())
