"""Argument checking and the canonical strided views the C kernels work on.

Every public function turns its arguments into clean NumPy arrays here, so the C entry points
receive aligned, native-endian float16/32/64 (or bfloat16) views and every error message is written once.
"""
from __future__ import annotations

import math
import numbers
import operator
import sys

import numpy as np
from numpy.lib.array_utils import normalize_axis_index, normalize_axis_tuple

from . import _core

KERNEL_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))   # and bfloat16 (is_bfloat16)


def is_bfloat16(dtype: np.dtype) -> bool:
    """Whether dtype is ml_dtypes.bfloat16, a user dtype of kind 'V' (computed in float32 by the
    kernels). ml_dtypes is never imported here: an array of its dtype exists only once it is."""
    if dtype.kind != "V" or dtype.itemsize != 2:
        return False
    ml_dtypes = sys.modules.get("ml_dtypes")
    return ml_dtypes is not None and dtype == ml_dtypes.bfloat16


def is_real_dtype(dtype: np.dtype) -> bool:
    """Real numbers a parameter or statistic may hold: bool, integers, floats, bfloat16."""
    return dtype.kind in "biuf" or is_bfloat16(dtype)


def as_input(x, name: str, fn: str) -> np.ndarray:
    """x as an aligned native float16/32/64 array; integers and bool become float64.

    No copy for arrays that already qualify; byte-swapped or misaligned data is copied.
    """
    refuse_masked(x, name, fn, hint=f"{name}.data and mask=~{name}.mask (fastnorm's mask is True for real elements)"
                  if name == "x" else None)
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{fn}: {name} could not be turned into an array: {err}") from None
    kind = arr.dtype.kind
    if kind in "biu":
        return arr.astype(np.float64)
    if kind == "f" and arr.dtype.itemsize in (2, 4, 8):
        if not arr.dtype.isnative or not arr.flags.aligned:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return arr
    if is_bfloat16(arr.dtype):
        _core.register_bfloat16(arr.dtype)
        return arr if arr.flags.aligned else arr.copy()
    raise TypeError(
        f"{fn}: {name} must hold real numbers (float16, bfloat16, float32, float64, integer or bool); "
        f"got dtype {arr.dtype}"
    )


def refuse_masked(a, name: str, fn: str, hint: str | None = None) -> None:
    """numpy.ma arrays are refused for every argument: the kernels see the data and would ignore
    the mask (or, for outputs, leave it stale)."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{fn}: {name} is a numpy.ma.MaskedArray, whose mask would be ignored; pass "
                        f"{hint or name + '.data (or np.ma.filled(' + name + ', value))'}")


def stats_dtype(dtype: np.dtype) -> np.dtype:
    """Statistics are float64 for float64 input, float32 otherwise (as the contract says)."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def check_bool(value, name: str, fn: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be True or False; got {value!r}")
    return bool(value)


def real_number(value, name: str, fn: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a real number; got {value!r}")
    return float(value)


def whole_number(value, name: str, fn: str, minimum: int, maximum: int | None = None) -> int:
    """An int argument: a Python or NumPy int (anything operator.index takes, as NumPy does for
    axis), not bool, in [minimum, maximum]; TypeError for other types, ValueError out of range."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be an int; got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int; got {value!r}") from None
    if n < minimum or (maximum is not None and n > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{fn}: {name} must be an int {bound}; got {n!r}")
    return n


def check_eps(eps, fn: str) -> float:
    value = real_number(eps, "eps", fn)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{fn}: eps must be a finite number >= 0; got {eps!r}")
    return value


def feature_axes(axis, ndim: int, fn: str, allow_tuple: bool) -> tuple[int, ...]:
    """The feature axes, normalized to 0..ndim-1 and sorted."""
    if isinstance(axis, (tuple, list)):
        if not allow_tuple:
            raise TypeError(f"{fn}: axis must be a single int for this function; got {axis!r}")
        if len(axis) == 0:
            raise ValueError(f"{fn}: axis must name at least one feature axis; got {axis!r}")
    elif not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
        raise TypeError(f"{fn}: axis must be an int{' or a tuple of ints' if allow_tuple else ''}; got {axis!r}")
    try:
        axes = normalize_axis_tuple(axis, ndim, argname="axis")
    except (ValueError, OverflowError) as err:  # AxisError is a ValueError too: keep its type
        if isinstance(err, (np.exceptions.AxisError, OverflowError)):   # OverflowError: beyond int64
            raise np.exceptions.AxisError(f"{fn}: axis {axis!r} is out of bounds for x with {ndim} dimensions") from None
        raise ValueError(f"{fn}: axis {axis!r} repeats an axis") from None
    return tuple(sorted(axes))


def batch_axis_feature(axis, ndim: int, fn: str, min_ndim: int) -> int:
    """The feature axis of instance/group norm: an int that is not the batch axis 0."""
    if ndim < min_ndim:
        raise ValueError(f"{fn}: x must have at least {min_ndim} dimensions (batch, channels, ...); got {ndim}")
    (ax,) = feature_axes(axis, ndim, fn, allow_tuple=False)
    if ax == 0:
        raise ValueError(f"{fn}: axis must not be 0, the batch axis; got axis={axis!r}")
    return ax


def axis_hint(length: int, x_shape: tuple[int, ...], axes: tuple[int, ...]) -> str:
    """When a per-feature array of `length` does not fit the one feature axis in `axes` but fits
    other non-batch axes of x: '; x.shape[1] == 3: did you mean axis=1 ...?', else ''."""
    ndim = len(x_shape)
    if len(axes) != 1 or ndim < 2:
        return ""
    current = axes[0] % ndim
    fits = [k for k in range(1, ndim) if k != current and x_shape[k] == length]
    if not fits:
        return ""
    where = ", ".join(f"x.shape[{k}] == {length}" for k in fits)
    channels_first = " (channels first, as PyTorch's (N, C, H, W))" if fits[0] == 1 and ndim >= 3 else ""
    return f"; {where}: did you mean {' or '.join(f'axis={k}' for k in fits)}{channels_first}?"


def param(p, name: str, shape: tuple[int, ...], fn: str, what: str, x_shape=None, axes=()) -> np.ndarray | None:
    """weight/bias-like parameter: None, or a contiguous float64 copy of shape `shape`, flattened.

    With `x_shape` and the feature `axes`, a 1-d mismatch says which other axis would fit."""
    if p is None:
        return None
    refuse_masked(p, name, fn)
    arr = np.asarray(p)
    if not is_real_dtype(arr.dtype):
        raise TypeError(f"{fn}: {name} must hold real numbers; got dtype {arr.dtype}")
    if arr.shape != shape:
        hint = axis_hint(arr.shape[0], x_shape, axes) if x_shape is not None and arr.ndim == 1 else ""
        raise ValueError(f"{fn}: {name} has shape {arr.shape}; expected {shape} ({what}){hint}")
    return np.array(arr, dtype=np.float64).reshape(-1)    # a copy: it must not alias out


def check_mask(mask, shape: tuple[int, ...], fn: str) -> np.ndarray | None:
    """mask: None, or a bool array of exactly `shape` (x.shape without the feature axes)."""
    if mask is None:
        return None
    refuse_masked(mask, "mask", fn)
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        raise TypeError(f"{fn}: mask must be a boolean array (True = real element); got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{fn}: mask has shape {arr.shape}; expected {shape} (x.shape without the feature axes)")
    return arr


def check_out(out, shape: tuple[int, ...], dtype: np.dtype, fn: str, name: str = "out") -> np.ndarray | None:
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray; got {type(out).__name__}")
    if isinstance(out, np.matrix):
        raise TypeError(f"{fn}: {name} is a numpy.matrix, which cannot take the kernels' shapes (it is always "
                        f"2-d); pass np.asarray({name}), a plain view of the same memory")
    refuse_masked(out, name, fn)
    if out.shape != shape:
        raise ValueError(f"{fn}: {name} has shape {out.shape}; expected {shape}, the shape of x")
    if not _holds_result(out.dtype, dtype):
        raise ValueError(f"{fn}: {name} has dtype {out.dtype}; expected {dtype}, the dtype of the result")
    if not out.flags.writeable:
        raise ValueError(f"{fn}: {name} is read-only; expected a writeable array")
    if overlaps_itself(out):
        raise ValueError(f"{fn}: {name} has elements that share memory (a broadcast or as_strided view); "
                         "expected an array whose every element has memory of its own")
    return out


def _holds_result(out_dtype: np.dtype, dtype: np.dtype) -> bool:
    """out may hold a result of `dtype`: a float of its size (any byte order), or bfloat16 itself."""
    if is_bfloat16(out_dtype) or is_bfloat16(dtype):
        return out_dtype == dtype
    return out_dtype.kind == "f" and out_dtype.itemsize == dtype.itemsize


def check_stat(s, name: str, shape: tuple[int, ...], fn: str) -> np.ndarray:
    """mean/rstd given to a backward function: contiguous float64 of `shape`."""
    if s is None:
        raise ValueError(f"{fn}: {name} is required (from return_stats=True of the forward call)")
    refuse_masked(s, name, fn)
    arr = np.asarray(s)
    if not is_real_dtype(arr.dtype):
        raise TypeError(f"{fn}: {name} must hold real numbers; got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{fn}: {name} has shape {arr.shape}; expected {shape}")
    return np.array(arr, dtype=np.float64).reshape(-1)    # a copy: it must not alias out


def same_shape(dy: np.ndarray, x: np.ndarray, fn: str) -> None:
    if dy.shape != x.shape:
        raise ValueError(f"{fn}: dy has shape {dy.shape}; expected {x.shape}, the shape of x")


def count(shape) -> int:
    return math.prod(int(n) for n in shape)


def rstd_from_var(var: np.ndarray, eps: float) -> np.ndarray:
    """1/sqrt(var + eps), and 0 where var + eps == 0 (the C kernels use the same rule)."""
    ve = np.asarray(var, dtype=np.float64) + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        r = 1.0 / np.sqrt(ve)
    return np.where(ve == 0.0, 0.0, r)


# ---- memory shared between arguments -----------------------------------------------------------
#
# Any input may share memory with any output: the result is that of the call made with copies of
# the inputs, as for NumPy's ufuncs. An input that may share memory with an output is copied first
# (detach), except x or dy written in place by the kernels (Output); outputs may not share memory
# with each other (check_outputs_apart), as neither could then hold its result.

_EXACT_OVERLAP_LIMIT = 1 << 22      # elements compared at most; past this a doubtful array counts as overlapping


def overlaps_itself(a: np.ndarray) -> bool:
    """Whether two elements of `a` may share memory (True is conservative for huge exotic views).

    Cheap test first: with the axes ordered by |stride|, each stride reaching past everything the
    smaller ones span proves the elements apart (every slice, transpose or reshape of an ordinary
    array passes). Otherwise the element offsets are compared, up to _EXACT_OVERLAP_LIMIT elements.
    """
    dims = sorted((abs(st), n) for st, n in zip(a.strides, a.shape) if n > 1)
    if a.size == 0 or not dims:
        return False
    if dims[0][0] == 0:
        return True
    span = a.itemsize
    for stride, n in dims:
        if stride < span:
            break
        span = stride * (n - 1) + span
    else:
        return False
    if a.size > _EXACT_OVERLAP_LIMIT:
        return True
    offsets = np.zeros(1, dtype=np.int64)
    for stride, n in dims:
        offsets = (offsets[:, None] + stride * np.arange(n, dtype=np.int64)).ravel()
    offsets.sort()
    return bool((np.diff(offsets) < a.itemsize).any())


def shares_memory(a, b) -> bool:
    """Whether arrays a and b may share memory: bounds first, exactly when the bounds meet."""
    if not np.may_share_memory(a, b):
        return False
    try:
        # NumPy's stub admits only -1 (exact) and 0 (bounds); the function takes any bound on its work
        return bool(np.shares_memory(a, b, max_work=1 << 16))  # type: ignore[arg-type]
    except np.exceptions.TooHardError:
        return True


def detach(arr, outputs):
    """arr, or a copy of it when it shares memory with any of `outputs` (None entries skipped)."""
    if arr is None or not any(o is not None and shares_memory(arr, o) for o in outputs):
        return arr
    return arr.copy()


def check_outputs_apart(fn: str, **outputs) -> None:
    """Outputs (name=array or None) must not share memory with each other."""
    given = [(k, v) for k, v in outputs.items() if v is not None]
    for i, (na, a) in enumerate(given):
        for nb, b in given[i + 1:]:
            if shares_memory(a, b):
                raise ValueError(f"{fn}: {na} and {nb} share memory, and both are written; "
                                 "give them separate arrays")


# ---- canonical views -------------------------------------------------------------------------

def inverse(perm) -> tuple[int, ...]:
    return tuple(np.argsort(perm))


def view_of(arr: np.ndarray, perm, shape) -> np.ndarray | None:
    """arr transposed by perm and reshaped to shape, as a view of the same memory; None if impossible."""
    try:
        return np.reshape(arr.transpose(perm), shape, copy=False)
    except ValueError:
        return None


def input_view(arr: np.ndarray, perm, shape) -> np.ndarray:
    """The kernel view of an input: a view when the axes merge, else a C-ordered copy."""
    v = view_of(arr, perm, shape)
    return v if v is not None else np.ascontiguousarray(arr.transpose(perm)).reshape(shape)


class Output:
    """Where a kernel writes: `out` itself when it can, else a fresh array.

    `result` is what the function returns, `view` the kernel-shaped view the kernel writes into.
    Call finish() after the kernel: it copies into `out` when a temporary had to be used (out
    overlapping x, or an array in `also_read`, in another layout; axes that do not merge; byte-swapped).
    The kernels read each element before writing the same element, so out may be exactly x (or dy).
    """

    def __init__(self, out, x: np.ndarray, dtype: np.dtype, perm, shape, also_read=()):
        self._out, self._tmp = out, None
        if out is not None:
            direct = out.dtype == dtype and out.flags.aligned and all(
                not shares_memory(out, a) or _same_memory_layout(out, a) for a in (x, *also_read))
            view = view_of(out, perm, shape) if direct else None
            if view is not None:
                self.result, self.view = out, view
                return
        buf = _core.empty_like(x, dtype) if out is None else None
        view = view_of(buf, perm, shape) if buf is not None else None
        if view is None:
            canon = np.empty([x.shape[p] for p in perm], dtype=dtype)
            buf, view = canon.transpose(inverse(perm)), canon.reshape(shape)
        self._tmp = buf if out is not None else None
        self.result = out if out is not None else buf
        self.view = view

    def finish(self) -> np.ndarray:
        if self._tmp is not None:
            np.copyto(self._out, self._tmp, casting="unsafe")
        return self.result


def _same_memory_layout(a: np.ndarray, b: np.ndarray) -> bool:
    """b is a itself in memory, element for element (then the kernels may write a over b)."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides and a.dtype == b.dtype and not overlaps_itself(b))
