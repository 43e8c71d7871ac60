"""Outputs large enough to be written with non-temporal stores.

The kernels stream an output past the cache when it is at least half the last-level cache
(``sysconf(_SC_LEVEL3_CACHE_SIZE)``, 32 MiB when unknown) and at least 8 MiB. These tests size
their arrays above that on the machine they run on, so the streamed paths (a group or line computed
into a buffer, then copied out 16 bytes at a time from the first 16-byte boundary) are the ones
compared against the float64 references: aligned and unaligned outputs, row lengths that are and
are not a multiple of 16 bytes, every dtype of the in-place paths, forward and backward.
"""

import numpy as np
import pytest

import fastnorm
from fastnorm import _core
import grad_reference as gref
import reference as ref
from forward_checks import assert_close, tol_for


def stream_bytes():
    """The smallest output (bytes) that is streamed here, plus a margin."""
    return _core.stream_min_bytes() + (1 << 20)


NEEDED = stream_bytes()
pytestmark = pytest.mark.skipif(NEEDED > 320 << 20, reason=f"streaming starts at {NEEDED >> 20} MiB here")


def rows_for(row_elements, dtype):
    return -(-NEEDED // (row_elements * np.dtype(dtype).itemsize))


def unaligned_empty(shape, dtype, offset_items):
    """An uninitialized C-contiguous array starting offset_items elements into a 64-byte aligned buffer."""
    itemsize = np.dtype(dtype).itemsize
    n = int(np.prod(shape))
    raw = np.empty((n + offset_items) * itemsize + 64, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + offset_items * itemsize
    return raw[start:start + n * itemsize].view(dtype).reshape(shape)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(20261122)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("D", [1024, 1001])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned-out", "offset-out"])
def test_layer_norm_streamed(rng, dtype, D, offset):
    A = rows_for(D, dtype)
    x = (3.0 + rng.standard_normal((A, D))).astype(dtype)
    w = rng.standard_normal(D).astype(dtype)
    b = rng.standard_normal(D).astype(dtype)
    out = unaligned_empty(x.shape, dtype, offset)
    out[...] = np.nan
    y = fastnorm.layer_norm(x, w, b, out=out)
    assert y is out
    want, _, _ = ref.layer_norm(x, w, b)
    assert_close(y, want, tol_for(dtype), err_msg=f"streamed layer_norm {dtype.__name__} D={D}")


def test_rms_norm_streamed_allocating(rng):
    D = 768
    x = rng.standard_normal((rows_for(D, np.float32), D)).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    want, _ = ref.rms_norm(x, w)
    assert_close(fastnorm.rms_norm(x, w), want, tol_for(np.float32), err_msg="streamed rms_norm")


@pytest.mark.parametrize("name", ["instance_norm", "group_norm"])
def test_planes_streamed(rng, name):
    C, H, W = 16, 30, 33                          # planes of 990 floats: rows not a multiple of 16 bytes
    N = rows_for(C * H * W, np.float32)
    x = (rng.standard_normal((N, C, H, W)) - 2.0).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    out = unaligned_empty(x.shape, np.float32, 3)
    if name == "group_norm":
        y = fastnorm.group_norm(x, 4, w, b, axis=1, out=out)
        want, _, _ = ref.group_norm(x, 4, w, b, axis=1)
    else:
        y = fastnorm.instance_norm(x, w, b, axis=1, out=out)
        want, _, _ = ref.instance_norm(x, w, b, axis=1)
    assert_close(y, want, tol_for(np.float32), err_msg=f"streamed {name}")


@pytest.mark.parametrize("shape,axis", [((None, 64), -1), ((None, 8, 24, 24), 1)], ids=["columns", "planes"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned-out", "offset-out"])
def test_batch_norm_streamed(rng, shape, axis, offset):
    per = int(np.prod(shape[1:]))
    shape = (rows_for(per, np.float32),) + shape[1:]
    C = shape[axis]
    x = (5.0 + 0.5 * rng.standard_normal(shape)).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    out = unaligned_empty(shape, np.float32, offset)
    y, mean, rstd = fastnorm.batch_norm(x, w, b, axis=axis, out=out, return_stats=True)
    want, _, _ = ref.batch_norm(x, w, b, axis=axis)
    assert_close(y, want, tol_for(np.float32), err_msg="streamed batch_norm")

    dy = rng.standard_normal(shape).astype(np.float32)
    dout = unaligned_empty(shape, np.float32, 1 - offset)
    dx, dw, db = fastnorm.batch_norm_backward(dy, x, mean, rstd, w, axis=axis, out=dout)
    assert dx is dout
    want_dx, want_dw, want_db = gref.analytic_grads("batch_norm", dy, x, w, axis=axis)
    assert_close(dx, want_dx, 1e-4, err_msg="streamed batch_norm_backward dx")
    assert_close(dw, want_dw, 1e-4, err_msg="streamed batch_norm_backward dweight")
    assert_close(db, want_db, 1e-4, err_msg="streamed batch_norm_backward dbias")


@pytest.mark.parametrize("D", [1024, 999])
def test_layer_norm_backward_streamed(rng, D):
    A = rows_for(D, np.float32)
    x = (1.0 + rng.standard_normal((A, D))).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    b = rng.standard_normal(D).astype(np.float32)
    _, mean, rstd = fastnorm.layer_norm(x.astype(np.float64), w, b, return_stats=True)
    dy = rng.standard_normal((A, D)).astype(np.float32)
    dx, dw, db = fastnorm.layer_norm_backward(dy, x, mean, rstd, w)
    want_dx, want_dw, want_db = gref.analytic_grads("layer_norm", dy, x, w)
    assert_close(dx, want_dx, 1e-4, err_msg="streamed layer_norm_backward dx")
    assert_close(dw, want_dw, 1e-4, err_msg="streamed layer_norm_backward dweight")
    assert_close(db, want_db, 1e-4, err_msg="streamed layer_norm_backward dbias")
