"""Mergeable per-feature statistics: count, mean, m2 (sum of squared deviations), min and max.

``moments(x)`` takes them in one pass of a C kernel (src/summary.c), per feature over every
other axis, as batch norm does. Two ``Moments`` merge into the statistics of the concatenated data,
so statistics can be gathered chunk by chunk (streaming), over a whole dataset (PreciseBN), or
on many machines (Dask), and merged in any order and grouping.
"""
from __future__ import annotations

import numpy as np

from . import _checks as ck
from . import _core
from ._dispatch import dask_aware
from ._threads import get_num_threads

__all__ = ["Moments", "moments"]

FIELDS = ("count", "mean", "m2", "min", "max")


def merge_arrays(count, mean, m2, lo, hi, axis=0):
    """Merge k sets of statistics stacked along ``axis`` into one (the axis is removed).

    With n = sum n_i, the differences d_i = mean_i - mean_r to one part r are exact in floating
    point when the means are close (the large-offset case), and every term is taken from them::

        dbar = sum n_i d_i / n          mean = mean_r + dbar
        m2   = sum m2_i + sum n_i (d_i - dbar)**2

    This is Chan et al.'s formula for k parts at once, with no cancellation and no error of
    eps * |mean| in the spread of the means. Parts with count 0 add nothing.
    """
    count, mean, m2 = (np.moveaxis(np.asarray(a, dtype=np.float64), axis, 0) for a in (count, mean, m2))
    lo, hi = (np.moveaxis(np.asarray(a, dtype=np.float64), axis, 0) for a in (lo, hi))
    real = count > 0
    n = count.sum(axis=0)
    some = n > 0
    ref = np.take_along_axis(mean, np.argmax(real, axis=0)[None], axis=0)[0]   # first part with elements
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        d = np.where(real, mean - ref, 0.0)
        dbar = np.where(some, (count * d).sum(axis=0) / np.where(some, n, 1.0), 0.0)
        spread = np.where(real, count * (d - dbar) ** 2, 0.0).sum(axis=0)
        out_mean = np.where(some, ref + dbar, np.nan)
        out_m2 = np.where(real, m2, 0.0).sum(axis=0) + spread
        # NaN in a part with elements propagates (np.min/np.max), empty parts are left out
        out_min = np.where(some, np.min(np.where(real, lo, np.inf), axis=0, initial=np.inf), np.nan)
        out_max = np.where(some, np.max(np.where(real, hi, -np.inf), axis=0, initial=-np.inf), np.nan)
    return n, out_mean, out_m2, out_min, out_max


class Moments:
    """Per-feature count, mean, m2, min and max that merge exactly (to rounding).

    ``Moments(num_features)`` is an empty accumulator (count 0); :func:`moments` takes them from
    an array. ``m1 + m2`` (or ``Moments.merge(m1, m2, ...)``) gives the statistics of the
    concatenated data; ``m.update(x)`` adds a chunk in place.

    Attributes
    ----------
    count, mean, m2, min, max : ndarray
        ``(num_features,)`` float64. ``m2`` is the sum of squared deviations from the mean. A
        feature with no element has count 0, m2 0 and NaN mean, min and max. NaN in a feature's
        data makes its mean, m2, min and max NaN (as NumPy's mean, var, min and max).

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> a, b = np.array([[1.0, 10.0], [3.0, 10.0]]), np.array([[5.0, 40.0]])
    >>> m = fastnorm.moments(a) + fastnorm.moments(b)
    >>> m.mean, m.var()
    (array([ 3., 20.]), array([  2.66666667, 200.        ]))
    >>> m.min, m.max
    (array([ 1., 10.]), array([ 5., 40.]))
    """

    __slots__ = FIELDS

    def __init__(self, num_features):
        if not (type(num_features) is int or isinstance(num_features, np.integer)) or num_features < 0:
            raise ValueError(f"Moments: num_features must be an int >= 0; got {num_features!r}")
        C = int(num_features)
        self.count, self.m2 = np.zeros(C), np.zeros(C)
        self.mean, self.min, self.max = np.full(C, np.nan), np.full(C, np.nan), np.full(C, np.nan)

    @classmethod
    def _of(cls, count, mean, m2, lo, hi) -> Moments:
        m = cls.__new__(cls)
        m.count, m.mean, m.m2, m.min, m.max = (np.ascontiguousarray(a, dtype=np.float64).reshape(-1)
                                               for a in (count, mean, m2, lo, hi))
        return m

    @property
    def num_features(self) -> int:
        return self.count.shape[0]

    def var(self, ddof=0) -> np.ndarray:
        """``m2 / (count - ddof)`` per feature; NaN where ``count <= ddof``."""
        denom = self.count - ddof
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, self.m2 / np.where(denom > 0, denom, 1.0), np.nan)

    def std(self, ddof=0) -> np.ndarray:
        """``sqrt(var(ddof))`` per feature."""
        return np.sqrt(self.var(ddof))

    @staticmethod
    def merge(*parts: Moments) -> Moments:
        """The statistics of all parts' data together; the parts are not changed.

        Examples
        --------
        >>> import fastnorm
        >>> parts = [fastnorm.moments([[float(i)]]) for i in range(4)]
        >>> fastnorm.Moments.merge(*parts).mean
        array([1.5])
        """
        if not parts:
            raise ValueError("Moments.merge: needs at least one Moments")
        for p in parts:
            if not isinstance(p, Moments):
                raise TypeError(f"Moments.merge: expected Moments; got {type(p).__name__}")
            if p.num_features != parts[0].num_features:
                raise ValueError(f"Moments.merge: {p.num_features} features do not match {parts[0].num_features}")
        stacked = (np.stack([getattr(p, f) for p in parts]) for f in FIELDS)
        return Moments._of(*merge_arrays(*stacked))

    def __add__(self, other):
        if not isinstance(other, Moments):
            return NotImplemented
        return Moments.merge(self, other)

    def update(self, x, *, axis=-1, mask=None) -> Moments:
        """Add the elements of ``x`` (per feature along ``axis``, as :func:`moments`) in place.

        Examples
        --------
        >>> import numpy as np, fastnorm
        >>> m = fastnorm.Moments(2)
        >>> for chunk in np.array_split(np.arange(10.0).reshape(5, 2), 3):
        ...     _ = m.update(chunk)
        >>> m.count, m.mean
        (array([5., 5.]), array([4., 5.]))
        """
        part = moments(x, axis=axis, mask=mask)
        if part.num_features != self.num_features:
            raise ValueError(f"Moments.update: x has {part.num_features} features along axis {axis}; "
                             f"this Moments has {self.num_features}")
        merged = Moments.merge(self, part)
        for f in FIELDS:
            setattr(self, f, getattr(merged, f))
        return self

    def __getstate__(self):
        return {f: getattr(self, f) for f in FIELDS}

    def __setstate__(self, state):
        for f in FIELDS:
            setattr(self, f, state[f])

    def __repr__(self):
        def show(a):
            return np.array2string(a, precision=6, threshold=8, edgeitems=3, separator=", ", max_line_width=10**6)
        lines = [f"Moments({self.num_features} features)"]
        if self.num_features:
            lines += [f"  {f:<5} {show(v)}" for f, v in
                      (("count", self.count), ("mean", self.mean), ("std", self.std()), ("min", self.min),
                       ("max", self.max))]
        return "\n".join(lines)


@dask_aware
def moments(x, axis=-1, *, mask=None) -> Moments:
    """Per-feature statistics of ``x`` in one pass: count, mean, m2, min and max, as a :class:`Moments`.

    The statistics of :func:`fastnorm.batch_norm`: per feature along ``axis``, over every other
    axis (the columns of a ``(samples, features)`` table), in float64 whatever x's dtype.

    Parameters
    ----------
    x : array_like or dask array
        float16/32/64, integer or bool; any layout. A dask array gives a computed ``Moments``
        (one tree reduction over its chunks).
    axis : int
        The feature axis.
    mask : bool array, optional
        Shape ``x.shape`` without the feature axis; only elements where it is True count.

    Returns
    -------
    Moments

    Examples
    --------
    >>> import numpy as np, fastnorm
    >>> m = fastnorm.moments(np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]]))
    >>> m.count, m.mean, m.std(ddof=1), m.max
    (array([3., 3.]), array([ 3., 20.]), array([ 2., 10.]), array([ 5., 30.]))
    """
    fn = "moments"
    arr = ck.as_input(x, "x", fn)
    if arr.ndim == 0:
        raise ValueError(f"{fn}: x is a 0-d array (a scalar); it needs at least one axis, the feature axis")
    (ax,) = ck.feature_axes(axis, arr.ndim, fn, allow_tuple=False)
    view = (ck.count(arr.shape[:ax]), arr.shape[ax], ck.count(arr.shape[ax + 1:]))
    m = ck.check_mask(mask, arr.shape[:ax] + arr.shape[ax + 1:], fn)
    m = None if m is None else m.reshape(view[0], view[2])
    xv = ck.input_view(arr, tuple(range(arr.ndim)), view)
    count, mean, m2, lo, hi = (np.empty(view[1]) for _ in FIELDS)
    _core.channel_summary(count, mean, m2, lo, hi, xv, m, get_num_threads())
    return Moments._of(count, mean, m2, lo, hi)
