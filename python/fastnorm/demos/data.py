"""Data normalization, as in the notes: z-score and min-max scaling of a small feature table.

Features measured in different units (years, thousands of dollars, centimetres) have very
different spreads, so whichever has the largest numbers dominates distances and gradients. Both
scalings give every feature the same footing: the z-score maps each feature to mean 0, std 1;
min-max scaling maps its smallest value to 0 and its largest to 1. The table is
``(people, features)``, so the feature axis is ``axis=1``.
"""
from __future__ import annotations

import numpy as np

import fastnorm

from ._common import finish, new_figure, require_matplotlib, table
from ._style import OKABE_ITO

PEOPLE = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fay")
FEATURES = ("age (years)", "income (k$/year)", "height (cm)")
# (people, features)
TABLE = np.array([
    [23.0, 31.0, 162.0],
    [35.0, 58.0, 181.0],
    [47.0, 72.0, 175.0],
    [52.0, 120.0, 158.0],
    [29.0, 45.0, 190.0],
    [61.0, 88.0, 169.0],
])
OUTLIER = (3, 1, 400.0)      # Dara's income becomes 400 k$/year


def variance_share(x: np.ndarray) -> np.ndarray:
    """Each feature's share of the total variance: its share of the squared distances between people."""
    v = np.var(x, axis=0)
    return v / v.sum()


def data_demo(verbose: bool = True, plot_dir: str | None = None) -> dict:
    """z-score (fastnorm.standardize) and min-max scaling (fastnorm.min_max_scale) of TABLE.

    Returns a dict: 'x' (people, features), 'mean', 'std', 'min', 'max' per feature, 'zscore' and
    'minmax' (the scaled tables), 'share_raw', 'share_zscore', 'share_minmax' (each feature's share
    of the total variance), and the same two scalings with one outlier ('x_outlier',
    'zscore_outlier', 'minmax_outlier', 'others_range_*': the spread of the other five incomes).
    """
    if plot_dir is not None:
        require_matplotlib()
    x = TABLE.copy()
    z = fastnorm.standardize(x, axis=1)
    mm = fastnorm.min_max_scale(x, axis=1)
    xo = x.copy()
    i, j, value = OUTLIER
    xo[i, j] = value
    zo = fastnorm.standardize(xo, axis=1)
    mmo = fastnorm.min_max_scale(xo, axis=1)
    others = np.arange(len(x)) != i

    def spread(a):
        return float(np.ptp(a[others, j]))

    result = dict(
        x=x, people=PEOPLE, features=FEATURES,
        mean=x.mean(axis=0), std=x.std(axis=0), min=x.min(axis=0), max=x.max(axis=0),
        zscore=z, minmax=mm,
        share_raw=variance_share(x), share_zscore=variance_share(z), share_minmax=variance_share(mm),
        x_outlier=xo, zscore_outlier=zo, minmax_outlier=mmo, outlier=OUTLIER,
        others_range_zscore=spread(z), others_range_zscore_outlier=spread(zo),
        others_range_minmax=spread(mm), others_range_minmax_outlier=spread(mmo),
    )
    if verbose:
        _print(result)
    return finish(result, figures, plot_dir, "data", verbose)


def _print(r: dict) -> None:
    names = [f.split(" (")[0] for f in r["features"]]
    rows = [[p, *r["x"][k]] for k, p in enumerate(r["people"])]
    rows += [["mean", *r["mean"]], ["std", *r["std"]], ["min", *r["min"]], ["max", *r["max"]]]
    print(table(["raw table", *r["features"]], rows, digits=1))
    print()
    rows = [[p, *r["zscore"][k], *r["minmax"][k]] for k, p in enumerate(r["people"])]
    print(table(["scaled", *[f"z {n}" for n in names], *[f"min-max {n}" for n in names]], rows, digits=2))
    print("  z = (x - mean) / std per feature: fastnorm.standardize(x, axis=1)")
    print("  min-max = (x - min) / (max - min) per feature: fastnorm.min_max_scale(x, axis=1)")
    print("  (axis=1: the features are the columns of this (people, features) table)\n")
    rows = [["raw", *r["share_raw"]], ["z-score", *r["share_zscore"]], ["min-max", *r["share_minmax"]]]
    print(table(["share of the total variance", *names], rows, digits=2))
    top = int(np.argmax(r["share_raw"]))
    print(f"  Raw, {names[top]} alone carries {r['share_raw'][top]:.0%} of the variance, so it dominates any "
          "distance between people;")
    print("  scaled, the features contribute about equally (exactly 1/3 each with the z-score).\n")
    i, j, value = r["outlier"]
    print(f"With one outlier ({r['people'][i]}'s income {value:g} instead of {r['x'][i, j]:g}), the other five "
          "incomes are squeezed:")
    print(f"  their spread after min-max: {r['others_range_minmax']:.2f} -> {r['others_range_minmax_outlier']:.2f};"
          f"  after z-score: {r['others_range_zscore']:.2f} -> {r['others_range_zscore_outlier']:.2f} (std units)")


def figures(r: dict) -> dict:
    """'scaling': each feature's share of the variance raw and scaled; the scaled values; the outlier."""
    fig = new_figure(13.5, 4.8)
    ax_share, ax_vals, ax_out = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.2, 1]})
    names = [f.split(" (")[0] for f in r["features"]]
    units = [f.replace(" (", "\n(") for f in r["features"]]
    idx = np.arange(len(names))
    w = 0.27
    kinds = (("raw", r["share_raw"], OKABE_ITO["grey"]),
             ("z-score: (x - mean) / std", r["share_zscore"], OKABE_ITO["blue"]),
             ("min-max: (x - min) / (max - min)", r["share_minmax"], OKABE_ITO["orange"]))
    for k, (label, share, color) in enumerate(kinds):
        bars = ax_share.bar(idx + (k - 1) * w, share, w, color=color, label=label)
        ax_share.bar_label(bars, labels=[f"{v:.0%}" for v in share], fontsize=7)
    ax_share.set_xticks(idx, labels=units)
    ax_share.set_ylabel("share of the total variance (of squared distances)")
    ax_share.set_ylim(0, 1)
    ax_share.set_title("each feature's share of the variance,\nraw and after scaling per feature", fontsize=10)
    ax_share.legend(fontsize=8, loc="upper left")

    markers = ("o", "s", "^", "D", "v", "P")           # one per person
    for k, person in enumerate(r["people"]):
        ax_vals.scatter(idx - 0.12, r["zscore"][k], color=OKABE_ITO["blue"], marker=markers[k], s=36)
        ax_vals.scatter([], [], color="black", marker=markers[k], s=30, label=person)        # legend: marker only
        ax_vals.scatter(idx + 0.12, r["minmax"][k], color=OKABE_ITO["orange"], marker=markers[k], s=36)
    ax_vals.axhline(0, color="black", linewidth=0.8)
    ax_vals.axhline(1, color=OKABE_ITO["orange"], linewidth=0.8, linestyle=":")
    ax_vals.set_xticks(idx, labels=units)
    ax_vals.set_ylabel("scaled value")
    ax_vals.set_title("the 6 people after scaling: z-score (blue, left of each\nfeature) and min-max (orange, right; "
                      "0 to 1)", fontsize=10)
    ax_vals.set_ylim(-1.6, 2.5)
    ax_vals.legend(title="person (marker)", fontsize=7, title_fontsize=8, ncol=6, loc="upper center",
                   handletextpad=0.1, columnspacing=0.8)
    ax_vals.grid(alpha=0.3, axis="y")

    i, j, value = r["outlier"]
    others = np.arange(len(r["x"])) != i
    rows = (("min-max", r["minmax"], r["minmax_outlier"], OKABE_ITO["orange"]),
            ("z-score", r["zscore"], r["zscore_outlier"], OKABE_ITO["blue"]))
    for k, (label, before, after, color) in enumerate(rows):
        y0, y1 = 2 * k + 1, 2 * k
        ax_out.scatter(before[others, j], np.full(others.sum(), y0), color=color, s=36)
        ax_out.scatter(after[others, j], np.full(others.sum(), y1), color=color, s=36, facecolor="white")
        for y, vals in ((y0, before[others, j]), (y1, after[others, j])):
            ax_out.text(vals.max() + 0.12, y, f"spread {np.ptp(vals):.2f}", va="center", fontsize=8)
    ax_out.set_yticks(range(4), labels=["min-max, with the outlier", "min-max, the table as is",
                                        "z-score, with the outlier", "z-score, the table as is"])
    ax_out.set_xlabel(f"scaled income of the other {others.sum()} people")
    ax_out.set_xlim(-1.8, 2.6)
    ax_out.set_title(f"one outlier ({r['people'][i]}'s income {r['x'][i, j]:g} -> {value:g} k$)\nsqueezes "
                     "everyone else's scaled income", fontsize=10)
    ax_out.grid(alpha=0.3, axis="x")
    top = int(np.argmax(r["share_raw"]))
    fig.suptitle(f"Scaling each feature of a 6-person table: raw, {names[top]} carries {r['share_raw'][top]:.0%} of the "
                 f"variance; after the z-score every feature carries 1/3, after min-max "
                 f"{r['share_minmax'].min():.0%}-{r['share_minmax'].max():.0%}.\nOne outlier shrinks the other incomes' "
                 f"min-max spread from {r['others_range_minmax']:.2f} to {r['others_range_minmax_outlier']:.2f}")
    return {"scaling": fig}
