"""fastnorm on dask arrays: the same numbers as the NumPy call on the computed array, lazily,
with any chunking, on the threaded scheduler and on a distributed LocalCluster."""
import contextlib
import pickle

import numpy as np
import pytest

import fastnorm

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")


@pytest.fixture
def rng():
    return np.random.default_rng(1616)


@contextlib.contextmanager
def no_compute():
    """Any compute inside fails: the calls must only build graphs."""
    def refuse(*args, **kwargs):
        raise AssertionError("computed at call time")
    with dask.config.set(scheduler=refuse):
        yield


def close(got, want, dtype):
    assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
    scale = max(1.0, float(np.nanmax(np.abs(want)))) if want.size else 1.0
    tol = {np.float64: 1e-12, np.float32: 1e-6, np.float16: 2e-3}[np.dtype(dtype).type]
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


# (x shape, chunkings, feature axis for the per-feature calls)
CHUNKINGS = [(13, 7, 5), (60, 7, 5), (7, 3, 2), (60, 2, 5), (1, 7, 1)]


def calls(C, rng):
    """name -> (function of (x, mask) for x of shape (60, 7, 5), mask shape or None)."""
    w7, b7, w5 = rng.standard_normal(7), rng.standard_normal(7), rng.standard_normal(5)
    return {
        "layer_norm": (lambda x, m: fastnorm.layer_norm(x, w5, None, mask=m), (60, 7)),
        "layer_norm_2axes": (lambda x, m: fastnorm.layer_norm(x, axis=(1, 2), eps=0.0), None),
        "rms_norm": (lambda x, m: fastnorm.rms_norm(x, None, w5, mask=m), (60, 7)),
        "instance_norm": (lambda x, m: fastnorm.instance_norm(x, w7, b7, axis=1, mask=m), (60, 5)),
        "group_norm": (lambda x, m: fastnorm.group_norm(x, 7, w7, b7, axis=1, mask=m), (60, 5)),
        "weight_norm": (lambda x, m: fastnorm.weight_norm(x, w7, axis=1), None),
        "batch_norm": (lambda x, m: fastnorm.batch_norm(x, w7, b7, axis=1, mask=m), (60, 5)),
        "batch_norm_eval": (lambda x, m: fastnorm.batch_norm(x, w5, None, training=False, running_mean=b7[:5],
                                                             running_var=w7[:5] ** 2, mask=m), (60, 7)),
        "standardize": (lambda x, m: fastnorm.standardize(x), None),
        "standardize_axis1": (lambda x, m: fastnorm.standardize(x, axis=1, eps=1e-3), None),
        "min_max_scale": (lambda x, m: fastnorm.min_max_scale(x, feature_range=(-1, 2)), None),
    }


CASES = [(name, masked) for name, (_, mask_shape) in calls(0, np.random.default_rng(0)).items()
         for masked in ((False, True) if mask_shape else (False,))]


@pytest.mark.parametrize("name, masked", CASES)
@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dask_equals_numpy(rng, name, masked, chunks, dtype):
    f, mask_shape = calls(0, rng)[name]
    x = (rng.standard_normal((60, 7, 5)) * 3 + 4).astype(dtype)
    mask = rng.random(mask_shape) > 0.3 if masked else None
    X = da.from_array(x, chunks=chunks)
    M = None if mask is None else da.from_array(mask, chunks=tuple(c if c < n else -1 for c, n in
                                                                     zip((11, 4), mask_shape)))
    with no_compute():
        Y = f(X, M)
    assert isinstance(Y, da.Array) and Y.dtype == dtype
    close(Y.compute(scheduler="threads"), f(x, mask), dtype)
    if masked:                     # a NumPy mask with a dask x works too
        close(f(X, mask).compute(), f(x, mask), dtype)


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_moments_of_dask(rng, chunks):
    x = rng.standard_normal((60, 7, 5)) * 1e-3 + 1e6
    mask = rng.random((60, 5)) > 0.5
    X = da.from_array(x, chunks=chunks)
    for axis, m in ((1, None), (1, mask), (-1, None)):
        got, want = fastnorm.moments(X, axis=axis, mask=m), fastnorm.moments(x, axis=axis, mask=m)
        assert isinstance(got, fastnorm.Moments)
        np.testing.assert_array_equal(got.count, want.count)
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-15)
        np.testing.assert_allclose(got.var(), want.var(), rtol=np.finfo(float).eps * 1e9)
        np.testing.assert_array_equal(got.min, want.min)
        np.testing.assert_array_equal(got.max, want.max)
    stream = fastnorm.Moments(5)
    stream.update(X[:30]).update(x[30:])
    np.testing.assert_allclose(stream.var(), x.reshape(-1, 5).var(axis=0), rtol=1e-8)


def test_stats_from_dask_and_to_dask(rng):
    train = da.from_array(rng.standard_normal((500, 4)) * 3 + 1, chunks=(64, 2))
    test = rng.standard_normal((40, 4))
    stats = fastnorm.moments(train)
    Y = fastnorm.standardize(da.from_array(test, chunks=(16, 3)), stats=stats)
    close(Y.compute(), fastnorm.standardize(test, stats=stats), np.float64)
    Y = fastnorm.min_max_scale(da.from_array(test * 5, chunks=(16, 3)), stats=stats)
    close(Y.compute(), fastnorm.min_max_scale(test * 5, stats=stats), np.float64)
    bn = fastnorm.BatchNorm(4)
    bn.calibrate([train, (train[:100], np.ones(100, bool))])
    whole = np.concatenate([train.compute(), train[:100].compute()])
    np.testing.assert_allclose(bn.running_var, whole.var(axis=0, ddof=1), rtol=1e-12)


def test_batch_norm_running_stats_and_return_stats(rng):
    x = rng.standard_normal((50, 6)) + 2
    X = da.from_array(x, chunks=(9, 4))
    rm, rv, rm2, rv2 = np.zeros(6), np.ones(6), np.zeros(6), np.ones(6)
    Y, mean, rstd = fastnorm.batch_norm(X, running_mean=rm, running_var=rv, return_stats=True)
    y, mean2, rstd2 = fastnorm.batch_norm(x, running_mean=rm2, running_var=rv2, return_stats=True)
    for got, want in ((mean, mean2), (rstd, rstd2), (rm, rm2), (rv, rv2)):
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, want, rtol=1e-13)
    close(Y.compute(), y, np.float64)
    Y, mean, rstd = fastnorm.layer_norm(X.astype(np.float32), return_stats=True)
    y, mean2, rstd2 = fastnorm.layer_norm(x.astype(np.float32), return_stats=True)
    assert mean.dtype == np.float32 and isinstance(rstd, np.ndarray)
    np.testing.assert_array_equal(mean, mean2)
    np.testing.assert_array_equal(rstd, rstd2)
    Y, rstd = fastnorm.rms_norm(X, return_stats=True)
    np.testing.assert_array_equal(rstd, fastnorm.rms_norm(x, return_stats=True)[1])
    Y, mean, rstd = fastnorm.group_norm(X, 3, return_stats=True)
    np.testing.assert_array_equal(mean, fastnorm.group_norm(x, 3, return_stats=True)[1])


def test_errors_at_the_call(rng):
    X = da.from_array(rng.standard_normal((10, 4)), chunks=5)
    with pytest.raises(TypeError, match="out= cannot be used with a dask array"):
        fastnorm.standardize(X, out=np.empty((10, 4)))
    with pytest.raises(TypeError, match="out="):
        fastnorm.layer_norm(X, out=np.empty((10, 4)))
    with pytest.raises(ValueError, match="weight has shape"):
        fastnorm.layer_norm(X, np.ones(3))
    with pytest.raises(ValueError, match="mask has shape"):
        fastnorm.batch_norm(X, mask=da.ones(4, dtype=bool))
    with pytest.raises(TypeError, match="mask must be a boolean"):
        fastnorm.layer_norm(X, mask=da.ones(10))
    with pytest.raises(ValueError, match="num_groups=3 does not divide"):
        fastnorm.group_norm(X, 3)
    with pytest.raises(TypeError, match="must hold real numbers"):
        fastnorm.standardize(X.astype(complex))
    with pytest.raises(ValueError, match="stats has 3 features"):
        fastnorm.standardize(X, stats=fastnorm.Moments(3))
    with pytest.raises(ValueError, match="training needs more than one value"):   # at compute: stats are lazy
        fastnorm.batch_norm(da.from_array(np.ones((1, 4)))).compute()


def test_block_functions_pickle(rng):
    x = rng.standard_normal((20, 3))
    X = da.from_array(x, chunks=(7, 2))
    for Y in (fastnorm.standardize(X), fastnorm.layer_norm(X), fastnorm.batch_norm(X, mask=np.ones(20, bool))):
        back = pickle.loads(pickle.dumps(Y))          # graphs (and their block functions) travel to workers
        np.testing.assert_array_equal(back.compute(), Y.compute())


def test_distributed_local_cluster(rng):
    """The same numbers on worker processes (loopback), and Moments travel between them."""
    distributed = pytest.importorskip("distributed")
    x = rng.standard_normal((400, 6)).astype(np.float32) * 5 + 3
    mask = rng.random(400) > 0.2
    X = da.from_array(x, chunks=(50, 3))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, worker_dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        close(fastnorm.standardize(X).compute(), fastnorm.standardize(x), np.float32)
        close(fastnorm.batch_norm(X, mask=mask).compute(), fastnorm.batch_norm(x, mask=mask), np.float32)
        close(fastnorm.layer_norm(X).compute(), fastnorm.layer_norm(x), np.float32)
        got = fastnorm.moments(X)
        np.testing.assert_allclose(got.var(), fastnorm.moments(x).var(), rtol=1e-12)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        _, mean, rstd = fastnorm.batch_norm(x, mask=mask, return_stats=True)
        grads = fastnorm.batch_norm_backward(da.from_array(dy, chunks=(30, 2)), X, mean, rstd, mask=mask)
        for g, want in zip(dask.compute(*grads), fastnorm.batch_norm_backward(dy, x, mean, rstd, mask=mask)):
            close(g, want, np.float32)
        parts = client.gather(client.map(fastnorm.moments, np.array_split(x, 4)))   # Moments pickled back
        np.testing.assert_allclose(fastnorm.Moments.merge(*parts).mean, got.mean, rtol=1e-14)


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gradients_of_dask(rng, chunks, dtype):
    x = (rng.standard_normal((60, 7, 5)) * 2 + 1).astype(dtype)
    dy = rng.standard_normal((60, 7, 5)).astype(dtype)
    X, DY = da.from_array(x, chunks=chunks), da.from_array(dy, chunks=chunks)
    mask = rng.random((60, 7)) > 0.3
    w7, w5 = rng.standard_normal(7), rng.standard_normal(5)
    cases = {
        "layer_norm": lambda d, v: fastnorm.layer_norm_backward(
            d, v, *fastnorm.layer_norm(x, mask=mask, return_stats=True)[1:], w5, mask=mask),
        "rms_norm": lambda d, v: fastnorm.rms_norm_backward(d, v, fastnorm.rms_norm(x, return_stats=True)[1], w5),
        "instance_norm": lambda d, v: fastnorm.instance_norm_backward(
            d, v, *fastnorm.instance_norm(x, axis=1, return_stats=True)[1:], w7, axis=1),
        "group_norm": lambda d, v: fastnorm.group_norm_backward(
            d, v, *fastnorm.group_norm(x, 5, return_stats=True)[1:], 5),
        "batch_norm_eval": lambda d, v: fastnorm.batch_norm_backward(
            d, v, *fastnorm.batch_norm(x, axis=1, return_stats=True)[1:], w7, axis=1, training=False),
        "batch_norm": lambda d, v: fastnorm.batch_norm_backward(
            d, v, *fastnorm.batch_norm(x, return_stats=True)[1:], w5),
    }
    for name, f in cases.items():
        with no_compute():
            got = f(DY, X)
        for g, want in zip(got, f(dy, x)):
            assert isinstance(g, da.Array), name
            close(g.compute(), want, dtype)


# chunkings of a (60, 7, 5) array: batch axis split or whole, feature axis (1 or -1) split or whole
BN_CHUNKINGS = [(13, 7, 5), (7, 3, 2), (60, 2, 5), (60, 7, 5), (1, 7, 1), (25, 4, 3)]


@pytest.mark.parametrize("chunks", BN_CHUNKINGS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("axis", [1, -1])
def test_batch_norm_backward_training(rng, chunks, dtype, axis):
    """dx needs sums over the whole batch: one reduction of the blocks' sums, then dx per block.
    Against the in-memory call, with NumPy and dask masks, and against a float64 NumPy reference."""
    x = (rng.standard_normal((60, 7, 5)) * 2 + 3).astype(dtype)
    dy = rng.standard_normal((60, 7, 5)).astype(dtype)
    ax = axis % 3
    mask_shape = tuple(n for a, n in enumerate(x.shape) if a != ax)
    mask = rng.random(mask_shape) > 0.3
    C = x.shape[ax]
    weight = rng.standard_normal(C)
    X, DY = da.from_array(x, chunks=chunks), da.from_array(dy, chunks=chunks)
    M = da.from_array(mask, chunks=tuple(max(1, n // 3) for n in mask_shape))   # not x's chunks
    for m, dask_m, w in ((None, None, weight), (mask, M, None), (mask, mask, weight)):
        _, mean, rstd = fastnorm.batch_norm(x, axis=axis, mask=m, return_stats=True)
        with no_compute():
            got = fastnorm.batch_norm_backward(DY, X, mean, rstd, w, axis=axis, mask=dask_m)
        want = fastnorm.batch_norm_backward(dy, x, mean, rstd, w, axis=axis, mask=m)
        for g, v in zip(got, want):
            assert isinstance(g, da.Array) and g.dtype == dtype
            close(g.compute(scheduler="threads"), v, dtype)
    # the formula itself, in float64 (mask and weight as in the last case)
    xm = np.moveaxis(x.astype(np.float64), ax, -1)[mask]          # (n, C): the real rows
    gm = np.moveaxis(dy.astype(np.float64), ax, -1)[mask]
    xhat = (xm - xm.mean(0)) / np.sqrt(xm.var(0) + 1e-5)
    wr = weight / np.sqrt(xm.var(0) + 1e-5)
    dx = wr * (gm - gm.mean(0) - xhat * (gm * xhat).mean(0))
    got_dx = np.moveaxis(got[0].compute().astype(np.float64), ax, -1)
    tol = {np.float64: 1e-10, np.float32: 1e-4, np.float16: 5e-2}[dtype]
    np.testing.assert_allclose(got_dx[mask], dx, rtol=0, atol=tol * max(1.0, np.abs(dx).max()))
    assert not got_dx[~mask].any()                                 # padding gets dx = 0
    np.testing.assert_allclose(got[1].compute(), (gm * xhat).sum(0), rtol=0, atol=tol * 60 * 7)
    np.testing.assert_allclose(got[2].compute(), gm.sum(0), rtol=0, atol=tol * 60 * 7)


def test_batch_norm_backward_dask_awkward(rng):
    """A NumPy x with a dask dy, integer x, Fortran-ordered and strided blocks, an empty batch,
    a mask with no real element, NaN in one feature; and the errors at the call."""
    x = np.asfortranarray(rng.standard_normal((40, 6)) * 1e-3 + 1e4)[:, ::-1]
    dy = rng.standard_normal((40, 6))
    _, mean, rstd = fastnorm.batch_norm(x, return_stats=True)
    DY = da.from_array(dy, chunks=(9, 4))
    for got, want in ((fastnorm.batch_norm_backward(DY, x, mean, rstd),
                       fastnorm.batch_norm_backward(dy, x, mean, rstd)),
                      (fastnorm.batch_norm_backward(DY, da.from_array(x, chunks=(7, 6)), mean, rstd),
                       fastnorm.batch_norm_backward(dy, x, mean, rstd))):
        for g, v in zip(got, want):
            close(g.compute(), v, np.float64)
    xi = rng.integers(-5, 5, (30, 3))
    _, mean, rstd = fastnorm.batch_norm(xi, return_stats=True)
    got = fastnorm.batch_norm_backward(da.from_array(dy[:30, :3], chunks=7), da.from_array(xi, chunks=7), mean, rstd)
    for g, v in zip(got, fastnorm.batch_norm_backward(dy[:30, :3], xi, mean, rstd)):
        close(g.compute(), v, np.float64)
    empty = np.zeros((0, 3))
    got = fastnorm.batch_norm_backward(da.from_array(empty), da.from_array(empty), np.zeros(3), np.ones(3))
    for g, v in zip(got, fastnorm.batch_norm_backward(empty, empty, np.zeros(3), np.ones(3))):
        close(g.compute(), v, np.float64)
    none_real = np.zeros(40, bool)
    got = fastnorm.batch_norm_backward(DY, x, mean[:1].repeat(6), rstd[:1].repeat(6), mask=none_real)
    for g, v in zip(got, fastnorm.batch_norm_backward(dy, x, mean[:1].repeat(6), rstd[:1].repeat(6),
                                                      mask=none_real)):
        close(g.compute(), v, np.float64)
    xn = x.copy()
    xn[3, 2] = np.nan
    _, mean, rstd = fastnorm.batch_norm(xn, return_stats=True)
    got = fastnorm.batch_norm_backward(DY, da.from_array(xn, chunks=(9, 4)), mean, rstd)
    for g, v in zip(got, fastnorm.batch_norm_backward(dy, xn, mean, rstd)):
        close(g.compute(), v, np.float64)
    with pytest.raises(TypeError, match="out= cannot be used with a dask array"):
        fastnorm.batch_norm_backward(DY, x, mean, rstd, out=np.empty((40, 6)))
    with pytest.raises(ValueError, match="dy has shape"):
        fastnorm.batch_norm_backward(DY[:20], x, mean, rstd)
    with pytest.raises(ValueError, match="rstd has shape"):
        fastnorm.batch_norm_backward(DY, x, mean, rstd[:5])
    with pytest.raises(ValueError, match="mask has shape"):
        fastnorm.batch_norm_backward(DY, x, mean, rstd, mask=np.ones(6, bool))
    with pytest.raises(TypeError, match="training"):
        fastnorm.batch_norm_backward(DY, x, mean, rstd, training="yes")
