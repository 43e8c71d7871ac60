"""fastnorm on dask arrays: lazily, block by block, never the whole array in memory.

Imported only when a function is given a dask array (fastnorm._dispatch), so ``import fastnorm``
does not import dask. Every function here has the signature of the NumPy function of the same
name, checks its arguments at the call (as that function does) and returns a dask array.

- Per-sample functions (layer/RMS/instance/group norm, weight_norm): the axes a statistic spans
  become one chunk each (``rechunk``, a no-op when they already are), then the NumPy function runs
  on every block (``da.blockwise``) with the matching blocks of weight, bias and mask.
- Per-feature functions (batch_norm, standardize, min_max_scale, moments): the statistics of
  every block (the C kernel of :func:`fastnorm.moments`), one tree reduction merging them per
  feature (``da.reduction`` with :func:`fastnorm._moments.merge_arrays`), then the NumPy function
  on every block with the statistics of its features (``stats=``, or batch norm's eval mode).
- Gradients of per-sample functions: dx per block, dweight and dbias the sums of the blocks'.
  Batch norm's: the per-feature sums dx needs (sum(dy), sum(dy * (x - mean)), the count), of
  every block, added up over the blocks; then dx per block, and dweight and dbias, from them.

Results equal the NumPy call on the computed array to rounding: the same kernels run on each
block, and only the statistics of per-feature functions are merged in another order.
The block functions are small classes at module level, so they pickle to distributed workers.
"""
from __future__ import annotations

import dask
import dask.array as da
import numpy as np

import fastnorm

from . import _checks as ck
from . import _functional as F
from . import _data as D
from ._data import scale_to_range
from ._moments import FIELDS, Moments, merge_arrays

__all__ = ["layer_norm", "rms_norm", "instance_norm", "group_norm", "weight_norm", "batch_norm", "standardize",
           "min_max_scale", "moments", "block_statistics", "layer_norm_backward", "rms_norm_backward",
           "instance_norm_backward", "group_norm_backward", "batch_norm_backward"]

STATS = np.dtype([(f, np.float64) for f in FIELDS])     # one feature's Moments, as one array element
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ---- arguments ---------------------------------------------------------------------------------

def _no_out(out, fn):
    if out is not None:
        raise TypeError(f"{fn}: out= cannot be used with a dask array x (the result is a lazy dask array); "
                        "write it with dask.array.store, to_zarr or to_npy_stack")


def _result_dtype(x, fn) -> np.dtype:
    """The dtype fastnorm gives for x's dtype (and its TypeError for complex, object, ...)."""
    if x.ndim > len(LETTERS) - 2:           # one letter per axis, and two for the statistics' own axes
        raise ValueError(f"{fn}: a dask x may have at most {len(LETTERS) - 2} dimensions; got {x.ndim}")
    return ck.as_input(np.zeros(0, dtype=x.dtype), "x", fn).dtype


def _index(axes, idx) -> str:
    return "".join(idx[a] for a in axes)


def _mask_operand(mask, x, axes, fn):
    """(mask as a dask array chunked as x along `axes`, its blockwise index), or () for no mask."""
    if mask is None:
        return ()
    shape = tuple(x.shape[a] for a in axes)
    if isinstance(mask, da.Array):      # checked by its dtype and shape alone: nothing is computed
        ck.check_mask(np.broadcast_to(np.zeros((), mask.dtype), mask.shape), shape, fn)
        arr = mask.rechunk(tuple(x.chunks[a] for a in axes))    # x's blocks stay as they are
    else:
        arr = da.from_array(ck.check_mask(mask, shape, fn), chunks=tuple(x.chunks[a] for a in axes))
    return arr, _index(axes, LETTERS)


def _param_operand(p, x, axes):
    """A checked (float64, flat) weight/bias/gain as a dask array along x's `axes`."""
    shape = tuple(x.shape[a] for a in axes)
    return da.from_array(p.reshape(shape), chunks=tuple(x.chunks[a] for a in axes)), _index(axes, LETTERS)


# ---- per-sample functions ------------------------------------------------------------------------

def _layer_axes(fn, x, axis, out):
    """Layer/RMS norm's plan for x, its feature axes (sorted) and the other axes."""
    _no_out(out, fn)
    plan = F._layer_plan(x.shape, axis, fn)
    feat = tuple(sorted(plan.feature))
    return plan, feat, tuple(a for a in range(x.ndim) if a not in feat)


def _grouped_axes(fn, x, axis, num_groups, out, min_ndim):
    """Instance/group norm's plan for x, its channel axis and its spatial axes (neither 0 nor the channels)."""
    _no_out(out, fn)
    plan = F._grouped_plan(x.shape, axis, num_groups, fn, min_ndim)
    (ax,) = plan.feature
    return plan, ax, tuple(a for a in range(1, x.ndim) if a != ax)


class BlockCall:
    """``fastnorm.<name>(x_block, *args, **kwargs, **{key: block})``: its output, or with
    ``stats`` its statistics stacked along a new last axis (``return_stats=True``)."""

    def __init__(self, name, args, kwargs, keys, stats=False):
        self.name, self.args, self.kwargs, self.keys, self.stats = name, args, kwargs, keys, stats

    def __call__(self, xb, *blocks):
        kw = dict(self.kwargs, **dict(zip(self.keys, blocks)))
        if self.stats:
            return np.stack(getattr(fastnorm, self.name)(xb, *self.args, return_stats=True, **kw)[1:], axis=-1)
        return getattr(fastnorm, self.name)(xb, *self.args, **kw)


def _per_sample(fn, x, whole, params, mask, mask_axes, stats_axes, return_stats, args=(), stats_chunks=None,
                **kwargs):
    """fn on every block of x once the axes in `whole` are one chunk each.

    params: {keyword: (checked array or None, axes of x it runs along)}; mask runs along
    mask_axes; the statistics (return_stats) along stats_axes, one block of stats_chunks (or of
    x's chunks) each. Statistics are computed at the call, y stays lazy."""
    dtype = _result_dtype(x, fn)
    x = x.rechunk({a: -1 for a in whole})
    idx = LETTERS[:x.ndim]
    operands, keys = [], []
    for key, (p, axes) in params.items():
        if p is not None:
            operands += _param_operand(p, x, axes)
            keys.append(key)
    if mask is not None:
        operands += _mask_operand(mask, x, mask_axes, fn)
        keys.append("mask")
    y = da.blockwise(BlockCall(fn, args, kwargs, keys), idx, x, idx, *operands, dtype=dtype, concatenate=True,
                     meta=np.empty((0,) * x.ndim, dtype))
    if not return_stats:
        return y
    sdtype = ck.stats_dtype(dtype)
    k = 1 if fn == "rms_norm" else 2
    stats = da.blockwise(BlockCall(fn, args, kwargs, keys, stats=True), _index(stats_axes, idx) + "z", x, idx,
                         *operands, new_axes={"z": k}, adjust_chunks=stats_chunks, dtype=sdtype, concatenate=True,
                         meta=np.empty((0,) * (len(stats_axes) + 1), sdtype))
    s = stats.compute()
    return (y,) + tuple(s[..., i] for i in range(k))


def _layer(fn, x, weight, bias, axis, eps, mask, out, return_stats):
    plan, feat, others = _layer_axes(fn, x, axis, out)
    what = f"x.shape along the feature axes {plan.feature}"
    params = {"weight": (ck.param(weight, "weight", plan.param_shape, fn, what), feat),
              "bias": (ck.param(bias, "bias", plan.param_shape, fn, what), feat)}
    return _per_sample(fn, x, feat, params, mask, others, others, return_stats, axis=axis, eps=eps)


def layer_norm(x, weight=None, bias=None, *, axis=-1, eps=1e-5, mask=None, out=None, return_stats=False):
    return _layer("layer_norm", x, weight, bias, axis, eps, mask, out, return_stats)


def rms_norm(x, weight=None, bias=None, *, axis=-1, eps=1e-5, mask=None, out=None, return_stats=False):
    return _layer("rms_norm", x, weight, bias, axis, eps, mask, out, return_stats)


def _grouped(fn, x, num_groups, weight, bias, axis, eps, mask, out, return_stats, min_ndim):
    plan, ax, spatial = _grouped_axes(fn, x, axis, num_groups, out, min_ndim)
    what = f"x.shape along the feature axis {ax}"
    params = {"weight": (ck.param(weight, "weight", plan.param_shape, fn, what), (ax,)),
              "bias": (ck.param(bias, "bias", plan.param_shape, fn, what), (ax,))}
    # instance norm keeps the channels in their chunks; a group's channels must share a block
    whole = spatial if num_groups is None else spatial + (ax,)
    args = () if num_groups is None else (num_groups,)
    chunks = None if num_groups is None else {LETTERS[ax]: num_groups}
    return _per_sample(fn, x, whole, params, mask, (0,) + spatial, (0, ax), return_stats, args, chunks,
                       axis=axis, eps=eps)


def instance_norm(x, weight=None, bias=None, *, axis=-1, eps=1e-5, mask=None, out=None, return_stats=False):
    return _grouped("instance_norm", x, None, weight, bias, axis, eps, mask, out, return_stats, 3)


def group_norm(x, num_groups, weight=None, bias=None, *, axis=-1, eps=1e-5, mask=None, out=None,
               return_stats=False):
    G = F._check_num_groups(num_groups, "group_norm")
    return _grouped("group_norm", x, G, weight, bias, axis, eps, mask, out, return_stats, 2)


def weight_norm(v, g, *, axis=0):
    fn = "weight_norm"
    ax, gains = D._weight_gains(v.shape, g, axis, fn)
    others = tuple(a for a in range(v.ndim) if a != ax)
    return _per_sample(fn, v, others, {"g": (gains, (ax,))}, None, (), (), False, axis=axis)


# ---- per-feature functions -----------------------------------------------------------------------

def _as_stats(m: Moments) -> np.ndarray:
    s = np.empty(m.num_features, STATS)
    for f in FIELDS:
        s[f] = getattr(m, f)
    return s


def _as_moments(s: np.ndarray) -> Moments:
    return Moments._of(*(s[f] for f in FIELDS))


class BlockMoments:
    """The statistics of one block, one STATS element per feature, with length 1 along every
    other axis (the shape dask's reduction expects of a block's partial result)."""

    def __init__(self, ax):
        self.ax = ax

    def __call__(self, xb, mb=None):
        shape = [1] * xb.ndim
        shape[self.ax] = xb.shape[self.ax]
        return _as_stats(fastnorm.moments(xb, axis=self.ax, mask=mb)).reshape(shape)


def merge_blocks(s, axis, keepdims=False, **unused):
    """Merge the STATS array s over `axis` (dask's combine and aggregate)."""
    axis = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    moved = np.moveaxis(s, axis, tuple(range(len(axis))))
    parts = moved.reshape((-1,) + moved.shape[len(axis):])
    merged = np.empty(parts.shape[1:], STATS)
    for f, a in zip(FIELDS, merge_arrays(*(parts[f] for f in FIELDS))):
        merged[f] = a
    return np.expand_dims(merged, axis) if keepdims else merged


def _first(s, axis, keepdims=False, **unused):
    return s


def after(x, stats):
    """x's graph copied, its chunks computed again once `stats` are done (dask's ``bind``): the
    second pass of a per-feature function reads x anew instead of holding every chunk of the
    statistics pass in memory until the statistics are known (the whole array, out of core)."""
    from dask.graph_manipulation import bind
    return bind(x, stats)


def block_statistics(x, ax, mask=None, fn="moments"):
    """The per-feature statistics of dask array x, lazily: a (C,) dask array of STATS, chunked as
    x along the feature axis ``ax``: every block's moments, then one tree reduction."""
    idx = LETTERS[:x.ndim]
    others = tuple(a for a in range(x.ndim) if a != ax)
    operands = _mask_operand(mask, x, others, fn)
    partial = da.blockwise(BlockMoments(ax), idx, x, idx, *operands, dtype=STATS,
                           adjust_chunks={idx[a]: 1 for a in others}, meta=np.empty((0,) * x.ndim, STATS))
    return da.reduction(partial, _first, merge_blocks, combine=merge_blocks, axis=others, dtype=STATS,
                        concatenate=True, meta=np.empty((0,), STATS))


def _feature_axis(x, axis, fn) -> int:
    return D._feature_axis(axis, x.ndim, fn)


def moments(x, axis=-1, *, mask=None) -> Moments:
    fn = "moments"
    _result_dtype(x, fn)
    ax = _feature_axis(x, axis, fn)
    return _as_moments(block_statistics(x, ax, mask, fn).compute())


class BlockWithStats:
    """``fastnorm.<name>(x_block, axis=ax, stats=<the block's features' Moments>, **kwargs)``;
    with ``clip``, clipped to feature_range (min_max_scale with the statistics of x itself)."""

    def __init__(self, name, ax, kwargs, clip=False):
        self.name, self.ax, self.kwargs, self.clip = name, ax, kwargs, clip

    def __call__(self, xb, sb):
        m = _as_moments(sb)
        if self.name == "min_max_scale":
            lo, hi = self.kwargs["feature_range"]
            return scale_to_range(xb, self.ax, m.min, m.max, lo, hi, self.clip, None)
        return getattr(fastnorm, self.name)(xb, axis=self.ax, stats=m, **self.kwargs)


def _with_stats(fn, x, axis, stats, kwargs, clip=False):
    dtype = _result_dtype(x, fn)
    ax = _feature_axis(x, axis, fn)
    if D._check_stats(stats, x.shape[ax], ax, fn) is None:
        s = block_statistics(x, ax, None, fn)
    else:
        s = da.from_array(_as_stats(stats), chunks=(x.chunks[ax],))
        clip = False
    idx = LETTERS[:x.ndim]
    if stats is None:
        x = after(x, s)
    return da.blockwise(BlockWithStats(fn, ax, kwargs, clip), idx, x, idx, s, idx[ax], dtype=dtype,
                        meta=np.empty((0,) * x.ndim, dtype))


def standardize(x, axis=-1, *, stats=None, eps=0.0, out=None):
    fn = "standardize"
    _no_out(out, fn)
    return _with_stats(fn, x, axis, stats, {"eps": ck.check_eps(eps, fn)})


def min_max_scale(x, axis=-1, *, stats=None, feature_range=(0, 1), out=None):
    fn = "min_max_scale"
    _no_out(out, fn)
    return _with_stats(fn, x, axis, stats, {"feature_range": D._check_feature_range(feature_range, fn)}, clip=True)


class BlockBatchNorm:
    """Batch norm of one block with given per-feature mean and (biased) variance: the NumPy
    function's eval mode, which computes exactly what training computes from those statistics.
    With ``check``, the statistics are a STATS block and a feature with fewer than two real
    values is the ValueError of training. ``keys`` name the blocks that follow (weight, bias, mask)."""

    def __init__(self, ax, eps, check, keys):
        self.ax, self.eps, self.check, self.keys = ax, eps, check, keys

    def __call__(self, xb, sb, *blocks):
        if self.check:
            m = _as_moments(sb)
            _need_two(m.count, "batch_norm")
            mean, var = m.mean, m.var()
        else:
            mean, var = sb[..., 0], sb[..., 1]
        return fastnorm.batch_norm(xb, axis=self.ax, running_mean=mean, running_var=var, training=False,
                                   eps=self.eps, **dict(zip(self.keys, blocks)))


def _need_two(count, fn):
    if count.size and (count < 2).any():
        c = int(np.argmin(count))
        raise ValueError(f"{fn}: training needs more than one value per feature; "
                         f"got {int(count[c])} for feature {c}")


def batch_norm(x, weight=None, bias=None, *, axis=-1, running_mean=None, running_var=None, training=True,
               momentum=0.1, eps=1e-5, mask=None, out=None, return_stats=False):
    fn = "batch_norm"
    _no_out(out, fn)
    dtype = _result_dtype(x, fn)
    ck.check_bool(training, "training", fn)
    ax = _feature_axis(x, axis, fn)
    w, b, eps, momentum = F._batch_norm_args(x.shape, ax, weight, bias, running_mean, running_var, training,
                                             momentum, eps, fn)
    others = tuple(a for a in range(x.ndim) if a != ax)
    mask_operands = _mask_operand(mask, x, others, fn)
    idx = LETTERS[:x.ndim]
    stats = block_statistics(x, ax, mask, fn) if training else None
    if training and (running_mean is not None or return_stats):
        m = _as_moments(stats.compute())          # the statistics are needed now: computed once
        if x.size:
            _need_two(m.count, fn)
        if x.size and running_mean is not None:
            F._update_running(running_mean, running_var, m.mean, m.var(), m.count, momentum)
        mean, var = m.mean, m.var()
    elif training:
        mean = var = None                         # lazy: from `stats`, in every block
    else:
        mean, var = np.array(running_mean, dtype=np.float64), np.array(running_var, dtype=np.float64)
    if mean is None:
        s, check = stats, True
        x = after(x, stats)
    else:
        s, check = da.from_array(np.stack([mean, var], axis=-1), chunks=(x.chunks[ax], 2)), False
    s_index = idx[ax] + ("" if check else "z")
    operands, keys = [], []
    for key, p in (("weight", w), ("bias", b)):
        if p is not None:
            operands += _param_operand(p, x, (ax,))
            keys.append(key)
    if mask_operands:
        operands += mask_operands
        keys.append("mask")
    y = da.blockwise(BlockBatchNorm(ax, eps, check, keys), idx, x, idx, s, s_index, *operands, dtype=dtype,
                     concatenate=True, meta=np.empty((0,) * x.ndim, dtype))
    if return_stats:
        sd = ck.stats_dtype(dtype)
        return y, mean.astype(sd), ck.rstd_from_var(var, eps).astype(sd)
    return y


# ---- gradients -----------------------------------------------------------------------------------

class BlockGrads:
    """``fastnorm.<name>(dy_block, x_block, **kwargs, **{key: block})``: dx, or with ``param_shape``
    (x's block shape, 1 along the axes summed over) its dweight and dbias in float64, stacked
    along a new last axis."""

    def __init__(self, name, kwargs, keys, param_shape=None):
        self.name, self.kwargs, self.keys, self.param_shape = name, kwargs, keys, param_shape

    def __call__(self, dyb, xb, *blocks):
        dx, dw, db = getattr(fastnorm, self.name)(dyb, xb, **dict(self.kwargs, **dict(zip(self.keys, blocks))))
        if self.param_shape is None:
            return dx
        shape = [xb.shape[a] if n != 1 else 1 for a, n in enumerate(self.param_shape)]
        return np.stack([dw, db], axis=-1).astype(np.float64).reshape(shape + [2])


def _grad_inputs(fn, dy, x, whole):
    """dy (a dask array) and x (dask or NumPy) as dask arrays of the same chunks, the axes in
    `whole` one chunk each."""
    if not isinstance(x, da.Array):
        x = ck.as_input(x, "x", fn)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"{fn}: dy has shape {dy.shape}; expected {x.shape}, the shape of x")
    if not isinstance(x, da.Array):
        x = da.from_array(x, chunks=dy.chunks)
    x = x.rechunk({a: -1 for a in whole})
    return dy.rechunk(x.chunks), x


def _backward(fn, dy, x, whole, stats, weight, param_axes, mask, mask_axes, **kwargs):
    """dx per block once the axes in `whole` are one chunk each; dweight and dbias as sums of the
    blocks' (lazy, like dx). stats: {keyword: (checked flat array, its shape, its axes of x or a
    letter of its own)}."""
    dtype = _result_dtype(x, fn)
    dy, x = _grad_inputs(fn, dy, x, whole)
    idx = LETTERS[:x.ndim]
    operands, keys = [], []
    for key, (arr, shape, axes) in stats.items():
        if isinstance(axes, str):              # group norm's groups: an axis of their own
            operands += [da.from_array(arr.reshape(shape), chunks=(x.chunks[0], -1)), idx[0] + axes]
        else:
            operands += [da.from_array(arr.reshape(shape), chunks=tuple(x.chunks[a] for a in axes)),
                         _index(axes, idx)]
        keys.append(key)
    if weight is not None:
        operands += _param_operand(weight, x, param_axes)
        keys.append("weight")
    if mask is not None:
        operands += _mask_operand(mask, x, mask_axes, fn)
        keys.append("mask")
    dx = da.blockwise(BlockGrads(fn, kwargs, keys), idx, dy, idx, x, idx, *operands, dtype=dtype,
                      concatenate=True, meta=np.empty((0,) * x.ndim, dtype))
    summed = tuple(a for a in range(x.ndim) if a not in param_axes)
    param_shape = [x.shape[a] if a in param_axes else 1 for a in range(x.ndim)]
    parts = da.blockwise(BlockGrads(fn, kwargs, keys, param_shape), idx + "z", dy, idx, x, idx, *operands,
                         new_axes={"z": 2}, adjust_chunks={idx[a]: 1 for a in summed}, dtype=np.float64,
                         concatenate=True, meta=np.empty((0,) * (x.ndim + 1), np.float64))
    sums = parts.sum(axis=summed).astype(dtype)
    return dx, sums[..., 0], sums[..., 1]


class BlockBatchNormGrad:
    """One block of batch_norm_backward's two steps (fastnorm._functional): with ``sums=True``
    the block's (sum(dy), sum(dy * (x - mean)), n) per feature along a new last axis, length 1
    along the other axes (added up over the blocks); else the block's dx, from the whole batch's
    sums when a ``sums`` block is given (training), from mean and rstd alone when not.
    ``keys`` name the blocks after dy and x (mean, rstd, weight, mask, sums)."""

    def __init__(self, ax, keys, sums=False):
        self.ax, self.keys, self.sums = ax, keys, sums

    def __call__(self, dyb, xb, *blocks):
        fn = "batch_norm_backward"
        # per-feature blocks as the kernels take them (from a worker they may arrive misaligned)
        b = {k: v if k == "mask" else np.require(v, np.float64, "CA") for k, v in zip(self.keys, blocks)}
        g, arr = ck.as_input(dyb, "dy", fn), ck.as_input(xb, "x", fn)
        O, C, S = view = F._channel_plan(arr.shape, self.ax, fn)[1]
        identity = tuple(range(arr.ndim))
        xv, gv = ck.input_view(arr, identity, view), ck.input_view(g, identity, view)
        m = b["mask"].reshape(O, S) if "mask" in b else None
        if self.sums:
            sum_dy, sum_dy_xc, n = F._channel_grad_sums(gv, xv, b["mean"], m)
            shape = [1] * arr.ndim + [3]
            shape[self.ax] = C
            return np.stack([sum_dy, sum_dy_xc, np.full(C, n)], axis=-1).reshape(shape)
        s = b.get("sums")
        sums = None if s is None else (s[:, 0], s[:, 1], float(s[0, 2]) if C else 0.0)
        target = ck.Output(None, arr, arr.dtype, identity, view)
        F._channel_dx(target.view, gv, xv, b["mean"], b["rstd"], b.get("weight"), m, sums)
        return target.finish()


def param_grads_from_sums(s, rstd):
    """(dweight, dbias) along a new last axis from a block of the batch's (C, 3) sums."""
    return np.stack(F._channel_param_grads((s[:, 0], s[:, 1], s[:, 2]), rstd), axis=-1)


def _batch_norm_backward(dy, x, mean, rstd, weight, axis, training, mask, out):
    """batch_norm_backward of dask arrays: the per-feature sums of every block, added up over the
    blocks (one reduction), then dx block by block with them (training; dx needs no sums with
    constant statistics), and dweight, dbias from them."""
    fn = "batch_norm_backward"
    ck.check_bool(training, "training", fn)
    _no_out(out, fn)
    dtype = _result_dtype(x, fn)
    ax = _feature_axis(dy, axis, fn)
    dy, x = _grad_inputs(fn, dy, x, ())
    others = tuple(a for a in range(x.ndim) if a != ax)
    idx = LETTERS[:x.ndim]
    mu, r, w = F._batch_grad_args(x.shape, ax, mean, rstd, weight, fn)
    operands = {"mean": _param_operand(mu, x, (ax,)), "rstd": _param_operand(r, x, (ax,))}
    if w is not None:
        operands["weight"] = _param_operand(w, x, (ax,))
    if mask is not None:
        operands["mask"] = _mask_operand(mask, x, others, fn)
    for_sums = [k for k in operands if k in ("mean", "mask")]
    parts = da.blockwise(BlockBatchNormGrad(ax, for_sums, sums=True), idx + "z", dy, idx, x, idx,
                         *(o for k in for_sums for o in operands[k]), new_axes={"z": 3},
                         adjust_chunks={idx[a]: 1 for a in others}, dtype=np.float64, concatenate=True,
                         meta=np.empty((0,) * (x.ndim + 1), np.float64))
    sums = parts.sum(axis=others)                           # (C, 3), chunked as x along ax
    if training:
        operands["sums"] = (sums, idx[ax] + "z")
        dy, x = after((dy, x), sums)
    dx = da.blockwise(BlockBatchNormGrad(ax, list(operands)), idx, dy, idx, x, idx,
                      *(o for pair in operands.values() for o in pair), dtype=dtype, concatenate=True,
                      meta=np.empty((0,) * x.ndim, dtype))
    grads = da.blockwise(param_grads_from_sums, "cz", sums, "cz", operands["rstd"][0], "c",
                         adjust_chunks={"z": 2}, dtype=np.float64, meta=np.empty((0, 0), np.float64))
    grads = grads.astype(dtype)
    return dx, grads[:, 0], grads[:, 1]


def _layer_backward(fn, dy, x, mean, rstd, weight, axis, mask, out):
    plan, feat, others = _layer_axes(fn, x, axis, out)
    stats = {"rstd": (ck.check_stat(rstd, "rstd", plan.stats_shape, fn), plan.stats_shape, others)}
    if mean is not None or fn == "layer_norm_backward":
        stats["mean"] = (ck.check_stat(mean, "mean", plan.stats_shape, fn), plan.stats_shape, others)
    w = ck.param(weight, "weight", plan.param_shape, fn, f"x.shape along the feature axes {plan.feature}")
    return _backward(fn, dy, x, feat, stats, w, feat, mask, others, axis=axis)


def layer_norm_backward(dy, x, mean, rstd, weight=None, *, axis=-1, mask=None, out=None):
    return _layer_backward("layer_norm_backward", dy, x, mean, rstd, weight, axis, mask, out)


def rms_norm_backward(dy, x, rstd, weight=None, *, axis=-1, mask=None, out=None):
    return _layer_backward("rms_norm_backward", dy, x, None, rstd, weight, axis, mask, out)


def _grouped_backward(fn, dy, x, mean, rstd, num_groups, weight, axis, mask, out, min_ndim):
    plan, ax, spatial = _grouped_axes(fn, x, axis, num_groups, out, min_ndim)
    own = (0, ax) if num_groups is None else "y"         # instance norm: (N, C) along x's axes 0 and ax
    stats = {name: (ck.check_stat(s, name, plan.stats_shape, fn), plan.stats_shape, own)
             for name, s in (("mean", mean), ("rstd", rstd))}
    w = ck.param(weight, "weight", plan.param_shape, fn, f"x.shape along the feature axis {ax}")
    whole = spatial if num_groups is None else spatial + (ax,)
    kwargs = {"axis": axis} if num_groups is None else {"axis": axis, "num_groups": num_groups}
    return _backward(fn, dy, x, whole, stats, w, (ax,), mask, (0,) + spatial, **kwargs)


def instance_norm_backward(dy, x, mean, rstd, weight=None, *, axis=-1, mask=None, out=None):
    return _grouped_backward("instance_norm_backward", dy, x, mean, rstd, None, weight, axis, mask, out, 3)


def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, *, axis=-1, mask=None, out=None):
    G = F._check_num_groups(num_groups, "group_norm_backward")
    return _grouped_backward("group_norm_backward", dy, x, mean, rstd, G, weight, axis, mask, out, 2)


def batch_norm_backward(dy, x, mean, rstd, weight=None, *, axis=-1, training=True, mask=None, out=None):
    return _batch_norm_backward(dy, x, mean, rstd, weight, axis, training, mask, out)


# ---- batch renorm --------------------------------------------------------------------------------
#
# In training, r and d compare the batch statistics with the running statistics, which the call then
# updates: the statistics are computed at the call (one tree reduction, as batch_norm's with running
# statistics), and y is batch_norm's eval mode on every block with those statistics and the weight and
# bias that fold r and d in. Gradients: batch_norm_backward's with the weight r * weight.

__all__ += ["batch_renorm", "batch_renorm_backward"]


def batch_renorm(x, weight=None, bias=None, *, axis=-1, running_mean, running_var, r_max=3.0, d_max=5.0,
                 training=True, momentum=0.1, eps=1e-5, mask=None, out=None, return_stats=False):
    fn = "batch_renorm"
    _no_out(out, fn)
    F._renorm_needs_running(running_mean, running_var, fn)
    limits = F._renorm_limits(r_max, d_max, fn)
    dtype = _result_dtype(x, fn)
    ck.check_bool(training, "training", fn)
    ax = _feature_axis(x, axis, fn)
    w, b, eps, momentum = F._batch_norm_args(x.shape, ax, weight, bias, running_mean, running_var, training,
                                             momentum, eps, fn)
    mean, var = np.array(running_mean, dtype=np.float64), np.array(running_var, dtype=np.float64)
    r, d = np.ones_like(mean), np.zeros_like(mean)
    if training:
        m = _as_moments(block_statistics(x, ax, mask, fn).compute())
        if x.size:
            _need_two(m.count, fn)
        r, d = F._renorm_correction(m.mean, m.var(), mean, var, eps, *limits)
        if x.size:
            F._update_running(running_mean, running_var, m.mean, m.var(), m.count, momentum)
        mean, var = m.mean, m.var()
        w, b = F._renorm_affine(w, b, r, d)
    y = batch_norm(x, w, b, axis=ax, running_mean=mean, running_var=var, training=False, eps=eps, mask=mask)
    if return_stats:
        sd = ck.stats_dtype(dtype)
        return (y, *(s.astype(sd) for s in (mean, ck.rstd_from_var(var, eps), r, d)))
    return y


def batch_renorm_backward(dy, x, mean, rstd, r, d, weight=None, *, axis=-1, training=True, mask=None, out=None):
    fn = "batch_renorm_backward"
    _no_out(out, fn)
    ax = _feature_axis(dy, axis, fn)
    C = dy.shape[ax]
    w = ck.param(weight, "weight", (C,), fn, f"x.shape along the feature axis {ax}")
    r, d = ck.check_stat(r, "r", (C,), fn), ck.check_stat(d, "d", (C,), fn)
    scaled, _ = F._renorm_affine(w, None, r, d)
    dx, dweight, dbias = batch_norm_backward(dy, x, mean, rstd, scaled, axis=axis, training=training, mask=mask)
    return dx, F._renorm_dweight(r, d, dweight, dbias).astype(dbias.dtype), dbias


# ---- the residual add with layer/RMS norm ------------------------------------------------------------

def _add_norm(fn, x, residual, weight, bias, axis, eps, mask, out, residual_out, return_stats):
    """h = x + residual lazily (NumPy's add on each block: the same rounding), then the dask layer or
    RMS norm of h. residual may be a NumPy array (chunked as x). Returns (y, h[, stats])."""
    _no_out(out, fn)
    if residual_out is not None:
        raise TypeError(f"{fn}: residual_out= cannot be used with dask arrays (h is a lazy dask array); "
                        "write it with dask.array.store, to_zarr or to_npy_stack")
    if not isinstance(x, da.Array):
        x = ck.as_input(x, "x", fn)
    if not isinstance(residual, da.Array):
        residual = ck.as_input(residual, "residual", fn)
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"{fn}: residual has shape {residual.shape}; expected {x.shape}, the shape of x")
    if not isinstance(x, da.Array):
        x = da.from_array(x, chunks=residual.chunks)
    dtype = _result_dtype(x, fn)
    if not isinstance(residual, da.Array):
        residual = da.from_array(residual, chunks=x.chunks)
    res_dtype = ck.as_input(np.zeros(0, dtype=residual.dtype), "residual", fn).dtype
    if res_dtype != dtype:
        raise TypeError(f"{fn}: residual has dtype {res_dtype}; expected {dtype}, the dtype of x "
                        "(h = x + residual is rounded once in that dtype: convert one of them first)")
    h = da.add(x.astype(dtype), residual.astype(dtype).rechunk(x.chunks))
    norm = rms_norm if fn == "add_rms_norm" else layer_norm
    result = norm(h, weight, bias, axis=axis, eps=eps, mask=mask, return_stats=return_stats)
    return (result[0], h, *result[1:]) if return_stats else (result, h)


def add_layer_norm(x, residual, weight=None, bias=None, *, axis=-1, eps=1e-5, mask=None, out=None,
                   residual_out=None, return_stats=False):
    return _add_norm("add_layer_norm", x, residual, weight, bias, axis, eps, mask, out, residual_out, return_stats)


def add_rms_norm(x, residual, weight=None, bias=None, *, axis=-1, eps=1e-5, mask=None, out=None,
                 residual_out=None, return_stats=False):
    return _add_norm("add_rms_norm", x, residual, weight, bias, axis, eps, mask, out, residual_out, return_stats)
