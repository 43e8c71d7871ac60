#!/usr/bin/env python
"""Speed of fastnorm side by side with plain NumPy, PyTorch CPU and a memory copy.

    python benchmarks/run.py                     # full run, one table (~3-4 minutes)
    python benchmarks/run.py --quick             # small shapes, few repeats: a smoke run
    python benchmarks/run.py --cases 'batch'     # only the cases whose name matches (regex)
    python benchmarks/run.py --json out.json     # also write every sample to a JSON file
    python benchmarks/run.py --memory            # also the peak-memory check (1 GiB input, ~2.5 GiB RAM)
    python benchmarks/run.py --cases bfloat16    # only the bfloat16 rows (needs ml_dtypes)

The main rows use each library's default thread count (fastnorm.get_num_threads(),
torch.get_num_threads()); the threads=N rows set both to N.

Everything runs in this one process. Within a case the implementations are interleaved:
each round times every implementation once (the starting one rotates from round to round),
and the table reports the median over the rounds. Calls shorter than a few milliseconds are
timed in loops of `number` calls (as timeit does) and reported per call.

Implementations:
  fastnorm      the call as a user writes it (allocates its output)
  fastnorm out= the same call writing into a preallocated output (for the backward functions,
                dx into a preallocated array: out= is fastnorm's addition to the contract)
  numpy         the obvious NumPy code, written below (x.mean / x.var / arithmetic)
  torch         torch.nn.functional on CPU, if torch is installed (optional, never required);
                backward via torch.autograd.grad on leaf tensors (graph built once, retained)
  copy          np.copyto of x into a preallocated array of the same dtype and shape: the
                memory-bandwidth floor (one read and one write of the array)

PyTorch is not a dependency of fastnorm; install it only to run this comparison
(`pip install torch==2.13.0` for the CPU build).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import resource
import sys
import time
import tracemalloc

import numpy as np

import fastnorm

try:  # optional: the torch column is skipped when it is missing
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - depends on the environment
    torch = None
    F = None

EPS = 1e-5
IMPLS = ("fastnorm", "fastnorm out=", "numpy", "torch", "copy")
SMALL_CALL_TARGET_S = 3e-6            # the issue: a layer norm (8, 768) call under 3 us
TORCH_TARGET = 1.2                    # torch / fastnorm >= 1.2 on every case
NUMPY_TARGET = 8.0                    # numpy / fastnorm >= 8 on every large case


# ---- the plain NumPy implementations (the obvious float32 code) ----------------------------------

def np_layer_norm(x, w, b):
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * w + b


def np_rms_norm(x, w):
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + EPS) * w


def _bshape(x, ax):
    shape = [1] * x.ndim
    shape[ax] = x.shape[ax]
    return tuple(shape)


def np_batch_norm(x, w, b, ax):
    ax %= x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    mean = x.mean(axis=red, keepdims=True)
    var = x.var(axis=red, keepdims=True)
    bs = _bshape(x, ax)
    return (x - mean) / np.sqrt(var + EPS) * w.reshape(bs) + b.reshape(bs)


def np_instance_norm(x, w, b):          # (N, C, H, W), axis=1
    mean = x.mean(axis=(2, 3), keepdims=True)
    var = x.var(axis=(2, 3), keepdims=True)
    bs = _bshape(x, 1)
    return (x - mean) / np.sqrt(var + EPS) * w.reshape(bs) + b.reshape(bs)


def np_group_norm(x, G, w, b):          # (N, C, H, W), axis=1
    N, C = x.shape[:2]
    g = x.reshape(N, G, -1)
    mean = g.mean(axis=-1, keepdims=True)
    var = g.var(axis=-1, keepdims=True)
    y = ((g - mean) / np.sqrt(var + EPS)).reshape(x.shape)
    bs = _bshape(x, 1)
    return y * w.reshape(bs) + b.reshape(bs)


def np_layer_norm_backward(dy, x, mean, rstd, w):
    mean, rstd = mean[..., None], rstd[..., None]
    xhat = (x - mean) * rstd
    g = dy * w
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


def np_batch_norm_backward(dy, x, mean, rstd, w, ax):
    ax %= x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    bs = _bshape(x, ax)
    n = x.size // x.shape[ax]
    xhat = (x - mean.reshape(bs)) * rstd.reshape(bs)
    db = dy.sum(axis=red)
    dw = (dy * xhat).sum(axis=red)
    dx = (w * rstd).reshape(bs) / n * (n * dy - db.reshape(bs) - xhat * dw.reshape(bs))
    return dx, dw, db


# ---- cases ---------------------------------------------------------------------------------------

class Case:
    """One row of the table: a name, what it measures, and how to build its callables."""

    def __init__(self, name, op, shape, dtype=np.float32, *, axis=-1, groups=None, backward=False,
                 threads=None, copy_target=None, with_numpy=True, large=True):
        self.name, self.op, self.shape, self.dtype = name, op, tuple(shape), np.dtype(dtype)
        self.axis, self.groups, self.backward, self.threads = axis, groups, backward, threads
        self.copy_target, self.with_numpy = copy_target, with_numpy
        self.large = large          # the (8, 768) cases are the small ones

    def build(self, rng):
        """{impl: zero-argument callable}; each returns its result (for the agreement check)."""
        x = (rng.standard_normal(self.shape, dtype=np.float32) * 1.5 + 0.25).astype(self.dtype)
        C = self.shape[self.axis]
        w = (1.0 + 0.1 * rng.standard_normal(C)).astype(self.dtype)
        b = (0.1 * rng.standard_normal(C)).astype(self.dtype)
        copy_dst = np.empty_like(x)
        out = np.empty_like(x)
        fns = {"copy": lambda: np.copyto(copy_dst, x)}
        fn = getattr(fastnorm, self.op)
        ax, G = self.axis, self.groups

        if not self.backward:
            if self.op == "rms_norm":
                fns["fastnorm"] = lambda: fn(x, w, axis=ax)
                fns["fastnorm out="] = lambda: fn(x, w, axis=ax, out=out)
            elif self.op == "group_norm":
                fns["fastnorm"] = lambda: fn(x, G, w, b, axis=ax)
                fns["fastnorm out="] = lambda: fn(x, G, w, b, axis=ax, out=out)
            else:
                fns["fastnorm"] = lambda: fn(x, w, b, axis=ax)
                fns["fastnorm out="] = lambda: fn(x, w, b, axis=ax, out=out)
            if self.with_numpy:
                fns["numpy"] = {
                    "layer_norm": lambda: np_layer_norm(x, w, b),
                    "rms_norm": lambda: np_rms_norm(x, w),
                    "batch_norm": lambda: np_batch_norm(x, w, b, ax),
                    "instance_norm": lambda: np_instance_norm(x, w, b),
                    "group_norm": lambda: np_group_norm(x, G, w, b),
                }[self.op]
            if torch is not None:
                xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
                nshape = (x.shape[-1],)
                fns["torch"] = {
                    "layer_norm": lambda: F.layer_norm(xt, nshape, wt, bt, EPS),
                    "rms_norm": (lambda: F.rms_norm(xt, nshape, wt, EPS)) if hasattr(F, "rms_norm") else None,
                    "batch_norm": lambda: F.batch_norm(xt, None, None, wt, bt, True, 0.1, EPS),
                    "instance_norm": lambda: F.instance_norm(xt, weight=wt, bias=bt, eps=EPS),
                    "group_norm": lambda: F.group_norm(xt, G, wt, bt, EPS),
                }[self.op]
                if fns["torch"] is None:
                    del fns["torch"]
        else:
            dy = rng.standard_normal(self.shape, dtype=np.float32).astype(self.dtype)
            if self.op == "layer_norm_backward":
                _, mean, rstd = fastnorm.layer_norm(x, w, b, axis=ax, return_stats=True)
                fns["fastnorm"] = lambda: fn(dy, x, mean, rstd, w, axis=ax)
                fns["fastnorm out="] = lambda: fn(dy, x, mean, rstd, w, axis=ax, out=out)
                if self.with_numpy:
                    fns["numpy"] = lambda: np_layer_norm_backward(dy, x, mean, rstd, w)
            else:
                _, mean, rstd = fastnorm.batch_norm(x, w, b, axis=ax, return_stats=True)
                fns["fastnorm"] = lambda: fn(dy, x, mean, rstd, w, axis=ax)
                fns["fastnorm out="] = lambda: fn(dy, x, mean, rstd, w, axis=ax, out=out)
                if self.with_numpy:
                    fns["numpy"] = lambda: np_batch_norm_backward(dy, x, mean, rstd, w, ax)
            if torch is not None:
                xt = torch.from_numpy(x.copy()).requires_grad_()
                wt = torch.from_numpy(w.copy()).requires_grad_()
                bt = torch.from_numpy(b.copy()).requires_grad_()
                dyt = torch.from_numpy(dy)
                if self.op == "layer_norm_backward":
                    yt = F.layer_norm(xt, (x.shape[-1],), wt, bt, EPS)
                else:
                    yt = F.batch_norm(xt, None, None, wt, bt, True, 0.1, EPS)
                fns["torch"] = lambda: torch.autograd.grad(yt, (xt, wt, bt), dyt, retain_graph=True)
        return fns


def make_cases(quick: bool):
    big = 2048 if quick else 16384          # rows of the large layer/RMS norm cases
    bn_rows = 32768 if quick else 262144
    nb = 4 if quick else 32                 # batch of the (N, 64, 64, 64) image cases
    img = (nb, 64, 64, 64)
    ln_big, bn2 = (big, 1024), (bn_rows, 64)
    cases = [
        Case("layer_norm", "layer_norm", (8, 768), large=False),
        Case("layer_norm", "layer_norm", ln_big, copy_target=1.15),
        Case("rms_norm", "rms_norm", ln_big, copy_target=1.15),
        Case("batch_norm", "batch_norm", bn2, copy_target=1.6),
        Case("batch_norm axis=1", "batch_norm", img, axis=1, copy_target=1.6),
        Case("instance_norm axis=1", "instance_norm", img, axis=1, copy_target=1.15),
        Case("group_norm G=8 axis=1", "group_norm", img, axis=1, groups=8, copy_target=1.15),
        Case("layer_norm_backward", "layer_norm_backward", (8, 768), backward=True, large=False),
        Case("layer_norm_backward", "layer_norm_backward", ln_big, backward=True, copy_target=1.6),
        Case("batch_norm_backward", "batch_norm_backward", bn2, backward=True, copy_target=2.6),
        Case("batch_norm_backward axis=1", "batch_norm_backward", img, axis=1, backward=True,
             copy_target=2.6),
        Case("layer_norm", "layer_norm", ln_big, np.float64, copy_target=1.15),
        Case("layer_norm", "layer_norm", ln_big, np.float16, copy_target=1.15),
    ]
    # Thread sweep: NumPy is single-threaded whatever the setting; its time is in the rows above.
    for threads in (1, 2):
        cases.append(Case(f"threads={threads} layer_norm", "layer_norm", ln_big, threads=threads,
                          copy_target=1.15, with_numpy=False))
        cases.append(Case(f"threads={threads} batch_norm axis=1", "batch_norm", img, axis=1,
                          threads=threads, copy_target=1.6, with_numpy=False))
    for c in cases:
        c.label = f"{c.name} {'x'.join(map(str, c.shape))}"
    return cases


# ---- timing --------------------------------------------------------------------------------------

def _loop(f, number):
    t0 = time.perf_counter()
    for _ in range(number):
        f()
    return (time.perf_counter() - t0) / number


def _max_diff(a, b):
    """Largest difference between two results (tuples for backward), relative to the scale of `a`
    (max |a|, at least 1), in float64."""
    if isinstance(a, tuple):
        return max(_max_diff(p, q) for p, q in zip(a, b))
    if torch is not None and isinstance(b, torch.Tensor):
        b = b.detach().numpy()
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a)))))


def measure(case, fns, cfg):
    """Interleaved timing of one case: {impl: [seconds per call, one per round]}, numbers, diffs."""
    impls = [i for i in IMPLS if i in fns]
    # Warm-up (first-touch page faults, lazy init, caches), then the agreement check.
    ref = fns["fastnorm"]()
    diffs = {}
    for impl in impls:
        for _ in range(cfg["warmup"]):
            res = fns[impl]()
        if impl in ("numpy", "torch", "fastnorm out="):
            diffs[impl] = _max_diff(ref, res)
        del res
    # Calibrate: loops of `number` calls lasting at least cfg["sample_s"].
    numbers, est = {}, {}
    for impl in impls:
        t = _loop(fns[impl], 1)
        if t < 0.01:
            t = min(t, *(_loop(fns[impl], 1) for _ in range(3)))
        numbers[impl] = max(1, math.ceil(cfg["sample_s"] / max(t, 1e-9)))
        est[impl] = t * numbers[impl]
    round_s = sum(est.values())
    rounds = int(min(cfg["max_rounds"], max(cfg["min_rounds"], cfg["budget_s"] / max(round_s, 1e-9))))
    samples = {impl: [] for impl in impls}
    for r in range(rounds):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for impl in order:
            samples[impl].append(_loop(fns[impl], numbers[impl]))
    return samples, numbers, diffs


# ---- bfloat16 rows (optional: ml_dtypes) ---------------------------------------------------------
#
# Layer norm of the same (rows, 1024) values in bfloat16, float16 and float32 (out=, weight and
# bias), and np.copyto of each dtype's bytes (the floor), interleaved round by round. The goal:
# bfloat16 no slower than float16, judged by the median of the per-round ratio (paired samples).

BF16_TARGET = 1.0                     # bfloat16 / float16 <= 1.0


def bfloat16_rows(quick: bool, cfg) -> dict | None:
    """{"median_s": {impl: s}, "paired_bf16_over_f16": r, ...}, or None without ml_dtypes."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    shape = (2048 if quick else 16384, 1024)
    x32 = rng.standard_normal(shape, dtype=np.float32) * 1.5 + 0.25
    w, b = 1.0 + 0.1 * rng.standard_normal(1024), 0.1 * rng.standard_normal(1024)
    fns = {}
    for name, dtype in (("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16), ("float32", np.float32)):
        x = x32.astype(dtype)
        out, dst = np.empty_like(x), np.empty_like(x)
        wd, bd = w.astype(dtype), b.astype(dtype)
        fns[name] = lambda x=x, out=out, wd=wd, bd=bd: fastnorm.layer_norm(x, wd, bd, out=out)
        fns[f"copy {name}"] = lambda x=x, dst=dst: np.copyto(dst, x)
    for f in fns.values():
        for _ in range(cfg["warmup"]):
            f()
    numbers = {k: max(1, math.ceil(cfg["sample_s"] / max(_loop(f, 1), 1e-9))) for k, f in fns.items()}
    rounds = max(cfg["min_rounds"], min(cfg["max_rounds"], 31))
    samples = {k: [] for k in fns}
    names = list(fns)
    gc.disable()
    try:
        for r in range(rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                samples[k].append(_loop(fns[k], numbers[k]))
    finally:
        gc.enable()
    paired = np.array(samples["bfloat16"]) / np.array(samples["float16"])
    return {"shape": list(shape), "rounds": rounds, "median_s": {k: float(np.median(v)) for k, v in samples.items()},
            "samples_s": samples, "paired_bf16_over_f16": float(np.median(paired)),
            "paired_bf16_over_f16_iqr": [float(q) for q in np.percentile(paired, [25, 75])]}


def print_bfloat16(res):
    med = res["median_s"]
    print(f"\nbfloat16 (ml_dtypes): layer_norm {'x'.join(map(str, res['shape']))}, weight, bias, out=; "
          f"{res['rounds']} interleaved rounds")
    print(f"  {'dtype':<10}{'layer_norm':>12}{'copy':>12}{'/ copy':>9}")
    for name in ("bfloat16", "float16", "float32"):
        print(f"  {name:<10}{_fmt_t(med[name]):>12}{_fmt_t(med['copy ' + name]):>12}"
              f"{med[name] / med['copy ' + name]:>9.2f}")
    r, (q1, q3) = res["paired_bf16_over_f16"], res["paired_bf16_over_f16_iqr"]
    ok = r <= BF16_TARGET
    print(f"  bfloat16 / float16, median of per-round ratios: {r:.3f} (IQR {q1:.3f}-{q3:.3f}), "
          f"target <= {BF16_TARGET}: {'ok' if ok else 'MISSED'}")


# ---- machine -------------------------------------------------------------------------------------

def _git_revision():
    """Commit of the fastnorm checkout being measured (+ "-dirty"), or None outside a git clone."""
    import subprocess
    here = os.path.dirname(os.path.abspath(fastnorm.__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("-dirty" if dirty else "")) if rev else None


def machine_info():
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "fastnorm": getattr(fastnorm, "__version__", "?"),
        "fastnorm_git": _git_revision(),
        "torch": torch.__version__ if torch is not None else None,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "fastnorm_threads": fastnorm.get_num_threads() if hasattr(fastnorm, "get_num_threads") else 1,
    }
    return info


# ---- peak memory (--memory) ----------------------------------------------------------------------

def _proc_status_kib(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm():
    """Reset the RSS high-water mark (VmHWM) of this process; False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_check(nbytes):
    """Peak extra allocation of fastnorm.layer_norm(x) on a float32 x of `nbytes` bytes."""
    D = 1024
    x = np.empty((nbytes // 4 // D, D), dtype=np.float32)
    np.random.default_rng(1).random(out=x, dtype=np.float32)       # touches every page
    res = {"input_bytes": x.nbytes}

    def traced(f):
        gc.collect()
        tracemalloc.start()
        tracemalloc.reset_peak()
        y = f()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return y, peak

    # 1. tracemalloc: NumPy reports its array allocations to it (fastnorm's C scratch malloc is
    #    not traced, hence the RSS measurement below).
    y, peak = traced(lambda: fastnorm.layer_norm(x))
    res["output_bytes"] = y.nbytes
    res["tracemalloc_peak_bytes"] = peak
    del y
    out = np.empty_like(x)
    out.fill(0)
    _, peak_out = traced(lambda: fastnorm.layer_norm(x, out=out))
    res["tracemalloc_peak_bytes_out="] = peak_out
    del out
    # The obvious NumPy code, for context, on a quarter of x (ratios do not depend on the size).
    xq = x[: x.shape[0] // 4]
    yq, peak_np = traced(lambda: np_layer_norm(xq, np.float32(1), np.float32(0)))
    res["numpy_tracemalloc_peak_over_output"] = peak_np / yq.nbytes
    del yq

    # 2. RSS: growth of the high-water mark over the RSS before the call (all memory, C included).
    gc.collect()
    rss0 = _proc_status_kib("VmRSS")
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if _reset_hwm() and rss0 is not None:
        y = fastnorm.layer_norm(x)
        hwm = _proc_status_kib("VmHWM")
        res["rss_peak_growth_bytes"] = (hwm - rss0) * 1024
        res["rss_method"] = "VmHWM after /proc/self/clear_refs reset"
    else:
        y = fastnorm.layer_norm(x)
        res["rss_peak_growth_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0) * 1024
        res["rss_method"] = "ru_maxrss delta (a lower bound if an earlier peak was higher)"
    del y, x
    return res


def print_memory(res):
    o = res["output_bytes"]
    gib = 1 << 30
    print(f"\nPeak memory of fastnorm.layer_norm(x), x float32 {res['input_bytes'] / gib:.2f} GiB "
          f"(output {o / gib:.2f} GiB):")
    print(f"  tracemalloc peak            {res['tracemalloc_peak_bytes'] / gib:7.3f} GiB = "
          f"{res['tracemalloc_peak_bytes'] / o:.3f} x output (extra {(res['tracemalloc_peak_bytes'] - o) / o:+.2%})")
    print(f"  tracemalloc peak, out=      {res['tracemalloc_peak_bytes_out='] / gib:7.3f} GiB = "
          f"{res['tracemalloc_peak_bytes_out='] / o:.3f} x output")
    print(f"  RSS high-water growth       {res['rss_peak_growth_bytes'] / gib:7.3f} GiB = "
          f"{res['rss_peak_growth_bytes'] / o:.3f} x output  ({res['rss_method']})")
    print(f"  (plain NumPy layer norm, for context: tracemalloc peak "
          f"{res['numpy_tracemalloc_peak_over_output']:.2f} x output)")


# ---- report --------------------------------------------------------------------------------------

def _fmt_t(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.2f} us"
    return f"{s * 1e3:.2f} ms"


def _fmt_load(load):
    return "?" if load is None else "/".join(f"{v:.2f}" for v in load)


def _fmt_r(r, ok):
    if r is None:
        return "-"
    return f"{r:.2f}" + ("" if ok is None or ok else " !")


def evaluate(case, med):
    """Ratios and the issue's targets for one case. Each check: (name, value, target, ok, shortfall)."""
    fn, fo, npy, tt, cp = (med.get(k) for k in IMPLS)
    r = {
        "numpy/fastnorm": npy / fn if npy and fn else None,
        "torch/fastnorm": tt / fn if tt and fn else None,
        # No out= in the backward API: the allocating call stands in, and pays for allocating dx.
        "out/copy": (fo if fo is not None else fn) / cp if cp else None,
    }
    checks = []
    if r["torch/fastnorm"] is not None:
        v = r["torch/fastnorm"]
        checks.append(("torch/fastnorm", v, f">= {TORCH_TARGET}", v >= TORCH_TARGET, TORCH_TARGET / v))
    if case.large and r["numpy/fastnorm"] is not None:
        v = r["numpy/fastnorm"]
        checks.append(("numpy/fastnorm", v, f">= {NUMPY_TARGET:g}", v >= NUMPY_TARGET, NUMPY_TARGET / v))
    if case.large and case.copy_target and r["out/copy"] is not None:
        v = r["out/copy"]
        checks.append(("out/copy", v, f"<= {case.copy_target}", v <= case.copy_target, v / case.copy_target))
    if case.op == "layer_norm" and not case.large:
        checks.append(("fastnorm call", fn, "< 3 us", fn < SMALL_CALL_TARGET_S, fn / SMALL_CALL_TARGET_S))
    return r, checks


def print_table(rows, info, quick):
    head = ["case", "dtype", "fastnorm", "fn out=", "numpy", "torch", "copy",
            "numpy/fn", "torch/fn", "out/copy", "rounds", "noise"]
    lines = []
    for case, med, ratios, checks, rounds, noise in rows:
        ok = {name: good for name, _, _, good, _ in checks}
        small_ok = ok.get("fastnorm call")
        lines.append([
            case.label, case.dtype.name,
            _fmt_t(med.get("fastnorm")) + ("" if small_ok is None or small_ok else " !"),
            _fmt_t(med.get("fastnorm out=")) if "fastnorm out=" in med else "(none)",
            _fmt_t(med.get("numpy")), _fmt_t(med.get("torch")), _fmt_t(med.get("copy")),
            _fmt_r(ratios["numpy/fastnorm"], ok.get("numpy/fastnorm")),
            _fmt_r(ratios["torch/fastnorm"], ok.get("torch/fastnorm")),
            _fmt_r(ratios["out/copy"], ok.get("out/copy")) + ("" if "fastnorm out=" in med else "*"),
            str(rounds), f"{noise:.0%}",
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    print(f"\nfastnorm {info['fastnorm']} ({info['fastnorm_git'] or 'no git'}) | numpy {info['numpy']} | torch {info['torch'] or 'not installed'} "
          f"(threads {info['torch_threads']}) | python {info['python']}")
    print(f"CPU: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable) | fastnorm threads "
          f"{info['fastnorm_threads']}{'' if hasattr(fastnorm, 'set_num_threads') else ' (no set_num_threads)'}"
          f"{' | --quick' if quick else ''}")
    print("Median time per call; ratios > 1 in numpy/fn and torch/fn mean fastnorm is faster.\n")
    print(fmt(head))
    print(fmt(["-" * w for w in widths]))
    for l in lines:
        print(fmt(l))
    print("\n! = misses the issue's target: torch/fn >= 1.2 (every case); numpy/fn >= 8 (large cases);\n"
          "    out/copy <= 1.15 (layer/RMS/instance/group forward), 1.6 (batch norm forward, layer norm\n"
          "    backward), 2.6 (batch norm backward); layer_norm 8x768 call < 3 us.\n"
          "* = no out= in the backward API: the allocating call over the copy (it pays for allocating dx).\n"
          "threads=N rows: torch.set_num_threads(N) and "
          + ("fastnorm.set_num_threads(N)" if hasattr(fastnorm, "set_num_threads")
             else "fastnorm single-threaded (it has no set_num_threads)")
          + "; numpy is single-threaded, not re-run.\n"
          "noise = interquartile range of the fastnorm samples over their median.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run)")
    ap.add_argument("--cases", metavar="PATTERN", help="only cases whose label matches this regex "
                    "(case-insensitive), e.g. 'backward', 'float16', '^batch_norm ', 'threads'")
    ap.add_argument("--json", metavar="FILE", help="write machine, medians, samples and ratios here")
    ap.add_argument("--memory", action="store_true",
                    help="also measure the peak memory of a layer norm of a 1 GiB float32 input (~2.5 GiB RAM)")
    ap.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                    help="timing budget per case (default 8, or 1 with --quick)")
    args = ap.parse_args(argv)

    cfg = dict(warmup=2, sample_s=0.02, min_rounds=7, max_rounds=101, budget_s=8.0)
    if args.quick:
        cfg.update(warmup=1, sample_s=0.005, min_rounds=3, max_rounds=15, budget_s=1.0)
    if args.budget is not None:
        cfg["budget_s"] = args.budget

    info = machine_info()
    started = datetime.datetime.now().astimezone()
    t_start = time.perf_counter()
    result = {"date": started.isoformat(timespec="seconds"), "machine": info, "config": cfg,
              "quick": args.quick, "cases": []}

    # Memory first: the RSS high-water mark is then not hidden by the timing runs' peaks.
    if args.memory:
        mem = memory_check((64 << 20) if args.quick else (1 << 30))
        result["memory"] = mem

    cases = make_cases(args.quick)
    if args.cases:
        pat = re.compile(args.cases, re.IGNORECASE)
        cases = [c for c in cases if pat.search(c.label + " " + c.dtype.name)]
        if not cases and not pat.search("layer_norm bfloat16"):
            sys.exit(f"no case matches {args.cases!r}")

    torch_default_threads = torch.get_num_threads() if torch is not None else None
    fastnorm_default_threads = fastnorm.get_num_threads() if hasattr(fastnorm, "get_num_threads") else None
    rows, mismatches = [], []
    rng = np.random.default_rng(0)
    for case in cases:
        print(f"  {case.label} {case.dtype.name} ...", end="", flush=True, file=sys.stderr)
        if case.threads is not None:
            if torch is not None:
                torch.set_num_threads(case.threads)
            if hasattr(fastnorm, "set_num_threads"):
                fastnorm.set_num_threads(case.threads)
        fns = case.build(rng)
        gc.collect()
        gc.disable()
        try:
            samples, numbers, diffs = measure(case, fns, cfg)
        finally:
            gc.enable()
            if case.threads is not None and torch is not None:
                torch.set_num_threads(torch_default_threads)
            if case.threads is not None and fastnorm_default_threads is not None:
                fastnorm.set_num_threads(fastnorm_default_threads)
        del fns
        med = {k: float(np.median(v)) for k, v in samples.items()}
        ratios, checks = evaluate(case, med)
        rounds = len(next(iter(samples.values())))
        q1, q3 = np.percentile(samples["fastnorm"], [25, 75])
        noise = float((q3 - q1) / med["fastnorm"])
        rows.append((case, med, ratios, checks, rounds, noise))
        tol = {np.dtype(np.float16): 2e-2, np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-8}[case.dtype]
        for impl, d in diffs.items():
            if not d <= tol:
                mismatches.append(f"{case.label} {case.dtype.name}: {impl} differs from fastnorm by {d:.3g}")
        print(f" {_fmt_t(med['fastnorm'])}", file=sys.stderr)
        result["cases"].append({
            "name": case.name, "label": case.label, "op": case.op, "shape": list(case.shape),
            "dtype": case.dtype.name, "axis": case.axis, "groups": case.groups, "backward": case.backward,
            "threads": case.threads, "large": case.large, "bytes": int(np.prod(case.shape)) * case.dtype.itemsize,
            "rounds": rounds, "number": numbers, "noise_iqr_over_median": noise, "median_s": med, "samples_s": samples, "ratios": ratios,
            "max_rel_diff_vs_fastnorm": diffs,
            "targets": [{"check": n, "value": v, "target": t, "ok": bool(ok), "shortfall": s}
                        for n, v, t, ok, s in checks],
        })

    if rows:
        print_table(rows, info, args.quick)
    if not args.cases or re.search(args.cases, "layer_norm bfloat16", re.IGNORECASE):
        print("  bfloat16 rows ...", file=sys.stderr)
        bf16 = bfloat16_rows(args.quick, cfg)
        if bf16 is not None:
            print_bfloat16(bf16)
            result["bfloat16"] = bf16
    if mismatches:
        print("\nWARNING: results disagree (the timings of these rows compare different computations):")
        for m in mismatches:
            print("  " + m)
    misses = sorted(((s, f"{case.label} {case.dtype.name}: {n} = {_fmt_t(v) if n == 'fastnorm call' else f'{v:.2f}'}"
                      f" (target {t})")
                     for case, _, _, checks, _, _ in rows for n, v, t, ok, s in checks if not ok), reverse=True)
    if misses:
        print("\nFurthest from target (factor still to gain):")
        for s, text in misses:
            print(f"  {s:6.2f}x  {text}")
    if args.memory:
        print_memory(result["memory"])
    elapsed = time.perf_counter() - t_start
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["loadavg_end"] = load
    print(f"\n{started:%Y-%m-%d %H:%M %Z}, {elapsed:.0f} s; load average (1/5/15 min) at start "
          f"{_fmt_load(info['loadavg_start'])}, at end {_fmt_load(load)} on {info['cores_usable']} cores.\n"
          "The machine may be shared: medians over interleaved rounds, but expect some noise.")
    result["elapsed_s"] = elapsed
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
