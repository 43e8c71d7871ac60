"""Ba, Kiros and Hinton's figure 6 in small: layer norm vs batch norm vs none at batch sizes 128 and 4.

Their figure trains a 784-1000-1000-10 network on permutation-invariant MNIST and shows that
layer norm is robust to the batch size while batch norm suffers at a batch of 4. Here: the 8x8
digits of scikit-learn (1,347 training and 450 test images, pixels standardized with the
training set's statistics), a 64-64-64-10 MLP (Linear, norm, ReLU twice), Adam, the same epochs
for both batch sizes, the same initial weights for every arm of a seed. Batch norm is evaluated
with its running statistics (momentum 0.1), as at test time.

What it does not show: the digits are easy (every arm ends within a few percent of error), the
networks are small, and the learning rate was not tuned per arm or batch size; a batch of 4 also
takes 32 times as many (noisier) steps per epoch as a batch of 128.
"""
from __future__ import annotations

import numpy as np

from . import _mlp
from ._common import finish, new_figure, require_matplotlib, table
from ._digits import digits_split, require_sklearn
from ._style import ARM_COLORS, band, mean_sd, pm

BATCH_SIZES = (128, 4)
HIDDEN = (64, 64)
LR = 3e-3
FULL = dict(seeds=5, epochs=8)
QUICK = dict(seeds=3, epochs=3)


# the arms: batch norm is evaluated twice, with its running statistics (EMA, as trained) and with
# exact statistics of the whole training set under the final weights (PreciseBN)
ARMS = ("none", "batch", "batch_exact", "layer")
LABELS = {"none": "no normalization", "batch": "batch norm (BN), running statistics",
          "batch_exact": "BN, exact statistics (PreciseBN)", "layer": "layer norm (LN)"}


def run(seeds: int, epochs: int, split_seed: int = 0) -> dict:
    """Train every (batch size, norm, seed); test loss and error after every epoch.

    Returns dict(epochs (E+1,), curves[batch_size][arm] = dict(loss (S, E+1), error (S, E+1)),
    final[batch_size][arm] = dict(loss (S,), error (S,)), config); arms as in ARMS.
    """
    data = digits_split(split_seed)
    xt, yt = data["x_test"], data["y_test"]
    curves, final = {}, {}
    for bs in BATCH_SIZES:
        curves[bs] = {arm: dict(loss=np.zeros((seeds, epochs + 1)), error=np.zeros((seeds, epochs + 1)))
                      for arm in ARMS}
        for norm in _mlp.NORMS:
            for seed in range(seeds):
                def record(model, epoch, seed=seed, norm=norm):
                    k = int(round(epoch))
                    c = curves[bs][norm]
                    c["loss"][seed, k], c["error"][seed, k] = _mlp.evaluate(model, xt, yt)
                    if norm == "batch":
                        c = curves[bs]["batch_exact"]
                        exact = model.exact_statistics(data["x_train"])
                        c["loss"][seed, k], c["error"][seed, k] = _mlp.evaluate(model, xt, yt, running=exact)

                _mlp.train(data, norm, bs, seed, epochs, LR, hidden=HIDDEN, on_eval=record)
        final[bs] = {arm: dict(loss=c["loss"][:, -1].copy(), error=c["error"][:, -1].copy())
                     for arm, c in curves[bs].items()}
    config = dict(seeds=seeds, epochs=epochs, lr=LR, hidden=HIDDEN, batch_sizes=BATCH_SIZES,
                  train_size=len(data["x_train"]), test_size=len(data["x_test"]))
    return dict(epochs=np.arange(epochs + 1), curves=curves, final=final, config=config)


def _print(r: dict) -> None:
    c = r["config"]
    print(f"Ba et al.'s figure 6 in small: digits ({c['train_size']} train / {c['test_size']} test), MLP "
          f"64-{'-'.join(map(str, c['hidden']))}-10,\nAdam lr {c['lr']:g}, {c['epochs']} epochs, "
          f"{c['seeds']} seeds; batch norm evaluated with running statistics.\n")
    rows = [[f"batch {bs}, {LABELS[arm]}", pm(f["error"], 2, 100), pm(f["loss"], 3)]
            for bs, arms in r["final"].items() for arm, f in arms.items()]
    print(table(["", "test error % (mean +- sd)", "test loss"], rows))


def finding(r: dict) -> str:
    """What the final test errors show, stated from the numbers: at each batch size, batch norm's
    error minus layer norm's, mean and sd over seeds (paired: the same initial weights); a gap
    within one sd is called a tie."""
    parts = []
    for bs in BATCH_SIZES:
        m, s = mean_sd((r["final"][bs]["batch"]["error"] - r["final"][bs]["layer"]["error"]) * 100)
        verdict = "tie" if abs(m) <= s else ("BN worse" if m > 0 else "BN better")
        parts.append(f"batch {bs}: {verdict} (BN - LN test error {m:+.1f} \u00b1 {s:.1f} points)")
    return "; ".join(parts)


def exact_statistics_effect(r: dict) -> str:
    """How much exact statistics (PreciseBN) change batch norm's final test error, per batch size:
    whether BN's error comes from its running averages or from training on batch statistics."""
    parts = []
    for bs in BATCH_SIZES:
        m, s = mean_sd((r["final"][bs]["batch_exact"]["error"] - r["final"][bs]["batch"]["error"]) * 100)
        parts.append(f"batch {bs}: {m:+.2f} +- {s:.2f} points")
    return "exact statistics instead of running ones change BN's test error by " + ", ".join(parts)


def figures(r: dict) -> dict:
    """'curves': test loss and error against epochs, one column per batch size."""
    fig = new_figure(11.5, 7.2)
    axes = fig.subplots(2, len(BATCH_SIZES), sharex=True, sharey="row")
    for col, bs in enumerate(BATCH_SIZES):
        for row, key in enumerate(("loss", "error")):
            ax = axes[row, col]
            for arm in ARMS:
                runs = r["curves"][bs][arm][key] * (100 if key == "error" else 1)
                exact = arm == "batch_exact"
                band(ax, r["epochs"], runs, ARM_COLORS["batch" if exact else arm], LABELS[arm],
                     linestyle="--" if exact else "-", marker="" if exact else ".")
            ax.grid(alpha=0.3)
        axes[0, col].set_title(f"batch size {bs} ({r['config']['train_size'] // bs} steps per epoch)")
        axes[0, col].set_yscale("log")
        axes[1, col].set_ylim(0, 25)
        axes[1, col].set_xlabel("epochs of training")
    axes[0, 0].set_ylabel("test loss (cross-entropy, log scale)")
    axes[1, 0].set_ylabel("test error (%)")
    axes[0, 0].legend(title=f"line: mean of {r['config']['seeds']} seeds\nband: min to max", fontsize=9)
    fig.suptitle("Ba et al.'s figure 6 in small (8x8 digits, MLP 64-64-64-10, Adam): "
                 + "\n" + finding(r), fontsize=11)
    return {"curves": fig}


def bafig6_demo(verbose: bool = True, plot_dir: str | None = None, quick: bool = False) -> dict:
    """LN vs BN vs none on the digits at batch sizes 128 and 4; returns every number shown.

    quick: 3 seeds and 3 epochs instead of 5 and 8. Returns run()'s dict plus 'figures'.
    """
    require_sklearn()
    if plot_dir is not None:
        require_matplotlib()
    result = run(**(QUICK if quick else FULL))
    if verbose:
        _print(result)
        print("\n" + finding(result).replace("\u00b1", "+-"))
        print(exact_statistics_effect(result))
    return finish(result, figures, plot_dir, "bafig6", verbose)
