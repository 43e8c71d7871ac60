"""bfloat16 (ml_dtypes.bfloat16) through every function that takes float16, against float64 references.

bfloat16 has 8 significand bits: a correctly rounded result errs by at most half an ulp, and one ulp
of v is 2**(floor(log2|v|) - 7). The kernels compute in float32 or double (never in bfloat16), so a
result is the float64 reference rounded to bfloat16, give or take the float32 arithmetic before the
one rounding: that error (a few float32 ulps of the output's scale, bounded here by 2**-18 * scale)
may move a value across a rounding boundary, one bfloat16 ulp. So every value is checked as

    |y - round_bf16(ref)| <= ulp_bf16(ref) + 2**-18 * scale.

NumPy itself accumulates bfloat16 sums in bfloat16 (the sum of 100,000 ones is 256); the long-row
tests would fail by orders of magnitude with such accumulation.
"""
import subprocess
import sys

import numpy as np
import pytest

import fastnorm
import grad_reference as gref
import reference as ref

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

FLOAT_SLACK = 2.0 ** -18          # float32 arithmetic before the rounding, relative to the scale


def bf16(a):
    return np.asarray(a, dtype=np.float64).astype(BF16)


def f64(a):
    return np.asarray(a).astype(np.float64)


def ulp_bf16(v):
    """One bfloat16 ulp at |v| (subnormals: 2**-133)."""
    v = np.abs(np.asarray(v, dtype=np.float64))
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(v > 0, v, 1.0)))
    return 2.0 ** np.maximum(e, -126.0) * 2.0 ** -7


def assert_bf16_close(got, want64, scale=None, err_msg=""):
    """got (bfloat16) within one ulp of want64 rounded to bfloat16, plus the float slack; NaN and
    Inf where want64 has them."""
    assert got.dtype == BF16, got.dtype
    g, w = f64(got), f64(bf16(want64))
    np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=err_msg)
    finite = np.isfinite(w)
    np.testing.assert_array_equal(g[~finite & ~np.isnan(w)], w[~finite & ~np.isnan(w)], err_msg=err_msg)
    if scale is None:
        scale = float(np.max(np.abs(w[finite]), initial=1.0))
    err = np.abs(g[finite] - w[finite])
    bound = ulp_bf16(w[finite]) + FLOAT_SLACK * scale
    worst = np.argmax(err - bound) if err.size else 0
    assert (err <= bound).all(), f"{err_msg}: |error| {err[worst]} > {bound[worst]} at {worst}"


def assert_stats(got, want64, rtol=2e-6, err_msg=""):
    """Statistics come back as float32 (the float16 rule), from float32/double accumulation."""
    assert got.dtype == np.float32, got.dtype
    w = np.asarray(want64, dtype=np.float64)
    np.testing.assert_allclose(f64(got), w, rtol=rtol, atol=rtol * float(np.max(np.abs(w), initial=0.0)),
                               err_msg=err_msg)


@pytest.fixture
def rng():
    return np.random.default_rng(1919)


def random_bf16(rng, shape, loc=0.5, scale=2.0):
    return bf16(loc + scale * rng.standard_normal(shape))


LAYOUTS = ("C", "F", "sliced", "transposed", "negative", "misaligned")


# ---- forward ------------------------------------------------------------------------------------

FORWARD = [
    # name, shape, kwargs, reference
    ("layer_norm", (6, 5, 33), {}, lambda x, w, b, m: ref.layer_norm(x, w, b, mask=m)),
    ("layer_norm", (6, 5, 33), {"axis": (1, 2)}, lambda x, w, b, m: ref.layer_norm(x, w, b, axis=(1, 2), mask=m)),
    ("rms_norm", (6, 5, 33), {}, lambda x, w, b, m: ref.rms_norm(x, w, b, mask=m)),
    ("instance_norm", (4, 3, 7, 5), {"axis": 1},
     lambda x, w, b, m: ref.instance_norm(x, w, b, axis=1, mask=m)),
    ("group_norm", (4, 6, 7, 5), {"axis": 1, "num_groups": 3},
     lambda x, w, b, m: ref.group_norm(x, 3, w, b, axis=1, mask=m)),
    ("batch_norm", (6, 5, 33), {}, lambda x, w, b, m: ref.batch_norm(x, w, b, mask=m)),
    ("batch_norm", (4, 3, 7, 5), {"axis": 1}, lambda x, w, b, m: ref.batch_norm(x, w, b, axis=1, mask=m)),
]


def _param_shape(name, shape, kw):
    axis = kw.get("axis", -1)
    if name in ("layer_norm", "rms_norm"):
        return gref.param_shape(name, shape, axis)
    return (shape[axis],)


def _mask_shape(name, shape, kw):
    axis = kw.get("axis", -1)
    if name in ("layer_norm", "rms_norm", "instance_norm", "batch_norm"):
        return gref.mask_shape(name if name != "instance_norm" else "batch_norm", shape, axis)
    return gref.mask_shape("batch_norm", shape, axis)


def _call(name, x, w, b, kw, **extra):
    kw = dict(kw)
    groups = kw.pop("num_groups", None)
    f = getattr(fastnorm, name)
    return f(x, groups, w, b, **kw, **extra) if groups else f(x, w, b, **kw, **extra)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("name,shape,kw,reference", FORWARD,
                         ids=[f"{c[0]}-{len(c[1])}d-{c[2].get('axis', -1)}" for c in FORWARD])
def test_forward(rng, name, shape, kw, reference, masked, layout):
    x = ref.make_layout(random_bf16(rng, shape, loc=3.0), layout)
    pshape = _param_shape(name, shape, kw)
    w, b = rng.standard_normal(pshape), rng.standard_normal(pshape)
    mask = rng.random(_mask_shape(name, shape, kw)) < 0.7 if masked else None
    if mask is not None and name == "batch_norm":
        mask.flat[:2] = True
    before = x.copy()
    y, *stats = _call(name, x, w, b, kw, mask=mask, return_stats=True)
    want = reference(f64(x), w, b, mask)
    assert y.shape == x.shape
    assert_bf16_close(y, want[0], err_msg=name)
    for got, expected in zip(stats, want[1:]):
        assert_stats(got, expected, err_msg=name)
    np.testing.assert_array_equal(x.view(np.uint16), before.view(np.uint16))     # x untouched


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("D", [300, 1024])
def test_rows_equal_float32_rounded(rng, name, D):
    """Contiguous rows take the float32 arithmetic, their statistics summed in place in float runs:
    the statistics within float32 rounding of the float32 call's on x.astype(float32), and y within
    one bfloat16 ulp of that call's output rounded once to bfloat16."""
    x = random_bf16(rng, (37, D), loc=100.0)
    w, b = rng.standard_normal(D), rng.standard_normal(D)
    y, *stats = getattr(fastnorm, name)(x, w, b, return_stats=True)
    y32, *stats32 = getattr(fastnorm, name)(x.astype(np.float32), w, b, return_stats=True)
    for s, s32 in zip(stats, stats32):
        np.testing.assert_allclose(f64(s), f64(s32), rtol=4e-7)
    np.testing.assert_array_less(np.abs(f64(y) - f64(y32.astype(BF16))), 1.01 * ulp_bf16(f64(y32)))


@pytest.mark.parametrize("row", ["outlier-first", "two-valued", "outliers-leading"])
def test_row_statistics_in_place_with_awkward_first_values(rng, row):
    """Rows whose first values lie far from the mean (the shift of the in-place float sums): mean
    and rstd within float32 accuracy of the float64 statistics, y within a bfloat16 ulp."""
    x = 3.0 + rng.standard_normal((6, 4096))
    if row == "outlier-first":
        x[:, 0] = 3.0 + 8.0
    elif row == "two-valued":
        x = np.where(rng.random((6, 4096)) < 0.06, 10.0, 2.0)
        x[:, :64] = 10.0
    else:
        x[:, :64] += 6.0
    x = bf16(x)
    y, mean, rstd = fastnorm.layer_norm(x, return_stats=True)
    want, wm, wr = ref.layer_norm(f64(x))
    assert_stats(mean, wm, rtol=2e-7)
    assert_stats(rstd, wr, rtol=2e-6)
    assert_bf16_close(y, want, err_msg=row)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("layout", ["C", "sliced"])
def test_long_rows_with_mean_offset(rng, name, layout):
    """100,000 elements around 1,000: bfloat16 accumulation would be off by orders of magnitude
    (ulp(1000) in bfloat16 is 4; a bfloat16 sum of these rows stops growing at 2**16 or so)."""
    x = ref.make_layout(bf16(1000.0 + 3.0 * rng.standard_normal((3, 100_000))), layout)
    x64 = f64(x)
    y, *stats = getattr(fastnorm, name)(x, return_stats=True)
    if name == "layer_norm":
        want, mean, rstd = ref.layer_norm(x64)
        assert_stats(stats[0], mean, rtol=1e-7)
    else:
        want, rstd = ref.rms_norm(x64)
    assert_stats(stats[-1], rstd, rtol=1e-6)
    assert_bf16_close(y, want, err_msg=name)


def test_batch_norm_long_columns(rng):
    x = bf16(1000.0 + 3.0 * rng.standard_normal((100_000, 3)))
    y, mean, rstd = fastnorm.batch_norm(x, return_stats=True)
    want, wm, wr = ref.batch_norm(f64(x))
    assert_stats(mean, wm, rtol=1e-7)
    assert_stats(rstd, wr, rtol=1e-6)
    assert_bf16_close(y, want)


def test_batch_norm_running_stats_and_eval(rng):
    x = random_bf16(rng, (50, 8))
    rm, rv = np.zeros(8, dtype=BF16), np.ones(8, dtype=BF16)
    fastnorm.batch_norm(x, running_mean=rm, running_var=rv, momentum=0.5)
    rm64, rv64 = ref.batch_norm_running_update(f64(x), np.zeros(8), np.ones(8), momentum=0.5)
    assert rm.dtype == BF16 and rv.dtype == BF16
    # the update's NumPy arithmetic rounds (1 - momentum) * r to bfloat16 before the final rounding
    np.testing.assert_allclose(f64(rm), rm64, rtol=2.0 ** -7, atol=2.0 ** -7 * np.abs(rm64).max())
    np.testing.assert_allclose(f64(rv), rv64, rtol=2.0 ** -7)
    y = fastnorm.batch_norm(x, training=False, running_mean=rm, running_var=rv)
    want = ref.batch_norm(f64(x), running_mean=f64(rm), running_var=f64(rv), training=False)[0]
    assert_bf16_close(y, want)


def test_nan_inf_and_degenerate_rows(rng):
    x = random_bf16(rng, (5, 40))
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    x[3] = 7.0                                   # constant: 0 (bias with eps=0)
    y = fastnorm.layer_norm(x, eps=0.0)
    assert np.isnan(f64(y[1])).all() and np.isnan(f64(y[2])).all()
    np.testing.assert_array_equal(f64(y[3]), 0.0)
    assert_bf16_close(y[[0, 4]], ref.layer_norm(f64(x[[0, 4]]), eps=0.0)[0])


@pytest.mark.parametrize("scale,eps,w", [(1e-39, 0.0, 1.0), (1e30, 0.0, 1e8), (1.0, 0.0, 1e-35), (1e25, 0.0, 1.0),
                                         (1e-25, 0.0, 1.0)],
                         ids=["subnormal-rows", "huge", "tiny-weight", "large-rows", "small-rows"])
def test_extreme_scales(rng, scale, eps, w):
    """Groups whose float32 coefficients could overflow or lose precision are computed in double
    (float_arithmetic_fits), and rows whose variance lies outside [2^-80, 2^100) take their
    statistics from the widened float32 values instead of float sums in place: still the float64
    result, rounded."""
    x = bf16(scale * (3.0 + rng.standard_normal((4, 300))))
    weight = np.full(300, w)
    for layout in ("C", "sliced"):
        y = fastnorm.layer_norm(ref.make_layout(x, layout), weight, eps=eps)
        assert_bf16_close(y, ref.layer_norm(f64(x), weight, eps=eps)[0], err_msg=layout)


@pytest.mark.parametrize("shape", [(5, 1), (1, 9), (0, 8), (3, 0, 4)])
def test_size_one_and_empty_axes(rng, shape):
    x = random_bf16(rng, shape)
    y = fastnorm.layer_norm(x)
    assert y.dtype == BF16 and y.shape == shape
    assert_bf16_close(y, ref.layer_norm(f64(x))[0])


def test_empty_feature_axis_is_refused():
    with pytest.raises(ValueError, match="nothing to normalize"):
        fastnorm.layer_norm(np.zeros((3, 0), dtype=BF16))


def test_rounding_matches_ml_dtypes():
    """float32 -> bfloat16 in the kernels equals ml_dtypes' (round to nearest even, ties, subnormals,
    overflow to Inf, NaN quiet): layer norm with weight 0 returns the bias rounded once."""
    rng = np.random.default_rng(7)
    ties = (np.arange(1, 4000, dtype=np.uint32) << 15 | np.uint32(0x3f800000)).view(np.float32)  # half-way
    sub = (np.arange(1, 2000, dtype=np.uint32) * 0x4321).view(np.float32)                          # subnormal
    bias = np.concatenate([
        (rng.standard_normal(4000) * 10.0 ** rng.integers(-40, 39, 4000)).astype(np.float32),
        ties, -ties, sub, np.float32([3.3895e38, 3.4e38, -3.4e38, np.inf, -np.inf, 0.0]),
    ]).astype(np.float32)
    bias = np.concatenate([bias, np.float32([np.nan]), (np.uint32([0x7fc12345, 0xffc00001])).view(np.float32)])
    x = np.ones((1, bias.size), dtype=BF16)
    y = fastnorm.layer_norm(x, np.zeros(bias.size), bias.astype(np.float64))
    want = bias.astype(BF16)
    finite = ~np.isnan(bias)
    np.testing.assert_array_equal(y[0, finite].view(np.uint16), want[finite].view(np.uint16))
    nan_bits = y[0, ~finite].view(np.uint16)
    assert ((nan_bits & 0x7f80) == 0x7f80).all() and ((nan_bits & 0x0040) != 0).all()   # quiet NaN


def test_buffered_store_rounds_once():
    """Strided groups are computed in double and rounded once to bfloat16 (round-to-odd through
    float32), never twice: a bias just above a bfloat16 tie point, closer to it than half a float32
    ulp, rounds up; through a float32 first it would become the tie and round to even, down."""
    even = np.arange(0x3F80, 0x4000, 2, dtype=np.uint16).view(BF16)      # [1, 2) with an even last bit
    bias = f64(even) + 2.0 ** -8 + 2.0 ** -30                            # tie + less than 2**-24
    assert (bias.astype(np.float32).astype(BF16) == even).all()          # the double rounding's answer
    x = ref.make_layout(np.ones((3, bias.size), dtype=BF16), "sliced")   # strided: the double path
    y = fastnorm.layer_norm(x, np.zeros(bias.size), bias)
    want = even.view(np.uint16) + 1
    np.testing.assert_array_equal(y.view(np.uint16), np.broadcast_to(want, y.shape))


# ---- out= ---------------------------------------------------------------------------------------

def test_out_in_place_and_given(rng):
    x = random_bf16(rng, (8, 50))
    reference = ref.layer_norm(f64(x))[0]
    want = fastnorm.layer_norm(x.copy())
    strided = np.empty((8, 100), dtype=BF16)[:, ::2]              # a strided out: the double path
    assert fastnorm.layer_norm(x, out=strided) is strided
    assert_bf16_close(strided, reference)
    out = np.empty_like(x)
    assert fastnorm.layer_norm(x, out=out) is out
    np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))
    fastnorm.layer_norm(x, out=x)
    np.testing.assert_array_equal(x.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("x_dtype,out_dtype", [(BF16, np.float16), (BF16, np.float32), (np.float16, BF16),
                                               (np.float32, BF16)])
def test_out_of_the_wrong_dtype(x_dtype, out_dtype):
    x = np.ones((2, 4), dtype=x_dtype)
    for call in (lambda o: fastnorm.layer_norm(x, out=o), lambda o: fastnorm.batch_norm(x, out=o),
                 lambda o: fastnorm.standardize(x, out=o),
                 lambda o: fastnorm.layer_norm_backward(x, x, np.zeros(2), np.ones(2), out=o)):
        with pytest.raises(ValueError, match="dtype"):
            call(np.empty((2, 4), dtype=out_dtype))


# ---- backward -----------------------------------------------------------------------------------

BACKWARD = [
    ("layer_norm", (6, 5, 33), {}),
    ("layer_norm", (6, 5, 33), {"axis": (1, 2)}),
    ("rms_norm", (6, 5, 33), {}),
    ("instance_norm", (4, 3, 7, 5), {"axis": 1}),
    ("group_norm", (4, 6, 7, 5), {"axis": 1, "num_groups": 3}),
    ("batch_norm", (6, 5, 33), {}),
    ("batch_norm", (4, 3, 7, 5), {"axis": 1}),
]


@pytest.mark.parametrize("layout", ["C", "F", "negative"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("name,shape,kw", BACKWARD, ids=[f"{c[0]}-{len(c[1])}d-{c[2].get('axis', -1)}" for c in BACKWARD])
def test_backward(rng, name, shape, kw, masked, layout):
    x = ref.make_layout(random_bf16(rng, shape, loc=3.0), layout)
    dy = ref.make_layout(random_bf16(rng, shape, loc=0.0, scale=1.0), layout)
    w = rng.standard_normal(_param_shape(name, shape, kw))
    mask = rng.random(_mask_shape(name, shape, kw)) < 0.7 if masked else None
    if mask is not None:
        mask.flat[:2] = True
    _, *stats = _call(name, x, w, None, kw, mask=mask, return_stats=True)
    kw2 = dict(kw)
    groups = kw2.pop("num_groups", None)
    back = getattr(fastnorm, name + "_backward")
    args = (dy, x, *stats) + ((groups,) if groups else ())
    dx, dw, db = back(*args, w, mask=mask, **kw2)
    want = gref.analytic_grads(name, f64(dy), f64(x), w, mask=mask, num_groups=groups, **kw2)
    assert dx.dtype == dw.dtype == db.dtype == BF16
    # the statistics came back rounded to float32: their error is the float slack's share
    assert_bf16_close(dx, want[0], err_msg=f"{name} dx")
    assert_bf16_close(dw, want[1], scale=float(np.abs(want[1]).max()) * 4, err_msg=f"{name} dweight")
    assert_bf16_close(db, want[2], scale=float(np.abs(want[2]).max()) * 4, err_msg=f"{name} dbias")


def test_backward_long_rows(rng):
    x = bf16(1000.0 + 3.0 * rng.standard_normal((2, 100_000)))
    dy = random_bf16(rng, (2, 100_000), loc=0.0, scale=1.0)
    _, mean, rstd = fastnorm.layer_norm(x, return_stats=True)
    dx, dw, db = fastnorm.layer_norm_backward(dy, x, mean, rstd)
    want = gref.analytic_grads("layer_norm", f64(dy), f64(x))
    # mean/rstd went through float32: xhat errs by |mean| * rstd * 2**-24 ~ 2**-16, the slack's scale
    assert_bf16_close(dx, want[0], scale=float(np.abs(want[0]).max()) * 8)
    assert_bf16_close(db, want[2])


# ---- layers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,shape,name,kw", [
    (lambda: fastnorm.LayerNorm(33, dtype=BF16), (6, 5, 33), "layer_norm", {}),
    (lambda: fastnorm.RMSNorm(33), (6, 5, 33), "rms_norm", {}),
    (lambda: fastnorm.BatchNorm(3, axis=1, dtype=BF16), (4, 3, 7, 5), "batch_norm", {"axis": 1}),
    (lambda: fastnorm.InstanceNorm(3, axis=1), (4, 3, 7, 5), "instance_norm", {"axis": 1}),
    (lambda: fastnorm.GroupNorm(3, 6, axis=1), (4, 6, 7, 5), "group_norm", {"axis": 1, "num_groups": 3}),
])
def test_layers(rng, make, shape, name, kw):
    layer = make()
    x = random_bf16(rng, shape, loc=3.0)
    dy = random_bf16(rng, shape, loc=0.0, scale=1.0)
    y = layer(x)
    kw2 = dict(kw)
    groups = kw2.pop("num_groups", None)
    want_y = gref.forward(name, f64(x), num_groups=groups, **kw2)
    assert_bf16_close(y, want_y, err_msg=name)
    dx = layer.backward(dy)
    want = gref.analytic_grads(name, f64(dy), f64(x), num_groups=groups, **kw2)
    assert_bf16_close(dx, want[0], err_msg=name)
    if layer.weight is not None and layer.weight.dtype == BF16:
        assert layer.dweight.dtype == BF16
        assert_bf16_close(layer.dweight, want[1], scale=float(np.abs(want[1]).max()) * 4)


# ---- data preparation ---------------------------------------------------------------------------

def test_standardize_min_max_moments(rng):
    x = bf16(500.0 + 4.0 * rng.standard_normal((5000, 4)))
    x64 = f64(x)
    assert_bf16_close(fastnorm.standardize(x), (x64 - x64.mean(0)) / x64.std(0))
    lo, hi = x64.min(0), x64.max(0)
    assert_bf16_close(fastnorm.min_max_scale(x), (x64 - lo) / (hi - lo))
    m = fastnorm.moments(x)
    np.testing.assert_allclose(m.mean, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.var(), x64.var(0), rtol=1e-9)
    np.testing.assert_array_equal(m.min, lo)


def test_weight_norm(rng):
    v = random_bf16(rng, (6, 4))
    g = rng.standard_normal(6)
    v64 = f64(v)
    want = v64 / np.linalg.norm(v64, axis=1, keepdims=True) * g[:, None]
    w = fastnorm.weight_norm(v, g, axis=0)
    assert_bf16_close(w, want)
    dv, dg = fastnorm.weight_norm_backward(np.ones_like(v), v, g, axis=0)
    assert dv.dtype == BF16 and dg.dtype == BF16


def test_dask(rng):
    da = pytest.importorskip("dask.array")
    x = random_bf16(rng, (40, 7, 5), loc=3.0)
    dx = da.from_array(x, chunks=(13, 7, 5))
    w = rng.standard_normal(5)
    lazy = fastnorm.layer_norm(dx, w)
    assert lazy.dtype == BF16
    got = lazy.compute()
    np.testing.assert_array_equal(got.view(np.uint16), fastnorm.layer_norm(x, w).view(np.uint16))
    z = fastnorm.standardize(dx.reshape(40, 35)).compute()
    assert_bf16_close(z, (f64(x).reshape(40, 35) - f64(x).reshape(40, 35).mean(0)) / f64(x).reshape(40, 35).std(0))


# ---- optional dependency ------------------------------------------------------------------------

def test_import_does_not_import_ml_dtypes():
    code = ("import sys, numpy as np, fastnorm; fastnorm.layer_norm(np.ones((2, 3), np.float16)); "
            "assert 'ml_dtypes' not in sys.modules, 'ml_dtypes imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_other_void_dtypes_are_refused():
    with pytest.raises(TypeError, match="bfloat16"):
        fastnorm.layer_norm(np.zeros((2, 3), dtype="V2"))
    with pytest.raises(TypeError, match="real numbers"):
        fastnorm.layer_norm(np.ones((2, 3)), weight=np.zeros(3, dtype=ml_dtypes.float8_e4m3fn))


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("in_place", [False, True])
def test_add_norm(rng, name, in_place):
    """add_layer_norm/add_rms_norm on bfloat16: h is x + residual rounded once to bfloat16 (exact in
    float32, so the float32 sum rounded), y the norm of h within bfloat16's precision."""
    x, r = random_bf16(rng, (9, 130), loc=30.0), random_bf16(rng, (9, 130), loc=-30.0)
    w, b = rng.standard_normal(130), rng.standard_normal(130)
    want_h = (x.astype(np.float32) + r.astype(np.float32)).astype(BF16)
    r_in = r.copy()
    y, h = getattr(fastnorm, "add_" + name)(x, r_in, w, b, residual_out=r_in if in_place else None)
    assert h.dtype == BF16 and (h is r_in) == in_place
    np.testing.assert_array_equal(h.view(np.uint16), want_h.view(np.uint16))
    assert_bf16_close(y, getattr(ref, name)(f64(want_h), w, b)[0], err_msg=name)
