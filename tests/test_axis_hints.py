"""The channels-first trap: errors that name the axis the caller probably meant, and layer reprs.

fastnorm's default feature axis is the last one; PyTorch's images are (N, C, H, W). When a
weight, a running statistic or a layer's size does not match axis -1 but matches another
non-batch axis, the message says which ``axis=`` would fit. A call with nothing to compare
(``batch_norm(x_nchw)`` without weight) is not an error and gives no warning: it is batch norm over
the last axis, which is also what an (N, H, W, C) or (N, L, D) caller wants.
"""

import numpy as np
import pytest

import fastnorm

X = np.random.default_rng(0).standard_normal((2, 3, 4, 5))      # (N, C, H, W) with C = 3, W = 5


def message(call):
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("call, fn", [
    (lambda: fastnorm.batch_norm(X, np.ones(3)), "batch_norm: weight has shape (3,); expected (5,)"),
    (lambda: fastnorm.batch_norm(X, None, np.zeros(3)), "batch_norm: bias has shape (3,); expected (5,)"),
    (lambda: fastnorm.batch_norm(X, running_mean=np.zeros(3), running_var=np.ones(3)),
     "batch_norm: running_mean has shape (3,); expected (5,)"),
    (lambda: fastnorm.group_norm(X, 1, np.ones(3)), "group_norm: weight has shape (3,); expected (5,)"),
    (lambda: fastnorm.instance_norm(X, np.ones(3)), "instance_norm: weight has shape (3,); expected (5,)"),
    (lambda: fastnorm.batch_norm_backward(X, X, np.zeros(5), np.ones(5), np.ones(3)),
     "batch_norm_backward: weight has shape (3,); expected (5,)"),
])
def test_function_messages_suggest_axis_1(call, fn):
    text = message(call)
    assert text.startswith(fn)
    assert "x.shape[1] == 3: did you mean axis=1 (channels first, as PyTorch's (N, C, H, W))?" in text


def test_suggestion_is_a_working_call():
    y = fastnorm.batch_norm(X, np.ones(3), np.zeros(3), axis=1, eps=0.0)
    ref = (X - X.mean(axis=(0, 2, 3), keepdims=True)) / X.std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12)


def test_every_fitting_axis_is_named_and_the_batch_axis_never():
    x = np.zeros((4, 4, 6, 4))                     # axes 1 and 3 have 4 entries, so does the batch axis 0
    text = message(lambda: fastnorm.batch_norm(x, np.ones(4), axis=2))
    assert "x.shape[1] == 4, x.shape[3] == 4: did you mean axis=1 or axis=3" in text
    assert "axis=0" not in text


def test_no_suggestion_when_nothing_fits():
    text = message(lambda: fastnorm.batch_norm(X, np.ones(7)))
    assert text == "batch_norm: weight has shape (7,); expected (5,) (x.shape along the feature axis 3)"
    text = message(lambda: fastnorm.layer_norm(np.zeros((3, 5)), np.ones(3)))      # only the batch axis fits
    assert "did you mean" not in text


def test_no_warning_without_a_weight(recwarn):
    """batch_norm(x_nchw) has nothing that contradicts axis=-1: it normalizes per last-axis feature."""
    y = fastnorm.batch_norm(X, eps=0.0)
    ref = (X - X.mean(axis=(0, 1, 2))) / X.std(axis=(0, 1, 2))
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12)
    assert len(recwarn) == 0


@pytest.mark.parametrize("layer, name", [
    (fastnorm.BatchNorm(3), "BatchNorm(3, axis=1)"),
    (fastnorm.BatchNorm(3, affine=False, track_running_stats=False), "BatchNorm(3, axis=1)"),
    (fastnorm.InstanceNorm(3), "InstanceNorm(3, axis=1)"),
    (fastnorm.GroupNorm(1, 3), "GroupNorm(1, 3, axis=1)"),
    (fastnorm.LayerNorm(3, affine=False), "LayerNorm(3, axis=1)"),
])
def test_layer_on_nchw_suggests_axis_1(layer, name):
    """Also for layers without weight, where the functions would silently use the last axis."""
    text = message(lambda: layer(X))
    assert text.startswith(f"{type(layer).__name__}: x has shape (2, 3, 4, 5), 5 along axis=-1; "
                           "the layer was built for 3")
    assert text.endswith(f"x.shape[1] == 3: for channels-first input such as PyTorch's (N, C, H, W) use {name}")


def test_layer_suggestion_works():
    bn = fastnorm.BatchNorm(3, axis=1)
    y = bn(X)
    ref = (X - X.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(X.var(axis=(0, 2, 3), keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(bn.running_mean, 0.1 * X.mean(axis=(0, 2, 3)), rtol=0, atol=1e-15)


def test_layer_without_fitting_axis():
    text = message(lambda: fastnorm.BatchNorm(7)(X))
    assert text == "BatchNorm: x has shape (2, 3, 4, 5), 5 along axis=-1; the layer was built for 7"


@pytest.mark.parametrize("layer, text", [
    (fastnorm.BatchNorm(64), "BatchNorm(64, eps=1e-05, momentum=0.1, axis=-1, training=True)"),
    (fastnorm.BatchNorm(3, axis=1, eps=1e-3, momentum=0.01).eval(),
     "BatchNorm(3, eps=0.001, momentum=0.01, axis=1, training=False)"),
    (fastnorm.BatchNorm(8, affine=False, track_running_stats=False),
     "BatchNorm(8, eps=1e-05, momentum=0.1, track_running_stats=False, axis=-1, affine=False, training=True)"),
    (fastnorm.LayerNorm(64), "LayerNorm(64, eps=1e-05, axis=-1)"),
    (fastnorm.LayerNorm((4, 5)), "LayerNorm((4, 5), eps=1e-05, axis=(-2, -1))"),
    (fastnorm.RMSNorm(16, eps=1e-6, affine=False), "RMSNorm(16, eps=1e-06, axis=-1, affine=False)"),
    (fastnorm.GroupNorm(8, 32, axis=1), "GroupNorm(8, 32, eps=1e-05, axis=1)"),
    (fastnorm.InstanceNorm(3, axis=1), "InstanceNorm(3, eps=1e-05, axis=1)"),
    (fastnorm.InstanceNorm(3, affine=True), "InstanceNorm(3, eps=1e-05, axis=-1, affine=True)"),
])
def test_layer_repr(layer, text):
    assert repr(layer) == text
    assert str(layer) == text
