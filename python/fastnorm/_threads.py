"""How many threads a large call may use: ``set_num_threads`` / ``FASTNORM_NUM_THREADS``.

The count lives here, in Python, and is passed to every kernel call; the C side keeps no state.
Threads are created per call for large inputs only and never outlive it, so a ``fork`` in the middle
of use leaves a working child, and there is no second OpenMP runtime beside PyTorch's.
"""
from __future__ import annotations

import os
import warnings

from ._checks import whole_number


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# The most threads one call may use. The kernels create their threads per call (at most one per
# 2**16 elements of work), and the C fast path of layer/RMS norm takes counts up to this too.
MAX_THREADS = 4096


def int_from_environment(name: str, minimum: int, default: int, what: str, maximum: int | None = None) -> int:
    """The int in [minimum, maximum] in environment variable `name`; `default` (with a
    RuntimeWarning naming the variable and `what` it should be, when it is set to anything else)
    otherwise."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        n = int(value)
        if n < minimum or (maximum is not None and n > maximum):
            raise ValueError
    except ValueError:
        warnings.warn(f"{name}={value!r} is not {what}; using {default}", RuntimeWarning, stacklevel=3)
        return default
    return n


def _from_environment() -> int:
    return int_from_environment("FASTNORM_NUM_THREADS", 1, min(_available_cores(), MAX_THREADS),
                                f"an int in [1, {MAX_THREADS}]", MAX_THREADS)


num_threads = _from_environment()


def set_num_threads(n: int) -> None:
    """Use at most ``n`` threads per call (large inputs only); ``1 <= n <= 4096``.

    ``n`` is a Python or NumPy int. The default is ``FASTNORM_NUM_THREADS`` if set, else the number
    of cores this process may use.
    """
    global num_threads
    num_threads = whole_number(n, "n", "set_num_threads", 1, MAX_THREADS)


def get_num_threads() -> int:
    """The most threads one call may use."""
    return num_threads
