"""The teaching demos: every number they report against an independent NumPy float64 computation,
their figures, the command line, and the notebook (executed, so it cannot go stale).

Inputs the demos take from the lecture notes are typed in here again from the notes, so a typo in
the demo's copy would show up.
"""

import importlib.util
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import fastnorm
from fastnorm.demos import data, invariance, main, padding, rnn, ztable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "padded_sequences.ipynb")
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
EPS = 1e-5

# the lecture notes' padded batch: "Hi Rohan" + "How are you today", 3-dim embeddings
NOTES_TOKENS = {
    "Hi": [0.2, 0.45, 0.71], "Rohan": [0.21, 0.3, 0.8],
    "How": [0.1, 0.5, 0.34], "are": [0.1, 0.0, 0.25], "you": [0.33, 0.56, 0.9], "today": [0.11, 0.4, 0.54],
}
# the notes' table: f1, f2, z1, z2, z3
NOTES_TABLE = [[2, 3, 7, 5, 4], [1, 1, 2, 3, 4], [5, 4, 1, 2, 3], [6, 1, 7, 5, 6], [7, 1, 3, 3, 4]]
# Ba, Kiros and Hinton (2016), Table 1, columns in this order; True = invariant
PAPER_TRANSFORMS = ("weight matrix re-scaling", "weight matrix re-centering", "weight vector re-scaling",
                    "dataset re-scaling", "dataset re-centering", "single training case re-scaling")
PAPER_TABLE = {
    "batch norm": (True, False, True, True, True, False),
    "weight norm": (True, False, True, False, False, False),
    "layer norm": (True, True, False, True, False, True),
}


def close(actual, expected, tol=1e-12):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=0, atol=tol)


def ref_bn(a, eps=EPS):
    """Batch norm of a (N, C) array: per column."""
    return (a - a.mean(axis=0)) / np.sqrt(a.var(axis=0) + eps)


def ref_ln(a, eps=EPS):
    """Layer norm of a (..., C) array: per row."""
    m = a.mean(axis=-1, keepdims=True)
    return (a - m) / np.sqrt(a.var(axis=-1, keepdims=True) + eps)


def png_size(path):
    """(width, height) of a PNG file, from its header; fails if it is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


# ---- run every demo once (with figures when matplotlib is there) ---------------------------------

@pytest.fixture(scope="module")
def plot_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("figures")) if HAVE_MPL else None


@pytest.fixture(scope="module")
def results(plot_dir):
    demos = {"padding": padding.padding_demo, "ztable": ztable.ztable_demo,
             "invariance": invariance.invariance_demo, "rnn": rnn.rnn_demo, "data": data.data_demo}
    return {name: fn(verbose=False, plot_dir=plot_dir) for name, fn in demos.items()}


# ---- padding -------------------------------------------------------------------------------------

def notes_batch():
    hi = [NOTES_TOKENS[w] for w in ("Hi", "Rohan")] + [[0.0] * 3] * 2
    how = [NOTES_TOKENS[w] for w in ("How", "are", "you", "today")]
    return np.array([hi, how]), np.array([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=bool)


def test_padding_uses_the_notes_batch(results):
    x, mask = notes_batch()
    small = results["padding"]["small"]
    np.testing.assert_array_equal(small["x"], x)
    np.testing.assert_array_equal(small["mask"], mask)
    assert small["tokens"] == ["Hi", "Rohan", "<pad>", "<pad>", "How", "are", "you", "today"]


def test_padding_statistics_of_the_six_real_tokens(results):
    small = results["padding"]["small"]
    real = np.array(list(NOTES_TOKENS.values()))                  # the 6 real tokens, (6, 3)
    close(small["mean_real"], real.mean(axis=0))
    close(small["mean_real"], [1.05 / 6, 2.21 / 6, 3.54 / 6])
    close(small["var_real"], real.var(axis=0), 1e-10)              # from rstd: loses a few digits
    allpos = np.vstack([real, np.zeros((2, 3))])                   # all 8 positions
    close(small["mean_all"], allpos.mean(axis=0))
    close(small["var_all"], allpos.var(axis=0), 1e-10)


def test_padding_normalized_outputs(results):
    x, mask = notes_batch()
    small = results["padding"]["small"]
    flat = x.reshape(-1, 3)
    close(small["batch_norm"], ref_bn(flat).reshape(x.shape))
    real = x[mask]
    masked = np.zeros_like(x)
    masked[mask] = (real - real.mean(axis=0)) / np.sqrt(real.var(axis=0) + EPS)
    close(small["masked_batch_norm"], masked)
    layer = np.zeros_like(x)
    layer[mask] = ref_ln(real)
    close(small["layer_norm"], layer)
    assert small["layer_norm_unmasked_real_diff"] == 0.0


def test_padding_batch_size_independence(results):
    x, mask = notes_batch()
    small = results["padding"]["small"]
    assert small["layer_alone_max_diff"] == 0.0
    for s, n in enumerate((2, 4)):
        close(small["layer_norm_alone"][s], ref_ln(x[s, :n]))
        close(small["batch_norm_alone"][s], ref_bn(x[s, :n]))
    # batch norm of a sentence alone vs its rows in the masked batch: independent value
    real = x[mask]
    in_batch = (real - real.mean(axis=0)) / np.sqrt(real.var(axis=0) + EPS)
    expected = max(np.abs(ref_bn(x[0, :2]) - in_batch[:2]).max(), np.abs(ref_bn(x[1]) - in_batch[2:]).max())
    close(small["batch_alone_max_diff"], expected)
    assert expected > 1.0


def test_padding_large_case(results):
    large = results["padding"]["large"]
    lengths, x, mask = large["lengths"], large["x"], large["mask"]
    assert len(lengths) == 100 and lengths.mean() == 20 and lengths.max() == 60 and lengths.min() >= 1
    np.testing.assert_array_equal(mask, np.arange(60)[None, :] < lengths[:, None])
    assert np.all(x[~mask] == 0.0)
    assert large["positions"] == 6000 and large["real_tokens"] == 2000
    close(large["padding_fraction"], 4000 / 6000)
    real, allpos = x[mask], x.reshape(-1, 3)
    close(large["mean_real"], real.mean(axis=0))
    close(large["std_real"], real.std(axis=0), 1e-9)
    close(large["mean_pad"], allpos.mean(axis=0))
    close(large["std_pad"], allpos.std(axis=0), 1e-9)
    close(large["mean_ratio"], np.full(3, 1 / 3))
    plain_real = (real - allpos.mean(axis=0)) / np.sqrt(allpos.var(axis=0) + EPS)
    close(large["out_mean_plain"], plain_real.mean(axis=0), 1e-10)
    close(large["out_std_plain"], plain_real.std(axis=0), 1e-10)
    masked_real = (real - real.mean(axis=0)) / np.sqrt(real.var(axis=0) + EPS)
    close(large["out_mean_masked"], masked_real.mean(axis=0), 1e-10)
    assert np.all(np.abs(large["out_mean_plain"]) > 0.5)          # the drift is large


# ---- ztable --------------------------------------------------------------------------------------

def test_ztable_columns_and_rows(results):
    r = results["ztable"]
    table = np.array(NOTES_TABLE, dtype=float)
    z = table[:, 2:]
    np.testing.assert_array_equal(r["f"], table[:, :2])
    np.testing.assert_array_equal(r["z"], z)
    close(r["batch_mean"], z.mean(axis=0))
    close(r["batch_mean"], [4.0, 3.6, 4.2])
    close(r["batch_std"], z.std(axis=0))
    close(r["batch_std"], [np.sqrt(6.4), 1.2, np.sqrt(0.96)])
    close(r["batch_norm"], (z - z.mean(axis=0)) / z.std(axis=0))
    close(r["layer_mean"], z.mean(axis=1))
    close(r["layer_std"], z.std(axis=1))
    close(r["layer_norm"], (z - z.mean(axis=1, keepdims=True)) / z.std(axis=1, keepdims=True))
    close(r["batch_norm"].mean(axis=0), np.zeros(3))
    close(r["layer_norm"].std(axis=1), np.ones(5))


def test_ztable_notes_worked_values(results):
    z = np.array(NOTES_TABLE, dtype=float)[:, 2:]
    computed = {(what, kind): value for what, kind, _, value in results["ztable"]["placeholders"]}
    col = (z - z.mean(axis=0)) / z.std(axis=0)
    row = (z - z.mean(axis=1, keepdims=True)) / z.std(axis=1, keepdims=True)
    close(computed[("(7 - mu1) / sigma1, z1 of row 1", "batch")], col[0, 0])
    close(computed[("(2 - mu1) / sigma1, z1 of row 2", "batch")], col[1, 0])
    close(computed[("(4 - mu3) / sigma3, z3 of row 1", "batch")], col[0, 2])
    close(computed[("(7 - mu1) / sigma1, z1 of row 1", "layer")], row[0, 0])


# ---- invariance ----------------------------------------------------------------------------------

def ref_outputs(X, W, g):
    A = X @ W.T
    wn = g[:, None] * W / np.linalg.norm(W, axis=1, keepdims=True)
    return {"batch norm": ref_bn(A, 0.0), "weight norm": X @ wn.T, "layer norm": ref_ln(A, 0.0)}


def test_invariance_transformations_are_what_they_say(results):
    r = results["invariance"]
    X, W, t = r["X"], r["W"], r["transformed"]
    X1, W1 = t["weight matrix re-scaling"]
    assert X1 is X and np.allclose(W1 / W, W1[0, 0] / W[0, 0]) and not np.allclose(W1, W)
    X1, W1 = t["weight matrix re-centering"]
    shift = W1 - W
    assert np.allclose(shift, shift[0]) and not np.allclose(shift, 0)       # same vector on every row
    X1, W1 = t["weight vector re-scaling"]
    ratio = W1 / W
    assert np.allclose(ratio, ratio[:, :1]) and np.all(ratio > 0) and np.ptp(ratio[:, 0]) > 0.1
    X1, W1 = t["dataset re-scaling"]
    assert W1 is W and np.allclose(X1 / X, X1[0, 0] / X[0, 0]) and not np.allclose(X1, X)
    X1, W1 = t["dataset re-centering"]
    shift = X1 - X
    assert np.allclose(shift, shift[0]) and not np.allclose(shift, 0)
    X1, W1 = t["single training case re-scaling"]
    assert np.allclose(X1[1:], X[1:]) and np.allclose(X1[0] / X[0], X1[0, 0] / X[0, 0]) and X1[0, 0] != X[0, 0]


def test_invariance_each_cell_measured_independently(results):
    r = results["invariance"]
    base = ref_outputs(r["X"], r["W"], r["g"])
    for name in PAPER_TRANSFORMS:
        after = ref_outputs(*r["transformed"][name], r["g"])
        for method in PAPER_TABLE:
            change = np.abs(after[method] - base[method]).max() / max(1.0, np.abs(base[method]).max())
            invariant = change < 1e-9
            assert r["invariant"][method][name] == invariant, (method, name)
            if invariant:
                assert r["change"][method][name] < 1e-9
            else:
                assert change > 0.1
                close(r["change"][method][name], change, 1e-9)


def test_invariance_matches_the_paper(results):
    r = results["invariance"]
    for method, row in PAPER_TABLE.items():
        for name, expected in zip(PAPER_TRANSFORMS, row):
            assert r["invariant"][method][name] == expected, (method, name)
    assert r["matches_paper"] is True


def test_invariance_figure_title_from_the_measurement(results):
    """The sentence in the figure's title, checked against the paper's table typed in here."""
    only = {m: [t for i, t in enumerate(PAPER_TRANSFORMS) if row[i]
                and not any(PAPER_TABLE[o][i] for o in PAPER_TABLE if o != m)] for m, row in PAPER_TABLE.items()}
    assert only == {"batch norm": ["dataset re-centering"], "weight norm": [],
                    "layer norm": ["weight matrix re-centering", "single training case re-scaling"]}
    assert invariance._only_invariant(results["invariance"]) == (
        "Only batch norm is invariant to dataset re-centering; only layer norm to weight matrix re-centering "
        "and single training case re-scaling")


# ---- rnn -----------------------------------------------------------------------------------------

def ref_rnn_logits(p, x, mask, use_ln):
    """The demo's network written out in plain NumPy (no fastnorm)."""
    h = np.zeros((x.shape[0], p["W_hh"].shape[0]))
    for t in range(x.shape[1]):
        a = x[:, t] @ p["W_xh"] + h @ p["W_hh"]
        n = ref_ln(a) * p["gamma"] + p["beta"] if use_ln else a + p["b"]
        h = np.where(mask[:, t, None], np.tanh(n), h)
    return h @ p["W_hy"] + p["b_y"]


def ref_loss(p, x, mask, y, use_ln):
    logits = ref_rnn_logits(p, x, mask, use_ln)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean()


@pytest.mark.parametrize("use_ln", [False, True])
def test_rnn_gradients_finite_differences(use_ln):
    rng = np.random.default_rng(5)
    p = rnn.init_params(rng, inputs=3, hidden=5, classes=3)
    p["gamma"] = rng.uniform(0.5, 1.5, 5)
    p["beta"] = rng.normal(0, 0.3, 5)
    p["b"] = rng.normal(0, 0.3, 5)
    x = rng.standard_normal((4, 6, 3))
    mask = fastnorm.mask_from_lengths([6, 3, 1, 5], 6)
    y = np.array([0, 2, 1, 2])
    loss, g, _ = rnn.loss_and_grads(p, x, mask, y, use_ln)
    close(loss, ref_loss(p, x, mask, y, use_ln))
    h = 1e-6
    for key in ("W_xh", "W_hh", "W_hy", "b_y", "gamma", "beta", "b"):
        num = np.zeros_like(p[key])
        for i in np.ndindex(p[key].shape):
            saved = p[key][i]
            p[key][i] = saved + h
            up = ref_loss(p, x, mask, y, use_ln)
            p[key][i] = saved - h
            down = ref_loss(p, x, mask, y, use_ln)
            p[key][i] = saved
            num[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(g[key], num, rtol=1e-5, atol=1e-8, err_msg=key)


def test_rnn_reported_accuracy_recomputed(results):
    r = results["rnn"]
    test = rnn.first_token_batch(np.random.default_rng(10_000), rnn.TEST_SIZE)
    long_test = rnn.first_token_batch(np.random.default_rng(20_000), rnn.TEST_SIZE, rnn.LONG_MIN, rnn.LONG_MAX)
    for use_ln, runs in ((False, r["plain"]), (True, r["layer_norm"])):
        for run in runs:
            logits = ref_rnn_logits(run["params"], test[0], test[1], use_ln)
            close(run["test_acc"][-1], np.mean(logits.argmax(axis=1) == test[2]))
            close(run["test_loss"][-1], ref_loss(run["params"], *test, use_ln), 1e-10)
            logits = ref_rnn_logits(run["params"], long_test[0], long_test[1], use_ln)
            close(run["long_acc"], np.mean(logits.argmax(axis=1) == long_test[2]))
            reached = [s for s, a in zip(run["steps"], run["test_acc"]) if a >= rnn.TARGET_ACCURACY]
            assert run["steps_to_target"] == (reached[0] if reached else None)


def test_rnn_verdict_follows_from_the_numbers(results):
    """Counts, sign test (scipy's exact binomial test as the oracle) and verdict recomputed from the runs."""
    stats = pytest.importorskip("scipy.stats")
    r = results["rnn"]
    assert len(r["config"]["seeds"]) >= 10
    never = r["config"]["steps"] + 10**6
    steps = [[run["steps_to_target"] or never for run in r[k]] for k in ("plain", "layer_norm")]
    sooner = sum(ln < pl for pl, ln in zip(*steps))
    later = sum(ln > pl for pl, ln in zip(*steps))
    c = r["comparison"]
    assert (c["sooner"], c["later"], c["ties"]) == (sooner, later, len(steps[0]) - sooner - later)
    p = stats.binomtest(sooner, sooner + later, 0.5).pvalue if sooner + later else 1.0
    close(c["p"], p, 1e-12)
    expected = ("sooner" if sooner > later else "later") if p < 0.05 else "no clear difference"
    assert r["verdict"] == c["verdict"] == expected
    assert c["reached"]["plain"] == sum(run["steps_to_target"] is not None for run in r["plain"])
    text = rnn.headline(r)
    assert f"{sooner} of {len(steps[0])} seeds" in text or expected == "later"


@pytest.mark.parametrize("wins, losses", [(0, 0), (5, 0), (3, 3), (9, 2), (1, 12)])
def test_sign_test_against_scipy(wins, losses):
    stats = pytest.importorskip("scipy.stats")
    expected = stats.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    close(rnn.sign_test(wins, losses), expected, 1e-12)


def test_rnn_statistics_over_seeds(results):
    r = results["rnn"]
    seeds = r["per_step_seeds"]
    assert seeds["std_ratio"].shape == (len(r["config"]["seeds"]), len(r["per_step"]["t"]))
    np.testing.assert_array_equal(seeds["std_ratio"][0], r["per_step"]["std_ratio"])
    np.testing.assert_array_equal(seeds["mean_shift"][0], r["per_step"]["mean_shift"])
    last = r["per_step_seeds"]["std_ratio"][:, -3]
    s = rnn.per_step_statistics(r["plain"][-1]["params"], r["per_step"]["x"], r["per_step"]["mask"])
    close(last[-1], s["std_ratio"][-3])


def test_rnn_per_step_statistics(results):
    s = results["rnn"]["per_step"]
    p = results["rnn"]["plain"][0]["params"]
    x, mask, A = s["x"], s["mask"], s["a"]
    np.testing.assert_array_equal(s["n_real"], mask.sum(axis=0))
    # the summed inputs, zero-padded, by hand
    h = np.zeros((len(x), p["W_hh"].shape[0]))
    for t in range(x.shape[1]):
        a = x[:, t] @ p["W_xh"] + h @ p["W_hh"]
        close(A[:, t], np.where(mask[:, t, None], a, 0.0), 1e-12)
        h = np.where(mask[:, t, None], np.tanh(a + p["b"]), h)
    for t in range(x.shape[1]):
        n = mask[:, t].sum()
        assert s["batch_norm_defined"][t] == (n >= 2)
        if n < 2:
            assert np.isnan(s["mean_shift"][t]) and np.isnan(s["std_ratio"][t])
            continue
        real = A[mask[:, t], t]
        mean_pad, std_pad = A[:, t].mean(axis=0), A[:, t].std(axis=0)
        mean_real, std_real = real.mean(axis=0), real.std(axis=0)
        close(s["mean_shift"][t], np.mean(np.abs(mean_pad - mean_real) / std_real), 1e-9)
        close(s["std_ratio"][t], np.mean(std_pad / std_real), 1e-9)
    close(s["standard_error"], 1 / np.sqrt(np.maximum(s["n_real"], 1)))
    assert not s["batch_norm_defined"].all()                       # the batch runs out of real sequences


def test_rnn_batch_size_independence(results):
    r = results["rnn"]
    assert r["layer_norm_alone_diff"] < 1e-12
    assert r["batch_norm_batch_of_one"].startswith("ValueError")


def test_rnn_training_is_deterministic():
    a = rnn.train(True, 0, steps=20)
    b = rnn.train(True, 0, steps=20)
    np.testing.assert_array_equal(a["train_loss"], b["train_loss"])
    np.testing.assert_array_equal(a["params"]["W_hh"], b["params"]["W_hh"])


# ---- data ----------------------------------------------------------------------------------------

def test_data_scalings(results):
    r = results["data"]
    x = r["x"]
    close(r["mean"], x.mean(axis=0))
    close(r["std"], x.std(axis=0))
    close(r["zscore"], (x - x.mean(axis=0)) / x.std(axis=0))
    close(r["minmax"], (x - x.min(axis=0)) / (x.max(axis=0) - x.min(axis=0)))
    close(r["share_zscore"], np.full(3, 1 / 3))
    v = x.var(axis=0)
    close(r["share_raw"], v / v.sum())
    i, j, value = r["outlier"]
    xo = x.copy()
    xo[i, j] = value
    np.testing.assert_array_equal(r["x_outlier"], xo)
    zo = (xo - xo.mean(axis=0)) / xo.std(axis=0)
    mo = (xo - xo.min(axis=0)) / (xo.max(axis=0) - xo.min(axis=0))
    close(r["zscore_outlier"], zo)
    close(r["minmax_outlier"], mo)
    keep = np.arange(len(x)) != i
    close(r["others_range_minmax_outlier"], np.ptp(mo[keep, j]))
    close(r["others_range_zscore_outlier"], np.ptp(zo[keep, j]))
    assert r["others_range_minmax_outlier"] < r["others_range_minmax"]


# ---- figures -------------------------------------------------------------------------------------

EXPECTED_FIGURES = {
    "padding": ["padding_batch.png", "padding_drift.png"],
    "ztable": ["ztable_table.png"],
    "invariance": ["invariance_table.png"],
    "rnn": ["rnn_training.png", "rnn_statistics.png"],
    "data": ["data_scaling.png"],
}


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed")
@pytest.mark.parametrize("name", list(EXPECTED_FIGURES))
def test_figures_written(results, plot_dir, name):
    paths = results[name]["figures"]
    assert [os.path.basename(p) for p in paths] == EXPECTED_FIGURES[name]
    for path in paths:
        assert os.path.dirname(path) == plot_dir
        assert os.path.getsize(path) > 20_000
        width, height = png_size(path)
        assert width >= 800 and height >= 300


def test_no_figures_without_plot_dir():
    assert padding.padding_demo(verbose=False)["figures"] == []


# ---- command line --------------------------------------------------------------------------------

def run_cli(*args, env_extra=None):
    env = dict(os.environ, PYTHONHASHSEED="0", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "fastnorm", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_default_is_the_padding_demo():
    proc = run_cli("demo")
    assert proc.returncode == 0, proc.stderr
    assert "Hi Rohan" in proc.stdout and "How are you today" in proc.stdout
    assert "0.1750" in proc.stdout and "0.3683" in proc.stdout and "0.5900" in proc.stdout   # real-token means
    assert "100 sentences" in proc.stdout


def test_cli_help_lists_every_demo():
    proc = run_cli("demo", "--help")
    assert proc.returncode == 0
    for name in ("padding", "ztable", "invariance", "rnn", "data"):
        assert f"  {name} " in proc.stdout


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed")
def test_cli_plot_writes_pngs(tmp_path):
    proc = run_cli("demo", "--plot", str(tmp_path / "figs"))
    assert proc.returncode == 0, proc.stderr
    for name in EXPECTED_FIGURES["padding"]:
        path = tmp_path / "figs" / name
        assert path.stat().st_size > 20_000
        png_size(path)
        assert f"wrote {path}" in proc.stdout


def test_cli_plot_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib now fails
    assert main(["demo", "ztable", "--plot", str(tmp_path / "figs")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "fastnorm-numpy[plot]" in err
    assert not (tmp_path / "figs").exists()


def test_cli_plot_onto_a_file(tmp_path, capsys):
    target = tmp_path / "figures.png"
    target.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as info:
        main(["demo", "ztable", "--plot", str(target)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --plot: '{target}' is a file; --plot takes a directory" in err
    assert "Traceback" not in err
    assert target.read_bytes() == b"keep me"


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed")
def test_cli_plot_into_an_unwritable_place(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    target = blocker / "figs"                                       # a directory below a file
    assert main(["demo", "ztable", "--plot", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"--plot: cannot write the figures into '{target}'" in err


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed")
def test_demo_function_plot_dir_is_a_file(tmp_path):
    target = tmp_path / "figures.png"
    target.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="plot_dir is a file"):
        ztable.ztable_demo(verbose=False, plot_dir=str(target))


def test_cli_does_not_import_matplotlib_without_plot():
    code = ("import sys; from fastnorm.demos import main; main(['demo', 'ztable']); "
            "print('MPL' if 'matplotlib' in sys.modules else 'NO-MPL')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("NO-MPL")


def test_demos_print_their_tables(capsys):
    ztable.ztable_demo()
    data.data_demo()
    invariance.invariance_demo()
    out = capsys.readouterr().out
    assert "mean (per column)" in out and "4.000" in out and "2.530" in out
    assert "fastnorm.standardize(x, axis=1)" in out
    assert "matches Table 1" in out


# ---- the notebook --------------------------------------------------------------------------------

def run_notebook(extra_cells=()):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells += [nbformat.v4.new_code_cell(code) for code in extra_cells]
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
    return nb


def cell_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs)


def test_notebook_runs_and_checks_the_exercises():
    """The notebook as shipped, then with the exercises answered (worked out by hand from the notes'
    numbers) and once answered wrongly: the check cells must tell them apart."""
    answers = ["answer_1, answer_2, answer_3, answer_4 = 1.05 / 8, (3.54 / 12, 3.54 / 6), {'a'}, (True, False)",
               "check(answer_1, float(fastnorm.batch_norm(x, return_stats=True)[1][0]), 'h')",
               "check(np.asarray(answer_2), truth_2, 'h')", "check(answer_3, truth_3, 'h')",
               "check(answer_4, truth_4, 'h')",
               "check(1.05 / 6, float(fastnorm.batch_norm(x, return_stats=True)[1][0]), 'hint 1')",
               "check({'a', 'b'}, truth_3, 'hint 3')", "check((True, True), truth_4, 'hint 4')"]
    nb = run_notebook(answers)
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2
    text = "".join(cell_text(c) for c in code)
    assert "x[0, 2] = [0. 0. 0.]   <pad>" in text and "x[1, 3] = [0.11 0.4  0.54]   today" in text
    assert "0.175" in text and "layer norm max |diff| = 0.0e+00" in text
    shipped = [cell_text(c) for c in code[:-len(answers)] if "check(" in "".join(c.source)
               and "def check" not in "".join(c.source)]
    assert shipped == ["not answered yet\n"] * 4
    extra = [cell_text(c) for c in code[-len(answers) + 1:]]
    assert extra == ["correct\n"] * 4 + ["not yet: hint 1\n", "not yet: hint 3\n", "not yet: hint 4\n"]
