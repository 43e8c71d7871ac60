"""Plain NumPy float64 references for the fastnorm forward functions.

These are deliberately slow and obvious: move the feature axes where they are
easy to reduce over, reshape to rows, use ``np.mean`` / ``np.var``, move back.
They do not import fastnorm and share no code with it.

Every function returns float64 arrays: ``(y, mean, rstd)`` (``(y, rstd)`` for
RMS norm), with the stats shapes the contract gives:

=================  ====================================  =========================
function           statistics over                        stats shape
=================  ====================================  =========================
layer_norm         the feature axes                       x.shape minus feature axes
rms_norm           the feature axes (no centering)        x.shape minus feature axes
batch_norm         every axis except ``axis``             (C,)
instance_norm      every axis except 0 and ``axis``       (N, C)
group_norm         one group of channels + axes but 0     (N, G)
=================  ====================================  =========================

Conventions (the package's documented decisions):

* ``rstd = 1 / sqrt(var + eps)``, except ``rstd = 0`` when ``var + eps == 0``
  (a constant row with ``eps=0``), so the output is then ``bias`` (0 without).
* ``mask`` has the shape of ``x`` without the feature axes; ``True`` = real.
  Statistics use real elements only; padded output positions are 0; a group
  with no real element has ``mean = 0`` and ``rstd = 0``.
"""

import numpy as np

__all__ = [
    "LAYOUTS",
    "as_float64",
    "batch_norm",
    "batch_norm_running_update",
    "feature_axes",
    "group_norm",
    "instance_norm",
    "inv_sqrt",
    "layer_norm",
    "make_layout",
    "rms_norm",
]


# --------------------------------------------------------------------------- helpers

def as_float64(a):
    """Any array-like (int, bool, byte-swapped, float16, ...) as a native float64 copy."""
    return np.array(a, dtype=np.float64)


def feature_axes(axis, ndim):
    """Normalize an int or tuple ``axis`` to a sorted tuple of non-negative axes."""
    axes = (axis,) if np.ndim(axis) == 0 else tuple(axis)
    result = []
    for a in axes:
        a = int(a)
        if not -ndim <= a < ndim:
            raise np.exceptions.AxisError(a, ndim)
        result.append(a % ndim)
    if len(set(result)) != len(result):
        raise ValueError("repeated axis")
    return tuple(sorted(result))


def inv_sqrt(v):
    """1 / sqrt(v), with 0 where v == 0; NaN stays NaN."""
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = 1.0 / np.sqrt(v)
    return np.where(v == 0, 0.0, r)


def _affine(y, weight, bias):
    """y * weight + bias, weight/bias broadcasting against the trailing axes of y."""
    if weight is not None:
        y = y * as_float64(weight)
    if bias is not None:
        y = y + as_float64(bias)
    return y


# --------------------------------------------------------------------------- layer / rms norm

def _rows(x, axis):
    """Transpose x to (*other_axes, *feature_axes) and view it as (M, D) rows.

    Returns (rows, xt_shape, other_shape, perm)."""
    feat = feature_axes(axis, x.ndim)
    other = tuple(i for i in range(x.ndim) if i not in feat)
    perm = other + feat
    xt = np.transpose(x, perm)
    other_shape = xt.shape[: len(other)]
    d = int(np.prod(xt.shape[len(other):]))
    m = int(np.prod(other_shape))
    return xt.reshape(m, d), xt.shape, other_shape, perm


def _row_mask(mask, m):
    if mask is None:
        return np.ones(m, dtype=bool)
    return np.asarray(mask, dtype=bool).reshape(m)


def layer_norm(x, weight=None, bias=None, axis=-1, eps=1e-5, mask=None):
    """(y, mean, rstd): normalize over the feature axes."""
    x = as_float64(x)
    rows, xt_shape, other_shape, perm = _rows(x, axis)        # rows: (M, D)
    real = _row_mask(mask, rows.shape[0])                       # (M,)

    mean = np.zeros(rows.shape[0])
    var = np.zeros(rows.shape[0])
    with np.errstate(invalid="ignore", over="ignore"):
        mean[real] = np.mean(rows[real], axis=1)
        var[real] = np.var(rows[real], axis=1)
        rstd = inv_sqrt(var + eps)
        rstd[~real] = 0.0
        y = (rows - mean[:, None]) * rstd[:, None]
        y = _affine(y.reshape(xt_shape), weight, bias).reshape(rows.shape)
    y[~real] = 0.0
    y = np.transpose(y.reshape(xt_shape), np.argsort(perm))
    return y, mean.reshape(other_shape), rstd.reshape(other_shape)


def rms_norm(x, weight=None, bias=None, axis=-1, eps=1e-5, mask=None):
    """(y, rstd): y = x / sqrt(mean(x**2) + eps) * weight + bias over the feature axes."""
    x = as_float64(x)
    rows, xt_shape, other_shape, perm = _rows(x, axis)
    real = _row_mask(mask, rows.shape[0])

    mean_sq = np.zeros(rows.shape[0])
    with np.errstate(invalid="ignore", over="ignore"):
        mean_sq[real] = np.mean(rows[real] ** 2, axis=1)
        rstd = inv_sqrt(mean_sq + eps)
        rstd[~real] = 0.0
        y = rows * rstd[:, None]
        y = _affine(y.reshape(xt_shape), weight, bias).reshape(rows.shape)
    y[~real] = 0.0
    y = np.transpose(y.reshape(xt_shape), np.argsort(perm))
    return y, rstd.reshape(other_shape)


# --------------------------------------------------------------------------- batch norm

def _columns(x, axis):
    """Move the feature axis last and view x as (M, C). Returns (cols, xt_shape, ax)."""
    (ax,) = feature_axes(axis, x.ndim)
    xt = np.moveaxis(x, ax, -1)
    m = int(np.prod(xt.shape[:-1]))
    return xt.reshape(m, xt.shape[-1]), xt.shape, ax


def batch_norm(x, weight=None, bias=None, axis=-1, running_mean=None, running_var=None,
               training=True, eps=1e-5, mask=None):
    """(y, mean, rstd) with mean/rstd of shape (C,).

    training=True: batch statistics (biased var) over the real elements; an empty
    batch gives mean = rstd = NaN.  training=False: running statistics."""
    x = as_float64(x)
    cols, xt_shape, ax = _columns(x, axis)                      # cols: (M, C)
    c = cols.shape[1]
    real = _row_mask(mask, cols.shape[0])                       # (M,)

    if training:
        vals = cols[real]                                       # (n, C)
        if vals.shape[0] == 0:
            mean = np.full(c, np.nan)
            var = np.full(c, np.nan)
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                mean = np.mean(vals, axis=0)
                var = np.var(vals, axis=0)
    else:
        mean = as_float64(running_mean)
        var = as_float64(running_var)

    with np.errstate(invalid="ignore", over="ignore"):
        rstd = inv_sqrt(var + eps)
        y = _affine((cols - mean) * rstd, weight, bias)
    y[~real] = 0.0
    y = np.moveaxis(y.reshape(xt_shape), -1, ax)
    return y, mean, rstd


def batch_norm_running_update(x, running_mean, running_var, axis=-1, momentum=0.1, mask=None):
    """The new (running_mean, running_var) after one training step, as float64.

    r = (1 - momentum) * r + momentum * s, with the unbiased batch variance
    (divide by n - 1, n = number of real values per feature)."""
    x = as_float64(x)
    cols, _, _ = _columns(x, axis)
    real = _row_mask(mask, cols.shape[0])
    vals = cols[real]
    with np.errstate(invalid="ignore", over="ignore"):
        batch_mean = np.mean(vals, axis=0)
        batch_var_unbiased = np.var(vals, axis=0, ddof=1)
        new_mean = (1.0 - momentum) * as_float64(running_mean) + momentum * batch_mean
        new_var = (1.0 - momentum) * as_float64(running_var) + momentum * batch_var_unbiased
    return new_mean, new_var


# --------------------------------------------------------------------------- instance / group norm

def _sample_channel_spatial(x, axis):
    """Move the feature axis to 1 and view x as (N, C, S). Returns (xs, xt_shape, ax)."""
    (ax,) = feature_axes(axis, x.ndim)
    if ax == 0:
        raise ValueError("axis 0 is the batch axis")
    xt = np.moveaxis(x, ax, 1)                                  # (N, C, *spatial)
    n, c = xt.shape[:2]
    s = int(np.prod(xt.shape[2:]))
    return xt.reshape(n, c, s), xt.shape, ax


def _spatial_mask(mask, n, s):
    if mask is None:
        return np.ones((n, s), dtype=bool)
    return np.asarray(mask, dtype=bool).reshape(n, s)


def _masked_moments(v, real):
    """mean and biased var of v over its last axis, using only real (broadcast) entries.

    Groups without a real entry get mean 0, var 0 and are reported in `empty`."""
    real = np.broadcast_to(real, v.shape)
    count = real.sum(axis=-1)
    empty = count == 0
    vz = np.where(real, v, 0.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean = vz.sum(axis=-1) / np.where(empty, 1, count)
        dev = np.where(real, v - mean[..., None], 0.0)
        var = (dev ** 2).sum(axis=-1) / np.where(empty, 1, count)
    return mean, var, empty


def instance_norm(x, weight=None, bias=None, axis=-1, eps=1e-5, mask=None):
    """(y, mean, rstd) with mean/rstd of shape (N, C): per sample and channel over the other axes."""
    x = as_float64(x)
    xs, xt_shape, ax = _sample_channel_spatial(x, axis)         # (N, C, S)
    n, c, s = xs.shape
    real = _spatial_mask(mask, n, s)[:, None, :]                # (N, 1, S)

    mean, var, empty = _masked_moments(xs, real)                # (N, C) each
    with np.errstate(invalid="ignore", over="ignore"):
        rstd = inv_sqrt(var + eps)
        y = (xs - mean[..., None]) * rstd[..., None]            # (N, C, S)
        y = np.moveaxis(_affine(np.moveaxis(y, 1, -1), weight, bias), -1, 1)
    rstd[empty] = 0.0
    y = np.where(real, y, 0.0)
    y = np.moveaxis(y.reshape(xt_shape), 1, ax)
    return y, mean, rstd


def group_norm(x, num_groups, weight=None, bias=None, axis=-1, eps=1e-5, mask=None):
    """(y, mean, rstd) with mean/rstd of shape (N, G): per sample and group of C // G
    consecutive channels, over those channels and every other axis except 0."""
    x = as_float64(x)
    xs, xt_shape, ax = _sample_channel_spatial(x, axis)         # (N, C, S)
    n, c, s = xs.shape
    g = num_groups
    if c % g != 0:
        raise ValueError("num_groups must divide C")
    xg = xs.reshape(n, g, (c // g) * s)                         # (N, G, C/G * S)
    real = np.broadcast_to(_spatial_mask(mask, n, s)[:, None, None, :], (n, g, c // g, s))
    real = real.reshape(n, g, (c // g) * s)

    mean, var, empty = _masked_moments(xg, real)                # (N, G) each
    with np.errstate(invalid="ignore", over="ignore"):
        rstd = inv_sqrt(var + eps)
        y = (xg - mean[..., None]) * rstd[..., None]
        y = y.reshape(n, c, s)
        y = np.moveaxis(_affine(np.moveaxis(y, 1, -1), weight, bias), -1, 1)
    rstd[empty] = 0.0
    y = np.where(real.reshape(n, c, s), y, 0.0)
    y = np.moveaxis(y.reshape(xt_shape), 1, ax)
    return y, mean, rstd


# --------------------------------------------------------------------------- awkward layouts

LAYOUTS = ("C", "F", "sliced", "transposed", "negative", "byteswapped", "misaligned")


def _sentinel(dtype):
    """A value that would stand out if a kernel read memory outside the view."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "b":
        return True
    if dtype.kind in "iu":
        return np.iinfo(dtype).max
    return 0


def make_layout(a, layout):
    """An array with the same values (and dtype, up to byte order) as ``a`` in an awkward memory layout.

    C           a C-contiguous copy
    F           a Fortran-ordered copy
    sliced      a step-2 view into a bigger array on every axis, the gaps filled with NaN/max
    transposed  a transposed view of a contiguous buffer (axes rolled, not just reversed)
    negative    a view with negative strides on every axis (np.flip of a contiguous buffer)
    byteswapped the opposite byte order (dtype.newbyteorder())
    misaligned  a view into a uint8 buffer at byte offset 1 (not aligned for itemsize > 1)
    """
    a = np.asarray(a)
    if layout == "C":
        return np.array(a, order="C", copy=True)
    if layout == "F":
        return np.array(a, order="F", copy=True)
    if layout == "sliced":
        big = np.full(tuple(2 * s + 1 for s in a.shape), _sentinel(a.dtype), dtype=a.dtype)
        view = big[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "transposed":
        perm = tuple(range(1, a.ndim)) + (0,) if a.ndim else ()
        buf = np.ascontiguousarray(np.transpose(a, perm))
        return np.transpose(buf, np.argsort(perm))
    if layout == "negative":
        buf = np.ascontiguousarray(np.flip(a))
        return np.flip(buf)
    if layout == "byteswapped":
        return a.astype(a.dtype.newbyteorder())
    if layout == "misaligned":
        buf = np.zeros(a.nbytes + 1, dtype=np.uint8)
        view = buf[1:].view(a.dtype).reshape(a.shape)
        view[...] = a
        return view
    raise ValueError(f"unknown layout {layout!r}")
