"""Test helpers: call fastnorm and the float64 reference the same way, and compare with per-dtype tolerances."""

import numpy as np

import fastnorm
import reference as ref

FLOAT_DTYPES = (np.float16, np.float32, np.float64)
INT_DTYPES = (np.int8, np.uint8, np.int32, np.int64, np.bool_)
FUNCS = ("layer_norm", "rms_norm", "batch_norm", "instance_norm", "group_norm")

# Accuracy against the float64 reference, relative to the output scale (max(1, max|expected|)).
TOL = {
    np.dtype(np.float16): 1e-2,
    np.dtype(np.float32): 1e-5,
    np.dtype(np.float64): 1e-11,
}
# mean / rstd: float32 for float16 and float32 input, so float16 input gets float32-ish stats (with slack).
STATS_TOL = {
    np.dtype(np.float16): 1e-3,
    np.dtype(np.float32): 1e-5,
    np.dtype(np.float64): 1e-11,
}


def native(dtype):
    return np.dtype(dtype).newbyteorder("=")


def result_dtype(x_dtype):
    """float16/32/64 keep their dtype; integer and bool become float64."""
    x_dtype = native(x_dtype)
    return x_dtype if x_dtype.kind == "f" else np.dtype(np.float64)


def stats_dtype(x_dtype):
    """float32 stats for float16/float32 input, float64 otherwise."""
    return np.dtype(np.float32) if result_dtype(x_dtype).itemsize <= 4 else np.dtype(np.float64)


def tol_for(x_dtype):
    return TOL[result_dtype(x_dtype)]


def stats_tol_for(x_dtype):
    return STATS_TOL[result_dtype(x_dtype)]


def random_array(rng, shape, dtype, loc=0.5, scale=2.0):
    """Random values in ``dtype`` (normal for floats, small integers for int, coin flips for bool)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (loc + scale * rng.standard_normal(shape)).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind == "u":
        return rng.integers(0, 11, size=shape).astype(dtype)
    return rng.integers(-5, 6, size=shape).astype(dtype)


def param_dtype(x_dtype):
    """dtype used for weight/bias in the tests: x's dtype for floats, float64 otherwise."""
    return result_dtype(x_dtype)


# --------------------------------------------------------------------------- shapes

def feat_axes(name, ndim, axis):
    """Sorted non-negative feature axes."""
    return ref.feature_axes(axis, ndim)


def feature_shape(name, shape, axis):
    """Shape of weight/bias: x.shape at the feature axes (in increasing axis order)."""
    return tuple(shape[a] for a in feat_axes(name, len(shape), axis))


def mask_shape(name, shape, axis):
    """Shape of mask: x.shape without the feature axes."""
    feat = feat_axes(name, len(shape), axis)
    return tuple(s for i, s in enumerate(shape) if i not in feat)


def stats_shape(name, shape, axis, num_groups=None):
    feat = feat_axes(name, len(shape), axis)
    if name in ("layer_norm", "rms_norm"):
        return tuple(s for i, s in enumerate(shape) if i not in feat)
    if name == "batch_norm":
        return (shape[feat[0]],)
    if name == "instance_norm":
        return (shape[0], shape[feat[0]])
    return (shape[0], num_groups)


def expand_mask(name, mask, shape, axis):
    """The mask broadcast to x's shape (True where x is a real element)."""
    feat = feat_axes(name, len(shape), axis)
    return np.broadcast_to(np.expand_dims(mask, feat), shape)


# --------------------------------------------------------------------------- calling

_REF_KEYS = ("axis", "eps", "mask", "running_mean", "running_var", "training")


def call(name, x, weight=None, bias=None, *, num_groups=None, **kw):
    """fastnorm.<name>(x, [num_groups,] weight, bias, **kw)."""
    fn = getattr(fastnorm, name)
    if name == "group_norm":
        return fn(x, num_groups, weight, bias, **kw)
    return fn(x, weight, bias, **kw)


def call_stats(name, x, weight=None, bias=None, **kw):
    """(y, mean, rstd) from fastnorm with return_stats=True; mean is None for rms_norm."""
    result = call(name, x, weight, bias, return_stats=True, **kw)
    assert isinstance(result, tuple)
    if name == "rms_norm":
        assert len(result) == 2
        return result[0], None, result[1]
    assert len(result) == 3
    return result


def reference(name, x, weight=None, bias=None, *, num_groups=None, **kw):
    """(y, mean, rstd) from the float64 reference; mean is None for rms_norm."""
    kw = {k: v for k, v in kw.items() if k in _REF_KEYS}
    if name == "layer_norm":
        return ref.layer_norm(x, weight, bias, **kw)
    if name == "rms_norm":
        y, rstd = ref.rms_norm(x, weight, bias, **kw)
        return y, None, rstd
    if name == "batch_norm":
        return ref.batch_norm(x, weight, bias, **kw)
    if name == "instance_norm":
        return ref.instance_norm(x, weight, bias, **kw)
    if name == "group_norm":
        return ref.group_norm(x, num_groups, weight, bias, **kw)
    raise ValueError(name)


# --------------------------------------------------------------------------- comparing

def assert_close(got, want, tol, scale=None, err_msg=""):
    """allclose with rtol=tol and atol=tol*scale; scale defaults to max(1, max finite |want|).

    NaN must match NaN and +-Inf must match the same infinity."""
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{err_msg}: shape {got.shape} != expected {want.shape}"
    if scale is None:
        finite = np.abs(want[np.isfinite(want)])
        scale = max(1.0, float(finite.max()) if finite.size else 1.0)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol * scale,
                               equal_nan=True, err_msg=err_msg)


def compare(name, got, want, x_dtype, *, y_tol=None, stats_tol=None, check_stats_dtype=True):
    """Compare (y, mean, rstd) tuples, values and dtypes."""
    y, mean, rstd = got
    y_ref, mean_ref, rstd_ref = want
    y_tol = tol_for(x_dtype) if y_tol is None else y_tol
    stats_tol = stats_tol_for(x_dtype) if stats_tol is None else stats_tol

    assert isinstance(y, np.ndarray)
    assert native(y.dtype) == result_dtype(x_dtype), f"y dtype {y.dtype} for x dtype {x_dtype}"
    assert_close(y, y_ref, y_tol, err_msg=f"{name}: y")
    if rstd is not None or rstd_ref is not None:
        assert_close(rstd, rstd_ref, stats_tol, err_msg=f"{name}: rstd")
        if check_stats_dtype:
            assert native(np.asarray(rstd).dtype) == stats_dtype(x_dtype), f"rstd dtype {rstd.dtype}"
    if name != "rms_norm":
        assert_close(mean, mean_ref, stats_tol, err_msg=f"{name}: mean")
        if check_stats_dtype:
            assert native(np.asarray(mean).dtype) == stats_dtype(x_dtype), f"mean dtype {mean.dtype}"


def check(name, x, weight=None, bias=None, *, x_values=None, y_tol=None, stats_tol=None, **kw):
    """Run fastnorm (return_stats=True) and the reference; compare everything. Returns fastnorm's result.

    x_values: the values to give the reference if x is going to be overwritten (out=x)."""
    x_values = x if x_values is None else x_values
    want = reference(name, x_values, weight, bias, **kw)
    got = call_stats(name, x, weight, bias, **kw)
    compare(name, got, want, np.asarray(x_values).dtype, y_tol=y_tol, stats_tol=stats_tol)
    return got


def at_page_offset(shape, dtype, offset):
    """An uninitialized C-contiguous array whose data starts `offset` bytes into a 4 KiB page:
    for placing an output a chosen distance after its input modulo 4 KiB (4 KiB aliasing)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    raw = np.empty(n * dtype.itemsize + 8192, np.uint8)
    start = (offset - raw.ctypes.data) % 4096
    view = raw[start:start + n * dtype.itemsize].view(dtype).reshape(shape)
    assert view.ctypes.data % 4096 == offset
    return view
