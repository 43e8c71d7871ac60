"""Batch renorm (Ioffe, 2017) against a NumPy float64 reference written here, independent of fastnorm:
forward with r and d clipped or not, the running-statistics update, eval mode, gradients (a closed
form and finite differences with r and d held fixed), masks, layouts, NaN, shared memory, the layer,
errors and dask arrays."""
import zlib

import numpy as np
import pytest

import fastnorm
import reference as ref
import test_aliasing as al

DTYPES = (np.float16, np.float32, np.float64)
TOL = {np.float16: 1e-2, np.float32: 2e-5, np.float64: 1e-12}      # relative to the output scale


# --------------------------------------------------------------------------- the reference

def columns(x, axis):
    """x as float64 (M, C) columns, the feature axis last, and how to put y back."""
    x = np.array(x, dtype=np.float64)
    moved = np.moveaxis(x, axis, -1)
    return moved.reshape(-1, moved.shape[-1]), lambda cols: np.moveaxis(cols.reshape(moved.shape), -1, axis)


def renorm_ref(x, weight=None, bias=None, *, axis=-1, running_mean, running_var, r_max=3.0, d_max=5.0,
               training=True, momentum=0.1, eps=1e-5, mask=None, r=None, d=None):
    """(y, mean, rstd, r, d, new running_mean, new running_var), all float64. Given r and d are used
    as they are (held fixed, for finite differences)."""
    cols, back = columns(x, axis)
    real = np.ones(len(cols), bool) if mask is None else np.asarray(mask).reshape(-1)
    rm, rv = np.array(running_mean, np.float64), np.array(running_var, np.float64)
    w = np.ones(cols.shape[1]) if weight is None else np.asarray(weight, np.float64)
    b = np.zeros(cols.shape[1]) if bias is None else np.asarray(bias, np.float64)
    s = np.sqrt(rv + eps)
    if training:
        vals = cols[real]
        mean, var = vals.mean(axis=0), vals.var(axis=0)
        std = np.sqrt(var + eps)
        r = np.clip(std / s, 1 / r_max, r_max) if r is None else r
        d = np.clip((mean - rm) / s, -d_max, d_max) if d is None else d
        y = ((cols - mean) / std * r + d) * w + b
        rm = (1 - momentum) * rm + momentum * mean
        rv = (1 - momentum) * rv + momentum * vals.var(axis=0, ddof=1)
    else:
        mean, std, r, d = rm, s, np.ones_like(rm), np.zeros_like(rm)
        y = (cols - rm) / s * w + b
    y[~real] = 0.0
    return back(y), mean, 1 / std, r, d, rm, rv


def renorm_grads_ref(dy, x, weight=None, *, axis=-1, mask=None, training=True, running_mean, running_var,
                     r_max=3.0, d_max=5.0, eps=1e-5):
    """(dx, dweight, dbias) in closed form, r and d constants: per feature with g = dy * r * weight,
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) over the real values (dx = g * rstd in eval)."""
    _, mean, rstd, r, d, _, _ = renorm_ref(x, axis=axis, running_mean=running_mean, running_var=running_var,
                                           r_max=r_max, d_max=d_max, training=training, eps=eps, mask=mask)
    cols, back = columns(x, axis)
    dcols, _ = columns(dy, axis)
    real = np.ones(len(cols), bool) if mask is None else np.asarray(mask).reshape(-1)
    dcols[~real] = 0.0
    w = np.ones(cols.shape[1]) if weight is None else np.asarray(weight, np.float64)
    xhat = (cols - mean) * rstd
    g = dcols * r * w
    dx = g * rstd
    if training:
        n = real.sum()
        dx = rstd * (g - g[real].sum(0) / n - xhat * (g * xhat)[real].sum(0) / n)
    dx[~real] = 0.0
    return back(dx), (dcols * (xhat * r + d)).sum(0), dcols.sum(0)


def close(got, want, dtype, scale=None):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.nanmax(np.abs(want)))) if scale is None else scale
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[np.dtype(dtype).type] * scale)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


# --------------------------------------------------------------------------- forward

# running statistics relative to the batch's (mean ~2, std ~3 per feature): r and d inside their
# bounds, r clipped above / below, d clipped both ways, and everything clipped at once
REGIMES = {
    "unclipped": (lambda m, v: (m + 0.3, v * 1.5), 3.0, 5.0),
    "r at r_max": (lambda m, v: (m, v / 100), 3.0, 5.0),
    "r at 1/r_max": (lambda m, v: (m, v * 100), 3.0, 5.0),
    "d at +-d_max": (lambda m, v: (m + np.array([-40.0, 40.0, 0.1, -0.1, 25.0])[:m.size], v), 3.0, 5.0),
    "r_max=1, d_max=0": (lambda m, v: (m + 1.0, v * 2), 1.0, 0.0),
    "tight limits": (lambda m, v: (m - 2.0, v * 4), 1.5, 0.25),
}
SHAPES = [((40, 5), -1), ((6, 5, 7), 1), ((4, 5, 3, 3), 1), ((3, 8, 5), -1)]


def batch_and_running(rng, shape, axis, regime):
    x = rng.standard_normal(shape) * 3 + 2
    cols, _ = columns(x, axis)
    running, r_max, d_max = REGIMES[regime]
    rm, rv = running(cols.mean(0), cols.var(0, ddof=1))
    return x, rm, rv, r_max, d_max


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("shape, axis", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_running_update_match_the_reference(regime, shape, axis, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{regime} {shape} {dtype}".encode()))
    x64, rm, rv, r_max, d_max = batch_and_running(rng, shape, axis, regime)
    x = x64.astype(dtype)
    w, b = rng.standard_normal(5), rng.standard_normal(5)
    rm_f, rv_f = rm.astype(dtype), rv.astype(dtype)
    want = renorm_ref(x, w, b, axis=axis, running_mean=rm_f, running_var=rv_f, r_max=r_max, d_max=d_max,
                      momentum=0.25)
    y, mean, rstd, r, d = fastnorm.batch_renorm(x, w, b, axis=axis, running_mean=rm_f, running_var=rv_f,
                                                r_max=r_max, d_max=d_max, momentum=0.25, return_stats=True)
    assert y.dtype == dtype and y.shape == x.shape
    sd = np.float64 if dtype == np.float64 else np.float32
    assert all(s.dtype == sd and s.shape == (5,) for s in (mean, rstd, r, d))
    close(y, want[0], dtype)
    for got, expected in zip((mean, rstd, r, d), want[1:5]):
        np.testing.assert_allclose(got, expected, rtol=TOL[np.dtype(dtype).type] / 10,
                                   atol=TOL[np.dtype(dtype).type] / 10)
    tol = max(TOL[np.dtype(dtype).type], np.finfo(dtype).eps * 4)
    np.testing.assert_allclose(rm_f, want[5], rtol=tol, atol=tol)
    np.testing.assert_allclose(rv_f, want[6], rtol=tol)
    # the regime is what its name says (the reference's r and d)
    r_ref, d_ref = want[3], want[4]
    at_bound = np.isclose(r_ref, r_max) | np.isclose(r_ref, 1 / r_max) | np.isclose(np.abs(d_ref), d_max)
    assert not at_bound.any() if regime == "unclipped" else at_bound.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_unclipped_output_is_the_running_statistics_normalization(dtype):
    """With r and d inside their bounds y = (x - running_mean) / s * weight + bias: by hand."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 4)) * 2 - 1).astype(dtype)
    rm, rv = np.array([-1.2, -0.5, -1.0, -0.8]), np.array([3.0, 5.0, 4.0, 2.5])
    w, b = np.array([1.0, -2.0, 0.5, 3.0]), np.array([0.0, 1.0, -1.0, 2.0])
    y = fastnorm.batch_renorm(x, w, b, running_mean=rm.copy(), running_var=rv.copy(), r_max=np.inf,
                              d_max=np.inf)
    close(y, (x.astype(np.float64) - rm) / np.sqrt(rv + 1e-5) * w + b, dtype)


def test_the_docstring_numbers_by_hand():
    """x = 0, 2, 4 (mean 2, var 8/3) against running statistics (0, 1), eps = 0: s = 1, r = sqrt(8/3)
    (unclipped), d = 2 clipped to d_max = 1, so y = (x - 2) + 1."""
    x = np.array([[0.0], [2.0], [4.0]])
    rm, rv = np.zeros(1), np.ones(1)
    y, mean, rstd, r, d = fastnorm.batch_renorm(x, running_mean=rm, running_var=rv, d_max=1.0, eps=0.0,
                                                momentum=0.5, return_stats=True)
    np.testing.assert_allclose(y.ravel(), [-1.0, 1.0, 3.0], rtol=1e-15)
    np.testing.assert_allclose([mean[0], rstd[0], r[0], d[0]], [2.0, np.sqrt(3 / 8), np.sqrt(8 / 3), 1.0],
                               rtol=1e-15)
    np.testing.assert_allclose([rm[0], rv[0]], [1.0, 2.5], rtol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_r_max_1_and_d_max_0_is_batch_norm(dtype):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((30, 6)) * 5 + 3).astype(dtype)
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    y = fastnorm.batch_renorm(x, w, b, running_mean=np.full(6, 7.0), running_var=np.full(6, 0.1), r_max=1.0,
                              d_max=0.0)
    close(y, ref.batch_norm(x, w, b)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_is_batch_norms_eval(dtype):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 6, 3)) * 2 + 1).astype(dtype)
    w, b, rm = rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal(6).astype(dtype)
    rv = (rng.random(6) + 0.5).astype(dtype)
    rm.flags.writeable = rv.flags.writeable = False        # eval reads them only
    mask = rng.random((2, 3)) > 0.3
    y, mean, rstd, r, d = fastnorm.batch_renorm(x, w, b, axis=1, running_mean=rm, running_var=rv, training=False,
                                                mask=mask, return_stats=True)
    bn = fastnorm.batch_norm(x, w, b, axis=1, running_mean=rm, running_var=rv, training=False, mask=mask,
                             return_stats=True)
    for got, want in zip((y, mean, rstd), bn):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(r, np.ones(6))
    np.testing.assert_array_equal(d, np.zeros(6))
    close(y, renorm_ref(x, w, b, axis=1, running_mean=rm, running_var=rv, training=False, mask=mask)[0], dtype)


def test_integer_input_and_stats_dtype():
    x = np.array([[1, 5], [3, 1], [8, 2]])
    y, *stats = fastnorm.batch_renorm(x, running_mean=np.zeros(2), running_var=np.ones(2), return_stats=True)
    assert y.dtype == np.float64 and all(s.dtype == np.float64 for s in stats)
    close(y, renorm_ref(x, running_mean=np.zeros(2), running_var=np.ones(2))[0], np.float64)


@pytest.mark.parametrize("dtype", (np.float32, np.float64))
def test_large_mean_offset(dtype):
    """Features of mean 1e4 and std 1, running statistics near them: the accuracy of the contract."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((5000, 3)) + 1e4).astype(dtype)
    rm, rv = np.full(3, 1e4 + 0.5), np.full(3, 0.7)
    y = fastnorm.batch_renorm(x, running_mean=rm.copy(), running_var=rv.copy())
    close(y, renorm_ref(x, running_mean=rm, running_var=rv)[0], dtype)


# --------------------------------------------------------------------------- masks, layouts, edges

@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_padded_sequences(dtype):
    """(N, L, D) with padding: statistics and the running update from real tokens only, padding 0."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((4, 9, 6)) * 2 + 1).astype(dtype)
    mask = fastnorm.mask_from_lengths([9, 3, 6, 2], 9)
    x[~mask] = 1e3                                         # padding values must not reach the statistics
    rm, rv = np.full(6, 0.5), np.full(6, 2.0)
    want = renorm_ref(x, running_mean=rm, running_var=rv, mask=mask, r_max=1.5, d_max=0.2)
    y, mean, rstd, r, d = fastnorm.batch_renorm(x, running_mean=rm, running_var=rv, mask=mask, r_max=1.5,
                                                d_max=0.2, return_stats=True)
    close(y, want[0], dtype)
    assert (y[~mask] == 0).all()
    np.testing.assert_allclose(r, want[3], rtol=TOL[np.dtype(dtype).type])
    np.testing.assert_allclose(d, want[4], rtol=TOL[np.dtype(dtype).type])
    np.testing.assert_allclose(rm, want[5], rtol=1e-3 if dtype == np.float16 else 1e-6)
    np.testing.assert_allclose(rv, want[6], rtol=1e-3 if dtype == np.float16 else 1e-6)


@pytest.mark.parametrize("layout", ref.LAYOUTS)
@pytest.mark.parametrize("dtype", (np.float32, np.float64))
def test_layouts(layout, dtype):
    """Fortran order, slices, transposes, negative strides, byte-swapped and misaligned x; out too."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((5, 4, 6)) * 3 + 1).astype(dtype)
    rm, rv = np.full(4, 1.5), np.full(4, 4.0)
    want = renorm_ref(x, axis=1, running_mean=rm, running_var=rv, r_max=1.2, d_max=0.1)
    xl = ref.make_layout(x, layout)
    rm1, rv1 = rm.copy(), rv.copy()
    close(fastnorm.batch_renorm(xl, axis=1, running_mean=rm1, running_var=rv1, r_max=1.2, d_max=0.1), want[0], dtype)
    close(rm1, want[5], dtype)
    out = ref.make_layout(np.zeros_like(x), layout)
    if layout not in ("byteswapped", "misaligned"):
        fastnorm.batch_renorm(x, axis=1, running_mean=rm.copy(), running_var=rv.copy(), r_max=1.2, d_max=0.1,
                              out=out)
        close(out, want[0], dtype)


def test_size_one_batch_is_batch_norms_error_and_changes_nothing():
    rm, rv = np.zeros(3), np.ones(3)
    for x, mask in ((np.ones((1, 3)), None), (np.ones((4, 3)), np.array([False, True, False, False]))):
        with pytest.raises(ValueError, match="batch_renorm: training needs more than one value per feature"):
            fastnorm.batch_renorm(x, running_mean=rm, running_var=rv, mask=mask)
    np.testing.assert_array_equal(rm, np.zeros(3))
    np.testing.assert_array_equal(rv, np.ones(3))
    y = fastnorm.batch_renorm(np.ones((1, 3)), running_mean=rm, running_var=rv, training=False)   # eval: fine
    close(y, np.full((1, 3), 1 / np.sqrt(1 + 1e-5)), np.float64)


def test_empty_batch_leaves_the_running_statistics():
    rm, rv = np.full(3, 2.0), np.full(3, 3.0)
    y, mean, *_ = fastnorm.batch_renorm(np.empty((0, 3)), running_mean=rm, running_var=rv, return_stats=True)
    assert y.shape == (0, 3) and np.isnan(mean).all()
    np.testing.assert_array_equal(rm, np.full(3, 2.0))
    np.testing.assert_array_equal(rv, np.full(3, 3.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_stays_in_its_feature(dtype):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((20, 4)).astype(dtype)
    x[3, 1] = np.nan
    rm, rv = np.zeros(4), np.ones(4)
    want = renorm_ref(x, running_mean=rm, running_var=rv)
    y = fastnorm.batch_renorm(x, running_mean=rm, running_var=rv)
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2, 3]]).all()
    close(y, want[0], dtype)
    assert np.isnan(rm[1]) and np.isfinite(rm[[0, 2, 3]]).all()


def test_zero_running_variance_with_eps_0():
    """s = 0: r and d clipped from +-inf; a constant feature matching the running mean gives r = 1,
    d = 0 and bias, never NaN."""
    x = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 2.0]])
    rm, rv = np.array([0.0, 5.0, 3.0]), np.zeros(3)
    y, mean, rstd, r, d = fastnorm.batch_renorm(x, None, np.full(3, 0.5), running_mean=rm, running_var=rv,
                                                eps=0.0, r_max=2.0, d_max=4.0, return_stats=True)
    np.testing.assert_array_equal(r, [2.0, 1.0, 1.0])          # 1/0 clipped to r_max; 0/0
    np.testing.assert_array_equal(d, [4.0, 0.0, -4.0])         # +-1/0 clipped to +-d_max; 0/0
    np.testing.assert_array_equal(y, [[-2 + 4.5, 0.5, -3.5], [2 + 4.5, 0.5, -3.5]])


# --------------------------------------------------------------------------- shared memory

def _renorm_call(a):
    return fastnorm.batch_renorm(a["x"], a["weight"], a["bias"], mask=a["mask"], running_mean=a["running_mean"],
                                 running_var=a["running_var"], out=a.get("out"), r_max=1.3, d_max=0.2,
                                 return_stats=True)


def _renorm_backward_call(a):
    return fastnorm.batch_renorm_backward(a["dy"], a["x"], a["mean"], a["rstd"], a["r"], a["d"], a["weight"],
                                          mask=a["mask"], out=a.get("out"))


SPECS = [
    al.Spec("batch_renorm", _renorm_call,
            {"x": al.XB, "weight": al.PB, "bias": al.PB, "mask": al.MB, "running_mean": al.RM, "running_var": al.RV},
            {"out": al.XB, "running_mean": al.RM, "running_var": al.RV}),
    al.Spec("batch_renorm_backward", _renorm_backward_call,
            {"dy": al.XB, "x": al.XB, "mean": al.Arg((4,), "stat"), "rstd": al.Arg((4,), "positive"),
             "r": al.Arg((4,), "positive"), "d": al.Arg((4,), "stat"), "weight": al.PB, "mask": al.MB},
            {"out": al.XB}),
]


def _shared_cases():
    for spec in SPECS:
        for dtype in spec.dtypes:
            for i in spec.inputs:
                for o in spec.outputs:
                    if i not in spec.outputs:
                        for placement in al.PLACEMENTS:
                            yield pytest.param(spec, dtype, (i, o), placement,
                                               id=f"{spec.name}-{np.dtype(dtype).name}-{i}-in-{o}-{placement}")


@pytest.mark.parametrize("spec, dtype, pair, placement", list(_shared_cases()))
def test_shared_memory_gives_the_result_of_copies(spec, dtype, pair, placement):
    """The rule of tests/test_aliasing.py: every (input, output) pair in one buffer."""
    al.test_shared_memory_gives_the_result_of_copies(spec, dtype, pair, placement)


def test_running_statistics_in_rows_of_x():
    """running_mean = x[0], running_var = x[1]: y from x as it was, r and d from the running
    statistics as they were, then the update, by the reference."""
    x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0], [2.0, 9.0]])
    want = renorm_ref(x, running_mean=x[0], running_var=x[1], eps=0.0, momentum=0.5, r_max=1.1, d_max=0.3)
    xx = x.copy()
    y = fastnorm.batch_renorm(xx, running_mean=xx[0], running_var=xx[1], eps=0.0, momentum=0.5, r_max=1.1,
                              d_max=0.3)
    np.testing.assert_allclose(y, want[0], rtol=1e-14)
    np.testing.assert_allclose(xx[0], want[5], rtol=1e-14)
    np.testing.assert_allclose(xx[1], want[6], rtol=1e-14)
    np.testing.assert_array_equal(xx[2:], x[2:])


def test_in_place():
    x = np.random.default_rng(20).standard_normal((9, 3))
    want = renorm_ref(x, running_mean=np.ones(3), running_var=np.ones(3), d_max=0.1)
    xx = x.copy()
    y = fastnorm.batch_renorm(xx, running_mean=np.ones(3), running_var=np.ones(3), d_max=0.1, out=xx)
    assert y is xx
    np.testing.assert_allclose(xx, want[0], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("shared, message", [
    ("running_var", "batch_renorm: running_mean and running_var share memory"),
    ("out", "batch_renorm: out and running_mean share memory"),
])
def test_outputs_sharing_memory_are_refused_before_any_write(shared, message):
    x = np.random.default_rng(10).standard_normal((5, 4))
    stats = np.ones((2, 4))
    args = {"running_mean": stats[0], "running_var": stats[0]} if shared == "running_var" else \
        {"running_mean": x[0], "running_var": stats[1], "out": x}
    before = x.copy()
    with pytest.raises(ValueError, match=message):
        fastnorm.batch_renorm(x, **args)
    np.testing.assert_array_equal(stats, np.ones((2, 4)))
    np.testing.assert_array_equal(x, before)


# --------------------------------------------------------------------------- gradients

def _fd_grads(x, dy, w, b, mask, axis, rm, rv, r, d, h=1e-6):
    """Central differences of L = sum(y * dy) through the reference, r and d held fixed."""
    def loss(xv, wv, bv):
        y = renorm_ref(xv, wv, bv, axis=axis, running_mean=rm, running_var=rv, mask=mask, r=r, d=d)[0]
        return float((y * dy).sum())

    def numeric(arr, f):
        g = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            up, down = arr.copy(), arr.copy()
            up[i] += h
            down[i] -= h
            g[i] = (f(up) - f(down)) / (2 * h)
        return g
    return (numeric(x, lambda v: loss(v, w, b)), numeric(w, lambda v: loss(x, v, b)),
            numeric(b, lambda v: loss(x, w, v)))


@pytest.mark.parametrize("regime", ["unclipped", "tight limits"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradient_matches_finite_differences_with_r_and_d_fixed(regime, masked):
    rng = np.random.default_rng(zlib.crc32(f"{regime} {masked}".encode()))
    x, rm, rv, r_max, d_max = batch_and_running(rng, (3, 5, 4), 1, regime)
    dy, w, b = rng.standard_normal(x.shape), rng.standard_normal(5), rng.standard_normal(5)
    mask = rng.random((3, 4)) > 0.3 if masked else None
    y, mean, rstd, r, d = fastnorm.batch_renorm(x, w, b, axis=1, running_mean=rm.copy(), running_var=rv.copy(),
                                                r_max=r_max, d_max=d_max, mask=mask, return_stats=True)
    got = fastnorm.batch_renorm_backward(dy, x, mean, rstd, r, d, w, axis=1, mask=mask)
    for g, want in zip(got, _fd_grads(x, dy, w, b, mask, 1, rm, rv, r, d)):
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-7)
    if regime == "tight limits":          # d enters dweight: the clipped d is not 0 here
        assert np.abs(d).max() == d_max


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape, axis", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_matches_the_closed_form(training, shape, axis, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{shape} {dtype} {training}".encode()))
    x64, rm, rv, r_max, d_max = batch_and_running(rng, shape, axis, "tight limits")
    x, dy = x64.astype(dtype), rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(5)
    y, *stats = fastnorm.batch_renorm(x, w, axis=axis, running_mean=rm.copy(), running_var=rv.copy(), r_max=r_max,
                                      d_max=d_max, training=training, return_stats=True)
    dx, dw, db = fastnorm.batch_renorm_backward(dy, x, *stats, w, axis=axis, training=training)
    want = renorm_grads_ref(dy, x, w, axis=axis, training=training, running_mean=rm, running_var=rv,
                            r_max=r_max, d_max=d_max)
    assert dx.dtype == dw.dtype == db.dtype == dtype and dw.shape == db.shape == (5,)
    close(dx, want[0], dtype)
    close(dw, want[1], dtype)
    close(db, want[2], dtype)


def test_eval_gradient_is_batch_norms_eval_gradient():
    rng = np.random.default_rng(11)
    x, dy, w = rng.standard_normal((7, 3)), rng.standard_normal((7, 3)), rng.standard_normal(3)
    rm, rv = rng.standard_normal(3), rng.random(3) + 0.5
    _, mean, rstd, r, d = fastnorm.batch_renorm(x, w, running_mean=rm, running_var=rv, training=False,
                                                return_stats=True)
    got = fastnorm.batch_renorm_backward(dy, x, mean, rstd, r, d, w, training=False)
    want = fastnorm.batch_norm_backward(dy, x, mean, rstd, w, training=False)
    for g, e in zip(got, want):
        np.testing.assert_array_equal(g, e)


def test_torch_reference():
    """Optional: a hand-written PyTorch batch renorm (r and d detached) gives the same y and grads."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    x, rm, rv, r_max, d_max = batch_and_running(rng, (6, 5, 4), 1, "tight limits")
    dy, w, b = rng.standard_normal(x.shape), rng.standard_normal(5), rng.standard_normal(5)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    view = (1, 5, 1)
    mean, var = tx.mean(dim=(0, 2)), tx.var(dim=(0, 2), unbiased=False)
    s = torch.sqrt(torch.tensor(rv) + 1e-5)
    r = torch.clamp(torch.sqrt(var + 1e-5) / s, 1 / r_max, r_max).detach()
    d = torch.clamp((mean - torch.tensor(rm)) / s, -d_max, d_max).detach()
    ty = ((tx - mean.view(view)) / torch.sqrt(var.view(view) + 1e-5) * r.view(view) + d.view(view)) \
        * tw.view(view) + tb.view(view)
    (ty * torch.tensor(dy)).sum().backward()
    y, *stats = fastnorm.batch_renorm(x, w, b, axis=1, running_mean=rm.copy(), running_var=rv.copy(), r_max=r_max,
                                      d_max=d_max, return_stats=True)
    grads = fastnorm.batch_renorm_backward(dy, x, *stats, w, axis=1)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    for g, t in zip(grads, (tx, tw, tb)):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- the layer

def test_layer_steps_equal_functional_calls():
    rng = np.random.default_rng(13)
    layer = fastnorm.BatchRenorm(5, momentum=0.2, r_max=1.5, d_max=0.5)
    rm, rv = np.zeros(5), np.ones(5)
    for step in range(4):
        x = rng.standard_normal((16, 5)) * (step + 1) + step
        dy = rng.standard_normal((16, 5))
        layer.weight += 0.1 * step
        y_layer = layer(x)
        dx_layer = layer.backward(dy)
        y, *stats = fastnorm.batch_renorm(x, layer.weight, layer.bias, running_mean=rm, running_var=rv,
                                          momentum=0.2, r_max=1.5, d_max=0.5, return_stats=True)
        dx, dw, db = fastnorm.batch_renorm_backward(dy, x, *stats, layer.weight)
        np.testing.assert_array_equal(y_layer, y)
        np.testing.assert_array_equal(dx_layer, dx)
        np.testing.assert_array_equal(layer.dweight, dw)
        np.testing.assert_array_equal(layer.dbias, db)
        np.testing.assert_array_equal(layer.running_mean, rm)
        np.testing.assert_array_equal(layer.running_var, rv)
    assert layer.num_batches_tracked == 4


def test_layer_eval_and_ramp():
    rng = np.random.default_rng(14)
    layer = fastnorm.BatchRenorm(3, axis=1, r_max=1.0, d_max=0.0, dtype=np.float32)
    x = (rng.standard_normal((8, 3, 4)) * 2 + 1).astype(np.float32)
    close(layer(x), ref.batch_norm(x, axis=1)[0], np.float32)           # r_max=1, d_max=0: batch norm
    layer.r_max, layer.d_max = 2.0, np.inf
    assert (layer.r_max, layer.d_max) == (2.0, np.inf)
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    want = renorm_ref(x, axis=1, running_mean=rm, running_var=rv, r_max=2.0, d_max=np.inf)
    close(layer(x), want[0], np.float32)
    layer.eval()
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    y = layer(x)
    np.testing.assert_array_equal(y, fastnorm.batch_norm(x, layer.weight, layer.bias, axis=1, running_mean=rm,
                                                         running_var=rv, training=False))
    np.testing.assert_array_equal(layer.running_mean, rm)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    close(layer.backward(dy), dy * (1 / np.sqrt(rv + 1e-5))[None, :, None], np.float32)   # eval: dy * rstd


def test_layer_momentum_none_is_the_cumulative_average():
    rng = np.random.default_rng(15)
    layer = fastnorm.BatchRenorm(2, momentum=None)
    batches = [rng.standard_normal((n, 2)) * s + m for n, s, m in [(5, 1.0, 0.0), (9, 2.0, 3.0), (4, 0.5, -1.0)]]
    for k, xb in enumerate(batches, 1):
        layer(xb)
        layer.eval()(xb)
        layer.train()
        np.testing.assert_allclose(layer.running_mean, np.mean([b.mean(0) for b in batches[:k]], axis=0), rtol=1e-14)
        np.testing.assert_allclose(layer.running_var, np.mean([b.var(0, ddof=1) for b in batches[:k]], axis=0),
                                   rtol=1e-14)
    assert layer.num_batches_tracked == 3


def test_layer_keeps_a_copy_of_x_and_masks():
    rng = np.random.default_rng(16)
    layer = fastnorm.BatchRenorm(4, r_max=1.2, d_max=0.1)
    x = rng.standard_normal((3, 6, 4))
    mask = rng.random((3, 6)) > 0.3
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    layer(x, mask=mask)
    dy = rng.standard_normal(x.shape)
    want = renorm_grads_ref(dy, x, mask=mask, running_mean=rm, running_var=rv, r_max=1.2, d_max=0.1)
    x += 100.0                                            # changed after the call
    mask[:] = True
    close(layer.backward(dy), want[0], np.float64)
    close(layer.dweight, want[1], np.float64)


def test_layer_repr_and_checks():
    layer = fastnorm.BatchRenorm(3, axis=1, momentum=None, r_max=2, d_max=1)
    assert repr(layer) == "BatchRenorm(3, eps=1e-05, momentum=None, r_max=2.0, d_max=1.0, axis=1, training=True)"
    assert "affine=False" in repr(fastnorm.BatchRenorm(3, affine=False))
    assert isinstance(layer, fastnorm.BatchNorm)
    with pytest.raises(RuntimeError, match="call the layer on an input first"):
        fastnorm.BatchRenorm(3).backward(np.ones((2, 3)))
    for make, err, word in [
        (lambda: fastnorm.BatchRenorm(3, r_max=0.5), ValueError, "r_max"),
        (lambda: fastnorm.BatchRenorm(3, d_max=-1), ValueError, "d_max"),
        (lambda: fastnorm.BatchRenorm(3, r_max="3"), TypeError, "r_max"),
        (lambda: fastnorm.BatchRenorm(3, d_max=np.nan), ValueError, "d_max"),
        (lambda: fastnorm.BatchRenorm(0), ValueError, "num_features"),
        (lambda: fastnorm.BatchRenorm(3, momentum=2.0), ValueError, "momentum"),
        (lambda: fastnorm.BatchRenorm(3, eps=-1.0), ValueError, "eps"),
    ]:
        with pytest.raises(err, match=word):
            make()
    with pytest.raises(ValueError, match="BatchRenorm: r_max must be a number >= 1"):
        layer.r_max = 0.9
    assert layer.r_max == 2.0                              # unchanged by the refused value
    with pytest.raises(ValueError, match="the layer was built for 3"):
        layer(np.ones((4, 5, 6)))


# --------------------------------------------------------------------------- errors

X = np.random.default_rng(17).standard_normal((6, 4))
RUN = {"running_mean": np.zeros(4), "running_var": np.ones(4)}


@pytest.mark.parametrize("kwargs, err, message", [
    ({"r_max": 0.5}, ValueError, "batch_renorm: r_max must be a number >= 1"),
    ({"r_max": np.nan}, ValueError, "r_max must be"),
    ({"r_max": "3"}, TypeError, "batch_renorm: r_max must be a real number"),
    ({"d_max": -0.1}, ValueError, "batch_renorm: d_max must be a number >= 0"),
    ({"d_max": None}, TypeError, "d_max"),
    ({"running_mean": None}, ValueError, "batch_renorm: running_mean and running_var are required"),
    ({"running_var": None}, ValueError, "running_mean and running_var are required"),
    ({"running_mean": np.zeros(3)}, ValueError, r"batch_renorm: running_mean has shape \(3,\)"),
    ({"running_var": [1.0] * 4}, TypeError, "batch_renorm: running_var must be a float numpy.ndarray"),
    ({"weight": np.ones(3)}, ValueError, r"batch_renorm: weight has shape \(3,\)"),
    ({"bias": np.ones(5)}, ValueError, "batch_renorm: bias has shape"),
    ({"momentum": 1.5}, ValueError, "batch_renorm: momentum must be in"),
    ({"eps": -1.0}, ValueError, "batch_renorm: eps"),
    ({"training": 1}, TypeError, "batch_renorm: training must be True or False"),
    ({"axis": 2}, np.exceptions.AxisError, "batch_renorm: axis 2 is out of bounds"),
    ({"mask": np.ones(5, bool)}, ValueError, "batch_renorm: mask has shape"),
    ({"out": np.empty((6, 4), np.float32)}, ValueError, "batch_renorm: out has dtype"),
])
def test_errors_name_the_argument_and_change_nothing(kwargs, err, message):
    args = {**{k: v.copy() for k, v in RUN.items()}, **kwargs}
    kept = {k: np.copy(v) for k, v in args.items() if k.startswith("running") and isinstance(v, np.ndarray)}
    with pytest.raises(err, match=message):
        fastnorm.batch_renorm(X, **args)
    for k, v in kept.items():
        np.testing.assert_array_equal(args[k], v)


def test_running_statistics_are_required_keywords_and_writeable_in_training():
    with pytest.raises(TypeError, match="running_mean"):
        fastnorm.batch_renorm(X)                                     # no default: Python's TypeError
    frozen = np.ones(4)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="batch_renorm: running_var is read-only"):
        fastnorm.batch_renorm(X, running_mean=np.zeros(4), running_var=frozen)


def test_backward_errors_name_the_argument():
    y, *stats = fastnorm.batch_renorm(X, **{k: v.copy() for k, v in RUN.items()}, return_stats=True)
    mean, rstd, r, d = stats
    dy = np.ones_like(X)
    for call, message in [
        (lambda: fastnorm.batch_renorm_backward(dy, X, mean, rstd, r[:3], d), r"batch_renorm_backward: r has shape"),
        (lambda: fastnorm.batch_renorm_backward(dy, X, mean, rstd, r, None), "batch_renorm_backward: d is required"),
        (lambda: fastnorm.batch_renorm_backward(dy, X, mean[:2], rstd, r, d), "batch_renorm_backward: mean has shape"),
        (lambda: fastnorm.batch_renorm_backward(dy, X, mean, rstd, r, d, np.ones(2)),
         "batch_renorm_backward: weight has shape"),
        (lambda: fastnorm.batch_renorm_backward(dy[:2], X, mean, rstd, r, d), "batch_renorm_backward: dy has shape"),
        (lambda: fastnorm.batch_renorm_backward(dy, X, mean, rstd, r, d, training="yes"),
         "batch_renorm_backward: training must be True or False"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            call()


# --------------------------------------------------------------------------- dask

@pytest.mark.parametrize("chunks", [(13, 7, 5), (60, 7, 5), (7, 3, 2), (1, 7, 1)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dask_equals_numpy(chunks, masked, dtype):
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(zlib.crc32(f"{chunks} {masked} {dtype}".encode()))
    x = (rng.standard_normal((60, 7, 5)) * 3 + 4).astype(dtype)
    mask = rng.random((60, 5)) > 0.3 if masked else None
    w, b = rng.standard_normal(7), rng.standard_normal(7)
    X = da.from_array(x, chunks=chunks)
    M = None if mask is None else da.from_array(mask, chunks=(11, -1))
    tol = {np.float64: 1e-12, np.float32: 1e-6}[dtype]
    for training in (True, False):
        rm, rv = np.full(7, 3.5), np.full(7, 6.0)
        rm2, rv2 = rm.copy(), rv.copy()
        kw = {"axis": 1, "r_max": 1.2, "d_max": 0.1, "training": training, "return_stats": True}
        Y, *got = fastnorm.batch_renorm(X, w, b, running_mean=rm, running_var=rv, mask=M, **kw)
        y, *want = fastnorm.batch_renorm(x, w, b, running_mean=rm2, running_var=rv2, mask=mask, **kw)
        assert isinstance(Y, da.Array) and Y.dtype == dtype
        np.testing.assert_allclose(Y.compute(scheduler="threads"), y, rtol=0, atol=tol * np.abs(y).max())
        for g, e in zip([*got, rm, rv], [*want, rm2, rv2]):
            assert isinstance(g, np.ndarray) and g.dtype == e.dtype
            np.testing.assert_allclose(g, e, rtol=tol)


def test_dask_gradients_and_errors():
    da = pytest.importorskip("dask.array")
    from fastnorm import _dask
    rng = np.random.default_rng(18)
    x, dy, w = rng.standard_normal((40, 6)) + 1, rng.standard_normal((40, 6)), rng.standard_normal(6)
    X, DY = da.from_array(x, chunks=(9, 4)), da.from_array(dy, chunks=(9, 4))
    _, *stats = fastnorm.batch_renorm(x, w, running_mean=np.zeros(6), running_var=np.ones(6), d_max=0.3,
                                      return_stats=True)
    for training in (False, True):
        try:
            got = fastnorm.batch_renorm_backward(DY, X, *stats, w, training=training)
        except TypeError:             # batch_norm_backward's own limit on dask: the same refusal
            with pytest.raises(TypeError):
                _dask.batch_norm_backward(DY, X, *stats[:2], w, training=training)
            continue
        for g, e in zip(got, fastnorm.batch_renorm_backward(dy, x, *stats, w, training=training)):
            assert isinstance(g, da.Array)
            np.testing.assert_allclose(g.compute(), e, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="batch_renorm: out= cannot be used with a dask array"):
        fastnorm.batch_renorm(X, running_mean=np.zeros(6), running_var=np.ones(6), out=np.empty((40, 6)))
    with pytest.raises(ValueError, match="batch_renorm: r_max must be"):
        fastnorm.batch_renorm(X, running_mean=np.zeros(6), running_var=np.ones(6), r_max=0.0)
    rm = np.zeros(6)
    with pytest.raises(ValueError, match="batch_renorm: training needs more than one value"):
        fastnorm.batch_renorm(X[:1], running_mean=rm, running_var=np.ones(6))
    np.testing.assert_array_equal(rm, np.zeros(6))


def test_dask_on_a_distributed_cluster():
    da = pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(19)
    x = (rng.standard_normal((300, 4)) * 2 + 1).astype(np.float32)
    mask = rng.random(300) > 0.2
    rm, rv, rm2, rv2 = np.zeros(4), np.ones(4), np.zeros(4), np.ones(4)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, worker_dashboard_address=None) as cluster, \
            distributed.Client(cluster):
        Y = fastnorm.batch_renorm(da.from_array(x, chunks=(50, 2)), running_mean=rm, running_var=rv, mask=mask,
                                  d_max=0.2)
        y = fastnorm.batch_renorm(x, running_mean=rm2, running_var=rv2, mask=mask, d_max=0.2)
        np.testing.assert_allclose(Y.compute(), y, rtol=0, atol=1e-6 * np.abs(y).max())
    np.testing.assert_allclose(rm, rm2, rtol=1e-12)
    np.testing.assert_allclose(rv, rv2, rtol=1e-12)
