"""The residual add of a transformer block with its normalization ("Add & Norm").

``h = x + residual`` (rounded once in the dtype, as ``np.add``), then ``y = layer_norm(h)`` or
``rms_norm(h)``. The common call (plain C-contiguous arrays of one dtype, the last axis, no mask)
runs in one C kernel (src/add_norm.c) that reads x and residual from memory once: it writes h a
block of rows at a time and normalizes the block while it is still in the cache. Every other
call takes two steps, ``np.add`` into h and the normalization of h, which give the same bits.
"""
from __future__ import annotations

import numpy as np

from . import _checks as ck
from . import _core
from . import _threads
from ._dispatch import is_dask
from ._functional import _layer_plan, layer_norm, rms_norm

__all__ = ["add_layer_norm", "add_rms_norm"]


def _as_residual(residual, arr: np.ndarray, fn: str) -> np.ndarray:
    res = ck.as_input(residual, "residual", fn)
    if res.shape != arr.shape:
        raise ValueError(f"{fn}: residual has shape {res.shape}; expected {arr.shape}, the shape of x")
    if res.dtype != arr.dtype:
        raise TypeError(f"{fn}: residual has dtype {res.dtype}; expected {arr.dtype}, the dtype of x "
                        "(h = x + residual is rounded once in that dtype: convert one of them first)")
    return res


def _add_norm(fn, rms, x, residual, weight, bias, axis, eps, mask, out, residual_out, return_stats):
    """The C entry when it takes the call (NotImplemented otherwise: a dask array is never a plain
    ndarray), else the general path: every argument checked before anything is written, then two
    steps."""
    if type(axis) is int and axis == -1 and mask is None:
        result = _core.add_rows_fast(x, residual, weight, bias, eps, out, residual_out, rms, return_stats,
                                     _threads.num_threads)
        if result is not NotImplemented:
            return result
    if is_dask(x) or is_dask(residual):
        from . import _dask
        return getattr(_dask, fn)(x, residual, weight, bias, axis=axis, eps=eps, mask=mask, out=out,
                                  residual_out=residual_out, return_stats=return_stats)
    arr = ck.as_input(x, "x", fn)
    res = _as_residual(residual, arr, fn)
    return_stats = ck.check_bool(return_stats, "return_stats", fn)
    plan = _layer_plan(arr.shape, axis, fn)
    what = f"x.shape along the feature axes {plan.feature}"
    w = ck.param(weight, "weight", plan.param_shape, fn, what, arr.shape, plan.feature)
    b = ck.param(bias, "bias", plan.param_shape, fn, what, arr.shape, plan.feature)
    eps = ck.check_eps(eps, fn)
    ck.check_out(out, arr.shape, arr.dtype, fn)
    ck.check_out(residual_out, arr.shape, arr.dtype, fn, name="residual_out")
    ck.check_outputs_apart(fn, out=out, residual_out=residual_out)
    # the mask is read after h is written: a copy when it shares memory with an output
    m = ck.detach(ck.check_mask(mask, plan.mask_shape, fn), (out, residual_out))
    h = residual_out if residual_out is not None else _core.empty_like(arr, None)
    np.add(arr, res, out=h)                 # NumPy's add reads inputs that overlap h as copies
    norm = rms_norm if rms else layer_norm
    params = {"weight": None if w is None else w.reshape(plan.param_shape),
              "bias": None if b is None else b.reshape(plan.param_shape)}
    y, *stats = norm(h, **params, axis=axis, eps=eps, mask=m, out=out, return_stats=True)
    return (y, h, *stats) if return_stats else (y, h)


def add_layer_norm(x, residual, weight=None, bias=None, *, axis=-1, eps=1e-5, mask=None, out=None,
                   residual_out=None, return_stats=False):
    """The residual add and layer norm of a transformer block: ``h = x + residual``,
    ``y = layer_norm(h)``; returns ``(y, h)``.

    One pass over memory for the common call: x and residual are read once, h and y written once
    (the normalization is :func:`layer_norm`'s own, so y has the bits of ``layer_norm(h)``). h is
    ``x + residual`` rounded once in the dtype, bit for bit ``np.add(x, residual)``.

    Parameters
    ----------
    x, residual : array_like
        The sublayer's output and the residual stream: one shape, one dtype (float16/32/64 keep
        it; integer and bool become float64).
    weight, bias, axis, eps, mask, out
        As for :func:`layer_norm` (``out`` receives y). Padded positions get y = 0; h is the sum
        everywhere.
    residual_out : ndarray, optional
        Where to write h. It may be ``residual`` (or ``x``) itself: the residual stream updated in
        place.
    return_stats : bool
        Also return mean and rstd of h (as :func:`layer_norm` returns them).

    Returns
    -------
    (y, h), or (y, h, mean, rstd)

    Notes
    -----
    h's gradient is ``layer_norm_backward(dy, h, mean, rstd, weight)[0]`` plus whatever reaches h
    along the residual stream; x and residual both receive it (README, "Add & Norm").

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> x, r = np.array([[1.0, 2.0, 3.0]]), np.array([[0.0, 0.0, 3.0]])
    >>> y, h = fastnorm.add_layer_norm(x, r, eps=0.0)
    >>> h, y.round(4)
    (array([[1., 2., 6.]]), array([[-0.9258, -0.4629,  1.3887]]))
    """
    return _add_norm("add_layer_norm", False, x, residual, weight, bias, axis, eps, mask, out, residual_out,
                     return_stats)


def add_rms_norm(x, residual, weight=None, bias=None, *, axis=-1, eps=1e-5, mask=None, out=None,
                 residual_out=None, return_stats=False):
    """The residual add and RMS norm of a transformer block: ``h = x + residual``,
    ``y = rms_norm(h)``; returns ``(y, h)``, or ``(y, h, rstd)`` with ``return_stats=True``.

    Arguments as :func:`add_layer_norm`; y has the bits of ``rms_norm(h)``.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> y, h = fastnorm.add_rms_norm(np.array([[1.0, 1.0]]), np.array([[2.0, 3.0]]), eps=0.0)
    >>> h, y.round(4)
    (array([[3., 4.]]), array([[0.8485, 1.1314]]))
    """
    return _add_norm("add_rms_norm", True, x, residual, weight, bias, axis, eps, mask, out, residual_out,
                     return_stats)
