"""Layer classes against the functional API, step by step (the training example: test_train_mlp.py)."""
import numpy as np
import pytest

import fastnorm


def _sgd(params, grads, lr):
    for p, g in zip(params, grads):
        p -= lr * g


def test_batchnorm_layer_steps_equal_functional_calls():
    rng = np.random.default_rng(0)
    layer = fastnorm.BatchNorm(5, momentum=0.2)
    w, b = np.ones(5), np.zeros(5)
    rm, rv = np.zeros(5), np.ones(5)
    for step in range(4):
        x = rng.standard_normal((16, 5)) * (step + 1) + step
        dy = rng.standard_normal((16, 5))
        y_layer = layer(x)
        dx_layer = layer.backward(dy)
        y, mean, rstd = fastnorm.batch_norm(x, w, b, running_mean=rm, running_var=rv, momentum=0.2,
                                            return_stats=True)
        dx, dw, db = fastnorm.batch_norm_backward(dy, x, mean, rstd, w)
        np.testing.assert_array_equal(y_layer, y)
        np.testing.assert_array_equal(dx_layer, dx)
        np.testing.assert_array_equal(layer.dweight, dw)
        np.testing.assert_array_equal(layer.running_mean, rm)
        np.testing.assert_array_equal(layer.running_var, rv)
        # the running statistics follow PyTorch's rule, checked against plain NumPy
        _sgd([layer.weight, layer.bias], [layer.dweight, layer.dbias], 0.1)
        _sgd([w, b], [dw, db], 0.1)
    expected_rm, expected_rv = np.zeros(5), np.ones(5)
    rng = np.random.default_rng(0)
    for step in range(4):
        x = rng.standard_normal((16, 5)) * (step + 1) + step
        rng.standard_normal((16, 5))
        expected_rm = 0.8 * expected_rm + 0.2 * x.mean(0)
        expected_rv = 0.8 * expected_rv + 0.2 * x.var(0, ddof=1)
    np.testing.assert_allclose(layer.running_mean, expected_rm, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, expected_rv, rtol=1e-12)

    layer.eval()
    x = rng.standard_normal((3, 5))
    expected = (x - expected_rm) / np.sqrt(expected_rv + 1e-5) * layer.weight + layer.bias
    np.testing.assert_allclose(layer(x), expected, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal((3, 5))
    np.testing.assert_allclose(layer.backward(dy), dy * layer.weight / np.sqrt(expected_rv + 1e-5), rtol=1e-12)


@pytest.mark.parametrize("rms", [False, True])
def test_layer_and_rms_classes_equal_functional_calls(rms):
    rng = np.random.default_rng(1)
    layer = fastnorm.RMSNorm((3, 4)) if rms else fastnorm.LayerNorm((3, 4))
    layer.weight[:] = rng.standard_normal((3, 4))
    x = rng.standard_normal((5, 3, 4)) + 2.0
    mask = np.array([True, True, False, True, True])
    w, b, axes = layer.weight.copy(), layer.bias.copy(), (-2, -1)
    dy = rng.standard_normal(x.shape)
    if rms:
        y, rstd = fastnorm.rms_norm(x, w, b, axis=axes, mask=mask, return_stats=True)
        dx, dw, db = fastnorm.rms_norm_backward(dy, x, rstd, w, axis=axes, mask=mask)
    else:
        y, mean, rstd = fastnorm.layer_norm(x, w, b, axis=axes, mask=mask, return_stats=True)
        dx, dw, db = fastnorm.layer_norm_backward(dy, x, mean, rstd, w, axis=axes, mask=mask)
    np.testing.assert_array_equal(layer(x, mask=mask), y)
    np.testing.assert_array_equal(layer.backward(dy), dx)
    np.testing.assert_array_equal(layer.dweight, dw)
    np.testing.assert_array_equal(layer.dbias, db)
    # independent check: dbias is dy summed over the real positions
    np.testing.assert_allclose(layer.dbias, dy[mask].sum(0), rtol=1e-12)


@pytest.mark.parametrize("layer, fn, extra", [
    (lambda: fastnorm.GroupNorm(2, 4, axis=1), fastnorm.group_norm, (2,)),
    (lambda: fastnorm.InstanceNorm(4, axis=1, affine=True), fastnorm.instance_norm, ()),
])
def test_group_and_instance_layers(layer, fn, extra):
    rng = np.random.default_rng(2)
    lay = layer()
    lay.weight[:] = [1.0, 2.0, 0.5, -1.0]
    lay.bias[:] = [0.0, 1.0, 2.0, 3.0]
    x = rng.standard_normal((3, 4, 5))
    y, mean, rstd = fn(x, *extra, lay.weight, lay.bias, axis=1, return_stats=True)
    np.testing.assert_array_equal(lay(x), y)
    dy = rng.standard_normal(x.shape)
    backward = fastnorm.group_norm_backward if fn is fastnorm.group_norm else fastnorm.instance_norm_backward
    dx, dw, db = backward(dy, x, mean, rstd, *extra, lay.weight, axis=1)
    np.testing.assert_array_equal(lay.backward(dy), dx)
    np.testing.assert_allclose(lay.dbias, dy.sum(axis=(0, 2)), rtol=1e-12)
    xhat = (x - mean[..., None].repeat(4 // len(mean[0]), axis=1)) * rstd[..., None].repeat(4 // len(rstd[0]), axis=1)
    np.testing.assert_allclose(lay.dweight, (dy * xhat).sum(axis=(0, 2)), rtol=1e-10)


def test_layer_norm_train_loop_reduces_a_regression_loss():
    """Fit y = target through a LayerNorm's affine parameters by SGD: loss falls below 1e-3."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 6)) * 5 + 10
    mean, std = x.mean(1, keepdims=True), x.std(1, keepdims=True)
    target = (x - mean) / np.sqrt(std**2 + 1e-5) * np.linspace(0.5, 2, 6) + np.linspace(-1, 1, 6)
    ln = fastnorm.LayerNorm(6)
    for _ in range(300):
        y = ln(x)
        ln.backward(2 * (y - target) / y.size)
        ln.weight -= 0.5 * ln.dweight
        ln.bias -= 0.5 * ln.dbias
    assert np.mean((ln(x) - target) ** 2) < 1e-3
    np.testing.assert_allclose(ln.weight, np.linspace(0.5, 2, 6), atol=0.02)


def test_backward_before_forward_is_a_clear_error():
    with pytest.raises(RuntimeError, match="call the layer"):
        fastnorm.LayerNorm(3).backward(np.ones((2, 3)))


@pytest.mark.parametrize("name", ["layer", "rms", "batch", "instance", "group"])
@pytest.mark.parametrize("where", ["fresh", "dy itself", "reversed view of dy", "x itself"])
def test_backward_out_gives_the_allocating_result(name, where):
    """out= for dx (an addition to the contract): any target, even one aliasing dy or x, gives the
    same dx as the allocating call, and dweight/dbias are unchanged by it."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 6, 8)).astype(np.float32) + 3
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal(6 if name in ("batch", "instance", "group") else 8).astype(np.float32)
    axis = 1 if name in ("batch", "instance", "group") else -1
    if name == "layer":
        y, mean, rstd = fastnorm.layer_norm(x, w, return_stats=True)
        call = lambda dy_, x_, out: fastnorm.layer_norm_backward(dy_, x_, mean, rstd, w, out=out)
    elif name == "rms":
        y, rstd = fastnorm.rms_norm(x, w, return_stats=True)
        call = lambda dy_, x_, out: fastnorm.rms_norm_backward(dy_, x_, rstd, w, out=out)
    elif name == "batch":
        y, mean, rstd = fastnorm.batch_norm(x, w, axis=1, return_stats=True)
        call = lambda dy_, x_, out: fastnorm.batch_norm_backward(dy_, x_, mean, rstd, w, axis=1, out=out)
    elif name == "instance":
        y, mean, rstd = fastnorm.instance_norm(x, w, axis=1, return_stats=True)
        call = lambda dy_, x_, out: fastnorm.instance_norm_backward(dy_, x_, mean, rstd, w, axis=1, out=out)
    else:
        y, mean, rstd = fastnorm.group_norm(x, 3, w, axis=1, return_stats=True)
        call = lambda dy_, x_, out: fastnorm.group_norm_backward(dy_, x_, mean, rstd, 3, w, axis=1, out=out)
    expected = call(dy, x, None)
    dy2, x2 = dy.copy(), x.copy()
    out = {"fresh": np.empty_like(x), "dy itself": dy2, "x itself": x2}.get(where)
    if where == "reversed view of dy":
        backing = dy2[::-1].copy()
        dy2 = backing[::-1]                  # dy2 reads the same values through negative strides
        out = backing                        # out overlaps dy2 in another layout
    dx, dw, db = call(dy2, x2, out)
    assert dx is out
    np.testing.assert_array_equal(dx, expected[0])
    np.testing.assert_array_equal(dw, expected[1])
    np.testing.assert_array_equal(db, expected[2])


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "batch_norm", "instance_norm", "group_norm"])
def test_float32_layers_keep_gradients_accurate_at_a_large_mean_offset(name):
    """The layers keep float64 statistics for backward (the functions return float32 ones for float32
    x, which would lose |mean| * rstd * 2**-24 of xhat): float32 data with mean 1e4 and std 1e-2
    gets gradients within float32 accuracy of the float64 closed form."""
    import grad_reference as gref

    rng = np.random.default_rng(7)
    x = (1e4 + 1e-2 * rng.standard_normal((16, 8, 32))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    kw, layer = {}, None
    if name == "layer_norm":
        layer = fastnorm.LayerNorm(32, dtype=np.float32)
    elif name == "rms_norm":
        layer = fastnorm.RMSNorm(32, dtype=np.float32)
    elif name == "batch_norm":
        layer, kw = fastnorm.BatchNorm(8, axis=1, dtype=np.float32), {"axis": 1}
    elif name == "instance_norm":
        layer, kw = fastnorm.InstanceNorm(8, axis=1, affine=True, dtype=np.float32), {"axis": 1}
    else:
        layer, kw = fastnorm.GroupNorm(4, 8, axis=1, dtype=np.float32), {"axis": 1, "num_groups": 4}
    layer.weight[:] = rng.uniform(0.5, 2.0, layer.weight.shape)
    y = layer(x)
    assert y.dtype == np.float32
    dx = layer.backward(dy)
    assert dx.dtype == np.float32 and layer.dweight.dtype == np.float32
    want_dx, want_dw, want_db = gref.analytic_grads(name, dy, x, layer.weight.astype(np.float64), **kw)
    for got, want, what in ((dx, want_dx, "dx"), (layer.dweight, want_dw, "dweight"), (layer.dbias, want_db, "dbias")):
        scale = float(np.max(np.abs(want)))
        err = float(np.max(np.abs(got.astype(np.float64) - want)))
        assert err <= 1e-5 * scale, f"{name} {what}: max error {err:.3g} > 1e-5 * {scale:.3g}"


# --------------------------------------------------------------------------- x changed after the call

import grad_reference as gref  # noqa: E402

LAYERS_AND_REFS = [
    (lambda: fastnorm.LayerNorm(6), "layer_norm", {}),
    (lambda: fastnorm.RMSNorm(6), "rms_norm", {}),
    (lambda: fastnorm.BatchNorm(6), "batch_norm", {}),
    (lambda: fastnorm.InstanceNorm(6, affine=True), "instance_norm", {}),
    (lambda: fastnorm.GroupNorm(3, 6), "group_norm", {"num_groups": 3}),
]


@pytest.mark.parametrize("make, name, kw", LAYERS_AND_REFS)
@pytest.mark.parametrize("layout", ["C", "F", "sliced"])
def test_in_place_residual_gives_the_gradient_at_the_input_the_layer_saw(make, name, kw, layout):
    """x += f(layer(x)) between the call and backward (a residual stream updated in place): the
    gradients are those at the x the layer was called with, from the float64 reference."""
    rng = np.random.default_rng(7)
    layer = make()
    layer.weight[...] = rng.uniform(0.5, 1.5, 6)
    x0 = rng.standard_normal((4, 5, 6)) * 3 + 1
    x = x0.copy(order="F") if layout == "F" else x0.copy()
    if layout == "sliced":
        x = np.repeat(x0, 2, axis=1)[:, ::2]
    mask = rng.random((4, 5)) < 0.8 if name != "instance_norm" else None
    mask0 = None if mask is None else mask.copy()
    y = layer(x, mask=mask)
    x += 0.5 * y                              # the residual, in place
    if mask is not None:
        mask[...] = True                      # the caller reuses its mask buffer too
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(dy)
    dx_ref, dw_ref, db_ref = gref.analytic_grads(name, dy, x0, layer.weight, mask=mask0, **kw)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-11 * np.abs(dx_ref).max())
    np.testing.assert_allclose(layer.dweight, dw_ref, rtol=0, atol=1e-11 * np.abs(dw_ref).max())
    np.testing.assert_allclose(layer.dbias, db_ref, rtol=0, atol=1e-11 * np.abs(db_ref).max())


def test_layer_copies_x_once_per_call_and_reuses_its_buffer():
    """Each call keeps its own x (the next call's x is not the previous one's), the caller's array is
    neither kept nor changed, and a same-shaped call reuses the copy's memory."""
    rng = np.random.default_rng(8)
    ln = fastnorm.LayerNorm(6)
    a, b = rng.standard_normal((3, 6)), rng.standard_normal((3, 6)) * 2 + 5
    a_before = a.copy()
    ln(a)
    kept = ln._saved[0]
    assert kept is not a and not np.shares_memory(kept, a)
    np.testing.assert_array_equal(a, a_before)
    ln(b)
    assert ln._saved[0] is kept                              # reused, now holding b
    a[...] = b                                               # the caller changes a: nothing kept changes
    dy = rng.standard_normal((3, 6))
    want = gref.analytic_grads("layer_norm", dy, b.copy(), ln.weight)[0]
    np.testing.assert_allclose(ln.backward(dy), want, rtol=0, atol=1e-12)
    ln([[1.0, 2.0, 3.0, 4.0, 5.0, 7.0]])                    # a list: converted, not copied twice
    assert ln._saved[0].shape == (1, 6)


# --------------------------------------------------------------------------- constructors refuse at once

@pytest.mark.parametrize("make, error, words", [
    (lambda: fastnorm.GroupNorm(3, 4), ValueError, "num_groups=3 does not divide num_channels=4"),
    (lambda: fastnorm.GroupNorm(0, 4), ValueError, "num_groups"),
    (lambda: fastnorm.GroupNorm(2.0, 4), TypeError, "num_groups"),
    (lambda: fastnorm.LayerNorm(4, eps=-1), ValueError, "eps"),
    (lambda: fastnorm.LayerNorm(4, eps=float("nan")), ValueError, "eps"),
    (lambda: fastnorm.LayerNorm(4, eps="1e-5"), TypeError, "eps"),
    (lambda: fastnorm.LayerNorm(4.7), TypeError, "normalized_shape"),
    (lambda: fastnorm.LayerNorm(True), TypeError, "normalized_shape"),
    (lambda: fastnorm.LayerNorm(0), ValueError, "normalized_shape"),
    (lambda: fastnorm.LayerNorm((3, 4.0)), TypeError, "normalized_shape"),
    (lambda: fastnorm.LayerNorm(()), ValueError, "normalized_shape"),
    (lambda: fastnorm.RMSNorm(-2), ValueError, "normalized_shape"),
    (lambda: fastnorm.LayerNorm(4, affine="yes"), TypeError, "affine"),
    (lambda: fastnorm.LayerNorm(4, dtype=np.int32), TypeError, "dtype"),
    (lambda: fastnorm.BatchNorm(3.5), TypeError, "num_features"),
    (lambda: fastnorm.BatchNorm(3, momentum=1.5), ValueError, "momentum"),
    (lambda: fastnorm.BatchNorm(3, momentum="0.1"), TypeError, "momentum"),
    (lambda: fastnorm.BatchNorm(3, momentum=True), TypeError, "momentum"),
    (lambda: fastnorm.BatchNorm(3, track_running_stats=1), TypeError, "track_running_stats"),
    (lambda: fastnorm.InstanceNorm(0), ValueError, "num_features"),
    (lambda: fastnorm.LayerNorm(4).train("no"), TypeError, "mode"),
    (lambda: fastnorm.BatchNorm(4).train(None), TypeError, "mode"),
])
def test_constructors_refuse_what_every_call_would(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_constructors_take_numpy_ints():
    assert fastnorm.LayerNorm(np.int64(4)).normalized_shape == (4,)
    assert fastnorm.LayerNorm((np.int32(2), 3)).weight.shape == (2, 3)
    g = fastnorm.GroupNorm(np.int64(2), np.uint8(4))
    assert g.num_groups == 2 and type(g.num_groups) is int and g.weight.shape == (4,)
    assert fastnorm.BatchNorm(np.int16(3)).running_mean.shape == (3,)
    assert fastnorm.LayerNorm(4).train(np.True_).training is True


# --------------------------------------------------------------------------- momentum=None

def test_batchnorm_momentum_none_is_the_cumulative_average():
    """PyTorch's momentum=None: after k training batches the running statistics are the plain
    averages of the k batch means and unbiased variances, by hand; eval calls and empty batches
    do not count."""
    rng = np.random.default_rng(9)
    bn = fastnorm.BatchNorm(3, momentum=None)
    batches = [rng.standard_normal((n, 3)) * s + m for n, s, m in [(4, 1.0, 0.0), (7, 3.0, 5.0), (5, 0.5, -2.0)]]
    for k, xb in enumerate(batches, 1):
        bn(xb)
        bn.eval()(rng.standard_normal((2, 3)))              # eval: no update, no count
        bn(np.empty((0, 3)))                                  # eval of nothing
        bn.train()
        assert bn.num_batches_tracked == k
        means = np.array([b.mean(0) for b in batches[:k]])
        variances = np.array([b.var(0, ddof=1) for b in batches[:k]])
        np.testing.assert_allclose(bn.running_mean, means.mean(0), rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(bn.running_var, variances.mean(0), rtol=1e-14)
    bn(np.empty((0, 3)))                                      # an empty training batch: not counted
    assert bn.num_batches_tracked == 3


def test_batchnorm_counts_batches_with_a_momentum_too():
    bn = fastnorm.BatchNorm(2, momentum=0.5)
    x = np.array([[1.0, 2.0], [3.0, 6.0]])
    bn(x)
    bn(x)
    assert bn.num_batches_tracked == 2
    np.testing.assert_allclose(bn.running_mean, [0.75 * 2.0, 0.75 * 4.0])       # 0 -> 1 -> 1.5 (x2)
    np.testing.assert_allclose(bn.running_var, [0.25 + 0.75 * 2.0, 0.25 + 0.75 * 8.0])
