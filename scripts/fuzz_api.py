"""Coverage-guided fuzzing of fastnorm's public API with atheris (libFuzzer for Python).

    .venv/bin/pip install atheris
    .venv/bin/python scripts/fuzz_api.py -max_total_time=600 [-seed=1] [corpus_dir]
    .venv/bin/python -m coverage run --source=fastnorm scripts/fuzz_api.py --replay corpus_dir

Not part of the test suite (it runs for as long as it is told to). Every input picks a public
function (the forward and backward norms, the layers, standardize, min_max_scale, weight_norm and
its gradient, mask_from_lengths) and builds its arguments from the fuzzer's bytes: x of 0 to 4
dimensions (sides 0 to 6, now and then up to 40) in float16/32/64, int32 or bool, laid out C,
Fortran, step-sliced, transposed, negatively strided, byte-swapped, misaligned or zero-stride
(np.broadcast_to); values normal with offsets up to 1e4, or with NaN, +-Inf, huge (a quarter of the
dtype's maximum) or subnormal entries, or constant; axis right or wrong; weight/bias/mask/running
statistics/num_groups/eps/momentum right, of the wrong shape or type, or sharing memory with the
output (out is x, a reversed view of x, or a buffer whose rows are weight and bias; running_mean a
row of x; dy the output of the backward call). Each call is checked:

1. it returns, or raises TypeError/ValueError (AxisError included) with a message that starts with
   the function's name; any other exception, or a crash, is a finding;
2. nothing the caller passed changed, except out (and x or dy when out is one of them) and the
   running statistics in training;
3. the result equals the same call made with fresh copies of every input and no out (outputs
   written through aliases must not differ from that), within float16 2e-2, float32 1e-4, float64
   1e-9 of the output scale, NaN where it has NaN;
4. for tame inputs (finite, |x| <= 1e4, eps >= 1e-6, no aliasing) the result also matches the
   float64 NumPy references of tests/reference.py and tests/grad_reference.py.

Findings are printed once per kind (function, check, alias) and appended to FUZZ_FINDINGS
(default: fuzz_findings.txt); the run goes on, so one run reports every kind it meets. The Python
code of fastnorm is instrumented for coverage (atheris.instrument_imports); the C extension is not
(build it with -fsanitize=fuzzer-no-link to add its edges).
"""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["fastnorm"]):
    import fastnorm  # noqa: E402

import grad_reference as gref  # noqa: E402
import reference as ref  # noqa: E402

FINDINGS = os.environ.get("FUZZ_FINDINGS", "fuzz_findings.txt")
SEEN: set = set()
DTYPES = (np.float16, np.float32, np.float64, np.int32, np.bool_)
TOL = {np.dtype(np.float16): 2e-2, np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}
LAYOUTS = ref.LAYOUTS + ("broadcast",)
FORWARD = ("layer_norm", "rms_norm", "batch_norm", "instance_norm", "group_norm")
BACKWARD = tuple(f + "_backward" for f in FORWARD)
OTHER = ("standardize", "min_max_scale", "weight_norm", "weight_norm_backward", "mask_from_lengths", "layer")
FUNCTIONS = FORWARD + BACKWARD + OTHER


class Finding(Exception):
    pass


def report(kind: str, detail: str) -> None:
    if kind in SEEN:
        return
    SEEN.add(kind)
    line = f"FINDING {kind}: {detail}"
    print(line, flush=True)
    with open(FINDINGS, "a") as f:
        f.write(line + "\n")


# ---- drawing arguments from the fuzzer's bytes ----------------------------------------------------

class Draw:
    def __init__(self, data: bytes):
        self.fdp = atheris.FuzzedDataProvider(data)
        self.rng = np.random.default_rng(self.fdp.ConsumeUInt(4))
        self.notes: list[str] = []
        self.scales: tuple = ()

    def pick(self, options, what=None):
        choice = options[self.fdp.ConsumeIntInRange(0, len(options) - 1)]
        if what:
            self.notes.append(f"{what}={choice!r}")
        return choice

    def chance(self, one_in: int) -> bool:
        return self.fdp.ConsumeIntInRange(0, one_in - 1) == 0

    def int_in(self, lo, hi):
        return self.fdp.ConsumeIntInRange(lo, hi)

    def values(self, shape, dtype, tame_only=False):
        """Random values of `shape` in `dtype`; returns (array, tame)."""
        dtype = np.dtype(dtype)
        if dtype.kind == "b":
            return self.rng.random(shape) < 0.5, True
        if dtype.kind in "iu":
            return self.rng.integers(-50, 50, size=shape).astype(dtype), True
        loc = self.pick((0.0, 1.0, 100.0, 1e4))
        scale = self.pick((1e-2, 1.0, 50.0))
        a = (loc + scale * self.rng.standard_normal(shape)).astype(dtype)
        special = "none" if tame_only else self.pick(("none", "none", "none", "nan", "inf", "huge", "subnormal",
                                                      "constant"), "values")
        if a.size and special != "none":
            info = np.finfo(dtype)
            flat = a.reshape(-1)
            where = self.rng.integers(0, a.size, size=1 + a.size // 8)
            fill = {"nan": np.nan, "inf": -np.inf if self.chance(2) else np.inf, "huge": float(info.max) / 4,
                    "subnormal": float(info.smallest_subnormal) * 3, "constant": loc}[special]
            if special == "constant":
                flat[:] = fill
            else:
                flat[where] = fill
        return a, special in ("none", "constant") and loc <= 1e4


def layout(d: Draw, a: np.ndarray, what: str) -> np.ndarray:
    kind = d.pick(LAYOUTS, what + " layout")
    if kind == "broadcast":
        if a.size == 0 or a.ndim == 0:
            return a
        return np.broadcast_to(a.reshape(-1)[:1].reshape((1,) * a.ndim), a.shape)
    return ref.make_layout(a, kind)


def draw_shape(d: Draw, min_ndim: int) -> tuple:
    ndim = d.int_in(min_ndim, 4)
    big = d.chance(8)
    return tuple(d.int_in(0 if d.chance(6) else 1, 40 if big and i == ndim - 1 else 6) for i in range(ndim))


def draw_axis(d: Draw, ndim: int, allow_tuple: bool, batch_axis_free: bool):
    kind = d.pick(("last", "int", "tuple", "wrong", "wrong"))
    if ndim == 0 or kind == "last":
        return -1
    if kind == "int" and (batch_axis_free or ndim > 1):
        return d.int_in(1 if not batch_axis_free else -ndim, ndim - 1)
    if kind == "tuple" and allow_tuple:
        n = d.int_in(1, ndim)
        return tuple(sorted(set(d.int_in(0, ndim - 1) for _ in range(n))))
    return d.pick((ndim, -ndim - 1, 2**63, 1.0, True, "1", None, (0, 0), ()))


# ---- checks ---------------------------------------------------------------------------------------

def snapshot(args: dict):
    return {k: (v, v.tobytes(), v.strides) for k, v in args.items() if isinstance(v, np.ndarray)}


def unchanged(before, allowed_ids) -> list[str]:
    changed = []
    for k, (v, data, _) in before.items():
        if id(v) in allowed_ids:
            continue
        if v.tobytes() != data:
            changed.append(k)
    return changed


def shares_with(v, outputs) -> bool:
    return any(o is not None and np.shares_memory(v, o) for o in outputs)


def close(got, want, dtype, what: str, term_scale: float = 1.0) -> str | None:
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return f"{what}: shape {got.shape} != {want.shape}"
    g, w = got.astype(np.float64), want.astype(np.float64)
    nan_g, nan_w = np.isnan(g), np.isnan(w)
    if (nan_g != nan_w).any():
        return f"{what}: NaN at {np.argwhere(nan_g != nan_w)[:3].tolist()} differs"
    inf_w = np.isinf(w)
    if (np.isinf(g) != inf_w).any() or (g[inf_w] != w[inf_w]).any():
        return f"{what}: Inf differs"
    fin = ~(nan_w | inf_w)
    if not fin.any():
        return None
    scale = max(1.0, term_scale, float(np.abs(w[fin]).max()))
    err = float(np.abs(g[fin] - w[fin]).max())
    tol = TOL.get(np.dtype(dtype), 1e-9)
    if err > tol * scale:
        return f"{what}: max |diff| {err:.3g} > {tol:g} * {scale:.3g}"
    return None


def compare(results, expected, dtype, what: str, scales=()):
    """scales: per result, the size of the terms it sums (a gradient's), when larger than its own."""
    if not isinstance(results, tuple):
        results, expected = (results,), (expected,)
    if len(results) != len(expected):
        return f"{what}: {len(results)} results, expected {len(expected)}"
    for i, (g, w) in enumerate(zip(results, expected)):
        if g is None and w is None:
            continue
        msg = close(g, w, dtype, f"{what}[{i}]", scales[i] if i < len(scales) else 1.0)
        if msg:
            return msg
    return None


def fresh(v):
    return np.array(v, copy=True) if isinstance(v, np.ndarray) else v


# ---- one call -------------------------------------------------------------------------------------

def build(d: Draw):
    """(name, call(args) -> result, args, outputs that may change, reference() or None)."""
    name = d.pick(FUNCTIONS, "function")
    dtype = np.dtype(d.pick(DTYPES, "dtype"))
    rdtype = dtype if dtype.kind == "f" else np.dtype(np.float64)
    min_ndim = 3 if name.startswith("instance") else 2 if name.startswith("group") else 1
    shape = draw_shape(d, min_ndim if not d.chance(10) else 0)
    x0, tame = d.values(shape, dtype)
    x = layout(d, x0, "x")
    x0 = np.array(x, dtype=x.dtype.newbyteorder("="))     # the values the call sees (broadcast: one)
    args = {"x": x}
    kw = {}
    alias = "none"
    ndim = len(shape)
    base = name.replace("_backward", "")
    if name == "mask_from_lengths":
        lengths = d.rng.integers(0, 6, size=d.int_in(0, 5))
        args = {"lengths": layout(d, lengths, "lengths") if lengths.size else lengths}
        max_len = d.pick((None, 6, 3, 3.5, np.int64(7), -1, 2**63))
        return name, lambda a: fastnorm.mask_from_lengths(a["lengths"], max_len), args, (), None, alias, tame
    if name in ("standardize", "min_max_scale", "weight_norm", "weight_norm_backward"):
        axis = draw_axis(d, ndim, False, True)
        if name == "standardize":
            eps = d.pick((0.0, 1e-5, 1.0))
            out = None
            if d.chance(3) and x.flags.writeable and rdtype == x.dtype:
                out, alias = x, "out=x"
            elif d.chance(3):
                out = np.empty(shape, rdtype)
            args["out"] = out
            return (name, lambda a: fastnorm.standardize(a["x"], axis, eps=eps, out=a["out"]), args, (out,),
                    lambda: ref.batch_norm(x0, axis=axis, eps=eps)[0] if eps > 0 else None, alias, tame)
        if name == "min_max_scale":
            rng_ = d.pick(((0, 1), (-1, 1), (-1e308, 1e308), (5, 5), (2, 1), "bad"))
            out = np.empty(shape, rdtype) if d.chance(3) else None
            args["out"] = out

            def mm_ref():
                xf = x0.astype(np.float64)
                ax = axis % ndim
                others = tuple(i for i in range(ndim) if i != ax)
                mn, mx = xf.min(axis=others, keepdims=True), xf.max(axis=others, keepdims=True)
                span = np.where(mx > mn, mx - mn, 1.0)
                return rng_[0] + (xf - mn) / span * (rng_[1] - rng_[0])
            return (name, lambda a: fastnorm.min_max_scale(a["x"], axis, feature_range=rng_, out=a["out"]), args,
                    (out,), mm_ref if rng_ in ((0, 1), (-1, 1)) else None, alias, tame)
        C = shape[axis] if isinstance(axis, int) and not isinstance(axis, bool) and -ndim <= axis < ndim else 1
        g, _ = d.values((C,), np.float64, tame_only=True)
        args["g"] = g
        if name == "weight_norm":
            return name, lambda a: fastnorm.weight_norm(a["x"], a["g"], axis=axis), args, (), None, alias, tame
        dw, _ = d.values(shape, dtype, tame_only=True)
        args["dw"] = layout(d, dw, "dw")
        return (name, lambda a: fastnorm.weight_norm_backward(a["dw"], a["x"], a["g"], axis=axis), args, (), None,
                alias, tame)
    if name == "layer":
        cls = d.pick(("LayerNorm", "RMSNorm", "BatchNorm", "InstanceNorm", "GroupNorm"), "layer")
        axis = -1 if ndim < 2 else d.pick((-1, 1))
        C = shape[axis] if ndim else 1
        groups = (d.pick((1, 2, 3)),) if cls == "GroupNorm" else ()
        layer = getattr(fastnorm, cls)(*groups, C, axis=axis)
        if d.chance(3):
            layer.eval()
        dy, _ = d.values(shape, rdtype, tame_only=True)
        args["dy"] = dy
        inplace = d.chance(3)

        def run_layer(a):
            y = layer(a["x"])
            if inplace and a["x"].flags.writeable and a["x"].dtype.kind == "f":
                a["x"] += 1.0          # the in-place residual x += f(layer(x))
            return y, layer.backward(a["dy"]), layer.dweight, layer.dbias
        # the layers keep state: a copy call needs its own layer, so only the reference checks them
        return name, run_layer, args, (x,) if inplace else (), None, "layer-inplace" if inplace else alias, tame

    # the five norms and their gradients
    allow_tuple = base in ("layer_norm", "rms_norm")
    axis = draw_axis(d, ndim, allow_tuple, base in ("layer_norm", "rms_norm", "batch_norm"))
    try:
        feat = ref.feature_axes(axis, ndim) if ndim else ()
    except Exception:
        feat = None
    if base in ("instance_norm", "group_norm") and feat is not None and 0 in feat:
        feat = None
    num_groups = None
    if base == "group_norm":
        num_groups = d.pick((1, 2, 3, 0, 1.5, None))
        kw["num_groups"] = num_groups
    eps = d.pick((1e-5, 0.0, 1.0, -1.0, float("nan")))
    valid_shape = feat is not None
    pshape = tuple(shape[a] for a in feat) if valid_shape else (1,)
    if base == "batch_norm" and valid_shape:
        mshape = tuple(s for i, s in enumerate(shape) if i not in feat)
    elif base in ("instance_norm", "group_norm") and valid_shape:
        mshape = (shape[0],) + tuple(s for i, s in enumerate(shape) if i not in feat and i != 0)
    else:
        mshape = tuple(s for i, s in enumerate(shape) if valid_shape and i not in feat)
    out_kind = d.pick(("none", "none", "fresh", "x", "reversed-x", "params-in-out", "mask-in-out",
                       "overlapping-x", "wrong"), "out")
    out = None
    if out_kind in ("fresh", "params-in-out", "mask-in-out"):
        out = np.empty(shape, rdtype)
        if out_kind == "params-in-out" and dtype == rdtype:
            x = args["x"] = np.ascontiguousarray(x0)      # a plain x: the C fast path's case too
    elif out_kind in ("x", "reversed-x") and x.flags.writeable and x.dtype == rdtype and x.ndim:
        out = x if out_kind == "x" else x[::-1]
        alias = f"out={out_kind}"
    elif out_kind == "overlapping-x" and ndim == 2 and shape[0] >= 2 and shape[1] >= 2 and dtype.kind == "f":
        # rows that share memory (as_strided), normalized in place: as the call on a copy of x
        step = d.int_in(1, shape[1] - 1)
        buf, _ = d.values(((shape[0] - 1) * step + shape[1],), dtype)
        x = np.lib.stride_tricks.as_strided(buf, shape, (step * buf.itemsize, buf.itemsize))
        x0 = np.array(x)
        args["x"] = out = x
        alias = "out=x with overlapping rows"
    elif out_kind == "wrong":
        out = np.empty(shape + (1,), rdtype)
    weight = bias = None
    wkind = "right" if out_kind == "params-in-out" else d.pick(("none", "right", "right", "wrong"), "weight")
    if wkind == "right":
        wdtype = rdtype if out_kind == "params-in-out" or d.chance(2) else np.float64
        weight, _ = d.values(pshape, wdtype, tame_only=True)
        bias, _ = d.values(pshape, weight.dtype, tame_only=True)
        if out_kind == "params-in-out" and out is not None and out.ndim >= 1 and out.shape[0] >= 2 and \
                out.shape[1:] == pshape and out.dtype == weight.dtype:
            out[0], out[1] = weight, bias
            weight, bias = out[0], out[1]
            alias = "weight,bias=rows of out"
    elif wkind == "wrong":
        weight = np.ones(pshape + (2,))
    mask = None
    mkind = d.pick(("none", "none", "random", "wrong"), "mask")
    if mkind == "random":
        mask = d.rng.random(mshape) < 0.7
        n = int(np.prod(mshape))
        if out_kind == "mask-in-out" and out is not None and out.nbytes >= n:
            # the mask lives in the first bytes of out, which the call overwrites
            in_out = out.reshape(-1).view(np.uint8)[:n].view(np.bool_).reshape(mshape)
            in_out[...] = mask
            mask = in_out
            alias = "mask in out's memory"
    elif mkind == "wrong":
        mask = np.ones(mshape + (1,), bool)
    mask0 = None if mask is None else mask.copy()      # the mask as passed (it may live in out)
    args.update(weight=weight, bias=bias, mask=mask, out=out)
    outputs = [out]

    if base == "batch_norm" and not name.endswith("_backward"):
        training = d.pick((True, False, "yes"), "training")
        momentum = d.pick((0.1, None, 1.5, 0.0))
        rkind = d.pick(("none", "fresh", "row-of-x"), "running")
        rm = rv = None
        if rkind == "fresh" or (training is False):
            C = pshape[0] if len(pshape) == 1 else 1
            rm, rv = np.zeros(C), np.ones(C)
        if rkind == "row-of-x" and x.ndim == 2 and x.flags.writeable and x.dtype == np.float64 and \
                x.shape[0] >= 2 and len(pshape) == 1 and x.shape[1] == pshape[0]:
            rm, rv = x[0], x[1]
            alias = "running stats=rows of x"
        args.update(running_mean=rm, running_var=rv)
        outputs += [rm, rv] if training is True else []

        def call(a):
            return fastnorm.batch_norm(a["x"], a["weight"], a["bias"], axis=axis, running_mean=a["running_mean"],
                                       running_var=a["running_var"], training=training, momentum=momentum, eps=eps,
                                       mask=a["mask"], out=a["out"], return_stats=True)

        def reference():
            if training is True and rm is None and momentum == 0.1:
                return ref.batch_norm(x0, weight, bias, axis=axis, eps=eps, mask=mask0)
            return None
        return name, call, args, tuple(outputs), reference if eps >= 1e-6 else None, alias, tame

    f = getattr(fastnorm, name)
    if not name.endswith("_backward"):
        # without stats, plain float32/64 x, weight, bias and out: the C fast path of layer/RMS norm
        return_stats = d.pick((True, False), "return_stats")

        def call(a):
            extra = (a.get("num_groups", kw.get("num_groups")),) if base == "group_norm" else ()
            return f(a["x"], *extra, a["weight"], a["bias"], axis=axis, eps=eps, mask=a["mask"], out=a["out"],
                     return_stats=return_stats)

        def reference():
            if base == "group_norm":
                want = ref.group_norm(x0, num_groups, weight, bias, axis=axis, eps=eps, mask=mask0)
            else:
                want = getattr(ref, base)(x0, weight, bias, axis=axis, eps=eps, mask=mask0)
            return want if return_stats else want[0]
        return name, call, args, tuple(outputs), reference if eps >= 1e-6 else None, alias, tame

    # backward: statistics from a forward call on x (tame), dy drawn like x
    fwd = getattr(fastnorm, base)
    dy0, _ = d.values(shape, rdtype, tame_only=True)
    dy = layout(d, dy0, "dy")
    dy0 = np.array(dy, dtype=dy.dtype.newbyteorder("="))
    training = True
    try:
        extra = (num_groups,) if base == "group_norm" else ()
        # float64 statistics (from float64 x): float32 ones would cost xhat |mean| * rstd * 2**-24
        stats = fwd(x0.astype(np.float64), *extra, weight, None, axis=axis, eps=eps, mask=mask0,
                    return_stats=True)[1:]
    except (TypeError, ValueError):
        stats = (np.zeros(1),) * (1 if base == "rms_norm" else 2)
    if base == "batch_norm":
        training = d.pick((True, False))
    if out_kind == "fresh" and d.chance(2) and dy.flags.writeable and dy.dtype == rdtype:
        out = dy
        args["out"] = out
        alias = "out=dy"
        outputs = [out]
    args["dy"] = dy
    if out_kind == "fresh" and alias == "none" and out is not None and out.dtype == np.float64 and \
            out.size >= sum(np.size(st) for st in stats) and d.chance(2):
        # mean and rstd live in out's memory, which the call overwrites
        flat, at, placed = out.reshape(-1), 0, []
        for st in stats:
            view = flat[at:at + np.size(st)].reshape(np.shape(st))
            view[...] = st
            placed.append(view)
            at += np.size(st)
        stats = tuple(placed)
        alias = "mean/rstd in out's memory"
    args.update({f"stat{i}": s for i, s in enumerate(stats)})
    nstats = len(stats)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight: its terms' size; dweight and
        # dbias sum dy * xhat and dy over the other axes
        big_dy = float(np.nanmax(np.abs(dy0), initial=0.0)) * (1.0 if weight is None or np.size(weight) == 0 else
                                                              float(np.nanmax(np.abs(weight), initial=1.0)))
        rstd = float(np.nanmax(np.abs(np.asarray(stats[-1], np.float64)), initial=0.0))
        xhat = float(np.nanmax(np.abs(x0.astype(np.float64)), initial=0.0)) * rstd + 1.0
        d.scales = (rstd * big_dy * xhat * 3, x0.size * big_dy * xhat, x0.size * big_dy)

    def call(a):
        extra = (num_groups,) if base == "group_norm" else ()
        st = tuple(a[f"stat{i}"] for i in range(nstats))
        more = {"training": training} if base == "batch_norm" else {}
        return f(a["dy"], a["x"], *st, *extra, a["weight"], axis=axis, mask=a["mask"], out=a["out"], **more)

    def reference():
        if base == "batch_norm" and not training:
            return None
        return gref.analytic_grads(base, dy0, x0, weight, axis=axis, mask=mask0, num_groups=num_groups,
                                   eps=eps, training=training)
    return name, call, args, tuple(outputs), reference if eps >= 1e-6 else None, alias, tame


ALLOWED = (TypeError, ValueError)


def message_ok(name: str, err: Exception) -> bool:
    text = str(err)
    names = [name, "LayerNorm", "RMSNorm", "BatchNorm", "InstanceNorm", "GroupNorm", *FORWARD, *BACKWARD]
    return any(text.startswith(n + ":") or text.startswith(n + ".") for n in names)


def test_one_input(data: bytes) -> None:
    d = Draw(data)
    try:
        name, call, args, outputs, reference, alias, tame = build(d)
    except (TypeError, ValueError, IndexError):
        return                                      # a combination the builder cannot make
    where = f"{name} alias={alias} " + " ".join(d.notes)
    before = snapshot(args)
    copies = {k: fresh(v) for k, v in args.items()}
    copies_outs = {k for k, v in args.items() if any(v is o for o in outputs if o is not None)}
    if "out" in copies:
        copies["out"] = None                         # the copy call returns fresh arrays
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = call(args)
        except ALLOWED as err:
            if not message_ok(name, err):
                report(f"{name}: unclear {type(err).__name__}", f"{where}: {err}")
            return
        except Exception as err:                     # noqa: BLE001 - every other type is a finding
            report(f"{name}: {type(err).__name__}", f"{where}: {err!r}")
            return
    outputs_hold_inf = any(np.isinf(np.asarray(r, np.float64)).any() for r in
                           (result if isinstance(result, tuple) else (result,)) if r is not None)
    for w in caught:
        # NumPy warns when a result beyond float16/32's range becomes Inf in the cast: as its own arithmetic
        if not (str(w.message) == "overflow encountered in cast" and outputs_hold_inf):
            report(f"{name}: {w.category.__name__} {str(w.message)[:40]}", where)
    changed = unchanged(before, {id(o) for o in outputs if o is not None})
    # a view of x used as out changes x; running stats that are rows of x change x
    changed = [k for k in changed if not shares_with(args[k], outputs)]
    if changed:
        report(f"{name}: modified {changed}", where)
    if name == "layer":
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = call(copies)
    except Exception as err:                         # noqa: BLE001
        report(f"{name}: copy call raised", f"{where}: {err!r}")
        return
    dtype = np.asarray(result[0] if isinstance(result, tuple) else result).dtype
    msg = compare(result, expected, dtype if dtype.kind == "f" else np.float64, "vs copies", d.scales)
    if msg:
        report(f"{name}: differs from the call on copies (alias={alias})", f"{where}: {msg}")
    running_differ = [k for k in copies_outs if k.startswith("running") and
                    close(args[k], copies[k], np.float64, k) is not None]
    if running_differ:
        report(f"{name}: running statistics differ from the call on copies (alias={alias})", where)
    if reference is None or not tame or alias != "none":
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            want = reference()
        except Exception:                            # noqa: BLE001 - the reference refuses too
            return
    if want is None:
        return
    got = result if isinstance(result, tuple) else (result,)
    want = want if isinstance(want, tuple) else (want,)
    if dtype.kind == "f" and any(np.nanmax(np.abs(np.asarray(w, np.float64)), initial=0.0) > np.finfo(dtype).max / 4
                                 for w in want if w is not None):
        return                                       # beyond the dtype's range: Inf is as right as anything
    msg = compare(tuple(got), tuple(want), dtype if dtype.kind == "f" else np.float64, "vs reference", d.scales)
    if msg:
        report(f"{name}: differs from the NumPy reference", f"{where}: {msg}")


def replay(paths) -> int:
    """Runs every input file under `paths` (files or corpus directories) once, in this process: for
    measuring the corpus's coverage with coverage.py, which libFuzzer's exit would not let save."""
    files = [os.path.join(p, f) for p in paths for f in sorted(os.listdir(p))] if all(map(os.path.isdir, paths)) \
        else list(paths)
    for path in files:
        with open(path, "rb") as f:
            test_one_input(f.read())
    return len(files)


def main():
    if sys.argv[1:2] == ["--replay"]:
        print(f"replayed {replay(sys.argv[2:])} inputs")
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
