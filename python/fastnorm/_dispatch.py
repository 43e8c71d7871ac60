"""Sending dask arrays to fastnorm._dask without importing dask.

A dask array can only exist once ``dask.array`` has been imported, so ``sys.modules`` tells
whether to look at all: ``import fastnorm`` never imports dask, and calls on NumPy input pay one
type comparison. Most functions take the check from the ``dask_aware`` decorator; the gradients
of layer and RMS norm, whose common call goes straight to C, call ``is_dask`` themselves after
that C entry has declined, so the common call pays no wrapper frame.
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


def dask_function(name: str):
    """fastnorm._dask's function ``name`` (importing dask on first use)."""
    from . import _dask
    return getattr(_dask, name)


def dask_aware(f):
    """f, except that a dask array as first argument goes to the function of the same name in
    fastnorm._dask, which returns a dask array (lazily) instead of computing x into memory."""
    name = f.__name__

    @functools.wraps(f)
    def call(x, *args, **kwargs):
        if type(x) is not np.ndarray and is_dask(x):
            return dask_function(name)(x, *args, **kwargs)
        return f(x, *args, **kwargs)
    return call
