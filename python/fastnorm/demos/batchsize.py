"""Batch statistics against batch size: noise, a batch of one, running statistics, the notes' second batch.

1. Noise. Batch norm estimates each feature's mean and std from the batch. The features here are
   what a hidden layer's batch norm sees: the summed inputs of 64 units of a fixed random linear
   layer applied to the digits (1,347 training images, pixels standardized over them). Over
   batches of B images drawn without replacement the batch mean's sd follows
   sqrt((N - B) / (B (N - 1))) population sds, and one fixed image's normalized values move with its
   batch mates. Layer norm's output for an image is the same in any batch, also alone.
2. A batch of one in training: x - mean(x) = 0, so batch norm outputs its bias for every input,
   whatever the image (and a running variance cannot be updated from one value).
3. Running statistics. In training batch norm uses batch statistics; at evaluation the running
   averages (``r = (1 - momentum) r + momentum s``), which lag behind the weights. PreciseBN (Wu and
   Johnson, 2021) replaces them by exact statistics of the training set under the final weights,
   computed here with ``fastnorm.batch_norm(..., return_stats=True)`` layer by layer. Shown for
   momentum 0.1 (PyTorch's default) and 0.01 (Keras's default ``momentum=0.99`` in its convention).
4. The notes' second batch. The notes batch "Hi Rohan" with "How are you today" and "I am Good"
   with "You?". Even with masked batch norm (padding excluded), the first sentence's output in
   evaluation depends on the running statistics, so training on the second batch changes it, and
   in training its output depends on which sentence shares its batch. Layer norm: unchanged.
   The notes list four embedding rows for each of "I am Good" and "You?"; we use as many rows as
   the sentence has words (3 and 1) and pad the rest with zeros, as the notes do for "Hi Rohan".

What it does not show: the noise is that of a random layer's units, not of a trained network's; the
running-statistics gap is measured on one small MLP and one batch size (128), over a few epochs; how
large it is depends on the momentum and on how fast the weights still move.
"""
from __future__ import annotations

from typing import Any, TypedDict

import numpy as np

import fastnorm

from . import _mlp
from ._common import finish, new_figure, require_matplotlib, table, vec
from ._digits import digits_split, require_sklearn
from ._style import ARM_COLORS, OKABE_ITO, band, mean_sd, pm
from .padding import EMBEDDINGS, LENGTHS

EPS = 1e-5
BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128, 256, 512)
REPEATS = 200                     # random batches per batch size
# the notes' second batch: "I am Good" (3 words) and "You?" (1), padded to 3
SECOND_WORDS = (("I", "am", "Good"), ("You?",))
SECOND_EMBEDDINGS = np.array([
    [[0.8, 0.33, 0.6], [0.9, 0.1, 0.41], [0.3, 0.3, 0.1]],
    [[0.1, 0.2, 0.33], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
])
SECOND_LENGTHS = (3, 1)
MOMENTUM = 0.1


class _RunningSetup(TypedDict):
    """Settings of the running-vs-exact statistics experiment."""
    batch_size: int
    momenta: tuple[float, ...]
    lr: float
    hidden: tuple[int, ...]
    evals_per_epoch: int


# running statistics vs exact: an MLP trained with batch norm at batch size 128
RUNNING = _RunningSetup(batch_size=128, momenta=(0.1, 0.01), lr=3e-3, hidden=(64, 64), evals_per_epoch=2)
FULL = dict(seeds=5, epochs=6)
QUICK = dict(seeds=3, epochs=2)


def _std(rstd, eps=EPS):
    """The biased std behind rstd = 1/sqrt(var + eps)."""
    return np.sqrt(np.maximum(1.0 / np.asarray(rstd, dtype=np.float64) ** 2 - eps, 0.0))


# ---- 1. noise -------------------------------------------------------------------------------------

def _rms(values) -> float:
    """Root mean square: averages sds over features as the root of their mean variance."""
    return float(np.sqrt(np.mean(np.square(values))))


def summed_inputs(x, units: int = 64, seed: int = 0) -> np.ndarray:
    """x @ W for a fixed W of standard normal entries / sqrt(inputs): a random layer's summed inputs."""
    W = np.random.default_rng(seed).standard_normal((x.shape[1], units)) / np.sqrt(x.shape[1])
    return x @ W


def noise(x, batch_sizes=BATCH_SIZES, repeats: int = REPEATS, seed: int = 0) -> dict:
    """Batch-statistics noise on the rows of x (population: all rows; features with std > 0).

    For each B: 'mean_sd' and 'std_sd', the sd over batches of the batch mean and batch std, in
    population sds; 'formula' the sampling-without-replacement sd of a mean; 'image_sd' the sd over
    batches of row 0's batch-normalized values (row 0 is in every batch with B - 1 random others).
    Each is averaged over features as a root mean square (the root of the mean variance); 'layer_max_diff' the largest
    |layer_norm(row 0 in the batch) - layer_norm(row 0 alone)| over every batch. 'batches' and
    'image_batches' hold the row indices used.
    """
    x = x[:, x.std(axis=0) > 0]
    N = len(x)
    pop_mean, pop_std = x.mean(axis=0), x.std(axis=0)
    rng = np.random.default_rng(seed)
    ln_alone = fastnorm.layer_norm(x[:1], eps=EPS)
    out: dict[str, Any] = {k: np.zeros(len(batch_sizes)) for k in ("mean_sd", "std_sd", "image_sd", "layer_max_diff")}
    out["batches"], out["image_batches"] = {}, {}
    for k, B in enumerate(batch_sizes):
        batches = np.stack([rng.choice(N, B, replace=False) for _ in range(repeats)])
        image_batches = np.stack([np.concatenate([[0], 1 + rng.choice(N - 1, B - 1, replace=False)])
                                  for _ in range(repeats)])
        means, stds, image_out = [], [], []
        for idx in batches:
            _, m, r = fastnorm.batch_norm(x[idx], eps=EPS, return_stats=True)
            means.append(m)
            stds.append(_std(r))
        for idx in image_batches:
            image_out.append(fastnorm.batch_norm(x[idx], eps=EPS)[0])
            ln = fastnorm.layer_norm(x[idx], eps=EPS)[0]
            out["layer_max_diff"][k] = max(out["layer_max_diff"][k], float(np.abs(ln - ln_alone[0]).max()))
        out["mean_sd"][k] = _rms(np.std(means, axis=0) / pop_std)
        out["std_sd"][k] = _rms(np.std(stds, axis=0) / pop_std)
        out["image_sd"][k] = _rms(np.std(image_out, axis=0))
        out["batches"][B], out["image_batches"][B] = batches, image_batches
    B = np.asarray(batch_sizes, dtype=np.float64)
    out.update(batch_sizes=np.asarray(batch_sizes), formula=np.sqrt((N - B) / (B * (N - 1))), population=N,
               features=x.shape[1], pop_mean=pop_mean, pop_std=pop_std, x=x)
    return out


# ---- 2. a batch of one -------------------------------------------------------------------------

def batch_of_one(x, rows=(0, 1, 2), bias_value: float = 0.5) -> dict:
    """Batch norm in training on single images. Its formula, (x - mean) / sqrt(var + eps) * weight
    + bias with mean = x and var = 0, gives the bias for every image (computed here in NumPy);
    fastnorm refuses such a batch with a ValueError ('error'). Layer norm of one image alone equals
    its row of the whole batch ('layer_alone_max_diff')."""
    one = x[list(rows)][:, None, :]                              # (images, batch of 1, features)
    formula = (one - one.mean(axis=1, keepdims=True)) / np.sqrt(one.var(axis=1, keepdims=True) + EPS) + bias_value
    ln_batch = fastnorm.layer_norm(x, eps=EPS)
    ln_alone = np.stack([fastnorm.layer_norm(x[i:i + 1], eps=EPS)[0] for i in rows])
    try:
        fastnorm.batch_norm(x[:1], eps=EPS)
        error = None
    except ValueError as err:
        error = str(err)
    return dict(rows=np.asarray(rows), bias_value=bias_value, formula=formula[:, 0],
                max_abs_minus_bias=float(np.abs(formula - bias_value).max()),
                input_spread=float(np.abs(x[list(rows)] - x[rows[0]]).max()),
                layer_alone_max_diff=float(np.abs(ln_alone - ln_batch[list(rows)]).max()), error=error)


# ---- 3. running vs exact statistics --------------------------------------------------------------

def running_vs_exact(data: dict, seeds: int, epochs: int, batch_size: int = RUNNING["batch_size"],
                     momenta=RUNNING["momenta"], lr: float = RUNNING["lr"]) -> dict:
    """Train a batch-normalized MLP per (momentum, seed); at each evaluation the test error with
    batch statistics (test batches of batch_size), running statistics, and exact statistics, and
    the running means' distance to the exact ones (mean over units of |running - exact| / exact sd,
    second hidden layer)."""
    xt, yt = data["x_test"], data["y_test"]
    per_epoch = RUNNING["evals_per_epoch"]
    n_evals = epochs * per_epoch
    out = {}
    for momentum in momenta:
        r = {k: np.zeros((seeds, n_evals)) for k in ("batch", "running", "exact", "mean_gap")}
        for seed in range(seeds):
            k = 0

            def record(model, epoch, seed=seed):
                nonlocal k
                if epoch == 0:
                    return
                exact = model.exact_statistics(data["x_train"])
                r["batch"][seed, k] = _mlp.evaluate(model, xt, yt, "batch", batch_size)[1]
                r["running"][seed, k] = _mlp.evaluate(model, xt, yt)[1]
                r["exact"][seed, k] = _mlp.evaluate(model, xt, yt, running=exact)[1]
                mean, var = exact[-1]
                r["mean_gap"][seed, k] = np.mean(np.abs(model.running_mean[-1] - mean) / np.sqrt(var))
                k += 1

            _mlp.train(data, "batch", batch_size, seed, epochs, lr, hidden=RUNNING["hidden"],
                       evals_per_epoch=per_epoch, on_eval=record, momentum=momentum)
        out[momentum] = r
    return dict(epochs=np.arange(1, n_evals + 1) / per_epoch, by_momentum=out, batch_size=batch_size,
                seeds=seeds, lr=lr)


# ---- 4. the notes' second batch -----------------------------------------------------------------

def second_batch() -> dict:
    """"Hi Rohan"'s outputs (masked batch norm and layer norm) as the second batch comes and goes."""
    first, first_mask = EMBEDDINGS.copy(), fastnorm.mask_from_lengths(LENGTHS, EMBEDDINGS.shape[1])
    second, second_mask = SECOND_EMBEDDINGS.copy(), fastnorm.mask_from_lengths(SECOND_LENGTHS, 3)
    hi_rohan, hr_mask = first[:1], first_mask[:1]
    D = first.shape[2]
    rm, rv = np.zeros(D), np.ones(D)
    fastnorm.batch_norm(first, running_mean=rm, running_var=rv, momentum=MOMENTUM, eps=EPS, mask=first_mask)
    after_first = (rm.copy(), rv.copy())
    eval_first = fastnorm.batch_norm(hi_rohan, running_mean=rm, running_var=rv, training=False, eps=EPS, mask=hr_mask)
    fastnorm.batch_norm(second, running_mean=rm, running_var=rv, momentum=MOMENTUM, eps=EPS, mask=second_mask)
    eval_second = fastnorm.batch_norm(hi_rohan, running_mean=rm, running_var=rv, training=False, eps=EPS,
                                      mask=hr_mask)
    # in training: "Hi Rohan" with "How are you today" (the notes' batch) vs with "I am Good"
    with_how = fastnorm.batch_norm(first, eps=EPS, mask=first_mask)
    pair = np.zeros((2, 4, D))
    pair[0], pair[1, :3] = first[0], second[0]
    pair_mask = fastnorm.mask_from_lengths((2, 3), 4)
    with_i_am = fastnorm.batch_norm(pair, eps=EPS, mask=pair_mask)
    layer = fastnorm.layer_norm(hi_rohan, eps=EPS, mask=hr_mask)[0]
    layer_in_pair = fastnorm.layer_norm(pair, eps=EPS, mask=pair_mask)[0]
    n = LENGTHS[0]
    return dict(
        first_mean=first[first_mask].mean(axis=0), second_mean=second[second_mask].mean(axis=0),
        running_after_first=after_first, running_after_second=(rm, rv),
        eval_after_first=eval_first[0, :n], eval_after_second=eval_second[0, :n],
        eval_change=float(np.abs(eval_second - eval_first)[0, :n].max()),
        train_with_how=with_how[0, :n], train_with_i_am=with_i_am[0, :n],
        train_change=float(np.abs(with_how[0, :n] - with_i_am[0, :n]).max()),
        layer=layer[:n],
        layer_change=float(np.abs(layer[:n] - layer_in_pair[:n]).max()), momentum=MOMENTUM,
    )


# ---- printing, figures, the demo ------------------------------------------------------------------

def _print(r: dict) -> None:
    n = r["noise"]
    print(f"1. Batch statistics of {n['features']} units' summed inputs (a random linear layer on the "
          f"{n['population']} training digits),\n   {REPEATS} random batches per batch size B:\n")
    rows = [[B, n["mean_sd"][k], n["formula"][k], n["std_sd"][k], n["image_sd"][k], n["layer_max_diff"][k]]
            for k, B in enumerate(n["batch_sizes"])]
    print(table(["B", "sd of batch mean", "sqrt((N-B)/(B(N-1)))", "sd of batch std", "image 0's BN output sd",
                 "LN max |diff|"], rows))
    print("   (sds in population sds, root mean square over units; 'image 0's BN output sd': how much one\n"
          "   image's normalized values move with its batch mates; 'LN max |diff|': layer norm of image 0 in\n"
          "   the batch vs alone)\n")
    o = r["one"]
    print(f"2. A batch of one in training: for images {o['rows'].tolist()}, whose pixels differ by up to "
          f"{o['input_spread']:.2f}, batch norm's\n   formula with bias 0.5 gives the bias everywhere "
          f"(NumPy: max |y - 0.5| = {o['max_abs_minus_bias']:.1e}): the input is lost.")
    print(f"   fastnorm refuses it: ValueError: {o['error']}")
    print(f"   Layer norm of one image alone vs in the batch: max |difference| = {o['layer_alone_max_diff']:.1e}.\n")
    rv = r["running"]
    print(f"3. Running vs exact statistics: an MLP with batch norm, batch size {rv['batch_size']}, "
          f"{rv['seeds']} seeds; test error (%)\n   after {rv['epochs'][0]:g} and {rv['epochs'][-1]:g} epochs "
          "(mean +- sd):")
    rows = []
    for momentum, m in rv["by_momentum"].items():
        for k in (0, -1):
            rows.append([f"momentum {momentum:g}, epoch {rv['epochs'][k]:g}", pm(m["batch"][:, k] * 100, 1),
                         pm(m["running"][:, k] * 100, 1), pm(m["exact"][:, k] * 100, 1), pm(m["mean_gap"][:, k], 3)])
    print(table(["", "batch statistics", "running statistics", "exact (PreciseBN)", "|running - exact| mean"], rows))
    print("   ('|running - exact| mean': second hidden layer, in exact sds, averaged over units)")
    print("   " + running_finding(rv).replace("\u00b1", "+-") + "\n")
    s = r["second"]
    print('4. The notes\' second batch: "I am Good" + "You?" after "Hi Rohan" + "How are you today",')
    print(f"   masked batch norm, running statistics with momentum {s['momentum']:g}, starting at mean 0, var 1:")
    print(f"   running mean after batch 1 {vec(s['running_after_first'][0], 4)}, after batch 2 "
          f"{vec(s['running_after_second'][0], 4)}")
    rows = [["eval, running statistics after batch 1", vec(s["eval_after_first"][0]), vec(s["eval_after_first"][1])],
            ["eval, running statistics after batch 2", vec(s["eval_after_second"][0]), vec(s["eval_after_second"][1])],
            ['training, batched with "How are you today"', vec(s["train_with_how"][0]), vec(s["train_with_how"][1])],
            ['training, batched with "I am Good"', vec(s["train_with_i_am"][0]), vec(s["train_with_i_am"][1])],
            ["layer norm, any batch", vec(s["layer"][0]), vec(s["layer"][1])]]
    print(table(['"Hi Rohan" normalized', "Hi", "Rohan"], rows))
    print(f"   batch norm changes by up to {s['eval_change']:.3f} (eval) and {s['train_change']:.3f} (training); "
          f"layer norm by {s['layer_change']:.1e}.")


def figures(r: dict) -> dict:
    """'noise': statistics noise and one image's output against B, and the notes' second batch;
    'running': test error with batch, running and exact statistics during training."""
    figs = {}
    n = r["noise"]
    fig = new_figure(14, 4.6)
    ax_stat, ax_img, ax_notes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.15]})
    B = n["batch_sizes"]
    ax_stat.loglog(B, n["mean_sd"], "o", color=OKABE_ITO["vermillion"], label="sd of the batch mean (measured)")
    ax_stat.loglog(B, n["formula"], "-", color=OKABE_ITO["black"], linewidth=1,
                   label=r"$\sqrt{(N-B)/(B(N-1))}$, N = %d" % n["population"])
    ax_stat.loglog(B, n["std_sd"], "s", color=OKABE_ITO["orange"], label="sd of the batch std (measured)")
    ax_stat.set_xlabel("batch size B (images)")
    ax_stat.set_ylabel("sd over batches, in population sds")
    ax_stat.set_title("batch statistics of 64 random units on the digits:\nsd of a mean falls as 1/sqrt(B)",
                      fontsize=10)
    ax_stat.legend(fontsize=8)
    ax_stat.grid(alpha=0.3, which="both")
    ticks = [0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7]
    ax_stat.set_yticks(ticks, labels=[f"{t:g}" for t in ticks])
    ax_stat.minorticks_off()

    ax_img.semilogx(B, n["image_sd"], "o-", color=ARM_COLORS["batch"], label="batch norm")
    ax_img.semilogx(B, n["layer_max_diff"], "s-", color=ARM_COLORS["layer"],
                    label=f"layer norm (max |change| {n['layer_max_diff'].max():.0e})")
    ax_img.set_xlabel("batch size B (image 0 + B - 1 random others)")
    ax_img.set_ylabel("sd of image 0's normalized values over batches")
    ax_img.set_title("one image's batch-norm output moves with its\nbatch mates; its layer-norm output never does",
                     fontsize=10)
    ax_img.legend(fontsize=8)
    ax_img.set_ylim(bottom=-0.02)
    ax_img.grid(alpha=0.3)

    s = r["second"]
    labels = ["eval, after\nbatch 1", "eval, after\nbatch 2", 'train, with\n"How are..."',
              'train, with\n"I am Good"', "layer norm\n(any)"]
    values = [s["eval_after_first"], s["eval_after_second"], s["train_with_how"], s["train_with_i_am"], s["layer"]]
    colors = [ARM_COLORS["batch"]] * 2 + [ARM_COLORS["masked batch"]] * 2 + [ARM_COLORS["layer"]]
    width = 0.16
    for j, (v, c, label) in enumerate(zip(values, colors, labels)):
        hatch = "//" if j in (1, 3) else None
        ax_notes.bar(np.arange(6) + (j - 2) * width, np.ravel(v), width, color=c, hatch=hatch, edgecolor="white",
                     label=label.replace("\n", " "))
    ax_notes.set_xticks(range(6), labels=[f"{w}\ndim {d}" for w in ("Hi", "Rohan") for d in range(3)], fontsize=8)
    ax_notes.axhline(0, color="black", linewidth=0.8)
    ax_notes.set_ylabel('"Hi Rohan" after masked batch norm')
    ax_notes.set_title('the notes\' second batch changes "Hi Rohan"\'s output\n(masked batch norm; layer norm: '
                       'no change)', fontsize=10)
    ax_notes.set_ylim(-1.4, 2.4)
    ax_notes.legend(fontsize=7, ncol=3, loc="upper center")
    fig.suptitle("Batch norm's statistics depend on the batch: their noise falls only as 1/sqrt(B), "
                 "and a sentence's output depends on the other sentences; layer norm's never does")
    figs["noise"] = fig

    rv = r["running"]
    fig = new_figure(12.5, 4.6)
    axes = fig.subplots(1, len(rv["by_momentum"]) + 1)
    for ax, (momentum, m) in zip(axes, rv["by_momentum"].items()):
        band(ax, rv["epochs"], m["batch"] * 100, OKABE_ITO["grey"], f"batch statistics (batches of {rv['batch_size']})")
        band(ax, rv["epochs"], m["running"] * 100, ARM_COLORS["batch"], "running statistics")
        band(ax, rv["epochs"], m["exact"] * 100, OKABE_ITO["sky"], "exact statistics (PreciseBN)", linestyle="--")
        ax.set_title(f"momentum {momentum:g}" + (" (PyTorch's default)" if momentum == 0.1 else
                                                 " (Keras's default 0.99)" if momentum == 0.01 else ""), fontsize=10)
        ax.set_xlabel("epochs of training")
        ax.set_ylabel("test error (%)")
        ax.set_ylim(0, min(40, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title=f"line: mean of {rv['seeds']} seeds, band: min to max", title_fontsize=8)
    ax = axes[-1]
    for momentum, m in rv["by_momentum"].items():
        band(ax, rv["epochs"], m["mean_gap"], ARM_COLORS["batch"], f"momentum {momentum:g}",
             linestyle="-" if momentum == max(rv["by_momentum"]) else ":")
    ax.set_xlabel("epochs of training")
    ax.set_ylabel("|running mean - exact mean| / exact sd")
    ax.set_title("how far the running means lag\n(second hidden layer, mean over units)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(f"Running statistics lag behind the weights (MLP on the digits, batch size {rv['batch_size']}):\n"
                 + running_finding(rv))
    figs["running"] = fig
    return figs


def running_finding(rv: dict) -> str:
    """Per momentum, the final test error with running minus with exact statistics, mean and sd
    over seeds (paired), stated from the numbers."""
    parts = []
    for momentum, m in rv["by_momentum"].items():
        mean, sd = mean_sd((m["running"][:, -1] - m["exact"][:, -1]) * 100)
        parts.append(f"momentum {momentum:g}: {-mean:+.1f} \u00b1 {sd:.1f} points")
    return (f"test error with exact minus with running statistics after {rv['epochs'][-1]:g} epochs, "
            + "; ".join(parts))


def batchsize_demo(verbose: bool = True, plot_dir: str | None = None, quick: bool = False) -> dict:
    """Batch-statistics noise, a batch of one, running vs exact statistics, the notes' second batch.

    quick: 3 seeds and 2 epochs for the running-statistics experiment instead of 5 and 6.
    Returns dict(noise, one, running, second, figures); see the functions of the same names.
    """
    require_sklearn()
    if plot_dir is not None:
        require_matplotlib()
    data = digits_split(0)
    result = dict(noise=noise(summed_inputs(data["x_train"])), one=batch_of_one(data["x_train"]),
                  running=running_vs_exact(data, **(QUICK if quick else FULL)), second=second_batch())
    if verbose:
        _print(result)
    return finish(result, figures, plot_dir, "batchsize", verbose)
