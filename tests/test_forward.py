"""Forward functions of fastnorm against the float64 NumPy reference (tests/reference.py).

Every test compares values: y, and mean/rstd from return_stats=True.
"""

import zlib

import numpy as np
import pytest

import fastnorm
import reference as ref
from forward_checks import (
    FLOAT_DTYPES,
    FUNCS,
    INT_DTYPES,
    assert_close,
    at_page_offset,
    call,
    call_stats,
    check,
    compare,
    expand_mask,
    feature_shape,
    mask_shape,
    native,
    param_dtype,
    random_array,
    reference,
    result_dtype,
    stats_dtype,
    stats_shape,
    tol_for,
)

SHAPE = (3, 4, 6)

LN_AXES = [-1, -2, -3, 0, 1, 2, (-1,), (-2, -1), (0, 2), (0, 1, 2), (2, 0), (-1, 0)]

# (name, axis, extra keyword arguments) on an x of SHAPE
CASES = (
    [("layer_norm", ax, {}) for ax in LN_AXES]
    + [("rms_norm", ax, {}) for ax in LN_AXES]
    + [("batch_norm", ax, {}) for ax in (0, 1, 2, -1, -2, -3)]
    + [("instance_norm", ax, {}) for ax in (1, 2, -1, -2)]
    + [("group_norm", ax, {"num_groups": g}) for ax in (1, 2, -1, -2) for g in (1, 2)]
)

# one or two representative cases per function, for the tests that vary something else
BASIC = [
    ("layer_norm", -1, {}),
    ("layer_norm", (0, 2), {}),
    ("rms_norm", -1, {}),
    ("rms_norm", (-2, -1), {}),
    ("batch_norm", -1, {}),
    ("batch_norm", 1, {}),
    ("instance_norm", -1, {}),
    ("instance_norm", 1, {}),
    ("group_norm", -1, {"num_groups": 3}),
    ("group_norm", 1, {"num_groups": 2}),
]


def case_id(case):
    name, axis, extra = case
    g = f"-G{extra['num_groups']}" if "num_groups" in extra else ""
    return f"{name}-axis{axis}{g}".replace(" ", "")


def dtype_id(dtype):
    return np.dtype(dtype).name


@pytest.fixture
def rng(request):
    # a different but reproducible stream per test (crc32: str hashes change with PYTHONHASHSEED)
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def params_for(rng, name, shape, axis, dtype, weight=True, bias=True):
    fshape = feature_shape(name, shape, axis)
    w = (0.5 + rng.random(fshape)).astype(param_dtype(dtype)) if weight else None
    b = rng.standard_normal(fshape).astype(param_dtype(dtype)) if bias else None
    return w, b


# --------------------------------------------------------------------------- the layout helper itself

@pytest.mark.parametrize("layout", ref.LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (np.int32, np.bool_))
def test_layout_helper_keeps_values(layout, dtype):
    rng = np.random.default_rng(0)
    a = random_array(rng, SHAPE, dtype)
    v = ref.make_layout(a, layout)
    np.testing.assert_array_equal(v, a)
    assert native(v.dtype) == native(a.dtype)
    if layout == "F":
        assert v.flags.f_contiguous and not v.flags.c_contiguous
    if layout in ("sliced", "transposed"):
        assert not v.flags.c_contiguous and not v.flags.f_contiguous
    if layout == "negative":
        assert all(s < 0 for s in v.strides)
    if layout == "byteswapped" and v.dtype.itemsize > 1:
        assert not v.dtype.isnative
    if layout == "misaligned" and v.dtype.itemsize > 1:
        assert not v.flags.aligned



# --------------------------------------------------------------------------- axes x layouts x dtypes

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ref.LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, layout, dtype, rng):
    name, axis, extra = case
    x = random_array(rng, SHAPE, dtype)
    w, b = params_for(rng, name, SHAPE, axis, dtype)
    xl = ref.make_layout(x, layout)
    y, mean, rstd = check(name, xl, w, b, axis=axis, **extra)
    assert y.shape == SHAPE
    assert rstd.shape == stats_shape(name, SHAPE, axis, extra.get("num_groups"))


@pytest.mark.parametrize("layout", ref.LAYOUTS)
@pytest.mark.parametrize("case", BASIC, ids=case_id)
def test_layouts_of_weight_bias_and_mask(case, layout, rng):
    """weight, bias and mask in awkward layouts too."""
    name, axis, extra = case
    shape = (4, 6, 6)
    x = random_array(rng, shape, np.float64)
    w, b = params_for(rng, name, shape, axis, np.float64)
    mask = rng.random(mask_shape(name, shape, axis)) < 0.7
    mask.reshape(mask.shape[0], -1)[:, 0] = True
    check(name, x, ref.make_layout(w, layout), ref.make_layout(b, layout), axis=axis,
          mask=ref.make_layout(mask, layout), **extra)


@pytest.mark.parametrize("case", BASIC, ids=case_id)
def test_return_stats_false_gives_the_same_y(case, rng):
    name, axis, extra = case
    x = random_array(rng, SHAPE, np.float64)
    w, b = params_for(rng, name, SHAPE, axis, np.float64)
    y_only = call(name, x, w, b, axis=axis, **extra)
    assert isinstance(y_only, np.ndarray)
    y, _, _ = call_stats(name, x, w, b, axis=axis, **extra)
    np.testing.assert_allclose(y_only, y, rtol=1e-14, atol=1e-14)
    assert_close(y_only, reference(name, x, w, b, axis=axis, **extra)[0], 1e-11)


@pytest.mark.parametrize("name", FUNCS)
def test_default_axis_is_last(name, rng):
    extra = {"num_groups": 3} if name == "group_norm" else {}
    x = random_array(rng, SHAPE, np.float64)
    y = call(name, x, **extra)
    assert_close(y, reference(name, x, axis=-1, **extra)[0], 1e-11)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "case",
    [
        ("layer_norm", (-2, -1), {}),
        ("layer_norm", (1, 2, 3), {}),
        ("layer_norm", (1, 3), {}),
        ("rms_norm", (-3, -1), {}),
        ("batch_norm", 1, {}),
        ("batch_norm", -1, {}),
        ("instance_norm", 1, {}),
        ("instance_norm", -1, {}),
        ("instance_norm", 2, {}),
        ("group_norm", 1, {"num_groups": 4}),
        ("group_norm", 1, {"num_groups": 2}),
        ("group_norm", -1, {"num_groups": 1}),
    ],
    ids=case_id,
)
@pytest.mark.parametrize("layout", ["C", "F", "negative"])
def test_four_dimensional(case, dtype, layout, rng):
    """(N, C, H, W) with axis=1 as in PyTorch, and features last."""
    name, axis, extra = case
    shape = (2, 4, 3, 4)
    x = random_array(rng, shape, dtype)
    w, b = params_for(rng, name, shape, axis, dtype)
    check(name, ref.make_layout(x, layout), w, b, axis=axis, **extra)


@pytest.mark.parametrize(
    "case",
    [("layer_norm", -1, {}), ("layer_norm", 0, {}), ("rms_norm", 0, {}),
     ("batch_norm", -1, {}), ("batch_norm", 0, {}), ("group_norm", 1, {"num_groups": 3}),
     ("group_norm", -1, {"num_groups": 6})],
    ids=case_id,
)
def test_two_dimensional(case, rng):
    name, axis, extra = case
    shape = (5, 6)
    x = random_array(rng, shape, np.float64)
    w, b = params_for(rng, name, shape, axis, np.float64)
    check(name, x, w, b, axis=axis, **extra)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("axis", [0, -1, (0,)])
def test_one_dimensional(name, axis, rng):
    x = random_array(rng, (7,), np.float64)
    w, b = params_for(rng, name, (7,), axis, np.float64)
    y, mean, rstd = check(name, x, w, b, axis=axis)
    assert np.ndim(rstd) == 0


def test_batch_norm_one_dimensional_eval(rng):
    """1-D x: one value per feature; fine in eval mode."""
    x = random_array(rng, (5,), np.float64)
    rm, rv = rng.standard_normal(5), 0.5 + rng.random(5)
    check("batch_norm", x, axis=0, training=False, running_mean=rm, running_var=rv)


# --------------------------------------------------------------------------- weight / bias

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_weight,with_bias", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("case", BASIC, ids=case_id)
def test_weight_and_bias_optional(case, with_weight, with_bias, dtype, rng):
    name, axis, extra = case
    x = random_array(rng, SHAPE, dtype)
    w, b = params_for(rng, name, SHAPE, axis, dtype, with_weight, with_bias)
    check(name, x, w, b, axis=axis, **extra)


@pytest.mark.parametrize("case", BASIC, ids=case_id)
def test_weight_and_bias_as_keywords(case, rng):
    name, axis, extra = case
    x = random_array(rng, SHAPE, np.float64)
    w, b = params_for(rng, name, SHAPE, axis, np.float64)
    fn = getattr(fastnorm, name)
    args = (x, extra["num_groups"]) if name == "group_norm" else (x,)
    y = fn(*args, weight=w, bias=b, axis=axis)
    assert_close(y, reference(name, x, w, b, axis=axis, **extra)[0], 1e-11)
    y = fn(*args, bias=b, axis=axis)
    assert_close(y, reference(name, x, None, b, axis=axis, **extra)[0], 1e-11)


@pytest.mark.parametrize("case", BASIC, ids=case_id)
def test_weight_and_bias_as_lists(case, rng):
    """weight/bias go through np.asarray like x (a NumPy user's expectation)."""
    name, axis, extra = case
    x = random_array(rng, SHAPE, np.float64)
    w, b = params_for(rng, name, SHAPE, axis, np.float64)
    y = call(name, x, w.tolist(), b.tolist(), axis=axis, **extra)
    assert_close(y, reference(name, x, w, b, axis=axis, **extra)[0], 1e-11)


# --------------------------------------------------------------------------- integer, bool, list input

@pytest.mark.parametrize("dtype", INT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["C", "F", "sliced", "negative", "byteswapped", "misaligned"])
@pytest.mark.parametrize("case", BASIC, ids=case_id)
def test_integer_and_bool_input_gives_float64(case, layout, dtype, rng):
    name, axis, extra = case
    x = random_array(rng, SHAPE, dtype)
    w, b = params_for(rng, name, SHAPE, axis, dtype)
    y, mean, rstd = check(name, ref.make_layout(x, layout), w, b, axis=axis, **extra)
    assert y.dtype == np.float64
    assert rstd.dtype == np.float64


@pytest.mark.parametrize("case", BASIC, ids=case_id)
def test_nested_list_input(case, rng):
    name, axis, extra = case
    x = random_array(rng, SHAPE, np.float64)
    y, mean, rstd = call_stats(name, x.tolist(), axis=axis, **extra)
    assert y.dtype == np.float64
    compare(name, (y, mean, rstd), reference(name, x, axis=axis, **extra), np.float64)


# --------------------------------------------------------------------------- out=

@pytest.mark.parametrize("out_layout", ["C", "F", "sliced", "negative", "misaligned"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (np.int32,), ids=dtype_id)
@pytest.mark.parametrize("case", BASIC, ids=case_id)
def test_out_separate_array(case, dtype, out_layout, rng):
    name, axis, extra = case
    x = random_array(rng, SHAPE, dtype)
    w, b = params_for(rng, name, SHAPE, axis, dtype)
    out = ref.make_layout(np.full(SHAPE, 7.0, dtype=result_dtype(dtype)), out_layout)
    base = out.base if out.base is not None else out
    base_before = base.copy()
    x_before = x.copy()

    got = call_stats(name, x, w, b, axis=axis, out=out, **extra)
    assert got[0] is out
    compare(name, got, reference(name, x, w, b, axis=axis, **extra), dtype)
    np.testing.assert_array_equal(x, x_before)
    if out_layout == "sliced":
        # nothing written outside the view
        gaps = np.ones(base.shape, dtype=bool)
        gaps[tuple(slice(1, None, 2) for _ in SHAPE)] = False
        np.testing.assert_array_equal(base[gaps], base_before[gaps])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["C", "F", "sliced", "transposed", "negative", "misaligned"])
@pytest.mark.parametrize("case", BASIC, ids=case_id)
def test_out_in_place(case, layout, dtype, rng):
    name, axis, extra = case
    x = ref.make_layout(random_array(rng, SHAPE, dtype), layout)
    w, b = params_for(rng, name, SHAPE, axis, dtype)
    x_values = x.copy()
    got = call_stats(name, x, w, b, axis=axis, out=x, **extra)
    assert got[0] is x
    compare(name, got, reference(name, x_values, w, b, axis=axis, **extra), dtype)


@pytest.mark.parametrize("name", ["layer_norm", "instance_norm"])
def test_out_in_place_with_mask(name, rng):
    x = random_array(rng, (3, 5, 4), np.float32)
    mask = ref.make_layout(np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool), "C")
    x_values = x.copy()
    got = call_stats(name, x, axis=-1, mask=mask, out=x)
    assert got[0] is x
    compare(name, got, reference(name, x_values, axis=-1, mask=mask), np.float32)


# --------------------------------------------------------------------------- masks

MASK_CASES = [
    ("layer_norm", -1, {}),
    ("layer_norm", (0, 2), {}),
    ("layer_norm", 1, {}),
    ("rms_norm", -1, {}),
    ("rms_norm", (-2, -1), {}),
    ("batch_norm", -1, {}),
    ("batch_norm", 1, {}),
    ("instance_norm", -1, {}),
    ("instance_norm", 1, {}),
    ("group_norm", -1, {"num_groups": 3}),
    ("group_norm", 1, {"num_groups": 2}),
]


def make_mask(rng, shape, pattern):
    """all_real, some_padding (each first-axis entry keeps a real element), fully_padded (entry 1 all padding)."""
    mask = np.ones(shape, dtype=bool)
    if pattern == "all_real":
        return mask
    mask = rng.random(shape) < 0.6
    flat = mask.reshape(shape[0], -1)
    flat[:, 0] = True
    flat[:, -1] = False
    if pattern == "fully_padded":
        flat[1] = False
    return mask


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("pattern", ["all_real", "some_padding", "fully_padded"])
@pytest.mark.parametrize("case", MASK_CASES, ids=case_id)
def test_mask(case, pattern, dtype, rng):
    name, axis, extra = case
    shape = (4, 6, 6)
    x = random_array(rng, shape, dtype)
    w, b = params_for(rng, name, shape, axis, dtype)
    mask = make_mask(rng, mask_shape(name, shape, axis), pattern)
    real = expand_mask(name, mask, shape, axis)
    x[~real] = np.nan  # padding must not leak into anything

    y, mean, rstd = check(name, x, w, b, axis=axis, mask=mask, **extra)
    assert np.all(y[~real] == 0)
    assert np.all(np.isfinite(y))
    if pattern == "fully_padded" and name != "batch_norm":
        # the fully padded sample/row has zero stats
        sel = (1,) if name in ("instance_norm", "group_norm") else np.nonzero(~mask)
        assert np.all(rstd[sel] == 0)
        if mean is not None:
            assert np.all(mean[sel] == 0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", MASK_CASES, ids=case_id)
def test_mask_padding_values_are_ignored(case, dtype, rng):
    """The same real values with different garbage in the padding give the same result."""
    name, axis, extra = case
    shape = (4, 6, 6)
    x1 = random_array(rng, shape, dtype)
    mask = make_mask(rng, mask_shape(name, shape, axis), "some_padding")
    real = expand_mask(name, mask, shape, axis)
    x2 = x1.copy()
    x2[~real] = np.finfo(dtype).max / 4
    got1 = call_stats(name, x1, axis=axis, mask=mask, **extra)
    got2 = call_stats(name, x2, axis=axis, mask=mask, **extra)
    for a, b in zip(got1, got2):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    compare(name, got1, reference(name, x1, axis=axis, mask=mask, **extra), dtype)


def test_mask_from_lengths_values():
    m = fastnorm.mask_from_lengths([3, 0, 5, 1])
    expected = np.array(
        [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=bool
    )
    assert m.dtype == np.bool_
    np.testing.assert_array_equal(m, expected)


@pytest.mark.parametrize("max_len", [None, 6, 9])
@pytest.mark.parametrize("lengths", [[2, 6, 0], np.array([2, 6, 0], dtype=np.int32), np.array([4, 1, 6, 6, 3])])
def test_mask_from_lengths_matches_arange(lengths, max_len):
    lengths_arr = np.asarray(lengths)
    n_cols = int(lengths_arr.max()) if max_len is None else max_len
    expected = np.arange(n_cols)[None, :] < lengths_arr[:, None]
    got = fastnorm.mask_from_lengths(lengths, max_len) if max_len is not None else fastnorm.mask_from_lengths(lengths)
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, expected)


def test_mask_from_lengths_all_zero_with_max_len_zero():
    got = fastnorm.mask_from_lengths([0, 0], 0)
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, np.zeros((2, 0), dtype=bool))


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "instance_norm", "batch_norm"])
def test_mask_from_lengths_drives_a_norm(name, rng):
    """A (N, L, D) batch of padded sequences, as in a transformer."""
    lengths = [5, 2, 0, 3]
    x = random_array(rng, (4, 5, 8), np.float32)
    mask = fastnorm.mask_from_lengths(lengths, 5)
    w, b = params_for(rng, name, x.shape, -1, np.float32)
    y, mean, rstd = check(name, x, w, b, axis=-1, mask=mask)
    assert np.all(y[2] == 0)
    assert np.all(y[1, 2:] == 0)


# --------------------------------------------------------------------------- size-1 axes, empty arrays

SIZE_ONE_CASES = [
    ("layer_norm", -1, (4, 1)),        # one element per row: y = bias
    ("layer_norm", -1, (1, 1, 5)),
    ("layer_norm", (0, 1), (1, 1, 5)),
    ("layer_norm", 0, (1, 3)),
    ("rms_norm", -1, (4, 1)),
    ("rms_norm", -1, (1, 5)),
    ("batch_norm", -1, (2, 1, 3)),
    ("batch_norm", 1, (2, 1, 3)),      # a single feature
    ("batch_norm", 0, (1, 2, 1)),
    ("instance_norm", 1, (1, 3, 1)),   # one spatial element: y = bias
    ("instance_norm", -1, (2, 1, 3)),
    ("instance_norm", 1, (1, 1, 1, 4)),
    ("group_norm", 1, (1, 4, 1)),
    ("group_norm", -1, (1, 1, 4)),
    ("group_norm", 1, (3, 1)),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name,axis,shape", SIZE_ONE_CASES)
def test_size_one_axes(name, axis, shape, dtype, rng):
    extra = {"num_groups": 2 if feature_shape(name, shape, axis)[0] % 2 == 0 else 1} if name == "group_norm" else {}
    x = random_array(rng, shape, dtype)
    w, b = params_for(rng, name, shape, axis, dtype)
    y, _, _ = check(name, ref.make_layout(x, "sliced"), w, b, axis=axis, **extra)
    assert np.all(np.isfinite(y))


EMPTY_CASES = [
    ("layer_norm", -1, (0, 5), {}),
    ("layer_norm", -1, (2, 0, 5), {}),
    ("layer_norm", (1, 2), (0, 3, 4), {}),
    ("rms_norm", -1, (0, 5), {}),
    ("rms_norm", 1, (3, 4, 0), {}),
    ("batch_norm", -1, (4, 0), {}),           # zero features: nothing to do
    ("instance_norm", 1, (0, 3, 4), {}),
    ("instance_norm", -1, (0, 4, 3), {}),
    ("group_norm", 1, (0, 4, 3), {"num_groups": 2}),
    ("group_norm", -1, (0, 6), {"num_groups": 3}),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (np.int64,), ids=dtype_id)
@pytest.mark.parametrize("name,axis,shape,extra", EMPTY_CASES)
def test_empty_input_gives_empty_output(name, axis, shape, extra, dtype, rng):
    x = np.zeros(shape, dtype=dtype)
    w, b = params_for(rng, name, shape, axis, dtype)
    y, mean, rstd = check(name, x, w, b, axis=axis, **extra)
    assert y.shape == shape
    assert rstd.shape == stats_shape(name, shape, axis, extra.get("num_groups"))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("axis,shape", [(-1, (0, 4)), (1, (0, 3, 5)), (1, (2, 3, 0)), (-1, (3, 0, 4))])
def test_batch_norm_empty_batch(axis, shape, dtype, rng):
    """Empty batch with C > 0 features: empty y, NaN mean/rstd of shape (C,), running stats untouched."""
    c = shape[axis]
    x = np.zeros(shape, dtype=dtype)
    rm, rv = rng.standard_normal(c), 0.5 + rng.random(c)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, rstd = call_stats("batch_norm", x, axis=axis, running_mean=rm, running_var=rv)
    assert y.shape == shape and native(y.dtype) == np.dtype(dtype)
    assert mean.shape == (c,) and rstd.shape == (c,)
    assert np.all(np.isnan(mean)) and np.all(np.isnan(rstd))
    assert native(mean.dtype) == stats_dtype(dtype)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


# --------------------------------------------------------------------------- accuracy edge cases

ACCURACY_CASES = [
    ("layer_norm", -1, (8, 512), {}),
    ("layer_norm", (0, 1), (64, 8, 3), {}),
    ("rms_norm", -1, (8, 512), {}),
    ("batch_norm", -1, (512, 8), {}),
    ("batch_norm", 1, (16, 8, 32), {}),
    ("instance_norm", 1, (2, 4, 256), {}),
    ("group_norm", 1, (2, 8, 128), {"num_groups": 2}),
]


@pytest.mark.parametrize("name,axis,shape,extra", ACCURACY_CASES)
def test_large_mean_offset_float32(name, axis, shape, extra, rng):
    """mean 1e4, std 1 in float32 must stay accurate to ~1e-4 of the output scale (1)."""
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    y, mean, rstd = check(name, x, axis=axis, y_tol=1e-4, stats_tol=1e-4, **extra)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("name,axis,shape,extra", ACCURACY_CASES)
def test_large_mean_offset_float64(name, axis, shape, extra, rng):
    x = 1e6 + rng.standard_normal(shape)
    check(name, x, axis=axis, y_tol=1e-9, stats_tol=1e-10, **extra)


MILLION_CASES = [
    ("layer_norm", -1, (2, 10**6), {}),
    ("layer_norm", 0, (10**6, 2), {}),
    ("rms_norm", -1, (2, 10**6), {}),
    ("batch_norm", -1, (10**6, 2), {}),
    ("batch_norm", 0, (2, 10**6), {}),
    ("instance_norm", 1, (1, 2, 10**6), {}),
    ("group_norm", -1, (1, 250_000, 4), {"num_groups": 2}),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name,axis,shape,extra", MILLION_CASES)
def test_a_million_elements_per_group(name, axis, shape, extra, dtype, rng):
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    y_tol = {np.float16: 1e-2, np.float32: 1e-5, np.float64: 1e-10}[dtype]
    stats_tol = {np.float16: 1e-3, np.float32: 1e-5, np.float64: 1e-10}[dtype]
    check(name, x, axis=axis, y_tol=y_tol, stats_tol=stats_tol, **extra)


CONSTANT_CASES = [
    ("layer_norm", -1, {}),
    ("layer_norm", (0, 2), {}),
    ("batch_norm", -1, {}),
    ("batch_norm", 1, {}),
    ("instance_norm", -1, {}),
    ("instance_norm", 1, {}),
    ("group_norm", -1, {"num_groups": 3}),
    ("group_norm", 1, {"num_groups": 2}),
]


def constant_groups(name, axis, shape, values, extra):
    """x where every normalization group (row, column, (n, c), (n, g)) is constant."""
    if name == "layer_norm":
        other = mask_shape(name, shape, axis)
        per = np.resize(np.asarray(values, dtype=np.float64), other)
        return np.broadcast_to(np.expand_dims(per, feat_axes_of(name, shape, axis)), shape).copy()
    if name == "batch_norm":
        (ax,) = feat_axes_of(name, shape, axis)
        per = np.resize(np.asarray(values, dtype=np.float64), (shape[ax],))
        return np.moveaxis(np.broadcast_to(per, np.moveaxis(np.empty(shape), ax, -1).shape), -1, ax).copy()
    (ax,) = feat_axes_of(name, shape, axis)
    n, c = shape[0], shape[ax]
    g = extra.get("num_groups", c)
    per_group = np.resize(np.asarray(values, dtype=np.float64), (n, g))
    per_channel = np.repeat(per_group, c // g, axis=1)              # (N, C)
    moved = np.moveaxis(np.empty(shape), ax, -1).shape              # (N, *spatial, C)
    full = np.broadcast_to(per_channel.reshape((n,) + (1,) * (len(shape) - 2) + (c,)), moved)
    return np.moveaxis(full, -1, ax).copy()


def feat_axes_of(name, shape, axis):
    return ref.feature_axes(axis, len(shape))


def expected_bias(name, shape, axis, b):
    """bias broadcast to x's shape along the feature axes (0 without bias)."""
    if b is None:
        return np.zeros(shape)
    feat = feat_axes_of(name, shape, axis)
    other = tuple(i for i in range(len(shape)) if i not in feat)
    return np.broadcast_to(np.expand_dims(b, other), shape).astype(np.float64)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 0.0])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CONSTANT_CASES, ids=case_id)
def test_constant_groups_give_bias(case, dtype, eps, with_bias, rng):
    """Constant rows/columns/groups (values whose sums are exact) give bias, never NaN."""
    name, axis, extra = case
    shape = (4, 6, 6)
    x = constant_groups(name, axis, shape, [0.0, 2.5, -1024.0, 3.0, 0.5, -7.0], extra).astype(dtype)
    w, b = params_for(rng, name, shape, axis, dtype, True, with_bias)
    y, mean, rstd = check(name, x, w, b, axis=axis, eps=eps, **extra)
    assert not np.any(np.isnan(y))
    assert_close(y, expected_bias(name, shape, axis, b), tol_for(dtype))
    if eps == 0:
        np.testing.assert_array_equal(rstd, 0)
        np.testing.assert_array_equal(y, expected_bias(name, shape, axis, b).astype(dtype))


@pytest.mark.parametrize("eps", [1e-5, 0.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
@pytest.mark.parametrize("case", CONSTANT_CASES, ids=case_id)
def test_constant_groups_with_inexact_values(case, dtype, eps, rng):
    """Constants like 0.1 and 1/3 whose float sums round: still bias (here 0 + bias), never NaN or +-1."""
    name, axis, extra = case
    shape = (4, 6, 6)
    x = constant_groups(name, axis, shape, [0.1, 1 / 3, -2.2, 1e3 / 7, 0.7, 5.3], extra).astype(dtype)
    w, b = params_for(rng, name, shape, axis, dtype)
    y = call(name, x, w, b, axis=axis, eps=eps, **extra)
    assert not np.any(np.isnan(y))
    assert_close(y, expected_bias(name, shape, axis, b), 1e-4)


@pytest.mark.parametrize("eps", [1e-5, 0.0])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("axis", [-1, (0, 2)])
def test_rms_norm_zero_rows(axis, dtype, eps, rng):
    """An all-zero row gives bias (0 without); with eps=0, rstd is 0, never NaN."""
    shape = (4, 5, 6)
    x = random_array(rng, shape, dtype)
    other = mask_shape("rms_norm", shape, axis)
    zero_rows = np.zeros(other, dtype=bool)
    zero_rows.reshape(-1)[::2] = True
    x[expand_mask("rms_norm", zero_rows, shape, axis)] = 0
    w, b = params_for(rng, "rms_norm", shape, axis, dtype)
    y, _, rstd = check("rms_norm", x, w, b, axis=axis, eps=eps)
    assert not np.any(np.isnan(y))
    if eps == 0:
        assert np.all(rstd[zero_rows] == 0)
        y_none = call("rms_norm", x, axis=axis, eps=eps)
        assert np.all(y_none[expand_mask("rms_norm", zero_rows, shape, axis)] == 0)


@pytest.mark.parametrize("eps", [0.0, 1e-12, 0.5, 3.0])
@pytest.mark.parametrize("case", BASIC, ids=case_id)
def test_eps_values(case, eps, rng):
    name, axis, extra = case
    x = random_array(rng, SHAPE, np.float64)
    w, b = params_for(rng, name, SHAPE, axis, np.float64)
    check(name, x, w, b, axis=axis, eps=eps, **extra)


def test_eps_default_is_1e_minus_5(rng):
    x = random_array(rng, (3, 4), np.float64, scale=1e-3)  # var ~ 1e-6 so eps matters
    for name in FUNCS:
        extra = {"num_groups": 2} if name == "group_norm" else {}
        xs = x[:, None, :] if name == "instance_norm" else x
        xs = np.repeat(xs, 2, axis=1) if name == "instance_norm" else xs
        y = call(name, xs, **extra)
        assert_close(y, reference(name, xs, eps=1e-5, **extra)[0], 1e-11, err_msg=name)


# --------------------------------------------------------------------------- NaN / Inf stay in their group

def nan_case(name):
    """(x shape, axis, extra, bad index, index of the group that must become NaN)."""
    shape = (4, 5, 6)
    bad = (1, 2, 3)
    if name in ("layer_norm", "rms_norm"):
        return shape, -1, {}, bad, (1, 2, slice(None))
    if name == "batch_norm":
        return shape, -1, {}, bad, (slice(None), slice(None), 3)
    if name == "instance_norm":
        return shape, -1, {}, bad, (1, slice(None), 3)
    return shape, -1, {"num_groups": 3}, bad, (1, slice(None), slice(2, 4))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", FUNCS)
def test_nan_inf_only_poisons_its_group(name, dtype, bad_value, rng):
    shape, axis, extra, bad, group = nan_case(name)
    x = random_array(rng, shape, dtype)
    x[bad] = bad_value
    w, b = params_for(rng, name, shape, axis, dtype)
    with np.errstate(invalid="ignore"):
        y, mean, rstd = call_stats(name, x, w, b, axis=axis, **extra)
    poisoned = np.zeros(shape, dtype=bool)
    poisoned[group] = True

    if name == "rms_norm" and np.isinf(bad_value):
        # x / sqrt(inf): the Inf element itself is inf*0 = NaN; the rest of the row is not specified further
        assert np.isnan(y[bad])
    else:
        assert np.all(np.isnan(y[poisoned])), "the whole group must be NaN"
    assert np.all(np.isfinite(y[~poisoned])), "NaN/Inf leaked into other groups"

    y_ref, mean_ref, rstd_ref = reference(name, x, w, b, axis=axis, **extra)
    assert_close(np.where(poisoned, 0, y), np.where(poisoned, 0, y_ref), tol_for(dtype))
    # stats of the clean groups are exact too
    clean_stats = np.isfinite(rstd_ref) & (rstd_ref != 0) if name == "rms_norm" else np.isfinite(mean_ref)
    assert_close(rstd[clean_stats], rstd_ref[clean_stats], 1e-3 if dtype == np.float16 else tol_for(dtype))
    if mean is not None:
        assert_close(mean[clean_stats], mean_ref[clean_stats], 1e-3 if dtype == np.float16 else tol_for(dtype))


# --------------------------------------------------------------------------- batch norm running stats

@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, 0.5])
@pytest.mark.parametrize("stat_dtype", [np.float64, np.float32], ids=dtype_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_batch_norm_running_stats_update(axis, dtype, stat_dtype, momentum, with_mask, rng):
    shape = (5, 4, 6)
    x = random_array(rng, shape, dtype)
    c = shape[axis]
    mask = None
    if with_mask:
        mask = make_mask(rng, mask_shape("batch_norm", shape, axis), "some_padding")
    rm = rng.standard_normal(c).astype(stat_dtype)
    rv = (0.5 + rng.random(c)).astype(stat_dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    w, b = params_for(rng, "batch_norm", shape, axis, dtype)

    got = call_stats("batch_norm", x, w, b, axis=axis, running_mean=rm, running_var=rv,
                     momentum=momentum, mask=mask)
    # training normalizes with the batch statistics (biased variance)
    compare("batch_norm", got, ref.batch_norm(x, w, b, axis=axis, mask=mask), dtype)
    new_rm, new_rv = ref.batch_norm_running_update(x, rm0, rv0, axis=axis, momentum=momentum, mask=mask)
    tol = max(1e-6 if stat_dtype == np.float32 else 1e-11, 1e-3 if dtype == np.float16 else 0)
    assert rm.dtype == stat_dtype and rv.dtype == stat_dtype
    assert_close(rm, new_rm, tol, err_msg="running_mean")
    assert_close(rv, new_rv, tol, err_msg="running_var")


def test_batch_norm_running_var_is_unbiased():
    """Two values per feature: biased var 1, unbiased 2; momentum 1 copies the batch stats."""
    x = np.array([[0.0, 10.0], [2.0, 14.0]])
    rm, rv = np.zeros(2), np.ones(2)
    y, mean, rstd = fastnorm.batch_norm(x, running_mean=rm, running_var=rv, momentum=1.0, eps=0.0,
                                        return_stats=True)
    np.testing.assert_allclose(mean, [1.0, 12.0], rtol=1e-15)
    np.testing.assert_allclose(rstd, [1.0, 0.5], rtol=1e-15)
    np.testing.assert_allclose(y, [[-1.0, -1.0], [1.0, 1.0]], rtol=1e-15)
    np.testing.assert_allclose(rm, [1.0, 12.0], rtol=1e-15)
    np.testing.assert_allclose(rv, [2.0, 8.0], rtol=1e-15)


def test_batch_norm_default_momentum_is_0_1(rng):
    x = random_array(rng, (6, 3), np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    fastnorm.batch_norm(x, running_mean=rm, running_var=rv)
    new_rm, new_rv = ref.batch_norm_running_update(x, np.zeros(3), np.ones(3), momentum=0.1)
    assert_close(rm, new_rm, 1e-12)
    assert_close(rv, new_rv, 1e-12)


def test_batch_norm_repeated_training_steps(rng):
    rm, rv = np.zeros(4), np.ones(4)
    erm, erv = rm.copy(), rv.copy()
    for _ in range(5):
        x = random_array(rng, (8, 4), np.float64)
        fastnorm.batch_norm(x, running_mean=rm, running_var=rv, momentum=0.3)
        erm, erv = ref.batch_norm_running_update(x, erm, erv, momentum=0.3)
    assert_close(rm, erm, 1e-12)
    assert_close(rv, erv, 1e-12)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("stat_dtype", [np.float64, np.float32], ids=dtype_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (np.int32,), ids=dtype_id)
@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_batch_norm_eval_uses_running_stats(axis, dtype, stat_dtype, with_mask, rng):
    shape = (5, 4, 6)
    x = random_array(rng, shape, dtype)
    c = shape[axis]
    rm = rng.standard_normal(c).astype(stat_dtype)
    rv = (0.5 + rng.random(c)).astype(stat_dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    mask = make_mask(rng, mask_shape("batch_norm", shape, axis), "fully_padded") if with_mask else None
    w, b = params_for(rng, "batch_norm", shape, axis, dtype)

    y, mean, rstd = call_stats("batch_norm", x, w, b, axis=axis, running_mean=rm, running_var=rv,
                               training=False, mask=mask)
    want = ref.batch_norm(x, w, b, axis=axis, running_mean=rm0, running_var=rv0, training=False, mask=mask)
    stats_tol = 1e-6 if stat_dtype == np.float32 or np.dtype(dtype).itemsize < 8 else 1e-12
    y_tol = max(tol_for(dtype), 1e-6 if stat_dtype == np.float32 else 0)
    compare("batch_norm", (y, mean, rstd), want, dtype, y_tol=y_tol, stats_tol=stats_tol,
            check_stats_dtype=False)
    # eval: (y, running_mean, 1/sqrt(running_var + eps))
    assert_close(mean, rm0, stats_tol)
    assert_close(rstd, 1 / np.sqrt(rv0.astype(np.float64) + 1e-5), stats_tol)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


def test_batch_norm_training_without_running_stats(rng):
    x = random_array(rng, (7, 3), np.float32)
    check("batch_norm", x, axis=-1)


def test_batch_norm_masked_count_for_unbiased_var():
    """With a mask, n counts the real elements only: values 1 and 3 real -> unbiased var 2."""
    x = np.array([[1.0], [100.0], [3.0], [-50.0]])
    mask = np.array([True, False, True, False])
    rm, rv = np.zeros(1), np.zeros(1)
    y, mean, rstd = fastnorm.batch_norm(x, running_mean=rm, running_var=rv, momentum=1.0, eps=0.0,
                                        mask=mask, return_stats=True)
    np.testing.assert_allclose(mean, [2.0])
    np.testing.assert_allclose(rstd, [1.0])
    np.testing.assert_allclose(y[:, 0], [-1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(rm, [2.0])
    np.testing.assert_allclose(rv, [2.0])


# --------------------------------------------------------------------------- inputs are never modified

@pytest.mark.parametrize("layout", ["C", "sliced", "negative", "byteswapped", "misaligned"])
@pytest.mark.parametrize(
    "case",
    BASIC + [("batch_norm", -1, {"training": False}), ("batch_norm", 1, {"training": False})],
    ids=lambda c: case_id(c) + ("-eval" if c[2].get("training") is False else ""),
)
def test_inputs_not_modified(case, layout, rng):
    name, axis, extra = case
    extra = dict(extra)
    shape = (4, 6, 6)
    x = ref.make_layout(random_array(rng, shape, np.float32), layout)
    w, b = params_for(rng, name, shape, axis, np.float32)
    w, b = ref.make_layout(w, layout), ref.make_layout(b, layout)
    mask = ref.make_layout(make_mask(rng, mask_shape(name, shape, axis), "some_padding"), layout)
    if name == "batch_norm" and extra.get("training") is False:
        c = feature_shape(name, shape, axis)[0]
        stat_layout = layout if layout in ("C", "sliced", "negative") else "C"
        extra["running_mean"] = ref.make_layout(rng.standard_normal(c), stat_layout)
        extra["running_var"] = ref.make_layout(0.5 + rng.random(c), stat_layout)
    inputs = {"x": x, "weight": w, "bias": b, "mask": mask, **{k: v for k, v in extra.items() if k.startswith("running")}}
    before = {k: (v.copy(), v.tobytes(), v.strides) for k, v in inputs.items()}

    got = call_stats(name, x, w, b, axis=axis, mask=mask, **extra)
    want = reference(name, before["x"][0], w, b, axis=axis, mask=mask, **extra)
    compare(name, got, want, np.float32, check_stats_dtype=extra.get("training", True))
    for k, v in inputs.items():
        np.testing.assert_array_equal(v, before[k][0], err_msg=f"{k} was modified")
        assert v.tobytes() == before[k][1], f"{k} was modified"
        assert v.strides == before[k][2]


# --------------------------------------------------------------------------- reduction lengths around vector/unroll widths

SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 257, 1023, 1025]


def size_cases(name, n):
    """(shape, axis, extra) triples whose reduced / feature extents are n."""
    if name in ("layer_norm", "rms_norm"):
        return [((3, n), -1, {}), ((n, 3), 0, {}), ((2, n, 2), (0, 1), {})]
    if name == "batch_norm":
        return [((n + 1, 3), -1, {}), ((3, n), -1, {}), ((2, n, 3), 1, {}), ((2, 3, n), 1, {})]
    if name == "instance_norm":
        return [((2, 3, n), 1, {}), ((2, n, 3), -1, {}), ((2, n, 3), 1, {})]
    return [((2, 2 * n, 3), 1, {"num_groups": 2}), ((2, 3, n), 1, {"num_groups": 3}),
            ((2, 4 * n), -1, {"num_groups": 4})]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", FUNCS)
def test_reduction_lengths(name, n, dtype, rng):
    for shape, axis, extra in size_cases(name, n):
        for layout in ("C", "F", "sliced"):
            x = random_array(rng, shape, dtype)
            w, b = params_for(rng, name, shape, axis, dtype)
            check(name, ref.make_layout(x, layout), w, b, axis=axis, **extra)


MANY_ROWS_CASES = [
    ("layer_norm", -1, (5000, 40), {}),
    ("layer_norm", 0, (40, 5000), {}),
    ("rms_norm", -1, (5000, 40), {}),
    ("batch_norm", -1, (40, 5000), {}),
    ("batch_norm", 1, (16, 300, 7, 5), {}),
    ("instance_norm", 1, (64, 16, 100), {}),
    ("instance_norm", -1, (64, 100, 16), {}),
    ("group_norm", 1, (64, 32, 7, 7), {"num_groups": 8}),
    ("group_norm", -1, (64, 49, 32), {"num_groups": 8}),
]


@pytest.mark.parametrize("layout", ["C", "F", "negative"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name,axis,shape,extra", MANY_ROWS_CASES)
def test_many_groups(name, axis, shape, extra, dtype, layout, rng):
    x = random_array(rng, shape, dtype)
    w, b = params_for(rng, name, shape, axis, dtype)
    check(name, ref.make_layout(x, layout), w, b, axis=axis, **extra)


# --------------------------------------------------------------------------- extreme magnitudes

@pytest.mark.parametrize(
    "dtype,scale",
    [(np.float16, 3e4), (np.float16, 1e-3), (np.float32, 1e20), (np.float32, 1e-20),
     (np.float64, 1e150), (np.float64, 1e-150)],
    ids=lambda v: str(v) if not isinstance(v, type) else np.dtype(v).name,
)
@pytest.mark.parametrize("case", BASIC, ids=case_id)
def test_extreme_magnitudes(case, dtype, scale, rng):
    """Outputs are scale-free: x of magnitude 3e4 in float16 or 1e20 in float32 (whose squares overflow that
    dtype) still normalize correctly. eps is scaled with var so it plays the same (negligible) role."""
    name, axis, extra = case
    base = np.clip(rng.standard_normal(SHAPE) / 2, -2.0, 2.0)    # 2 * 3e4 stays under float16's 65504
    x = (base * scale).astype(dtype)
    eps = 1e-5 * float(scale) ** 2 if float(scale) ** 2 < np.finfo(np.float64).max else 0.0
    eps = eps if eps > 1e-300 else 0.0
    got = call_stats(name, x, axis=axis, eps=eps, **extra)
    want = reference(name, x, axis=axis, eps=eps, **extra)
    assert_close(got[0], want[0], tol_for(dtype), err_msg="y")
    assert np.all(np.isfinite(got[0]))


# --------------------------------------------------------------------------- weight/bias of another dtype

@pytest.mark.parametrize(
    "x_dtype,p_dtype",
    [(np.float32, np.float64), (np.float64, np.float32), (np.float16, np.float32), (np.float32, np.float16),
     (np.float64, np.int64), (np.int32, np.float32)],
    ids=lambda v: np.dtype(v).name,
)
@pytest.mark.parametrize("case", BASIC, ids=case_id)
def test_weight_bias_of_another_dtype(case, x_dtype, p_dtype, rng):
    """weight/bias dtype does not change the result dtype (that of x)."""
    name, axis, extra = case
    x = random_array(rng, SHAPE, x_dtype)
    fshape = feature_shape(name, SHAPE, axis)
    w = rng.integers(1, 4, fshape).astype(p_dtype)
    b = rng.integers(-3, 4, fshape).astype(p_dtype)
    check(name, x, w, b, axis=axis, **extra)


# --------------------------------------------------------------------------- running stats as views are updated in place

@pytest.mark.parametrize("layout", ["sliced", "negative", "misaligned"])
def test_batch_norm_running_stats_views_updated_in_place(layout, rng):
    x = random_array(rng, (8, 5), np.float64)
    rm0, rv0 = rng.standard_normal(5), 0.5 + rng.random(5)
    rm, rv = ref.make_layout(rm0, layout), ref.make_layout(rv0, layout)
    fastnorm.batch_norm(x, running_mean=rm, running_var=rv, momentum=0.25)
    new_rm, new_rv = ref.batch_norm_running_update(x, rm0, rv0, momentum=0.25)
    assert_close(rm, new_rm, 1e-12)
    assert_close(rv, new_rv, 1e-12)
    if layout == "sliced":
        big = rm.base
        gaps = np.ones(big.shape, dtype=bool)
        gaps[1::2] = False
        assert np.all(np.isnan(big[gaps])), "wrote outside the running_mean view"


# --------------------------------------------------------------------------- out overlapping x (not identical)

@pytest.mark.parametrize("flip", ["all", "first", "last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
@pytest.mark.parametrize("case", BASIC, ids=case_id)
def test_out_overlapping_x(case, dtype, flip, rng):
    """out is x's memory seen through a flipped view: the result must be as if x were read first."""
    name, axis, extra = case
    x = random_array(rng, SHAPE, dtype)
    w, b = params_for(rng, name, SHAPE, axis, dtype)
    x_values = x.copy()
    out = {"all": np.flip(x), "first": np.flip(x, 0), "last": np.flip(x, -1)}[flip]
    assert np.shares_memory(out, x)
    got = call_stats(name, x, w, b, axis=axis, out=out, **extra)
    assert got[0] is out
    compare(name, got, reference(name, x_values, w, b, axis=axis, **extra), dtype)


# ---- batch norm of float32 planes, a block of channels at a time --------------------------------
# batch_norm of float32 (N, C, ...) along axis=1, no mask, training, takes its statistics and output
# a block of channels at a time (src/batch_norm.c, channel_normalize_planes_f32). It must give the
# bits of the two-pass route (channel_moments with one thread, then channel_combine), whatever the
# thread count, in place too; with an all-True mask the call takes the two-pass route itself.

def _two_pass_planes(x, w, b, eps=1e-5):
    from fastnorm import _checks, _core
    O, C = x.shape[0], x.shape[1]
    xv = np.ascontiguousarray(x).reshape(O, C, -1)
    count, mean, var = np.empty(C), np.empty(C), np.empty(C)
    _core.channel_moments(count, mean, var, xv, None, 1)
    rstd = _checks.rstd_from_var(var, eps)
    scale = rstd if w is None else rstd * np.asarray(w, np.float64)
    shift = np.zeros(C) if b is None else np.asarray(b, np.float64)
    y = np.empty_like(xv)
    _core.channel_combine(y, xv, mean, scale, None, None, shift, None, 1)
    return y.reshape(x.shape), mean, var


@pytest.mark.parametrize("shape", [(32, 8, 16, 16), (3, 5, 7, 11), (1, 3, 2, 1), (2, 130, 3, 3), (80, 3, 64, 64),
                                   (4, 70, 5)],
                         ids=["8-channels", "odd", "two-per-channel", "130-channels", "channel-over-1MiB", "3d"])
@pytest.mark.parametrize("params", [True, False], ids=["weight-bias", "none"])
def test_batch_norm_planes_in_channel_blocks_have_the_two_pass_bits(shape, params, rng):
    x = (rng.standard_normal(shape) * 3.0 + 40.0).astype(np.float32)
    C = shape[1]
    w = rng.standard_normal(C).astype(np.float32) if params else None
    b = rng.standard_normal(C).astype(np.float32) if params else None
    want, mean64, var64 = _two_pass_planes(x, w, b)
    x0 = x.copy()
    for threads in (1, 2, 3):
        fastnorm.set_num_threads(threads)
        try:
            rm, rv = np.zeros(C), np.ones(C)
            y, mean, rstd = fastnorm.batch_norm(x, w, b, axis=1, running_mean=rm, running_var=rv, momentum=0.5,
                                                return_stats=True)
        finally:
            fastnorm.set_num_threads(fastnorm._threads._from_environment())
        np.testing.assert_array_equal(y, want)
        np.testing.assert_array_equal(mean, mean64.astype(np.float32))
        n = x.size // C
        np.testing.assert_array_equal(rm, 0.5 * mean64)
        np.testing.assert_array_equal(rv, 0.5 * 1.0 + 0.5 * (var64 * n / (n - 1)))
    np.testing.assert_array_equal(x, x0)
    fastnorm.set_num_threads(1)
    try:                                # an all-True mask takes the two-pass route
        masked = fastnorm.batch_norm(x, w, b, axis=1, mask=np.ones(shape[:1] + shape[2:], bool))
    finally:
        fastnorm.set_num_threads(fastnorm._threads._from_environment())
    np.testing.assert_array_equal(masked, want)
    xi = x.copy()
    assert fastnorm.batch_norm(xi, w, b, axis=1, out=xi) is xi
    np.testing.assert_array_equal(xi, want)
    expected = ref.batch_norm(x, w, b, axis=1)[0]
    np.testing.assert_allclose(y, expected, rtol=0, atol=2e-5 * max(1.0, np.abs(expected).max()))


def test_batch_norm_planes_take_the_channel_block_route(rng, monkeypatch):
    """The cases above compare two routes; this one makes sure the first is the block route: with
    the two-pass kernels made to fail, float32 planes without a mask still normalize, and anything
    else (float64, a mask, eval mode, rows) reaches them."""
    from fastnorm import _core

    def refuse(*args):
        raise AssertionError("two-pass kernel called")

    monkeypatch.setattr(_core, "channel_moments", refuse)
    monkeypatch.setattr(_core, "channel_combine", refuse)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    y = fastnorm.batch_norm(x, axis=1)
    np.testing.assert_allclose(y, ref.batch_norm(x, axis=1)[0], rtol=0, atol=1e-5)
    for call in (lambda: fastnorm.batch_norm(x.astype(np.float64), axis=1),
                 lambda: fastnorm.batch_norm(x, axis=1, mask=np.ones((4, 5, 5), bool)),
                 lambda: fastnorm.batch_norm(x, axis=1, training=False, running_mean=np.zeros(3),
                                             running_var=np.ones(3)),
                 lambda: fastnorm.batch_norm(x.reshape(4, 75))):
        with pytest.raises(AssertionError, match="two-pass kernel called"):
            call()


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape", [(6, 768), (5, 1000), (3, 17), (2, 4096), (4, 5)])
@pytest.mark.parametrize("y_offset, w_offset", [(16, 2048), (64, 2048), (512, 2048), (4080, 2048), (0, 2048),
                                                (16, 144), (256, 64)],
                         ids=["y16", "y64", "y512", "y-16", "y0", "w-after-y", "w-before-y"])
def test_rows_walked_either_way_give_the_same_bits(name, shape, y_offset, w_offset, rng):
    """Float32 rows whose output lies a little after x modulo 4 KiB are written from the end
    backward, to keep loads clear of the stores just made (4 KiB aliasing); weight and bias do not
    decide. x starts on a page, y y_offset bytes and weight (and bias) w_offset bytes into one.
    Either way: every element written (out starts as NaN), the bits of the same rows at ordinary
    addresses, the values of the reference."""
    x = at_page_offset(shape, np.float32, 0)
    x[...] = rng.standard_normal(shape) * 2.0 + 3.0
    w = at_page_offset(shape[-1:], np.float32, w_offset)
    w[...] = rng.standard_normal(shape[-1])
    b = at_page_offset(shape[-1:], np.float32, (w_offset + 1024) % 4096) if name == "layer_norm" else None
    if b is not None:
        b[...] = rng.standard_normal(shape[-1])
    fn = getattr(fastnorm, name)
    want = fn(x.copy(), w.copy(), None if b is None else b.copy())
    for through_c_entry in (True, False):
        out = at_page_offset(shape, np.float32, y_offset)
        out[...] = np.nan
        call_fn = fn if through_c_entry else fn.__wrapped__
        assert call_fn(x, w, b, out=out) is out
        np.testing.assert_array_equal(out, want)
    expected = (ref.layer_norm if name == "layer_norm" else ref.rms_norm)(x, w, b)[0]
    np.testing.assert_allclose(want, expected, rtol=0, atol=1e-5 * max(1.0, np.abs(expected).max()))
