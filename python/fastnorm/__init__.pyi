# Type stubs for fastnorm's public API (see docs/contract.md).
from collections.abc import Iterable
from typing import Any, Literal, TextIO, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

_Axis = int | tuple[int, ...]
_Stats3 = tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]]
_Grads = tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]]
_Stats5 = tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating], NDArray[np.floating],
                NDArray[np.floating]]

__version__: str
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

@overload
def layer_norm(x: ArrayLike, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *, axis: _Axis = ...,
               eps: float = ..., mask: ArrayLike | None = ..., out: NDArray[np.floating] | None = ...,
               return_stats: Literal[False] = ...) -> NDArray[np.floating]: ...
@overload
def layer_norm(x: ArrayLike, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *, axis: _Axis = ...,
               eps: float = ..., mask: ArrayLike | None = ..., out: NDArray[np.floating] | None = ...,
               return_stats: Literal[True]) -> _Stats3: ...
@overload
def rms_norm(x: ArrayLike, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *, axis: _Axis = ...,
             eps: float = ..., mask: ArrayLike | None = ..., out: NDArray[np.floating] | None = ...,
             return_stats: Literal[False] = ...) -> NDArray[np.floating]: ...
@overload
def rms_norm(x: ArrayLike, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *, axis: _Axis = ...,
             eps: float = ..., mask: ArrayLike | None = ..., out: NDArray[np.floating] | None = ...,
             return_stats: Literal[True]) -> tuple[NDArray[np.floating], NDArray[np.floating]]: ...
@overload
def batch_norm(x: ArrayLike, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *, axis: int = ...,
               running_mean: NDArray[np.floating] | None = ..., running_var: NDArray[np.floating] | None = ...,
               training: bool = ..., momentum: float = ..., eps: float = ..., mask: ArrayLike | None = ...,
               out: NDArray[np.floating] | None = ..., return_stats: Literal[False] = ...) -> NDArray[np.floating]: ...
@overload
def batch_norm(x: ArrayLike, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *, axis: int = ...,
               running_mean: NDArray[np.floating] | None = ..., running_var: NDArray[np.floating] | None = ...,
               training: bool = ..., momentum: float = ..., eps: float = ..., mask: ArrayLike | None = ...,
               out: NDArray[np.floating] | None = ..., return_stats: Literal[True]) -> _Stats3: ...
@overload
def batch_renorm(x: ArrayLike, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *, axis: int = ...,
                 running_mean: NDArray[np.floating], running_var: NDArray[np.floating], r_max: float = ...,
                 d_max: float = ..., training: bool = ..., momentum: float = ..., eps: float = ...,
                 mask: ArrayLike | None = ..., out: NDArray[np.floating] | None = ...,
                 return_stats: Literal[False] = ...) -> NDArray[np.floating]: ...
@overload
def batch_renorm(x: ArrayLike, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *, axis: int = ...,
                 running_mean: NDArray[np.floating], running_var: NDArray[np.floating], r_max: float = ...,
                 d_max: float = ..., training: bool = ..., momentum: float = ..., eps: float = ...,
                 mask: ArrayLike | None = ..., out: NDArray[np.floating] | None = ...,
                 return_stats: Literal[True]) -> _Stats5: ...
@overload
def instance_norm(x: ArrayLike, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *, axis: int = ...,
                  eps: float = ..., mask: ArrayLike | None = ..., out: NDArray[np.floating] | None = ...,
                  return_stats: Literal[False] = ...) -> NDArray[np.floating]: ...
@overload
def instance_norm(x: ArrayLike, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *, axis: int = ...,
                  eps: float = ..., mask: ArrayLike | None = ..., out: NDArray[np.floating] | None = ...,
                  return_stats: Literal[True]) -> _Stats3: ...
@overload
def group_norm(x: ArrayLike, num_groups: int, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *,
               axis: int = ..., eps: float = ..., mask: ArrayLike | None = ...,
               out: NDArray[np.floating] | None = ..., return_stats: Literal[False] = ...) -> NDArray[np.floating]: ...
@overload
def group_norm(x: ArrayLike, num_groups: int, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *,
               axis: int = ..., eps: float = ..., mask: ArrayLike | None = ...,
               out: NDArray[np.floating] | None = ..., return_stats: Literal[True]) -> _Stats3: ...
@overload
def add_layer_norm(x: ArrayLike, residual: ArrayLike, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *,
                   axis: _Axis = ..., eps: float = ..., mask: ArrayLike | None = ...,
                   out: NDArray[np.floating] | None = ..., residual_out: NDArray[np.floating] | None = ...,
                   return_stats: Literal[False] = ...) -> tuple[NDArray[np.floating], NDArray[np.floating]]: ...
@overload
def add_layer_norm(x: ArrayLike, residual: ArrayLike, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *,
                   axis: _Axis = ..., eps: float = ..., mask: ArrayLike | None = ...,
                   out: NDArray[np.floating] | None = ..., residual_out: NDArray[np.floating] | None = ...,
                   return_stats: Literal[True]) -> tuple[NDArray[np.floating], NDArray[np.floating],
                                                         NDArray[np.floating], NDArray[np.floating]]: ...
@overload
def add_rms_norm(x: ArrayLike, residual: ArrayLike, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *,
                 axis: _Axis = ..., eps: float = ..., mask: ArrayLike | None = ...,
                 out: NDArray[np.floating] | None = ..., residual_out: NDArray[np.floating] | None = ...,
                 return_stats: Literal[False] = ...) -> tuple[NDArray[np.floating], NDArray[np.floating]]: ...
@overload
def add_rms_norm(x: ArrayLike, residual: ArrayLike, weight: ArrayLike | None = ..., bias: ArrayLike | None = ..., *,
                 axis: _Axis = ..., eps: float = ..., mask: ArrayLike | None = ...,
                 out: NDArray[np.floating] | None = ..., residual_out: NDArray[np.floating] | None = ...,
                 return_stats: Literal[True]) -> _Stats3: ...
def mask_from_lengths(lengths: ArrayLike, max_len: int | None = ...) -> NDArray[np.bool_]: ...

def layer_norm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, rstd: ArrayLike,
                        weight: ArrayLike | None = ..., *, axis: _Axis = ..., mask: ArrayLike | None = ...,
                        out: NDArray[np.floating] | None = ...) -> _Grads: ...
def rms_norm_backward(dy: ArrayLike, x: ArrayLike, rstd: ArrayLike, weight: ArrayLike | None = ..., *,
                      axis: _Axis = ..., mask: ArrayLike | None = ..., out: NDArray[np.floating] | None = ...) -> _Grads: ...
def batch_norm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, rstd: ArrayLike,
                        weight: ArrayLike | None = ..., *, axis: int = ..., training: bool = ...,
                        mask: ArrayLike | None = ..., out: NDArray[np.floating] | None = ...) -> _Grads: ...
def batch_renorm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, rstd: ArrayLike, r: ArrayLike, d: ArrayLike,
                          weight: ArrayLike | None = ..., *, axis: int = ..., training: bool = ...,
                          mask: ArrayLike | None = ..., out: NDArray[np.floating] | None = ...) -> _Grads: ...
def instance_norm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, rstd: ArrayLike,
                           weight: ArrayLike | None = ..., *, axis: int = ..., mask: ArrayLike | None = ..., out: NDArray[np.floating] | None = ...) -> _Grads: ...
def group_norm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, rstd: ArrayLike, num_groups: int,
                        weight: ArrayLike | None = ..., *, axis: int = ..., mask: ArrayLike | None = ..., out: NDArray[np.floating] | None = ...) -> _Grads: ...

class _Norm:
    eps: float
    training: bool
    weight: NDArray[np.floating] | None
    bias: NDArray[np.floating] | None
    dweight: NDArray[np.floating] | None
    dbias: NDArray[np.floating] | None
    def train(self, mode: bool = ...) -> _Norm: ...
    def eval(self) -> _Norm: ...
    def parameters(self) -> list[tuple[NDArray[np.floating], NDArray[np.floating] | None]]: ...
    def __call__(self, x: ArrayLike, mask: ArrayLike | None = ...) -> NDArray[np.floating]: ...
    def backward(self, dy: ArrayLike) -> NDArray[np.floating]: ...

class LayerNorm(_Norm):
    normalized_shape: tuple[int, ...]
    axis: _Axis
    def __init__(self, normalized_shape: int | tuple[int, ...], *, axis: _Axis = ..., eps: float = ...,
                 affine: bool = ..., dtype: type | np.dtype = ...) -> None: ...
class RMSNorm(LayerNorm): ...
class BatchNorm(_Norm):
    axis: int
    momentum: float | None
    track_running_stats: bool
    running_mean: NDArray[np.floating] | None
    running_var: NDArray[np.floating] | None
    num_batches_tracked: int
    def __init__(self, num_features: int, *, axis: int = ..., eps: float = ..., momentum: float | None = ...,
                 affine: bool = ..., track_running_stats: bool = ..., dtype: type | np.dtype = ...) -> None: ...
    def calibrate(self, batches: Iterable[ArrayLike | tuple[ArrayLike, ArrayLike | None]]) -> BatchNorm: ...
class BatchRenorm(BatchNorm):
    r_max: float
    d_max: float
    def __init__(self, num_features: int, *, axis: int = ..., eps: float = ..., momentum: float | None = ...,
                 r_max: float = ..., d_max: float = ..., affine: bool = ..., dtype: type | np.dtype = ...) -> None: ...
class InstanceNorm(_Norm):
    axis: int
    def __init__(self, num_features: int, *, axis: int = ..., eps: float = ..., affine: bool = ...,
                 dtype: type | np.dtype = ...) -> None: ...
class GroupNorm(_Norm):
    num_groups: int
    axis: int
    def __init__(self, num_groups: int, num_channels: int, *, axis: int = ..., eps: float = ..., affine: bool = ...,
                 dtype: type | np.dtype = ...) -> None: ...

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def set_output_cache(max_bytes: int) -> None: ...
def get_output_cache() -> int: ...

def standardize(x: ArrayLike, axis: int = ..., *, stats: Moments | None = ..., eps: float = ...,
                out: NDArray[np.floating] | None = ...) -> NDArray[np.floating]: ...
def min_max_scale(x: ArrayLike, axis: int = ..., *, stats: Moments | None = ...,
                  feature_range: tuple[float, float] = ...,
                  out: NDArray[np.floating] | None = ...) -> NDArray[np.floating]: ...

class Moments:
    count: NDArray[np.float64]
    mean: NDArray[np.float64]
    m2: NDArray[np.float64]
    min: NDArray[np.float64]
    max: NDArray[np.float64]
    def __init__(self, num_features: int) -> None: ...
    @property
    def num_features(self) -> int: ...
    def var(self, ddof: float = ...) -> NDArray[np.float64]: ...
    def std(self, ddof: float = ...) -> NDArray[np.float64]: ...
    @staticmethod
    def merge(*parts: Moments) -> Moments: ...
    def __add__(self, other: Moments) -> Moments: ...
    def update(self, x: ArrayLike, *, axis: int = ..., mask: ArrayLike | None = ...) -> Moments: ...

def moments(x: ArrayLike, axis: int = ..., *, mask: ArrayLike | None = ...) -> Moments: ...
def weight_norm(v: ArrayLike, g: ArrayLike, *, axis: int = ...) -> NDArray[np.floating]: ...
def weight_norm_backward(dw: ArrayLike, v: ArrayLike, g: ArrayLike, *,
                         axis: int = ...) -> tuple[NDArray[np.floating], NDArray[np.floating]]: ...

@overload
def show_config(mode: Literal["stdout"] = ...) -> None: ...
@overload
def show_config(mode: Literal["dicts"]) -> dict[str, Any]: ...
def bench(quick: bool = ..., *, file: TextIO | None = ..., progress: bool | None = ...) -> list[dict[str, Any]]: ...
