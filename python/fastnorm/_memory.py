"""Reuse of large output memory: ``set_output_cache`` / ``FASTNORM_OUTPUT_CACHE``.

Memory new from the operating system is zero-filled on first touch, which costs a large call
about as much as the normalization itself. So fastnorm keeps the most recently freed of its own
outputs (two blocks of 1 MiB or more, up to the limit in all, 256 MiB by default: the two outputs
of ``add_layer_norm``) and gives one to the next output that fits: a loop that drops each step's
results then pays for the zeroing once. A block is held until a call reuses it or replaces it, an
output of 1 MiB or more that fits neither kept block releases both, or ``set_output_cache(0)``;
arrays passed as ``out=`` are never touched by this. The state lives in ``fastnorm._core`` (two
atomically swapped pointers).
"""
from __future__ import annotations

import sys

from . import _core
from ._checks import whole_number
from ._threads import int_from_environment

DEFAULT_LIMIT = 256 * 2**20


_limit = int_from_environment("FASTNORM_OUTPUT_CACHE", 0, DEFAULT_LIMIT, "an int >= 0 (bytes)")
_core.keep_output_memory(min(_limit, sys.maxsize))


def set_output_cache(max_bytes: int) -> None:
    """Keep up to two freed outputs, ``max_bytes`` bytes in all, for reuse; ``0`` keeps none.

    The default is ``FASTNORM_OUTPUT_CACHE`` if set, else 256 MiB. Lowering the limit releases
    kept blocks above it at once, the oldest first.
    """
    global _limit
    max_bytes = whole_number(max_bytes, "max_bytes", "set_output_cache", 0)
    _core.keep_output_memory(min(max_bytes, sys.maxsize))    # no block is larger anyway
    _limit = max_bytes


def get_output_cache() -> int:
    """The bytes of freed outputs, in all, that fastnorm keeps for reuse (0: none)."""
    return _limit
