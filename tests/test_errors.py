"""Bad inputs raise the right exception type, and the message names the offending argument."""

import re

import numpy as np
import pytest

import fastnorm
from forward_checks import FUNCS, call

X2 = np.arange(24.0).reshape(4, 6) % 7          # (N, C) = (4, 6)
X3 = np.arange(48.0).reshape(2, 4, 6) % 5       # (N, L, C) = (2, 4, 6)


def extra_for(name, num_groups=3):
    return {"num_groups": num_groups} if name == "group_norm" else {}


def word(name):
    """Regex matching `name` as a whole word (so 'x' does not match inside 'max')."""
    return rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])"


def raises(exc, *, names):
    """pytest.raises for exc with a message naming one of `names`."""
    return pytest.raises(exc, match="|".join(word(n) for n in names))


# --------------------------------------------------------------------------- x

BAD_X = {
    "complex128": np.ones((2, 4, 6), dtype=np.complex128),
    "complex64": np.ones((2, 4, 6), dtype=np.complex64),
    "object": np.ones((2, 4, 6), dtype=object),
    "str": np.full((2, 4, 6), "a"),
    "bytes": np.full((2, 4, 6), b"a"),
    "datetime": np.zeros((2, 4, 6), dtype="datetime64[s]"),
}


@pytest.mark.parametrize("kind", list(BAD_X))
@pytest.mark.parametrize("name", FUNCS)
def test_bad_x_dtype_is_type_error(name, kind):
    with raises(TypeError, names=["x"]):
        call(name, BAD_X[kind], **extra_for(name))


@pytest.mark.parametrize("name", FUNCS)
def test_x_as_list_of_strings_is_type_error(name):
    with raises(TypeError, names=["x"]):
        call(name, [[["a", "b"], ["c", "d"]]] * 2, **extra_for(name, 2))


# --------------------------------------------------------------------------- axis

@pytest.mark.parametrize("axis", [3, -4, 100])
@pytest.mark.parametrize("name", FUNCS)
def test_axis_out_of_range_is_axis_error(name, axis):
    with raises(np.exceptions.AxisError, names=["axis"]):
        call(name, X3, axis=axis, **extra_for(name, 1))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("axis", [-1.0, 1.0, "-1"])
def test_non_integer_axis_is_type_error_on_the_fast_path_too(dtype, axis):
    """float32/64 rows along the last axis go straight to C; a float axis equal to -1 must still
    be refused as it is for float16 (found: the fast path took axis=-1.0 for axis=-1)."""
    x = np.ones((2, 3), dtype)
    y, mean, rstd = fastnorm.layer_norm(x, return_stats=True)
    _, rms = fastnorm.rms_norm(x, return_stats=True)
    for call_ in (lambda: fastnorm.layer_norm(x, axis=axis), lambda: fastnorm.rms_norm(x, axis=axis),
                  lambda: fastnorm.layer_norm_backward(x, x, mean, rstd, axis=axis),
                  lambda: fastnorm.rms_norm_backward(x, x, rms, axis=axis)):
        with raises(TypeError, names=["axis"]):
            call_()


@pytest.mark.parametrize("axis", [(0, 3), (-4, -1), (5,)])
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_tuple_axis_out_of_range_is_axis_error(name, axis):
    with raises(np.exceptions.AxisError, names=["axis"]):
        call(name, X3, axis=axis)


@pytest.mark.parametrize("axis", [(1, 1), (0, -3), (2, -1, 0)])
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_repeated_axis_is_value_error(name, axis):
    with raises(ValueError, names=["axis"]):
        call(name, X3, axis=axis)


@pytest.mark.parametrize("axis", [(1,), (1, 2), [2]])
@pytest.mark.parametrize("name", ["batch_norm", "instance_norm", "group_norm"])
def test_tuple_axis_rejected_where_int_only(name, axis):
    with raises(TypeError, names=["axis"]):
        call(name, X3, axis=axis, **extra_for(name, 1))


@pytest.mark.parametrize("axis", [0, -3])
@pytest.mark.parametrize("name", ["instance_norm", "group_norm"])
def test_batch_axis_cannot_be_feature_axis(name, axis):
    with raises(ValueError, names=["axis"]):
        call(name, X3, axis=axis, **extra_for(name, 1))


def test_group_norm_axis_zero_two_dimensional():
    with raises(ValueError, names=["axis"]):
        fastnorm.group_norm(X2, 2, axis=0)


@pytest.mark.parametrize("shape", [(6,), (4, 6)])
def test_instance_norm_needs_three_dimensions(shape):
    with raises(ValueError, names=["x", "ndim", "axis"]):
        fastnorm.instance_norm(np.ones(shape))


def test_group_norm_one_dimensional():
    """1-D x: the only axis is the batch axis."""
    with raises(ValueError, names=["x", "axis", "ndim"]):
        fastnorm.group_norm(np.ones(6), 2)


# --------------------------------------------------------------------------- weight / bias

def shape_text(shape):
    return re.escape(str(tuple(shape)))


WRONG_PARAM_SHAPES = [
    # (name, x, axis, extra, expected shape, wrong shape)
    ("layer_norm", X2, -1, {}, (6,), (5,)),
    ("layer_norm", X2, -1, {}, (6,), (1, 6)),
    ("layer_norm", X2, -1, {}, (6,), ()),
    ("layer_norm", X2, 0, {}, (4,), (6,)),
    ("layer_norm", X3, (-2, -1), {}, (4, 6), (6, 4)),
    ("layer_norm", X3, (-2, -1), {}, (4, 6), (6,)),
    ("layer_norm", X3, (2, 0), {}, (2, 6), (6, 2)),
    ("rms_norm", X2, -1, {}, (6,), (4,)),
    ("rms_norm", X3, (0, 1), {}, (2, 4), (8,)),
    ("batch_norm", X2, -1, {}, (6,), (4,)),
    ("batch_norm", X3, 1, {}, (4,), (6,)),
    ("instance_norm", X3, -1, {}, (6,), (2, 6)),
    ("instance_norm", X3, 1, {}, (4,), (6,)),
    ("group_norm", X3, -1, {"num_groups": 3}, (6,), (3,)),
    ("group_norm", X2, -1, {"num_groups": 2}, (6,), (4, 6)),
]


@pytest.mark.parametrize("which", ["weight", "bias"])
@pytest.mark.parametrize("name,x,axis,extra,good,bad", WRONG_PARAM_SHAPES)
def test_wrong_weight_or_bias_shape(name, x, axis, extra, good, bad, which):
    params = {"weight": np.ones(good), "bias": np.zeros(good)}
    params[which] = np.ones(bad)
    with raises(ValueError, names=[which]) as info:
        call(name, x, params["weight"], params["bias"], axis=axis, **extra)
    msg = str(info.value)
    assert str(tuple(good)) in msg, f"expected shape {good} not named in: {msg}"
    assert str(tuple(bad)) in msg, f"given shape {bad} not named in: {msg}"


# --------------------------------------------------------------------------- mask

WRONG_MASK_SHAPES = [
    ("layer_norm", X3, -1, {}, (2, 4, 6)),       # x's full shape
    ("layer_norm", X3, -1, {}, (4, 2)),
    ("layer_norm", X3, (0, 2), {}, (2, 4)),
    ("rms_norm", X2, -1, {}, (6,)),
    ("batch_norm", X3, -1, {}, (2, 6)),
    ("batch_norm", X2, -1, {}, (6,)),
    ("instance_norm", X3, 1, {}, (2, 4)),
    ("group_norm", X3, -1, {"num_groups": 2}, (2,)),
]


@pytest.mark.parametrize("name,x,axis,extra,bad", WRONG_MASK_SHAPES)
def test_wrong_mask_shape(name, x, axis, extra, bad):
    with raises(ValueError, names=["mask"]):
        call(name, x, axis=axis, mask=np.ones(bad, dtype=bool), **extra)


@pytest.mark.parametrize("mask_dtype", [np.int64, np.uint8, np.float64, np.float32])
@pytest.mark.parametrize("name", FUNCS)
def test_mask_must_be_bool(name, mask_dtype):
    mask = np.ones((2, 4), dtype=mask_dtype)  # right shape for X3 with axis=-1
    with raises(TypeError, names=["mask"]):
        call(name, X3, mask=mask, **extra_for(name))


@pytest.mark.parametrize("name", FUNCS)
def test_mask_as_list_of_ints_is_type_error(name):
    with raises(TypeError, names=["mask"]):
        call(name, X3, mask=[[1, 1, 0, 1], [1, 1, 1, 0]], **extra_for(name))


# --------------------------------------------------------------------------- out

@pytest.mark.parametrize("name", FUNCS)
def test_out_wrong_shape(name):
    for bad in [(2, 4, 5), (2, 24), (48,), (1, 2, 4, 6)]:
        with raises(ValueError, names=["out"]):
            call(name, X3, out=np.empty(bad), **extra_for(name))


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize(
    "x_dtype,out_dtype",
    [(np.float64, np.float32), (np.float32, np.float64), (np.float16, np.float32),
     (np.int32, np.float32), (np.int64, np.int64), (np.float64, np.int64)],
)
def test_out_wrong_dtype(name, x_dtype, out_dtype):
    x = X3.astype(x_dtype)
    with raises(ValueError, names=["out"]):
        call(name, x, out=np.empty(x.shape, dtype=out_dtype), **extra_for(name))


@pytest.mark.parametrize("name", FUNCS)
def test_out_in_place_on_integer_x_is_wrong_dtype(name):
    x = X3.astype(np.int64)
    with raises(ValueError, names=["out"]):
        call(name, x, out=x, **extra_for(name))


@pytest.mark.parametrize("name", FUNCS)
def test_out_read_only(name):
    out = np.empty(X3.shape)
    out.flags.writeable = False
    with raises(ValueError, names=["out"]):
        call(name, X3, out=out, **extra_for(name))


@pytest.mark.parametrize("name", FUNCS)
def test_out_read_only_in_place(name):
    x = X3.copy()
    x.flags.writeable = False
    with raises(ValueError, names=["out"]):
        call(name, x, out=x, **extra_for(name))
    np.testing.assert_array_equal(x, X3)


@pytest.mark.parametrize("name", FUNCS)
def test_out_not_an_ndarray(name):
    with raises(TypeError, names=["out"]):
        call(name, X3, out=np.empty(X3.shape).tolist(), **extra_for(name))


# --------------------------------------------------------------------------- batch norm running stats, momentum

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stat_wrong_shape(which, training):
    stats = {"running_mean": np.zeros(6), "running_var": np.ones(6)}
    for bad in [(4,), (1, 6), (6, 1), ()]:
        stats[which] = np.ones(bad)
        with raises(ValueError, names=[which]):
            fastnorm.batch_norm(X2, training=training, **stats)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stat_read_only_in_training(which):
    stats = {"running_mean": np.zeros(6), "running_var": np.ones(6)}
    stats[which].flags.writeable = False
    other = "running_var" if which == "running_mean" else "running_mean"
    before = stats[other].copy()
    with raises(ValueError, names=[which]):
        fastnorm.batch_norm(X2, **stats)
    np.testing.assert_array_equal(stats[other], before)   # nothing half-updated


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stat_not_float(which):
    stats = {"running_mean": np.zeros(6), "running_var": np.ones(6)}
    stats[which] = np.ones(6, dtype=np.int64)
    with raises((TypeError, ValueError), names=[which]):
        fastnorm.batch_norm(X2, **stats)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_only_one_running_stat(given, training):
    with raises(ValueError, names=["running_mean", "running_var"]):
        fastnorm.batch_norm(X2, training=training, **{given: np.ones(6)})


def test_eval_without_running_stats():
    with raises(ValueError, names=["running_mean"]):
        fastnorm.batch_norm(X2, training=False)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, np.nan, np.inf])
def test_momentum_out_of_range(momentum):
    rm, rv = np.zeros(6), np.ones(6)
    with raises(ValueError, names=["momentum"]):
        fastnorm.batch_norm(X2, running_mean=rm, running_var=rv, momentum=momentum)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


@pytest.mark.parametrize(
    "x,axis,mask",
    [
        (np.ones((1, 6)), -1, None),
        (np.ones((1, 1, 6)), -1, None),
        (np.ones((6,)), 0, None),
        (np.ones((3, 1)), 0, None),
        (X2, -1, np.array([True, False, False, False])),
        (X2, -1, np.zeros(4, dtype=bool)),
    ],
    ids=["1x6", "1x1x6", "1-D", "3x1-axis0", "mask-one-real", "mask-none-real"],
)
def test_batch_norm_training_needs_two_values_per_feature(x, axis, mask):
    with raises(ValueError, names=["x", "mask", "value", "values"]):
        fastnorm.batch_norm(x, axis=axis, mask=mask)


def test_batch_norm_training_error_leaves_running_stats_untouched():
    rm, rv = np.zeros(6), np.ones(6)
    with pytest.raises(ValueError):
        fastnorm.batch_norm(np.ones((1, 6)), running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_bad_weight_leaves_running_stats_untouched():
    rm, rv = np.zeros(6), np.ones(6)
    with raises(ValueError, names=["weight"]):
        fastnorm.batch_norm(X2, np.ones(5), running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


# --------------------------------------------------------------------------- eps, num_groups

@pytest.mark.parametrize("eps", [-1e-5, -1.0, np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", FUNCS)
def test_bad_eps(name, eps):
    with raises(ValueError, names=["eps"]):
        call(name, X3, eps=eps, **extra_for(name))


@pytest.mark.parametrize("eps", ["1e-5", 1e-5j])
@pytest.mark.parametrize("name", FUNCS)
def test_eps_not_a_real_number(name, eps):
    with raises((TypeError, ValueError), names=["eps"]):
        call(name, X3, eps=eps, **extra_for(name))


@pytest.mark.parametrize("num_groups", [4, 5, 12, 0, -2, -3])
def test_num_groups_must_divide_channels(num_groups):
    with raises(ValueError, names=["num_groups"]):
        fastnorm.group_norm(X3, num_groups)          # C = 6


def test_num_groups_must_divide_channels_axis1():
    with raises(ValueError, names=["num_groups"]):
        fastnorm.group_norm(X3, 3, axis=1)           # C = 4


# --------------------------------------------------------------------------- zero-length reductions

ZERO_REDUCTIONS = [
    ("layer_norm", (4, 0), -1, {}),
    ("layer_norm", (0, 0), -1, {}),
    ("layer_norm", (2, 0, 3), (1, 2), {}),
    ("layer_norm", (0, 3), 0, {}),
    ("rms_norm", (4, 0), -1, {}),
    ("rms_norm", (0,), 0, {}),
    ("instance_norm", (2, 3, 0), 1, {}),
    ("instance_norm", (2, 0, 3), -1, {}),
    ("instance_norm", (0, 3, 0), 1, {}),             # output empty anyway
    ("group_norm", (2, 4, 0), 1, {"num_groups": 2}),
    ("group_norm", (0, 4, 0), 1, {"num_groups": 2}),
]


@pytest.mark.parametrize("name,shape,axis,extra", ZERO_REDUCTIONS)
def test_zero_length_reduction(name, shape, axis, extra):
    with raises(ValueError, names=["x"]):
        call(name, np.zeros(shape), axis=axis, **extra)


def test_group_norm_zero_channels():
    """C = 0: each group would have no element."""
    with raises(ValueError, names=["x", "num_groups"]):
        fastnorm.group_norm(np.zeros((2, 0)), 1)


# --------------------------------------------------------------------------- mask_from_lengths

@pytest.mark.parametrize("lengths,max_len", [([3, -1, 2], None), ([3, -1, 2], 5), (np.array([-2]), None)])
def test_mask_from_lengths_negative(lengths, max_len):
    with raises(ValueError, names=["lengths"]):
        fastnorm.mask_from_lengths(lengths, max_len)


@pytest.mark.parametrize("lengths,max_len", [([3, 6, 2], 5), ([1], 0)])
def test_mask_from_lengths_longer_than_max_len(lengths, max_len):
    with raises(ValueError, names=["lengths", "max_len"]):
        fastnorm.mask_from_lengths(lengths, max_len)


def test_mask_from_lengths_negative_max_len():
    with raises(ValueError, names=["max_len", "lengths"]):
        fastnorm.mask_from_lengths([0, 0], -1)


# --------------------------------------------------------------------------- 0-d x

@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "batch_norm"])
def test_zero_dimensional_x_has_no_feature_axis(name):
    with raises(np.exceptions.AxisError, names=["axis"]):
        call(name, np.float64(3.0))


@pytest.mark.parametrize("name", ["instance_norm", "group_norm"])
def test_zero_dimensional_x_too_few_dimensions(name):
    """Too few dimensions for a batch axis: ValueError (AxisError is one too) naming x or axis."""
    with raises(ValueError, names=["x", "axis"]):
        call(name, np.float64(3.0), **extra_for(name, 1))


@pytest.mark.parametrize("lengths", [np.array([2**63], np.uint64), np.array([2**64 - 1], np.uint64)])
def test_mask_from_lengths_beyond_int64(lengths):
    with pytest.raises(ValueError, match=r"mask_from_lengths: lengths must be at most 9223372036854775807.*"
                                         + str(int(lengths[0]))):
        fastnorm.mask_from_lengths(lengths)


@pytest.mark.parametrize("max_len, error", [(3.5, TypeError), (4.0, TypeError), ("4", TypeError), (True, TypeError),
                                            (np.float64(4), TypeError), (2**63, ValueError)])
def test_mask_from_lengths_max_len_must_be_an_int(max_len, error):
    with raises(error, names=["max_len"]):
        fastnorm.mask_from_lengths([1, 3], max_len)


@pytest.mark.parametrize("max_len", [np.int64(4), np.uint8(4), 4])
def test_mask_from_lengths_takes_numpy_ints(max_len):
    expected = np.array([[True, False, False, False], [True, True, True, False]])
    np.testing.assert_array_equal(fastnorm.mask_from_lengths(np.array([1, 3], np.uint64), max_len), expected)


# --------------------------------------------------------------------------- axis beyond int64

@pytest.mark.parametrize("axis", [2**63, -2**63 - 1, 2**200, (0, 2**63)])
@pytest.mark.parametrize("name", FUNCS)
def test_axis_beyond_int64_is_axis_error(name, axis):
    if isinstance(axis, tuple) and name not in ("layer_norm", "rms_norm"):
        return
    with raises(np.exceptions.AxisError, names=["axis"]):
        call(name, X3, axis=axis, **extra_for(name, 1))


@pytest.mark.parametrize("fn", [fastnorm.standardize, fastnorm.min_max_scale, fastnorm.weight_norm])
def test_axis_beyond_int64_is_axis_error_data(fn):
    args = (X2, np.ones(4)) if fn is fastnorm.weight_norm else (X2,)
    with raises(np.exceptions.AxisError, names=["axis"]):
        fn(*args, axis=2**63)


# --------------------------------------------------------------------------- out as np.matrix

@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")    # np.matrix itself
@pytest.mark.parametrize("name", ("layer_norm", "rms_norm", "batch_norm", "group_norm", "layer_norm_backward",
                                  "batch_norm_backward", "standardize", "min_max_scale"))
def test_out_matrix_is_refused_by_name(name):
    """np.matrix is always 2-d (instance norm needs x.ndim >= 3, so it never fits there)."""
    out = np.asmatrix(np.zeros_like(X2))
    if name.endswith("_backward"):
        f = getattr(fastnorm, name)
        stats = (np.zeros(4), np.ones(4)) if name.startswith("layer") else (np.zeros(6), np.ones(6))
        call_it = lambda: f(X2, X2, *stats, out=out)  # noqa: E731
    elif name in ("standardize", "min_max_scale"):
        call_it = lambda: getattr(fastnorm, name)(X2, out=out)  # noqa: E731
    else:
        call_it = lambda: call(name, X2, out=out, **extra_for(name))  # noqa: E731
    with pytest.raises(TypeError, match=r"out is a numpy.matrix.*np.asarray\(out\)"):
        call_it()
    assert not out.any()


# --------------------------------------------------------------------------- numpy.ma for every argument

def _masked(a):
    """a as a numpy.ma array whose mask hides its first element."""
    m = np.zeros(np.shape(a), bool)
    m.flat[0] = True
    return np.ma.array(a, mask=m)


_X = np.arange(24.0).reshape(4, 6) % 5
_X3 = np.arange(48.0).reshape(2, 4, 6) % 7
_W = np.linspace(0.5, 1.5, 6)
_ROWS = np.ones(4, bool)

# every public function with every array argument it takes: (call, arguments of a valid call)
MA_CALLS = {
    "layer_norm": (lambda a: fastnorm.layer_norm(a["x"], a["weight"], a["bias"], mask=a["mask"], out=a["out"]),
                   dict(x=_X, weight=_W, bias=_W, mask=_ROWS, out=np.empty_like(_X))),
    "rms_norm": (lambda a: fastnorm.rms_norm(a["x"], a["weight"], a["bias"], mask=a["mask"], out=a["out"]),
                 dict(x=_X, weight=_W, bias=_W, mask=_ROWS, out=np.empty_like(_X))),
    "batch_norm": (lambda a: fastnorm.batch_norm(a["x"], a["weight"], a["bias"], mask=a["mask"], out=a["out"],
                                                 running_mean=a["running_mean"], running_var=a["running_var"]),
                   dict(x=_X, weight=_W, bias=_W, mask=_ROWS, out=np.empty_like(_X), running_mean=np.zeros(6),
                        running_var=np.ones(6))),
    "instance_norm": (lambda a: fastnorm.instance_norm(a["x"], a["weight"], a["bias"], mask=a["mask"],
                                                       out=a["out"]),
                      dict(x=_X3, weight=_W, bias=_W, mask=np.ones((2, 4), bool), out=np.empty_like(_X3))),
    "group_norm": (lambda a: fastnorm.group_norm(a["x"], 3, a["weight"], a["bias"], mask=a["mask"], out=a["out"]),
                   dict(x=_X, weight=_W, bias=_W, mask=_ROWS, out=np.empty_like(_X))),
    "layer_norm_backward": (lambda a: fastnorm.layer_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"], a["weight"],
                                                                   mask=a["mask"], out=a["out"]),
                            dict(dy=_X, x=_X, mean=np.zeros(4), rstd=np.ones(4), weight=_W, mask=_ROWS,
                                 out=np.empty_like(_X))),
    "rms_norm_backward": (lambda a: fastnorm.rms_norm_backward(a["dy"], a["x"], a["rstd"], a["weight"],
                                                               mask=a["mask"], out=a["out"]),
                          dict(dy=_X, x=_X, rstd=np.ones(4), weight=_W, mask=_ROWS, out=np.empty_like(_X))),
    "batch_norm_backward": (lambda a: fastnorm.batch_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"], a["weight"],
                                                                   mask=a["mask"], out=a["out"]),
                            dict(dy=_X, x=_X, mean=np.zeros(6), rstd=np.ones(6), weight=_W, mask=_ROWS,
                                 out=np.empty_like(_X))),
    "instance_norm_backward": (lambda a: fastnorm.instance_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"],
                                                                         a["weight"], mask=a["mask"], out=a["out"]),
                               dict(dy=_X3, x=_X3, mean=np.zeros((2, 6)), rstd=np.ones((2, 6)), weight=_W,
                                    mask=np.ones((2, 4), bool), out=np.empty_like(_X3))),
    "group_norm_backward": (lambda a: fastnorm.group_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"], 3,
                                                                   a["weight"], mask=a["mask"], out=a["out"]),
                            dict(dy=_X, x=_X, mean=np.zeros((4, 3)), rstd=np.ones((4, 3)), weight=_W, mask=_ROWS,
                                 out=np.empty_like(_X))),
    "standardize": (lambda a: fastnorm.standardize(a["x"], out=a["out"]), dict(x=_X, out=np.empty_like(_X))),
    "min_max_scale": (lambda a: fastnorm.min_max_scale(a["x"], out=a["out"]), dict(x=_X, out=np.empty_like(_X))),
    "weight_norm": (lambda a: fastnorm.weight_norm(a["v"], a["g"]), dict(v=_X, g=np.ones(4))),
    "weight_norm_backward": (lambda a: fastnorm.weight_norm_backward(a["dw"], a["v"], a["g"]),
                             dict(dw=_X, v=_X, g=np.ones(4))),
    "mask_from_lengths": (lambda a: fastnorm.mask_from_lengths(a["lengths"]), dict(lengths=np.array([1, 3]))),
}


@pytest.mark.parametrize("name, arg", [(n, a) for n, (_, args) in MA_CALLS.items() for a in args])
def test_masked_array_refused_for_every_argument(name, arg):
    f, args = MA_CALLS[name]
    f({k: v.copy() for k, v in args.items()})           # the valid call works
    bad = {k: v.copy() for k, v in args.items()}
    bad[arg] = _masked(bad[arg])
    with pytest.raises(TypeError, match=rf"{name}: {arg} is a numpy.ma.MaskedArray, whose mask would be ignored"):
        f(bad)


@pytest.mark.parametrize("layer, x", [(lambda: fastnorm.LayerNorm(6), _X), (lambda: fastnorm.BatchNorm(6), _X),
                                      (lambda: fastnorm.GroupNorm(3, 6), _X)])
def test_layers_refuse_masked_x_mask_and_dy(layer, x):
    with pytest.raises(TypeError, match="x is a numpy.ma.MaskedArray"):
        layer()(_masked(x))
    with pytest.raises(TypeError, match="mask is a numpy.ma.MaskedArray"):
        layer()(x, mask=_masked(_ROWS))
    ln = layer()
    ln(x)
    with pytest.raises(TypeError, match="dy is a numpy.ma.MaskedArray"):
        ln.backward(_masked(x))
