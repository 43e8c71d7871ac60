"""Hypothesis property tests: random shapes (size 1 included), axes, dtypes, masks and strided views
(steps 1, 2, 3, -1, -2) against the float64 reference."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastnorm
import reference as ref
from forward_checks import call_stats, compare, mask_shape, param_dtype, random_array, reference

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = [np.float16, np.float32, np.float64, np.int16, np.int64, np.uint8, np.bool_]
LAYOUTS = ["strided", "strided", "C", "F", "transposed", "byteswapped", "misaligned"]


@st.composite
def arrays(draw, min_ndim=1, max_ndim=4, max_side=5):
    """(x, rng): x a view with random steps into a bigger random array, or a copy in another layout."""
    ndim = draw(st.integers(min_ndim, max_ndim))
    shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=ndim, max_size=ndim)))
    steps = tuple(draw(st.lists(st.sampled_from([1, 2, 3, -1, -2]), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    base = random_array(rng, tuple(s * abs(k) for s, k in zip(shape, steps)), dtype)
    x = base[tuple(slice(None, None, k) for k in steps)]
    assert x.shape == shape
    if layout != "strided":
        x = ref.make_layout(x, layout)
    return x, rng


def maybe_negative(draw, axis, ndim):
    return axis - ndim if draw(st.booleans()) else axis


def affine_and_mask(draw, rng, name, x, axis, fshape):
    w = (0.5 + rng.random(fshape)).astype(param_dtype(x.dtype)) if draw(st.booleans()) else None
    b = rng.standard_normal(fshape).astype(param_dtype(x.dtype)) if draw(st.booleans()) else None
    mask = rng.random(mask_shape(name, x.shape, axis)) < 0.7 if draw(st.booleans()) else None
    return w, b, mask


EPS = st.sampled_from([1e-5, 1e-5, 1e-2, 0.0])


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
@SETTINGS
@given(data=st.data())
def test_layer_and_rms_norm(name, data):
    draw = data.draw
    x, rng = draw(arrays())
    axes = draw(st.lists(st.integers(0, x.ndim - 1), min_size=1, max_size=x.ndim, unique=True))
    axes = tuple(maybe_negative(draw, a, x.ndim) for a in axes)
    axis = axes[0] if len(axes) == 1 and draw(st.booleans()) else axes
    fshape = tuple(x.shape[a] for a in sorted(a % x.ndim for a in axes))
    w, b, mask = affine_and_mask(draw, rng, name, x, axis, fshape)
    eps = draw(EPS)

    got = call_stats(name, x, w, b, axis=axis, eps=eps, mask=mask)
    compare(name, got, reference(name, x, w, b, axis=axis, eps=eps, mask=mask), x.dtype)


@SETTINGS
@given(data=st.data())
def test_batch_norm(data):
    draw = data.draw
    x, rng = draw(arrays())
    ax = draw(st.integers(0, x.ndim - 1))
    axis = maybe_negative(draw, ax, x.ndim)
    c = x.shape[ax]
    w, b, mask = affine_and_mask(draw, rng, "batch_norm", x, axis, (c,))
    eps = draw(EPS)
    training = draw(st.booleans())
    momentum = draw(st.sampled_from([0.1, 0.0, 1.0, 0.37]))
    stat_dtype = draw(st.sampled_from([np.float64, np.float32]))
    rm = rng.standard_normal(c).astype(stat_dtype)
    rv = (0.5 + rng.random(c)).astype(stat_dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    with_running = (not training) or draw(st.booleans())
    kw = dict(running_mean=rm, running_var=rv) if with_running else {}

    n_real = (x.size // c) if mask is None else int(mask.sum())
    if training and n_real < 2:
        with pytest.raises(ValueError):
            call_stats("batch_norm", x, w, b, axis=axis, eps=eps, mask=mask, training=True,
                       momentum=momentum, **kw)
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)
        return

    got = call_stats("batch_norm", x, w, b, axis=axis, eps=eps, mask=mask, training=training,
                     momentum=momentum, **kw)
    want = ref.batch_norm(x, w, b, axis=axis, eps=eps, mask=mask, training=training,
                          running_mean=rm0, running_var=rv0)
    loose = stat_dtype == np.float32 and not training
    compare("batch_norm", got, want, x.dtype,
            y_tol=1e-5 if loose and np.dtype(x.dtype).itemsize != 2 else None,
            stats_tol=1e-6 if loose else None, check_stats_dtype=training)
    if training and with_running:
        new_rm, new_rv = ref.batch_norm_running_update(x, rm0, rv0, axis=axis, momentum=momentum, mask=mask)
        tol = 1e-3 if x.dtype == np.float16 else (1e-6 if stat_dtype == np.float32 else 1e-10)
        np.testing.assert_allclose(rm, new_rm, rtol=tol, atol=tol * max(1, np.abs(new_rm).max()))
        np.testing.assert_allclose(rv, new_rv, rtol=tol, atol=tol * max(1, np.abs(new_rv).max()))
    else:
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)


@SETTINGS
@given(data=st.data())
def test_instance_norm(data):
    draw = data.draw
    x, rng = draw(arrays(min_ndim=3))
    ax = draw(st.integers(1, x.ndim - 1))
    axis = maybe_negative(draw, ax, x.ndim)
    w, b, mask = affine_and_mask(draw, rng, "instance_norm", x, axis, (x.shape[ax],))
    eps = draw(EPS)
    got = call_stats("instance_norm", x, w, b, axis=axis, eps=eps, mask=mask)
    compare("instance_norm", got, reference("instance_norm", x, w, b, axis=axis, eps=eps, mask=mask), x.dtype)


@SETTINGS
@given(data=st.data())
def test_group_norm(data):
    draw = data.draw
    x, rng = draw(arrays(min_ndim=2, max_side=6))
    ax = draw(st.integers(1, x.ndim - 1))
    axis = maybe_negative(draw, ax, x.ndim)
    c = x.shape[ax]
    g = draw(st.sampled_from([d for d in range(1, c + 1) if c % d == 0]))
    w, b, mask = affine_and_mask(draw, rng, "group_norm", x, axis, (c,))
    eps = draw(EPS)
    got = call_stats("group_norm", x, w, b, axis=axis, eps=eps, mask=mask, num_groups=g)
    want = reference("group_norm", x, w, b, axis=axis, eps=eps, mask=mask, num_groups=g)
    compare("group_norm", got, want, x.dtype)


@SETTINGS
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=8),
    extra=st.one_of(st.none(), st.integers(0, 5)),
)
def test_mask_from_lengths(lengths, extra):
    max_len = None if extra is None else max(lengths) + extra
    got = fastnorm.mask_from_lengths(lengths, max_len) if max_len is not None else fastnorm.mask_from_lengths(lengths)
    n_cols = max(lengths) if max_len is None else max_len
    expected = np.arange(n_cols)[None, :] < np.asarray(lengths)[:, None]
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, expected)
