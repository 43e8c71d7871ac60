"""fastnorm: layer, RMS, batch, instance and group normalization of NumPy arrays, in C.

Every function takes ``axis``, the feature axis that carries ``weight`` and ``bias``; they differ
only in which axes the statistics are taken over (see the contract in the README).
"""
from ._functional import (
    batch_norm,
    batch_norm_backward,
    batch_renorm,
    batch_renorm_backward,
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
    layer_norm,
    layer_norm_backward,
    mask_from_lengths,
    rms_norm,
    rms_norm_backward,
)
from ._threads import get_num_threads, set_num_threads
from ._memory import get_output_cache, set_output_cache
from .layers import BatchNorm, BatchRenorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from ._data import min_max_scale, standardize, weight_norm, weight_norm_backward
from ._moments import Moments, moments
from ._config import show_config
from ._bench import bench
from ._add_norm import add_layer_norm, add_rms_norm
from . import _threadpool

_threadpool.install()                 # threadpoolctl sees fastnorm's threads, once it is imported


def __getattr__(name: str) -> str:
    """``__version__``, read from the installed distribution's metadata (fastnorm-numpy) on first
    use: importlib.metadata takes longer to import than the rest of fastnorm."""
    if name == "__version__":
        from ._config import installed_version

        globals()["__version__"] = version = installed_version()
        return version
    raise AttributeError(f"module 'fastnorm' has no attribute {name!r}")

__all__ = [
    "layer_norm", "rms_norm", "batch_norm", "instance_norm", "group_norm", "mask_from_lengths",
    "layer_norm_backward", "rms_norm_backward", "batch_norm_backward", "instance_norm_backward",
    "group_norm_backward",
    "batch_renorm", "batch_renorm_backward", "BatchRenorm",
    "LayerNorm", "RMSNorm", "BatchNorm", "InstanceNorm", "GroupNorm",
    "standardize", "min_max_scale", "weight_norm", "weight_norm_backward",
    "Moments", "moments",
    "show_config", "bench",
    "add_layer_norm", "add_rms_norm",
]
