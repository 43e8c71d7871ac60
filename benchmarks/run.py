#!/usr/bin/env python
"""Speed of fastnorm side by side with plain NumPy, PyTorch, ONNX Runtime, JAX and a memory copy.

    python benchmarks/run.py                     # full run, one table (~5-6 minutes)
    python benchmarks/run.py --quick             # small shapes, few repeats: a smoke run
    python benchmarks/run.py --cases 'batch'     # only the cases whose name matches (regex)
    python benchmarks/run.py --budget 16         # seconds of timing per case: more rounds
    python benchmarks/run.py --json out.json     # also write every sample to a JSON file
    python benchmarks/run.py --memory            # also the peak-memory check (1 GiB input, ~2.5 GiB RAM)
    python benchmarks/run.py --cases bfloat16    # only the bfloat16 rows (needs ml_dtypes)

The main rows use each library's default thread count (fastnorm.get_num_threads(),
torch.get_num_threads(), ONNX Runtime os.cpu_count() intra-op threads, JAX's CPU backend);
the threads=N rows set fastnorm, torch and ONNX Runtime to N.

Everything runs in this one process. Within a case the implementations are interleaved:
each round times every implementation once (the starting one rotates from round to round),
and the table reports the median over the rounds. Calls shorter than a few milliseconds are
timed in loops of `number` calls (as timeit does) and reported per call. Before timing, every
implementation's result is compared with fastnorm's; a disagreement is reported under the table.

Implementations:
  fastnorm      the call as a user writes it (allocates its output)
  fastnorm out= the same call writing into a preallocated output (for the backward functions,
                dx into a preallocated array: out= is fastnorm's addition to the contract)
  numpy         the obvious NumPy code, written below (x.mean / x.var / arithmetic)
  torch         torch.nn.functional on CPU, if torch is installed; backward via
                torch.autograd.grad on leaf tensors (graph built once, retained)
  ort           ONNX Runtime, if onnxruntime and onnx are installed: a one-node ONNX model
                (LayerNormalization, RMSNormalization, InstanceNormalization, GroupNormalization,
                BatchNormalization in training mode) on the CPU provider, output bound to a
                preallocated array; forward only (an inference session computes no gradients)
  jax           JAX, if installed: the NumPy code below written for jax.numpy, jax.jit-compiled
                on the CPU backend, inputs on the device beforehand, block_until_ready
  copy          np.copyto of x into a preallocated array of the same dtype and shape: the
                memory-bandwidth floor (one read and one write of the array)

The peers are not dependencies of fastnorm or its tests; a missing one leaves its column
empty. Install them only to run this comparison: `pip install torch==2.13.0` (the CPU build),
`pip install onnxruntime onnx "jax[cpu]"`.
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

try:  # optional: the ort column needs onnxruntime and onnx (to build the one-node models)
    import onnx
    import onnx.helper
    import onnx.numpy_helper
    import onnxruntime as ort
except ImportError:  # pragma: no cover - depends on the environment
    onnx = ort = None

try:  # optional: the jax column
    import jax
    import jax.numpy as jnp
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_x64", True)     # the float64 case in float64, as the other columns
except ImportError:  # pragma: no cover - depends on the environment
    jax = jnp = None

EPS = 1e-5
PEERS = ("torch", "ort", "jax")
IMPLS = ("fastnorm", "fastnorm out=", "numpy") + PEERS + ("copy",)
SMALL_CALL_TARGET_S = 1.5e-6          # a layer norm (8, 768) call under 1.5 us
PEER_TARGET = 1.0                     # peer / fastnorm >= 1: never slower than a peer, on any case
NUMPY_TARGET = 8.0                    # numpy / fastnorm >= 8 on every large case
FORWARD_COPY_TARGET = 1.1             # out/copy: large forward cases within 1.1x of the copy,
LAYER_BACKWARD_COPY_TARGET = 1.6      # layer (and instance) norm backward within 1.6x,
BATCH_BACKWARD_COPY_TARGET = 2.3      # batch norm backward within 2.3x


# ---- the plain NumPy implementations (the obvious float32 code) ----------------------------------

def np_layer_norm(x, w, b, xp=np):
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / xp.sqrt(var + EPS) * w + b


def np_rms_norm(x, w, xp=np):
    ms = xp.mean(x * x, axis=-1, keepdims=True)
    return x / xp.sqrt(ms + EPS) * w


def _bshape(x, ax):
    shape = [1] * x.ndim
    shape[ax] = x.shape[ax]
    return tuple(shape)


def np_batch_norm(x, w, b, ax, xp=np):
    ax %= x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    mean = x.mean(axis=red, keepdims=True)
    var = x.var(axis=red, keepdims=True)
    bs = _bshape(x, ax)
    return (x - mean) / xp.sqrt(var + EPS) * w.reshape(bs) + b.reshape(bs)


def np_instance_norm(x, w, b, xp=np):   # (N, C, H, W), axis=1
    mean = x.mean(axis=(2, 3), keepdims=True)
    var = x.var(axis=(2, 3), keepdims=True)
    bs = _bshape(x, 1)
    return (x - mean) / xp.sqrt(var + EPS) * w.reshape(bs) + b.reshape(bs)


def np_group_norm(x, G, w, b, xp=np):   # (N, C, H, W), axis=1
    N, C = x.shape[:2]
    g = x.reshape(N, G, -1)
    mean = g.mean(axis=-1, keepdims=True)
    var = g.var(axis=-1, keepdims=True)
    y = ((g - mean) / xp.sqrt(var + EPS)).reshape(x.shape)
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


# ---- ONNX Runtime and JAX ------------------------------------------------------------------------

# What the peer columns ran, and why one is empty: (peer, text) -> case labels, printed under the table.
PEER_NOTES: dict = {}


def _onnx_candidates(op, ax, G):
    """The one-node ONNX models that compute `op` on X (scale W, bias B), best first, as
    (node, {domain: opset}, description); or a str saying why ONNX has none."""
    h = onnx.helper
    if op == "layer_norm":
        return [(h.make_node("LayerNormalization", ["X", "W", "B"], ["Y"], axis=-1, epsilon=EPS), {"": 17},
                 "LayerNormalization (opset 17)")]
    if op == "rms_norm":
        return [(h.make_node("RMSNormalization", ["X", "W"], ["Y"], axis=-1, epsilon=EPS), {"": 23},
                 "RMSNormalization (opset 23)"),
                (h.make_node("SimplifiedLayerNormalization", ["X", "W"], ["Y"], axis=-1, epsilon=EPS,
                             domain="com.microsoft"), {"": 17, "com.microsoft": 1},
                 "com.microsoft SimplifiedLayerNormalization")]
    if op == "instance_norm" and ax == 1:
        return [(h.make_node("InstanceNormalization", ["X", "W", "B"], ["Y"], epsilon=EPS), {"": 17},
                 "InstanceNormalization (opset 17)")]
    if op == "group_norm" and ax == 1:
        # opset 21: scale and bias per channel (opset 18's are per group, another computation)
        return [(h.make_node("GroupNormalization", ["X", "W", "B"], ["Y"], num_groups=G, epsilon=EPS),
                 {"": 21}, "GroupNormalization (opset 21)")]
    if op == "batch_norm" and ax == 1:
        # training_mode=1: batch statistics, as in the other columns (and the running ones, RM, RV)
        return [(h.make_node("BatchNormalization", ["X", "W", "B", "M", "V"], ["Y", "RM", "RV"],
                             epsilon=EPS, momentum=0.9, training_mode=1), {"": 15},
                 "BatchNormalization training_mode=1 (opset 15)")]
    return f"no ONNX operator normalizes along axis {ax} for {op}"


def _ort_session(node, opsets, x, w, b, threads):
    h = onnx.helper
    elem = h.np_dtype_to_tensor_dtype(x.dtype)
    given = {"W": w, "B": b, "M": np.zeros_like(w), "V": np.ones_like(w)}   # M, V: running statistics
    inits = [onnx.numpy_helper.from_array(given[name], name) for name in node.input[1:]]
    outputs = [h.make_tensor_value_info(name, elem, x.shape if name == "Y" else w.shape)
               for name in node.output]
    graph = h.make_graph([node], node.op_type, [h.make_tensor_value_info("X", elem, x.shape)], outputs,
                         initializer=inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid(d, v) for d, v in opsets.items()])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count()
    opts.inter_op_num_threads = 1       # ORT's defaults otherwise (its workers spin while idle)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_forward(case, x, w, b, threads):
    """A callable running the case's forward as a one-node ONNX model in ONNX Runtime (CPU
    provider, `threads` or all cores), writing into a preallocated output through an IO binding
    (ORT's fastest way to call a model); or a str saying why there is none."""
    if case.backward:
        return "ONNX Runtime inference sessions compute no gradients"
    candidates = _onnx_candidates(case.op, case.axis % x.ndim, case.groups)
    if isinstance(candidates, str):
        return candidates
    refusals = []
    for node, opsets, what in candidates:
        try:
            sess = _ort_session(node, opsets, x, w, b, threads)
        except Exception as e:              # noqa: BLE001 - onnxruntime raises its own types
            refusals.append(f"{what}: {str(e).splitlines()[0][:100]}")
            continue
        PEER_NOTES.setdefault(("ort", f"ran {what}"), []).append(f"{case.label} {x.dtype.name}")
        binding = sess.io_binding()
        binding.bind_cpu_input("X", x)
        # ORT writes into these arrays' memory: run() holds them as long as the binding lives
        outputs = {name: np.empty_like(x if name == "Y" else w) for name in node.output}
        for name, a in outputs.items():
            binding.bind_output(name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)

        def run():
            sess.run_with_iobinding(binding)
            return outputs["Y"]
        return run
    return "onnxruntime refuses " + "; ".join(refusals)


def jax_callable(case, x, w, b, dy=None, mean=None, rstd=None):
    """A callable running the NumPy formula of this file, jit-compiled by JAX on its CPU backend,
    on inputs placed on the device once; it waits for the result (block_until_ready)."""
    ax, G = case.axis, case.groups
    put = jax.device_put
    if case.op == "layer_norm_backward":
        f, args = jax.jit(np_layer_norm_backward), (dy, x, mean, rstd, w)
    elif case.op == "batch_norm_backward":
        f, args = jax.jit(lambda *a: np_batch_norm_backward(*a, ax)), (dy, x, mean, rstd, w)
    elif case.op == "rms_norm":
        f, args = jax.jit(lambda x, w: np_rms_norm(x, w, xp=jnp)), (x, w)
    else:
        f = jax.jit({"layer_norm": lambda x, w, b: np_layer_norm(x, w, b, xp=jnp),
                     "batch_norm": lambda x, w, b: np_batch_norm(x, w, b, ax, xp=jnp),
                     "instance_norm": lambda x, w, b: np_instance_norm(x, w, b, xp=jnp),
                     "group_norm": lambda x, w, b: np_group_norm(x, G, w, b, xp=jnp)}[case.op])
        args = (x, w, b)
    args = tuple(put(a) for a in args)
    return lambda: jax.block_until_ready(f(*args))


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
            if ort is not None:
                self._peer(fns, "ort", lambda: ort_forward(self, x, w, b, self.threads))
            if jax is not None:
                self._peer(fns, "jax", lambda: jax_callable(self, x, w, b))
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
            if ort is not None:
                self._peer(fns, "ort", lambda: ort_forward(self, x, w, b, self.threads))
            if jax is not None:
                self._peer(fns, "jax", lambda: jax_callable(self, x, w, b, dy, mean, rstd))
        return fns

    def _peer(self, fns, name, build):
        """Add the callable build() makes for a peer, or note why it has none for this case."""
        if name == "jax" and self.threads is not None:
            made = "JAX sizes its CPU thread pool when it starts: it runs in the main rows only"
        else:
            made = build()
        if isinstance(made, str):
            PEER_NOTES.setdefault((name, f"none: {made}"), []).append(f"{self.label} {self.dtype.name}")
        else:
            fns[name] = made


def make_cases(quick: bool):
    big = 2048 if quick else 16384          # rows of the large layer/RMS norm cases
    bn_rows = 32768 if quick else 262144
    nb = 4 if quick else 32                 # batch of the (N, 64, 64, 64) image cases
    img = (nb, 64, 64, 64)
    ln_big, bn2 = (big, 1024), (bn_rows, 64)
    fwd, ln_bwd, bn_bwd = FORWARD_COPY_TARGET, LAYER_BACKWARD_COPY_TARGET, BATCH_BACKWARD_COPY_TARGET
    cases = [
        Case("layer_norm", "layer_norm", (8, 768), large=False),
        Case("layer_norm", "layer_norm", ln_big, copy_target=fwd),
        Case("rms_norm", "rms_norm", ln_big, copy_target=fwd),
        Case("batch_norm", "batch_norm", bn2, copy_target=fwd),
        Case("batch_norm axis=1", "batch_norm", img, axis=1, copy_target=fwd),
        Case("instance_norm axis=1", "instance_norm", img, axis=1, copy_target=fwd),
        Case("group_norm G=8 axis=1", "group_norm", img, axis=1, groups=8, copy_target=fwd),
        Case("layer_norm_backward", "layer_norm_backward", (8, 768), backward=True, large=False),
        Case("layer_norm_backward", "layer_norm_backward", ln_big, backward=True, copy_target=ln_bwd),
        Case("batch_norm_backward", "batch_norm_backward", bn2, backward=True, copy_target=bn_bwd),
        Case("batch_norm_backward axis=1", "batch_norm_backward", img, axis=1, backward=True,
             copy_target=bn_bwd),
        Case("layer_norm", "layer_norm", ln_big, np.float64, copy_target=fwd),
        Case("layer_norm", "layer_norm", ln_big, np.float16, copy_target=fwd),
    ]
    # Thread sweep: NumPy is single-threaded whatever the setting; its time is in the rows above.
    for threads in (1, 2):
        cases.append(Case(f"threads={threads} layer_norm", "layer_norm", ln_big, threads=threads,
                          copy_target=fwd, with_numpy=False))
        cases.append(Case(f"threads={threads} batch_norm axis=1", "batch_norm", img, axis=1,
                          threads=threads, copy_target=fwd, with_numpy=False))
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


def measure(case, fns, cfg, impls=IMPLS):
    """Interleaved timing of one case: {impl: [seconds per call, one per round]}, numbers, diffs."""
    impls = [i for i in impls if i in fns]
    # Warm-up (first-touch page faults, lazy init, caches), then the agreement check.
    ref = fns["fastnorm"]()
    diffs = {}
    for impl in impls:
        for _ in range(cfg["warmup"]):
            res = fns[impl]()
        if impl not in ("fastnorm", "copy"):
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


def _l3_size():
    """The last-level cache's size as the kernel reports it (e.g. "32768K"), or "?"."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            return f.read().strip()
    except OSError:
        return "?"


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
        "fastnorm_threads": fastnorm.get_num_threads(),
        "onnxruntime": ort.__version__ if ort is not None else None,
        "onnx": onnx.__version__ if onnx is not None else None,
        "jax": jax.__version__ if jax is not None else None,
        "l3": _l3_size(),
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
    fn, fo, npy, cp = (med.get(k) for k in ("fastnorm", "fastnorm out=", "numpy", "copy"))
    r = {"numpy/fastnorm": npy / fn if npy and fn else None}
    for peer in PEERS:
        r[f"{peer}/fastnorm"] = med[peer] / fn if med.get(peer) and fn else None
    # out= exists for the backward functions too (dx); without it the allocating call stands in.
    r["out/copy"] = (fo if fo is not None else fn) / cp if cp else None
    checks = []
    for peer in PEERS:
        v = r[f"{peer}/fastnorm"]
        if v is not None:
            checks.append((f"{peer}/fastnorm", v, f">= {PEER_TARGET:g}", v >= PEER_TARGET, PEER_TARGET / v))
    if case.large and r["numpy/fastnorm"] is not None:
        v = r["numpy/fastnorm"]
        checks.append(("numpy/fastnorm", v, f">= {NUMPY_TARGET:g}", v >= NUMPY_TARGET, NUMPY_TARGET / v))
    if case.large and case.copy_target and r["out/copy"] is not None:
        v = r["out/copy"]
        checks.append(("out/copy", v, f"<= {case.copy_target}", v <= case.copy_target, v / case.copy_target))
    if case.op == "layer_norm" and not case.large:
        checks.append(("fastnorm call", fn, f"< {SMALL_CALL_TARGET_S * 1e6:g} us", fn < SMALL_CALL_TARGET_S,
                       fn / SMALL_CALL_TARGET_S))
    return r, checks


def print_table(rows, info, quick):
    head = ["case", "dtype", "fastnorm", "fn out=", "numpy", *PEERS, "copy",
            "numpy/fn", *(f"{p}/fn" for p in PEERS), "out/copy", "rounds", "noise"]
    lines = []
    for case, med, ratios, checks, rounds, noise in rows:
        ok = {name: good for name, _, _, good, _ in checks}
        small_ok = ok.get("fastnorm call")
        lines.append([
            case.label, case.dtype.name,
            _fmt_t(med.get("fastnorm")) + ("" if small_ok is None or small_ok else " !"),
            _fmt_t(med.get("fastnorm out=")) if "fastnorm out=" in med else "(none)",
            *(_fmt_t(med.get(k)) for k in ("numpy", *PEERS, "copy")),
            *(_fmt_r(ratios[f"{k}/fastnorm"], ok.get(f"{k}/fastnorm")) for k in ("numpy", *PEERS)),
            _fmt_r(ratios["out/copy"], ok.get("out/copy")) + ("" if "fastnorm out=" in med else "*"),
            str(rounds), f"{noise:.0%}",
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    print(f"\nfastnorm {info['fastnorm']} ({info['fastnorm_git'] or 'no git'}) | numpy {info['numpy']} | "
          f"torch {info['torch'] or 'not installed'} (threads {info['torch_threads']}) | "
          f"onnxruntime {info['onnxruntime'] or 'not installed'} | jax {info['jax'] or 'not installed'} | "
          f"python {info['python']}")
    print(f"CPU: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable), L3 {info['l3']} | "
          f"fastnorm threads {info['fastnorm_threads']}{' | --quick' if quick else ''}")
    print("Median time per call; ratios > 1 in numpy/fn and the peers' columns mean fastnorm is faster.\n")
    print(fmt(head))
    print(fmt(["-" * w for w in widths]))
    for l in lines:
        print(fmt(l))
    print("\n! = misses the issue's target: never slower than a peer (torch/fn, ort/fn, jax/fn >= 1) on any\n"
          "    case; numpy/fn >= 8 (large cases); out/copy <= 1.1 (large forward cases), 1.6 (layer norm\n"
          "    backward), 2.3 (batch norm backward); layer_norm 8x768 call < 1.5 us.\n"
          "* = no out= for this call: the allocating call over the copy.\n"
          "threads=N rows: fastnorm.set_num_threads(N), torch.set_num_threads(N) and an ORT session with\n"
          "    N intra-op threads; numpy is single-threaded, not re-run; jax only in the main rows.\n"
          "noise = interquartile range of the fastnorm samples over their median.")
    for (peer, note), labels in PEER_NOTES.items():
        print(f"{peer}: {note}: {', '.join(labels)}")


# ---- Add & Norm: add_layer_norm / add_rms_norm (h = x + residual, y = norm(h)) ---------------------
#
# Their own table: fastnorm (the call as written, allocating y and h), fastnorm out= (into
# preallocated y and h), two calls (np.add, then fastnorm's norm of h, both into preallocated
# arrays: the same work unfused), numpy (x + r, then the NumPy norm above), torch (xt + rt, then
# F.layer_norm / F.rms_norm), ort (ONNX Runtime's fused SkipLayerNormalization /
# SkipSimplifiedLayerNormalization, com.microsoft domain, CPU provider, fastnorm's thread count,
# returning y and the sum, output 3), copy (np.copyto of x and of r: 2 reads and 2 writes, the
# bytes the fused call moves). Targets: ort/fastnorm >= 1.3, out/copy <= 1.2.

ADD_IMPLS = ("fastnorm", "fastnorm out=", "two calls", "numpy", "torch", "ort", "copy")
ADD_ORT_TARGET, ADD_COPY_TARGET = 1.3, 1.2


def _ort_skip_session(rms, D, dtype):
    """An ONNX Runtime session of one Skip(Simplified)LayerNormalization node, or None without onnxruntime."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:  # pragma: no cover - optional
        return None
    elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}.get(dtype)
    if elem is None:
        return None
    names = ["input", "skip", "gamma"] + ([] if rms else ["beta"])
    inputs = [helper.make_tensor_value_info(n, elem, ["N", D] if n in ("input", "skip") else [D]) for n in names]
    outputs = [helper.make_tensor_value_info(n, elem, ["N", D]) for n in ("y", "h")]
    op = "SkipSimplifiedLayerNormalization" if rms else "SkipLayerNormalization"
    node = helper.make_node(op, names, ["y", "", "", "h"], domain="com.microsoft", epsilon=EPS)
    model = helper.make_model(helper.make_graph([node], "add_norm", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = fastnorm.get_num_threads()
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class AddNormCase(Case):
    def build(self, rng):
        rms = self.op == "add_rms_norm"
        x = (rng.standard_normal(self.shape, dtype=np.float32) * 1.5 + 0.25).astype(self.dtype)
        r = rng.standard_normal(self.shape, dtype=np.float32).astype(self.dtype)
        D = self.shape[-1]
        w = (1.0 + 0.1 * rng.standard_normal(D)).astype(self.dtype)
        b = None if rms else (0.1 * rng.standard_normal(D)).astype(self.dtype)
        y, h, a, c = (np.empty_like(x) for _ in range(4))
        fn = getattr(fastnorm, self.op)
        norm = fastnorm.rms_norm if rms else fastnorm.layer_norm

        def two_calls():
            np.add(x, r, out=h)
            return norm(h, w, b, out=y), h

        def numpy_two_steps():
            s = x + r
            return (np_rms_norm(s, w) if rms else np_layer_norm(s, w, b)), s

        fns = {"fastnorm": lambda: fn(x, r, w, b), "fastnorm out=": lambda: fn(x, r, w, b, out=y, residual_out=h),
               "two calls": two_calls, "numpy": numpy_two_steps,
               "copy": lambda: (np.copyto(a, x), np.copyto(c, r))}
        if torch is not None and (not rms or hasattr(F, "rms_norm")):
            xt, rt, wt = torch.from_numpy(x), torch.from_numpy(r), torch.from_numpy(w)
            bt = None if rms else torch.from_numpy(b)

            def torch_two_steps():
                s = xt + rt
                return (F.rms_norm(s, (D,), wt, EPS) if rms else F.layer_norm(s, (D,), wt, bt, EPS)), s
            fns["torch"] = torch_two_steps
        session = _ort_skip_session(rms, D, self.dtype)
        if session is not None:
            feed = {"input": x, "skip": r, "gamma": w, **({} if rms else {"beta": b})}
            fns["ort"] = lambda: tuple(session.run(None, feed))
        return fns


def add_norm_cases(quick):
    big = (2048 if quick else 16384, 1024)
    cases = [AddNormCase(op, op, shape, large=shape == big)
             for op in ("add_layer_norm", "add_rms_norm") for shape in ((8, 768), big)]
    for c in cases:
        c.label = f"{c.name} {'x'.join(map(str, c.shape))}"
    return cases


def run_add_norm(cases, cfg, rng):
    """Time the Add & Norm cases, print their table, return their results (for --json)."""
    rows, results = [], []
    for case in cases:
        print(f"  {case.label} {case.dtype.name} ...", end="", flush=True, file=sys.stderr)
        fns = case.build(rng)
        agree = {impl: _max_diff(fns["fastnorm"](), fns[impl]()) for impl in ("two calls", "numpy", "torch", "ort")
                 if impl in fns}
        gc.collect()
        gc.disable()
        try:
            samples, numbers, _ = measure(case, fns, cfg, ADD_IMPLS)
        finally:
            gc.enable()
        del fns
        med = {k: float(np.median(v)) for k, v in samples.items()}
        # ratios of the paired rounds' samples, then their median
        paired = lambda a, b: float(np.median(np.array(samples[a]) / np.array(samples[b])))  # noqa: E731
        ratios = {"ort/fastnorm": paired("ort", "fastnorm") if "ort" in med else None,
                  "ort/fn out=": paired("ort", "fastnorm out=") if "ort" in med else None,
                  "out/copy": paired("fastnorm out=", "copy"),
                  "two calls/out": paired("two calls", "fastnorm out="),
                  "numpy/fastnorm": paired("numpy", "fastnorm"),
                  "torch/fastnorm": paired("torch", "fastnorm") if "torch" in med else None}
        print(f" {_fmt_t(med['fastnorm'])}", file=sys.stderr)
        rows.append((case, med, ratios, len(samples["fastnorm"])))
        results.append({"label": case.label, "dtype": case.dtype.name, "median_s": med, "samples_s": samples,
                        "number": numbers, "ratios": ratios, "max_rel_diff_vs_fastnorm": agree})
    head = ["case", *ADD_IMPLS, "ort/fn", "ort/out=", "out/copy", "2calls/out", "numpy/fn", "torch/fn", "rounds"]
    lines = []
    for case, med, ratios, rounds in rows:
        ok = {"ort/fastnorm": lambda v: v >= ADD_ORT_TARGET, "ort/fn out=": lambda v: v >= ADD_ORT_TARGET,
              "out/copy": lambda v: v <= ADD_COPY_TARGET or not case.large}
        lines.append([case.label, *(_fmt_t(med.get(i)) for i in ADD_IMPLS),
                      *(_fmt_r(ratios[k], ok[k](ratios[k]) if k in ok and ratios[k] is not None else None)
                        for k in ("ort/fastnorm", "ort/fn out=", "out/copy", "two calls/out", "numpy/fastnorm",
                                  "torch/fastnorm")), str(rounds)])
    widths = [max(len(hd), *(len(l[i]) for l in lines)) for i, hd in enumerate(head)]
    print("\nAdd & Norm (float32): h = x + residual, y = layer/RMS norm of h; median time per call, and the "
          "median over rounds of each round's ratio.\n")
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(head, widths))))
    for l in lines:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths))))
    print(f"\n! = misses a target: ort/fastnorm and ort/out= >= {ADD_ORT_TARGET} (every case); out/copy <= "
          f"{ADD_COPY_TARGET} (large cases; copy = np.copyto of x and of r).")
    for res in results:
        for impl, d in res["max_rel_diff_vs_fastnorm"].items():
            if not d <= 1e-3:
                print(f"WARNING: {res['label']}: {impl} differs from fastnorm by {d:.3g}")
    return results


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
    add_cases = add_norm_cases(args.quick)
    if args.cases:
        pat = re.compile(args.cases, re.IGNORECASE)
        cases = [c for c in cases if pat.search(c.label + " " + c.dtype.name)]
        add_cases = [c for c in add_cases if pat.search(c.label + " " + c.dtype.name)]
        if not cases and not add_cases and not pat.search("layer_norm bfloat16"):
            sys.exit(f"no case matches {args.cases!r}")

    torch_default_threads = torch.get_num_threads() if torch is not None else None
    fastnorm_default_threads = fastnorm.get_num_threads()
    rows, mismatches = [], []
    rng = np.random.default_rng(0)
    for case in cases:
        print(f"  {case.label} {case.dtype.name} ...", end="", flush=True, file=sys.stderr)
        if case.threads is not None:
            if torch is not None:
                torch.set_num_threads(case.threads)
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
            if case.threads is not None:
                fastnorm.set_num_threads(fastnorm_default_threads)
        del fns
        med = {k: float(np.median(v)) for k, v in samples.items()}
        ratios, checks = evaluate(case, med)
        rounds = len(next(iter(samples.values())))
        q1, q3 = np.percentile(samples["fastnorm"], [25, 75])
        noise = float((q3 - q1) / med["fastnorm"])
        rows.append((case, med, ratios, checks, rounds, noise))
        tol = {np.dtype(np.float16): 2e-2, np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-8}[case.dtype]
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
    if add_cases:
        result["add_norm"] = run_add_norm(add_cases, cfg, rng)
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
