"""Calls of every public function on zero-stride arrays of 2**59 to 2**62 elements.

Run as ``python size_cases.py NAME`` by tests/test_sizes.py, one process per public function, so
that a crash fails that test instead of killing the suite. np.broadcast_to gives x (and dy, mask,
weight) in no memory; ``as_strided`` over one element gives a writeable ``out`` of the same shape.
Every scratch buffer a kernel would need for such a shape is larger than any allocation can be (the
sizes overflow 64 bits or exceed the address space), so each call must raise MemoryError or
ValueError. Prints ``START label`` before each call and one JSON line after it.
"""
import json
import sys

import numpy as np
from numpy.lib.stride_tricks import as_strided

import fastnorm as fn

DTYPES = (np.float16, np.float32, np.float64)
# near the powers of two where a count times 2, 4, 8 or 16 bytes wraps around 2**64
COUNTS = (2**59 - 1, 2**59, 2**60 + 3, 2**61 - 1, 2**62 - 1)


class Skip(Exception):
    """The shape is beyond what NumPy can describe for this dtype."""


def fits(dtype, shape):
    """NumPy refuses views whose size times itemsize exceeds the largest intp."""
    return int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize < 2**63


def huge(dtype, shape):
    """A read-only zero-stride array of `shape`: one value, any size."""
    if not fits(dtype, shape):
        raise Skip
    return np.broadcast_to(np.ones((), dtype), shape)


def sink(dtype, shape):
    """A writeable zero-stride array of `shape` over one element: every write lands there."""
    if not fits(dtype, shape):
        raise Skip
    return as_strided(np.zeros(1, dtype), shape=shape, strides=(0,) * len(shape))


def no_mask(shape):
    return np.broadcast_to(np.True_, shape)


def layer_like(fn_name):
    f = getattr(fn, fn_name)

    def cases(dt, n):
        yield "row", lambda: f(huge(dt, (1, n)), out=sink(dt, (1, n)))
        yield "row stats", lambda: f(huge(dt, (1, n)), out=sink(dt, (1, n)), return_stats=True)
        yield "row weight", lambda: f(huge(dt, (1, n)), huge(dt, (n,)), huge(dt, (n,)), out=sink(dt, (1, n)))
        yield "row no out", lambda: f(huge(dt, (1, n)))
        yield "rows", lambda: f(huge(dt, (n, 1)), out=sink(dt, (n, 1)))
        yield "axis 0", lambda: f(huge(dt, (n, 2)), axis=0, out=sink(dt, (n, 2)))
        yield "masked", lambda: f(huge(dt, (2, n)), mask=no_mask((2,)), out=sink(dt, (2, n)))
        yield "tokens masked", lambda: f(huge(dt, (n, 1)), mask=no_mask((n,)), out=sink(dt, (n, 1)))
    return cases


def instance_cases(dt, n):
    f = fn.instance_norm
    yield "plane", lambda: f(huge(dt, (1, 1, n)), axis=1, out=sink(dt, (1, 1, n)))
    yield "plane masked", lambda: f(huge(dt, (1, 1, n)), axis=1, mask=no_mask((1, n)), out=sink(dt, (1, 1, n)))
    yield "channels", lambda: f(huge(dt, (1, n, 1)), axis=1, out=sink(dt, (1, n, 1)))
    yield "samples", lambda: f(huge(dt, (n, 1, 1)), axis=1, out=sink(dt, (n, 1, 1)))


def group_cases(dt, n):
    f = fn.group_norm
    yield "row", lambda: f(huge(dt, (1, n)), 1, out=sink(dt, (1, n)))
    yield "plane", lambda: f(huge(dt, (1, 1, n)), 1, axis=1, out=sink(dt, (1, 1, n)))
    yield "plane masked", lambda: f(huge(dt, (1, 1, n)), 1, axis=1, mask=no_mask((1, n)), out=sink(dt, (1, 1, n)))
    yield "channels", lambda: f(huge(dt, (1, n, 1)), 1, axis=1, out=sink(dt, (1, n, 1)))


def batch_cases(dt, n):
    f = fn.batch_norm

    def running():
        return dict(running_mean=np.zeros(2), running_var=np.ones(2))
    yield "column", lambda: f(huge(dt, (2, n)), axis=0, out=sink(dt, (2, n)))
    yield "column running", lambda: f(huge(dt, (2, n)), axis=0, out=sink(dt, (2, n)), **running())
    yield "column eval", lambda: f(huge(dt, (2, n)), axis=0, training=False, out=sink(dt, (2, n)), **running())
    yield "column masked", lambda: f(huge(dt, (2, n)), axis=0, mask=no_mask((n,)), out=sink(dt, (2, n)))
    yield "planes", lambda: f(huge(dt, (1, 2, n)), axis=1, out=sink(dt, (1, 2, n)))
    yield "features", lambda: f(huge(dt, (1, n)), out=sink(dt, (1, n)))


def layer_backward_like(fn_name, rms):
    f = getattr(fn, fn_name)

    def cases(dt, n):
        stats = (np.ones(1),) if rms else (np.zeros(1), np.ones(1))
        yield "row", lambda: f(huge(dt, (1, n)), huge(dt, (1, n)), *stats, out=sink(dt, (1, n)))
        yield "row weight", lambda: f(huge(dt, (1, n)), huge(dt, (1, n)), *stats, huge(dt, (n,)), out=sink(dt, (1, n)))
        yield "row no out", lambda: f(huge(dt, (1, n)), huge(dt, (1, n)), *stats)
        yield "masked", lambda: f(huge(dt, (1, n)), huge(dt, (1, n)), *stats, mask=no_mask((1,)), out=sink(dt, (1, n)))
        yield "rows", lambda: f(huge(dt, (n, 1)), huge(dt, (n, 1)), *[huge(np.float64, (n,))] * len(stats),
                                out=sink(dt, (n, 1)))
    return cases


def instance_backward_cases(dt, n):
    f = fn.instance_norm_backward
    yield "plane", lambda: f(huge(dt, (1, 1, n)), huge(dt, (1, 1, n)), np.zeros((1, 1)), np.ones((1, 1)), axis=1,
                             out=sink(dt, (1, 1, n)))
    yield "plane masked", lambda: f(huge(dt, (1, 1, n)), huge(dt, (1, 1, n)), np.zeros((1, 1)), np.ones((1, 1)),
                                    axis=1, mask=no_mask((1, n)), out=sink(dt, (1, 1, n)))


def group_backward_cases(dt, n):
    f = fn.group_norm_backward
    yield "row", lambda: f(huge(dt, (1, n)), huge(dt, (1, n)), np.zeros((1, 1)), np.ones((1, 1)), 1,
                           out=sink(dt, (1, n)))
    yield "plane", lambda: f(huge(dt, (1, 1, n)), huge(dt, (1, 1, n)), np.zeros((1, 1)), np.ones((1, 1)), 1, axis=1,
                             out=sink(dt, (1, 1, n)))


def batch_backward_cases(dt, n):
    f = fn.batch_norm_backward
    yield "column", lambda: f(huge(dt, (2, n)), huge(dt, (2, n)), np.zeros(2), np.ones(2), axis=0,
                              out=sink(dt, (2, n)))
    yield "column eval", lambda: f(huge(dt, (2, n)), huge(dt, (2, n)), np.zeros(2), np.ones(2), axis=0,
                                   training=False, out=sink(dt, (2, n)))
    yield "column masked", lambda: f(huge(dt, (2, n)), huge(dt, (2, n)), np.zeros(2), np.ones(2), axis=0,
                                     mask=no_mask((n,)), out=sink(dt, (2, n)))


def layer_class_cases(dt, n):
    yield "LayerNorm", lambda: fn.LayerNorm(n, affine=False)(huge(dt, (1, n)))
    yield "RMSNorm", lambda: fn.RMSNorm(n, affine=False)(huge(dt, (1, n)))
    yield "LayerNorm weight", lambda: fn.LayerNorm(n)
    yield "BatchNorm", lambda: fn.BatchNorm(2, axis=0)(huge(dt, (2, n)))
    yield "BatchNorm eval", lambda: fn.BatchNorm(2, axis=0).eval()(huge(dt, (2, n)))
    yield "InstanceNorm", lambda: fn.InstanceNorm(1, axis=1)(huge(dt, (1, 1, n)))
    yield "GroupNorm", lambda: fn.GroupNorm(1, 1, axis=1)(huge(dt, (1, 1, n)))


def data_cases(dt, n):
    yield "standardize column", lambda: fn.standardize(huge(dt, (2, n)), axis=0, out=sink(dt, (2, n)))
    yield "standardize features", lambda: fn.standardize(huge(dt, (1, n)), axis=-1, out=sink(dt, (1, n)))
    yield "min_max_scale", lambda: fn.min_max_scale(huge(dt, (2, n)), axis=0, out=sink(dt, (2, n)))
    yield "min_max_scale features", lambda: fn.min_max_scale(huge(dt, (1, n)), axis=-1, out=sink(dt, (1, n)))
    yield "weight_norm", lambda: fn.weight_norm(huge(dt, (2, n)), np.ones(2), axis=0)
    yield "weight_norm_backward", lambda: fn.weight_norm_backward(huge(dt, (2, n)), huge(dt, (2, n)), np.ones(2),
                                                                  axis=0)


def mask_cases(dt, n):
    if dt is not np.float64:      # no dtype here: once is enough
        return
    yield "lengths", lambda: fn.mask_from_lengths([n])
    yield "max_len", lambda: fn.mask_from_lengths([1], n)
    yield "many lengths", lambda: fn.mask_from_lengths(np.broadcast_to(np.int64(1), (n,)))


CASES = {
    "layer_norm": layer_like("layer_norm"),
    "rms_norm": layer_like("rms_norm"),
    "instance_norm": instance_cases,
    "group_norm": group_cases,
    "batch_norm": batch_cases,
    "layer_norm_backward": layer_backward_like("layer_norm_backward", rms=False),
    "rms_norm_backward": layer_backward_like("rms_norm_backward", rms=True),
    "instance_norm_backward": instance_backward_cases,
    "group_norm_backward": group_backward_cases,
    "batch_norm_backward": batch_backward_cases,
    "layers": layer_class_cases,
    "data": data_cases,
    "mask_from_lengths": mask_cases,
}


def main(name):
    for dt in DTYPES:
        for n in COUNTS:
            for label, call in CASES[name](dt, n):
                tag = f"{label} {np.dtype(dt).name} n={n}"
                print("START", tag, flush=True)
                try:
                    call()
                    result = {"case": tag, "raised": None}
                except Skip:
                    result = {"case": tag, "skipped": True}
                except Exception as err:             # the parent judges the type and message
                    result = {"case": tag, "raised": type(err).__name__, "message": str(err)}
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
