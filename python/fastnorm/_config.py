"""``fastnorm.show_config()``: what this installation is and what it will do on this machine."""
from __future__ import annotations

import os
import platform
import sys
from typing import Any

import numpy as np

from . import _core, _memory, _threads

DISTRIBUTION = "fastnorm-numpy"


def installed_version() -> str:
    """The version of the installed distribution, or ``"0+unknown"`` when running from a tree that
    was never installed (no metadata to read)."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def config() -> dict[str, Any]:
    """Everything ``show_config`` prints, as nested dicts."""
    from . import _threadpool

    dispatch = _core.cpu_dispatch()
    return {
        "fastnorm": {"version": installed_version(), "distribution": DISTRIBUTION,
                     "location": os.path.dirname(os.path.abspath(__file__))},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "platform": sys.platform, "machine": platform.machine()},
        "numpy": {"version": np.__version__},
        "cpu": {"features": dispatch["features"], "multiversioned": dispatch["multiversioned"],
                "vector_loops": dispatch["vector_loops"], "float16_conversion": dispatch["float16_conversion"]},
        "threads": {"num_threads": _threads.get_num_threads(), "available_cores": _threads._available_cores(),
                    "FASTNORM_NUM_THREADS": os.environ.get("FASTNORM_NUM_THREADS"),
                    "threadpoolctl": _threadpool.status()},
        "output_cache": {"max_bytes": _memory.get_output_cache(), "kept_bytes": _core.kept_output_bytes(),
                         "FASTNORM_OUTPUT_CACHE": os.environ.get("FASTNORM_OUTPUT_CACHE")},
    }


def _lines(tree: dict[str, Any], indent: int = 0) -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.append(" " * indent + f"{key}:")
            out += _lines(value, indent + 2)
        else:
            out.append(" " * indent + f"{key}: {'-' if value is None or value == {} else value}")
    return out


def show_config(mode: str = "stdout") -> dict[str, Any] | None:
    """Print (or return) this installation's configuration, like ``numpy.show_config()``.

    Parameters
    ----------
    mode : {"stdout", "dicts"}, optional
        ``"stdout"`` (default) prints a readable listing; ``"dicts"`` returns it as nested dicts
        instead.

    Returns
    -------
    dict or None
        With ``mode="dicts"``: ``"fastnorm"`` (version, distribution name, location),
        ``"python"``, ``"numpy"`` (version), ``"cpu"`` (the CPU features the kernels look at,
        ``vector_loops``: the clone of the hot loops picked at load time, ``avx512f``, ``avx2``
        or ``default``; ``float16_conversion``: ``avx512f``, ``f16c`` or ``scalar``),
        ``"threads"`` (``num_threads`` as :func:`get_num_threads` gives it, the cores this
        process may use, ``FASTNORM_NUM_THREADS``, and whether threadpoolctl sees fastnorm) and
        ``"output_cache"`` (``max_bytes`` as :func:`get_output_cache` gives it, ``kept_bytes``
        held right now, ``FASTNORM_OUTPUT_CACHE``).

    Examples
    --------
    >>> import fastnorm
    >>> fastnorm.show_config("dicts")["threads"]["num_threads"] == fastnorm.get_num_threads()
    True
    """
    if mode not in ("stdout", "dicts"):
        raise ValueError(f"show_config: mode must be 'stdout' or 'dicts'; got {mode!r}")
    info = config()
    if mode == "dicts":
        return info
    print("\n".join(_lines(info)))
    return None
