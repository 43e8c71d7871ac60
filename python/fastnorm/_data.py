"""Data and weight normalization: z-score, min-max scaling, weight normalization.

``axis`` is the feature axis, as everywhere in fastnorm: one statistic (or norm) per position
along ``axis``, taken over every other axis.

==============================  ==============================  ==================================
call                            x of shape (N, D)               one statistic per
==============================  ==============================  ==================================
``standardize(x)`` (axis=-1)    each column over its N values   feature (column): a data table
``standardize(x, axis=0)``      each row over its D values      row
``weight_norm(v, g, axis=0)``   each row of a (out, in) matrix  output unit (PyTorch's ``dim=0``)
==============================  ==============================  ==================================

``standardize`` and ``min_max_scale`` default to ``axis=-1``, as every normalization function, and
so scale a ``(samples, features)`` table per column as scikit-learn's scalers do. With
``stats=`` (a :class:`fastnorm.Moments`) they take the statistics from it instead of from x.

``standardize`` runs on the batch-norm kernels in C (one pass for the statistics, one for the
output); ``min_max_scale`` and ``weight_norm`` are NumPy, computed in float64.
"""
from __future__ import annotations

import math

import numpy as np

from . import _checks as ck
from . import _core
from ._dispatch import dask_aware
from ._moments import Moments, moments
from ._threads import get_num_threads

__all__ = ["standardize", "min_max_scale", "weight_norm", "weight_norm_backward"]


# ---- shared helpers ------------------------------------------------------------------------------

def _feature_axis(axis, ndim: int, fn: str) -> int:
    if ndim == 0:
        raise ValueError(f"{fn}: x is a 0-d array (a scalar); it needs at least one axis, the feature axis")
    (ax,) = ck.feature_axes(axis, ndim, fn, allow_tuple=False)
    return ax


def _per_feature(values: np.ndarray, ax: int, ndim: int) -> np.ndarray:
    """A (C,) array shaped to broadcast against x along the feature axis ``ax``."""
    shape = [1] * ndim
    shape[ax] = values.shape[0]
    return values.reshape(shape)


def _other_axes(ax: int, ndim: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != ax)


def _finish(y64: np.ndarray, dtype: np.dtype, out) -> np.ndarray:
    """Cast the float64 result to the result dtype, into ``out`` when given."""
    if out is None:
        return y64.astype(dtype)
    np.copyto(out, y64, casting="unsafe")
    return out


# ---- standardize ---------------------------------------------------------------------------------

def _check_stats(stats, C: int, ax: int, fn: str) -> Moments | None:
    if stats is None:
        return None
    if not isinstance(stats, Moments):
        raise TypeError(f"{fn}: stats must be a fastnorm.Moments (from fastnorm.moments); got {type(stats).__name__}")
    if stats.num_features != C:
        raise ValueError(f"{fn}: stats has {stats.num_features} features; x has {C} along the feature axis {ax}")
    return stats


@dask_aware
def standardize(x, axis=-1, *, stats=None, eps=0.0, out=None):
    """Z-score per feature: ``(x - mean) / sqrt(var + eps)``, statistics over every axis but ``axis``.

    ``var`` is the biased variance (divide by the count), as in :func:`fastnorm.batch_norm`,
    which computes the same thing for features with more than one value.

    ====================  ======================================  ==============
    x                     statistics over                         one per
    ====================  ======================================  ==============
    (N, D), axis=-1       each column (its N samples)             feature
    (N, D), axis=0        each row (its D values)                 row
    (N, C, H, W), axis=1  N, H, W of each channel                 channel
    ====================  ======================================  ==============

    Parameters
    ----------
    x : array_like or dask array
        float16/32/64 keep their dtype; integer and bool become float64. Any layout. A dask
        array gives a dask array (statistics by one tree reduction over its chunks).
    axis : int
        The feature axis (default -1: the columns of a ``(samples, features)`` table).
    stats : Moments, optional
        Take mean and variance from these statistics (e.g. of a training set) instead of x:
        ``(x - stats.mean) / sqrt(stats.var() + eps)``. One entry per feature.
    eps : float
        Added to the variance, >= 0 (default 0: the textbook z-score).
    out : ndarray, optional
        Where to write the result (may be x itself).

    Returns
    -------
    ndarray
        Same shape as x. A constant feature (variance 0, e.g. a single value) gives 0; NaN or Inf
        in a feature gives NaN for that feature only; an empty x gives an empty result.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> table = np.array([[1.0, 10.0], [3.0, 10.0]])       # 2 samples, 2 features
    >>> fastnorm.standardize(table)
    array([[-1.,  0.],
           [ 1.,  0.]])
    >>> train = fastnorm.moments(table)                    # scale new data as the training table
    >>> fastnorm.standardize(np.array([[5.0, 10.0]]), stats=train)
    array([[3., 0.]])
    """
    fn = "standardize"
    arr = ck.as_input(x, "x", fn)
    ax = _feature_axis(axis, arr.ndim, fn)
    eps = ck.check_eps(eps, fn)
    dtype = arr.dtype
    ck.check_out(out, arr.shape, dtype, fn)
    # the batch-norm channel view: x.reshape(O, C, S) with the C features along `ax`
    C = arr.shape[ax]
    view = (ck.count(arr.shape[:ax]), C, ck.count(arr.shape[ax + 1:]))
    identity = tuple(range(arr.ndim))
    target = ck.Output(out, arr, dtype, identity, view)
    stats = _check_stats(stats, C, ax, fn)
    if arr.size == 0:
        return target.finish()
    xv = ck.input_view(arr, identity, view)
    if stats is None:
        count, mean, var = np.empty(C), np.empty(C), np.empty(C)
        _core.channel_moments(count, mean, var, xv, None, get_num_threads())
    else:
        mean, var = stats.mean, stats.var()
    rstd = ck.rstd_from_var(var, eps)           # 0 for a constant feature with eps=0: y = 0
    _core.channel_combine(target.view, xv, mean, rstd, None, None, np.zeros(C), None, get_num_threads())
    return target.finish()


# ---- min_max_scale -------------------------------------------------------------------------------

def _check_feature_range(feature_range, fn: str) -> tuple[float, float]:
    try:
        lo, hi = feature_range
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: feature_range must be a pair of real numbers (low, high); "
                        f"got {feature_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi:
        raise ValueError(f"{fn}: feature_range must be finite with low < high; got {feature_range!r}")
    return lo, hi


def _affine_onto(unit: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """lo + unit * (hi - lo), also when hi - lo exceeds the float64 range (e.g. (-1e308, 1e308)):
    then both ends are halved (exact at that magnitude) and the result doubled."""
    if math.isinf(hi - lo):
        return 2.0 * (0.5 * lo + unit * (0.5 * hi - 0.5 * lo))
    return lo + unit * (hi - lo)


@dask_aware
def min_max_scale(x, axis=-1, *, stats=None, feature_range=(0, 1), out=None):
    """Min-max scaling per feature: ``low + (x - min) / (max - min) * (high - low)``.

    ``min`` and ``max`` are taken over every axis but ``axis`` (the feature axis), so each
    feature is mapped onto ``feature_range = (low, high)``: its smallest value to ``low``, its
    largest to ``high``.

    ===================  =======================================  ==============
    x                    min and max over                         one per
    ===================  =======================================  ==============
    (N, D), axis=-1      each column (its N samples)              feature
    (N, D), axis=0       each row (its D values)                  row
    ===================  =======================================  ==============

    Parameters
    ----------
    x : array_like or dask array
        float16/32/64 keep their dtype; integer and bool become float64. Any layout. A dask
        array gives a dask array (min and max by one tree reduction over its chunks).
    axis : int
        The feature axis (default -1: the columns of a ``(samples, features)`` table).
    stats : Moments, optional
        Take min and max from these statistics (e.g. of a training set) instead of x. Values
        outside the range they saw map outside ``feature_range`` (not clipped, as scikit-learn's
        ``MinMaxScaler``).
    feature_range : (float, float)
        Target interval, finite, ``low < high``.
    out : ndarray, optional
        Where to write the result (may be x itself).

    Returns
    -------
    ndarray
        Same shape as x, values in ``[low, high]``. A constant feature gives ``low``; NaN or Inf in
        a feature gives NaN for that feature only; an empty x gives an empty result.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> table = np.array([[1.0, 10.0], [3.0, 10.0], [2.0, 10.0]])
    >>> fastnorm.min_max_scale(table)
    array([[0. , 0. ],
           [1. , 0. ],
           [0.5, 0. ]])
    """
    fn = "min_max_scale"
    arr = ck.as_input(x, "x", fn)
    ax = _feature_axis(axis, arr.ndim, fn)
    lo, hi = _check_feature_range(feature_range, fn)
    dtype = arr.dtype
    ck.check_out(out, arr.shape, dtype, fn)
    stats = _check_stats(stats, arr.shape[ax], ax, fn)
    if arr.size == 0:
        return _finish(np.empty(arr.shape), dtype, out)
    if stats is not None:
        return scale_to_range(arr, ax, stats.min, stats.max, lo, hi, False, out)
    with np.errstate(invalid="ignore"):
        mn = np.min(arr, axis=_other_axes(ax, arr.ndim)).astype(np.float64)   # NaN propagates
        mx = np.max(arr, axis=_other_axes(ax, arr.ndim)).astype(np.float64)
    return scale_to_range(arr, ax, mn, mx, lo, hi, True, out)


def scale_to_range(arr, ax, mn, mx, lo, hi, clip, out):
    """``lo + (x - mn) / (mx - mn) * (hi - lo)`` per feature along ``ax``, in float64, cast to x's
    dtype (into ``out``); clipped to [lo, hi] with ``clip`` (rounding, when mn/mx are x's own).
    NaN where mn or mx is not finite; ``lo`` where mx == mn."""
    dtype = arr.dtype
    x64 = arr.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(mn) & np.isfinite(mx)
        span = mx - mn
        # a span beyond the float64 range: scale both ends by 1/2 (exact) before subtracting
        half = finite & np.isinf(span)
        span = np.where(half, 0.5 * mx - 0.5 * mn, span)
        shift = np.where(half, 0.5 * mn, mn)
        pre = np.where(half, 0.5, 1.0)
        # a constant feature has x - min = 0 everywhere: divide by 1 to give 0, i.e. `low`
        span = np.where(finite & (span > 0), span, 1.0)
        # unit, in [0, 1] for x in [mn, mx]: (pre * x - shift) / span; a division, not a reciprocal,
        # so subnormal spans work
        unit = (_per_feature(pre, ax, arr.ndim) * x64 - _per_feature(shift, ax, arr.ndim)) \
            / _per_feature(span, ax, arr.ndim)
        y = _affine_onto(unit, lo, hi)
        if clip:
            y = np.clip(y, lo, hi)
    y[np.broadcast_to(_per_feature(~finite, ax, arr.ndim), y.shape)] = np.nan
    return _finish(y, dtype, out)


# ---- weight_norm ---------------------------------------------------------------------------------

def _weight_args(v, g, axis, fn):
    arr = ck.as_input(v, "v", fn)
    return (arr,) + _weight_gains(arr.shape, g, axis, fn)


def _weight_gains(shape, g, axis, fn):
    """(feature axis, g checked as float64) for v of `shape`."""
    ax = _feature_axis(axis, len(shape), fn)
    C = shape[ax]
    if g is None:
        raise TypeError(f"{fn}: g is required: an array of shape ({C},), one gain per position along axis {ax}")
    return ax, ck.param(g, "g", (C,), fn, f"v.shape[{ax}], one gain per position along the feature axis")


def _directions(v64: np.ndarray, ax: int):
    """u = v / ||v|| per position along ``ax`` (norm over every other axis), and ||v||.

    The slice is divided by its largest magnitude first, so neither huge nor subnormal values
    overflow, underflow or lose precision. u is 0 where ||v|| = 0 and NaN for a slice holding NaN
    or Inf. Returns (u, big, scaled_norm, zero) with ||v|| = big * scaled_norm, per position.
    """
    nd, others = v64.ndim, _other_axes(ax, v64.ndim)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        big = np.max(np.abs(v64), axis=others, initial=0.0)      # NaN propagates
        zero = big == 0
        ok = np.isfinite(big) & ~zero
        scaled = v64 / _per_feature(np.where(ok, big, 1.0), ax, nd)
        scaled_norm = np.sqrt(np.sum(scaled * scaled, axis=others))  # in [1, sqrt(n)] where ok
        u = scaled / _per_feature(np.where(ok, scaled_norm, 1.0), ax, nd)
    u[np.broadcast_to(_per_feature(~np.isfinite(big), ax, nd), u.shape)] = np.nan
    return u, np.where(ok, big, 1.0), np.where(ok, scaled_norm, 1.0), zero


@dask_aware
def weight_norm(v, g, *, axis=0):
    """Weight normalization (Salimans and Kingma, 2016): ``w = g * v / ||v||``.

    The norm is taken per position along ``axis`` over every other axis, so each slice
    ``v[..., i, ...]`` along ``axis`` becomes a vector of length ``g[i]`` pointing along ``v``'s
    slice. For a dense layer's ``(out, in)`` matrix, ``axis=0`` gives one norm per output unit
    (each row), as PyTorch's ``weight_norm(dim=0)``.

    ==================  ==========================  ============
    v                   norm over                   g shape
    ==================  ==========================  ============
    (out, in), axis=0   each row                    (out,)
    (out, in), axis=1   each column                 (in,)
    (C, K, H, W), 0     K, H, W of each filter      (C,)
    ==================  ==========================  ============

    Parameters
    ----------
    v : array_like
        Direction. float16/32/64 keep their dtype; integer and bool become float64.
    g : array_like
        Gains, shape ``(v.shape[axis],)``.
    axis : int
        The feature axis (default 0).

    Returns
    -------
    w : ndarray
        v's shape and result dtype. A slice with ``||v|| = 0`` gives 0 (not NaN); NaN or Inf in
        a slice gives NaN for that slice only.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> fastnorm.weight_norm(np.array([[3.0, 4.0], [0.0, 2.0]]), [10.0, 1.0])
    array([[6., 8.],
           [0., 1.]])
    """
    fn = "weight_norm"
    arr, ax, gains = _weight_args(v, g, axis, fn)
    if arr.size == 0:
        return np.empty(arr.shape, dtype=arr.dtype)
    u, _, _, _ = _directions(arr.astype(np.float64), ax)
    return (u * _per_feature(gains, ax, arr.ndim)).astype(arr.dtype)


def weight_norm_backward(dw, v, g, *, axis=0):
    """Gradients of :func:`weight_norm`: ``(dv, dg)``.

    With ``u = v / ||v||`` per slice along ``axis`` (sums over every other axis)::

        dg = sum(dw * u)
        dv = g / ||v|| * (dw - u * dg)

    ``dv`` has v's shape and result dtype, ``dg`` the shape ``(v.shape[axis],)`` and the same
    dtype. Slices with ``||v|| = 0`` get ``dv = 0`` and ``dg = 0`` (the direction is undefined
    there). Outputs are new arrays.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> v, g = np.array([[3.0, 4.0]]), np.array([2.0])
    >>> dv, dg = fastnorm.weight_norm_backward(np.array([[3.0, 4.0]]), v, g)
    >>> dg, np.abs(dv).max() < 1e-12              # dw along v: only g changes
    (array([5.]), np.True_)
    """
    fn = "weight_norm_backward"
    arr, ax, gains = _weight_args(v, g, axis, fn)
    grad = ck.as_input(dw, "dw", fn)
    if grad.shape != arr.shape:
        raise ValueError(f"{fn}: dw has shape {grad.shape}; expected {arr.shape}, the shape of v")
    dtype = arr.dtype
    if arr.size == 0:
        return np.empty(arr.shape, dtype=dtype), np.zeros(arr.shape[ax], dtype=dtype)
    v64, dw64 = arr.astype(np.float64), grad.astype(np.float64)
    nd, others = arr.ndim, _other_axes(ax, arr.ndim)
    u, big, scaled_norm, zero = _directions(v64, ax)
    with np.errstate(invalid="ignore", over="ignore"):
        dg = np.sum(dw64 * u, axis=others)
        # g / ||v|| * (dw - u dg), dividing by ||v|| = big * scaled_norm in two steps
        dv = (dw64 - u * _per_feature(dg, ax, nd)) / _per_feature(big, ax, nd) \
            * _per_feature(gains / scaled_norm, ax, nd)
    dv[np.broadcast_to(_per_feature(zero, ax, nd), dv.shape)] = 0.0
    return dv.astype(dtype), dg.astype(dtype)
