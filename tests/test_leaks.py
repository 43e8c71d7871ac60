"""Leak checks: every public function, called a few thousand times, successfully and with errors.

For each case the call is warmed up (plan caches, NumPy's buffer cache), then repeated ITERATIONS
times; afterwards

- ``sys.getrefcount`` of every argument is what it was before (no reference leaked or stolen),
- the arrays it returned are freed once dropped (weakref), and
- memory is flat: ``sys.getallocatedblocks()`` (Python objects), glibc's ``mallinfo2`` (every
  ``malloc`` of the C kernels and NumPy, byte-exact, where available), the resident set size from
  ``/proc/self/statm`` (any memory at all, page-granular) and, over a shorter loop, tracemalloc
  (every Python and NumPy allocation by size), each within a small tolerance.

A leak of one object per call is 2000 blocks (tolerance 200); of one 32-byte malloc chunk per call
64 KB (tolerance 32 KB), and 6.4 KB per 200-call window under tracemalloc (tolerance 4 KB). Error paths are included because they are where C code most often forgets a free or
a decref: wrong weight shapes, bad axes, read-only outputs, and the fast path's NotImplemented
fallbacks (the C entry of fastnorm.layer_norm/rms_norm, src/_core.c, allocates scratch before it
knows it cannot handle a call, then passes the call to the Python function).
"""
from __future__ import annotations

import ctypes
import gc
import os
import sys
import tracemalloc
import weakref

import numpy as np
import pytest

import fastnorm as fn

ITERATIONS = 2000
WARMUP = 200
TRACED_WARMUP = 50
TRACED_ITERATIONS = 200             # per window; two windows
BLOCK_TOLERANCE = 200               # sys.getallocatedblocks(): objects of the Python allocator
TRACED_TOLERANCE = 4 * 1024         # bytes: tracemalloc, over TRACED_ITERATIONS calls
MALLOC_TOLERANCE = 32 * 1024        # bytes: mallinfo2 (uordblks + hblkhd)
RSS_TOLERANCE = 1024 * 1024         # bytes: resident set size

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/statm")


# ---- measuring -------------------------------------------------------------------------------------

class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2():
    """glibc >= 2.33: bytes malloc has handed out and not had back (all arenas); else None."""
    try:
        libc = ctypes.CDLL(None)
        f = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _MallInfo2
    f.argtypes = []

    def malloced() -> int:
        info = f()
        return info.uordblks + info.hblkhd
    return malloced


def _under_asan() -> bool:
    """AddressSanitizer replaces malloc and keeps freed memory in quarantine, so mallinfo2 and
    RSS say nothing, and tracemalloc sees NumPy's own objects (e.g. ``dtype.name``) come and go by
    10-20 KB per few hundred calls. scripts/sanitize.sh runs this file that way: only the exact
    checks (reference counts, returned arrays freed) are made then."""
    try:
        return hasattr(ctypes.CDLL(None), "__asan_init")
    except OSError:
        return False


UNDER_ASAN = _under_asan()
MALLOCED = None if UNDER_ASAN else _mallinfo2()
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _tracked(obj) -> bool:
    """Arguments whose reference count is meaningful: objects this test made, not shared constants."""
    return isinstance(obj, (np.ndarray, list, tuple, dict, fn.LayerNorm, fn.BatchNorm, fn.InstanceNorm,
                            fn.GroupNorm))


def _arrays(result):
    if isinstance(result, np.ndarray):
        return [result]
    if isinstance(result, tuple):
        return [r for r in result if isinstance(r, np.ndarray)]
    return []


def _traced_windows(once, iterations):
    """Growth of tracemalloc's traced memory over two windows of `iterations` calls.

    Some interpreter and NumPy state is only allocated once tracing is on and settles over a few
    hundred calls (more with PYTHONMALLOC=malloc): a traced warm-up first; then a leak grows both
    windows alike, while settling shrinks from one window to the next.
    """
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start(1)
    try:
        for _ in range(TRACED_WARMUP):
            once()
        windows = []
        for _ in range(2):
            gc.collect()
            traced0 = tracemalloc.get_traced_memory()[0]
            for _ in range(iterations):
                once()
            gc.collect()
            windows.append(tracemalloc.get_traced_memory()[0] - traced0)
        return windows
    finally:
        if not was_tracing:
            tracemalloc.stop()


def check_no_leak(call, args, kwargs, raises=None, iterations=ITERATIONS, traced_iterations=TRACED_ITERATIONS):
    """call(*args, **kwargs) `iterations` times: refcounts and memory must not move.

    The long loop runs without tracemalloc (which costs several times the call itself) and
    watches the reference counts, the Python allocator's block count, malloc and RSS; a shorter
    loop under tracemalloc then watches every Python and NumPy allocation by size.
    """

    def once():
        if raises is None:
            return call(*args, **kwargs)
        try:
            call(*args, **kwargs)
        except raises:
            return None
        raise AssertionError(f"{call} did not raise {raises}")

    tracked = [a for a in (*args, *kwargs.values()) if _tracked(a)]
    for _ in range(WARMUP):
        once()
    gc.collect()
    refs = [sys.getrefcount(a) for a in tracked]
    blocks0 = sys.getallocatedblocks()
    malloced0 = MALLOCED() if MALLOCED else 0
    rss0 = rss()
    for _ in range(iterations):
        once()
    gc.collect()
    blocks = sys.getallocatedblocks() - blocks0
    malloced = (MALLOCED() if MALLOCED else 0) - malloced0
    grown = rss() - rss0
    after = [sys.getrefcount(a) for a in tracked]

    windows = [0, 0] if UNDER_ASAN else _traced_windows(once, traced_iterations)
    traced = min(windows)

    # what one more call returns is freed when dropped
    result = once()
    fresh = [weakref.ref(a) for a in _arrays(result) if not any(a is t for t in tracked)]
    del result
    gc.collect()

    changed = [(type(a).__name__, getattr(a, "shape", None), b, c)
               for a, b, c in zip(tracked, refs, after) if b != c]
    assert not changed, f"reference counts changed (type, shape, before, after): {changed}"
    alive = [r() for r in fresh if r() is not None]
    assert not alive, f"returned arrays still referenced after being dropped: {[a.shape for a in alive]}"
    assert UNDER_ASAN or blocks < BLOCK_TOLERANCE, f"{blocks} more Python memory blocks after {iterations} calls"
    assert malloced < MALLOC_TOLERANCE, f"malloc'ed memory grew by {malloced} bytes over {iterations} calls"
    assert UNDER_ASAN or grown < RSS_TOLERANCE, f"RSS grew by {grown} bytes over {iterations} calls"
    assert traced < TRACED_TOLERANCE, \
        f"tracemalloc grew by {windows} bytes over two windows of {traced_iterations} calls"


# ---- the inputs ---------------------------------------------------------------------------------------

rng = np.random.default_rng(7)
X = rng.standard_normal((4, 6, 8))                       # (N, L, D): features last
X32 = X.astype(np.float32)
X16 = X.astype(np.float16)
XF = np.asfortranarray(X)
XN = rng.standard_normal((4, 6, 3, 3))                    # (N, C, H, W): channels at axis 1
W8, B8 = rng.standard_normal(8), rng.standard_normal(8)
W8_32, B8_32 = W8.astype(np.float32), B8.astype(np.float32)
W6, B6 = rng.standard_normal(6), rng.standard_normal(6)
MASK = rng.random((4, 6)) < 0.7                          # x.shape without the last axis
MASK[:, :2] = True
MASK_NHW = rng.random((4, 3, 3)) < 0.7                   # x.shape without axis 1
MASK_NHW[:, 0, 0] = True

_, LN_MEAN, LN_RSTD = fn.layer_norm(X, W8, B8, mask=MASK, return_stats=True)
_, RMS_RSTD = fn.rms_norm(X, W8, return_stats=True)
_, BN_MEAN, BN_RSTD = fn.batch_norm(XN, W6, B6, axis=1, return_stats=True)
_, IN_MEAN, IN_RSTD = fn.instance_norm(XN, W6, B6, axis=1, mask=MASK_NHW, return_stats=True)
_, GN_MEAN, GN_RSTD = fn.group_norm(XN, 3, W6, B6, axis=1, return_stats=True)
DY = rng.standard_normal(X.shape)
DYN = rng.standard_normal(XN.shape)


def out_like(a):
    return np.empty_like(a)


def overlapping_out(shape, dtype):
    """An x and an out that share memory shifted by one row (a partial overlap)."""
    rows, cols = shape
    buf = rng.standard_normal((rows + 1) * cols).astype(dtype)
    return buf[:-cols].reshape(shape), buf[cols:].reshape(shape)


X_OVER, OUT_OVER = overlapping_out((16, 8), np.float64)
X_INPLACE = X.copy()
READ_ONLY = np.empty_like(X)
READ_ONLY.flags.writeable = False
RUNNING_MEAN, RUNNING_VAR = np.zeros(6), np.ones(6)
RUNNING_RO = np.ones(6)
RUNNING_RO.flags.writeable = False

# (id, callable, args, kwargs, exception or None)
SUCCESS = [
    # layer/RMS norm: the C fast path (plain float32/64 rows), and the general path
    ("layer_norm-fast", fn.layer_norm, (X32, W8_32, B8_32), {}),
    ("layer_norm-fast-out", fn.layer_norm, (X, W8, B8), {"out": out_like(X)}),
    ("layer_norm-fast-inplace", fn.layer_norm, (X_INPLACE,), {"out": X_INPLACE}),
    ("layer_norm-fallback-weight-dtype", fn.layer_norm, (X32, W8, B8), {}),       # float64 weight: NotImplemented
    ("layer_norm-fallback-weight-list", fn.layer_norm, (X, list(W8)), {}),
    ("layer_norm-fallback-overlap", fn.layer_norm, (X_OVER,), {"out": OUT_OVER}),
    ("layer_norm-mask-stats-f16", fn.layer_norm, (X16, W8, B8), {"mask": MASK, "return_stats": True}),
    ("layer_norm-tuple-axis-F", fn.layer_norm, (XF,), {"axis": (1, 2), "out": np.empty_like(XF)}),
    ("rms_norm-fast", fn.rms_norm, (X, W8), {}),
    ("rms_norm-mask-stats", fn.rms_norm, (X32, W8, B8), {"mask": MASK, "return_stats": True}),
    ("rms_norm-f16-strided", fn.rms_norm, (X16[:, ::2],), {"axis": 1}),
    # batch norm, with running statistics updated in place
    ("batch_norm-running", fn.batch_norm, (XN, W6, B6),
     {"axis": 1, "running_mean": RUNNING_MEAN, "running_var": RUNNING_VAR, "return_stats": True}),
    ("batch_norm-eval", fn.batch_norm, (XN,),
     {"axis": 1, "running_mean": RUNNING_MEAN, "running_var": RUNNING_VAR, "training": False}),
    ("batch_norm-mask-f32", fn.batch_norm, (X32, W8, B8), {"mask": MASK, "out": out_like(X32)}),
    ("instance_norm", fn.instance_norm, (XN, W6, B6), {"axis": 1, "mask": MASK_NHW, "return_stats": True}),
    ("instance_norm-f16", fn.instance_norm, (X16,), {}),
    ("group_norm", fn.group_norm, (XN, 3, W6, B6), {"axis": 1, "out": out_like(XN)}),
    ("group_norm-f32-last", fn.group_norm, (X32, 2), {"mask": MASK, "return_stats": True}),
    # gradients
    ("layer_norm_backward", fn.layer_norm_backward, (DY, X, LN_MEAN, LN_RSTD, W8), {"mask": MASK}),
    ("layer_norm_backward-f32", fn.layer_norm_backward,
     (DY.astype(np.float32), X32, LN_MEAN, LN_RSTD), {}),
    ("rms_norm_backward", fn.rms_norm_backward, (DY, X, RMS_RSTD, W8), {}),
    ("batch_norm_backward", fn.batch_norm_backward, (DYN, XN, BN_MEAN, BN_RSTD, W6), {"axis": 1}),
    ("batch_norm_backward-eval-f16", fn.batch_norm_backward,
     (DYN.astype(np.float16), XN.astype(np.float16), BN_MEAN, BN_RSTD), {"axis": 1, "training": False}),
    ("instance_norm_backward", fn.instance_norm_backward, (DYN, XN, IN_MEAN, IN_RSTD, W6),
     {"axis": 1, "mask": MASK_NHW}),
    ("group_norm_backward", fn.group_norm_backward, (DYN, XN, GN_MEAN, GN_RSTD, 3, W6), {"axis": 1}),
    # data and weight normalization
    ("standardize", fn.standardize, (X, 2), {}),
    ("standardize-out-f32", fn.standardize, (X32,), {"axis": 1, "out": out_like(X32), "eps": 1e-6}),
    ("min_max_scale", fn.min_max_scale, (X16, -1), {"feature_range": (-1.0, 1.0)}),
    ("weight_norm", fn.weight_norm, (X[0], W6), {"axis": 0}),
    ("weight_norm_backward", fn.weight_norm_backward, (DY[0], X[0], W6), {"axis": 0}),
    ("mask_from_lengths", fn.mask_from_lengths, ([3, 0, 6, 2],), {"max_len": 8}),
    ("mask_from_lengths-array", fn.mask_from_lengths, (np.array([1, 5, 2]),), {}),
]

ERRORS = [
    # the fast path takes the call, allocates its scratch, then finds the weight wrong
    ("layer_norm-fast-wrong-weight", fn.layer_norm, (X, np.ones(9)), {}, ValueError),
    ("layer_norm-fast-wrong-bias", fn.layer_norm, (X32, None, np.ones(7, np.float32)), {}, ValueError),
    ("rms_norm-fast-wrong-weight-2d", fn.rms_norm, (X, np.ones((1, 8))), {}, ValueError),
    ("layer_norm-bad-axis", fn.layer_norm, (X,), {"axis": 5}, np.exceptions.AxisError),
    ("layer_norm-repeated-axis", fn.layer_norm, (X,), {"axis": (1, -2)}, ValueError),
    ("layer_norm-axis-float", fn.layer_norm, (X,), {"axis": 1.5}, TypeError),
    ("layer_norm-complex", fn.layer_norm, (X.astype(complex),), {}, TypeError),
    ("layer_norm-mask-dtype", fn.layer_norm, (X,), {"mask": MASK.astype(int)}, TypeError),
    ("layer_norm-mask-shape", fn.layer_norm, (X,), {"mask": MASK[:, :5]}, ValueError),
    ("rms_norm-negative-eps", fn.rms_norm, (X,), {"eps": -1.0}, ValueError),
    ("rms_norm-out-dtype", fn.rms_norm, (X,), {"out": np.empty_like(X32)}, ValueError),
    ("rms_norm-out-read-only", fn.rms_norm, (X,), {"out": READ_ONLY}, ValueError),
    ("layer_norm-no-features", fn.layer_norm, (np.empty((3, 0)),), {}, ValueError),
    ("batch_norm-eval-no-running", fn.batch_norm, (X,), {"training": False}, ValueError),
    ("batch_norm-running-read-only", fn.batch_norm, (XN,),
     {"axis": 1, "running_mean": RUNNING_RO, "running_var": RUNNING_VAR}, ValueError),
    ("batch_norm-running-shape", fn.batch_norm, (X,),
     {"running_mean": RUNNING_MEAN, "running_var": RUNNING_VAR}, ValueError),
    ("batch_norm-one-value", fn.batch_norm, (X[:1, :1],), {}, ValueError),   # after the C moments ran
    ("batch_norm-momentum", fn.batch_norm, (X,), {"momentum": 2.0}, ValueError),
    ("instance_norm-2d", fn.instance_norm, (X[0],), {}, ValueError),
    ("instance_norm-batch-axis", fn.instance_norm, (X,), {"axis": 0}, ValueError),
    ("group_norm-groups", fn.group_norm, (XN, 4), {"axis": 1}, ValueError),
    ("group_norm-weight", fn.group_norm, (XN, 3, W8), {"axis": 1}, ValueError),
    ("layer_norm_backward-stat-shape", fn.layer_norm_backward, (DY, X, LN_MEAN[:1], LN_RSTD), {}, ValueError),
    ("rms_norm_backward-dy-shape", fn.rms_norm_backward, (DY[:1], X, RMS_RSTD), {}, ValueError),
    ("batch_norm_backward-weight", fn.batch_norm_backward, (DYN, XN, BN_MEAN, BN_RSTD, W8), {"axis": 1},
     ValueError),
    ("instance_norm_backward-mask", fn.instance_norm_backward, (DYN, XN, IN_MEAN, IN_RSTD),
     {"axis": 1, "mask": MASK}, ValueError),
    ("group_norm_backward-no-mean", fn.group_norm_backward, (DYN, XN, None, GN_RSTD, 3), {"axis": 1},
     ValueError),
    ("standardize-eps", fn.standardize, (X,), {"eps": float("nan")}, ValueError),
    ("standardize-out-read-only", fn.standardize, (X,), {"out": READ_ONLY}, ValueError),
    ("min_max_scale-range", fn.min_max_scale, (X,), {"feature_range": (1.0, 0.0)}, ValueError),
    ("min_max_scale-range-type", fn.min_max_scale, (X,), {"feature_range": "ab"}, TypeError),
    ("weight_norm-g-shape", fn.weight_norm, (X[0], W8), {"axis": 0}, ValueError),
    ("weight_norm-no-g", fn.weight_norm, (X[0], None), {}, TypeError),
    ("weight_norm_backward-dw-shape", fn.weight_norm_backward, (DY[0, :2], X[0], W6), {}, ValueError),
    ("mask_from_lengths-negative", fn.mask_from_lengths, ([3, -1],), {}, ValueError),
    ("mask_from_lengths-short", fn.mask_from_lengths, ([3, 5],), {"max_len": 4}, ValueError),
    ("mask_from_lengths-floats", fn.mask_from_lengths, ([1.5],), {}, TypeError),
]


@pytest.mark.parametrize("name, call, args, kwargs", SUCCESS, ids=[c[0] for c in SUCCESS])
def test_successful_calls_do_not_leak(name, call, args, kwargs):
    check_no_leak(call, args, kwargs)


@pytest.mark.parametrize("name, call, args, kwargs, exc", ERRORS, ids=[c[0] for c in ERRORS])
def test_failing_calls_do_not_leak(name, call, args, kwargs, exc):
    check_no_leak(call, args, kwargs, raises=exc)


# ---- layers: call + backward ----------------------------------------------------------------------------

LAYERS = [
    ("LayerNorm", lambda: fn.LayerNorm(8), X, MASK),
    ("LayerNorm-2d", lambda: fn.LayerNorm((6, 8)), X32, None),
    ("RMSNorm", lambda: fn.RMSNorm(8), X16, None),
    ("BatchNorm-train", lambda: fn.BatchNorm(6, axis=1), XN, None),
    ("BatchNorm-eval", lambda: fn.BatchNorm(8).eval(), X, MASK),
    ("BatchNorm-no-running", lambda: fn.BatchNorm(8, track_running_stats=False), X32, None),
    ("InstanceNorm", lambda: fn.InstanceNorm(6, axis=1, affine=True), XN, MASK_NHW),
    ("GroupNorm", lambda: fn.GroupNorm(3, 6, axis=1), XN, None),
]


def _step(layer, x, mask, dy):
    y = layer(x, mask=mask)
    return y, layer.backward(dy)


@pytest.mark.parametrize("name, make, x, mask", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_call_and_backward_do_not_leak(name, make, x, mask):
    layer = make()
    dy = np.ones_like(x)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    refs = [sys.getrefcount(p) for p in params]
    check_no_leak(_step, (layer, x, mask, dy), {})
    assert [sys.getrefcount(p) for p in params] == refs


def test_layer_errors_do_not_leak():
    check_no_leak(fn.LayerNorm(8).backward, (DY,), {}, raises=RuntimeError)
    check_no_leak(fn.LayerNorm(8), (XN,), {}, raises=ValueError)
    check_no_leak(fn.BatchNorm(5), (X,), {}, raises=ValueError)


def test_threaded_calls_do_not_leak():
    """Above the threading threshold the kernels start threads and split their scratch per slice."""
    old = fn.get_num_threads()
    fn.set_num_threads(2)
    try:
        x = rng.standard_normal((64, 2048)).astype(np.float32)      # 2**17 elements
        mask = np.ones(64, bool)
        check_no_leak(fn.layer_norm, (x,), {"mask": mask, "return_stats": True}, iterations=150)
        check_no_leak(fn.batch_norm, (x,), {"return_stats": True}, iterations=150)
    finally:
        fn.set_num_threads(old)


# ---- the checker itself ---------------------------------------------------------------------------------

def test_the_checks_catch_leaks():
    """Each kind of leak the checks are for fails them: a reference to an argument, a Python object,
    a C malloc and a NumPy array per call."""
    arg = np.zeros(3)
    kept = []

    def leak_reference(a):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(a))

    def leak_object(a):
        kept.append([a.shape])

    def leak_array(a):
        kept.append(np.empty(4))

    with pytest.raises(AssertionError, match="reference counts changed"):
        check_no_leak(leak_reference, (arg,), {})
    if UNDER_ASAN:
        return
    # Python memory blocks: with pymalloc; malloc'ed: with PYTHONMALLOC=malloc; tracemalloc: always
    with pytest.raises(AssertionError, match="Python memory blocks|malloc'ed|tracemalloc"):
        check_no_leak(leak_object, (arg,), {})
    kept.clear()
    with pytest.raises(AssertionError, match="Python memory blocks|malloc'ed|tracemalloc"):
        check_no_leak(leak_array, (arg,), {})
    kept.clear()
    if MALLOCED is not None:
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]

        def leak_malloc(a):
            libc.malloc(24)                  # the smallest chunk there is

        with pytest.raises(AssertionError, match="malloc'ed memory grew"):
            check_no_leak(leak_malloc, (arg,), {})
    # and tracemalloc alone, over its shorter loop
    with pytest.raises(AssertionError, match="tracemalloc grew"):
        check_no_leak(lambda a: kept.append(np.empty(2)) if tracemalloc.is_tracing() else None, (arg,), {})
