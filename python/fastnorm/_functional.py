"""The normalization functions: argument handling in Python, the work in fastnorm._core (C).

Two kernel families cover every function:

- the group family works on an (A, G, K, S) view and takes one (mean, rstd) per (a, g):
  layer/RMS norm (rows, 1, D, 1), instance norm (N, C, 1, H*W), group norm (N, G, C/G, H*W);
- the channel family works on an (O, C, S) view and takes one (mean, rstd) per channel c:
  batch norm.

The views are built by transposing and reshaping without a copy where the axes merge; the
kernels take byte strides, so transposed, sliced and negatively strided arrays need no copy.
"""
from __future__ import annotations

import contextvars
import functools
import math
from dataclasses import dataclass

import numpy as np

from . import _checks as ck
from . import _core
from . import _threads
from ._dispatch import dask_aware, dask_function, is_dask
from ._threads import get_num_threads

__all__ = [
    "layer_norm", "rms_norm", "batch_norm", "instance_norm", "group_norm", "mask_from_lengths",
    "layer_norm_backward", "rms_norm_backward", "batch_norm_backward", "instance_norm_backward",
    "group_norm_backward",
    "batch_renorm", "batch_renorm_backward",
]


# The layers (layers.py) set this around their forward calls: the statistics come back as float64
# whatever x's dtype, and go straight back into the backward functions, which take them. The
# contract's float32 statistics for float32 x would cost xhat |mean| * rstd * 2**-24 of accuracy.
float64_stats = contextvars.ContextVar("fastnorm_float64_stats", default=False)


def _stats_dtype(dtype):
    return np.dtype(np.float64) if float64_stats.get() else ck.stats_dtype(dtype)


# ---- plans: how an array of a given shape maps onto a kernel view ----------------------------

@dataclass(frozen=True)
class GroupPlan:
    """x.transpose(perm).reshape(view) = (A, G, K, S); statistics per (a, g)."""
    perm: tuple
    view: tuple
    param_shape: tuple      # weight/bias shape
    mask_shape: tuple       # x.shape without the feature axes
    stats_shape: tuple
    feature: tuple          # the feature axes, for messages


@functools.lru_cache(maxsize=256)
def _cached_layer_plan(shape, axis, fn) -> GroupPlan:
    feat = ck.feature_axes(axis, len(shape), fn, allow_tuple=True)
    others = tuple(i for i in range(len(shape)) if i not in feat)
    fshape = tuple(shape[i] for i in feat)
    oshape = tuple(shape[i] for i in others)
    K = ck.count(fshape)
    if K == 0:
        raise ValueError(f"{fn}: x has shape {tuple(shape)} with no elements along the feature axes {feat}: "
                         "nothing to normalize")
    return GroupPlan(others + feat, (ck.count(oshape), 1, K, 1), fshape, oshape, oshape, feat)


@functools.lru_cache(maxsize=256)
def _cached_grouped_plan(shape, axis, num_groups, fn, min_ndim) -> GroupPlan:
    ax = ck.batch_axis_feature(axis, len(shape), fn, min_ndim)
    C = shape[ax]
    if num_groups is None:          # instance norm: every channel is a group
        G = C
    else:
        if C % num_groups != 0:
            raise ValueError(f"{fn}: num_groups={num_groups} does not divide the {C} channels of x along axis {ax}")
        G = int(num_groups)
    spatial = tuple(i for i in range(1, len(shape)) if i != ax)
    S = ck.count(shape[i] for i in spatial)
    if C * S == 0:
        raise ValueError(f"{fn}: x has shape {tuple(shape)}: each group has no elements to normalize "
                         f"(channels along axis {ax} times the other non-batch axes is 0)")
    N = shape[0]
    mask_shape = (N,) + tuple(shape[i] for i in spatial)
    return GroupPlan((0, ax) + spatial, (N, G, C // G, S), (C,), mask_shape, (N, G), (ax,))


def _plain_int(v) -> bool:
    return type(v) is int or isinstance(v, np.integer)


def _axis_key(axis):
    """axis as a cache key, or None when it is not made of plain ints: 1, 1.0 and True hash
    alike, so only plain ints may share cache entries; anything else is planned uncached (and
    refused there with a message naming axis)."""
    if _plain_int(axis):
        return int(axis)
    if isinstance(axis, (tuple, list)) and all(_plain_int(a) for a in axis):
        return tuple(int(a) for a in axis)
    return None


def _layer_plan(shape, axis, fn) -> GroupPlan:
    """The plan for x of `shape` (cached: the same shapes come back call after call)."""
    key = _axis_key(axis)
    if key is None:
        return _cached_layer_plan.__wrapped__(tuple(shape), axis, fn)
    return _cached_layer_plan(tuple(shape), key, fn)


def _check_num_groups(num_groups, fn) -> int:
    if not _plain_int(num_groups) or num_groups < 1:
        raise ValueError(f"{fn}: num_groups must be a positive int; got {num_groups!r}")
    return int(num_groups)


def _grouped_plan(shape, axis, num_groups, fn, min_ndim) -> GroupPlan:
    """num_groups None means instance norm (every channel a group); group norm checks it first."""
    key = _axis_key(axis)
    if key is None:
        return _cached_grouped_plan.__wrapped__(tuple(shape), axis, num_groups, fn, min_ndim)
    return _cached_grouped_plan(tuple(shape), key, num_groups, fn, min_ndim)


def _channel_plan(shape, axis, fn):
    """Batch norm: x.reshape(O, C, S) with C along `axis`; returns (ax, view)."""
    (ax,) = ck.feature_axes(axis, len(shape), fn, allow_tuple=False)
    return ax, (ck.count(shape[:ax]), shape[ax], ck.count(shape[ax + 1:]))


def _mask_2d(mask, plan_mask_shape, rows, cols, fn):
    m = ck.check_mask(mask, plan_mask_shape, fn)
    return None if m is None else m.reshape(rows, cols)


# ---- forward -----------------------------------------------------------------------------------

def _group_forward(fn, plan: GroupPlan, arr, weight, bias, eps, mask, out, rms):
    dtype = arr.dtype
    what = f"x.shape along the feature axes {plan.feature}"
    w = ck.param(weight, "weight", plan.param_shape, fn, what, arr.shape, plan.feature)
    b = ck.param(bias, "bias", plan.param_shape, fn, what, arr.shape, plan.feature)
    eps = ck.check_eps(eps, fn)
    A, G, K, S = plan.view
    ck.check_out(out, arr.shape, dtype, fn)
    m = ck.detach(_mask_2d(mask, plan.mask_shape, A, S, fn), (out,))
    target = ck.Output(out, arr, dtype, plan.perm, plan.view)
    mean = np.empty(A * G)
    rstd = np.empty(A * G)
    _core.group_forward(target.view, ck.input_view(arr, plan.perm, plan.view), w, b, m, mean, rstd, eps, rms,
                        get_num_threads())
    y = target.finish()
    sd = _stats_dtype(dtype)
    with np.errstate(over="ignore"):        # an rstd beyond float32's range (subnormal x, eps=0) is inf
        return y, mean.reshape(plan.stats_shape).astype(sd), rstd.reshape(plan.stats_shape).astype(sd)


@dask_aware
def layer_norm(x, weight=None, bias=None, *, axis=-1, eps=1e-5, mask=None, out=None, return_stats=False):
    """Layer normalization: statistics over the feature axes, one (mean, rstd) per position.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, with the biased variance.

    ==============  ==========================================  ===================
    x               statistics over                             mean, rstd shape
    ==============  ==========================================  ===================
    (N, D)          axis=-1: each row                           (N,)
    (N, L, D)       axis=-1: each token                         (N, L)
    (N, H, W)       axis=(-2, -1): each sample                  (N,)
    ==============  ==========================================  ===================

    Parameters
    ----------
    x : array_like
        float16/32/64 (and ``ml_dtypes.bfloat16``) keep their dtype; integer and bool become
        float64. Any layout.
    weight, bias : array_like, optional
        Shape of x along the feature axes (in increasing axis order). None means 1 and 0.
    axis : int or tuple of int
        The feature axes.
    eps : float
        Added to the variance, >= 0. With ``eps=0`` a constant row gives ``bias``.
    mask : bool array, optional
        Shape ``x.shape`` without the feature axes; False marks padding, whose output is 0
        (and whose mean and rstd are 0).
    out : ndarray, optional
        Where to write y (may be x itself).
    return_stats : bool
        Also return mean and rstd = 1/sqrt(var + eps) (float32, or float64 for float64 x).

    Returns
    -------
    y, or (y, mean, rstd)

    Examples
    --------
    >>> import fastnorm
    >>> fastnorm.layer_norm([[1.0, 2.0, 3.0]]).round(4)
    array([[-1.2247,  0.    ,  1.2247]])
    """
    fn = "layer_norm"
    arr = ck.as_input(x, "x", fn)
    plan = _layer_plan(arr.shape, axis, fn)
    y, mean, rstd = _group_forward(fn, plan, arr, weight, bias, eps, mask, out, rms=False)
    return (y, mean, rstd) if return_stats else y


# The public layer_norm is this function behind a C entry point, which runs the common call (a plain
# float32/64 ndarray, last axis, no mask, no stats) with no Python frame in between and passes
# every other call here unchanged (src/_core.c, RowsFunction). Docs and signature are this def's.
layer_norm = _core.rows_function(layer_norm, _threads, False)


@dask_aware
def rms_norm(x, weight=None, bias=None, *, axis=-1, eps=1e-5, mask=None, out=None, return_stats=False):
    """RMS normalization: ``y = x / sqrt(mean(x**2) + eps) * weight (+ bias)``, no centering.

    Statistics over the feature axes, as :func:`layer_norm`; ``return_stats=True`` gives
    ``(y, rstd)``. Masked rows give 0 and rstd 0.

    ==============  ==========================================  ===================
    x               mean square over                            rstd shape
    ==============  ==========================================  ===================
    (N, D)          axis=-1: each row                           (N,)
    (N, L, D)       axis=-1: each token                         (N, L)
    ==============  ==========================================  ===================

    Examples
    --------
    >>> import fastnorm
    >>> fastnorm.rms_norm([[3.0, 4.0]], eps=0.0).round(4)
    array([[0.8485, 1.1314]])
    """
    fn = "rms_norm"
    arr = ck.as_input(x, "x", fn)
    plan = _layer_plan(arr.shape, axis, fn)
    y, _, rstd = _group_forward(fn, plan, arr, weight, bias, eps, mask, out, rms=True)
    return (y, rstd) if return_stats else y


# The public rms_norm is this function behind a C entry point, which runs the common call (a plain
# float32/64 ndarray, last axis, no mask, no stats) with no Python frame in between and passes
# every other call here unchanged (src/_core.c, RowsFunction). Docs and signature are this def's.
rms_norm = _core.rows_function(rms_norm, _threads, True)


@dask_aware
def instance_norm(x, weight=None, bias=None, *, axis=-1, eps=1e-5, mask=None, out=None, return_stats=False):
    """Instance normalization: one (mean, rstd) per (sample, channel), over the other axes.

    ``axis`` is the channel axis (not 0, the batch axis); x needs at least 3 dimensions.

    ====================  ===========================  ================
    x                     statistics over              mean, rstd shape
    ====================  ===========================  ================
    (N, C, H, W), axis=1  H, W of each (n, c)          (N, C)
    (N, L, C), axis=-1    L of each (n, c)             (N, C)
    ====================  ===========================  ================

    ``weight``/``bias`` have shape ``(C,)``; ``mask`` has x's shape without the channel axis.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.array([[[1.0, 3.0], [10.0, 30.0]]])          # (N=1, C=2, L=2), axis=1
    >>> fastnorm.instance_norm(x, axis=1, eps=0.0)
    array([[[-1.,  1.],
            [-1.,  1.]]])
    """
    fn = "instance_norm"
    arr = ck.as_input(x, "x", fn)
    plan = _grouped_plan(arr.shape, axis, None, fn, min_ndim=3)
    y, mean, rstd = _group_forward(fn, plan, arr, weight, bias, eps, mask, out, rms=False)
    return (y, mean, rstd) if return_stats else y


@dask_aware
def group_norm(x, num_groups, weight=None, bias=None, *, axis=-1, eps=1e-5, mask=None, out=None,
               return_stats=False):
    """Group normalization: channels split into ``num_groups`` consecutive groups; one
    (mean, rstd) per (sample, group) over the group's channels and every non-batch axis.

    ====================  ================================  ================
    x                     statistics over                   mean, rstd shape
    ====================  ================================  ================
    (N, C, H, W), axis=1  C/G channels x H x W per (n, g)   (N, G)
    (N, C), axis=-1       C/G channels per (n, g)           (N, G)
    ====================  ================================  ================

    ``C % num_groups`` must be 0; ``weight``/``bias`` are per channel, ``(C,)``.

    Examples
    --------
    >>> import fastnorm
    >>> fastnorm.group_norm([[1.0, 3.0, 10.0, 30.0]], 2, eps=0.0)
    array([[-1.,  1., -1.,  1.]])
    """
    fn = "group_norm"
    arr = ck.as_input(x, "x", fn)
    plan = _grouped_plan(arr.shape, axis, _check_num_groups(num_groups, fn), fn, min_ndim=2)
    y, mean, rstd = _group_forward(fn, plan, arr, weight, bias, eps, mask, out, rms=False)
    return (y, mean, rstd) if return_stats else y


def _running_buffer(r, name, C, fn, writeable, x_shape, ax):
    ck.refuse_masked(r, name, fn)
    if not isinstance(r, np.ndarray) or not (r.dtype.kind == "f" or ck.is_bfloat16(r.dtype)):
        raise TypeError(f"{fn}: {name} must be a float numpy.ndarray of shape ({C},); got "
                        f"{type(r).__name__ if not isinstance(r, np.ndarray) else r.dtype}")
    if r.shape != (C,):
        hint = ck.axis_hint(r.shape[0], x_shape, (ax,)) if r.ndim == 1 else ""
        raise ValueError(f"{fn}: {name} has shape {r.shape}; expected ({C},), one value per feature along axis "
                         f"{ax}{hint}")
    if writeable and not r.flags.writeable:
        raise ValueError(f"{fn}: {name} is read-only; training updates it in place")
    return r


def _update_running(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's update, in place: the running variance takes the unbiased batch variance
    (count values per feature, an array or one number)."""
    unbiased = var * count / (count - 1)
    running_mean[...] = (1 - momentum) * running_mean + momentum * mean
    running_var[...] = (1 - momentum) * running_var + momentum * unbiased


def _batch_norm_args(shape, ax, weight, bias, running_mean, running_var, training, momentum, eps, fn):
    """batch_norm's arguments besides x, mask and out, checked for x of `shape` with the
    features along `ax`: (weight, bias, eps, momentum), the parameters as float64 copies."""
    C = shape[ax]
    what = f"x.shape along the feature axis {ax}"
    w = ck.param(weight, "weight", (C,), fn, what, shape, (ax,))
    b = ck.param(bias, "bias", (C,), fn, what, shape, (ax,))
    eps = ck.check_eps(eps, fn)
    momentum_value = ck.real_number(momentum, "momentum", fn)
    if not 0.0 <= momentum_value <= 1.0:
        raise ValueError(f"{fn}: momentum must be in [0, 1]; got {momentum!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{fn}: running_mean and running_var must be given together")
    if running_mean is not None:
        _running_buffer(running_mean, "running_mean", C, fn, training, shape, ax)
        _running_buffer(running_var, "running_var", C, fn, training, shape, ax)
    elif not training:
        raise ValueError(f"{fn}: training=False needs running_mean and running_var")
    return w, b, eps, momentum_value


@dask_aware
def batch_norm(x, weight=None, bias=None, *, axis=-1, running_mean=None, running_var=None, training=True,
               momentum=0.1, eps=1e-5, mask=None, out=None, return_stats=False):
    """Batch normalization: one (mean, rstd) per feature, over every other axis.

    ====================  ===============================  ===========
    x                     statistics over                  stats shape
    ====================  ===============================  ===========
    (N, C), axis=-1       each column (N values)           (C,)
    (N, C, H, W), axis=1  N, H, W of each channel          (C,)
    (N, L, D), axis=-1    N, L of each feature             (D,)
    ====================  ===============================  ===========

    ``training=True`` uses the batch statistics and, if ``running_mean``/``running_var`` are
    given, updates them in place: ``r = (1 - momentum) * r + momentum * s`` with the unbiased
    batch variance. ``training=False`` normalizes with the running statistics. An empty batch
    gives an empty result (NaN statistics) and leaves the running statistics untouched.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> fastnorm.batch_norm(np.array([[1.0, 10.0], [3.0, 30.0]]), eps=0.0)
    array([[-1., -1.],
           [ 1.,  1.]])
    """
    y, mean, rstd, _ = _batch_norm("batch_norm", x, weight, bias, axis, running_mean, running_var, training,
                                   momentum, eps, mask, out)
    return (y, mean, rstd) if return_stats else y


def _batch_norm(fn, x, weight, bias, axis, running_mean, running_var, training, momentum, eps, mask, out,
                limits=None):
    """batch_norm, or with limits = (r_max, d_max) in training batch_renorm: (y, mean, rstd,
    correction), the statistics in the contract's dtype, correction (r, d) in that dtype or None."""
    arr = ck.as_input(x, "x", fn)
    ck.check_bool(training, "training", fn)
    ax, view = _channel_plan(arr.shape, axis, fn)
    O, C, S = view
    dtype = arr.dtype
    w, b, eps, momentum_value = _batch_norm_args(arr.shape, ax, weight, bias, running_mean, running_var, training,
                                                 momentum, eps, fn)
    renorm = limits is not None and training
    ck.check_out(out, arr.shape, dtype, fn)
    updated = (running_mean, running_var) if training else (None, None)
    ck.check_outputs_apart(fn, out=out, running_mean=updated[0], running_var=updated[1])
    m = ck.detach(_mask_2d(mask, arr.shape[:ax] + arr.shape[ax + 1:], O, S, fn), (out, *updated))
    xv = ck.input_view(arr, tuple(range(arr.ndim)), view)

    target = ck.Output(out, arr, dtype, tuple(range(arr.ndim)), view)
    # float32 planes (the (N, C, H, W) axis=1 case), no mask: statistics and output a block of
    # channels at a time, reading x from memory once (src/batch_norm.c)
    planes = (training and not renorm and m is None and dtype == np.float32 and S > 1 and O * S >= 2 and C > 0
              and xv.strides[2] == 4 and target.view.strides[2] == 4)
    count = O * S
    if planes:
        mean, var = np.empty(C), np.empty(C)
        _core.channel_normalize_planes(target.view, xv, w, b, eps, mean, var, get_num_threads())
    elif training:
        count, mean, var = np.empty(C), np.empty(C), np.empty(C)
        _core.channel_moments(count, mean, var, xv, m, get_num_threads())
        if arr.size and (count < 2).any():
            c = int(np.argmin(count))
            who = "mask" if m is not None else "x"
            raise ValueError(f"{fn}: training needs more than one value per feature; {who} gives "
                             f"{int(count[c])} for feature {c} (x of shape {arr.shape}, axis={ax})")
    else:
        mean = np.array(running_mean, dtype=np.float64)
        var = np.array(running_var, dtype=np.float64)
    rstd = ck.rstd_from_var(var, eps)
    correction = None
    if renorm:              # read before the update below, which may change running_mean and running_var
        correction = _renorm_correction(mean, var, running_mean, running_var, eps, *limits)
        w, b = _renorm_affine(w, b, *correction)
    if not planes:
        scale = rstd if w is None else rstd * w
        shift = np.zeros(C) if b is None else b
        _core.channel_combine(target.view, xv, mean, scale, None, None, shift, m, get_num_threads())
    y = target.finish()
    # after every read of x and the mask, which may share memory with the running statistics
    if training and arr.size and running_mean is not None:
        _update_running(running_mean, running_var, mean, var, count, momentum_value)
    sd = _stats_dtype(dtype)
    with np.errstate(over="ignore"):        # an rstd beyond float32's range (subnormal x, eps=0) is inf
        if correction is not None:
            correction = tuple(c.astype(sd) for c in correction)
        return y, mean.astype(sd), rstd.astype(sd), correction


def _renorm_needs_running(running_mean, running_var, fn):
    """Batch renorm's running statistics may not be None (batch norm checks them further)."""
    if running_mean is None or running_var is None:
        raise ValueError(f"{fn}: running_mean and running_var are required: r and d compare the batch "
                         "statistics with them")


def _renorm_limits(r_max, d_max, fn):
    """(r_max, d_max) as floats: r_max >= 1, d_max >= 0, either inf for no clipping."""
    r_value, d_value = ck.real_number(r_max, "r_max", fn), ck.real_number(d_max, "d_max", fn)
    if not r_value >= 1.0:
        raise ValueError(f"{fn}: r_max must be a number >= 1 (r is clipped to [1/r_max, r_max]); got {r_max!r}")
    if not d_value >= 0.0:
        raise ValueError(f"{fn}: d_max must be a number >= 0 (d is clipped to [-d_max, d_max]); got {d_max!r}")
    return r_value, d_value


def _renorm_correction(mean, var, running_mean, running_var, eps, r_max, d_max):
    """Batch renorm's (r, d) per feature, float64, from the batch's mean and biased variance and
    the running statistics, with s = sqrt(running_var + eps)::

        r = clip(sqrt(var + eps) / s, 1/r_max, r_max)
        d = clip((mean - running_mean) / s, -d_max, d_max)

    With s = 0 (running_var + eps == 0), v/0 is +-inf and clipped, and 0/0 gives r = 1 and d = 0
    (batch norm's normalization). NaN in either statistics gives NaN."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):    # NaN and inf: see above
        s = np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
        spread = np.sqrt(var + eps)
        offset = mean - np.asarray(running_mean, dtype=np.float64)
        r = np.where((spread == 0) & (s == 0), 1.0, spread / s)
        d = np.where((offset == 0) & (s == 0), 0.0, offset / s)
    return np.clip(r, 1.0 / r_max, r_max), np.clip(d, -d_max, d_max)


def _renorm_dweight(r, d, dweight, dbias):
    """Batch renorm's dweight, sum(dy * (xhat * r + d)), from batch norm's dweight = sum(dy * xhat)
    and dbias = sum(dy)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return r * dweight + d * dbias


def _renorm_affine(w, b, r, d):
    """The weight and bias with which batch norm's ``xhat * weight + bias`` is batch renorm's
    ``(xhat * r + d) * weight + bias`` (weight None means 1, bias None 0)."""
    if w is None:
        return r, (d if b is None else d + b)
    return r * w, (d * w if b is None else d * w + b)


@dask_aware
def batch_renorm(x, weight=None, bias=None, *, axis=-1, running_mean, running_var, r_max=3.0, d_max=5.0,
                 training=True, momentum=0.1, eps=1e-5, mask=None, out=None, return_stats=False):
    """Batch renormalization (Ioffe, 2017): batch norm whose output in training is corrected
    toward the running statistics, so that training and inference normalize alike.

    With the batch's ``mean`` and biased ``var`` per feature (as :func:`batch_norm`) and
    ``s = sqrt(running_var + eps)`` (PyTorch's running-statistics convention)::

        y = ((x - mean) / sqrt(var + eps) * r + d) * weight + bias
        r = clip(sqrt(var + eps) / s, 1/r_max, r_max)
        d = clip((mean - running_mean) / s, -d_max, d_max)

    r and d are constants for the gradient (:func:`batch_renorm_backward`). Unclipped, y is
    ``(x - running_mean) / s * weight + bias``; with ``r_max=1, d_max=0`` it is batch norm's.
    ``r_max`` >= 1 and ``d_max`` >= 0 (``inf``: no clipping); Ioffe starts them at 1 and 0 and
    widens them during training (the :class:`~fastnorm.BatchRenorm` layer's attributes).

    ``running_mean``/``running_var`` (writeable float arrays of shape ``(C,)``) are required;
    training updates them in place after reading them, as :func:`batch_norm` does (momentum,
    unbiased batch variance; an empty batch leaves them as they are). ``training=False`` is
    :func:`batch_norm`'s eval mode. Masks, dtypes, ``out`` and shared memory as batch_norm.

    Returns
    -------
    y, or with ``return_stats=True`` ``(y, mean, rstd, r, d)``, each statistic of shape ``(C,)``
    (float32, or float64 for float64 x): the batch's mean and rstd = 1/sqrt(var + eps) and the
    clipped r and d in training; in eval the running mean, 1/s, r = 1 and d = 0. They are the
    arguments :func:`batch_renorm_backward` takes.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.array([[0.0], [2.0], [4.0]])
    >>> rm, rv = np.zeros(1), np.ones(1)
    >>> fastnorm.batch_renorm(x, running_mean=rm, running_var=rv, d_max=1.0, eps=0.0, momentum=0.5)
    array([[-1.],
           [ 1.],
           [ 3.]])
    >>> rm, rv        # halfway to the batch's mean 2 and unbiased variance 4
    (array([1.]), array([2.5]))
    """
    fn = "batch_renorm"
    _renorm_needs_running(running_mean, running_var, fn)
    limits = _renorm_limits(r_max, d_max, fn)
    y, mean, rstd, correction = _batch_norm(fn, x, weight, bias, axis, running_mean, running_var, training,
                                            momentum, eps, mask, out, limits)
    if not return_stats:
        return y
    r, d = correction if correction is not None else (np.ones_like(rstd), np.zeros_like(rstd))
    return y, mean, rstd, r, d


def mask_from_lengths(lengths, max_len=None):
    """Boolean mask (len(lengths), max_len): True for the first lengths[i] positions of row i.

    Examples
    --------
    >>> import fastnorm
    >>> fastnorm.mask_from_lengths([2, 4])
    array([[ True,  True, False, False],
           [ True,  True,  True,  True]])
    """
    fn = "mask_from_lengths"
    ck.refuse_masked(lengths, "lengths", fn)
    arr = np.array(lengths)             # a copy: a zero-stride view of 2**60 lengths fails here, not in max()
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(f"{fn}: lengths must be a 1-d sequence of ints; got {arr.dtype} of shape {arr.shape}")
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise ValueError(f"{fn}: lengths must be >= 0; got {arr.min()}")
    longest = int(arr.max()) if arr.size else 0      # a Python int: uint64 lengths stay positive
    most = np.iinfo(np.intp).max                       # the longest axis an array can have
    if longest > most:
        raise ValueError(f"{fn}: lengths must be at most {most}, the longest possible axis; got {longest}")
    max_len = longest if max_len is None else ck.whole_number(max_len, "max_len", fn, 0, most)
    if max_len < longest:
        raise ValueError(f"{fn}: max_len={max_len} is shorter than the longest length {longest}")
    return np.arange(max_len) < arr[:, None]


# ---- backward ----------------------------------------------------------------------------------

def _group_backward(fn, plan: GroupPlan, dy, arr, mean, rstd, weight, mask, rms, out):
    g = ck.as_input(dy, "dy", fn)
    ck.same_shape(g, arr, fn)
    A, G, K, S = plan.view
    mu = None if rms else ck.check_stat(mean, "mean", plan.stats_shape, fn)
    r = ck.check_stat(rstd, "rstd", plan.stats_shape, fn)
    w = ck.param(weight, "weight", plan.param_shape, fn, f"x.shape along the feature axes {plan.feature}",
                 arr.shape, plan.feature)
    dtype = arr.dtype
    ck.check_out(out, arr.shape, dtype, fn)
    m = ck.detach(_mask_2d(mask, plan.mask_shape, A, S, fn), (out,))
    target = ck.Output(out, arr, dtype, plan.perm, plan.view, also_read=(g,))
    dweight, dbias = np.empty(G * K), np.empty(G * K)
    _core.group_backward(target.view, dweight, dbias, ck.input_view(g, plan.perm, plan.view),
                         ck.input_view(arr, plan.perm, plan.view), mu, r, w, m, rms, get_num_threads())
    return (target.finish(), dweight.reshape(plan.param_shape).astype(dtype),
            dbias.reshape(plan.param_shape).astype(dtype))


def layer_norm_backward(dy, x, mean, rstd, weight=None, *, axis=-1, mask=None, out=None):
    """Gradients of :func:`layer_norm`: ``(dx, dweight, dbias)``.

    ``mean``/``rstd`` are what ``return_stats=True`` returned; nothing is recomputed. With
    ``xhat = (x - mean) * rstd`` and ``g = dy * weight`` per row::

        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
        dweight = sum(dy * xhat), dbias = sum(dy)      (over the non-feature axes)

    Outputs are written, never accumulated into caller memory: dx into a new array, or into
    ``out=`` (x's shape and dtype; it may be dy itself), an addition to the contract for training
    loops that reuse buffers. dweight/dbias are new arrays with the shape of weight (as if weight
    were ones when None) and x's dtype. Padded positions get dx = 0.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.array([[1.0, 2.0, 4.0]])
    >>> y, mean, rstd = fastnorm.layer_norm(x, return_stats=True)
    >>> dx, dw, db = fastnorm.layer_norm_backward(np.ones_like(x), x, mean, rstd)
    >>> np.abs(dx).max() < 1e-12, db
    (np.True_, array([1., 1., 1.]))
    """
    # the common case straight to C (plain ndarrays of one dtype, last axis, no mask); NotImplemented
    # when the general path below must run (it also owns every error message)
    if type(axis) is int and axis == -1 and mask is None:
        grads = _core.rows_backward_fast(dy, x, mean, rstd, weight, out, False, _threads.num_threads)
        if grads is not NotImplemented:
            return grads
    if is_dask(dy):
        return dask_function("layer_norm_backward")(dy, x, mean, rstd, weight, axis=axis, mask=mask, out=out)
    fn = "layer_norm_backward"
    arr = ck.as_input(x, "x", fn)
    plan = _layer_plan(arr.shape, axis, fn)
    return _group_backward(fn, plan, dy, arr, mean, rstd, weight, mask, rms=False, out=out)


def rms_norm_backward(dy, x, rstd, weight=None, *, axis=-1, mask=None, out=None):
    """Gradients of :func:`rms_norm`: ``(dx, dweight, dbias)``.

    With ``xhat = x * rstd``::

        dx = rstd * (g - xhat * mean(g * xhat)),  g = dy * weight

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.array([[3.0, 4.0]])
    >>> y, rstd = fastnorm.rms_norm(x, eps=0.0, return_stats=True)
    >>> fastnorm.rms_norm_backward(np.ones_like(x), x, rstd)[2]
    array([1., 1.])
    """
    # the common case straight to C (plain ndarrays of one dtype, last axis, no mask); NotImplemented
    # when the general path below must run (it also owns every error message)
    if type(axis) is int and axis == -1 and mask is None:
        grads = _core.rows_backward_fast(dy, x, None, rstd, weight, out, True, _threads.num_threads)
        if grads is not NotImplemented:
            return grads
    if is_dask(dy):
        return dask_function("rms_norm_backward")(dy, x, rstd, weight, axis=axis, mask=mask, out=out)
    fn = "rms_norm_backward"
    arr = ck.as_input(x, "x", fn)
    plan = _layer_plan(arr.shape, axis, fn)
    return _group_backward(fn, plan, dy, arr, None, rstd, weight, mask, rms=True, out=out)


@dask_aware
def instance_norm_backward(dy, x, mean, rstd, weight=None, *, axis=-1, mask=None, out=None):
    """Gradients of :func:`instance_norm`: ``(dx, dweight, dbias)``; the layer-norm formula
    per (sample, channel), dweight/dbias of shape ``(C,)``.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.arange(8.0).reshape(1, 2, 4)
    >>> y, mean, rstd = fastnorm.instance_norm(x, axis=1, return_stats=True)
    >>> fastnorm.instance_norm_backward(np.ones_like(x), x, mean, rstd, axis=1)[2]
    array([4., 4.])
    """
    fn = "instance_norm_backward"
    arr = ck.as_input(x, "x", fn)
    plan = _grouped_plan(arr.shape, axis, None, fn, min_ndim=3)
    return _group_backward(fn, plan, dy, arr, mean, rstd, weight, mask, rms=False, out=out)


@dask_aware
def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, *, axis=-1, mask=None, out=None):
    """Gradients of :func:`group_norm`: ``(dx, dweight, dbias)``; the layer-norm formula per
    (sample, group), dweight/dbias of shape ``(C,)``.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.array([[1.0, 3.0, 10.0, 30.0]])
    >>> y, mean, rstd = fastnorm.group_norm(x, 2, return_stats=True)
    >>> fastnorm.group_norm_backward(np.ones_like(x), x, mean, rstd, 2)[2]
    array([1., 1., 1., 1.])
    """
    fn = "group_norm_backward"
    arr = ck.as_input(x, "x", fn)
    plan = _grouped_plan(arr.shape, axis, _check_num_groups(num_groups, fn), fn, min_ndim=2)
    return _group_backward(fn, plan, dy, arr, mean, rstd, weight, mask, rms=False, out=out)


@dask_aware
def batch_norm_backward(dy, x, mean, rstd, weight=None, *, axis=-1, training=True, mask=None, out=None):
    """Gradients of :func:`batch_norm`: ``(dx, dweight, dbias)``, each feature over every other axis.

    Training (batch statistics), with ``xhat = (x - mean) * rstd`` and n real values per feature::

        dx = weight * rstd * (dy - sum(dy)/n - xhat * sum(dy * xhat)/n)

    ``training=False`` treats the running statistics as constants: ``dx = dy * weight * rstd``.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, rstd = fastnorm.batch_norm(x, return_stats=True)
    >>> fastnorm.batch_norm_backward(np.array([[1.0], [1.0]]), x, mean, rstd)[0]
    array([[0.],
           [0.]])
    """
    fn = "batch_norm_backward"
    arr = ck.as_input(x, "x", fn)
    dx, dweight, dbias = _batch_norm_backward(fn, dy, arr, mean, rstd, weight, axis, training, mask, out)
    return dx, dweight.astype(arr.dtype), dbias.astype(arr.dtype)


def _batch_norm_backward(fn, dy, arr, mean, rstd, weight, axis, training, mask, out):
    """batch_norm_backward for x already through ck.as_input; dweight and dbias in float64."""
    ck.check_bool(training, "training", fn)
    g = ck.as_input(dy, "dy", fn)
    ck.same_shape(g, arr, fn)
    ax, view = _channel_plan(arr.shape, axis, fn)
    O, C, S = view
    mu, r, w = _batch_grad_args(arr.shape, ax, mean, rstd, weight, fn)
    ck.check_out(out, arr.shape, arr.dtype, fn)
    m = ck.detach(_mask_2d(mask, arr.shape[:ax] + arr.shape[ax + 1:], O, S, fn), (out,))
    identity = tuple(range(arr.ndim))
    xv, gv = ck.input_view(arr, identity, view), ck.input_view(g, identity, view)

    target = ck.Output(out, arr, arr.dtype, identity, view, also_read=(g,))
    # float32 planes (the (N, C, H, W) axis=1 case), no mask: sums and dx a block of channels at a
    # time, reading x and dy from memory once (src/batch_norm.c)
    planes = (training and m is None and arr.dtype == np.float32 and S > 1 and O > 0 and
              all(v.strides[2] == 4 for v in (xv, gv, target.view)))
    if planes:
        sums = (np.empty(C), np.empty(C), float(O * S))
        _core.channel_backward_planes(target.view, gv, xv, mu, r, _weight_rstd(r, w), sums[0], sums[1],
                                      get_num_threads())
    else:
        sums = _channel_grad_sums(gv, xv, mu, m)
        _channel_dx(target.view, gv, xv, mu, r, w, m, sums if training else None)
    dweight, dbias = _channel_param_grads(sums, r)
    return target.finish(), dweight, dbias


# Batch norm's gradients in two steps, so that a chunked x (fastnorm._dask) can sum over all its
# blocks before any dx is written: the per-feature sums over the batch (sums of parts add up to the
# sums of the whole), then dx, dweight and dbias from those sums.

def _batch_grad_args(shape, ax, mean, rstd, weight, fn):
    """batch_norm_backward's mean, rstd and weight checked for x of `shape` with the features
    along `ax`, as float64 copies."""
    C = shape[ax]
    return (ck.check_stat(mean, "mean", (C,), fn), ck.check_stat(rstd, "rstd", (C,), fn),
            ck.param(weight, "weight", (C,), fn, f"x.shape along the feature axis {ax}", shape, (ax,)))


def _channel_grad_sums(gv, xv, mean, mask):
    """``(sum(dy), sum(dy * (x - mean)), n)`` per feature of the (O, C, S) views dy and x, over
    the real values (mask (O, S) or None); n is their number, the same for every feature."""
    C = xv.shape[1]
    sum_dy, sum_dy_xc = np.empty(C), np.empty(C)
    _core.channel_grad_sums(sum_dy, sum_dy_xc, gv, xv, mean, mask, get_num_threads())
    n = float(xv.shape[0] * xv.shape[2] if mask is None else np.count_nonzero(mask))
    return sum_dy, sum_dy_xc, n


def _weight_rstd(rstd, weight):
    """weight * rstd per feature (rstd alone without a weight), the dx coefficient of dy."""
    with np.errstate(invalid="ignore", over="ignore"):      # NaN/Inf in x or dy: NaN there, as documented
        return rstd if weight is None else rstd * weight


def _channel_dx(target, gv, xv, mean, rstd, weight, mask, sums):
    """dx into the (O, C, S) view `target`: with the whole batch's `sums` (training),
    ``wr * (dy - sum(dy)/n - xhat * sum(dy * xhat)/n)`` with ``wr = weight * rstd``; with
    ``sums=None`` (constant statistics), ``wr * dy``."""
    C = xv.shape[1]
    wr = _weight_rstd(rstd, weight)
    coef_x, shift = np.zeros(C), np.zeros(C)
    if sums is not None and sums[2] > 0:        # written as coef_dy*dy + coef_x*(x - mean) + shift
        _core.channel_dx_coefs(coef_x, shift, *(np.ascontiguousarray(a, np.float64) for a in (wr, rstd, *sums[:2])),
                               float(sums[2]))
    _core.channel_combine(target, xv, mean, coef_x, gv, wr, shift, mask, get_num_threads())


def _channel_param_grads(sums, rstd):
    """(dweight, dbias) in float64 from the whole batch's sums; n may be one number or one per feature."""
    sum_dy, sum_dy_xc, n = sums
    with np.errstate(invalid="ignore", over="ignore"):
        dweight = np.where(n > 0, sum_dy_xc * rstd, 0.0)   # a sum over no element is 0, not 0 * NaN
    return dweight, sum_dy


@dask_aware
def batch_renorm_backward(dy, x, mean, rstd, r, d, weight=None, *, axis=-1, training=True, mask=None, out=None):
    """Gradients of :func:`batch_renorm`: ``(dx, dweight, dbias)``, with r and d constants.

    ``mean, rstd, r, d`` are what ``return_stats=True`` returned. Batch renorm is batch norm with
    weight ``r * weight`` and bias ``d * weight + bias``, so dx is :func:`batch_norm_backward`'s
    with weight ``r * weight`` (d does not enter it); with ``xhat = (x - mean) * rstd``::

        dweight = sum(dy * (xhat * r + d)),  dbias = sum(dy)      (over every axis but axis)

    ``training=False`` (the eval forward's running statistics, r = 1, d = 0) is batch norm's eval
    gradient: ``dx = dy * weight * r * rstd``.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x = np.array([[0.0], [2.0], [4.0]])
    >>> y, mean, rstd, r, d = fastnorm.batch_renorm(x, running_mean=np.zeros(1), running_var=np.ones(1),
    ...                                            d_max=1.0, eps=0.0, return_stats=True)
    >>> dx, dweight, dbias = fastnorm.batch_renorm_backward(np.ones_like(x), x, mean, rstd, r, d)
    >>> dx.ravel(), dweight, dbias      # dweight = sum(xhat * r + d) = 3 * d
    (array([0., 0., 0.]), array([3.]), array([3.]))
    """
    fn = "batch_renorm_backward"
    arr = ck.as_input(x, "x", fn)
    ax, (_, C, _) = _channel_plan(arr.shape, axis, fn)
    w = ck.param(weight, "weight", (C,), fn, f"x.shape along the feature axis {ax}", arr.shape, (ax,))
    r, d = ck.check_stat(r, "r", (C,), fn), ck.check_stat(d, "d", (C,), fn)
    scaled, _ = _renorm_affine(w, None, r, d)
    dx, dweight, dbias = _batch_norm_backward(fn, dy, arr, mean, rstd, scaled, axis, training, mask, out)
    return dx, _renorm_dweight(r, d, dweight, dbias).astype(arr.dtype), dbias.astype(arr.dtype)
