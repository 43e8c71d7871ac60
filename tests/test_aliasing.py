"""Every input may share memory with every output (docs/robustness.md, "Shared memory").

The rule: a call whose inputs (x, dy, weight, bias, mask, mean, rstd, running statistics) share
memory with its outputs (out, the running statistics batch norm updates) gives what the same call
gives with copies of its inputs, on every path (the C entry of layer/RMS norm included), as
NumPy's ufuncs do. Two outputs of one call may not share memory (a ValueError), and neither may
the elements of one output.

The test is systematic rather than one case per reproducer: for every function and path below,
every (input, output) pair is placed in one buffer (the same bytes, shifted by one element, the
smaller one halfway into the larger: a row of one being the other), the other arguments apart,
the inputs filled with values, and the call compared with the call made on copies of those values
(which the rest of the suite checks against the float64 references).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pytest

import fastnorm as fn

DTYPES = (np.float16, np.float32, np.float64)
# the same arithmetic on both sides, but possibly another path (fast C entry or general, float or double)
TOL = {np.dtype(np.float16): 4e-3, np.dtype(np.float32): 4e-6, np.dtype(np.float64): 1e-12}


@dataclass(frozen=True)
class Arg:
    shape: tuple
    kind: str = "data"      # data, param, stat: normal values; positive: in [0.5, 1.5); mask: bool


@dataclass(frozen=True)
class Spec:
    name: str
    call: object            # call(arrays: dict) -> tuple of results
    inputs: dict            # name -> Arg
    outputs: dict           # name -> Arg (names also in inputs are read and written: running stats)
    dtypes: tuple = DTYPES


X2, P2, M2 = Arg((4, 8)), Arg((8,), "param"), Arg((4,), "mask")
X3, P3, M3, S3 = Arg((3, 4, 8)), Arg((8,), "param"), Arg((3, 4), "mask"), Arg((3, 4), "stat")
XI, PI, MI, SI = Arg((2, 3, 5)), Arg((3,), "param"), Arg((2, 5), "mask"), Arg((2, 3), "stat")
XB, PB, MB = Arg((6, 4)), Arg((4,), "param"), Arg((6,), "mask")
XP, PP = Arg((2, 3, 4, 4)), Arg((3,), "param")
RM, RV = Arg((4,), "param"), Arg((4,), "positive")
RMP, RVP = Arg((3,), "param"), Arg((3,), "positive")


def _tup(r):
    return r if isinstance(r, tuple) else (r,)


SPECS = [
    # layer/RMS norm: the C entry (plain arrays, last axis, no mask, no stats) and the general path
    Spec("layer_norm entry", lambda a: _tup(fn.layer_norm(a["x"], a["weight"], a["bias"], out=a.get("out"))),
         {"x": X2, "weight": P2, "bias": P2}, {"out": X2}),
    Spec("layer_norm masked", lambda a: fn.layer_norm(a["x"], a["weight"], a["bias"], mask=a["mask"],
                                                      out=a.get("out"), return_stats=True),
         {"x": X2, "weight": P2, "bias": P2, "mask": M2}, {"out": X2}),
    Spec("rms_norm entry", lambda a: _tup(fn.rms_norm(a["x"], weight=a["weight"], out=a.get("out"))),
         {"x": X2, "weight": P2}, {"out": X2}),
    Spec("rms_norm masked", lambda a: fn.rms_norm(a["x"], a["weight"], a["bias"], mask=a["mask"],
                                                  out=a.get("out"), return_stats=True),
         {"x": X3, "weight": P3, "bias": P3, "mask": M3}, {"out": X3}),
    Spec("instance_norm", lambda a: fn.instance_norm(a["x"], a["weight"], a["bias"], axis=1, mask=a["mask"],
                                                     out=a.get("out"), return_stats=True),
         {"x": XI, "weight": PI, "bias": PI, "mask": MI}, {"out": XI}),
    Spec("group_norm", lambda a: fn.group_norm(a["x"], 3, a["weight"], a["bias"], axis=1, mask=a["mask"],
                                               out=a.get("out"), return_stats=True),
         {"x": XI, "weight": PI, "bias": PI, "mask": MI}, {"out": XI}),
    # batch norm: columns with a mask, float32 planes (their own kernel), eval mode
    Spec("batch_norm train", lambda a: fn.batch_norm(a["x"], a["weight"], a["bias"], mask=a["mask"],
                                                     running_mean=a["running_mean"], running_var=a["running_var"],
                                                     out=a.get("out"), return_stats=True),
         {"x": XB, "weight": PB, "bias": PB, "mask": MB, "running_mean": RM, "running_var": RV},
         {"out": XB, "running_mean": RM, "running_var": RV}),
    Spec("batch_norm planes", lambda a: fn.batch_norm(a["x"], a["weight"], a["bias"], axis=1,
                                                      running_mean=a["running_mean"], running_var=a["running_var"],
                                                      out=a.get("out"), return_stats=True),
         {"x": XP, "weight": PP, "bias": PP, "running_mean": RMP, "running_var": RVP},
         {"out": XP, "running_mean": RMP, "running_var": RVP}, dtypes=(np.float32,)),
    Spec("batch_norm eval", lambda a: _tup(fn.batch_norm(a["x"], a["weight"], a["bias"], training=False,
                                                         running_mean=a["running_mean"],
                                                         running_var=a["running_var"], out=a.get("out"))),
         {"x": XB, "weight": PB, "bias": PB, "running_mean": RM, "running_var": RV}, {"out": XB}),
    # backward: the C entry of layer/RMS norm and the general path with masks
    Spec("layer_norm_backward entry", lambda a: fn.layer_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"],
                                                                       a["weight"], out=a.get("out")),
         {"dy": X3, "x": X3, "mean": S3, "rstd": Arg((3, 4), "positive"), "weight": P3}, {"out": X3}),
    Spec("layer_norm_backward masked", lambda a: fn.layer_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"],
                                                                        a["weight"], mask=a["mask"],
                                                                        out=a.get("out")),
         {"dy": X3, "x": X3, "mean": S3, "rstd": Arg((3, 4), "positive"), "weight": P3, "mask": M3},
         {"out": X3}),
    Spec("rms_norm_backward entry", lambda a: fn.rms_norm_backward(a["dy"], a["x"], a["rstd"], a["weight"],
                                                                   out=a.get("out")),
         {"dy": X3, "x": X3, "rstd": Arg((3, 4), "positive"), "weight": P3}, {"out": X3}),
    Spec("group_norm_backward", lambda a: fn.group_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"], 3,
                                                                 a["weight"], axis=1, mask=a["mask"],
                                                                 out=a.get("out")),
         {"dy": XI, "x": XI, "mean": SI, "rstd": Arg((2, 3), "positive"), "weight": PI, "mask": MI},
         {"out": XI}),
    Spec("instance_norm_backward", lambda a: fn.instance_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"],
                                                                       a["weight"], axis=1, mask=a["mask"],
                                                                       out=a.get("out")),
         {"dy": XI, "x": XI, "mean": SI, "rstd": Arg((2, 3), "positive"), "weight": PI, "mask": MI},
         {"out": XI}),
    Spec("batch_norm_backward", lambda a: fn.batch_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"],
                                                                 a["weight"], mask=a["mask"], out=a.get("out")),
         {"dy": XB, "x": XB, "mean": Arg((4,), "stat"), "rstd": Arg((4,), "positive"), "weight": PB,
          "mask": MB}, {"out": XB}),
    # data scaling
    Spec("standardize", lambda a: _tup(fn.standardize(a["x"], axis=1, out=a.get("out"))), {"x": XB}, {"out": XB}),
    Spec("min_max_scale", lambda a: _tup(fn.min_max_scale(a["x"], axis=1, out=a.get("out"))),
         {"x": XB}, {"out": XB}),
]

PLACEMENTS = ("same start", "one element on", "halfway")


def _dtype_of(arg: Arg, dtype) -> np.dtype:
    return np.dtype(bool) if arg.kind == "mask" else np.dtype(dtype)


def _fill(rng, arg: Arg, arr: np.ndarray) -> None:
    if arg.kind == "mask":
        m = rng.random(arg.shape) < 0.7
        m.reshape(-1)[:2] = True                # batch norm in training needs two real elements
        arr[...] = m
    elif arg.kind == "positive":
        arr[...] = 0.5 + rng.random(arg.shape)
    else:
        arr[...] = 0.3 + rng.standard_normal(arg.shape)


def _place(spec: Spec, dtype, pair, placement, rng):
    """The call's arrays: pair = (input, output) share memory as `placement` says; others apart."""
    names = list(dict.fromkeys([*spec.inputs, *spec.outputs]))
    args = {**spec.outputs, **spec.inputs}
    nbytes = {k: int(np.prod(args[k].shape)) * _dtype_of(args[k], dtype).itemsize for k in names}
    big, small = sorted(pair, key=lambda k: -nbytes[k])
    step = max(_dtype_of(args[k], dtype).itemsize for k in pair)
    shift = {"same start": 0, "one element on": step,
             "halfway": nbytes[big] // 2 // step * step}[placement]
    offsets, end = {big: 0, small: shift}, max(nbytes[big], shift + nbytes[small])
    for k in names:
        if k not in offsets:
            offsets[k], end = end + 64, end + 64 + nbytes[k]
    pool = np.zeros(end + 128, np.uint8)
    start = (-pool.ctypes.data) % 64
    arrays = {k: pool[start + offsets[k]:start + offsets[k] + nbytes[k]].view(_dtype_of(args[k], dtype))
              .reshape(args[k].shape) for k in names}
    for k in sorted(spec.inputs, key=lambda k: spec.inputs[k].kind == "mask"):   # masks last: valid bools
        _fill(rng, spec.inputs[k], arrays[k])
    return arrays


def _cases():
    for spec in SPECS:
        for dtype in spec.dtypes:
            for i in spec.inputs:
                for o in spec.outputs:
                    if i not in spec.outputs:           # outputs sharing memory: refused, tested below
                        for placement in PLACEMENTS:
                            yield pytest.param(spec, dtype, (i, o), placement,
                                               id=f"{spec.name}-{np.dtype(dtype).name}-{i}-in-{o}-{placement}")


@pytest.mark.parametrize("spec, dtype, pair, placement", list(_cases()))
def test_shared_memory_gives_the_result_of_copies(spec, dtype, pair, placement):
    rng = np.random.default_rng(zlib.crc32(f"{spec.name} {pair} {placement}".encode()))
    arrays = _place(spec, dtype, pair, placement, rng)
    copies = {k: arrays[k].copy() for k in spec.inputs}
    expected = spec.call(copies)                # out=None, running statistics: copies
    got = spec.call(arrays)
    tol = TOL[np.dtype(dtype)]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(e, np.float64), rtol=tol, atol=tol)
    if "out" in arrays:
        np.testing.assert_allclose(arrays["out"].astype(np.float64), np.asarray(expected[0], np.float64),
                                   rtol=tol, atol=tol)
    for k in ("running_mean", "running_var"):
        if k in spec.outputs:
            np.testing.assert_allclose(arrays[k], copies[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("func", ["layer_norm", "rms_norm"])
def test_rows_of_x_as_weight_and_bias_written_in_place(func, dtype):
    """The reproducer of a silent wrong answer: the C entry read weight and bias while writing out."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 6)).astype(dtype)
    expected = getattr(fn, func)(x.copy(), x[0].copy(), x[1].copy())
    xx = x.copy()
    np.testing.assert_allclose(getattr(fn, func)(xx, xx[0], xx[1], out=xx), expected, rtol=TOL[np.dtype(dtype)])
    np.testing.assert_allclose(xx, expected, rtol=TOL[np.dtype(dtype)])


def _self_overlapping(x: np.ndarray, rows: int) -> np.ndarray:
    """Rows of x's first row shifted one element each: row i starts at element i."""
    return np.lib.stride_tricks.as_strided(x, (rows, x.shape[1] - rows + 1), (x.itemsize, x.itemsize))


@pytest.mark.parametrize("call", [
    lambda v, **k: fn.layer_norm(v, **k), lambda v, **k: fn.rms_norm(v, **k),
    lambda v, **k: fn.batch_norm(v, **k), lambda v, **k: fn.group_norm(v, 2, **k),
    lambda v, **k: fn.standardize(v, axis=1, **k), lambda v, **k: fn.min_max_scale(v, axis=1, **k),
], ids=["layer", "rms", "batch", "group", "standardize", "min_max_scale"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_x_overlapping_itself(call, dtype):
    """Overlapping rows read as x give the copy's result; written as out, a clear error."""
    base = np.random.default_rng(2).standard_normal((1, 13)).astype(dtype)
    x = _self_overlapping(base, 4)
    np.testing.assert_allclose(call(x).astype(np.float64), call(x.copy()).astype(np.float64),
                               rtol=TOL[np.dtype(dtype)], atol=TOL[np.dtype(dtype)])
    before = base.copy()
    with pytest.raises(ValueError, match="out has elements that share memory"):
        call(x, out=x)
    np.testing.assert_array_equal(base, before)


def test_outputs_sharing_memory_are_refused():
    x = np.random.default_rng(3).standard_normal((5, 4))
    stats = np.ones((2, 4))
    with pytest.raises(ValueError, match="running_mean and running_var share memory"):
        fn.batch_norm(x, running_mean=stats[0], running_var=stats[0])
    with pytest.raises(ValueError, match="out and running_mean share memory"):
        fn.batch_norm(x, running_mean=x[0], running_var=stats[1], out=x)
    np.testing.assert_array_equal(stats, np.ones((2, 4)))


def test_running_statistics_in_rows_of_x_match_a_hand_computation():
    """fn.batch_norm(x, running_mean=x[0], running_var=x[1]): y from x as it was, then the update."""
    x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    y = fn.batch_norm(x, running_mean=x[0], running_var=x[1], eps=0.0, momentum=0.5)
    col = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    mean, var = col.mean(0), col.var(0)
    np.testing.assert_allclose(y, (col - mean) / np.sqrt(var), rtol=1e-15)
    np.testing.assert_allclose(x[0], 0.5 * np.array([1.0, 2.0]) + 0.5 * mean, rtol=1e-15)
    np.testing.assert_allclose(x[1], 0.5 * np.array([3.0, 6.0]) + 0.5 * var * 3 / 2, rtol=1e-15)
