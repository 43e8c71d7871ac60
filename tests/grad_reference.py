"""Float64 references for the fastnorm gradients, computed two independent ways.

``numeric_grads``  central finite differences of the scalar loss ``L = sum(y * dy)`` through the
                   forward references of ``reference.py`` (so for batch norm in training mode the
                   difference goes through the batch mean and variance).
``analytic_grads`` the closed-form gradients, written per "statistics group" with one integer
                   label per element of ``x`` and ``np.bincount``; it shares no code with
                   ``reference.py`` (which transposes and reshapes instead).

Each returns ``(dx, dweight, dbias)`` as float64: ``dx`` of ``x.shape``, ``dweight``/``dbias`` of the
weight shape (``x.shape`` at the feature axes, in increasing axis order), computed at ``weight = 1``
when ``weight`` is None.  Padded positions (``mask`` False) get ``dx = 0`` and add nothing to
``dweight``/``dbias``.

Keyword arguments shared by every function here (the forward arguments of the operation)::

    axis          int, or tuple of ints for layer/rms norm
    mask          bool array of x.shape without the feature axes, or None
    num_groups    group norm only
    training      batch norm only; False uses running_mean / running_var as constants
    running_mean, running_var   batch norm with training=False
    eps           1e-5 by default, as in fastnorm

Size key for ``analytic_grads``: ``x``, ``dy``, ``labels``, ``real`` all have ``x.shape``;
``mean``, ``rstd``, ``count`` have one entry per statistics group.
"""

import numpy as np

import reference as ref

EPS = 1e-5
NAMES = ("layer_norm", "rms_norm", "batch_norm", "instance_norm", "group_norm")

__all__ = [
    "EPS",
    "NAMES",
    "analytic_grads",
    "expand_mask",
    "feature_axes",
    "forward",
    "group_labels",
    "mask_shape",
    "numeric_grads",
    "param_shape",
    "stats_shape",
]


# --------------------------------------------------------------------------- shapes

def feature_axes(name, axis, ndim):
    """Sorted non-negative feature axes (one axis except for layer/rms norm)."""
    feat = ref.feature_axes(axis, ndim)
    if name not in ("layer_norm", "rms_norm") and len(feat) != 1:
        raise ValueError(f"{name} takes a single feature axis")
    return feat


def param_shape(name, shape, axis):
    """Shape of weight/bias/dweight/dbias."""
    return tuple(shape[a] for a in feature_axes(name, axis, len(shape)))


def mask_shape(name, shape, axis):
    """Shape of mask: x.shape without the feature axes."""
    feat = feature_axes(name, axis, len(shape))
    return tuple(n for a, n in enumerate(shape) if a not in feat)


def stats_shape(name, shape, axis, num_groups=None):
    """Shape of mean/rstd as return_stats=True gives them."""
    if name in ("layer_norm", "rms_norm"):
        return mask_shape(name, shape, axis)
    (c,) = param_shape(name, shape, axis)
    if name == "batch_norm":
        return (c,)
    if name == "instance_norm":
        return (shape[0], c)
    return (shape[0], num_groups)


def expand_mask(name, mask, shape, axis):
    """The mask broadcast to x.shape (True = real element); all True when mask is None."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    feat = feature_axes(name, axis, len(shape))
    return np.broadcast_to(np.expand_dims(np.asarray(mask, dtype=bool), feat), shape)


def _weight_full(name, weight, shape, axis):
    """weight broadcast to x.shape (ones when None)."""
    feat = feature_axes(name, axis, len(shape))
    if weight is None:
        return np.ones(shape)
    keep = [n if a in feat else 1 for a, n in enumerate(shape)]
    return np.broadcast_to(np.asarray(weight, dtype=np.float64).reshape(keep), shape)


def group_labels(name, shape, axis, num_groups=None):
    """One int per element of x: which (mean, var) it is normalized with.  Returns (labels, count)."""
    feat = feature_axes(name, axis, len(shape))
    coords = np.indices(shape)                                   # (ndim, *shape)
    if name in ("layer_norm", "rms_norm"):
        other = [a for a in range(len(shape)) if a not in feat]
        dims = tuple(shape[a] for a in other)
        labels = np.ravel_multi_index(tuple(coords[a] for a in other), dims) if other else np.zeros(shape, int)
        return labels, int(np.prod(dims))
    (ax,) = feat
    c = shape[ax]
    if name == "batch_norm":
        return coords[ax], c
    if name == "instance_norm":
        return coords[0] * c + coords[ax], shape[0] * c
    if name == "group_norm":
        per_group = c // num_groups
        return coords[0] * num_groups + coords[ax] // per_group, shape[0] * num_groups
    raise ValueError(name)


# --------------------------------------------------------------------------- forward (y only)

def forward(name, x, weight=None, bias=None, *, axis=-1, mask=None, num_groups=None, training=True,
            running_mean=None, running_var=None, eps=EPS):
    """float64 y of the forward reference in reference.py."""
    if name == "layer_norm":
        return ref.layer_norm(x, weight, bias, axis=axis, eps=eps, mask=mask)[0]
    if name == "rms_norm":
        return ref.rms_norm(x, weight, bias, axis=axis, eps=eps, mask=mask)[0]
    if name == "batch_norm":
        return ref.batch_norm(x, weight, bias, axis=axis, running_mean=running_mean, running_var=running_var,
                              training=training, eps=eps, mask=mask)[0]
    if name == "instance_norm":
        return ref.instance_norm(x, weight, bias, axis=axis, eps=eps, mask=mask)[0]
    if name == "group_norm":
        return ref.group_norm(x, num_groups, weight, bias, axis=axis, eps=eps, mask=mask)[0]
    raise ValueError(name)


# --------------------------------------------------------------------------- finite differences

def _central_difference(loss, v, h):
    """dL/dv for every element of the float64 array v, by (L(v + h) - L(v - h)) / 2h."""
    grad = np.zeros(v.shape)
    for i in range(v.size):
        plus, minus = v.copy(), v.copy()
        plus.flat[i] += h
        minus.flat[i] -= h
        grad.flat[i] = (loss(plus) - loss(minus)) / (2.0 * h)
    return grad


def numeric_grads(name, dy, x, weight=None, *, h=1e-6, **kw):
    """(dx, dweight, dbias) of L = sum(forward(x, weight, bias) * dy), by central differences."""
    x = ref.as_float64(x)
    dy = ref.as_float64(dy)
    pshape = param_shape(name, x.shape, kw.get("axis", -1))
    w = np.ones(pshape) if weight is None else ref.as_float64(weight)
    b = np.zeros(pshape)

    def loss(xv, wv, bv):
        return float(np.sum(forward(name, xv, wv, bv, **kw) * dy))

    dx = _central_difference(lambda v: loss(v, w, b), x, h)
    dweight = _central_difference(lambda v: loss(x, v, b), w, h)
    dbias = _central_difference(lambda v: loss(x, w, v), b, h)
    return dx, dweight, dbias


# --------------------------------------------------------------------------- closed form

def analytic_grads(name, dy, x, weight=None, *, axis=-1, mask=None, num_groups=None, training=True,
                   running_mean=None, running_var=None, eps=EPS):
    """(dx, dweight, dbias) from the closed-form formulas, per statistics group.

    With xhat = (x - mean) * rstd (x * rstd for RMS norm), g = dy * weight and means taken over the
    real elements of each group:
        layer / instance / group / batch (training):  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
        rms:                                          dx = rstd * (g - xhat * mean(g * xhat))
        batch (training=False, constant stats):       dx = rstd * g
        dweight = sum(dy * xhat), dbias = sum(dy)     over every axis but the feature axes
    """
    x = ref.as_float64(x)
    dy = ref.as_float64(dy)
    shape = x.shape
    feat = feature_axes(name, axis, len(shape))
    other = tuple(a for a in range(len(shape)) if a not in feat)
    real = expand_mask(name, mask, shape, axis)
    labels, n_groups = group_labels(name, shape, axis, num_groups)
    idx = labels[real]                                           # group of each real element
    xr = x[real]
    count = np.bincount(idx, minlength=n_groups).astype(float)
    safe = np.where(count == 0, 1.0, count)

    def group_mean(v):
        return np.bincount(idx, weights=v, minlength=n_groups) / safe

    if name == "batch_norm" and not training:
        mean = ref.as_float64(running_mean)
        rstd = 1.0 / np.sqrt(ref.as_float64(running_var) + eps)
    elif name == "rms_norm":
        mean = np.zeros(n_groups)
        rstd = 1.0 / np.sqrt(group_mean(xr ** 2) + eps)
    else:
        mean = group_mean(xr)
        rstd = 1.0 / np.sqrt(group_mean((xr - mean[idx]) ** 2) + eps)

    xhat = (xr - mean[idx]) * rstd[idx]
    g = dy[real] * _weight_full(name, weight, shape, axis)[real]
    if name == "batch_norm" and not training:
        dxr = rstd[idx] * g
    elif name == "rms_norm":
        dxr = rstd[idx] * (g - xhat * group_mean(g * xhat)[idx])
    else:
        dxr = rstd[idx] * (g - group_mean(g)[idx] - xhat * group_mean(g * xhat)[idx])

    dx = np.zeros(shape)
    dx[real] = dxr
    dy_xhat = np.zeros(shape)
    dy_xhat[real] = dy[real] * xhat
    dweight = np.sum(dy_xhat, axis=other)
    dbias = np.sum(np.where(real, dy, 0.0), axis=other)
    return dx, dweight.reshape(param_shape(name, shape, axis)), dbias.reshape(param_shape(name, shape, axis))
