"""Finite float32 (and float16) results at extreme scales (docs/robustness.md, "Finite results").

The rule: a result is finite whenever the float64 reference is finite and representable in the
output's dtype. The float paths compute ``(x - mean) * (rstd * weight) + bias`` with the
coefficient rounded to float; for groups where it (or ``x - mean``) could leave float's range
(tiny spreads with eps=0, huge weights, values near the largest float of opposite signs), the
kernels compute in double. Compared with the float64 references of tests/reference.py,
relative to each result's scale.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastnorm
import grad_reference as gref
import reference as ref
from forward_checks import call, reference

# (name, x shape, call keywords): rows short and long (float runs), planes, masked groups
CASES = [
    ("layer_norm", (3, 8), {}),
    ("layer_norm", (2, 1024), {}),
    ("layer_norm", (3, 2, 8), {"axis": -1, "mask": np.array([[True, False]] * 3)}),
    ("rms_norm", (3, 8), {}),
    ("rms_norm", (2, 1024), {}),
    ("instance_norm", (2, 3, 600), {"axis": 1}),
    ("instance_norm", (2, 5, 3), {"axis": -1}),
    ("group_norm", (2, 4, 6), {"axis": 1, "num_groups": 2}),
    ("batch_norm", (6, 5), {}),
    ("batch_norm", (2, 3, 4, 4), {"axis": 1}),
    ("batch_norm", (6, 5), {"mask": np.array([True, True, False, True, True, True])}),
]

# (spread of x, scale of weight, mean offset, eps): each float64 result lies within float32's range
SCALES = [
    (1e-20, 1e20, 0.0, 0.0),        # rstd 1e20: rstd * weight overflows float
    (1e-40, 1.0, 0.0, 0.0),         # subnormal x: rstd 1e40 overflows float
    (1e-40, 1e-30, 0.0, 0.0),
    (1e30, 1e-30, 0.0, 1e-5),       # rstd * weight 1e-60 underflows float
    (1e38, 1.0, 0.0, 1e-5),         # x - mean beyond float's largest value
    (1e36, 1.0, 2e38, 1e-5),
    (1.0, 1.0, 0.0, 1e-5),          # ordinary data, for the same comparison
]


def _data(shape, spread, offset, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(shape)
    z /= np.abs(z).max()                        # |x - offset| <= spread: stays in float32's range
    return (offset + spread * z).astype(np.float32)


def _feature_shape(name, shape, kw):
    if name in ("layer_norm", "rms_norm"):
        return shape[-1:]
    return (shape[kw.get("axis", -1)],)


@pytest.mark.parametrize("spread, wscale, offset, eps", SCALES)
@pytest.mark.parametrize("name, shape, kw", CASES)
def test_float32_results_are_finite_where_float64_ones_are(name, shape, kw, spread, wscale, offset, eps):
    x = _data(shape, spread, offset, seed=len(shape) + shape[-1])
    if x.astype(np.float64).std() == 0.0:
        pytest.skip("the spread rounds away in float32")
    rng = np.random.default_rng(7)
    w = (wscale * rng.uniform(0.5, 1.5, _feature_shape(name, shape, kw))).astype(np.float32)
    b = rng.uniform(-1, 1, w.shape).astype(np.float32)
    kw = dict(kw, eps=eps)
    y = call(name, x, w, b, **kw)
    expected = reference(name, x, w, b, **kw)[0]
    assert np.isfinite(expected).all() and np.abs(expected).max() < np.finfo(np.float32).max
    assert np.isfinite(y).all(), f"{name}: non-finite float32 result where float64 gives {expected}"
    scale = np.abs(expected).max()
    np.testing.assert_allclose(y / scale, expected / scale, atol=2e-5, rtol=0)


@pytest.mark.parametrize("spread, wscale", [(1e-20, 1e-10), (1e-40, 1e-5), (1e38, 1e30)])
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "instance_norm", "batch_norm"])
def test_float32_gradients_are_finite_where_float64_ones_are(name, spread, wscale):
    """The backward functions, given float64 statistics (as the layers keep them)."""
    shape, kw = ((3, 2, 8), {"axis": -1}) if name != "instance_norm" else ((2, 3, 8), {"axis": 1})
    x = _data(shape, spread, 0.0, seed=3)
    w = (wscale * np.random.default_rng(8).uniform(0.5, 1.5, shape[kw["axis"]])).astype(np.float32)
    dy = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    eps = 0.0 if spread < 1 else 1e-5
    x64 = x.astype(np.float64)
    _, mean, rstd = reference(name, x64, eps=eps, **kw)
    args = (dy, x, rstd) if name == "rms_norm" else (dy, x, mean, rstd)
    dx = getattr(fastnorm, f"{name}_backward")(*args, w, **kw)[0]
    expected = gref.analytic_grads(name, dy.astype(np.float64), x64, w.astype(np.float64), eps=eps, **kw)[0]
    assert np.isfinite(expected).all() and np.abs(expected).max() < np.finfo(np.float32).max
    assert np.isfinite(dx).all()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(dx / scale, expected / scale, atol=1e-4, rtol=0)


@pytest.mark.parametrize("spread, offset", [(1e-40, 0.0), (1e38, 0.0), (1e36, 2e38), (1e-20, 0.0)])
def test_standardize_float32_is_finite_where_float64_is(spread, offset):
    x = _data((7, 3), spread, offset, seed=5)
    y = fastnorm.standardize(x, axis=1)
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(0)) * ref.inv_sqrt(x64.var(0))
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, expected, atol=2e-5 * np.abs(expected).max(), rtol=0)


def test_the_issue_reproducer():
    y = fastnorm.layer_norm(np.array([[1e-20, -1e-20]], np.float32), np.array([1e20, 1e20], np.float32), eps=0.0)
    np.testing.assert_allclose(y, [[1e20, -1e20]], rtol=1e-6)
