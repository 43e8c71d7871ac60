"""Sending dask arrays to fastnorm._dask without importing dask.

A dask array can only exist once ``dask.array`` has been imported, so ``sys.modules`` tells
whether to look at all: ``import fastnorm`` never imports dask, and calls on NumPy input pay one
type comparison.
"""
from __future__ import annotations

import functools
import sys

import numpy as np


def is_dask(x) -> bool:
    """True for a ``dask.array.Array`` (dask is not imported to find out)."""
    if type(x) is np.ndarray:
        return False
    module = sys.modules.get("dask.array")
    return module is not None and isinstance(x, module.Array)


def dask_aware(f):
    """f, except that a dask array as first argument goes to the function of the same name in
    fastnorm._dask, which returns a dask array (lazily) instead of computing x into memory."""
    name = f.__name__

    @functools.wraps(f)
    def call(x, *args, **kwargs):
        if type(x) is not np.ndarray and is_dask(x):
            from . import _dask
            return getattr(_dask, name)(x, *args, **kwargs)
        return f(x, *args, **kwargs)
    return call
