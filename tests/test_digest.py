"""Bit-for-bit digest of the kernels' results: a restructuring of src/ must not move any number.

Every public op (forward and backward) runs over a fixed, seeded set of awkward inputs (float16/32/64;
short, long and odd rows around the vector widths; strided, Fortran-order and negative-stride views;
outputs at page offsets that make the kernels walk backward; large mean offsets; extreme scales that
take the double fallbacks; masks; 1 and 2 threads; outputs large enough to be streamed) and the bytes
of every result are hashed. The expected hashes live in tests/digests.json, keyed by the kernel ISA
the CPU dispatch picked and by the compiler (reductions vectorized at another width, or by another
compiler, may round differently): a machine or build with no stored digest skips with the reason,
and so does a sanitizer build. To record this machine's digest after a
deliberate, reviewed change of results:

    python tests/test_digest.py --record

The same inputs are independent of this check's correctness tests; this test only pins the bits.
"""
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import fastnorm
from fastnorm import _core

DIGESTS = Path(__file__).with_name("digests.json")
DTYPES = (np.float16, np.float32, np.float64)
# rows around the vector widths (8, 16 floats), the float-run threshold (512) and past a page
ROW_LENGTHS = (1, 3, 7, 8, 15, 16, 17, 31, 33, 100, 511, 512, 768, 1023, 1025, 4099)


def compiler():
    """The compiler that built fastnorm._core, from the .comment section it left in the library."""
    found = re.search(rb"(GCC|clang version):? ?(\([^)]*\))? ?([0-9][0-9.]*)", Path(_core.__file__).read_bytes())
    return f"{found.group(1).decode().split()[0].lower()}-{found.group(3).decode()}" if found else "unknown-compiler"


def isa_key():
    """The kernels' ISA (the vector clone picked at load time and the float16 conversion path) and
    the compiler: another compiler may vectorize a sum in another order."""
    d = _core.cpu_dispatch()
    return f"{d['vector_loops']}/{d['float16_conversion']}/{compiler()}"


def sanitized() -> bool:
    """Whether an ASan runtime is loaded: instrumented kernels are compiled differently."""
    try:
        return "libasan" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _data(rng, shape, dtype, offset=0.0, scale=1.0):
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


def _at_offset(a, byte_offset):
    """A copy of a whose data starts byte_offset bytes into a 4 KiB page."""
    raw = np.empty(a.nbytes + 8192, np.uint8)
    start = (-raw.ctypes.data) % 4096 + byte_offset
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _views(rng, shape, dtype, offset=0.0):
    """(name, x) layouts of one 2-d input: C order, Fortran, strided, negative strides, page offsets."""
    base = _data(rng, (shape[0], 2 * shape[1]), dtype, offset)
    c = np.ascontiguousarray(base[:, :shape[1]])
    yield "c", c
    yield "fortran", np.asfortranarray(c)
    yield "strided", base[:, ::2]
    yield "reversed", c[::-1, ::-1]
    yield "page16", _at_offset(c, 16)


def _rows_cases(rng):
    """Layer and RMS norm (forward with stats, then backward) over rows."""
    for dtype in DTYPES:
        for D in ROW_LENGTHS:
            A = 5 if D < 1000 else 3
            w, b = _data(rng, D, dtype), _data(rng, D, dtype)
            for name, x in _views(rng, (A, D), dtype, offset=0.0 if D % 2 else 1e3):
                for rms, fwd, bwd in ((False, fastnorm.layer_norm, fastnorm.layer_norm_backward),
                                      (True, fastnorm.rms_norm, fastnorm.rms_norm_backward)):
                    key = f"{'rms' if rms else 'layer'}/{np.dtype(dtype).name}/{D}/{name}"
                    yield key + "/noparams", lambda x=x, f=fwd: f(x, return_stats=True)
                    stats = fwd(x, w, b, return_stats=True)
                    yield key, lambda s=stats: s
                    dy = _data(rng, x.shape, dtype)
                    if rms:
                        yield key + "/bwd", lambda dy=dy, x=x, s=stats, f=bwd: f(dy, x, s[1], w)
                    else:
                        yield key + "/bwd", lambda dy=dy, x=x, s=stats, f=bwd: f(dy, x, s[1], s[2], w)


def _special_rows_cases(rng):
    """In place, out= at page offsets that make the walk go backward, masks, extreme scales, N-d axes."""
    for dtype in DTYPES:
        dn = np.dtype(dtype).name
        for D in (768, 1024, 100):
            x = _data(rng, (8, D), dtype, offset=3.0)
            w, b = _data(rng, D, dtype), _data(rng, D, dtype)
            for shift in (16, 64, 256, 4096 - 16):
                xo, out = _at_offset(x, 0), _at_offset(np.zeros_like(x), shift)
                yield f"layer/{dn}/{D}/out@{shift}", lambda xo=xo, out=out: fastnorm.layer_norm(xo, w, b, out=out)
                dy = _data(rng, x.shape, dtype)
                _, mu, rs = fastnorm.layer_norm(x, w, b, return_stats=True)
                dxo = _at_offset(np.zeros_like(x), shift)
                yield (f"layer/{dn}/{D}/bwd_out@{shift}",
                       lambda dy=dy, x=xo, mu=mu, rs=rs, o=dxo: fastnorm.layer_norm_backward(dy, x, mu, rs, w, out=o))
            yield f"layer/{dn}/{D}/inplace", lambda x=x: fastnorm.layer_norm(x.copy(), w, b, out=None)
            xi = x.copy()
            yield f"layer/{dn}/{D}/out=x", lambda xi=xi: (fastnorm.layer_norm(xi, w, b, out=xi), xi)
            mask = rng.random(8) < 0.7
            mask[0], mask[1] = False, True
            yield f"layer/{dn}/{D}/mask", lambda x=x, m=mask: fastnorm.layer_norm(x, w, b, mask=m, return_stats=True)
            s = fastnorm.layer_norm(x, w, b, mask=mask, return_stats=True)
            dy = _data(rng, x.shape, dtype)
            yield (f"layer/{dn}/{D}/mask_bwd",
                   lambda dy=dy, x=x, s=s, m=mask: fastnorm.layer_norm_backward(dy, x, s[1], s[2], w, mask=m))
        # extreme scales: float coefficients would overflow, the kernels fall back to double
        tiny = np.array([[1e-20, -1e-20, 3e-21, 0.0] * 8], np.float64).astype(dtype)
        big_w = np.full(32, 1e20 if dtype != np.float16 else 6e4, dtype)
        yield f"layer/{dn}/extreme", lambda t=tiny, bw=big_w: fastnorm.layer_norm(t, bw, eps=0.0, return_stats=True)
        yield f"rms/{dn}/extreme", lambda t=tiny, bw=big_w: fastnorm.rms_norm(t, bw, eps=0.0, return_stats=True)
        const = np.full((3, 600), 7.25, dtype)
        yield f"layer/{dn}/constant_eps0", lambda c=const: fastnorm.layer_norm(c, eps=0.0, return_stats=True)
        x3 = _data(rng, (4, 6, 10), dtype, offset=-50.0)
        yield f"layer/{dn}/axes", lambda x3=x3: fastnorm.layer_norm(x3, axis=(-2, -1), return_stats=True)
        nan = _data(rng, (4, 40), dtype)
        nan[1, 3] = np.nan
        nan[2, 5] = np.inf
        yield f"layer/{dn}/nan", lambda n=nan: fastnorm.layer_norm(n, return_stats=True)


def _plane_cases(rng):
    """Instance, group and batch norm over (N, C, H, W) and (N, C); forward with stats and backward."""
    shapes = ((2, 4, 3, 5), (2, 8, 16, 16), (3, 6, 1, 33), (2, 4, 32, 32), (1, 3, 7, 1))
    for dtype in DTYPES:
        dn = np.dtype(dtype).name
        for shape in shapes:
            C = shape[1]
            w, b = _data(rng, C, dtype), _data(rng, C, dtype)
            base = _data(rng, shape, dtype, offset=100.0)
            layouts = {"c": base, "nhwc": np.moveaxis(np.ascontiguousarray(np.moveaxis(base, 1, -1)), -1, 1),
                       "reversed": base[::-1, :, ::-1]}
            mask = rng.random((shape[0], shape[2], shape[3])) < 0.8
            for lname, x in layouts.items():
                key = f"{dn}/{shape}/{lname}"
                dy = _data(rng, shape, dtype)
                s = fastnorm.instance_norm(x, w, b, axis=1, return_stats=True)
                yield "instance/" + key, lambda s=s: s
                yield "instance/" + key + "/bwd", (
                    lambda dy=dy, x=x, s=s: fastnorm.instance_norm_backward(dy, x, s[1], s[2], w, axis=1))
                G = 2 if C % 2 == 0 else 3
                s = fastnorm.group_norm(x, G, w, b, axis=1, return_stats=True)
                yield "group/" + key, lambda s=s: s
                yield "group/" + key + "/bwd", (
                    lambda dy=dy, x=x, s=s, G=G: fastnorm.group_norm_backward(dy, x, s[1], s[2], G, w, axis=1))
                s = fastnorm.batch_norm(x, w, b, axis=1, return_stats=True)
                yield "batch/" + key, lambda s=s: s
                yield "batch/" + key + "/bwd", (
                    lambda dy=dy, x=x, s=s: fastnorm.batch_norm_backward(dy, x, s[1], s[2], w, axis=1))
                rm, rv = np.zeros(C), np.ones(C)
                yield "batch/" + key + "/running", lambda x=x, rm=rm, rv=rv: (
                    fastnorm.batch_norm(x, w, b, axis=1, running_mean=rm, running_var=rv), rm, rv)
                yield "batch/" + key + "/eval", lambda x=x: fastnorm.batch_norm(
                    x, w, b, axis=1, training=False, running_mean=np.full(C, 99.0), running_var=np.full(C, 2.0))
                for op in ("instance", "group", "batch"):
                    if op == "group":
                        s = fastnorm.group_norm(x, G, w, b, axis=1, mask=mask, return_stats=True)
                        g = lambda dy=dy, x=x, s=s, m=mask, G=G: fastnorm.group_norm_backward(
                            dy, x, s[1], s[2], G, w, axis=1, mask=m)
                    elif op == "instance":
                        s = fastnorm.instance_norm(x, w, b, axis=1, mask=mask, return_stats=True)
                        g = lambda dy=dy, x=x, s=s, m=mask: fastnorm.instance_norm_backward(
                            dy, x, s[1], s[2], w, axis=1, mask=m)
                    else:
                        s = fastnorm.batch_norm(x, w, b, axis=1, mask=mask, return_stats=True)
                        g = lambda dy=dy, x=x, s=s, m=mask: fastnorm.batch_norm_backward(
                            dy, x, s[1], s[2], w, axis=1, mask=m)
                    yield f"{op}/{key}/mask", lambda s=s: s
                    yield f"{op}/{key}/mask_bwd", g
        # batch norm over columns (N, C), rows of C channels
        for N, C in ((7, 3), (64, 16), (33, 100), (300, 17), (1000, 64)):
            w, b = _data(rng, C, dtype), _data(rng, C, dtype)
            for name, x in _views(rng, (N, C), dtype, offset=1e3):
                s = fastnorm.batch_norm(x, w, b, axis=-1, return_stats=True)
                yield f"batch/{dn}/cols{N}x{C}/{name}", lambda s=s: s
                dy = _data(rng, (N, C), dtype)
                yield f"batch/{dn}/cols{N}x{C}/{name}/bwd", (
                    lambda dy=dy, x=x, s=s: fastnorm.batch_norm_backward(dy, x, s[1], s[2], w, axis=-1))
            mask = rng.random(N) < 0.6
            x = _data(rng, (N, C), dtype)
            yield f"batch/{dn}/cols{N}x{C}/mask", lambda x=x, m=mask: fastnorm.batch_norm(
                x, w, b, axis=-1, mask=m, return_stats=True)


def _data_cases(rng):
    """standardize, min_max_scale and moments."""
    for dtype in DTYPES:
        dn = np.dtype(dtype).name
        for shape in ((50, 7), (1000, 33), (3, 1)):
            x = _data(rng, shape, dtype, offset=500.0, scale=3.0)
            yield f"standardize/{dn}/{shape}", lambda x=x: fastnorm.standardize(x, axis=0)
            yield f"min_max/{dn}/{shape}", lambda x=x: fastnorm.min_max_scale(x, axis=0)
            yield f"moments/{dn}/{shape}", lambda x=x: _moments_arrays(fastnorm.moments(x, axis=0))
            mask = rng.random(shape[0]) < 0.5
            yield f"moments/{dn}/{shape}/mask", lambda x=x, m=mask: _moments_arrays(fastnorm.moments(x, axis=-1, mask=m))
            yield f"standardize/{dn}/{shape}/axis-1", lambda x=x: fastnorm.standardize(x, axis=-1)
            yield f"moments/{dn}/{shape}/axis-1", lambda x=x: _moments_arrays(fastnorm.moments(x, axis=-1))


def _moments_arrays(m):
    return m.count, m.mean, m.m2, m.min, m.max


def _large_cases(rng):
    """Outputs past half of a 32 MiB L3 (where the writers stream) and past the threading threshold."""
    x = _data(rng, (6144, 1024), np.float32, offset=2.0)
    w, b = _data(rng, 1024, np.float32), _data(rng, 1024, np.float32)
    yield "large/layer/f32", lambda: fastnorm.layer_norm(x, w, b, return_stats=True)
    yield "large/rms/f32", lambda: fastnorm.rms_norm(x, w, return_stats=True)
    _, mu, rs = fastnorm.layer_norm(x, w, b, return_stats=True)
    dy = _data(rng, x.shape, np.float32)
    yield "large/layer_bwd/f32", lambda: fastnorm.layer_norm_backward(dy, x, mu, rs, w)
    xd = x[:3072].astype(np.float64)
    yield "large/layer/f64", lambda: fastnorm.layer_norm(xd, w.astype(np.float64), b.astype(np.float64))
    xh = x.astype(np.float16)
    yield "large/layer/f16", lambda: fastnorm.layer_norm(xh, w, b)
    xb = x.reshape(-1, 64)
    yield "large/batch_cols/f32", lambda: fastnorm.batch_norm(xb, axis=-1, return_stats=True)
    _, bm, br = fastnorm.batch_norm(xb, axis=-1, return_stats=True)
    yield "large/batch_cols_bwd/f32", lambda: fastnorm.batch_norm_backward(dy.reshape(-1, 64), xb, bm, br, axis=-1)
    x4 = x.reshape(48, 32, 64, 64)
    yield "large/batch_planes/f32", lambda: fastnorm.batch_norm(x4, axis=1, return_stats=True)
    yield "large/instance/f32", lambda: fastnorm.instance_norm(x4, axis=1, return_stats=True)
    yield "large/group/f16", lambda: fastnorm.group_norm(xh.reshape(48, 32, 64, 64), 4, axis=1, return_stats=True)


def _threaded_cases(rng):
    """Above the threading threshold (2**17 elements), run at the current thread count."""
    x = _data(rng, (300, 1000), np.float32, offset=10.0)
    yield "mid/layer/f32", lambda: fastnorm.layer_norm(x, return_stats=True)
    yield "mid/layer/f64", lambda: fastnorm.layer_norm(x.astype(np.float64), return_stats=True)
    _, mu, rs = fastnorm.layer_norm(x, return_stats=True)
    dy = _data(rng, x.shape, np.float32)
    yield "mid/layer_bwd/f32", lambda: fastnorm.layer_norm_backward(dy, x, mu, rs, np.ones(1000, np.float32))
    yield "mid/batch/f32", lambda: fastnorm.batch_norm(x, axis=-1, return_stats=True)
    x4 = x.reshape(6, 50, 20, 50)
    yield "mid/group/f32", lambda: fastnorm.group_norm(x4, 5, axis=1, return_stats=True)
    s = fastnorm.group_norm(x4, 5, axis=1, return_stats=True)
    yield "mid/group_bwd/f32", lambda: fastnorm.group_norm_backward(dy.reshape(x4.shape), x4, s[1], s[2], 5, axis=1)
    yield "mid/moments/f32", lambda: _moments_arrays(fastnorm.moments(x, axis=0))


def _hash(result):
    h = hashlib.sha256()
    for a in result if isinstance(result, tuple) else (result,):
        a = np.asarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def compute_digests():
    """{case: hash} over every case, each family at 1 and 2 threads."""
    digests = {}
    saved = fastnorm.get_num_threads()
    try:
        for threads in (1, 2):
            fastnorm.set_num_threads(threads)
            rng = np.random.default_rng(20260415)
            for family in (_rows_cases, _special_rows_cases, _plane_cases, _data_cases, _large_cases,
                           _threaded_cases):
                for name, run in family(rng):
                    key = f"t{threads}/{name}"
                    assert key not in digests, key
                    with np.errstate(all="ignore"):
                        digests[key] = _hash(run())
    finally:
        fastnorm.set_num_threads(saved)
    return digests


def _stored():
    return json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}


def test_digest_unchanged():
    if sanitized():
        pytest.skip("the kernels run under a sanitizer: instrumented code rounds sums in another order; "
                    "the digest pins the optimized build")
    stored = _stored().get(isa_key())
    if stored is None:
        pytest.skip(f"no digest stored for kernel ISA {isa_key()!r} in {DIGESTS.name} "
                    f"(stored: {sorted(_stored())}); record one with `python tests/test_digest.py --record`")
    got = compute_digests()
    changed = sorted(k for k in stored if got.get(k) != stored[k])
    added = sorted(set(got) - set(stored))
    assert not changed and not added, (
        f"{len(changed)} of {len(stored)} results changed bits (first: {changed[:8]}); new cases {added[:8]}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    everything = _stored()
    everything[isa_key()] = compute_digests()
    DIGESTS.write_text(json.dumps(everything, indent=0, sort_keys=True) + "\n")
    print(f"recorded {len(everything[isa_key()])} digests for {isa_key()}")
