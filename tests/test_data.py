"""standardize, min_max_scale, weight_norm and weight_norm_backward against obvious NumPy float64 references.

``axis`` is the feature axis: one statistic (or norm) per position along it, over every other axis.
Gradients are checked against central finite differences of the float64 reference.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastnorm

TOL = {np.dtype(np.float16): 2e-2, np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}


# ---- references: plain NumPy, float64 ------------------------------------------------------------

def others(axis, ndim):
    axis = axis % ndim
    return tuple(i for i in range(ndim) if i != axis)


def ref_standardize(x, axis=0, eps=0.0):
    x = np.asarray(x, dtype=np.float64)
    red = others(axis, x.ndim)
    mean = x.mean(axis=red, keepdims=True)
    mean = mean + (x - mean).mean(axis=red, keepdims=True)      # second pass: exact to ~1 ulp
    var = ((x - mean) ** 2).mean(axis=red, keepdims=True)
    denom = np.sqrt(var + eps)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = (x - mean) / denom
    return np.where(denom == 0, 0.0, y)


def ref_min_max(x, axis=0, feature_range=(0.0, 1.0)):
    x = np.asarray(x, dtype=np.float64)
    lo, hi = feature_range
    red = others(axis, x.ndim)
    mn, mx = x.min(axis=red, keepdims=True), x.max(axis=red, keepdims=True)
    span = mx - mn
    with np.errstate(invalid="ignore", divide="ignore"):
        y = lo + (x - mn) / span * (hi - lo)
    return np.where(span == 0, lo, y)


def ref_weight_norm(v, g, axis=0):
    v = np.asarray(v, dtype=np.float64)
    red = others(axis, v.ndim)
    norm = np.sqrt((v * v).sum(axis=red, keepdims=True))
    shape = [1] * v.ndim
    shape[axis % v.ndim] = -1
    return np.asarray(g, dtype=np.float64).reshape(shape) * v / norm


def numeric_grads(dw, v, g, axis, h=1e-6):
    """Central differences of L = sum(ref_weight_norm(v, g) * dw) with respect to v and g."""
    def loss(vv, gg):
        return float((ref_weight_norm(vv, gg, axis) * dw).sum())

    dv = np.zeros_like(v)
    for i in np.ndindex(v.shape):
        vp, vm = v.copy(), v.copy()
        vp[i] += h
        vm[i] -= h
        dv[i] = (loss(vp, g) - loss(vm, g)) / (2 * h)
    dg = np.zeros_like(g)
    for i in range(len(g)):
        gp, gm = g.copy(), g.copy()
        gp[i] += h
        gm[i] -= h
        dg[i] = (loss(v, gp) - loss(v, gm)) / (2 * h)
    return dv, dg


def close(actual, expected, dtype=np.float64):
    tol = TOL[np.dtype(dtype)]
    scale = max(1.0, float(np.nanmax(np.abs(expected)))) if np.size(expected) else 1.0
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=0, atol=tol * scale)


CASES = [((7, 3), 0), ((7, 3), 1), ((7, 3), -1), ((4, 5, 6), 0), ((4, 5, 6), 1), ((4, 5, 6), 2),
         ((2, 3, 4, 5), 1), ((2, 3, 4, 5), -2), ((9,), 0)]
LAYOUTS = ["C", "F", "transposed", "sliced", "reversed", "byteswapped"]


def make_layout(a, layout):
    """The same values as ``a`` in another memory layout."""
    if layout == "C":
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "transposed":
        return np.ascontiguousarray(a.T).T
    if layout == "sliced":
        big = np.zeros(tuple(2 * n for n in a.shape), dtype=a.dtype)
        view = big[tuple(slice(None, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "reversed":
        return np.ascontiguousarray(a[(slice(None, None, -1),) * a.ndim])[(slice(None, None, -1),) * a.ndim]
    if layout == "byteswapped":
        return a.astype(a.dtype.newbyteorder())
    raise ValueError(layout)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---- standardize ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", CASES)
def test_standardize_matches_reference(rng, shape, axis):
    x = 3.0 + 2.0 * rng.standard_normal(shape)      # (9,) with axis 0: one value per feature, all 0
    close(fastnorm.standardize(x, axis=axis), ref_standardize(x, axis))
    close(fastnorm.standardize(x, axis=axis, eps=0.5), ref_standardize(x, axis, eps=0.5))


def test_standardize_default_axis_is_the_last_axis(rng):
    x = rng.standard_normal((4, 6))
    close(fastnorm.standardize(x), ref_standardize(x, -1))     # one z-score per column, as scikit-learn
    y = fastnorm.standardize(x)
    close(y.mean(axis=0), np.zeros(6))
    close(y.std(axis=0), np.ones(6))
    close(fastnorm.min_max_scale(x), ref_min_max(x, -1))


def test_standardize_equals_batch_norm(rng):
    x = rng.standard_normal((5, 4, 3))
    for axis in (0, 1, 2):
        close(fastnorm.standardize(x, axis=axis, eps=1e-5), fastnorm.batch_norm(x, axis=axis, eps=1e-5))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_standardize_layouts(rng, layout):
    x = rng.standard_normal((6, 5)) * 4 + 1
    for axis in (0, 1):
        close(fastnorm.standardize(make_layout(x, layout), axis=axis), ref_standardize(x, axis))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_standardize_dtypes(rng, dtype):
    x = (rng.standard_normal((50, 4)) * 3 + 2).astype(dtype)
    y = fastnorm.standardize(x, axis=1)
    assert y.dtype == dtype
    close(y, ref_standardize(x, 1), dtype)


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint8, np.int64, np.bool_])
def test_standardize_int_and_bool_become_float64(rng, dtype):
    x = rng.integers(0, 2 if dtype == np.bool_ else 9, (6, 3)).astype(dtype)
    y = fastnorm.standardize(x, axis=1)
    assert y.dtype == np.float64
    close(y, ref_standardize(x, 1))


def test_standardize_large_offset():
    x = 1e4 + np.random.default_rng(0).standard_normal((1000, 2))
    close(fastnorm.standardize(x, axis=1), ref_standardize(x, 1))
    y32 = fastnorm.standardize(x.astype(np.float32), axis=1)
    close(y32, ref_standardize(x.astype(np.float32), 1), np.float32)


def test_standardize_constant_feature():
    x = np.array([[1.0, 0.1, 5.0], [2.0, 0.1, 5.0], [4.0, 0.1, 5.0]])
    y = fastnorm.standardize(x, axis=1)
    assert np.all(y[:, 1:] == 0.0)
    close(y[:, 0], ref_standardize(x, 1)[:, 0])
    # one value per feature: the feature is constant
    assert np.all(fastnorm.standardize(np.array([[3.0, -2.0, 7.0]]), axis=1) == 0.0)
    assert np.all(fastnorm.standardize(np.arange(5.0), axis=0) == 0.0)
    # eps > 0 with a constant feature: still 0
    assert np.all(fastnorm.standardize(np.full((4, 2), 0.3), axis=1, eps=1e-5) == 0.0)


def test_standardize_nan_and_inf_stay_in_their_feature():
    x = np.random.default_rng(1).standard_normal((6, 4))
    x[2, 1] = np.nan
    x[4, 3] = np.inf
    y = fastnorm.standardize(x, axis=1)
    assert np.isnan(y[:, 1]).all() and np.isnan(y[:, 3]).all()
    close(y[:, [0, 2]], ref_standardize(x[:, [0, 2]], 1))


def test_standardize_out_and_in_place(rng):
    x = rng.standard_normal((5, 3))
    expected = ref_standardize(x, 1)
    out = np.empty_like(x)
    assert fastnorm.standardize(x, axis=1, out=out) is out
    close(out, expected)
    x2 = x.copy()
    assert fastnorm.standardize(x2, axis=1, out=x2) is x2
    close(x2, expected)
    xf = np.asfortranarray(x)
    outc = np.empty_like(x, order="C")
    fastnorm.standardize(xf, axis=1, out=outc)
    close(outc, expected)


def test_standardize_empty():
    for shape, axis in (((0, 3), 1), ((3, 0), 1), ((0, 3), 0), ((2, 0, 4), 2)):
        y = fastnorm.standardize(np.empty(shape), axis=axis)
        assert y.shape == shape and y.dtype == np.float64
    assert fastnorm.standardize(np.empty((0, 3), np.float32), axis=1).dtype == np.float32


# ---- min_max_scale -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("feature_range", [(0, 1), (-1, 1), (2.5, 7)])
def test_min_max_matches_reference(rng, shape, axis, feature_range):
    x = 3.0 + 2.0 * rng.standard_normal(shape)
    y = fastnorm.min_max_scale(x, axis=axis, feature_range=feature_range)
    close(y, ref_min_max(x, axis, feature_range))
    lo, hi = feature_range
    assert y.min() >= lo and y.max() <= hi
    red = others(axis, x.ndim)
    if np.prod(shape) // shape[axis] > 1:
        close(y.min(axis=red), np.full(shape[axis], float(lo)))
        close(y.max(axis=red), np.full(shape[axis], float(hi)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_min_max_layouts(rng, layout):
    x = rng.standard_normal((6, 5))
    for axis in (0, 1):
        close(fastnorm.min_max_scale(make_layout(x, layout), axis=axis), ref_min_max(x, axis))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int16, np.uint8, np.bool_])
def test_min_max_dtypes(rng, dtype):
    x = (rng.standard_normal((20, 3)) * 10).astype(dtype) if np.dtype(dtype).kind == "f" else \
        rng.integers(0, 2 if dtype == np.bool_ else 50, (20, 3)).astype(dtype)
    y = fastnorm.min_max_scale(x, axis=1)
    assert y.dtype == (dtype if np.dtype(dtype).kind == "f" else np.float64)
    close(y, ref_min_max(x, 1), y.dtype)


def test_min_max_constant_feature_gives_low_end():
    x = np.array([[1.0, 7.0], [3.0, 7.0], [2.0, 7.0]])
    y = fastnorm.min_max_scale(x, axis=1, feature_range=(-2, 3))
    assert np.all(y[:, 1] == -2.0)
    close(y[:, 0], np.array([-2.0, 3.0, 0.5]))
    assert np.all(fastnorm.min_max_scale(np.array([[5.0, 6.0]]), axis=1) == 0.0)


def test_min_max_nan_and_inf_stay_in_their_feature():
    x = np.array([[1.0, 2.0, 0.0], [np.nan, 3.0, np.inf], [4.0, 5.0, 1.0]])
    y = fastnorm.min_max_scale(x, axis=1)
    assert np.isnan(y[:, 0]).all() and np.isnan(y[:, 2]).all()
    close(y[:, 1], np.array([0.0, 1 / 3, 1.0]))


def test_min_max_huge_and_tiny_ranges():
    x = np.array([[-1e308], [1e308], [0.0]])
    close(fastnorm.min_max_scale(x, axis=1)[:, 0], np.array([0.0, 1.0, 0.5]))
    tiny = np.array([[0.0], [5e-324], [1e-323]])
    close(fastnorm.min_max_scale(tiny, axis=1)[:, 0], np.array([0.0, 0.5, 1.0]))


def exact_min_max(column, lo, hi):
    """lo + (x - min) / (max - min) * (hi - lo) in exact rational arithmetic, rounded once."""
    from fractions import Fraction
    xs = [Fraction(float(v)) for v in column]
    mn, mx, flo, fhi = min(xs), max(xs), Fraction(lo), Fraction(hi)
    span = mx - mn
    return np.array([float(flo + (v - mn) / span * (fhi - flo)) if span else lo for v in xs])


@pytest.mark.parametrize("feature_range", [(-1e308, 1e308), (-np.finfo(np.float64).max, np.finfo(np.float64).max),
                                           (-1.5e308, 2e307), (0.0, 1e308), (-1e308, -1e300), (-1.0, 1.0)])
@pytest.mark.parametrize("values", ["small", "huge", "tiny"])
def test_min_max_ranges_wider_than_float64(rng, feature_range, values):
    """hi - lo may exceed the largest float64 (the range itself is finite): the result still matches
    exact arithmetic to a few ulps of the range's ends."""
    scale = {"small": 1.0, "huge": 1e308, "tiny": 1e-310}[values]
    x = np.concatenate([[[-0.9], [0.9]], rng.uniform(-0.9, 0.9, (30, 1))]) * scale
    lo, hi = feature_range
    y = fastnorm.min_max_scale(x, axis=1, feature_range=feature_range)
    expected = exact_min_max(x[:, 0], lo, hi)
    assert np.isfinite(y).all() and lo <= y.min() and y.max() <= hi
    ulp = 2 * np.spacing(0.5 * max(abs(lo), abs(hi)))       # no overflow at the float64 maximum
    np.testing.assert_allclose(y[:, 0], expected, rtol=0, atol=4 * ulp)


def test_min_max_out_and_in_place(rng):
    x = rng.standard_normal((5, 3)).astype(np.float32)
    expected = ref_min_max(x, 1)
    out = np.empty_like(x)
    assert fastnorm.min_max_scale(x, axis=1, out=out) is out
    close(out, expected, np.float32)
    assert fastnorm.min_max_scale(x, axis=1, out=x) is x
    close(x, expected, np.float32)


def test_min_max_empty():
    assert fastnorm.min_max_scale(np.empty((0, 3)), axis=1).shape == (0, 3)
    assert fastnorm.min_max_scale(np.empty((3, 0), np.float16), axis=1).dtype == np.float16


# ---- weight_norm ---------------------------------------------------------------------------------

WN_CASES = [((4, 3), 0), ((4, 3), 1), ((3, 2, 2, 2), 0), ((2, 3, 4), -1), ((5,), 0)]


@pytest.mark.parametrize("shape,axis", WN_CASES)
def test_weight_norm_matches_reference(rng, shape, axis):
    v = rng.standard_normal(shape)
    g = rng.uniform(0.5, 2.0, shape[axis])
    w = fastnorm.weight_norm(v, g, axis=axis)
    close(w, ref_weight_norm(v, g, axis))
    norms = np.sqrt((w * w).sum(axis=others(axis, v.ndim)))
    close(norms, g)


def test_weight_norm_default_axis_is_0_one_norm_per_row(rng):
    v = rng.standard_normal((3, 5))
    g = np.array([1.0, 2.0, 3.0])
    close(np.linalg.norm(fastnorm.weight_norm(v, g), axis=1), g)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weight_norm_layouts(rng, layout):
    v = rng.standard_normal((4, 6))
    g = rng.uniform(0.5, 2.0, 4)
    close(fastnorm.weight_norm(make_layout(v, layout), g), ref_weight_norm(v, g, 0))
    dw = rng.standard_normal(v.shape)
    dv, dg = fastnorm.weight_norm_backward(make_layout(dw, layout), make_layout(v, layout), g)
    dv_ref, dg_ref = fastnorm.weight_norm_backward(dw, v, g)
    close(dv, dv_ref)
    close(dg, dg_ref)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_weight_norm_dtypes(rng, dtype):
    v = rng.standard_normal((4, 6)).astype(dtype)
    g = rng.uniform(0.5, 2.0, 4).astype(dtype)
    w = fastnorm.weight_norm(v, g)
    assert w.dtype == dtype
    close(w, ref_weight_norm(v, g), dtype)
    dv, dg = fastnorm.weight_norm_backward(np.ones_like(v), v, g)
    assert dv.dtype == dtype and dg.dtype == dtype and dg.shape == (4,)


def test_weight_norm_int_input_becomes_float64():
    w = fastnorm.weight_norm(np.array([[3, 4], [0, 2]]), [10, 1])
    assert w.dtype == np.float64
    close(w, np.array([[6.0, 8.0], [0.0, 1.0]]))


def test_weight_norm_zero_slice_and_nan():
    v = np.array([[0.0, 0.0], [3.0, 4.0], [np.nan, 1.0], [np.inf, 1.0]])
    g = np.array([2.0, 5.0, 1.0, 1.0])
    w = fastnorm.weight_norm(v, g)
    assert np.all(w[0] == 0.0)
    close(w[1], np.array([3.0, 4.0]))
    assert np.isnan(w[2]).all() and np.isnan(w[3]).all()
    dv, dg = fastnorm.weight_norm_backward(np.ones_like(v), v, g)
    assert np.all(dv[0] == 0.0) and dg[0] == 0.0
    assert np.isfinite(dv[1]).all()


def test_weight_norm_no_overflow_or_underflow():
    for scale in (1e200, 1e-200, 1e-320):
        v = scale * np.array([[3.0, 4.0], [1.0, 1.0]])
        close(fastnorm.weight_norm(v, [1.0, 2.0]), np.array([[0.6, 0.8], [np.sqrt(2), np.sqrt(2)]]))


@pytest.mark.parametrize("shape,axis", WN_CASES)
def test_weight_norm_backward_finite_differences(rng, shape, axis):
    v = rng.standard_normal(shape)
    g = rng.uniform(0.5, 2.0, shape[axis])
    dw = rng.standard_normal(shape)
    dv, dg = fastnorm.weight_norm_backward(dw, v, g, axis=axis)
    dv_num, dg_num = numeric_grads(dw, v, g, axis)
    np.testing.assert_allclose(dv, dv_num, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dg, dg_num, rtol=1e-6, atol=1e-7)


def test_weight_norm_backward_identities(rng):
    """dv is orthogonal to v per slice (w does not change with ||v||), and dw along w only moves g."""
    v = rng.standard_normal((3, 5))
    g = rng.uniform(0.5, 2.0, 3)
    dv, _ = fastnorm.weight_norm_backward(rng.standard_normal(v.shape), v, g)
    close((dv * v).sum(axis=1), np.zeros(3))
    dv, dg = fastnorm.weight_norm_backward(v.copy(), v, g)
    close(dv, np.zeros_like(v))
    close(dg, np.linalg.norm(v, axis=1))


def test_weight_norm_empty():
    assert fastnorm.weight_norm(np.empty((0, 3)), np.empty(0)).shape == (0, 3)
    dv, dg = fastnorm.weight_norm_backward(np.empty((3, 0)), np.empty((3, 0)), np.ones(3))
    assert dv.shape == (3, 0) and np.all(dg == 0.0)


# ---- inputs are never modified -------------------------------------------------------------------

def test_inputs_not_modified(rng):
    x = rng.standard_normal((6, 4))
    g = rng.uniform(0.5, 2.0, 6)
    dw = rng.standard_normal((6, 4))
    saved = [a.copy() for a in (x, g, dw)]
    fastnorm.standardize(x, axis=1)
    fastnorm.min_max_scale(x, axis=0)
    fastnorm.weight_norm(x, g)
    fastnorm.weight_norm_backward(dw, x, g)
    for a, b in zip((x, g, dw), saved):
        np.testing.assert_array_equal(a, b)


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [fastnorm.standardize, fastnorm.min_max_scale])
def test_errors_common(fn):
    with pytest.raises(TypeError, match=r"\bx\b"):
        fn(np.ones((3, 2), dtype=complex))
    with pytest.raises(TypeError, match=r"\bx\b"):
        fn(np.array([["a", "b"]]))
    with pytest.raises(np.exceptions.AxisError, match="axis"):
        fn(np.ones((3, 2)), axis=2)
    with pytest.raises(TypeError, match="axis"):
        fn(np.ones((3, 2)), axis=(0, 1))
    with pytest.raises(ValueError, match="x"):
        fn(np.float64(3.0))
    with pytest.raises(ValueError, match="out"):
        fn(np.ones((3, 2)), axis=1, out=np.empty((2, 3)))
    with pytest.raises(ValueError, match="out"):
        fn(np.ones((3, 2)), axis=1, out=np.empty((3, 2), np.float32))
    ro = np.empty((3, 2))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        fn(np.ones((3, 2)), axis=1, out=ro)
    with pytest.raises(TypeError, match="out"):
        fn(np.ones((3, 2)), axis=1, out=[[0.0, 0.0]] * 3)


def test_errors_standardize_eps():
    with pytest.raises(ValueError, match="eps"):
        fastnorm.standardize(np.ones((3, 2)), eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        fastnorm.standardize(np.ones((3, 2)), eps=np.nan)
    with pytest.raises(TypeError, match="eps"):
        fastnorm.standardize(np.ones((3, 2)), eps="small")


@pytest.mark.parametrize("bad,err", [((1, 1), ValueError), ((2, 1), ValueError), ((0, np.inf), ValueError),
                                     ((0,), TypeError), (5, TypeError), (("a", "b"), TypeError)])
def test_errors_feature_range(bad, err):
    with pytest.raises(err, match="feature_range"):
        fastnorm.min_max_scale(np.ones((3, 2)), feature_range=bad)


def test_errors_weight_norm():
    v = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"\bg\b.*\(2,\).*\(3,\)"):
        fastnorm.weight_norm(v, np.ones(2))
    with pytest.raises(ValueError, match=r"\bg\b"):
        fastnorm.weight_norm(v, np.ones((3, 1)))
    with pytest.raises(TypeError, match=r"\bg\b"):
        fastnorm.weight_norm(v, None)
    with pytest.raises(TypeError, match=r"\bg\b"):
        fastnorm.weight_norm(v, np.ones(3, dtype=complex))
    with pytest.raises(TypeError, match=r"\bv\b"):
        fastnorm.weight_norm(v.astype(complex), np.ones(3))
    with pytest.raises(np.exceptions.AxisError, match="axis"):
        fastnorm.weight_norm(v, np.ones(3), axis=-3)
    with pytest.raises(ValueError, match=r"\bdw\b"):
        fastnorm.weight_norm_backward(np.ones((2, 3)), v, np.ones(3))
    with pytest.raises(TypeError, match=r"\bdw\b"):
        fastnorm.weight_norm_backward(np.ones((3, 2), dtype=complex), v, np.ones(3))


# ---- hypothesis: any shape and feature axis ------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data())
def test_any_shape_and_axis(shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3 + 1
    close(fastnorm.standardize(x, axis=axis), ref_standardize(x, axis))
    close(fastnorm.min_max_scale(x, axis=axis), ref_min_max(x, axis))
    g = rng.uniform(0.5, 2.0, shape[axis])
    close(fastnorm.weight_norm(x, g, axis=axis), ref_weight_norm(x, g, axis))
