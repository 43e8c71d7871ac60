"""The statistics' shifted single pass and its two-pass fallback, against NumPy float64."""
import numpy as np
import pytest

import fastnorm


def _ref_rows(x, eps=1e-5):
    x = x.astype(np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("first", [1e8, -3e6, 1e4 + 50.0])
def test_outlier_first_element_takes_the_two_pass_fallback(dtype, tol, first):
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((4, 4096))).astype(dtype)
    x[:, 0] = first                       # the shift of the single pass lies far from the mean
    y = fastnorm.layer_norm(x, eps=0.0)
    np.testing.assert_allclose(y, _ref_rows(x, 0.0), atol=tol * np.abs(_ref_rows(x, 0.0)).max())
    # batch norm: the same values down the columns, the outlier in the first row of the block
    yb = fastnorm.batch_norm(np.ascontiguousarray(x.T), eps=0.0)
    np.testing.assert_allclose(yb, _ref_rows(x, 0.0).T, atol=tol * np.abs(_ref_rows(x, 0.0)).max())


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5), (np.float16, 1e-2)])
def test_rms_and_layer_norm_of_a_million_elements_with_offset(dtype, tol):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 1_000_000)) + (1e4 if dtype != np.float16 else 100.0)).astype(dtype)
    np.testing.assert_allclose(fastnorm.layer_norm(x), _ref_rows(x), atol=tol * 5)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(fastnorm.rms_norm(x), ref, atol=tol * 2)


def test_constant_rows_give_exactly_the_bias_in_every_dtype():
    for dtype in (np.float16, np.float32, np.float64):
        x = np.full((3, 777), 0.1, dtype=dtype)
        bias = np.linspace(-1, 1, 777).astype(dtype)
        y = fastnorm.layer_norm(x, None, bias, eps=0.0)
        np.testing.assert_array_equal(y, np.broadcast_to(bias, y.shape))
        yb = fastnorm.batch_norm(x.T.copy(), None, bias[:3], eps=0.0)
        np.testing.assert_array_equal(yb, np.broadcast_to(bias[:3], yb.shape))


@pytest.mark.parametrize("n", [7, 100, 768, 4097, 70_000])
@pytest.mark.parametrize("scale", [1e-30, 1e-18, 1.0, 1e18, 1e30])
def test_float32_rms_statistic_in_float_runs_stays_within_a_few_ulps(n, scale):
    """float32 rows sum their squares in float over runs of 8; rows whose squares underflow (scale
    1e-30) or overflow (1e30) take the double path. Either way rstd is within 4 float ulps of
    float64 and y within 3 ulps of its scale."""
    rng = np.random.default_rng(n)
    x = (scale * (rng.standard_normal((3, n)) + 0.5)).astype(np.float32)
    x64 = x.astype(np.float64)
    rstd_ref = 1.0 / np.sqrt((x64 ** 2).mean(-1))
    token = fastnorm._functional.float64_stats.set(True)        # the float64 stats the layers use
    try:
        y, rstd = fastnorm.rms_norm(x, eps=0.0, return_stats=True)
    finally:
        fastnorm._functional.float64_stats.reset(token)
    assert rstd.dtype == np.float64
    np.testing.assert_array_less(np.abs(rstd / rstd_ref - 1), 4 * 2.0 ** -24)
    y_ref = x64 * rstd_ref[:, None]
    assert np.abs(y - y_ref).max() <= 3 * 2.0 ** -24 * np.abs(y_ref).max()


def test_float32_rms_norm_of_nan_and_inf_rows_is_nan():
    x = np.ones((3, 500), np.float32)
    x[0, 17], x[1, 400] = np.nan, np.inf
    y, rstd = fastnorm.rms_norm(x, eps=0.0, return_stats=True)
    assert np.isnan(y[0]).all() and np.isnan(rstd[0])
    assert rstd[1] == 0.0                                      # mean square inf: rstd 1/inf
    np.testing.assert_array_equal(y[2], 1.0)


def _float64_stats_layer_norm(x):
    token = fastnorm._functional.float64_stats.set(True)        # the float64 stats the layers use
    try:
        return fastnorm.layer_norm(x, eps=0.0, return_stats=True)
    finally:
        fastnorm._functional.float64_stats.reset(token)


@pytest.mark.parametrize("n", [5, 64, 100, 768, 4097, 70_000])
@pytest.mark.parametrize("offset, scale", [(0.0, 1.0), (3.0, 1.0), (1e4, 1.0), (1e4, 1e-2), (-5e3, 3e2),
                                           (1e-30, 1e-32), (1e30, 1e28)])
def test_float32_moments_in_float_runs_stay_within_a_few_ulps(n, offset, scale):
    """float32 groups of >= 512 elements take their moments in float runs around the mean of their
    first 64 elements (docs/decisions.md); the double path takes over for a far estimate, a tiny
    variance or an overflow. mean within 2
    float ulps of the std, rstd within 4 ulps, y within 4 ulps of its scale, as in double."""
    rng = np.random.default_rng(n)
    x = (offset + scale * rng.standard_normal((4, n))).astype(np.float32)
    if n >= 768:
        x[3, :64] += 100 * scale                 # the elements the shift is estimated from: k > 1/2
    y, mean, rstd = _float64_stats_layer_norm(x)
    x64 = x.astype(np.float64)
    mu, sd = x64.mean(-1), x64.std(-1)
    assert np.all(np.abs(mean - mu) <= 2 * 2.0 ** -24 * sd)
    assert np.all(np.abs(rstd * sd - 1) <= 4 * 2.0 ** -24)
    y_ref = (x64 - mu[:, None]) / sd[:, None]
    assert np.abs(y - y_ref).max() <= 4 * 2.0 ** -24 * np.abs(y_ref).max()
