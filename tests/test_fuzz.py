"""Fuzzing every public normalization function (forward and backward) with hypothesis.

Each example draws x (shapes with 0- and 1-sized axes, every dtype and byte order, C/F order,
steps, negative strides, zero-stride broadcasts, overlapping ``as_strided`` windows, misaligned
buffers, nested lists), an axis, weight/bias, mask, out, eps (and momentum, running statistics,
num_groups), each either valid or wrong in some way. A small model of the contract
(``/work/shared/API.md`` and ``docs/decisions.md``) says which arguments are wrong; then

* if any argument is wrong, the call must raise a TypeError/ValueError (AxisError for an
  out-of-range axis) whose message names one of the wrong arguments;
* otherwise it must return the float64 reference of ``tests/reference.py`` (gradients: of
  ``tests/grad_reference.py``) within the dtype tolerance relative to the output scale
  (float64 1e-10, float32 1e-4, float16 2e-2), with the documented dtypes and shapes;
* either way, no input may change (except x when ``out`` overlaps it, and the running
  statistics that training updates), and no RuntimeWarning may leak out.

Settings: ``FASTNORM_FUZZ_EXAMPLES`` (default 200) examples per test, derandomized (the same
examples every run) unless ``FASTNORM_FUZZ_RANDOM=1``; no example database.

The bugs this file found (float/bool axis after a cache hit, ``num_groups=None``, out aliasing
weight/bias) are fixed and pinned by the tests at the end of this file; the one documented
limitation (float32 statistics and large offsets in the gradients) is an xfail there.
"""

import os
import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fastnorm
import grad_reference as gref
import reference as ref

EXAMPLES = int(os.environ.get("FASTNORM_FUZZ_EXAMPLES", "200"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=os.environ.get("FASTNORM_FUZZ_RANDOM", "") != "1",
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)

AxisError = np.exceptions.AxisError
LAYER = ("layer_norm", "rms_norm")
GROUPED = ("instance_norm", "group_norm")

# accuracy relative to the output scale, as the robustness issue asks
TOL = {np.dtype(np.float16): 2e-2, np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
# statistics are float32 for float16/float32 x (rounded once), float64 for float64 x
STATS_TOL = {np.dtype(np.float16): 1e-5, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}

X_DTYPES = ["f2", "f4", "f8", "f8", "f4", "i1", "i4", "i8", "u1", "u2", "?"]
LAYOUTS = ["C", "C", "F", "steps", "steps", "transposed", "negative", "broadcast", "windows",
           "misaligned", "list"]


# --------------------------------------------------------------------------- small helpers

def result_dtype(dtype):
    dtype = np.dtype(dtype).newbyteorder("=")
    return dtype if dtype.kind == "f" else np.dtype(np.float64)


def stats_dtype(dtype):
    return np.dtype(np.float64) if result_dtype(dtype) == np.float64 else np.dtype(np.float32)


def names_one_of(message, names):
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


def snapshot(*objs):
    """Copies of every ndarray among objs (None elsewhere), to check they are left unchanged."""
    return [np.array(o, copy=True) if isinstance(o, np.ndarray) else None for o in objs]


def assert_unchanged(objs, copies, what):
    for name, o, c in zip(what, objs, copies):
        if c is not None:
            assert o.dtype == c.dtype and o.shape == c.shape, f"{name} changed dtype/shape"
            assert np.array_equal(o, c, equal_nan=True), f"{name} was modified by the call"


def assert_close(got, want, tol, err_msg, rtol=None, scale=None):
    """|got - want| <= tol * max(1, scale, max finite |want|) + rtol * |want|; NaN where want is NaN."""
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{err_msg}: shape {got.shape}, expected {want.shape}"
    finite = np.abs(want[np.isfinite(want)])
    scale = max(1.0, scale or 0.0, float(finite.max()) if finite.size else 1.0)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol if rtol is None else rtol,
                               atol=tol * scale, equal_nan=True, err_msg=err_msg)


def assert_stats_close(got, want, tol, err_msg):
    """Statistics: where the reference is finite, close; where it is not (NaN/Inf input), not finite."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{err_msg}: shape {got.shape}, expected {want.shape}"
    bad = ~np.isfinite(want)
    assert not np.isfinite(got[bad]).any(), f"{err_msg}: finite where the reference is not: {got[bad]}"
    assert_close(np.where(bad, 0.0, got), np.where(bad, 0.0, want), tol, err_msg)


class Bad:
    """The arguments the contract says are wrong: name -> exception types that may report it."""

    def __init__(self):
        self.args = {}

    def add(self, name, *exc):
        self.args.setdefault(name, set()).update(exc)

    def __bool__(self):
        return bool(self.args)

    def check_raised(self, err):
        msg = str(err)
        ok = [n for n, types in self.args.items() if isinstance(err, tuple(types)) and names_one_of(msg, [n])]
        assert ok, (f"raised {type(err).__name__}({msg!r}); expected one of "
                    f"{ {n: sorted(t.__name__ for t in ts) for n, ts in self.args.items()} } naming the argument")


def call_checked(fn, bad, *args, **kwargs):
    """Run fn; if `bad` lists wrong arguments it must raise a clean error naming one of them.

    Returns (result, raised). No RuntimeWarning may escape either way."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            result = fn(*args, **kwargs)
        except (TypeError, ValueError) as err:
            if not bad:
                raise AssertionError(f"valid call raised {type(err).__name__}: {err}") from err
            bad.check_raised(err)
            event(f"raised {type(err).__name__}: {re.sub(r'[0-9(][^;]*', '', str(err))[:60]}")
            return None, True
    assert not bad, f"no error, although the contract says these are wrong: {sorted(bad.args)}"
    event("computed")
    return result, False


# --------------------------------------------------------------------------- drawing x

def pick(draw, weights):
    """One key of `weights` (name -> relative weight); the broken kinds get small weights, so
    that most examples are valid calls that reach the kernels."""
    return draw(st.sampled_from([k for k, w in weights.items() for _ in range(w)]))


def _values(draw, rng, shape, dtype):
    """Random values for `shape` in `dtype` (plain numbers; NaN/Inf only on request)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return np.array(rng.random(shape) < 0.5)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = draw(st.sampled_from([(-5, 6), (0, 3), (int(info.min), int(info.max)),
                                       (-(2 ** 40), 2 ** 40)]))
        lo, hi = max(lo, int(info.min)), min(hi, int(info.max))
        return np.array(rng.integers(lo, hi, size=shape, endpoint=True), dtype=dtype)
    if dtype.kind == "c":
        return np.array(rng.standard_normal(shape) + 1j, dtype=dtype)
    loc = draw(st.sampled_from([0.0, 0.5, -7.0, 300.0] + ([1e4] if dtype.itemsize >= 4 else [])))
    scale = draw(st.sampled_from([1.0, 2.0, 1e-2, 50.0]))
    v = np.array(loc + scale * rng.standard_normal(shape), dtype=dtype)
    if v.size and draw(st.sampled_from([False] * 9 + [True])):     # NaN / Inf somewhere
        v.flat[rng.integers(v.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return v


def _windows(draw, rng, shape, dtype):
    """A read-only as_strided view with arbitrary element strides (0, negative, overlapping)."""
    steps = [draw(st.sampled_from([0, 1, 1, 2, 3, -1, -2, 7])) for _ in shape]
    lo = sum(min(0, k * (n - 1)) for k, n in zip(steps, shape) if n > 0)
    hi = sum(max(0, k * (n - 1)) for k, n in zip(steps, shape) if n > 0)
    base = _values(draw, rng, (hi - lo + 1,), dtype)
    item = base.dtype.itemsize
    return np.lib.stride_tricks.as_strided(base[-lo:], shape, [k * item for k in steps], writeable=False)


@st.composite
def xs(draw, min_ndim=1, max_ndim=4, max_side=5, dtypes=X_DTYPES, complex_rate=3):
    """(x, rng, layout): an input array (or nested list) in a random dtype, byte order and layout."""
    ndim = draw(st.integers(min_ndim, max_ndim))
    side = st.sampled_from([0] + [1] * 4 + list(range(2, max_side + 1)) * 4)
    shape = tuple(draw(side) for _ in range(ndim))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    code = draw(st.sampled_from(list(dtypes) * complex_rate + ["c16"]))
    dtype = np.dtype(code)
    if dtype.itemsize > 1 and draw(st.booleans()):
        dtype = dtype.newbyteorder("S")
    layout = draw(st.sampled_from(LAYOUTS))
    if ndim == 0 and layout not in ("C", "F", "misaligned", "broadcast", "list"):
        layout = "C"

    if layout == "steps":
        steps = [draw(st.sampled_from([1, 2, 3, -1, -2])) for _ in shape]
        base = _values(draw, rng, tuple(max(1, n * abs(k)) for n, k in zip(shape, steps)), dtype)
        x = base[tuple(slice(None, n * abs(k), k) if k > 0 else slice(None, None, k)
                       for n, k in zip(shape, steps))]
        x = x[tuple(slice(0, n) for n in shape)]
    elif layout == "broadcast":
        src = tuple(1 if draw(st.booleans()) else n for n in shape)
        x = np.broadcast_to(_values(draw, rng, src, dtype), shape)
    elif layout == "windows":
        x = _windows(draw, rng, shape, dtype)
    else:
        v = _values(draw, rng, shape, dtype)
        if layout == "list":
            x = v.tolist()
        elif layout == "C":
            x = v
        else:
            x = ref.make_layout(v, layout)
    if layout != "list":
        assert x.shape == shape and x.dtype == dtype
    return x, rng, layout


def has_constant_float64_groups(x, layout):
    """A float64 group of identical values: NumPy's mean of it may be off by an ulp, so with
    eps=0 the reference divides rounding noise by ~0 (fastnorm is exact there)."""
    return layout in ("broadcast", "windows") and np.asarray(x).dtype.kind == "f"


# --------------------------------------------------------------------------- drawing arguments

def draw_eps(draw, bad, allow_zero=True):
    eps = draw(st.sampled_from([1e-5] * 6 + [1e-2, 1.0, np.float32(1e-3), 1] + [0.0] * (2 if allow_zero else 0)
                               + ["bad"]))
    if eps == "bad":
        eps = draw(st.sampled_from([-1e-5, np.nan, np.inf, "1e-5", None, 1j]))
        if isinstance(eps, float):
            bad.add("eps", ValueError)
        else:
            bad.add("eps", TypeError)
    return eps


def draw_param(draw, rng, name, shape, bad, x_dtype):
    """weight or bias: None, the right shape in some dtype/layout, a wrong shape, or complex."""
    kind = pick(draw, {"none": 6, "right": 6, "list": 1, "reversed": 1, "wrong_shape": 1, "complex": 1})
    if kind == "none":
        return None
    dtype = draw(st.sampled_from([result_dtype(x_dtype), np.float32, np.float64, np.int8]))
    low = 0.5 if name == "weight" else -1.0
    values = (low + rng.random(shape) * 1.5)
    if kind == "wrong_shape":
        wrong = draw(st.sampled_from([shape + (1,), shape[:-1], shape[::-1], (shape[0] + 1,) + shape[1:]
                                      if shape else (2,), (3,)]))
        if wrong != shape:
            bad.add(name, ValueError)
        return np.ones(wrong, dtype=dtype)
    if kind == "complex":
        bad.add(name, TypeError)
        return values.astype(np.complex128)
    p = values.astype(dtype)
    if kind == "list":
        return p.tolist()
    if kind == "reversed" and p.ndim:
        return np.flip(p)
    return p


def draw_mask(draw, rng, shape, bad, samples_axis=None):
    """mask: None, random, all-False rows (or samples), all True/False, a zero-stride or reversed
    view, a wrong shape, or a wrong dtype."""
    kind = pick(draw, {"none": 10, "random": 4, "false_rows": 2, "all_false": 1, "all_true": 1, "broadcast": 1,
                       "reversed": 1, "list": 1, "wrong_shape": 1, "wrong_dtype": 1})
    if kind == "none":
        return None
    m = np.array(rng.random(shape) < 0.7)
    if kind == "false_rows" and m.ndim:
        m[rng.random(shape[0]) < 0.5] = False
    elif kind == "all_false":
        m[...] = False
    elif kind == "all_true":
        m[...] = True
    elif kind == "broadcast" and m.ndim:
        m = np.broadcast_to(m[..., :1], shape) if shape[-1] else m
    elif kind == "reversed":
        m = np.flip(m)
    elif kind == "list" and m.size:        # (an empty list has no dtype: np.asarray makes it float64)
        return m.tolist()
    elif kind == "wrong_shape":
        wrong = draw(st.sampled_from([shape + (1,), shape[1:], (2,) + shape, shape[::-1]]))
        if wrong != shape:
            bad.add("mask", ValueError)
        return np.array(rng.random(wrong) < 0.5)
    elif kind == "wrong_dtype":
        bad.add("mask", TypeError)
        return m.astype(draw(st.sampled_from([np.int8, np.float64, np.uint8])))
    return m


def draw_out(draw, rng, x, layout, bad):
    """out: None, fresh (C/F/strided/byte-swapped/misaligned), x itself, a reversed view of x,
    wrong shape/dtype, read-only, a list. Returns (out, overlaps_x)."""
    kind = pick(draw, {"none": 16, "fresh": 2, "fresh_F": 1, "fresh_strided": 1, "fresh_swapped": 1,
                       "fresh_misaligned": 1, "x": 3, "reversed_x": 2, "wrong_shape": 1, "wrong_dtype": 1,
                       "readonly": 1, "list": 1})
    xa = np.asarray(x)
    want = result_dtype(xa.dtype) if xa.dtype.kind in "biuf" else np.dtype(np.float64)
    if kind == "none":
        return None, False
    if kind in ("x", "reversed_x"):
        if layout == "list":
            return None, False
        out = x if kind == "x" or x.ndim == 0 else np.flip(x, axis=draw(st.integers(0, x.ndim - 1)))
        if not out.flags.writeable:
            bad.add("out", ValueError)
        if out.dtype.kind != "f" or out.dtype.itemsize != want.itemsize:
            bad.add("out", ValueError)
        return out, True
    if kind == "fresh":
        return np.full(xa.shape, np.nan, dtype=want), False
    if kind == "fresh_F":
        return np.asfortranarray(np.full(xa.shape, np.nan, dtype=want)), False
    if kind == "fresh_strided":
        big = np.full(tuple(2 * n for n in xa.shape), np.nan, dtype=want)
        return big[tuple(slice(None, None, -2) for _ in xa.shape)], False
    if kind == "fresh_swapped":
        return np.full(xa.shape, np.nan, dtype=want.newbyteorder("S")), False
    if kind == "fresh_misaligned":
        return ref.make_layout(np.full(xa.shape, np.nan, dtype=want), "misaligned"), False
    if kind == "wrong_shape":
        bad.add("out", ValueError)
        return np.empty(xa.shape + (1,), dtype=want), False
    if kind == "wrong_dtype":
        other = draw(st.sampled_from([d for d in ["f2", "f4", "f8", "i8", "c16"] if np.dtype(d) != want]))
        bad.add("out", ValueError, TypeError)
        return np.empty(xa.shape, dtype=other), False
    if kind == "readonly":
        out = np.empty(xa.shape, dtype=want)
        out.flags.writeable = False
        bad.add("out", ValueError)
        return out, False
    bad.add("out", TypeError, ValueError)
    return np.zeros(xa.shape).tolist(), False


def draw_layer_axis(draw, ndim, bad):
    """An int or tuple axis for layer/rms norm, sometimes out of range, repeated or empty."""
    kind = pick(draw, {"int": 8, "tuple": 6, "list": 1, "out_of_range": 1, "repeated": 1, "empty": 1})
    if ndim == 0 or kind == "out_of_range":
        bad.add("axis", AxisError)
        return draw(st.sampled_from([ndim, -ndim - 1, 7, (0, ndim)]))
    def neg(a):
        return a - ndim if draw(st.booleans()) else a
    if kind == "int":
        return neg(draw(st.integers(0, ndim - 1)))
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    axes = tuple(neg(a) for a in axes)
    if kind == "repeated":
        bad.add("axis", ValueError)
        return axes + (axes[0] - ndim if axes[0] >= 0 else axes[0] + ndim,)
    if kind == "empty":
        bad.add("axis", ValueError)
        return ()
    return list(axes) if kind == "list" else axes


def draw_single_axis(draw, ndim, bad, batch_axis_forbidden):
    """An int axis; sometimes out of range, a tuple, or the batch axis 0 where that is forbidden."""
    kind = pick(draw, {"int": 16, "out_of_range": 1, "tuple": 1, "zero": 1})
    if ndim == 0 or kind == "out_of_range":
        bad.add("axis", AxisError)
        return draw(st.sampled_from([ndim, -ndim - 1, 9]))
    if kind == "tuple":
        bad.add("axis", TypeError)
        return (ndim - 1,)
    lowest = 1 if batch_axis_forbidden and ndim > 1 else 0
    ax = 0 if kind == "zero" else draw(st.integers(lowest, ndim - 1))
    if batch_axis_forbidden and ax == 0:
        bad.add("axis", ValueError)
    return ax - ndim if draw(st.booleans()) else ax


def check_x_dtype(x, bad):
    if np.asarray(x).dtype.kind not in "biuf":
        bad.add("x", TypeError)


# --------------------------------------------------------------------------- comparing results

def conditioning(x, rstd_ref, weight):
    """The error float64 arithmetic cannot avoid: rounding the mean of large-offset data to a double
    costs ulp(|mean|) * rstd * |weight| in y (NumPy's reference and fastnorm alike)."""
    xa = np.asarray(x, dtype=np.float64)
    finite = np.abs(xa[np.isfinite(xa)])
    r = np.asarray(rstd_ref, dtype=np.float64)
    r = r[np.isfinite(r)]
    w = 1.0 if weight is None else float(np.max(np.abs(np.asarray(weight, dtype=np.float64)), initial=1.0))
    if not finite.size or not r.size:
        return 0.0
    return 4 * 2.0 ** -53 * float(finite.max()) * float(r.max()) * w


def check_forward_result(name, result, want, x_dtype, return_stats, out, compare_stats=True, cond=0.0):
    y_ref, mean_ref, rstd_ref = want
    if return_stats:
        assert isinstance(result, tuple) and len(result) == (2 if name == "rms_norm" else 3)
        y, stats = result[0], result[1:]
    else:
        y, stats = result, ()
    assert isinstance(y, np.ndarray), type(y)
    assert y.shape == y_ref.shape
    if out is not None:
        assert y is out, "the result is not the out array"
    else:
        assert y.dtype == result_dtype(x_dtype), f"y dtype {y.dtype} for x {x_dtype}"
    tol = TOL[result_dtype(x_dtype)]
    if result_dtype(x_dtype) == np.float64 and cond > tol:
        tol = cond
    assert_close(y, y_ref, tol, f"{name}: y")
    if return_stats and compare_stats:
        refs = (rstd_ref,) if name == "rms_norm" else (mean_ref, rstd_ref)
        for label, got, r in zip(("mean", "rstd") if len(refs) == 2 else ("rstd",), stats, refs):
            assert np.asarray(got).dtype == stats_dtype(x_dtype), f"{label} dtype {np.asarray(got).dtype}"
            assert_stats_close(got, r, STATS_TOL[result_dtype(x_dtype)], f"{name}: {label}")


# --------------------------------------------------------------------------- forward fuzz

@pytest.mark.parametrize("name", LAYER)
@SETTINGS
@given(data=st.data())
def test_fuzz_layer_and_rms_norm(name, data):
    draw = data.draw
    bad = Bad()
    x, rng, layout = draw(xs(min_ndim=draw(st.sampled_from([1] * 15 + [0])), max_ndim=4))
    xa = np.asarray(x)
    check_x_dtype(x, bad)
    axis = draw_layer_axis(draw, xa.ndim, bad)
    feat = ok_shape = None
    if "axis" not in bad.args:
        feat = ref.feature_axes(axis, xa.ndim)
        fshape = tuple(xa.shape[a] for a in feat)
        mshape = tuple(n for a, n in enumerate(xa.shape) if a not in feat)
        if int(np.prod(fshape)) == 0:
            bad.add("x", ValueError)
        ok_shape = True
    else:
        fshape, mshape = (2,), (2,)
    weight = draw_param(draw, rng, "weight", fshape, bad, xa.dtype)
    bias = draw_param(draw, rng, "bias", fshape, bad, xa.dtype)
    mask = draw_mask(draw, rng, mshape, bad)
    eps = draw_eps(draw, bad, allow_zero=not has_constant_float64_groups(x, layout))
    out, overlaps = draw_out(draw, rng, x, layout, bad)
    return_stats = draw(st.booleans())

    x_before = snapshot(x)[0] if layout != "list" else None
    inputs = [weight, bias, mask]
    copies = snapshot(*inputs)
    kw = dict(axis=axis, eps=eps, mask=mask, out=out, return_stats=return_stats)
    result, raised = call_checked(getattr(fastnorm, name), bad, x, weight, bias, **kw)
    assert_unchanged(inputs, copies, ["weight", "bias", "mask"])
    if not (overlaps and not raised):
        assert_unchanged([x], [x_before], ["x"])
    if raised:
        return
    assert ok_shape
    values = x_before if x_before is not None else x
    if name == "layer_norm":
        want = ref.layer_norm(values, weight, bias, axis=axis, eps=eps, mask=mask)
    else:
        y, rstd = ref.rms_norm(values, weight, bias, axis=axis, eps=eps, mask=mask)
        want = (y, None, rstd)
    check_forward_result(name, result, want, xa.dtype, return_stats, out, cond=conditioning(values, want[2], weight))


@pytest.mark.parametrize("name", GROUPED)
@SETTINGS
@given(data=st.data())
def test_fuzz_instance_and_group_norm(name, data):
    draw = data.draw
    bad = Bad()
    min_ndim = 3 if name == "instance_norm" else 2
    x, rng, layout = draw(xs(min_ndim=draw(st.sampled_from([min_ndim] * 15 + [min_ndim - 1])), max_ndim=4))
    xa = np.asarray(x)
    check_x_dtype(x, bad)
    if xa.ndim < min_ndim:
        bad.add("x", ValueError)
        axis = -1
        c, s, mshape = 1, 1, (1,)
    else:
        axis = draw_single_axis(draw, xa.ndim, bad, batch_axis_forbidden=True)
        ax = axis % xa.ndim if "axis" not in bad.args else 1
        c = xa.shape[ax]
        s = int(np.prod([n for a, n in enumerate(xa.shape) if a not in (0, ax)]))
        mshape = tuple(n for a, n in enumerate(xa.shape) if a != ax)
        if "axis" not in bad.args and c * s == 0:
            bad.add("x", ValueError)
    extra = ()
    if name == "group_norm":
        divisors = [d for d in range(1, c + 1) if c % d == 0] or [1]
        g = draw(st.sampled_from(divisors * 12 + [0, -2, c + 1] + [np.int64(divisors[-1])] * 3))
        if g < 1 or (c and c % g):
            bad.add("num_groups", ValueError)
        extra = (g,)
    weight = draw_param(draw, rng, "weight", (c,), bad, xa.dtype)
    bias = draw_param(draw, rng, "bias", (c,), bad, xa.dtype)
    mask = draw_mask(draw, rng, mshape, bad)
    eps = draw_eps(draw, bad, allow_zero=not has_constant_float64_groups(x, layout))
    out, overlaps = draw_out(draw, rng, x, layout, bad)
    return_stats = draw(st.booleans())

    x_before = snapshot(x)[0] if layout != "list" else None
    inputs = [weight, bias, mask]
    copies = snapshot(*inputs)
    kw = dict(axis=axis, eps=eps, mask=mask, out=out, return_stats=return_stats)
    result, raised = call_checked(getattr(fastnorm, name), bad, x, *extra, weight, bias, **kw)
    assert_unchanged(inputs, copies, ["weight", "bias", "mask"])
    if not (overlaps and not raised):
        assert_unchanged([x], [x_before], ["x"])
    if raised:
        return
    values = x_before if x_before is not None else x
    if name == "instance_norm":
        want = ref.instance_norm(values, weight, bias, axis=axis, eps=eps, mask=mask)
    else:
        want = ref.group_norm(values, int(extra[0]), weight, bias, axis=axis, eps=eps, mask=mask)
    check_forward_result(name, result, want, xa.dtype, return_stats, out, cond=conditioning(values, want[2], weight))


def draw_running(draw, rng, c, training, bad):
    """(running_mean, running_var) in some valid or broken form."""
    kind = pick(draw, {"none": 6 if training else 1, "ok": 10, "only_mean": 1, "only_var": 1, "wrong_shape": 1,
                       "int": 1, "list": 1, "readonly": 2})
    dtype = draw(st.sampled_from([np.float64, np.float32, np.float16]))
    rm = rng.standard_normal(c).astype(dtype)
    rv = (0.5 + rng.random(c)).astype(dtype)
    if kind == "none":
        if not training:
            bad.add("running_mean", ValueError)
            bad.add("running_var", ValueError)
            bad.add("training", ValueError)
        return None, None
    if kind in ("only_mean", "only_var"):
        for n in ("running_mean", "running_var"):
            bad.add(n, ValueError)
        return (rm, None) if kind == "only_mean" else (None, rv)
    which = draw(st.sampled_from(["running_mean", "running_var"]))
    if kind == "wrong_shape":
        bad.add(which, ValueError)
        wrong = np.zeros((c + 1,), dtype=dtype) if draw(st.booleans()) else np.ones((1, c), dtype=dtype)
        return (wrong, rv) if which == "running_mean" else (rm, wrong)
    if kind == "int":
        bad.add(which, TypeError)
        return (rm.astype(np.int64), rv) if which == "running_mean" else (rm, rv.astype(np.int64))
    if kind == "list":
        bad.add(which, TypeError)
        return (rm.tolist(), rv) if which == "running_mean" else (rm, rv.tolist())
    if kind == "readonly":
        (rm if which == "running_mean" else rv).flags.writeable = False
        if training:
            bad.add(which, ValueError)
    return rm, rv


@SETTINGS
@given(data=st.data())
def test_fuzz_batch_norm(data):
    draw = data.draw
    bad = Bad()
    x, rng, layout = draw(xs(min_ndim=draw(st.sampled_from([1] * 15 + [0])), max_ndim=4))
    xa = np.asarray(x)
    check_x_dtype(x, bad)
    axis = draw_single_axis(draw, xa.ndim, bad, batch_axis_forbidden=False)
    if "axis" in bad.args:
        c, mshape = 2, (2,)
    else:
        ax = axis % xa.ndim
        c = xa.shape[ax]
        mshape = tuple(n for a, n in enumerate(xa.shape) if a != ax)
    training = draw(st.booleans())
    weight = draw_param(draw, rng, "weight", (c,), bad, xa.dtype)
    bias = draw_param(draw, rng, "bias", (c,), bad, xa.dtype)
    mask = draw_mask(draw, rng, mshape, bad)
    eps = draw_eps(draw, bad, allow_zero=not has_constant_float64_groups(x, layout))
    momentum = draw(st.sampled_from([0.1] * 6 + [0.0, 1.0, 0.37, np.float32(0.5), "bad"]))
    if momentum == "bad":
        momentum = draw(st.sampled_from([-0.1, 1.5, np.nan, "0.1", None]))
        bad.add("momentum", ValueError if isinstance(momentum, float) else TypeError)
    rm, rv = draw_running(draw, rng, c, training, bad)
    out, overlaps = draw_out(draw, rng, x, layout, bad)
    return_stats = draw(st.booleans())
    if "axis" not in bad.args and "mask" not in bad.args and training and xa.size:
        n_real = xa.size // c if mask is None else int(np.count_nonzero(mask))
        if n_real < 2:
            bad.add("mask" if mask is not None else "x", ValueError)

    x_before = snapshot(x)[0] if layout != "list" else None
    inputs = [weight, bias, mask, rm, rv]
    copies = snapshot(*inputs)
    kw = dict(axis=axis, eps=eps, mask=mask, out=out, return_stats=return_stats, training=training,
              momentum=momentum, running_mean=rm, running_var=rv)
    result, raised = call_checked(fastnorm.batch_norm, bad, x, weight, bias, **kw)
    updates = not raised and training and rm is not None and xa.size > 0
    assert_unchanged(inputs[:3], copies[:3], ["weight", "bias", "mask"])
    if not updates:
        assert_unchanged(inputs[3:], copies[3:], ["running_mean", "running_var"])
    if not (overlaps and not raised):
        assert_unchanged([x], [x_before], ["x"])
    if raised:
        return
    values = x_before if x_before is not None else x
    rm0, rv0 = copies[3], copies[4]
    want = ref.batch_norm(values, weight, bias, axis=axis, running_mean=rm0, running_var=rv0,
                          training=training, eps=eps, mask=mask)
    check_forward_result("batch_norm", result, want, xa.dtype, return_stats, out, compare_stats=training,
                         cond=conditioning(values, want[2], weight))
    if return_stats and not training:
        _, mean, rstd = result
        assert_close(mean, rm0.astype(np.float64), 1e-7, "eval mean")
        assert_close(rstd, ref.inv_sqrt(rv0.astype(np.float64) + eps), 1e-6, "eval rstd")
    if updates:
        new_rm, new_rv = ref.batch_norm_running_update(values, rm0, rv0, axis=axis, momentum=float(momentum),
                                                       mask=mask)
        tol = {2: 2e-3, 4: 1e-6, 8: 1e-10}[rm.dtype.itemsize]
        tol = max(tol, 2e-3 if xa.dtype == np.float16 else 0)
        assert_stats_close(rm, new_rm, tol, "running_mean")
        assert_stats_close(rv, new_rv, tol, "running_var")


# --------------------------------------------------------------------------- backward fuzz

def _stats_for_backward(name, values, axis, eps, mask, num_groups, sd):
    """(mean, rstd) as the forward call with return_stats=True would give them (reference, cast)."""
    if name == "layer_norm":
        _, mean, rstd = ref.layer_norm(values, axis=axis, eps=eps, mask=mask)
    elif name == "rms_norm":
        _, rstd = ref.rms_norm(values, axis=axis, eps=eps, mask=mask)
        mean = None
    elif name == "instance_norm":
        _, mean, rstd = ref.instance_norm(values, axis=axis, eps=eps, mask=mask)
    elif name == "group_norm":
        _, mean, rstd = ref.group_norm(values, num_groups, axis=axis, eps=eps, mask=mask)
    else:
        _, mean, rstd = ref.batch_norm(values, axis=axis, eps=eps, mask=mask)
    return (None if mean is None else mean.astype(sd)), rstd.astype(sd)


@pytest.mark.parametrize("name", gref.NAMES)
@SETTINGS
@given(data=st.data())
def test_fuzz_backward(name, data):
    """(dx, dweight, dbias) against the closed-form float64 gradients, or a clean error."""
    draw = data.draw
    bad = Bad()
    min_ndim = {"instance_norm": 3, "group_norm": 2}.get(name, 1)
    x, rng, layout = draw(xs(min_ndim=min_ndim, max_ndim=4, max_side=4,
                             dtypes=["f2", "f4", "f8", "f8", "f4", "i4", "?"], complex_rate=8))
    xa = np.asarray(x)
    check_x_dtype(x, bad)
    values = np.array(x, copy=True)
    finite = values.dtype.kind != "f" or np.isfinite(values).all()
    if name in LAYER:
        axis = draw_layer_axis(draw, xa.ndim, bad)
    else:
        axis = draw_single_axis(draw, xa.ndim, bad, batch_axis_forbidden=name in GROUPED)
    if bad or not finite:
        # keep the backward fuzz on the gradients: a broken axis or dtype is the forward fuzz's job
        return
    feat = gref.feature_axes(name, axis, xa.ndim)
    pshape = gref.param_shape(name, xa.shape, axis)
    mshape = gref.mask_shape(name, xa.shape, axis)
    c = pshape[0] if name not in LAYER else None
    num_groups = None
    if name == "group_norm":
        num_groups = draw(st.sampled_from([d for d in range(1, c + 1) if c % d == 0] or [1]))
    empty_reduction = (int(np.prod(pshape)) == 0 if name in LAYER else
                       name in GROUPED and c * int(np.prod([n for a, n in enumerate(xa.shape)
                                                           if a not in (0,) + feat])) == 0)
    if empty_reduction:
        return
    eps = draw(st.sampled_from([1e-5, 1e-2, 1.0]))
    training = draw(st.booleans()) if name == "batch_norm" else True
    mask = draw_mask(draw, rng, mshape, Bad()) if draw(st.booleans()) else None
    if mask is not None and (np.asarray(mask).dtype != bool or np.shape(mask) != mshape):
        mask = None
    weight = draw(st.sampled_from([None, "w"]))
    if weight == "w":
        weight = (0.5 + rng.random(pshape)).astype(draw(st.sampled_from([np.float64, np.float32])))
    if name == "batch_norm" and not training:
        rmean = rng.standard_normal(c)
        rvar = 0.5 + rng.random(c)
        mean64, rstd64 = rmean, 1.0 / np.sqrt(rvar + eps)
    else:
        rmean = rvar = None
        mean64, rstd64 = _stats_for_backward(name, values, axis, eps, mask, num_groups, np.float64)
    # The statistics as return_stats gives them (float32 for float16/float32 x) lose
    # |mean| * rstd * 2**-24 of relative accuracy in xhat (see test_backward_float32_stats_large_offset);
    # use them where that is below ~1e-6, else float64 statistics (which fastnorm also takes).
    sd = stats_dtype(xa.dtype)
    offset = 0.0 if mean64 is None else float(np.max(np.abs(mean64) * rstd64, initial=0.0))
    if sd == np.float32 and offset > 16:
        sd = np.dtype(np.float64)
    mean = None if mean64 is None else mean64.astype(sd)
    rstd = rstd64.astype(sd)
    dy_dtype = draw(st.sampled_from([result_dtype(xa.dtype), np.float64, np.float32, np.float16]))
    dy = ref.make_layout((rng.standard_normal(xa.shape) * draw(st.sampled_from([1.0, 3.0]))).astype(dy_dtype),
                         draw(st.sampled_from(["C", "F", "sliced", "negative", "byteswapped"])))
    # now break something, sometimes
    breakage = draw(st.sampled_from([None] * 6 + ["dy_shape", "dy_complex", "mean_shape", "rstd_shape",
                                                  "mean_none", "weight_shape", "mask_dtype"]))
    if breakage == "dy_shape":
        dy, _ = np.ones(xa.shape + (2,)), bad.add("dy", ValueError)
    elif breakage == "dy_complex":
        dy, _ = dy.astype(np.complex128), bad.add("dy", TypeError)
    elif breakage == "mean_shape" and mean is not None:
        mean, _ = np.zeros(mean.shape + (1,), dtype=sd), bad.add("mean", ValueError)
    elif breakage == "mean_none" and mean is not None:
        mean, _ = None, bad.add("mean", ValueError, TypeError)
    elif breakage == "rstd_shape":
        rstd, _ = np.zeros((rstd.size + 1,), dtype=sd), bad.add("rstd", ValueError)
    elif breakage == "weight_shape":
        weight, _ = np.ones(pshape + (2,)), bad.add("weight", ValueError)
    elif breakage == "mask_dtype":
        mask, _ = np.ones(mshape, dtype=np.int8), bad.add("mask", TypeError)

    # out= for dx (an addition to the contract, docs/decisions.md): fresh, dy or x itself, a
    # reversed view of x or dy, or wrong
    out_kind = pick(draw, {"none": 10, "fresh": 1, "fresh_swapped": 1, "dy": 2, "x": 2, "reversed": 2,
                           "wrong_shape": 1, "wrong_dtype": 1, "readonly": 1})
    rd = result_dtype(xa.dtype)
    out, aliased = None, None
    if out_kind == "fresh":
        out = np.full(xa.shape, np.nan, dtype=rd)
    elif out_kind == "fresh_swapped":
        out = np.full(xa.shape, np.nan, dtype=rd.newbyteorder("S"))
    elif out_kind in ("dy", "x", "reversed") and not (out_kind != "dy" and layout == "list"):
        aliased = "x" if out_kind == "x" or (out_kind == "reversed" and layout != "list" and draw(st.booleans())) \
            else "dy"
        base = x if aliased == "x" else dy
        out = np.flip(base, axis=draw(st.integers(0, xa.ndim - 1))) if out_kind == "reversed" else base
        if not isinstance(out, np.ndarray) or out.shape != xa.shape:
            out, aliased = None, None
        elif not out.flags.writeable or out.dtype.kind != "f" or out.dtype.itemsize != rd.itemsize:
            bad.add("out", ValueError)
    elif out_kind == "wrong_shape":
        out = np.empty(xa.shape + (1,), dtype=rd)
        bad.add("out", ValueError)
    elif out_kind == "wrong_dtype":
        out = np.empty(xa.shape, dtype=np.float32 if rd != np.float32 else np.float64)
        bad.add("out", ValueError)
    elif out_kind == "readonly":
        out = np.empty(xa.shape, dtype=rd)
        out.flags.writeable = False
        bad.add("out", ValueError)
    dy_values = np.array(dy, copy=True)

    fn = getattr(fastnorm, name + "_backward")
    kw = dict(axis=axis, mask=mask, out=out)
    if name == "rms_norm":
        args = (dy, x, rstd, weight)
    elif name == "group_norm":
        args = (dy, x, mean, rstd, num_groups, weight)
    else:
        args = (dy, x, mean, rstd, weight)
    if name == "batch_norm":
        kw["training"] = training
    inputs = [dy, x if layout != "list" else None, mean, rstd, weight, mask]
    names = ["dy", "x", "mean", "rstd", "weight", "mask"]
    copies = snapshot(*inputs)
    result, raised = call_checked(fn, bad, *args, **kw)
    keep = [n not in (aliased if not raised else None,) for n in names]
    assert_unchanged([i for i, k in zip(inputs, keep) if k], [c for c, k in zip(copies, keep) if k],
                     [n for n, k in zip(names, keep) if k])
    if raised:
        return
    dx, dweight, dbias = result
    want = gref.analytic_grads(name, dy_values, values, weight, axis=axis, mask=mask, num_groups=num_groups,
                               training=training, running_mean=rmean, running_var=rvar, eps=eps)
    if out is not None:
        assert dx is out, "dx is not the out array"
    for label, got, w in zip(("dx", "dweight", "dbias"), (dx, dweight, dbias), want):
        assert isinstance(got, np.ndarray), f"{label}: {type(got)}"
        assert (got is out) or got.dtype == rd, f"{label}: dtype {got.dtype}, expected {rd}"
        for o in (dy, x, mean, rstd, weight, mask):
            if isinstance(o, np.ndarray) and o is not out and not (label == "dx" and aliased):
                assert not np.shares_memory(got, o), f"{label} shares memory with an input"
        # dx's scale is that of its terms, rstd * |dy * weight| (dx itself may cancel to ~0)
        scale = None
        if label == "dx":
            g = np.abs(dy_values.astype(np.float64)) * gref._weight_full(name, weight, xa.shape, axis)
            r = rstd64 if name == "batch_norm" else rstd64.reshape(-1)
            scale = float(np.max(g, initial=0.0)) * float(np.max(np.abs(r), initial=0.0))
        assert_close(got, w, TOL[rd], f"{name}_backward: {label}", scale=scale)


# --------------------------------------------------------------------------- sizes that use threads

@pytest.mark.parametrize("name", gref.NAMES)
@settings(max_examples=max(6, EXAMPLES // 15), deadline=None, database=None,
          derandomize=os.environ.get("FASTNORM_FUZZ_RANDOM", "") != "1", suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_threaded_sizes(name, data):
    """Arrays of 2**17..2**18 elements (split across fastnorm's threads) in awkward layouts, with
    masks, weights, the thread count 1 or 2, forward and backward, against the references."""
    draw = data.draw
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    ndim = draw(st.integers(3 if name == "instance_norm" else 2, 4))
    total = 2 ** draw(st.integers(17, 18))
    shape = [1] * ndim
    for i in range(int(np.log2(total))):                    # spread the factors of 2 over the axes
        shape[draw(st.integers(0, ndim - 1))] *= 2
    shape[-1] += draw(st.sampled_from([0, 1, 3]))           # not a power of two everywhere
    shape = tuple(shape)
    dtype = np.dtype(draw(st.sampled_from(["f2", "f4", "f8"])))
    v = (draw(st.sampled_from([0.0, 100.0])) + rng.standard_normal(shape)).astype(dtype)
    layout = draw(st.sampled_from(["C", "F", "sliced", "transposed", "negative", "byteswapped", "misaligned"]))
    x = ref.make_layout(v, layout)
    if name in LAYER:
        axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=2, unique=True))
        axis = tuple(axes) if len(axes) > 1 else axes[0] - ndim
    else:
        axis = draw(st.integers(1 if name in GROUPED else 0, ndim - 1))
    feat = gref.feature_axes(name, axis, ndim)
    pshape = gref.param_shape(name, shape, axis)
    mshape = gref.mask_shape(name, shape, axis)
    num_groups = None
    if name == "group_norm":
        c = pshape[0]
        num_groups = draw(st.sampled_from([d for d in (1, 2, 4, c) if c % d == 0]))
    if name == "batch_norm" and v.size // pshape[0] < 2:
        return                                               # one value per feature: an error (fuzzed above)
    weight = (0.5 + rng.random(pshape)) if draw(st.booleans()) else None
    bias = rng.standard_normal(pshape) if draw(st.booleans()) else None
    mask = (rng.random(mshape) < 0.8) if draw(st.booleans()) else None
    saved_threads = fastnorm.get_num_threads()
    fastnorm.set_num_threads(draw(st.sampled_from([1, 2])))
    try:
        extra = (num_groups,) if name == "group_norm" else ()
        got = getattr(fastnorm, name)(x, *extra, weight, bias, axis=axis, mask=mask, return_stats=True)
        if name == "rms_norm":
            want = ref.rms_norm(v, weight, bias, axis=axis, mask=mask)
            want = (want[0], None, want[1])
        elif name == "group_norm":
            want = ref.group_norm(v, num_groups, weight, bias, axis=axis, mask=mask)
        else:
            want = getattr(ref, name)(v, weight, bias, axis=axis, mask=mask)
        check_forward_result(name, got, want, dtype, True, None, cond=conditioning(v, want[2], weight))
        dy = rng.standard_normal(shape).astype(dtype)
        stats = got[1:]
        if dtype != np.float64:                              # float64 stats: see the large-offset xfail
            stats = tuple(np.asarray(s_, dtype=np.float64) for s_ in
                          ((want[2],) if name == "rms_norm" else want[1:]))
        args = (dy, x, *stats, *extra, weight)
        dx, dw, db = getattr(fastnorm, name + "_backward")(*args, axis=axis, mask=mask)
        gw = gref.analytic_grads(name, dy, v, weight, axis=axis, mask=mask, num_groups=num_groups)
        r = np.asarray(want[2], dtype=np.float64)
        scale = float(np.max(np.abs(dy.astype(np.float64)))) * float(np.max(r)) * (
            1.0 if weight is None else float(weight.max()))
        tol = TOL[dtype]
        assert_close(dx, gw[0], tol, f"{name}_backward dx", scale=scale)
        # dweight/dbias: sums of up to 2**18 terms in double, rounded once to x's dtype
        assert_close(dw, gw[1], tol, f"{name}_backward dweight")
        assert_close(db, gw[2], tol, f"{name}_backward dbias")
    finally:
        fastnorm.set_num_threads(saved_threads)


# --------------------------------------------------------------------------- odd arguments

ODD_VALUES = [None, "1", 1j, [1], (), np.nan, np.inf, -1, -0.5, 2, 1e300, np.float32(0.1), np.int64(1), object()]


@pytest.mark.parametrize("argname", ["eps", "momentum", "training_eps"])
@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(value=st.sampled_from(ODD_VALUES))
def test_odd_scalar_arguments(argname, value):
    """eps/momentum given anything: a result (when it is a valid number) or an error naming it."""
    x = np.arange(12.0).reshape(4, 3) % 5
    if argname == "momentum":
        valid = isinstance(value, (int, float, np.floating, np.integer)) and 0 <= value <= 1
        fn = lambda: fastnorm.batch_norm(x, running_mean=np.zeros(3), running_var=np.ones(3), momentum=value)  # noqa: E731
    else:
        valid = (isinstance(value, (int, float, np.floating, np.integer)) and np.isfinite(value) and value >= 0)
        fn = (lambda: fastnorm.layer_norm(x, eps=value)) if argname == "eps" else \
            (lambda: fastnorm.batch_norm(x, running_mean=np.zeros(3), running_var=np.ones(3), training=False,
                                         eps=value))
    name = "momentum" if argname == "momentum" else "eps"
    bad = Bad()
    if not valid:
        bad.add(name, TypeError, ValueError)
    result, raised = call_checked(fn, bad)
    if not raised:
        assert np.isfinite(result).all()


# --------------------------------------------------------------------------- bugs this file found, fixed

X3 = np.random.default_rng(5).standard_normal((2, 4, 6))


@pytest.mark.parametrize("name", ["layer_norm", "instance_norm", "group_norm"])
@pytest.mark.parametrize("bad_axis", [True, 1.0])
def test_bad_axis_type_rejected_after_a_good_call(name, bad_axis):
    extra = (2,) if name == "group_norm" else ()
    getattr(fastnorm, name)(X3, *extra, axis=1)
    with pytest.raises(TypeError, match="axis"):
        getattr(fastnorm, name)(X3, *extra, axis=bad_axis)


@pytest.mark.parametrize("good,bad_groups", [(2, 2.0), (1, True)])
def test_bad_num_groups_type_rejected_after_a_good_call(good, bad_groups):
    fastnorm.group_norm(X3, good)
    with pytest.raises((TypeError, ValueError), match="num_groups"):
        fastnorm.group_norm(X3, bad_groups)


@pytest.mark.parametrize("fn", ["group_norm", "group_norm_backward"])
def test_group_norm_num_groups_none_is_an_error(fn):
    if fn == "group_norm":
        call = lambda: fastnorm.group_norm(X3, None)  # noqa: E731
    else:
        _, mean, rstd = fastnorm.group_norm(X3, 6, return_stats=True)
        call = lambda: fastnorm.group_norm_backward(X3, X3, mean, rstd, None)  # noqa: E731
    with pytest.raises((TypeError, ValueError), match="num_groups"):
        call()


def test_backward_out_aliasing_weight():
    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    _, mean, rstd = fastnorm.layer_norm(x, return_stats=True)
    w = np.arange(1.0, 5.0)
    want = fastnorm.layer_norm_backward(dy, x, mean, rstd, w)[0]
    out = np.empty((3, 4))
    out[0] = w
    got = fastnorm.layer_norm_backward(dy, x, mean, rstd, out[0], out=out)[0]
    np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("which", ["weight", "bias"])
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "group_norm"])
def test_out_aliasing_weight_or_bias(name, which):
    """out=buf with weight (or bias) = buf[0]: the result must be that of a copy of the parameter.
    (return_stats=True keeps the call off the layer-norm fast path, which copies the parameters.)"""
    x = np.random.default_rng(3).standard_normal((3, 4))
    out = np.empty((3, 4))
    p = out[0]
    p[:] = [1.0, 2.0, 3.0, 4.0]
    aliased = {"weight": None, "bias": None, which: p}
    copied = {"weight": None, "bias": None, which: p.copy()}
    if name == "group_norm":
        want = ref.group_norm(x, 2, copied["weight"], copied["bias"])[0]
        got = fastnorm.group_norm(x, 2, aliased["weight"], aliased["bias"], out=out)
    else:
        want = getattr(ref, name)(x, copied["weight"], copied["bias"])[0]
        got = getattr(fastnorm, name)(x, aliased["weight"], aliased["bias"], out=out, return_stats=True)[0]
    np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.xfail(strict=True, reason="float32 mean/rstd from return_stats (the contract's stats dtype) carry "
                                       "|mean| * rstd * 2**-24 relative error into xhat; the gradients of large-offset "
                                       "float32 data lose accuracy (float64 stats give 1e-7)")
def test_backward_float32_stats_large_offset():
    """The contract's accuracy for float32 (~1e-5 of the output scale, 'also for rows with a large mean
    offset (e.g. mean 1e4, std 1)') for the gradients, with the statistics as return_stats gives them."""
    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.standard_normal((64, 256))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, mean, rstd = fastnorm.layer_norm(x, return_stats=True)
    assert mean.dtype == np.float32
    dx = fastnorm.layer_norm_backward(dy, x, mean, rstd)[0]
    want = gref.analytic_grads("layer_norm", dy, x)[0]
    scale = float(np.max(np.abs(dy))) * float(np.max(rstd))
    assert np.max(np.abs(dx - want)) <= 1e-4 * scale
