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
    """'scaling': each person's profile across the features, raw, z-scored and min-max scaled."""
    fig = new_figure(13.0, 4.3)
    axes = fig.subplots(1, 3)
    names = [f.replace(" (", "\n(") for f in r["features"]]
    panels = [("raw: every feature on its own scale", r["x"], "value in the feature's own unit"),
              ("z-score: mean 0, std 1 per feature", r["zscore"], "standard deviations from the mean"),
              ("min-max: 0 to 1 per feature", r["minmax"], "position between min (0) and max (1)")]
    for ax, (title, data, ylabel) in zip(axes, panels):
        for k, person in enumerate(r["people"]):
            ax.plot(range(data.shape[1]), data[k], marker="o", label=person)
        ax.set_xticks(range(data.shape[1]), labels=names)
        ax.set_xlabel("feature")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(title="person", fontsize=8, ncol=2)
    fig.suptitle("Data normalization of a 6-person feature table: each line is one person across the 3 features")
    return {"scaling": fig}
