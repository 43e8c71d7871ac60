"""Why batch norm breaks on zero-padded sequences while layer norm does not.

The lecture's batch: "Hi Rohan" (2 tokens) and "How are you today" (4 tokens), 3-dim embeddings
with the notes' values, padded to length 4. Batch norm takes one (mean, var) per embedding
dimension over every position of the batch, so the two padding rows of zeros pull the statistics
towards 0; ``mask=`` restricts them to the 6 real tokens. Layer norm takes one (mean, var) per
token, over its own 3 values, so padding never touches a real token and a sentence normalizes the
same alone or in any batch.

Then the notes' larger case: 100 sentences of average length 20 padded to the longest, 60.
"""
from __future__ import annotations

import numpy as np

import fastnorm

from ._common import annotate_heatmap, finish, new_figure, require_matplotlib, table, vec
from ._style import OKABE_ITO

SENTENCES = (("Hi", "Rohan"), ("How", "are", "you", "today"))
LENGTHS = (2, 4)
# (2 sentences, 4 positions, 3 embedding dims), the notes' values; the zero rows are padding
EMBEDDINGS = np.array([
    [[0.2, 0.45, 0.71], [0.21, 0.3, 0.8], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    [[0.1, 0.5, 0.34], [0.1, 0.0, 0.25], [0.33, 0.56, 0.9], [0.11, 0.4, 0.54]],
])
EPS = 1e-5          # the library's default eps, used by every call here

# the notes' larger case
LARGE_SENTENCES, LARGE_MEAN_LENGTH, LARGE_MAX_LENGTH = 100, 20, 60


def token_labels(lengths=LENGTHS, words=SENTENCES, max_len: int = 4) -> list[str]:
    """One label per position of the padded batch: the word, or '<pad>'."""
    return [words[s][t] if t < lengths[s] else "<pad>" for s in range(len(lengths)) for t in range(max_len)]


def _var(rstd, eps=EPS):
    """The biased variance behind rstd = 1/sqrt(var + eps)."""
    return 1.0 / np.asarray(rstd, dtype=np.float64) ** 2 - eps


def small_batch() -> dict:
    """The notes' two-sentence batch: statistics and the three normalized outputs."""
    x = EMBEDDINGS.copy()
    mask = fastnorm.mask_from_lengths(LENGTHS, x.shape[1])
    plain, mean_all, rstd_all = fastnorm.batch_norm(x, eps=EPS, return_stats=True)
    masked, mean_real, rstd_real = fastnorm.batch_norm(x, eps=EPS, mask=mask, return_stats=True)
    layer = fastnorm.layer_norm(x, eps=EPS, mask=mask)
    layer_unmasked = fastnorm.layer_norm(x, eps=EPS)

    # batch-size independence: each sentence normalized on its own (its real tokens only)
    layer_alone = [fastnorm.layer_norm(x[s, :n], eps=EPS) for s, n in enumerate(LENGTHS)]
    batch_alone = [fastnorm.batch_norm(x[s, :n], eps=EPS) for s, n in enumerate(LENGTHS)]
    layer_diff = max(float(np.abs(a - layer[s, :n]).max()) for s, (a, n) in enumerate(zip(layer_alone, LENGTHS)))
    batch_diff = max(float(np.abs(b - masked[s, :n]).max()) for s, (b, n) in enumerate(zip(batch_alone, LENGTHS)))
    return dict(
        x=x, mask=mask, lengths=np.array(LENGTHS), tokens=token_labels(), eps=EPS,
        mean_all=mean_all, var_all=_var(rstd_all), mean_real=mean_real, var_real=_var(rstd_real),
        batch_norm=plain, masked_batch_norm=masked, layer_norm=layer,
        layer_norm_unmasked_real_diff=float(np.abs(layer_unmasked - layer)[mask].max()),
        layer_norm_alone=layer_alone, batch_norm_alone=batch_alone,
        layer_alone_max_diff=layer_diff, batch_alone_max_diff=batch_diff,
    )


def large_lengths(seed: int = 0, n: int = LARGE_SENTENCES, mean_length: int = LARGE_MEAN_LENGTH,
                  max_length: int = LARGE_MAX_LENGTH) -> np.ndarray:
    """n sentence lengths with exactly the given mean and maximum (a skewed, gamma-like spread)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.gamma(2.0, mean_length / 2.0, n)), 2, max_length - 1).astype(np.int64)
    longest = int(rng.integers(n))
    lengths[longest] = max_length
    others = np.flatnonzero(np.arange(n) != longest)
    while (excess := int(lengths.sum()) - n * mean_length) != 0:
        i = int(rng.choice(others))
        step = -1 if excess > 0 else 1
        if 2 <= lengths[i] + step <= max_length - 1:
            lengths[i] += step
    return lengths


def large_batch(seed: int = 0) -> dict:
    """100 sentences (mean length 20, longest 60) of 3-dim embeddings, zero-padded to 60.

    Real tokens are drawn per dimension with the mean and spread of the notes' 6 tokens.
    """
    small = small_batch()
    lengths = large_lengths(seed)
    n, L, D = len(lengths), int(lengths.max()), EMBEDDINGS.shape[2]
    mask = fastnorm.mask_from_lengths(lengths, L)
    rng = np.random.default_rng(seed + 1)
    x = np.zeros((n, L, D))
    x[mask] = small["mean_real"] + np.sqrt(small["var_real"]) * rng.standard_normal((int(mask.sum()), D))

    plain, mean_pad, rstd_pad = fastnorm.batch_norm(x, eps=EPS, return_stats=True)
    masked, mean_real, rstd_real = fastnorm.batch_norm(x, eps=EPS, mask=mask, return_stats=True)
    var_pad, var_real = _var(rstd_pad), _var(rstd_real)
    real_plain, real_masked = plain[mask], masked[mask]       # (real tokens, D)
    return dict(
        lengths=lengths, x=x, mask=mask, positions=n * L, real_tokens=int(mask.sum()),
        padding_fraction=1.0 - mask.sum() / (n * L),
        mean_pad=mean_pad, mean_real=mean_real, var_pad=var_pad, var_real=var_real,
        std_pad=np.sqrt(var_pad), std_real=np.sqrt(var_real),
        mean_ratio=mean_pad / mean_real, std_ratio=np.sqrt(var_pad / var_real),
        # what the real tokens look like after normalization: should be mean 0, std 1
        out_mean_plain=real_plain.mean(axis=0), out_std_plain=real_plain.std(axis=0),
        out_mean_masked=real_masked.mean(axis=0), out_std_masked=real_masked.std(axis=0),
        batch_norm=plain, masked_batch_norm=masked,
    )


def _print_small(r: dict) -> None:
    D = r["x"].shape[2]
    print('The padded batch of the notes: "Hi Rohan" (2 tokens) and "How are you today" (4),')
    print("3-dim embeddings, padded to length 4: x has shape (2, 4, 3), 8 positions of which 6 are")
    print("real tokens and 2 are padding rows of zeros.\n")
    rows = [[f"dim {d}", r["mean_all"][d], r["mean_real"][d], r["var_all"][d], r["var_real"][d]] for d in range(D)]
    print(table(["batch-norm statistics", "mean, 8 positions", "mean, 6 real", "var, 8 positions", "var, 6 real"],
                rows, digits=4))
    print("  (8 positions: fastnorm.batch_norm(x); 6 real: fastnorm.batch_norm(x, mask=mask))\n")

    print(f"Normalized outputs (eps = {r['eps']:g}, weight 1, bias 0):")
    rows = []
    for (s, t), label in zip(np.ndindex(r["x"].shape[:2]), r["tokens"]):
        rows.append([label, vec(r["x"][s, t]), vec(r["batch_norm"][s, t]), vec(r["masked_batch_norm"][s, t]),
                     vec(r["layer_norm"][s, t])])
    print(table(["token", "x", "batch norm (padding counted)", "batch norm (mask=)", "layer norm"], rows))
    print("  Plain batch norm turns the padding into real-looking values and shifts every real token;")
    print("  masked batch norm and layer norm give 0 for padding. Layer norm without mask= gives the")
    print(f"  same real rows (max |difference| {r['layer_norm_unmasked_real_diff']:.1e}): a token's statistics are its own.\n")

    print("Batch-size independence: each sentence normalized alone (a batch of one sentence) vs. its rows")
    print("in the two-sentence batch, largest |difference| over the sentence's real tokens:")
    print(f"  layer norm alone vs. layer norm of the batch:                {r['layer_alone_max_diff']:.1e} (identical)")
    print(f"  batch norm alone vs. masked batch norm of the batch (mask=): {r['batch_alone_max_diff']:.3f} (the batch's")
    print("  statistics include the other sentence's tokens; masked, so the padding is not what differs)\n")


def _print_large(r: dict) -> None:
    lengths = r["lengths"]
    print(f"The notes' larger case: {len(lengths)} sentences, average length {lengths.mean():g}, longest "
          f"{lengths.max()}, padded to {lengths.max()}:")
    print(f"  {r['positions']} positions, {r['real_tokens']} real tokens, {r['padding_fraction']:.1%} padding.\n")
    D = len(r["mean_real"])
    rows = [[f"dim {d}", r["mean_real"][d], r["mean_pad"][d], r["std_real"][d], r["std_pad"][d],
             r["out_mean_plain"][d], r["out_std_plain"][d]] for d in range(D)]
    print(table(["", "mean, real", "mean, padded", "std, real", "std, padded", "BN out mean", "BN out std"],
                rows))
    print(f"  The padded mean is the real mean times {r['real_tokens']}/{r['positions']} = "
          f"{r['real_tokens'] / r['positions']:.3f}; the std is off by a factor "
          f"{r['std_ratio'].min():.2f} to {r['std_ratio'].max():.2f}.")
    print("  'BN out': the real tokens after plain batch norm; they should have mean 0 and std 1. With")
    print(f"  mask= they do (mean {np.abs(r['out_mean_masked']).max():.1e}, std {r['out_std_masked'].min():.3f}"
          f" to {r['out_std_masked'].max():.3f}).")


def figures(small: dict, large: dict) -> dict:
    """'batch': the notes' batch under the three normalizations; 'drift': the 100-sentence case."""
    figs = {}
    fig = new_figure(12.5, 4.6)
    axes = fig.subplots(1, 4, sharey=True)
    D = small["x"].shape[2]
    dims = [f"dim {d}" for d in range(D)]
    panels = [("input x (zeros = padding)", small["x"], "viridis", None),
              ("batch norm, padding counted", small["batch_norm"], "RdBu_r", 2.2),
              ("batch norm, mask= (real tokens)", small["masked_batch_norm"], "RdBu_r", 2.2),
              ("layer norm (per token)", small["layer_norm"], "RdBu_r", 2.2)]
    for ax, (title, data, cmap, vmax) in zip(axes, panels):
        im = annotate_heatmap(ax, data.reshape(-1, D), cmap=cmap, vmax=vmax, row_labels=small["tokens"],
                              col_labels=dims)
        ax.axhline(3.5, color="black", linewidth=2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("embedding dimension")
    axes[0].set_ylabel("position in the padded batch (token)")
    fig.colorbar(im, ax=axes[1:], shrink=0.8, label="normalized value")
    fig.suptitle('The notes\' batch, "Hi Rohan" (above the line) + "How are you today", padded to 4 tokens\n'
                 "plain batch norm shifts every token and gives the padding values; "
                 "masked batch norm and layer norm do not")
    figs["batch"] = fig

    fig = new_figure(13.5, 4.8)
    ax_len, ax_stat, ax_out = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.1, 1.1]})
    lengths = large["lengths"]
    ax_len.hist(lengths, bins=np.arange(0.5, lengths.max() + 1.5, 2), color=OKABE_ITO["grey"])
    ax_len.axvline(lengths.mean(), color=OKABE_ITO["blue"], linewidth=2, label=f"mean length {lengths.mean():g}")
    ax_len.axvline(lengths.max(), color=OKABE_ITO["vermillion"], linewidth=2, linestyle="--",
                   label=f"padded length {lengths.max()} (the longest)")
    ax_len.set_xlabel("sentence length (real tokens)")
    ax_len.set_ylabel("number of sentences")
    ax_len.set_title(f"{len(lengths)} sentence lengths: {large['padding_fraction']:.0%} of the\n"
                     f"{large['positions']} padded positions are padding", fontsize=10)
    ax_len.legend(fontsize=8)

    idx = np.arange(len(large["mean_real"]))
    w = 0.2
    real, pad = dict(color=OKABE_ITO["blue"]), dict(color="white", edgecolor=OKABE_ITO["blue"], hatch="///")
    ax_stat.bar(idx - 1.5 * w, large["mean_real"], w, label="mean, real tokens only (mask=)", **real)
    ax_stat.bar(idx - 0.5 * w, large["mean_pad"], w, label="mean, padding counted", **pad)
    real["color"], pad["edgecolor"] = OKABE_ITO["orange"], OKABE_ITO["orange"]
    ax_stat.bar(idx + 0.5 * w, large["std_real"], w, label="std, real tokens only (mask=)", **real)
    ax_stat.bar(idx + 1.5 * w, large["std_pad"], w, label="std, padding counted", **pad)
    ax_stat.set_xticks(idx, labels=[f"dim {d}" for d in idx])
    ax_stat.set_xlabel("embedding dimension")
    ax_stat.set_ylabel("batch-norm statistic of the dimension")
    ax_stat.set_title(f"batch-norm statistics per dimension: counting the\npadding multiplies every mean by "
                      f"{large['real_tokens']}/{large['positions']} = {large['real_tokens'] / large['positions']:.2f}",
                      fontsize=10)
    ax_stat.legend(fontsize=8)

    d = int(np.argmax(np.abs(large["out_mean_plain"])))
    bins = np.linspace(-4, 4, 41)
    ax_out.hist(large["masked_batch_norm"][large["mask"]][:, d], bins=bins, color=OKABE_ITO["blue"], alpha=0.55,
                label="masked batch norm (mask=)")
    ax_out.hist(large["batch_norm"][large["mask"]][:, d], bins=bins, histtype="step", linewidth=2,
                color=OKABE_ITO["vermillion"], label="batch norm, padding counted")
    grid = np.linspace(-4, 4, 200)
    n_real = int(large["mask"].sum())
    ax_out.plot(grid, n_real * (bins[1] - bins[0]) * np.exp(-grid ** 2 / 2) / np.sqrt(2 * np.pi), color="black",
                linestyle=":", label="N(0, 1): what normalizing should give")
    ax_out.set_xlabel(f"normalized value of dim {d}, real tokens only")
    ax_out.set_ylabel("number of tokens")
    ax_out.set_title(f"the {n_real} real tokens after batch norm, padding\ncounted: mean "
                     f"{large['out_mean_plain'][d]:.2f}, std {large['out_std_plain'][d]:.2f} instead of 0 and 1",
                     fontsize=10)
    ax_out.set_ylim(0, ax_out.get_ylim()[1] * 1.3)          # room for the legend
    ax_out.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{len(lengths)} sentences, average length {lengths.mean():g}, zero-padded to {lengths.max()}: "
                 "batch norm that counts the padding\ncomputes its statistics mostly from zeros and shifts every "
                 "real token; with mask= the real tokens come out with mean 0, std 1")
    figs["drift"] = fig
    return figs


def padding_demo(verbose: bool = True, plot_dir: str | None = None) -> dict:
    """The padded batch of the notes, then 100 sentences padded to 60; returns every number shown.

    Returns a dict with 'small' (the notes' batch: x, mask, mean_all/var_all over 8 positions,
    mean_real/var_real over the 6 real tokens, batch_norm, masked_batch_norm, layer_norm,
    layer_alone_max_diff, batch_alone_max_diff), 'large' (lengths, mean/std real vs. padded,
    the real tokens' output mean/std after plain and masked batch norm) and 'figures' (paths of
    the PNGs written, empty without plot_dir). ``figures(result['small'], result['large'])``
    gives the matplotlib figures themselves.
    """
    if plot_dir is not None:
        require_matplotlib()
    result = dict(small=small_batch(), large=large_batch())
    if verbose:
        _print_small(result["small"])
        _print_large(result["large"])
    return finish(result, lambda r: figures(r["small"], r["large"]), plot_dir, "padding", verbose)
