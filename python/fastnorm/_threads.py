"""How many threads a large call may use: ``set_num_threads`` / ``FASTNORM_NUM_THREADS``.

The count lives here, in Python, and is passed to every kernel call; the C side keeps no state.
Threads are created per call for large inputs only and never outlive it, so a ``fork`` in the middle
of use leaves a working child, and there is no second OpenMP runtime beside PyTorch's.
"""
from __future__ import annotations

import os
import warnings


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def int_from_environment(name: str, minimum: int, default: int, what: str) -> int:
    """The int >= minimum in environment variable `name`; `default` (with a RuntimeWarning naming
    the variable and `what` it should be, when it is set to anything else) otherwise."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        n = int(value)
        if n < minimum:
            raise ValueError
    except ValueError:
        warnings.warn(f"{name}={value!r} is not {what}; using {default}", RuntimeWarning, stacklevel=3)
        return default
    return n


def _from_environment() -> int:
    return int_from_environment("FASTNORM_NUM_THREADS", 1, _available_cores(), "a positive int")


num_threads = _from_environment()


def set_num_threads(n: int) -> None:
    """Use at most ``n`` threads per call (large inputs only); ``n >= 1``.

    The default is ``FASTNORM_NUM_THREADS`` if set, else the number of cores this process may use.
    """
    global num_threads
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads: n must be an int >= 1; got {n!r}")
    num_threads = n


def get_num_threads() -> int:
    """The most threads one call may use."""
    return num_threads
