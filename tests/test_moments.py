"""fastnorm.moments / Moments, stats= on the data scalers, and BatchNorm.calibrate.

References are NumPy in float64 (two-pass, over the shifted data where the offset is large) and
scikit-learn's scalers; merges are checked over every split point and random groupings.
"""
import pickle
import subprocess
import sys

import numpy as np
import pytest

import fastnorm


@pytest.fixture
def rng():
    return np.random.default_rng(16)


def ref_moments(x, axis=-1, mask=None):
    """count, mean, m2, min, max per feature of float64(x), real elements only."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    C = x.shape[-1]
    flat = x.reshape(-1, C)
    if mask is not None:
        flat = flat[np.asarray(mask).reshape(-1)]
    n = flat.shape[0]
    if n == 0:
        nan = np.full(C, np.nan)
        return np.zeros(C), nan, np.zeros(C), nan, nan
    rows = np.ascontiguousarray(flat.T)          # sums along contiguous rows: NumPy's pairwise summation
    mean = rows.mean(axis=1)
    mean = mean + (rows - mean[:, None]).mean(axis=1)
    m2 = ((rows - mean[:, None]) ** 2).sum(axis=1)
    return np.full(C, float(n)), mean, m2, rows.min(axis=1), rows.max(axis=1)


def assert_moments(m, ref, rtol=1e-12, m2_rtol=None):
    count, mean, m2, lo, hi = ref
    np.testing.assert_array_equal(m.count, count)
    scale = np.maximum(np.abs(mean), 1.0)
    np.testing.assert_allclose(m.mean, mean, rtol=0, atol=0) if rtol == 0 else \
        np.testing.assert_allclose(m.mean / scale, mean / scale, rtol=0, atol=rtol)
    np.testing.assert_allclose(m.m2, m2, rtol=m2_rtol or rtol, atol=1e-300)
    np.testing.assert_array_equal(m.min, lo)
    np.testing.assert_array_equal(m.max, hi)


EPS = np.finfo(np.float64).eps
DTYPES = [np.float16, np.float32, np.float64, np.int32, np.bool_]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((50, 7), -1), ((50, 7), 0), ((6, 5, 4, 3), 1), ((4, 9, 6), -1),
                                         ((1, 3), -1), ((200_000, 3), -1), ((7,), 0)])
def test_moments_match_numpy(rng, dtype, shape, axis):
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype) if dtype != np.bool_ else rng.random(shape) > 0.5
    m = fastnorm.moments(x, axis=axis)
    assert all(getattr(m, f).dtype == np.float64 for f in ("count", "mean", "m2", "min", "max"))
    assert_moments(m, ref_moments(x, axis), rtol=1e-12)


@pytest.mark.parametrize("layout", ["fortran", "strided", "reversed", "transposed"])
def test_moments_any_layout(rng, layout):
    base = rng.standard_normal((40, 12)) + 5
    x = {"fortran": np.asfortranarray(base), "strided": base[::2, ::3], "reversed": base[::-1, ::-1],
         "transposed": base.T}[layout]
    assert_moments(fastnorm.moments(x), ref_moments(x))
    assert_moments(fastnorm.moments(x.astype(np.float32)), ref_moments(x.astype(np.float32)), rtol=1e-12)


@pytest.mark.parametrize("shape, axis", [((30, 6), -1), ((5, 4, 8), -1), ((5, 3, 4, 4), 1)])
def test_moments_mask(rng, shape, axis):
    x = rng.standard_normal(shape) + 10
    mshape = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    mask = rng.random(mshape) > 0.4
    ref = ref_moments(x, axis, np.moveaxis(np.broadcast_to(np.expand_dims(mask, axis), shape), axis, -1)[..., 0])
    assert_moments(fastnorm.moments(x, axis=axis, mask=mask), ref)
    # masked-out padding, whatever its value, changes nothing
    x2 = np.where(np.expand_dims(mask, axis), x, 1e30)
    assert_moments(fastnorm.moments(x2, axis=axis, mask=mask), ref)


def test_moments_empty_and_all_masked():
    m = fastnorm.moments(np.empty((0, 3)))
    np.testing.assert_array_equal(m.count, np.zeros(3))
    assert np.isnan(m.mean).all() and np.isnan(m.min).all() and np.isnan(m.max).all() and np.isnan(m.var()).all()
    m = fastnorm.moments(np.ones((4, 2)), mask=np.zeros(4, bool))
    np.testing.assert_array_equal(m.count, [0.0, 0.0])
    assert np.isnan(m.mean).all()
    assert fastnorm.moments(np.empty((5, 0))).num_features == 0


def test_moments_nan_and_inf_stay_in_their_feature():
    x = np.array([[1.0, 2.0, 1.0], [np.nan, 4.0, np.inf], [3.0, 6.0, -np.inf]])
    m = fastnorm.moments(x)
    with np.errstate(invalid="ignore"):
        for field, numpy_fn in (("mean", np.mean), ("min", np.min), ("max", np.max)):
            np.testing.assert_array_equal(getattr(m, field)[:2], numpy_fn(x[:, :2], axis=0))
    np.testing.assert_array_equal([m.min[2], m.max[2]], [-np.inf, np.inf])
    assert np.isnan(m.m2[0]) and m.m2[1] == 8.0


@pytest.mark.parametrize("shape, axis", [((2000, 3), -1), ((5, 3, 40), 1)])
@pytest.mark.parametrize("where", [0, 1, -1])
def test_moments_nan_anywhere(rng, shape, axis, where):
    x = rng.standard_normal(shape).astype(np.float32)
    col = np.moveaxis(x, axis, -1)[..., 1].reshape(-1)          # a view: feature 1's values
    col_index = np.unravel_index(np.arange(col.size)[where], np.moveaxis(x, axis, -1).shape[:-1])
    np.moveaxis(x, axis, -1)[col_index + (1,)] = np.nan
    m = fastnorm.moments(x, axis=axis)
    assert np.isnan([m.mean[1], m.m2[1], m.min[1], m.max[1]]).all()
    ref = ref_moments(np.delete(x, 1, axis=axis), axis)
    assert_moments(fastnorm.moments(np.delete(x, 1, axis=axis), axis=axis), ref)
    np.testing.assert_array_equal(m.min[[0, 2]], ref[3])


def test_moments_far_first_row_and_constant_features():
    # an outlier in the first row (the sums' shift) is summed again around the mean
    x = np.vstack([[1e8], 1e-3 * np.arange(1000.0)[:, None]])
    assert_moments(fastnorm.moments(x), ref_moments(x), rtol=1e-15, m2_rtol=1e-12)
    c = np.full((100, 2), 0.1)
    m = fastnorm.moments(c)
    assert (m.m2 == 0).all() and (m.mean == 0.1).all() and (m.var() == 0).all()


def test_moments_threads_agree(rng):
    x = rng.standard_normal((300_000, 4)).astype(np.float32) + 100
    before = fastnorm.get_num_threads()
    try:
        fastnorm.set_num_threads(1)
        one = fastnorm.moments(x)
        fastnorm.set_num_threads(2)
        two = fastnorm.moments(x)
    finally:
        fastnorm.set_num_threads(before)
    assert_moments(two, (one.count, one.mean, one.m2, one.min, one.max), rtol=1e-14, m2_rtol=1e-12)


# ---- merging -------------------------------------------------------------------------------------

def as_tuple(m):
    return m.count, m.mean, m.m2, m.min, m.max


def test_merge_every_split_point(rng):
    x = rng.standard_normal((17, 3)) * [1.0, 5.0, 1e-3] + [0.0, -7.0, 1e6]
    whole = fastnorm.moments(x)
    ref = ref_moments(x - [0.0, 0.0, 1e6])
    for k in range(18):
        merged = fastnorm.moments(x[:k]) + fastnorm.moments(x[k:])
        np.testing.assert_array_equal(merged.count, whole.count)
        np.testing.assert_allclose(merged.mean, whole.mean, rtol=2e-16 * 4)
        np.testing.assert_allclose(merged.m2[:2], ref[2][:2], rtol=1e-13)
        np.testing.assert_allclose(merged.m2[2], ref[2][2], rtol=EPS * 1e6 / 1e-3)   # the contract's bound
        np.testing.assert_array_equal(merged.min, whole.min)
        np.testing.assert_array_equal(merged.max, whole.max)


def random_groupings(parts, rng):
    """Merge Moments in a random order and tree shape."""
    parts = list(parts)
    while len(parts) > 1:
        i, j = sorted(rng.choice(len(parts), 2, replace=False))
        b, a = parts.pop(j), parts.pop(i)
        parts.append(a + b if rng.random() < 0.5 else fastnorm.Moments.merge(b, a))
    return parts[0]


def test_merge_large_offset_is_exact_to_rounding(rng):
    """Mean 1e6, spread 1e-3: x - 1e6 is exact in float64 (Sterbenz), so NumPy on the shifted values is
    an exact-to-rounding reference. Any split into 2..50 parts, merged in a random order and tree shape,
    gives the mean to rounding and the variance within float64's epsilon times mean / std (2.2e-7, the
    rounding of each part's mean, which every merge of stored means inherits; measured: 5e-9), while
    E[x^2] - E[x]^2 loses every digit."""
    x = 1e6 + 1e-3 * rng.standard_normal((4000, 2))
    x[:, 1] = 1e6 + 1e-3 * rng.random(4000)             # a second, uniform feature
    ref_var = np.var(x - 1e6, axis=0)
    ref_mean = 1e6 + np.mean(x - 1e6, axis=0)
    for trial in range(20):
        cuts = np.sort(rng.choice(np.arange(1, 4000), rng.integers(1, 50), replace=False))
        merged = random_groupings([fastnorm.moments(p) for p in np.split(x, cuts)], rng)
        np.testing.assert_allclose(merged.var(), ref_var, rtol=EPS * 1e6 / 1e-3)
        np.testing.assert_allclose(merged.mean, ref_mean, rtol=4e-16)
    naive = np.mean(x * x, axis=0) - np.mean(x, axis=0) ** 2     # what the test guards against
    assert np.all(np.abs(naive / ref_var - 1) > 1e-3)


def test_merge_identities(rng):
    a, b, c = (fastnorm.moments(rng.standard_normal((n, 4)) + 3) for n in (5, 1, 30))
    empty = fastnorm.Moments(4)
    for part in (empty + a, a + empty, fastnorm.Moments.merge(empty, a, empty)):
        for got, want in zip(as_tuple(part), as_tuple(a)):
            np.testing.assert_array_equal(got, want)             # merging with nothing changes nothing
    for got, want in zip(as_tuple((a + b) + c), as_tuple(a + (b + c))):
        np.testing.assert_allclose(got, want, rtol=1e-14)
    for got, want in zip(as_tuple(a + b), as_tuple(b + a)):
        np.testing.assert_allclose(got, want, rtol=1e-15)
    before = [v.copy() for v in as_tuple(a)]
    _ = a + b
    for got, want in zip(as_tuple(a), before):
        np.testing.assert_array_equal(got, want)                 # operands unchanged


def test_merge_keeps_nan_and_skips_empty_features():
    a = fastnorm.moments(np.array([[1.0, np.nan], [2.0, 3.0]]))
    b = fastnorm.moments(np.array([[5.0, 4.0]]))
    m = a + b
    assert np.isnan(m.mean[1]) and np.isnan(m.min[1]) and np.isnan(m.max[1])
    assert m.min[0] == 1.0 and m.max[0] == 5.0
    part = fastnorm.moments(np.array([[7.0, 8.0]]), mask=np.array([False]))    # count 0 everywhere
    for got, want in zip(as_tuple(b + part), as_tuple(b)):
        np.testing.assert_array_equal(got, want)


def test_update_streams_to_the_whole(rng):
    x = rng.standard_normal((3, 101, 5)).astype(np.float32) * 4 + 50
    mask = rng.random((3, 101)) > 0.2
    m = fastnorm.Moments(5)
    for lo in range(0, 101, 13):
        assert m.update(x[:, lo:lo + 13], mask=mask[:, lo:lo + 13]) is m
    assert_moments(m, ref_moments(x, -1, mask), rtol=1e-13, m2_rtol=1e-11)


def test_var_std_ddof():
    m = fastnorm.moments(np.array([[1.0], [2.0], [4.0]]))
    np.testing.assert_allclose(m.var(), [np.var([1, 2, 4])])
    np.testing.assert_allclose(m.var(ddof=1), [np.var([1, 2, 4], ddof=1)])
    np.testing.assert_allclose(m.std(ddof=1), [np.std([1, 2, 4], ddof=1)])
    assert np.isnan(m.var(ddof=3)).all() and np.isnan(fastnorm.moments(np.ones((1, 1))).var(ddof=1)).all()


def test_pickle_and_repr():
    m = fastnorm.moments(np.array([[1.0, 10.0], [3.0, 30.0]]))
    back = pickle.loads(pickle.dumps(m))
    for got, want in zip(as_tuple(back), as_tuple(m)):
        np.testing.assert_array_equal(got, want)
    assert repr(m) == ("Moments(2 features)\n"
                       "  count [2., 2.]\n"
                       "  mean  [ 2., 20.]\n"
                       "  std   [ 1., 10.]\n"
                       "  min   [ 1., 10.]\n"
                       "  max   [ 3., 30.]")
    assert repr(fastnorm.Moments(0)) == "Moments(0 features)"
    assert "..." in repr(fastnorm.moments(np.zeros((2, 100))))         # long rows are summarized


def test_moments_errors():
    with pytest.raises(ValueError, match="num_features"):
        fastnorm.Moments(-1)
    with pytest.raises(ValueError, match="num_features"):
        fastnorm.Moments(2.5)
    with pytest.raises(ValueError, match="3 features do not match 2"):
        fastnorm.Moments(2) + fastnorm.Moments(3)
    with pytest.raises(TypeError, match="expected Moments"):
        fastnorm.Moments.merge(fastnorm.Moments(2), np.zeros(2))
    with pytest.raises(ValueError, match="at least one"):
        fastnorm.Moments.merge()
    with pytest.raises(ValueError, match="this Moments has 2"):
        fastnorm.Moments(2).update(np.ones((3, 4)))
    with pytest.raises(ValueError, match="mask has shape"):
        fastnorm.moments(np.ones((3, 4)), mask=np.ones(4, bool))
    with pytest.raises(TypeError, match="must hold real numbers"):
        fastnorm.moments(np.ones((3, 4), complex))
    with pytest.raises(ValueError, match="0-d"):
        fastnorm.moments(np.float64(3.0))


# ---- stats= on the scalers, against scikit-learn ----------------------------------------------------

def test_standardize_with_stats_matches_standard_scaler(rng):
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    train = rng.standard_normal((200, 6)) * [1, 2, 3, 4, 5, 1e-3] + [0, 1, -1, 10, 1e4, 1e6]
    test = rng.standard_normal((50, 6)) * 7 + [0, 1, -1, 10, 1e4, 1e6]
    scaler = preprocessing.StandardScaler().fit(train)
    stats = fastnorm.moments(train)
    for dtype, tol in ((np.float64, 1e-9), (np.float32, 1e-5)):
        y = fastnorm.standardize(test.astype(dtype), stats=stats)
        assert y.dtype == dtype
        want = scaler.transform(test.astype(dtype).astype(np.float64))
        np.testing.assert_allclose(y, want, rtol=tol, atol=tol * np.abs(want).max())
    np.testing.assert_allclose(fastnorm.standardize(train, stats=stats), fastnorm.standardize(train), atol=1e-12)
    np.testing.assert_allclose(fastnorm.standardize(test, stats=stats, eps=0.5),
                               (test - stats.mean) / np.sqrt(stats.var() + 0.5), rtol=1e-12)
    # streamed statistics of the training set in chunks give the same scaling
    chunked = fastnorm.Moments(6)
    for part in np.array_split(train, 7):
        chunked.update(part)
    # (to rounding: float64's epsilon times mean / std for the last feature, 1e-7 relative)
    np.testing.assert_allclose(fastnorm.standardize(test, stats=chunked), fastnorm.standardize(test, stats=stats),
                               rtol=EPS * 1e9)


def test_min_max_scale_with_stats_matches_min_max_scaler(rng):
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    train = rng.standard_normal((100, 4)) * [1, 10, 0.1, 3]
    train[:, 3] = 2.5                                              # a constant feature
    test = rng.standard_normal((30, 4)) * 20                       # far outside the training range
    for feature_range in ((0, 1), (-2, 3)):
        scaler = preprocessing.MinMaxScaler(feature_range=feature_range).fit(train)
        y = fastnorm.min_max_scale(test, stats=fastnorm.moments(train), feature_range=feature_range)
        np.testing.assert_allclose(y, scaler.transform(test), rtol=1e-12, atol=1e-12)
    assert (y < -2).any() and (y > 3).any()                        # not clipped, as scikit-learn
    y_in = fastnorm.min_max_scale(train, stats=fastnorm.moments(train))
    np.testing.assert_allclose(y_in, fastnorm.min_max_scale(train), atol=1e-15)


def test_stats_other_axes_and_errors(rng):
    x = rng.standard_normal((3, 4, 5))
    stats = fastnorm.moments(x, axis=1)
    want = (x - stats.mean[:, None]) / stats.std()[:, None]
    np.testing.assert_allclose(fastnorm.standardize(x, axis=1, stats=stats), want, rtol=1e-12)
    with pytest.raises(ValueError, match="stats has 4 features; x has 5"):
        fastnorm.standardize(x, stats=stats)
    with pytest.raises(TypeError, match="stats must be a fastnorm.Moments"):
        fastnorm.min_max_scale(x, stats=(0, 1))


# ---- PreciseBN -------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [-1, 1])
def test_calibrate_sets_the_exact_statistics(rng, axis):
    shape = (4, 3, 6) if axis == -1 else (4, 3, 5, 2)
    C = shape[axis]
    batches = [rng.standard_normal(shape) * 2 + 7 for _ in range(5)]
    mshape = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    masks = [rng.random(mshape) > 0.3 for _ in batches]
    bn = fastnorm.BatchNorm(C, axis=axis)
    assert bn.calibrate(zip(batches, masks)) is bn
    real = np.concatenate([np.moveaxis(b, axis, -1)[m] for b, m in zip(batches, masks)])
    np.testing.assert_allclose(bn.running_mean, real.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(bn.running_var, real.var(axis=0, ddof=1), rtol=1e-12)
    bn.calibrate(iter(batches))                                    # plain arrays, a one-shot iterator
    whole = np.moveaxis(np.stack(batches), axis % len(shape) + 1, -1).reshape(-1, C)
    np.testing.assert_allclose(bn.running_var, whole.var(axis=0, ddof=1), rtol=1e-12)
    y = bn.eval()(batches[0])
    np.testing.assert_allclose(np.moveaxis(y, axis, -1),
                               (np.moveaxis(batches[0], axis, -1) - whole.mean(0)) / np.sqrt(whole.var(0, ddof=1)
                                                                                           + bn.eps), rtol=1e-11)


def test_calibrate_errors_leave_the_running_stats():
    bn = fastnorm.BatchNorm(2)
    with pytest.raises(ValueError, match="feature 0"):
        bn.calibrate([np.ones((1, 2))])
    with pytest.raises(ValueError, match="feature 0"):
        bn.calibrate([])
    np.testing.assert_array_equal(bn.running_mean, [0, 0])
    np.testing.assert_array_equal(bn.running_var, [1, 1])
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fastnorm.BatchNorm(2, track_running_stats=False).calibrate([np.ones((3, 2))])


def test_import_does_not_import_dask():
    code = "import sys, numpy, fastnorm; fastnorm.moments(numpy.ones((2, 2))); print(sorted(m for m in sys.modules " \
           "if m.split('.')[0] in ('dask', 'distributed', 'sklearn')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
