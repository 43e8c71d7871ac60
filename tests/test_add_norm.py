"""add_layer_norm / add_rms_norm: h = x + residual, y = layer/RMS norm of h.

h is checked bit for bit against NumPy's add in the dtype (one rounding of x + residual); y and
the statistics against the float64 references of tests/reference.py applied to that h, with the
per-dtype tolerances of forward_checks.py. Both paths are covered: the C entry (plain C-contiguous
arrays, last axis, no mask) and the two-step general path, which must give the same bits.
"""
from __future__ import annotations

import doctest
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

import fastnorm
import fastnorm._add_norm
import reference as ref
from forward_checks import STATS_TOL, TOL, assert_close
from test_aliasing import PLACEMENTS, Arg, Spec, _place

DTYPES = (np.float16, np.float32, np.float64)
FUNCS = {"layer": fastnorm.add_layer_norm, "rms": fastnorm.add_rms_norm}


def bits(a):
    """The bytes of a float array as unsigned ints: equality of these is equality bit for bit."""
    a = np.ascontiguousarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same_bits(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(bits(got), bits(want))


def check(kind, x, residual, weight=None, bias=None, **kw):
    """Call add_<kind>_norm with return_stats and compare h exactly, y and the statistics with the
    reference applied to h; returns (y, h, stats...)."""
    got = FUNCS[kind](x, residual, weight, bias, return_stats=True, **kw)
    xa, ra = np.asarray(x), np.asarray(residual)
    dtype = xa.dtype.newbyteorder("=") if xa.dtype.kind == "f" else np.dtype(np.float64)
    h_want = np.add(xa.astype(dtype), ra.astype(dtype))
    y, h = got[0], got[1]
    assert_same_bits(h, h_want)
    ref_kw = {k: kw[k] for k in ("axis", "eps", "mask") if k in kw}
    want = (ref.layer_norm if kind == "layer" else ref.rms_norm)(h_want, weight, bias, **ref_kw)
    assert y.dtype == dtype
    assert_close(y, want[0], TOL[dtype], err_msg="y")
    stats_dtype = np.float64 if dtype == np.float64 else np.float32
    for g, w, name in zip(got[2:], want[1:], ("mean", "rstd") if kind == "layer" else ("rstd",)):
        assert g.dtype == stats_dtype, name
        assert_close(g, w, STATS_TOL[dtype], err_msg=name)
    return got


def data(rng, shape, dtype, loc=0.5, scale=2.0):
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


# ---- values ------------------------------------------------------------------------------------

SHAPES = [(8, 768), (3, 5, 16), (1, 1), (6, 1), (300, 1000), (2, 3, 4, 7)]


@pytest.mark.parametrize("kind", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [False, True])
def test_against_reference(kind, dtype, shape, affine):
    rng = np.random.default_rng(zlib.crc32(f"{kind}{shape}{affine}".encode()))
    x, r = data(rng, shape, dtype), data(rng, shape, dtype, loc=-0.3)
    w = data(rng, shape[-1:], dtype, 1.0, 0.3) if affine else None
    b = data(rng, shape[-1:], dtype, 0.0, 0.3) if affine else None
    check(kind, x, r, w, b)


@pytest.mark.parametrize("kind", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_y_has_the_bits_of_the_norm_of_h_on_both_paths(kind, dtype):
    """The C entry, the general path (axis given as a tuple) and the norm of np.add agree bit for bit."""
    rng = np.random.default_rng(5)
    x, r = data(rng, (67, 300), dtype), data(rng, (67, 300), dtype)
    w, b = data(rng, (300,), dtype, 1.0, 0.5), data(rng, (300,), dtype, 0.0, 0.5)
    norm = fastnorm.layer_norm if kind == "layer" else fastnorm.rms_norm
    want = norm(np.add(x, r), w, b, return_stats=True)
    for call in (lambda: FUNCS[kind](x, r, w, b, return_stats=True),
                 lambda: FUNCS[kind](x, r, w, b, axis=(-1,), return_stats=True),
                 lambda: FUNCS[kind](x, r, w, b, mask=np.ones(67, bool), return_stats=True)):
        y, h, *stats = call()
        assert_same_bits(h, np.add(x, r))
        assert_same_bits(y, want[0])
        for s, s_want in zip(stats, want[1:]):
            assert_same_bits(s, s_want)


@pytest.mark.parametrize("kind", FUNCS)
def test_threads_and_blocks_give_the_same_bits(kind):
    """Rows split over 2 threads and over several L2-sized blocks: the bits of one thread."""
    rng = np.random.default_rng(6)
    x, r = data(rng, (1500, 700), np.float32), data(rng, (1500, 700), np.float32)
    before = fastnorm.get_num_threads()
    try:
        fastnorm.set_num_threads(1)
        one = FUNCS[kind](x, r, return_stats=True)
        fastnorm.set_num_threads(2)
        two = FUNCS[kind](x, r, return_stats=True)
    finally:
        fastnorm.set_num_threads(before)
    for a, b in zip(one, two):
        assert_same_bits(a, b)
    check(kind, x, r)


@pytest.mark.parametrize("kind", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_mean_offset(kind, dtype):
    rng = np.random.default_rng(7)
    loc = 300.0 if dtype == np.float16 else 1e4
    check(kind, data(rng, (9, 257), dtype, loc, 1.0), data(rng, (9, 257), dtype, 0.0, 1.0))


@pytest.mark.parametrize("kind", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_stays_in_its_row(kind, dtype):
    rng = np.random.default_rng(8)
    x, r = data(rng, (5, 33), dtype), data(rng, (5, 33), dtype)
    x[2, 7] = np.nan
    y, h = FUNCS[kind](x, r)
    assert np.isnan(h[2, 7]) and np.isfinite(np.delete(h.ravel(), 2 * 33 + 7)).all()
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()
    check(kind, x, r)


@pytest.mark.parametrize("kind", FUNCS)
def test_size_one_and_empty_axes(kind):
    x, r = np.array([[1.0], [2.0]]), np.array([[3.0], [-5.0]])
    y, h = FUNCS[kind](x, r, None, np.array([0.25]), eps=0.0)
    np.testing.assert_array_equal(h, [[4.0], [-3.0]])
    want = [[0.25], [0.25]] if kind == "layer" else [[1.25], [-0.75]]      # x / |x| + bias for RMS
    np.testing.assert_array_equal(y, want)
    for dtype in DTYPES:
        e = np.zeros((0, 4), dtype)
        y, h, *stats = FUNCS[kind](e, e, return_stats=True)
        assert y.shape == h.shape == (0, 4) and y.dtype == h.dtype == dtype
        assert all(s.shape == (0,) for s in stats)
    with pytest.raises(ValueError, match="no elements along the feature axes"):
        FUNCS[kind](np.zeros((3, 0)), np.zeros((3, 0)))


@pytest.mark.parametrize("kind", FUNCS)
def test_integer_inputs_become_float64(kind):
    x, r = np.arange(12).reshape(3, 4), np.ones((3, 4), dtype=np.int8)
    y, h = FUNCS[kind](x, r.astype(np.int64))
    assert h.dtype == y.dtype == np.float64
    check(kind, x, r.astype(np.int64))
    check(kind, x > 5, r.astype(bool))


# ---- layouts, masks, axes ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ref.LAYOUTS)
def test_layouts(kind, dtype, layout):
    rng = np.random.default_rng(zlib.crc32(layout.encode()))
    x, r = data(rng, (4, 6, 10), dtype), data(rng, (4, 6, 10), dtype)
    w = data(rng, (10,), dtype, 1.0, 0.2)
    check(kind, ref.make_layout(x, layout), r, w)                       # x awkward
    check(kind, x, ref.make_layout(r, layout), None, w)                 # residual awkward
    out, h = ref.make_layout(np.zeros_like(x), layout), ref.make_layout(np.zeros_like(x), layout)
    y, hh = FUNCS[kind](x, r, w, out=out, residual_out=h)
    assert y is out and hh is h
    assert_same_bits(h.astype(dtype), np.add(x, r))
    # the norm of h into an out of the same layout (strided outputs take the kernels' double path)
    norm = fastnorm.layer_norm if kind == "layer" else fastnorm.rms_norm
    assert_same_bits(out.astype(dtype), norm(np.add(x, r), w, out=ref.make_layout(np.zeros_like(x), layout)).astype(dtype))
    assert_close(out, (ref.layer_norm if kind == "layer" else ref.rms_norm)(np.add(x, r), w)[0], TOL[np.dtype(dtype)])


@pytest.mark.parametrize("kind", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masks(kind, dtype):
    rng = np.random.default_rng(9)
    x, r = data(rng, (3, 7, 12), dtype), data(rng, (3, 7, 12), dtype)
    mask = fastnorm.mask_from_lengths([7, 4, 1], 7)
    y, h, *_ = check(kind, x, r, data(rng, (12,), dtype, 1.0, 0.2), mask=mask)
    assert (y[~mask] == 0).all()
    assert_same_bits(h, np.add(x, r))            # the residual stream is the sum at padding too


@pytest.mark.parametrize("kind", FUNCS)
@pytest.mark.parametrize("axis", [(-2, -1), 1, (0, 2)])
def test_axes(kind, axis):
    rng = np.random.default_rng(10)
    x, r = data(rng, (4, 5, 6), np.float32), data(rng, (4, 5, 6), np.float32)
    pshape = tuple(x.shape[a] for a in sorted(np.atleast_1d(axis) % 3))
    check(kind, x, r, data(rng, pshape, np.float32, 1.0, 0.2), data(rng, pshape, np.float32, 0.0, 0.2), axis=axis)


# ---- in place and shared memory ----------------------------------------------------------------

@pytest.mark.parametrize("kind", FUNCS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 768), (1200, 512)])
@pytest.mark.parametrize("where", ["residual_out=residual", "residual_out=x", "out=x", "out=residual",
                                   "out=x, residual_out=residual", "out=residual, residual_out=x"])
def test_in_place(kind, dtype, shape, where):
    """The residual stream updated in place (and y over x or the residual) gives the copies' result."""
    rng = np.random.default_rng(11)
    x, r = data(rng, shape, dtype), data(rng, shape, dtype)
    w = data(rng, shape[-1:], dtype, 1.0, 0.2)
    want = FUNCS[kind](x.copy(), r.copy(), w, return_stats=True)
    arrays = {"x": x, "residual": r}
    kw = {k.strip(): arrays[v] for k, v in (part.split("=") for part in where.split(","))}
    got = FUNCS[kind](x, r, w, return_stats=True, **kw)
    for k, v in kw.items():
        assert got[0 if k == "out" else 1] is v
    for g, e in zip(got, want):
        assert_same_bits(g, e)


def _add_spec(name, masked):
    X, P, M = Arg((4, 6, 8)), Arg((8,), "param"), Arg((4, 6), "mask")
    inputs = {"x": X, "residual": X, "weight": P, "bias": P, **({"mask": M} if masked else {})}
    call = getattr(fastnorm, name)
    return Spec(f"{name}{' masked' if masked else ''}",
                lambda a: call(a["x"], a["residual"], a["weight"], a["bias"], mask=a.get("mask"), out=a.get("out"),
                               residual_out=a.get("residual_out"), return_stats=True),
                inputs, {"out": X, "residual_out": X})


SPECS = [_add_spec(name, masked) for name in ("add_layer_norm", "add_rms_norm") for masked in (False, True)]


@pytest.mark.parametrize("spec, pair", [(s, (i, o)) for s in SPECS for i in s.inputs for o in s.outputs],
                         ids=lambda v: v.name if isinstance(v, Spec) else "-in-".join(v))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_shared_memory_gives_the_result_of_copies(spec, dtype, pair, placement):
    """The rule of tests/test_aliasing.py: any input sharing memory with out or residual_out."""
    rng = np.random.default_rng(zlib.crc32(f"{spec.name} {pair} {placement}".encode()))
    arrays = _place(spec, dtype, pair, placement, rng)
    expected = spec.call({k: arrays[k].copy() for k in spec.inputs})
    got = spec.call(arrays)
    for g, e in zip(got, expected):
        assert_same_bits(g, e)
    assert_same_bits(arrays[pair[1]], expected[0 if pair[1] == "out" else 1])


@pytest.mark.parametrize("kind", FUNCS)
def test_out_and_residual_out_sharing_memory_is_refused(kind):
    x, r, buf = np.ones((3, 4)), np.zeros((3, 4)), np.full((3, 4), 7.0)
    with pytest.raises(ValueError, match="out and residual_out share memory"):
        FUNCS[kind](x, r, out=buf, residual_out=buf)
    with pytest.raises(ValueError, match="out and residual_out share memory"):
        FUNCS[kind](x, r, out=x, residual_out=x)
    np.testing.assert_array_equal(buf, 7.0)
    np.testing.assert_array_equal(x, 1.0)


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", FUNCS)
def test_errors_name_the_argument_and_write_nothing(kind):
    f = FUNCS[kind]
    x, r = np.ones((3, 4), np.float32), np.arange(12, dtype=np.float32).reshape(3, 4)
    before = r.copy()
    with pytest.raises(ValueError, match=r"residual has shape \(4, 3\); expected \(3, 4\)"):
        f(x, r.T)
    with pytest.raises(TypeError, match="residual has dtype float64; expected float32"):
        f(x, r.astype(np.float64))
    with pytest.raises(TypeError, match="residual must hold real numbers"):
        f(x, r.astype(complex))
    with pytest.raises(ValueError, match=r"residual_out has shape \(3, 5\)"):
        f(x, r, residual_out=np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="residual_out has dtype float64; expected float32"):
        f(x, r, residual_out=np.zeros((3, 4)))
    readonly = np.zeros((3, 4), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="residual_out is read-only"):
        f(x, r, residual_out=readonly)
    with pytest.raises(TypeError, match="residual_out must be a numpy.ndarray"):
        f(x, r, residual_out=[[0.0] * 4] * 3)
    with pytest.raises(ValueError, match="out has dtype float64"):
        f(x, r, out=np.zeros((3, 4)))
    # a bad argument checked after residual_out would be written: residual_out stays as it was
    with pytest.raises(ValueError, match=r"weight has shape \(3,\)"):
        f(x, r, np.ones(3), residual_out=r)
    with pytest.raises(ValueError, match="mask has shape"):
        f(x, r, mask=np.ones(4, bool), residual_out=r)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        f(x, r, eps=-1.0, residual_out=r)
    with pytest.raises(TypeError, match="return_stats must be True or False"):
        f(x, r, return_stats="yes", residual_out=r)
    np.testing.assert_array_equal(r, before)
    with pytest.raises(TypeError):
        f(x)                                     # residual is required


# ---- gradients compose -------------------------------------------------------------------------

def test_gradient_of_h_composes():
    """dh = layer_norm_backward(dy, h, ...)[0] + the gradient arriving along the residual stream;
    x and residual both receive dh. Checked against central differences in float64."""
    rng = np.random.default_rng(12)
    x, r = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    w, b = 1.0 + 0.3 * rng.standard_normal(6), 0.2 * rng.standard_normal(6)
    gy, gh = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))   # dL/dy and dL/dh from the stream

    def loss(x, r):
        y, h = fastnorm.add_layer_norm(x, r, w, b)
        return float((y * gy).sum() + (h * gh).sum())

    y, h, mean, rstd = fastnorm.add_layer_norm(x, r, w, b, return_stats=True)
    dh = fastnorm.layer_norm_backward(gy, h, mean, rstd, w)[0] + gh
    step = 1e-6
    for arg in (0, 1):
        numeric = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            plus, minus = [x.copy(), r.copy()], [x.copy(), r.copy()]
            plus[arg][i] += step
            minus[arg][i] -= step
            numeric[i] = (loss(*plus) - loss(*minus)) / (2 * step)
        np.testing.assert_allclose(dh, numeric, rtol=1e-6, atol=1e-7)


# ---- the kernel alone ----------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
@pytest.mark.parametrize("defines", [[], ["-DFASTNORM_NO_CLONES"]], ids=["dispatch", "portable"])
def test_c_kernel_on_strided_views(tmp_path, defines):
    """tests/c/test_add_norm.c: add_norm_rows on the strided views the Python entry never passes."""
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "test_add_norm"
    sources = [root / "tests/c/test_add_norm.c",
               *(root / "src" / f for f in ("add_norm.c", "convert.c", "vector.c", "parallel.c", "group_norm.c", "batch_norm.c"))]
    build = subprocess.run(["cc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-fopenmp-simd", "-pthread",
                            *defines, f"-I{root / 'src'}", *map(str, sources), "-lm", "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith(" 0 failed"), run.stdout


# ---- dask and docstrings -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", FUNCS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunks", [(13, 7, 5), (7, 3, 2)])
def test_dask_equals_in_memory(kind, dtype, chunks):
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(13)
    x, r = data(rng, (60, 7, 5), dtype, 4.0, 3.0), data(rng, (60, 7, 5), dtype)
    w = data(rng, (5,), dtype, 1.0, 0.2)
    mask = rng.random((60, 7)) > 0.3
    X, R = da.from_array(x, chunks=chunks), da.from_array(r, chunks=chunks[::-1])
    for args, kw in (((X, R, w), {}), ((X, r, w), {"mask": mask}), ((x, R), {"axis": (1, 2)})):
        Y, H = FUNCS[kind](*args, **kw)
        assert isinstance(Y, da.Array) and isinstance(H, da.Array) and Y.dtype == H.dtype == dtype
        y, h = FUNCS[kind](x, r, *args[2:], **kw)
        assert_same_bits(H.compute(), h)
        assert_close(Y.compute(), y, {np.float32: 1e-6, np.float64: 1e-12}[dtype])
    Y, H, *stats = FUNCS[kind](X, R, w, return_stats=True)
    want = FUNCS[kind](x, r, w, return_stats=True)
    for s, e in zip(stats, want[2:]):
        assert isinstance(s, np.ndarray)
        assert_close(s, e, {np.float32: 1e-6, np.float64: 1e-12}[dtype])
    with pytest.raises(TypeError, match="residual_out= cannot be used with dask arrays"):
        FUNCS[kind](X, R, residual_out=np.zeros_like(x))
    with pytest.raises(ValueError, match=r"residual has shape \(60, 7\); expected \(60, 7, 5\)"):
        FUNCS[kind](X, r[..., 0])
    with pytest.raises(ValueError, match=r"residual has shape \(60, 5, 7\)"):
        FUNCS[kind](x, R.transpose(0, 2, 1))
    with pytest.raises(TypeError, match="residual has dtype"):
        FUNCS[kind](X, R.astype(np.float16))


def test_docstring_examples():
    result = doctest.testmod(fastnorm._add_norm, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
