"""examples/train_mlp.py: its gradients against finite differences, its data preparation against
scikit-learn, the numbers it prints against the runs, and its command-line errors."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def mlp():
    spec = importlib.util.spec_from_file_location("train_mlp", ROOT / "examples" / "train_mlp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ref_loss(model, x, y, norm):
    """The example's network in plain NumPy (no fastnorm), batch statistics for batch norm."""
    h = x
    for k, (W, b) in enumerate(zip(model.W, model.b)):
        a = h @ W + b
        if norm != "none":
            layer = model.norms[k]
            ax = 0 if norm == "batch" else 1
            mean, var = a.mean(axis=ax, keepdims=True), a.var(axis=ax, keepdims=True)
            a = (a - mean) / np.sqrt(var + 1e-5) * layer.weight + layer.bias
        h = np.maximum(a, 0.0)
    z = h @ model.W_out + model.b_out
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean()


@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
def test_gradients_match_finite_differences(mlp, norm):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 7))
    y = rng.integers(0, mlp.CLASSES, 12)
    model = mlp.MLP(norm, 7, rng)
    for layer in model.norms:
        if layer is not None:
            layer.weight[...] = rng.uniform(0.5, 1.5, layer.weight.shape)
            layer.bias[...] = rng.normal(0, 0.3, layer.bias.shape)
    loss, dlogits = mlp.cross_entropy(model.forward(x), y)
    np.testing.assert_allclose(loss, ref_loss(model, x, y, norm), rtol=1e-12)
    grads = model.gradients(dlogits)
    h = 1e-6
    picks = rng.integers(0, 10**6, 4)
    for p, g in grads:
        for i in {tuple(int(k) % n for n in p.shape) for k in picks}:     # a few entries of each parameter
            saved = p[i]
            p[i] = saved + h
            up = ref_loss(model, x, y, norm)
            p[i] = saved - h
            down = ref_loss(model, x, y, norm)
            p[i] = saved
            np.testing.assert_allclose(g[i], (up - down) / (2 * h), rtol=1e-4, atol=1e-7)


def test_inputs_standardized_with_training_statistics(mlp):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x_train, y_train, x_test, y_test = mlp.load_digits_split()
    d = load_digits()
    a_train, a_test, b_train, b_test = train_test_split(d.data, d.target, test_size=450, random_state=0,
                                                        stratify=d.target)
    scaler = StandardScaler().fit(a_train)          # scikit-learn also leaves constant pixels at 0
    np.testing.assert_allclose(x_train, scaler.transform(a_train), rtol=0, atol=1e-12)
    np.testing.assert_allclose(x_test, scaler.transform(a_test), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(y_train, b_train)
    assert x_train.shape == (1347, 64) and x_test.shape == (450, 64)


@pytest.fixture(scope="module")
def quick_run(mlp):
    return mlp.run_all(quick=True, seeds=2, verbose=False)


def test_accuracy_is_what_the_model_gives(mlp, quick_run):
    """One cell of the sweep, run again by hand: the same accuracy, from argmax of the logits."""
    data = mlp.load_digits_split()
    acc = quick_run["lr"]["batch"]["acc"]
    k = quick_run["lr_values"].index(0.1)
    for seed in quick_run["seeds"]:
        again = mlp.train(data, "batch", seed, scale=1.0, lr=0.1, epochs=quick_run["epochs"])
        assert again["acc"] == acc[k, seed]
        assert 0.5 < again["acc"] <= 1.0
    assert quick_run["scale"]["none"]["acc"].shape == (len(quick_run["scale_values"]), 2)


def test_findings_follow_from_the_numbers(mlp, quick_run):
    summ = mlp.summary(quick_run)
    for n in mlp.NORMS:
        for key in ("scale", "lr"):
            means = quick_run[key][n]["acc"].mean(axis=1)
            values = quick_run[f"{key}_values"]
            assert summ[n]["fails"][key] == [v for v, m in zip(values, means) if m < 0.5]
            assert summ[n]["trains"][key] == [v for v, m in zip(values, means) if m >= 0.9]
    text = "\n".join(quick_run["findings"])
    best_none = max(quick_run[k]["none"]["acc"].mean(axis=1).max() for k in ("scale", "lr"))
    assert f"no normalization {best_none:.3f} +- " in text
    assert "What does not appear" in text
    # the sweep shows its point on this data: plain SGD breaks where batch norm still trains
    assert summ["none"]["fails"]["scale"] and not summ["batch"]["fails"]["scale"]


def test_figure_written(mlp, quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "mlp.png"
    mlp.figure(quick_run).savefig(path, dpi=60)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_without_matplotlib_is_a_clear_error(mlp, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib now fails
    with pytest.raises(SystemExit) as info:
        mlp.main(["--quick", "--plot", str(tmp_path / "x.png")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and 'pip install ".[plot]"' in err and "Traceback" not in err


@pytest.mark.parametrize("target", ["a directory", "missing folder"])
def test_plot_target_checked_before_training(mlp, capsys, tmp_path, target):
    pytest.importorskip("matplotlib")
    path = tmp_path if target == "a directory" else tmp_path / "nope" / "x.png"
    with pytest.raises(SystemExit) as info:
        mlp.main(["--quick", "--plot", str(path)])
    assert info.value.code == 2
    assert "expected the name of a PNG file in an existing directory" in capsys.readouterr().err
