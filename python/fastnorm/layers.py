"""Stateful layers for notebooks and hand-written NumPy training loops.

Each layer holds NumPy arrays ``weight`` and ``bias`` (None when ``affine=False``), has
``training`` with ``train()``/``eval()``, is called as ``layer(x, mask=None) -> y`` (keeping what
backward needs) and has ``backward(dy) -> dx``, which also sets ``dweight`` and ``dbias``.
The layers are thin: every number comes from the functions in :mod:`fastnorm`.

Example
-------
>>> import numpy as np, fastnorm
>>> ln = fastnorm.LayerNorm(4)
>>> x = np.arange(8.0).reshape(2, 4)
>>> y = ln(x)
>>> dx = ln.backward(np.ones_like(y))
>>> ln.dbias
array([2., 2., 2., 2.])
"""
from __future__ import annotations

import contextlib

import numpy as np

from . import _checks as ck
from . import _functional as F
from ._moments import Moments

__all__ = ["LayerNorm", "RMSNorm", "BatchNorm", "BatchRenorm", "InstanceNorm", "GroupNorm"]


@contextlib.contextmanager
def _float64_stats():
    """Forward calls inside return float64 statistics for any x: the layers keep them for backward,
    so float32 inputs with a large mean offset still get gradients accurate to float32."""
    token = F.float64_stats.set(True)
    try:
        yield
    finally:
        F.float64_stats.reset(token)


class _Norm:
    """Shared state: parameters, train/eval, and what the last forward call kept for backward."""

    _default_affine = True

    def __init__(self, param_shape, *, eps, affine, dtype):
        # what every call would refuse is refused here, at once (checks shared with the functions)
        fn = type(self).__name__
        self.eps = ck.check_eps(eps, fn)
        affine = ck.check_bool(affine, "affine", fn)
        dtype = np.dtype(dtype)
        if dtype.kind != "f" and not ck.is_bfloat16(dtype):
            raise TypeError(f"{fn}: dtype must be a float dtype for weight and bias; got {dtype}")
        self.weight_shape = tuple(param_shape)
        self.training = True
        self.weight = np.ones(param_shape, dtype=dtype) if affine else None
        self.bias = np.zeros(param_shape, dtype=dtype) if affine else None
        self.dweight = self.dbias = None
        self._saved = None

    def train(self, mode: bool = True):
        self.training = ck.check_bool(mode, "mode", f"{type(self).__name__}.train")
        return self

    def _input_copy(self, x):
        """A private copy of x for backward, in x's layout. The caller may change x after the call (the
        in-place residual ``x += f(layer(x))``): backward gives the gradient at the input the layer saw,
        as PyTorch does (it refuses instead). Call after the forward function accepted x. The previous
        call's copy is reused when it fits, so a training loop pays one copy of x per step, no allocation."""
        arr = np.asarray(x)
        if not isinstance(x, np.ndarray):
            return arr                    # made from a list here: no one else holds it
        kept = self._saved[0] if self._saved is not None else None
        if kept is not None and kept.shape == arr.shape and kept.dtype == arr.dtype and kept is not arr:
            np.copyto(kept, arr)
            return kept
        return np.array(arr, order="K", copy=True)

    def eval(self):
        return self.train(False)

    def parameters(self):
        """[(weight, dweight), (bias, dbias)] for a hand-written optimizer step (empty without affine)."""
        if self.weight is None:
            return []
        return [(self.weight, self.dweight), (self.bias, self.dbias)]

    def _need_saved(self):
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward: call the layer on an input first")
        return self._saved

    def _set_grads(self, dx, dw, db):
        if self.weight is not None:
            self.dweight, self.dbias = dw.astype(self.weight.dtype), db.astype(self.bias.dtype)
        return dx

    def _size_args(self) -> list[str]:
        """The leading arguments of repr: the sizes the layer was built with."""
        return [str(self.weight_shape[0])]

    def _option_args(self) -> list[str]:
        """repr's keyword arguments after eps (affine only when it differs from the class default)."""
        return []

    def __repr__(self):
        args = [*self._size_args(), f"eps={float(self.eps)!r}", *self._option_args(), f"axis={self.axis!r}"]
        if (self.weight is not None) != self._default_affine:
            args.append(f"affine={self.weight is not None}")
        return f"{type(self).__name__}({', '.join(args)})"

    def _check_features(self, x):
        """A clear error, naming the axis that would fit, when x does not have the layer's size along
        its single feature axis (PyTorch's (N, C, H, W) input with the default axis=-1, for one)."""
        n, axis, shape = self.weight_shape[0], self.axis, np.shape(x)
        if len(self.weight_shape) != 1 or not isinstance(axis, (int, np.integer)) or not -len(shape) <= axis < len(shape):
            return                   # tuple axes, bad axes: the functions' own messages
        if shape[axis] == n:
            return
        fits = [k for k in range(1, len(shape)) if k != axis % len(shape) and shape[k] == n]
        hint = (f"; x.shape[{fits[0]}] == {n}: for channels-first input such as PyTorch's (N, C, H, W) use "
                f"{type(self).__name__}({', '.join(self._size_args())}, axis={fits[0]})") if fits else ""
        raise ValueError(f"{type(self).__name__}: x has shape {shape}, {shape[axis]} along axis={axis}; the layer "
                         f"was built for {n}{hint}")


def _mask_copy(mask):
    """The mask backward will use: a copy, like x's (masks are small: one byte per position)."""
    return None if mask is None else np.array(mask, copy=True)


def _sizes(value, name: str, fn: str) -> tuple[int, ...]:
    """A size or a tuple of sizes, each a positive int (NumPy ints too; not 4.7, not True)."""
    sizes = (value,) if np.ndim(value) == 0 else tuple(value)
    if not sizes:
        raise ValueError(f"{fn}: {name} must name at least one size; got {value!r}")
    return tuple(ck.whole_number(n, name, fn, 1) for n in sizes)


def _feature_axis(normalized_shape, axis, fn):
    shape = _sizes(normalized_shape, "normalized_shape", fn)
    if axis == -1 and len(shape) > 1:      # PyTorch's convention: the trailing len(shape) axes
        axis = tuple(range(-len(shape), 0))
    return shape, axis


class LayerNorm(_Norm):
    """Layer norm over ``axis`` (default: the trailing ``len(normalized_shape)`` axes)."""

    _rms = False

    def __init__(self, normalized_shape, *, axis=-1, eps=1e-5, affine=True, dtype=np.float64):
        shape, self.axis = _feature_axis(normalized_shape, axis, type(self).__name__)
        super().__init__(shape, eps=eps, affine=affine, dtype=dtype)
        self.normalized_shape = shape

    def _size_args(self):
        shape = self.normalized_shape
        return [str(shape[0]) if len(shape) == 1 else str(shape)]

    def __call__(self, x, mask=None):
        self._check_features(x)
        if self._rms:
            with _float64_stats():
                y, rstd = F.rms_norm(x, self.weight, self.bias, axis=self.axis, eps=self.eps, mask=mask,
                                     return_stats=True)
            self._saved = (self._input_copy(x), None, rstd, _mask_copy(mask))
        else:
            with _float64_stats():
                y, mean, rstd = F.layer_norm(x, self.weight, self.bias, axis=self.axis, eps=self.eps, mask=mask,
                                             return_stats=True)
            self._saved = (self._input_copy(x), mean, rstd, _mask_copy(mask))
        return y

    def backward(self, dy):
        x, mean, rstd, mask = self._need_saved()
        if self._rms:
            grads = F.rms_norm_backward(dy, x, rstd, self.weight, axis=self.axis, mask=mask)
        else:
            grads = F.layer_norm_backward(dy, x, mean, rstd, self.weight, axis=self.axis, mask=mask)
        return self._set_grads(*grads)


class RMSNorm(LayerNorm):
    """RMS norm over ``axis``: ``x / sqrt(mean(x**2) + eps) * weight + bias``."""

    _rms = True


class BatchNorm(_Norm):
    """Batch norm of ``num_features`` features along ``axis``, PyTorch's way.

    In training the batch statistics normalize and, with ``track_running_stats``, update
    ``running_mean``/``running_var`` (momentum, unbiased variance); in eval the running
    statistics normalize. Without ``track_running_stats`` batch statistics are always used.
    ``momentum=None`` is PyTorch's cumulative moving average: the running statistics are the plain
    average of every training batch's (each update uses ``1 / num_batches_tracked``).
    """

    def __init__(self, num_features, *, axis=-1, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float64):
        C = ck.whole_number(num_features, "num_features", "BatchNorm", 1)
        super().__init__((C,), eps=eps, affine=affine, dtype=dtype)
        if momentum is not None:
            value = ck.real_number(momentum, "momentum", "BatchNorm")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"BatchNorm: momentum must be in [0, 1] or None; got {momentum!r}")
        self.axis, self.momentum = axis, momentum
        self.track_running_stats = ck.check_bool(track_running_stats, "track_running_stats", "BatchNorm")
        self.running_mean = np.zeros(C, dtype=dtype) if track_running_stats else None
        self.running_var = np.ones(C, dtype=dtype) if track_running_stats else None
        self.num_batches_tracked = 0      # training calls that updated the running statistics

    def _option_args(self):
        tracking = [] if self.track_running_stats else ["track_running_stats=False"]
        momentum = None if self.momentum is None else float(self.momentum)
        return [f"momentum={momentum!r}", *tracking]

    def __repr__(self):
        return f"{super().__repr__()[:-1]}, training={self.training})"

    def _step_momentum(self) -> float:
        """The momentum of this training step: PyTorch's cumulative moving average for
        ``momentum=None`` (every batch weighs the same), else ``momentum``."""
        return 1.0 / (self.num_batches_tracked + 1) if self.momentum is None else self.momentum

    def _count_batch(self, y):
        if self.training and self.track_running_stats and np.size(y):   # an empty batch updates nothing
            self.num_batches_tracked += 1

    def __call__(self, x, mask=None):
        self._check_features(x)
        batch_stats = self.training or not self.track_running_stats
        with _float64_stats():
            y, mean, rstd = F.batch_norm(x, self.weight, self.bias, axis=self.axis, running_mean=self.running_mean,
                                         running_var=self.running_var, training=batch_stats,
                                         momentum=self._step_momentum(), eps=self.eps, mask=mask, return_stats=True)
        self._count_batch(y)
        self._saved = (self._input_copy(x), mean, rstd, _mask_copy(mask), batch_stats)
        return y

    def backward(self, dy):
        x, mean, rstd, mask, batch_stats = self._need_saved()
        grads = F.batch_norm_backward(dy, x, mean, rstd, self.weight, axis=self.axis, training=batch_stats,
                                      mask=mask)
        return self._set_grads(*grads)

    def calibrate(self, batches):
        """PreciseBN (Wu and Johnson, 2021): set the running statistics to the exact statistics of
        every real element of ``batches``, instead of their momentum average over training steps.

        ``batches`` is an iterable of arrays (NumPy or dask) or of ``(x, mask)`` pairs. Afterwards
        ``running_mean`` is their mean per feature and ``running_var`` their unbiased variance
        (PyTorch's convention). A feature with fewer than two real values is a ValueError, and the
        running statistics are then left as they were. Returns the layer.

        Examples
        --------
        >>> import numpy as np, fastnorm
        >>> bn = fastnorm.BatchNorm(2)
        >>> _ = bn.calibrate([np.array([[0.0, 1.0], [2.0, 1.0]]), np.array([[4.0, 1.0]])])
        >>> bn.running_mean, bn.running_var
        (array([2., 1.]), array([4., 0.]))
        """
        if self.running_mean is None:
            raise ValueError("BatchNorm.calibrate: this layer has no running statistics (track_running_stats=False)")
        total = Moments(self.running_mean.shape[0])
        for batch in batches:
            x, mask = batch if isinstance(batch, tuple) else (batch, None)
            total.update(x, axis=self.axis, mask=mask)
        if (total.count < 2).any():
            c = int(np.argmin(total.count))
            raise ValueError(f"BatchNorm.calibrate: the batches give {int(total.count[c])} real values for feature "
                             f"{c}; the running variance needs at least 2 per feature")
        self.running_mean[...] = total.mean
        self.running_var[...] = total.var(ddof=1)
        return self


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe, 2017) of ``num_features`` features along ``axis``.

    Training normalizes with the batch statistics corrected toward the running ones by r and d,
    clipped to ``[1/r_max, r_max]`` and ``[-d_max, d_max]`` (:func:`fastnorm.batch_renorm`), and
    updates ``running_mean``/``running_var`` as :class:`BatchNorm` does (``momentum=None``: the
    cumulative average). Eval is batch norm's eval. ``r_max`` and ``d_max`` may be set between
    steps: Ioffe starts at 1 and 0 (batch norm) and widens them once the running statistics settle.

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> layer = fastnorm.BatchRenorm(2, r_max=1.0, d_max=0.0)      # batch norm, at first
    >>> for step in range(3):
    ...     layer.r_max, layer.d_max = 1.0 + step, 2.5 * step        # the ramp, here in 3 steps
    ...     y = layer(np.random.default_rng(step).standard_normal((8, 2)))
    >>> layer
    BatchRenorm(2, eps=1e-05, momentum=0.1, r_max=3.0, d_max=5.0, axis=-1, training=True)
    """

    def __init__(self, num_features, *, axis=-1, eps=1e-5, momentum=0.1, r_max=3.0, d_max=5.0, affine=True,
                 dtype=np.float64):
        super().__init__(num_features, axis=axis, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=True, dtype=dtype)
        self._limits = F._renorm_limits(r_max, d_max, "BatchRenorm")

    @property
    def r_max(self) -> float:
        """r is clipped to ``[1/r_max, r_max]``; >= 1, ``inf`` for no clipping."""
        return self._limits[0]

    @r_max.setter
    def r_max(self, value):
        self._limits = F._renorm_limits(value, self.d_max, "BatchRenorm")

    @property
    def d_max(self) -> float:
        """d is clipped to ``[-d_max, d_max]``; >= 0, ``inf`` for no clipping."""
        return self._limits[1]

    @d_max.setter
    def d_max(self, value):
        self._limits = F._renorm_limits(self.r_max, value, "BatchRenorm")

    def _option_args(self):
        return [*super()._option_args(), f"r_max={self.r_max!r}", f"d_max={self.d_max!r}"]

    def __call__(self, x, mask=None):
        self._check_features(x)
        with _float64_stats():
            y, *stats = F.batch_renorm(x, self.weight, self.bias, axis=self.axis, running_mean=self.running_mean,
                                       running_var=self.running_var, r_max=self.r_max, d_max=self.d_max,
                                       training=self.training, momentum=self._step_momentum(), eps=self.eps,
                                       mask=mask, return_stats=True)
        self._count_batch(y)
        self._saved = (self._input_copy(x), *stats, _mask_copy(mask), self.training)
        return y

    def backward(self, dy):
        x, mean, rstd, r, d, mask, training = self._need_saved()
        grads = F.batch_renorm_backward(dy, x, mean, rstd, r, d, self.weight, axis=self.axis, training=training,
                                        mask=mask)
        return self._set_grads(*grads)


class GroupNorm(_Norm):
    """Group norm: ``num_channels`` channels along ``axis`` in ``num_groups`` consecutive groups."""

    def __init__(self, num_groups, num_channels, *, axis=-1, eps=1e-5, affine=True, dtype=np.float64):
        C = ck.whole_number(num_channels, "num_channels", "GroupNorm", 1)
        G = ck.whole_number(num_groups, "num_groups", "GroupNorm", 1)
        if C % G:
            raise ValueError(f"GroupNorm: num_groups={G} does not divide num_channels={C}")
        super().__init__((C,), eps=eps, affine=affine, dtype=dtype)
        self.num_groups, self.axis = G, axis

    def _size_args(self):
        return [str(self.num_groups), str(self.weight_shape[0])]

    def __call__(self, x, mask=None):
        self._check_features(x)
        with _float64_stats():
            y, mean, rstd = F.group_norm(x, self.num_groups, self.weight, self.bias, axis=self.axis, eps=self.eps,
                                         mask=mask, return_stats=True)
        self._saved = (self._input_copy(x), mean, rstd, _mask_copy(mask))
        return y

    def backward(self, dy):
        x, mean, rstd, mask = self._need_saved()
        grads = F.group_norm_backward(dy, x, mean, rstd, self.num_groups, self.weight, axis=self.axis, mask=mask)
        return self._set_grads(*grads)


class InstanceNorm(_Norm):
    """Instance norm of ``num_features`` channels along ``axis``; no affine parameters by default."""

    def __init__(self, num_features, *, axis=-1, eps=1e-5, affine=False, dtype=np.float64):
        super().__init__((ck.whole_number(num_features, "num_features", "InstanceNorm", 1),), eps=eps, affine=affine, dtype=dtype)
        self.axis = axis

    _default_affine = False

    def __call__(self, x, mask=None):
        self._check_features(x)
        with _float64_stats():
            y, mean, rstd = F.instance_norm(x, self.weight, self.bias, axis=self.axis, eps=self.eps, mask=mask,
                                            return_stats=True)
        self._saved = (self._input_copy(x), mean, rstd, _mask_copy(mask))
        return y

    def backward(self, dy):
        x, mean, rstd, mask = self._need_saved()
        grads = F.instance_norm_backward(dy, x, mean, rstd, self.weight, axis=self.axis, mask=mask)
        return self._set_grads(*grads)
