"""Gradients of fastnorm (``*_backward``) against float64 references (tests/grad_reference.py).

The loss is ``L = sum(y * dy)`` for a fixed random ``dy``, so the backward functions must return
``dL/dx``, ``dL/dweight`` and ``dL/dbias``.  Expected values come from central finite differences of
the float64 forward references in tests/reference.py (``gref.numeric_grads``), or, where many
comparisons are cheap to make, from the closed-form reference (``gref.analytic_grads``), which is
itself checked against the finite differences here.

``mean``/``rstd`` always come from the library's own forward call with ``return_stats=True``, as
the contract says a user gets them.
"""

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastnorm
import grad_reference as gref
import reference as ref

FD_RTOL = 1e-6
FD_ATOL = 1e-6

# (name, x shape, axis, extra) -- a few dozen elements each, for the finite differences
CASES = [
    ("layer_norm", (4, 6), -1, {}),
    ("layer_norm", (2, 3, 2, 2), 1, {}),
    ("layer_norm", (5, 3, 2), 0, {}),
    ("layer_norm", (2, 3, 4), (-2, -1), {}),
    ("layer_norm", (3, 2, 4), (0, 2), {}),
    ("rms_norm", (4, 6), -1, {}),
    ("rms_norm", (2, 3, 2, 2), 1, {}),
    ("rms_norm", (5, 3, 2), 0, {}),
    ("rms_norm", (2, 3, 4), (-2, -1), {}),
    ("batch_norm", (6, 4), -1, {}),
    ("batch_norm", (3, 4, 2, 2), 1, {}),
    ("batch_norm", (6, 4), -1, {"training": False}),
    ("batch_norm", (3, 4, 2, 2), 1, {"training": False}),
    ("instance_norm", (2, 5, 3), -1, {}),
    ("instance_norm", (2, 3, 2, 3), 1, {}),
    ("group_norm", (3, 6), -1, {"num_groups": 2}),
    ("group_norm", (2, 3, 4), -1, {"num_groups": 2}),
    ("group_norm", (2, 4, 2, 3), 1, {"num_groups": 2}),
]


def case_id(case):
    name, shape, axis, extra = case
    bits = [name, "x".join(map(str, shape)), f"axis{axis}".replace(" ", "")]
    bits += [f"{k}={v}" for k, v in extra.items()]
    return "-".join(bits)


CASE_IDS = [case_id(c) for c in CASES]
CENTERED = [c for c in CASES if c[0] != "rms_norm" and c[3].get("training", True)]


# --------------------------------------------------------------------------- building a problem

def make_mask(name, shape, axis, rng):
    """Some padding, plus one fully padded statistics group where the function has one:
    a row for layer/rms norm, a whole sample (all its groups) for instance/group norm."""
    mask = rng.random(gref.mask_shape(name, shape, axis)) < 0.6
    if name in ("layer_norm", "rms_norm", "batch_norm"):
        flat = mask.reshape(-1)                                 # a view: mask is contiguous
        flat[0] = False                                         # padding (a whole row for layer/rms)
        flat[1:3] = True                                        # and real rows with >= 2 values
        if flat.size > 4:
            flat[-1] = False
    else:
        per_sample = mask.reshape(shape[0], -1)                 # (N, spatial)
        per_sample[0] = False                                   # sample 0: every group fully padded
        per_sample[1:, :2] = True                               # other samples: >= 2 real positions
        if per_sample.shape[1] >= 3:
            per_sample[1, -1] = False                           # and partial padding in sample 1
    return mask


def make_problem(case, *, weighted=True, masked=False, seed=0, dtype=np.float64):
    """x, dy, weight (or None) and the keyword arguments shared by forward, backward and gref."""
    name, shape, axis, extra = case
    rng = np.random.default_rng(seed)
    x = (0.5 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    pshape = gref.param_shape(name, shape, axis)
    weight = (1.0 + 0.5 * rng.standard_normal(pshape)).astype(dtype) if weighted else None
    kw = {"axis": axis, "mask": make_mask(name, shape, axis, rng) if masked else None}
    if name == "group_norm":
        kw["num_groups"] = extra["num_groups"]
    if name == "batch_norm":
        kw["training"] = extra.get("training", True)
        if not kw["training"]:
            kw["running_mean"] = 0.3 * rng.standard_normal(pshape)
            kw["running_var"] = rng.uniform(0.5, 3.0, pshape)
    return SimpleNamespace(name=name, x=x, dy=dy, weight=weight, kw=kw)


def library_stats(p, x=None):
    """(mean, rstd) from the library's forward with return_stats=True (mean is None for RMS norm)."""
    x = p.x if x is None else x
    kw = p.kw
    common = {"axis": kw["axis"], "mask": kw["mask"], "return_stats": True}
    if p.name == "rms_norm":
        _, rstd = fastnorm.rms_norm(x, **common)
        return None, rstd
    if p.name == "group_norm":
        _, mean, rstd = fastnorm.group_norm(x, kw["num_groups"], **common)
    elif p.name == "batch_norm":
        _, mean, rstd = fastnorm.batch_norm(x, training=kw["training"], running_mean=kw.get("running_mean"),
                                            running_var=kw.get("running_var"), **common)
    else:
        _, mean, rstd = getattr(fastnorm, p.name)(x, **common)
    return mean, rstd


def backward(p, dy, x, mean, rstd, weight, mask="same"):
    """Call the library's backward for problem p (mask="same" uses p's mask)."""
    kw = p.kw
    common = {"axis": kw["axis"], "mask": kw["mask"] if isinstance(mask, str) else mask}
    if p.name == "rms_norm":
        return fastnorm.rms_norm_backward(dy, x, rstd, weight, **common)
    if p.name == "group_norm":
        return fastnorm.group_norm_backward(dy, x, mean, rstd, kw["num_groups"], weight, **common)
    if p.name == "batch_norm":
        return fastnorm.batch_norm_backward(dy, x, mean, rstd, weight, training=kw["training"], **common)
    return getattr(fastnorm, p.name + "_backward")(dy, x, mean, rstd, weight, **common)


def run_backward(p):
    mean, rstd = library_stats(p)
    return backward(p, p.dy, p.x, mean, rstd, p.weight)


_FD_CACHE = {}


def finite_difference_grads(case, weighted, masked):
    """gref.numeric_grads for make_problem(case, ...), computed once per test session."""
    key = (case_id(case), weighted, masked)
    if key not in _FD_CACHE:
        p = make_problem(case, weighted=weighted, masked=masked)
        _FD_CACHE[key] = gref.numeric_grads(p.name, p.dy, p.x, p.weight, **p.kw)
    return _FD_CACHE[key]


def assert_grads_close(got, expected, rtol=FD_RTOL, atol=FD_ATOL, dtype=np.float64):
    for label, g, e in zip(("dx", "dweight", "dbias"), got, expected):
        assert g.dtype == dtype, f"{label} has dtype {g.dtype}; expected {np.dtype(dtype)}"
        assert g.shape == e.shape, f"{label} has shape {g.shape}; expected {e.shape}"
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol, err_msg=label)


def sum_over_other_axes(p, values):
    """values (of x.shape) summed over every non-feature axis, real positions only."""
    feat = gref.feature_axes(p.name, p.kw["axis"], p.x.ndim)
    other = tuple(a for a in range(p.x.ndim) if a not in feat)
    real = gref.expand_mask(p.name, p.kw["mask"], p.x.shape, p.kw["axis"])
    return np.sum(np.where(real, values, 0.0), axis=other)


# --------------------------------------------------------------------------- finite differences

@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "noweight"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_match_finite_differences(case, weighted, masked):
    p = make_problem(case, weighted=weighted, masked=masked)
    assert_grads_close(run_backward(p), finite_difference_grads(case, weighted, masked))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_closed_form_reference_matches_finite_differences(case, masked):
    """Self-check of tests/grad_reference.py: its two methods agree."""
    p = make_problem(case, weighted=True, masked=masked)
    analytic = gref.analytic_grads(p.name, p.dy, p.x, p.weight, **p.kw)
    for g, e in zip(analytic, finite_difference_grads(case, True, masked)):
        np.testing.assert_allclose(g, e, rtol=FD_RTOL, atol=FD_ATOL)


@pytest.mark.parametrize("layout", ref.LAYOUTS)
@pytest.mark.parametrize("target", ["x", "dy", "both"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_layouts_of_x_and_dy(case, target, layout):
    """C/Fortran order, step-2 slices, transposed, negative-stride, byte-swapped and misaligned views."""
    p = make_problem(case, weighted=True, masked=True)
    mean, rstd = library_stats(p)                               # stats from the contiguous x
    x = ref.make_layout(p.x, layout) if target in ("x", "both") else p.x
    dy = ref.make_layout(p.dy, layout) if target in ("dy", "both") else p.dy
    got = backward(p, dy, x, mean, rstd, p.weight)
    assert_grads_close(got, finite_difference_grads(case, True, True))


@pytest.mark.parametrize("layout", ["F", "sliced", "transposed", "negative", "byteswapped"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_layouts_of_stats_weight_and_mask(case, layout):
    p = make_problem(case, weighted=True, masked=True)
    mean, rstd = library_stats(p)
    mean = None if mean is None else ref.make_layout(mean, layout)
    rstd = ref.make_layout(rstd, layout)
    weight = ref.make_layout(p.weight, layout)
    mask = p.kw["mask"]
    mask = ref.make_layout(mask, layout if layout != "byteswapped" else "negative")
    got = backward(p, p.dy, p.x, mean, rstd, weight, mask=mask)
    assert_grads_close(got, finite_difference_grads(case, True, True))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_stats_from_reference_give_same_gradients(case):
    """The library's forward stats and the float64 reference stats are interchangeable inputs."""
    p = make_problem(case, weighted=True, masked=True)
    kw = dict(p.kw)
    if p.name == "rms_norm":
        _, rstd = ref.rms_norm(p.x, axis=kw["axis"], mask=kw["mask"])
        mean = None
    elif p.name == "group_norm":
        _, mean, rstd = ref.group_norm(p.x, kw["num_groups"], axis=kw["axis"], mask=kw["mask"])
    elif p.name == "batch_norm":
        _, mean, rstd = ref.batch_norm(p.x, axis=kw["axis"], mask=kw["mask"], training=kw["training"],
                                       running_mean=kw.get("running_mean"), running_var=kw.get("running_var"))
    else:
        _, mean, rstd = getattr(ref, p.name)(p.x, axis=kw["axis"], mask=kw["mask"])
    got = backward(p, p.dy, p.x, mean, rstd, p.weight)
    assert_grads_close(got, finite_difference_grads(case, True, True))


def test_finite_difference_example_by_hand():
    """One layer-norm row, worked through independently of both references: x = [1, 2, 4], eps = 0."""
    x = np.array([[1.0, 2.0, 4.0]])
    dy = np.array([[1.0, -2.0, 0.5]])
    w = np.array([2.0, 1.0, -1.0])
    _, mean, rstd = fastnorm.layer_norm(x, eps=0.0, return_stats=True)
    mu = 7.0 / 3.0
    sigma = np.sqrt(((1 - mu) ** 2 + (2 - mu) ** 2 + (4 - mu) ** 2) / 3.0)
    xhat = (x[0] - mu) / sigma
    g = dy[0] * w
    expected_dx = (g - g.mean() - xhat * np.mean(g * xhat)) / sigma
    dx, dw, db = fastnorm.layer_norm_backward(dy, x, mean, rstd, w)
    np.testing.assert_allclose(dx[0], expected_dx, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dw, dy[0] * xhat, rtol=1e-12)
    np.testing.assert_allclose(db, dy[0], rtol=1e-15)


# --------------------------------------------------------------------------- identities

@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dbias_is_dy_summed_over_non_feature_axes(case, masked):
    p = make_problem(case, weighted=True, masked=masked, seed=1)
    _, _, dbias = run_backward(p)
    np.testing.assert_allclose(dbias, sum_over_other_axes(p, p.dy), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dweight_is_dy_times_normalized_x(case, masked):
    """dweight = sum(dy * xhat), with xhat the forward output without weight and bias."""
    p = make_problem(case, weighted=True, masked=masked, seed=2)
    mean, rstd = library_stats(p)
    xhat = gref.forward(p.name, p.x, **p.kw)
    _, dweight, _ = backward(p, p.dy, p.x, mean, rstd, p.weight)
    np.testing.assert_allclose(dweight, sum_over_other_axes(p, p.dy * xhat), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("case", CENTERED, ids=[case_id(c) for c in CENTERED])
def test_dx_sums_to_zero_over_each_group(case, masked):
    """The output is invariant to shifting a whole group, so dx sums to 0 over it (not RMS norm)."""
    p = make_problem(case, weighted=True, masked=masked, seed=3)
    p.x = p.x + 100.0                                            # a large offset, too
    dx, _, _ = run_backward(p)
    labels, n_groups = gref.group_labels(p.name, p.x.shape, p.kw["axis"], p.kw.get("num_groups"))
    sums = np.bincount(labels.reshape(-1), weights=dx.reshape(-1), minlength=n_groups)
    scale = np.bincount(labels.reshape(-1), weights=np.abs(dx).reshape(-1), minlength=n_groups)
    assert np.all(np.abs(sums) <= 1e-12 * np.maximum(scale, 1.0)), sums


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "rms_norm"], ids=case_id)
def test_rms_dx_is_orthogonal_to_x_without_eps(case, masked):
    """RMS norm with eps=0 is invariant to scaling a row, so sum(dx * x) over each row is 0."""
    p = make_problem(case, weighted=True, masked=masked, seed=4)
    _, rstd = fastnorm.rms_norm(p.x, axis=p.kw["axis"], mask=p.kw["mask"], eps=0.0, return_stats=True)
    dx, _, _ = backward(p, p.dy, p.x, None, rstd, p.weight)
    labels, n_groups = gref.group_labels(p.name, p.x.shape, p.kw["axis"])
    dots = np.bincount(labels.reshape(-1), weights=(dx * p.x).reshape(-1), minlength=n_groups)
    scale = np.bincount(labels.reshape(-1), weights=np.abs(dx * p.x).reshape(-1), minlength=n_groups)
    assert np.all(np.abs(dots) <= 1e-12 * np.maximum(scale, 1.0)), dots


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "noweight"])
@pytest.mark.parametrize("shape, axis", [((6, 4), -1), ((3, 4, 2, 2), 1), ((4, 3, 5), 0)])
def test_eval_batch_norm_dx_is_dy_weight_rstd(shape, axis, weighted, masked):
    case = ("batch_norm", shape, axis, {"training": False})
    p = make_problem(case, weighted=weighted, masked=masked, seed=5)
    mean, rstd = library_stats(p)
    np.testing.assert_allclose(rstd, 1.0 / np.sqrt(p.kw["running_var"] + gref.EPS), rtol=1e-15)
    dx, _, _ = backward(p, p.dy, p.x, mean, rstd, p.weight)
    ax = axis % len(shape)
    bshape = [n if a == ax else 1 for a, n in enumerate(shape)]
    w = np.ones(shape[ax]) if p.weight is None else p.weight
    expected = p.dy * w.reshape(bshape) * rstd.reshape(bshape)
    real = gref.expand_mask("batch_norm", p.kw["mask"], shape, axis)
    expected = np.where(real, expected, 0.0)
    np.testing.assert_allclose(dx, expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_is_linear_in_dy(case):
    p = make_problem(case, weighted=True, masked=True, seed=6)
    mean, rstd = library_stats(p)
    dy2 = np.random.default_rng(7).standard_normal(p.x.shape)
    a = backward(p, p.dy, p.x, mean, rstd, p.weight)
    b = backward(p, dy2, p.x, mean, rstd, p.weight)
    c = backward(p, 2.0 * p.dy - 3.0 * dy2, p.x, mean, rstd, p.weight)
    for ga, gb, gc in zip(a, b, c):
        np.testing.assert_allclose(gc, 2.0 * ga - 3.0 * gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_no_weight_is_weight_of_ones(case):
    p = make_problem(case, weighted=False, masked=True, seed=8)
    mean, rstd = library_stats(p)
    ones = np.ones(gref.param_shape(p.name, p.x.shape, p.kw["axis"]))
    none = backward(p, p.dy, p.x, mean, rstd, None)
    with_ones = backward(p, p.dy, p.x, mean, rstd, ones)
    for g_none, g_ones in zip(none, with_ones):
        np.testing.assert_allclose(g_none, g_ones, rtol=1e-15, atol=0)


# an empty training batch has no statistics (NaN), so batch norm is only here in eval mode
NONEMPTY_STATS = [c for c in CASES if c[0] != "batch_norm" or not c[3].get("training", True)]


@pytest.mark.parametrize("case", NONEMPTY_STATS, ids=[case_id(c) for c in NONEMPTY_STATS])
def test_everything_padded_gives_zero_gradients(case):
    """A mask with no real element: dx = 0 and nothing adds to dweight/dbias."""
    p = make_problem(case, weighted=True, masked=True, seed=9)
    p.kw["mask"] = np.zeros_like(p.kw["mask"])
    dx, dweight, dbias = run_backward(p)
    np.testing.assert_array_equal(dx, np.zeros_like(p.x))
    np.testing.assert_array_equal(dweight, np.zeros_like(dweight))
    np.testing.assert_array_equal(dbias, np.zeros_like(dbias))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_padded_positions_ignore_their_values(case):
    """Changing x and dy at padded positions changes nothing (and the result stays finite)."""
    p = make_problem(case, weighted=True, masked=True, seed=10)
    mean, rstd = library_stats(p)
    before = backward(p, p.dy, p.x, mean, rstd, p.weight)
    real = gref.expand_mask(p.name, p.kw["mask"], p.x.shape, p.kw["axis"])
    x2 = np.where(real, p.x, 1e30)
    dy2 = np.where(real, p.dy, -1e30)
    after = backward(p, dy2, x2, mean, rstd, p.weight)
    for g_before, g_after in zip(before, after):
        np.testing.assert_array_equal(g_after, g_before)


# --------------------------------------------------------------------------- float32 / float16

LOWP_CASES = [
    ("layer_norm", (8, 64), -1, {}),
    ("layer_norm", (4, 8, 3, 5), 1, {}),
    ("layer_norm", (4, 6, 8), (-2, -1), {}),
    ("rms_norm", (8, 64), -1, {}),
    ("rms_norm", (4, 6, 8), (-2, -1), {}),
    ("batch_norm", (64, 8), -1, {}),
    ("batch_norm", (4, 8, 3, 5), 1, {}),
    ("batch_norm", (64, 8), -1, {"training": False}),
    ("instance_norm", (4, 30, 8), -1, {}),
    ("instance_norm", (4, 8, 3, 5), 1, {}),
    ("group_norm", (8, 32), -1, {"num_groups": 4}),
    ("group_norm", (4, 8, 3, 5), 1, {"num_groups": 4}),
]
LOWP_TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 2e-2}


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", LOWP_CASES, ids=[case_id(c) for c in LOWP_CASES])
def test_low_precision_close_to_float64(case, dtype, masked):
    p = make_problem(case, weighted=True, masked=masked, seed=11, dtype=dtype)
    got = run_backward(p)
    # the float64 computation on exactly the same (rounded) input values
    expected = gref.analytic_grads(p.name, p.dy.astype(np.float64), p.x.astype(np.float64),
                                   p.weight.astype(np.float64), **p.kw)
    tol = LOWP_TOL[np.dtype(dtype)]
    for label, g, e in zip(("dx", "dweight", "dbias"), got, expected):
        assert g.dtype == dtype, f"{label} has dtype {g.dtype}; expected {np.dtype(dtype)}"
        assert g.shape == e.shape
        scale = np.max(np.abs(e))
        err = np.max(np.abs(g.astype(np.float64) - e))
        assert err <= tol * scale, f"{label}: max error {err:.3g} > {tol} * scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_with_large_offset(dtype):
    """Rows with mean 1e3 and std 1 (float16 can hold 1e3 to ~0.5): dx still tracks float64."""
    rng = np.random.default_rng(12)
    x = (1e3 + rng.standard_normal((6, 48))).astype(dtype)
    dy = rng.standard_normal((6, 48)).astype(dtype)
    _, mean, rstd = fastnorm.layer_norm(x, return_stats=True)
    dx, dw, db = fastnorm.layer_norm_backward(dy, x, mean, rstd)
    ex, ew, eb = gref.analytic_grads("layer_norm", dy.astype(np.float64), x.astype(np.float64))
    tol = LOWP_TOL[np.dtype(dtype)]
    for g, e in ((dx, ex), (dw, ew), (db, eb)):
        assert g.dtype == dtype
        assert np.max(np.abs(g.astype(np.float64) - e)) <= tol * np.max(np.abs(e))


# --------------------------------------------------------------------------- errors

ERROR_CASES = CASES


def _err(p, **override):
    """Call backward with the problem's arguments, some replaced."""
    mean, rstd = library_stats(p)
    args = {"dy": p.dy, "x": p.x, "mean": mean, "rstd": rstd, "weight": p.weight, "mask": p.kw["mask"]}
    args.update(override)
    return backward(p, args["dy"], args["x"], args["mean"], args["rstd"], args["weight"], mask=args["mask"])


@pytest.mark.parametrize("case", ERROR_CASES, ids=[case_id(c) for c in ERROR_CASES])
def test_dy_of_wrong_shape(case):
    p = make_problem(case, masked=True)
    for bad in (p.dy[..., :-1], p.dy.T, p.dy[None], p.dy.reshape(-1)):
        with pytest.raises(ValueError, match=r"\bdy\b"):
            _err(p, dy=bad)


STAT_ERROR_CASES = [(c, s) for c in ERROR_CASES for s in ("mean", "rstd") if not (c[0] == "rms_norm" and s == "mean")]


@pytest.mark.parametrize("case, stat", STAT_ERROR_CASES, ids=[f"{case_id(c)}-{s}" for c, s in STAT_ERROR_CASES])
def test_stats_of_wrong_shape(case, stat):
    p = make_problem(case, masked=True)
    good = library_stats(p)[0 if stat == "mean" else 1]
    for bad in (good.reshape(-1)[:-1], good[None], np.append(good.reshape(-1), 1.0),
                np.ones(good.shape + (2,))):
        if bad.shape == good.shape:
            continue
        with pytest.raises(ValueError, match=rf"\b{stat}\b"):
            _err(p, **{stat: bad})


@pytest.mark.parametrize("case", ERROR_CASES, ids=[case_id(c) for c in ERROR_CASES])
def test_weight_of_wrong_shape(case):
    p = make_problem(case, masked=True)
    good = p.weight.shape
    for bad_shape in (good[:-1] + (good[-1] + 1,), good + (1,), (int(np.prod(good)) + 1,)):
        with pytest.raises(ValueError, match=r"\bweight\b") as info:
            _err(p, weight=np.ones(bad_shape))
        message = str(info.value)
        assert str(bad_shape) in message, message
        assert str(good) in message, message


@pytest.mark.parametrize("case", ERROR_CASES, ids=[case_id(c) for c in ERROR_CASES])
def test_mask_of_wrong_shape(case):
    p = make_problem(case, masked=True)
    mask = p.kw["mask"]
    for bad in (mask[..., :-1], np.ones(mask.shape + (1,), dtype=bool)):
        with pytest.raises(ValueError, match=r"\bmask\b"):
            _err(p, mask=bad)


# --------------------------------------------------------------------------- inputs untouched

@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_inputs_are_not_modified(case, dtype):
    p = make_problem(case, weighted=True, masked=True, seed=13, dtype=dtype)
    mean, rstd = library_stats(p)
    # x and dy as step-2 views: the whole buffer around them (NaN gaps included) must stay as it was
    x = ref.make_layout(p.x, "sliced")
    dy = ref.make_layout(p.dy, "sliced")
    inputs = {"x": x.base, "dy": dy.base, "rstd": rstd, "weight": p.weight, "mask": p.kw["mask"]}
    if mean is not None:
        inputs["mean"] = mean
    if p.name == "batch_norm" and not p.kw["training"]:
        inputs["running_mean"] = p.kw["running_mean"]
        inputs["running_var"] = p.kw["running_var"]
    saved = {k: v.copy() for k, v in inputs.items()}
    first = backward(p, dy, x, mean, rstd, p.weight)
    second = backward(p, dy, x, mean, rstd, p.weight)
    for k, v in inputs.items():
        np.testing.assert_array_equal(v, saved[k], err_msg=f"{k} was modified")
    for g1, g2 in zip(first, second):                          # nothing accumulates between calls
        np.testing.assert_array_equal(g1, g2)
        for v in inputs.values():
            assert not np.shares_memory(g1, v)


# --------------------------------------------------------------------------- random shapes

@st.composite
def problems(draw):
    name = draw(st.sampled_from(gref.NAMES))
    min_ndim = 3 if name == "instance_norm" else 2
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=min_ndim, max_size=4)))
    ndim = len(shape)
    extra = {}
    if name in ("layer_norm", "rms_norm"):
        feat = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
        negative = draw(st.booleans())
        axis = tuple(a - ndim if negative else a for a in feat)
        axis = axis[0] if len(axis) == 1 and draw(st.booleans()) else axis
    else:
        axis = draw(st.integers(0 if name == "batch_norm" else 1, ndim - 1))
        if draw(st.booleans()):
            axis -= ndim
    if name == "group_norm":
        c = shape[axis]
        extra["num_groups"] = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    if name == "batch_norm":
        extra["training"] = draw(st.booleans())
        if extra["training"] and int(np.prod(shape)) == shape[axis]:
            extra["training"] = False                            # one value per feature: no batch stats
    case = (name, shape, axis, extra)
    p = make_problem(case, weighted=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        mask = rng.random(gref.mask_shape(name, shape, axis)) < 0.7
        if name == "batch_norm" and p.kw["training"]:
            mask.reshape(-1)[:2] = True                         # training needs >= 2 real values per feature
        p.kw["mask"] = mask
    layout = draw(st.sampled_from(ref.LAYOUTS))
    return p, layout


@settings(max_examples=150, deadline=None)
@given(problems())
def test_random_shapes_match_closed_form(problem):
    p, layout = problem
    mean, rstd = library_stats(p)
    got = backward(p, ref.make_layout(p.dy, layout), ref.make_layout(p.x, layout), mean, rstd, p.weight)
    expected = gref.analytic_grads(p.name, p.dy, p.x, p.weight, **p.kw)
    for label, g, e in zip(("dx", "dweight", "dbias"), got, expected):
        assert g.dtype == np.float64 and g.shape == e.shape, label
        scale = max(1.0, float(np.max(np.abs(e), initial=0.0)))
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-9 * scale, err_msg=label)


# --------------------------------------------------------------------------- empty input

EMPTY_CASES = [
    ("layer_norm", (0, 6), -1, {}),
    ("layer_norm", (2, 0, 3), (0, 2), {}),
    ("rms_norm", (0, 3, 4), (-2, -1), {}),
    ("batch_norm", (0, 4), -1, {}),
    ("batch_norm", (2, 3, 0, 2), 1, {"training": False}),
    ("instance_norm", (0, 3, 4), 1, {}),
    ("group_norm", (0, 6), -1, {"num_groups": 3}),
]


@pytest.mark.parametrize("case", EMPTY_CASES, ids=[case_id(c) for c in EMPTY_CASES])
def test_empty_input_gives_empty_dx_and_zero_parameter_gradients(case):
    """Nothing to sum over: dx is empty, dweight and dbias are zeros of the weight shape."""
    p = make_problem(case, weighted=True)
    dx, dweight, dbias = run_backward(p)
    assert dx.shape == p.x.shape and dx.dtype == p.x.dtype
    np.testing.assert_array_equal(dweight, np.zeros(p.weight.shape))
    np.testing.assert_array_equal(dbias, np.zeros(p.weight.shape))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(8, 768), (3, 4, 5), (0, 7), (5, 1), (300, 70)])
@pytest.mark.parametrize("rms", [False, True])
def test_rows_backward_fast_path_matches_the_general_path(dtype, shape, rms):
    """layer/RMS norm backward of plain arrays along the last axis goes straight to C; spelling the
    same axis as a positive index takes the general path. Both must give the same bits, with and
    without weight, with float64 stats (what the layers keep), and with out=dy."""
    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) + 3.0).astype(dtype)
    w = rng.standard_normal(shape[-1]).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    x0, dy0 = x.copy(), dy.copy()
    pos = len(shape) - 1
    if rms:
        _, rstd = fastnorm.rms_norm(x, w, return_stats=True)
        run = lambda **kw: fastnorm.rms_norm_backward(kw.pop("dy", dy), x, kw.pop("rstd", rstd), **kw)
        stats = {"rstd": rstd.astype(np.float64)}
    else:
        _, mean, rstd = fastnorm.layer_norm(x, w, return_stats=True)
        run = lambda **kw: fastnorm.layer_norm_backward(kw.pop("dy", dy), x, kw.pop("mean", mean),
                                                       kw.pop("rstd", rstd), **kw)
        stats = {"mean": mean.astype(np.float64), "rstd": rstd.astype(np.float64)}
    for kwargs in ({"weight": w}, {}, {"weight": w, **stats}):
        fast, general = run(**kwargs), run(axis=pos, **kwargs)
        for f, g in zip(fast, general):
            assert f.dtype == g.dtype == dtype and f.shape == g.shape
            np.testing.assert_array_equal(f, g)
    d2 = dy.copy()
    dx, _, _ = run(weight=w, dy=d2, out=d2)
    assert dx is d2
    np.testing.assert_array_equal(d2, run(weight=w)[0])
    np.testing.assert_array_equal(dy, dy0)                    # the inputs untouched without out=
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("rows", [63, 64])
@pytest.mark.parametrize("n", [768, 1001, 1024])
@pytest.mark.parametrize("offset, scale", [(0.0, 1.0), (3.0, 1.0), (1e4, 1e-2), (-50.0, 10.0)])
def test_float32_layer_norm_backward_sums_in_float_runs_stay_within_a_few_ulps(rows, n, offset, scale):
    """float32 layer-norm rows take their gradient sums in float runs (docs/decisions.md), two rows
    at a time (an odd last row alone), column sums flushed to double every 8 rows. With the float64
    stats the layers keep: dx within 4 float ulps of max|rstd * dy * w|, dweight and dbias within
    4 ulps of the sum of their terms' magnitudes (measured: 1.9, 1.2, 0.7)."""
    rng = np.random.default_rng(n + rows)
    x = (offset + scale * rng.standard_normal((rows, n))).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    dy = rng.standard_normal((rows, n)).astype(np.float32)
    token = fastnorm._functional.float64_stats.set(True)
    try:
        _, mean, rstd = fastnorm.layer_norm(x, w, return_stats=True)
    finally:
        fastnorm._functional.float64_stats.reset(token)
    dx, dw, db = fastnorm.layer_norm_backward(dy, x, mean, rstd, w)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mu = x64.mean(1, keepdims=True)
    r = 1.0 / np.sqrt(x64.var(1, keepdims=True) + 1e-5)
    xhat, g = (x64 - mu) * r, dy64 * w
    dx_ref = r * (g - g.mean(1, keepdims=True) - xhat * (g * xhat).mean(1, keepdims=True))
    ulp = 2.0 ** -24
    assert np.abs(dx - dx_ref).max() <= 4 * ulp * np.abs(r * g).max()
    assert np.all(np.abs(dw - (dy64 * xhat).sum(0)) <= 4 * ulp * np.abs(dy64 * xhat).sum(0))
    assert np.all(np.abs(db - dy64.sum(0)) <= 4 * ulp * np.abs(dy64).sum(0))


@pytest.mark.parametrize("shape", [(4, 6, 32, 32), (2, 3, 25, 41)])
@pytest.mark.parametrize("offset, scale", [(0.0, 1.0), (1e4, 1e-2), (-50.0, 10.0)])
def test_float32_instance_norm_backward_plane_sums_in_float_runs(shape, offset, scale):
    """float32 instance/group-norm planes of >= 512 elements take their gradient sums in float runs
    (docs/decisions.md): dx within 4 float ulps of max|rstd * dy * w|, dweight/dbias within 4 ulps
    of the sum of their terms' magnitudes (measured: 1.8, 0.1, 0.05)."""
    rng = np.random.default_rng(shape[-1])
    x = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
    w = rng.standard_normal(shape[1]).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    token = fastnorm._functional.float64_stats.set(True)
    try:
        _, mean, rstd = fastnorm.instance_norm(x, w, axis=1, return_stats=True)
    finally:
        fastnorm._functional.float64_stats.reset(token)
    dx, dw, db = fastnorm.instance_norm_backward(dy, x, mean, rstd, w, axis=1)
    x64, dy64, ax = x.astype(np.float64), dy.astype(np.float64), (2, 3)
    mu = x64.mean(ax, keepdims=True)
    r = 1.0 / np.sqrt(x64.var(ax, keepdims=True) + 1e-5)
    xhat, g = (x64 - mu) * r, dy64 * w[None, :, None, None]
    dx_ref = r * (g - g.mean(ax, keepdims=True) - xhat * (g * xhat).mean(ax, keepdims=True))
    ulp = 2.0 ** -24
    assert np.abs(dx - dx_ref).max() <= 4 * ulp * np.abs(r * g).max()
    assert np.all(np.abs(dw - (dy64 * xhat).sum((0, 2, 3))) <= 4 * ulp * np.abs(dy64 * xhat).sum((0, 2, 3)))
    assert np.all(np.abs(db - dy64.sum((0, 2, 3))) <= 4 * ulp * np.abs(dy64).sum((0, 2, 3)))


# ---- batch norm's float32 planes: sums and dx a block of channels at a time (src/batch_norm.c) ----

@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (7, 130, 9, 33), (16, 8, 64, 64), (1, 4, 2, 1)])
def test_batch_norm_planes_backward_has_the_bits_of_the_general_path(shape, threads):
    """(N, C, H, W) float32 without a mask takes the blocked kernel; an all-True mask takes the
    general path (sums over the whole batch, then dx). Same sums, same dx, bit for bit, for any
    thread count; in place (dx into dy, dx into x) too; and within float32 accuracy of the float64
    gradient."""
    rng = np.random.default_rng(sum(shape) + threads)
    x = (rng.standard_normal(shape) * 3 + 100).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(shape[1]).astype(np.float32)
    mask = np.ones((shape[0],) + shape[2:], bool)
    previous = fastnorm.get_num_threads()
    fastnorm.set_num_threads(threads)
    try:
        _, mean, rstd = fastnorm.batch_norm(x, w, axis=1, return_stats=True)
        blocked = fastnorm.batch_norm_backward(dy, x, mean, rstd, w, axis=1)
        general = fastnorm.batch_norm_backward(dy, x, mean, rstd, w, axis=1, mask=mask)
        in_place, x_in_place = dy.copy(), x.copy()
        fastnorm.batch_norm_backward(in_place, x, mean, rstd, w, axis=1, out=in_place)
        fastnorm.batch_norm_backward(dy, x_in_place, mean, rstd, w, axis=1, out=x_in_place)
    finally:
        fastnorm.set_num_threads(previous)
    for b, g in zip(blocked, general):
        np.testing.assert_array_equal(b, g)
    np.testing.assert_array_equal(in_place, blocked[0])
    np.testing.assert_array_equal(x_in_place, blocked[0])
    expected = gref.analytic_grads("batch_norm", dy, x, w, axis=1)
    scale = np.max(np.abs(w)) * np.max(rstd) * np.max(np.abs(dy))     # dx's natural scale
    np.testing.assert_allclose(blocked[0], expected[0], rtol=0, atol=1e-5 * scale)
    for got, want in zip(blocked[1:], expected[1:]):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.max(np.abs(want)))


def test_batch_norm_planes_backward_one_channel_past_float():
    """A channel whose coefficients the float arithmetic may not take (weight 1e31, past 2**100) is
    computed in double, the others in float: all finite and right."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = np.array([1e31, 0.5, -2.0], np.float32)
    _, mean, rstd = fastnorm.batch_norm(x, axis=1, return_stats=True)
    dx = fastnorm.batch_norm_backward(dy, x, mean, rstd, w, axis=1)[0].astype(np.float64)
    want = gref.analytic_grads("batch_norm", dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64),
                               axis=1)[0]
    assert np.isfinite(dx).all()
    for c in range(3):
        np.testing.assert_allclose(dx[:, c], want[:, c], rtol=0, atol=1e-4 * np.max(np.abs(want[:, c])))
