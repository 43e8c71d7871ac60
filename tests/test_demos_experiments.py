"""The experiment demos (axes, batchsize, groups, affine, transformer, bafig6) and the digits notebook:
every number they report against an independent NumPy float64 computation or a number worked out by
hand from the lecture notes, their figures, and the command line with and without scikit-learn.

The training demos run in quick mode here.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import fastnorm
from fastnorm.demos import _digits, _mlp, affine, axes, bafig6, batchsize, groups, transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "batch_vs_layer_norm_digits.ipynb")
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None
needs_sklearn = pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn is not installed")
EPS = 1e-5

# the notes' tokens, typed in again from the notes
HI, ROHAN = [0.2, 0.45, 0.71], [0.21, 0.3, 0.8]
HOW, ARE, YOU, TODAY = [0.1, 0.5, 0.34], [0.1, 0.0, 0.25], [0.33, 0.56, 0.9], [0.11, 0.4, 0.54]
I_, AM, GOOD, YOU_Q = [0.8, 0.33, 0.6], [0.9, 0.1, 0.41], [0.3, 0.3, 0.1], [0.1, 0.2, 0.33]


def close(actual, expected, tol=1e-12):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=0, atol=tol)


def ref_norm(a, axes_, eps=EPS):
    """(a - mean) / sqrt(var + eps) with the statistics over axes_ (float64)."""
    m = a.mean(axis=axes_, keepdims=True)
    return (a - m) / np.sqrt(a.var(axis=axes_, keepdims=True) + eps)


@pytest.fixture(scope="module")
def plot_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("figures")) if HAVE_MPL else None


@pytest.fixture(scope="module")
def results(plot_dir):
    out = {"axes": axes.axes_demo(verbose=False, plot_dir=plot_dir),
           "affine": affine.affine_demo(verbose=False, plot_dir=plot_dir),
           "transformer": transformer.transformer_demo(verbose=False, plot_dir=plot_dir, quick=True)}
    if HAVE_SKLEARN:
        out["batchsize"] = batchsize.batchsize_demo(verbose=False, plot_dir=plot_dir, quick=True)
        out["groups"] = groups.groups_demo(verbose=False, plot_dir=plot_dir)
        out["bafig6"] = bafig6.bafig6_demo(verbose=False, plot_dir=plot_dir, quick=True)
    return out


# ---- axes ------------------------------------------------------------------------------------------

def test_axes_measured_groups_are_the_definitions(results):
    r = results["axes"]
    N, C, H, W = r["shape"]
    n, c = np.indices((N, C, H, W))[:2]
    expected = {"batch": c, "layer": n, "instance": n * C + c, "group": n * axes.GROUPS + c // (C // axes.GROUPS)}
    for key, labels in expected.items():
        measured = r["norms"][key]["labels"].ravel()
        same_measured = measured[:, None] == measured[None, :]
        same_expected = labels.ravel()[:, None] == labels.ravel()[None, :]
        assert (same_measured == same_expected).all(), key
        assert r["norms"][key]["symmetric"] and r["norms"][key]["equal_sizes"]
    # counted by hand for (3, 6, 2, 2): per channel, per sample, per (sample, channel), per (sample, group)
    assert [(v["groups"], v["size"]) for v in r["norms"].values()] == [(6, 12), (3, 24), (18, 4), (6, 12)]


def test_axes_sharing_matches_a_numpy_perturbation():
    x = np.random.default_rng(5).standard_normal(axes.SHAPE)
    def numpy_layer(a):
        return ref_norm(a, (1, 2, 3))
    shares = axes.sharing_sets(numpy_layer, x)
    close(shares, axes.sharing_sets(axes.NORMS["layer"][1], x), 0)


# ---- batchsize -------------------------------------------------------------------------------------

@needs_sklearn
def test_batchsize_noise_recomputed(results):
    n = results["batchsize"]["noise"]
    x = n["x"]
    data = _digits.digits_split(0)
    W = np.random.default_rng(0).standard_normal((64, 64)) / 8             # the random layer
    close(x, data["x_train"] @ W, 1e-12)
    for k, B in enumerate(n["batch_sizes"]):
        batches = x[n["batches"][B]]                                           # (R, B, F)
        pop_sd = x.std(axis=0)                                                  # in population sds
        close(n["mean_sd"][k], np.sqrt(np.mean(batches.mean(axis=1).var(axis=0) / pop_sd ** 2)), 1e-12)
        close(n["std_sd"][k], np.sqrt(np.mean(batches.std(axis=1).var(axis=0) / pop_sd ** 2)), 1e-6)
        img = x[n["image_batches"][B]]
        out0 = (img[:, 0] - img.mean(axis=1)) / np.sqrt(img.var(axis=1) + EPS)
        close(n["image_sd"][k], np.sqrt(np.mean(out0.var(axis=0))), 1e-9)
        assert n["layer_max_diff"][k] == 0.0
    N = n["population"]
    close(n["formula"][0], np.sqrt((N - 2) / (2 * (N - 1))))
    # the measured sd of a batch mean follows the formula within the sampling error of 200 batches of
    # images (measured: 7% low at B = 2, within 5% from B = 4 on)
    np.testing.assert_allclose(n["mean_sd"], n["formula"], rtol=0.15)


@needs_sklearn
def test_batchsize_batch_of_one(results):
    o = results["batchsize"]["one"]
    assert (o["formula"] == 0.5).all() and o["max_abs_minus_bias"] == 0.0
    assert o["input_spread"] > 1
    assert o["layer_alone_max_diff"] == 0.0
    assert "more than one value" in o["error"]


def test_batchsize_second_batch_by_hand():
    s = batchsize.second_batch()
    first_real = np.array([HI, ROHAN, HOW, ARE, YOU, TODAY])
    second_real = np.array([I_, AM, GOOD, YOU_Q])
    close(s["first_mean"], [1.05 / 6, 2.21 / 6, 3.54 / 6])
    close(s["second_mean"], [0.525, 0.2325, 0.36])
    m1 = 0.1 * first_real.mean(axis=0)
    v1 = 0.9 * 1.0 + 0.1 * first_real.var(axis=0, ddof=1)
    m2 = 0.9 * m1 + 0.1 * second_real.mean(axis=0)
    v2 = 0.9 * v1 + 0.1 * second_real.var(axis=0, ddof=1)
    close(s["running_after_first"][0], m1)
    close(s["running_after_first"][1], v1)
    close(s["running_after_second"][0], m2)
    close(s["running_after_second"][1], v2)
    hr = np.array([HI, ROHAN])
    close(s["eval_after_first"], (hr - m1) / np.sqrt(v1 + EPS))
    close(s["eval_after_second"], (hr - m2) / np.sqrt(v2 + EPS))
    close(s["train_with_how"], ref_norm(first_real, 0)[:2])
    close(s["train_with_i_am"], ref_norm(np.array([HI, ROHAN, I_, AM, GOOD]), 0)[:2])
    close(s["layer"], ref_norm(hr, -1))
    assert s["layer_change"] == 0.0
    assert s["eval_change"] > 0.01 and s["train_change"] > 0.5


@needs_sklearn
def test_batchsize_running_vs_exact_shapes_and_range(results):
    rv = results["batchsize"]["running"]
    assert rv["seeds"] == batchsize.QUICK["seeds"]
    for m in rv["by_momentum"].values():
        for key in ("batch", "running", "exact"):
            assert m[key].shape == (rv["seeds"], len(rv["epochs"]))
            assert ((m[key] >= 0) & (m[key] <= 1)).all()
        assert (m["mean_gap"] > 0).all()


# ---- the MLP the digits demos train ----------------------------------------------------------------

def numpy_mlp_forward(model, x, running=None):
    """The MLP's logits in NumPy float64, eval mode (running statistics) for batch norm."""
    h = x
    for i in range(len(model.gamma)):
        a = h @ model.W[i]
        if model.norm == "none":
            n = a + model.b[i]
        elif model.norm == "layer":
            n = ref_norm(a, -1) * model.gamma[i] + model.beta[i]
        else:
            mean, var = running[i] if running is not None else (model.running_mean[i], model.running_var[i])
            n = (a - mean) / np.sqrt(var + EPS) * model.gamma[i] + model.beta[i]
        h = np.maximum(n, 0)
    return h @ model.W[-1] + model.b[-1]


def numpy_exact_statistics(model, x):
    """PreciseBN layer by layer in NumPy: mean and unbiased variance over all of x."""
    stats, h = [], x
    for i in range(len(model.gamma)):
        a = h @ model.W[i]
        mean, var = a.mean(axis=0), a.var(axis=0, ddof=1)
        stats.append((mean, var))
        h = np.maximum((a - mean) / np.sqrt(var + EPS) * model.gamma[i] + model.beta[i], 0)
    return stats


@pytest.mark.parametrize("norm", _mlp.NORMS)
def test_mlp_gradients_finite_differences(norm):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((6, 5)), rng.integers(0, 3, 6)
    model = _mlp.MLP((5, 4, 4, 3), norm, np.random.default_rng(4))
    for p in model.parameters():
        p += 0.3 * rng.standard_normal(p.shape)
    _, grads = model.loss_and_grads(x, y, mode="batch")
    for p, g in zip(model.parameters(), grads):
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + 1e-6
            up = model.loss_and_grads(x, y, mode="batch")[0]
            p[i] = old - 1e-6
            down = model.loss_and_grads(x, y, mode="batch")[0]
            p[i] = old
            assert abs((up - down) / 2e-6 - g[i]) < 1e-7 + 1e-6 * abs(g[i]), (norm, p.shape, i)


def test_mlp_exact_statistics_and_eval_match_numpy():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, 5)) * 3 + 1
    model = _mlp.MLP((5, 7, 6, 3), "batch", np.random.default_rng(7))
    for g in model.gamma + model.beta:
        g += 0.5 * rng.standard_normal(g.shape)
    exact = model.exact_statistics(x)
    ref = numpy_exact_statistics(model, x)
    for (m, v), (rm, rvar) in zip(exact, ref):
        close(m, rm, 1e-12)
        close(v, rvar, 1e-10)
    before = [r.copy() for r in model.running_mean]
    y = rng.integers(0, 3, 40)
    logits_ref = numpy_mlp_forward(model, x, ref)
    loss_ref = -np.mean(logits_ref[np.arange(40), y] - np.log(np.exp(logits_ref).sum(axis=1)))
    loss, err = _mlp.evaluate(model, x, y, running=exact)
    close(loss, loss_ref, 1e-10)
    close(err, np.mean(logits_ref.argmax(axis=1) != y), 0)
    for a, b in zip(before, model.running_mean):                # the model's own statistics are untouched
        close(a, b, 0)


# ---- groups ----------------------------------------------------------------------------------------

def test_groups_conv_matches_loops():
    rng = np.random.default_rng(0)
    images, filters = rng.standard_normal((2, 5, 6)), rng.standard_normal((3, 3, 3))
    ref = np.zeros((2, 3, 3, 4))
    for n, c, i, j in np.ndindex(ref.shape):
        ref[n, c, i, j] = (images[n, i:i + 3, j:j + 3] * filters[c]).sum()
    close(groups.conv_valid(images, filters), ref)


@needs_sklearn
def test_groups_deviations_recomputed(results):
    r = results["groups"]
    t = groups.transformed(r["images"])
    close(t["both"], r["transformed"], 0)
    close(t["both"], r["a"][:, None, None] * r["images"] + r["b"][:, None, None])
    refs = {"batch": lambda f: ref_norm(f, (0, 2, 3)), "layer": lambda f: ref_norm(f, (1, 2, 3)),
            "instance": lambda f: ref_norm(f, (2, 3))}
    def group_ref(f, G):
        N, C, H, W = f.shape
        return ref_norm(f.reshape(N, G, C // G, H, W), (2, 3, 4)).reshape(f.shape)
    refs["group2"] = lambda f: group_ref(f, 2)
    refs["group4"] = lambda f: group_ref(f, 4)
    base = groups.conv_valid(r["images"], r["filters"])
    for name in groups.TRANSFORMS:
        f = groups.conv_valid(t[name], r["filters"])
        for key, ref in refs.items():
            close(r["feature_deviation"][name][key], np.abs(ref(f) - ref(base)).max(), 1e-9)
        img, base_img = t[name][:, None], r["images"][:, None]
        for key, over in (("instance", (2, 3)), ("batch", (0, 2, 3))):
            close(r["image_deviation"][name][key], np.abs(ref_norm(img, over) - ref_norm(base_img, over)).max(), 1e-9)
    dev = r["feature_deviation"]
    assert all(dev[name]["instance"] < 1e-4 for name in groups.TRANSFORMS)
    assert all(dev["contrast"][k] < 1e-4 for k in ("layer", "group2", "group4"))
    assert all(dev["brightness"][k] > 0.1 for k in ("layer", "group2", "group4", "batch"))
    assert dev["contrast"]["batch"] > 0.1


def test_group_norm_cancels_brightness_when_a_groups_filters_sum_alike():
    """The demo's explanation: brightness b adds b * sum(filter_c) to channel c, which group norm
    removes only if it is the same for every channel of a group."""
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 16, (20, 8, 8))
    filters = rng.standard_normal((4, 3, 3))
    filters -= filters.mean(axis=(1, 2), keepdims=True)
    filters[:2] += 0.3 / 9                     # group 0 (channels 0, 1) sums to 0.3, group 1 to 0
    before = fastnorm.group_norm(groups.conv_valid(images, filters), 2, axis=1)
    after = fastnorm.group_norm(groups.conv_valid(images + rng.uniform(-4, 4, (20, 1, 1)), filters), 2, axis=1)
    assert np.abs(after - before).max() < 1e-9


# ---- affine ----------------------------------------------------------------------------------------

def test_affine_notes_worked_example(results):
    w = results["affine"]["worked"]
    row = w["notes_row"]
    mu, sigma = 16 / 3, np.sqrt(14 / 9)                      # of (7, 5, 4), by hand
    close(row["mean"], mu)
    close(row["std"], sigma)
    n = (np.array([7, 5, 4]) - mu) / sigma
    close(row["normalized"], n)
    close(row["p"], n * affine.GAMMA + affine.BETA)
    close(row["p_initial"], n)
    r03 = w["row_0.3"]
    close(r03["normalized"][0], 0.3)
    close(r03["p"][0], 0.3 * affine.GAMMA[0] + affine.BETA[0])    # the notes' 0.3 * gamma_1 + beta_1 = p_1
    close(r03["p"][0], 0.7)
    close(r03["mean"], 5.0)
    close(r03["std"], 2.0)


def test_affine_recovery(results):
    c = results["affine"]["recovery"]
    z = np.array([[7, 5, 4], [2, 3, 4], [1, 2, 3], [7, 5, 6], [3, 3, 4]], dtype=float)   # the notes' z table
    close(c["z"], z, 0)
    assert c["bn_error"].max() < 1e-12
    assert c["ln_error"][0] < 1e-12
    ln = ref_norm(z, -1) * np.sqrt(z[0].var() + EPS) + z[0].mean()
    close(c["ln_error"], np.abs(ln - z).max(axis=1), 1e-12)
    assert (c["ln_error"][1:] > 1).all()


def test_affine_eps_placement(results):
    e = results["affine"]["eps"]
    s = e["sigmas"]
    close(e["measured"], s / np.sqrt(s ** 2 + EPS), 1e-12)
    close(e["notes_form"], s / (s + EPS))
    k = np.argmin(np.abs(s - np.sqrt(EPS)))
    close(e["sqrt_form"][k], 1 / np.sqrt(2), 1e-12)               # at sigma = sqrt(eps) exactly
    rel = np.abs(s / (s + EPS) - s / np.sqrt(s ** 2 + EPS)) / (s / (s + EPS))
    assert rel[s == e["differ_below"]][0] > 0.01 and (rel[s > e["differ_below"]] <= 0.01).all()
    assert 0.01 < e["differ_below"] < 0.03           # ~ sqrt(50 eps) = 0.022 by the series 1 - eps/(2 sigma^2)


# ---- transformer -----------------------------------------------------------------------------------

def numpy_block_logits(p, tokens, mask, arm, running, mode):
    """The encoder block in NumPy float64, written from its description, for an independent check."""
    m = mask[..., None].astype(float)
    e = (p["embed"][tokens] + p["pos"][:tokens.shape[1]]) * m
    scores = np.einsum("bqd,bkd->bqk", e @ p["Wq"], e @ p["Wk"]) / np.sqrt(e.shape[-1])
    scores = np.where(mask[:, None, :], scores, -np.inf)
    att = np.exp(scores - scores.max(axis=-1, keepdims=True))
    att /= att.sum(axis=-1, keepdims=True)
    h1 = e + (att @ (e @ p["Wv"]) @ p["Wo"]) * m

    def norm(h, gamma, beta, slot):
        if arm == "layer":
            out = ref_norm(h, -1) * gamma + beta
        elif mode == "eval":
            mean, var = running[slot]
            out = (h - mean) / np.sqrt(var + EPS) * gamma + beta
        else:
            real = h[mask] if arm == "masked batch" else h.reshape(-1, h.shape[-1])
            out = (h - real.mean(axis=0)) / np.sqrt(real.var(axis=0) + EPS) * gamma + beta
        return out * m

    n1 = norm(h1, p["g1"], p["b1"], 1)
    h2 = n1 + (np.maximum(n1 @ p["W1"] + p["c1"], 0) @ p["W2"] + p["c2"]) * m
    n2 = norm(h2, p["g2"], p["b2"], 2)
    pooled = (n2 * m).sum(axis=1) / m.sum(axis=1)
    return pooled @ p["Wc"] + p["cc"]


@pytest.mark.parametrize("arm", transformer.ARMS)
def test_transformer_forward_matches_numpy(arm):
    tokens, mask, _ = transformer.make_batch(np.random.default_rng(0), 6)
    p = transformer.init_params(np.random.default_rng(1))
    running = {1: (np.full(16, 0.2), np.full(16, 1.5)), 2: (np.full(16, -0.1), np.full(16, 0.7))}
    for mode in ("batch", "eval"):
        logits, _ = transformer.forward(p, tokens, mask, arm, running, mode)
        close(logits, numpy_block_logits(p, tokens, mask, arm, running, mode), 1e-10)


@pytest.mark.parametrize("arm", transformer.ARMS)
def test_transformer_gradients_finite_differences(arm):
    rng = np.random.default_rng(2)
    tokens, mask, labels = transformer.make_batch(rng, 5)
    assert not mask.all()                                  # some padding to mask
    p = transformer.init_params(np.random.default_rng(3))
    for k in p:
        p[k] += 0.1 * rng.standard_normal(p[k].shape)
    running = transformer.new_running()
    _, g = transformer.loss_and_grads(p, tokens, mask, labels, arm, running, mode="batch")
    pick = np.random.default_rng(4)
    for k in p:
        for _ in range(5):
            i = tuple(int(pick.integers(0, s)) for s in p[k].shape)
            old = p[k][i]
            p[k][i] = old + 1e-6
            up = transformer.loss_and_grads(p, tokens, mask, labels, arm, running, mode="batch")[0]
            p[k][i] = old - 1e-6
            down = transformer.loss_and_grads(p, tokens, mask, labels, arm, running, mode="batch")[0]
            p[k][i] = old
            assert abs((up - down) / 2e-6 - g[k][i]) < 1e-8 + 1e-5 * abs(g[k][i]), (arm, k, i)


def test_transformer_data():
    tokens, mask, labels = transformer.make_batch(np.random.default_rng(9), 200)
    lengths = mask.sum(axis=1)
    assert lengths.min() >= transformer.MIN_LEN and lengths.max() == tokens.shape[1] <= transformer.MAX_LEN
    assert (tokens[~mask] == 0).all() and (tokens[mask] >= 1).all() and (tokens[mask] <= transformer.SYMBOLS).all()
    ones, twos = (tokens == 1).sum(axis=1), (tokens == 2).sum(axis=1)
    close(labels, np.abs(ones - twos) <= 1, 0)
    assert 0.3 < labels.mean() < 0.7


def test_transformer_reported_accuracy_recomputed(results):
    r = results["transformer"]
    assert r["config"]["seeds"] >= 5
    for arm in transformer.ARMS:
        for seed, (p, running) in enumerate(r["models"][arm]):
            for mode in ("batch", "eval"):
                right = sum(int((numpy_block_logits(p, t, m, arm, running, mode).argmax(axis=1) == y).sum())
                            for t, m, y in r["test"])
                close(r["final"][arm][mode][seed], right / r["config"]["test_size"], 1e-12)
    close(r["final"]["layer"]["batch"], r["final"]["layer"]["eval"], 0)


# ---- bafig6 ----------------------------------------------------------------------------------------

@needs_sklearn
def test_bafig6_reported_errors_recomputed(results):
    r = results["bafig6"]
    data = _digits.digits_split(0)
    for norm in ("batch", "layer"):
        model = _mlp.train(data, norm, 128, 0, r["config"]["epochs"], bafig6.LR, hidden=bafig6.HIDDEN)
        logits = numpy_mlp_forward(model, data["x_test"])
        close(r["final"][128][norm]["error"][0], np.mean(logits.argmax(axis=1) != data["y_test"]), 0)
        if norm == "batch":
            exact = numpy_exact_statistics(model, data["x_train"])
            logits = numpy_mlp_forward(model, data["x_test"], exact)
            close(r["final"][128]["batch_exact"]["error"][0], np.mean(logits.argmax(axis=1) != data["y_test"]), 0)
    for bs in bafig6.BATCH_SIZES:
        for arm, c in r["curves"][bs].items():
            close(c["error"][:, -1], r["final"][bs][arm]["error"], 0)
            assert (c["error"][:, 0] > 0.5).all()             # untrained: near chance (0.9)


@needs_sklearn
def test_bafig6_finding_states_the_paired_differences(results):
    r = results["bafig6"]
    text = bafig6.finding(r)
    for bs in bafig6.BATCH_SIZES:
        diff = (r["final"][bs]["batch"]["error"] - r["final"][bs]["layer"]["error"]) * 100
        m, s = diff.mean(), diff.std(ddof=1)
        verdict = "tie" if abs(m) <= s else ("BN worse" if m > 0 else "BN better")
        assert f"batch {bs}: {verdict} (BN - LN test error {m:+.1f} \u00b1 {s:.1f} points)" in text


def test_transformer_finding_names_the_measured_arms(results):
    r = results["transformer"]
    ev = {arm: r["final"][arm]["eval"] * 100 for arm in transformer.ARMS}
    best = max(ev, key=lambda a: ev[a].mean())
    widest = max(ev, key=lambda a: ev[a].std(ddof=1))
    text = transformer.finding(r)
    assert f"highest test accuracy: {best} norm ({ev[best].mean():.1f}" in text
    assert f"widest spread over seeds: {widest} norm" in text


@needs_sklearn
def test_digits_split_is_standardized_and_stratified():
    d = _digits.digits_split(0)
    images, target = _digits.digit_images()
    assert len(d["x_train"]) + len(d["x_test"]) == len(images) == 1797
    live = d["std"] > 0
    close(d["x_train"][:, live].mean(axis=0), 0, 1e-12)
    close(d["x_train"][:, live].std(axis=0), 1, 1e-12)
    assert (d["x_train"][:, ~live] == 0).all()
    expected = np.bincount(target) * 450 / 1797                     # stratified: each class in proportion
    assert (np.abs(np.bincount(d["y_test"], minlength=10) - expected) < 1).all()


# ---- figures and the command line ------------------------------------------------------------------

EXPECTED_FIGURES = {"axes": ["axes_cubes.png"], "affine": ["affine_example.png"],
                    "transformer": ["transformer_accuracy.png"], "batchsize": ["batchsize_noise.png",
                    "batchsize_running.png"], "groups": ["groups_invariance.png"], "bafig6": ["bafig6_curves.png"]}


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed")
@pytest.mark.parametrize("name", list(EXPECTED_FIGURES))
def test_experiment_figures_written(results, plot_dir, name):
    if name not in results:
        pytest.skip("scikit-learn is not installed")
    paths = results[name]["figures"]
    assert [os.path.basename(p) for p in paths] == EXPECTED_FIGURES[name]
    for path in paths:
        assert os.path.dirname(path) == plot_dir and os.path.getsize(path) > 20_000


def run_cli(*args, code=None):
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "fastnorm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONHASHSEED="0"))


def test_cli_help_lists_the_experiments():
    proc = run_cli("demo", "--help")
    assert proc.returncode == 0
    for name in ("axes", "batchsize", "groups", "affine", "transformer", "bafig6", "--quick", "fastnorm-numpy[demos]"):
        assert name in proc.stdout


def test_cli_without_sklearn():
    block = "import sys; sys.modules['sklearn'] = None; from fastnorm.demos import main; "
    proc = run_cli(code=block + "sys.exit(main(['demo']))")
    assert proc.returncode == 0, proc.stderr
    assert "Hi Rohan" in proc.stdout
    proc = run_cli(code=block + "sys.exit(main(['demo', 'groups']))")
    assert proc.returncode == 2
    assert "scikit-learn" in proc.stderr and "fastnorm-numpy[demos]" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_all_without_sklearn_runs_the_others():
    code = ("import sys; sys.modules['sklearn'] = None; from fastnorm.demos import main; "
            "sys.exit(main(['demo', 'all', '--quick']))")
    proc = run_cli(code=code)
    assert proc.returncode == 2
    assert "==== transformer" in proc.stdout and "==== affine" in proc.stdout and "Hi Rohan" in proc.stdout
    assert "not run (scikit-learn missing): batchsize, groups, bafig6" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_quick_transformer():
    proc = run_cli("demo", "transformer", "--quick")
    assert proc.returncode == 0, proc.stderr
    assert "masked batch norm" in proc.stdout and "100 Adam steps, 5 seeds" in proc.stdout


def test_demos_do_not_import_sklearn_or_matplotlib_on_import():
    proc = run_cli(code="import sys, fastnorm.demos; "
                        "print(sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules))")
    assert proc.returncode == 0 and proc.stdout.strip() == "[]"


# ---- the notebook ----------------------------------------------------------------------------------

@needs_sklearn
def test_digits_notebook_runs():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 3
    text = "".join(o.get("text", "") for o in outputs)
    assert "1797 images" in text and "layer norm: max |difference| = 0.0e+00" in text
