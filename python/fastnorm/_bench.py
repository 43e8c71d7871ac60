"""``python -m fastnorm bench``: how much faster than plain NumPy fastnorm is on this machine.

A short run (about 6 s on 2 cores; ``quick=True``: about 1 s) in the spirit of bottleneck's
``bn.bench()``: each case times a fastnorm call and the NumPy code a user would write for it,
interleaved round by round, and reports the ratio. ``benchmarks/run.py`` in the source tree is
the full benchmark (PyTorch, ONNX Runtime, JAX, a memory copy, output reuse, threads).
"""
from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

import numpy as np

from . import _core, _functional as fn, _threads
from ._config import installed_version

EPS = 1e-5


# ---- the NumPy code a user would write (float32 in, float32 out) ----------------------------------

def _np_layer_norm(x, w, b):
    mean = x.mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=-1, keepdims=True) + EPS) * w + b


def _np_rms_norm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def _np_batch_norm(x, w, b):
    mean = x.mean(axis=0)
    return (x - mean) / np.sqrt(x.var(axis=0) + EPS) * w + b


def _np_group_norm(x, groups, w, b):
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = g.mean(axis=-1, keepdims=True)
    y = ((g - mean) / np.sqrt(g.var(axis=-1, keepdims=True) + EPS)).reshape(x.shape)
    return y * w.reshape(1, c, 1, 1) + b.reshape(1, c, 1, 1)


def _np_norm_backward(dy, x, mean, rstd, w, axis):
    """Layer norm (axis=-1, statistics per row) or batch norm (axis=0, per column) gradients."""
    xhat = (x - mean) * rstd
    g = dy * w
    dx = rstd * (g - g.mean(axis=axis, keepdims=True) - xhat * (g * xhat).mean(axis=axis, keepdims=True))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


# ---- cases ----------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    shape: tuple[int, ...]
    fastnorm: Callable[[], object]
    numpy: Callable[[], object]


def _cases(quick: bool) -> list[Case]:
    rng = np.random.default_rng(0)
    rows = (512, 1024) if quick else (4096, 1024)
    table = (8192, 64) if quick else (65536, 64)
    image = (8, 64, 16, 16) if quick else (32, 64, 32, 32)

    def data(shape, features):
        x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
        w = rng.uniform(0.5, 1.5, features).astype(np.float32)
        return x, w, rng.standard_normal(features).astype(np.float32), rng.standard_normal(shape).astype(np.float32)

    small, ws, bs, _ = data((32, 768), 768)
    x, w, b, dy = data(rows, rows[1])
    t, wt, bt, dyt = data(table, table[1])
    im, wi, bi, _ = data(image, image[1])
    _, mean, rstd = fn.layer_norm(x, w, b, return_stats=True)
    _, tmean, trstd = fn.batch_norm(t, wt, bt, return_stats=True)
    groups = 8
    return [
        Case("layer_norm", small.shape, lambda: fn.layer_norm(small, ws, bs), lambda: _np_layer_norm(small, ws, bs)),
        Case("layer_norm", x.shape, lambda: fn.layer_norm(x, w, b), lambda: _np_layer_norm(x, w, b)),
        Case("rms_norm", x.shape, lambda: fn.rms_norm(x, w), lambda: _np_rms_norm(x, w)),
        Case("batch_norm", t.shape, lambda: fn.batch_norm(t, wt, bt), lambda: _np_batch_norm(t, wt, bt)),
        Case("group_norm G=8, axis=1", im.shape, lambda: fn.group_norm(im, groups, wi, bi, axis=1),
             lambda: _np_group_norm(im, groups, wi, bi)),
        Case("layer_norm_backward", x.shape, lambda: fn.layer_norm_backward(dy, x, mean, rstd, w),
             lambda: _np_norm_backward(dy, x, mean[:, None], rstd[:, None], w, -1)),
        Case("batch_norm_backward", t.shape, lambda: fn.batch_norm_backward(dyt, t, tmean, trstd, wt),
             lambda: _np_norm_backward(dyt, t, tmean, trstd, wt, 0)),
    ]


def max_relative_difference(a, b) -> float:
    """Largest |a - b| over max|b| across the arrays of two results (one array or a tuple)."""
    pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    return max(float(np.max(np.abs(np.asarray(p, np.float64) - q)) / max(float(np.max(np.abs(q))), 1e-30))
               for p, q in pairs)


# ---- timing ----------------------------------------------------------------------------------------

def _loops(call: Callable[[], object], min_seconds: float) -> int:
    """Calls per sample so that one sample lasts at least ``min_seconds`` (as timeit's autorange)."""
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            call()
        if time.perf_counter() - start >= min_seconds or number >= 1 << 20:
            return number
        number *= 4


def _per_call(call: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        call()
    return (time.perf_counter() - start) / number


def _time_case(case: Case, rounds: int, min_seconds: float) -> tuple[float, float]:
    """Median seconds per call of (fastnorm, numpy), the two timed in alternating order each round."""
    numbers = (_loops(case.fastnorm, min_seconds), _loops(case.numpy, min_seconds))
    calls = (case.fastnorm, case.numpy)
    samples: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            samples[k].append(_per_call(calls[k], numbers[k]))
    return float(np.median(samples[0])), float(np.median(samples[1]))


def _progress(done: int, total: int, label: str, stream: TextIO) -> None:
    width = 30
    filled = width * done // total
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<32.32}")
    if done == total:
        stream.write("\r" + " " * (width + 44) + "\r")
    stream.flush()


def _seconds(t: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            return f"{t / scale:7.2f} {unit}"
    return f"{t / 1e-9:7.0f} ns"


def bench(quick: bool = False, *, file: TextIO | None = None, progress: bool | None = None) -> list[dict]:
    """Time fastnorm against the equivalent NumPy code on this machine and print a table.

    Every case is float32 with a weight and a bias, at fastnorm's current thread count
    (:func:`get_num_threads`). Before timing, each NumPy result is checked against fastnorm's.
    ``speed`` is NumPy's time over fastnorm's: above 1, fastnorm is faster.

    Parameters
    ----------
    quick : bool, optional
        Smaller arrays and fewer rounds (about 1 s instead of about 6 s on 2 cores).
    file : file-like, optional
        Where the table goes (default ``sys.stdout``).
    progress : bool, optional
        Draw a progress bar on ``sys.stderr`` while timing; default: when stderr is a terminal.

    Returns
    -------
    list of dict
        One per case: ``name``, ``shape``, ``fastnorm`` and ``numpy`` (median seconds per call),
        ``speed`` and ``difference`` (largest difference of the NumPy result from fastnorm's,
        relative to the largest magnitude).
    """
    out = sys.stdout if file is None else file
    show = sys.stderr.isatty() if progress is None else progress
    rounds, min_seconds = (3, 0.005) if quick else (7, 0.02)
    cases = _cases(quick)
    rows = []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for k, case in enumerate(cases):
            if show:
                _progress(k, len(cases), f"{case.name} {case.shape}", sys.stderr)
            difference = max_relative_difference(case.fastnorm(), case.numpy())
            t_fn, t_np = _time_case(case, rounds, min_seconds)
            rows.append({"name": case.name, "shape": case.shape, "fastnorm": t_fn, "numpy": t_np,
                         "speed": t_np / t_fn, "difference": difference})
        if show:
            _progress(len(cases), len(cases), "", sys.stderr)
    finally:
        if was_enabled:
            gc.enable()
    _print_table(rows, rounds, out)
    return rows


def _print_table(rows: list[dict], rounds: int, out: TextIO) -> None:
    dispatch = _core.cpu_dispatch()
    print(f"fastnorm {installed_version()} vs NumPy {np.__version__}: float32, "
          f"{_threads.get_num_threads()} thread(s), {dispatch['vector_loops']} vector loops", file=out)
    print(f"speed = NumPy time / fastnorm time (median of {rounds} rounds); above 1: fastnorm is faster",
          file=out)
    print(file=out)
    name_width = max(len(r["name"]) for r in rows)
    print(f"    {'':<{name_width}}  {'shape':<16} {'fastnorm':>10} {'numpy':>10} {'speed':>8}", file=out)
    for r in rows:
        shape = "(" + ", ".join(map(str, r["shape"])) + ")"
        flag = "  (results differ!)" if r["difference"] > 1e-3 else ""
        print(f"    {r['name']:<{name_width}}  {shape:<16} {_seconds(r['fastnorm']):>10} "
              f"{_seconds(r['numpy']):>10} {r['speed']:8.1f}{flag}", file=out)
