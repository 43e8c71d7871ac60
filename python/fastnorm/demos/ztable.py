"""The notes' f1, f2 -> z1, z2, z3 table: batch norm normalizes each column, layer norm each row.

Two input features f1, f2 feed three hidden nodes, ``z_j = f1 w_a + f2 w_b + b_j``; the table
lists the 5 training rows of one mini-batch. Batch norm gives every node (column) its own mean and
std over the 5 rows; layer norm gives every row its own mean and std over the 3 nodes. Both then
scale and shift with per-node gamma_j, beta_j (here 1 and 0, their initial values).
"""
from __future__ import annotations

import numpy as np

import fastnorm

from ._common import annotate_heatmap, finish, new_figure, require_matplotlib, table

# the notes' table (seeds 000/001): columns f1, f2, z1, z2, z3
TABLE = np.array([
    [2, 3, 7, 5, 4],
    [1, 1, 2, 3, 4],
    [5, 4, 1, 2, 3],
    [6, 1, 7, 5, 6],
    [7, 1, 3, 3, 4],
], dtype=np.float64)
F_NAMES = ("f1", "f2")
Z_NAMES = ("z1", "z2", "z3")
EPS = 0.0   # the textbook (x - mean) / std, as in the notes

# the worked values the notes write down, with the note that "all values are hypothetical":
# (what, normalization, row, column of z, the notes' number); the notes' "-0.21" for z2 is left
# out: its row cannot be read from the notes
NOTES_PLACEHOLDERS = (
    ("(7 - mu1) / sigma1, z1 of row 1", "batch", 0, 0, 0.36),
    ("(2 - mu1) / sigma1, z1 of row 2", "batch", 1, 0, 0.71),
    ("(4 - mu3) / sigma3, z3 of row 1", "batch", 0, 2, 0.12),
    ("(7 - mu1) / sigma1, z1 of row 1", "layer", 0, 0, 0.3),
)


def ztable_demo(verbose: bool = True, plot_dir: str | None = None) -> dict:
    """Batch norm and layer norm of the z columns of the notes' table, with the statistics used.

    Returns a dict: 'f' (5, 2) and 'z' (5, 3) from the table; 'batch_norm' (5, 3) with
    'batch_mean', 'batch_std' (3,), one per column; 'layer_norm' (5, 3) with 'layer_mean',
    'layer_std' (5,), one per row; 'placeholders', rows of (what, normalization, notes' value,
    computed value); 'figures' (paths of the PNGs written).
    """
    if plot_dir is not None:
        require_matplotlib()
    f, z = TABLE[:, :2].copy(), TABLE[:, 2:].copy()
    bn, bn_mean, bn_rstd = fastnorm.batch_norm(z, eps=EPS, return_stats=True)      # per column
    ln, ln_mean, ln_rstd = fastnorm.layer_norm(z, eps=EPS, return_stats=True)      # per row
    outputs = {"batch": bn, "layer": ln}
    placeholders = [(what, kind, value, float(outputs[kind][i, j])) for what, kind, i, j, value in NOTES_PLACEHOLDERS]
    result = dict(f=f, z=z, batch_norm=bn, batch_mean=bn_mean, batch_std=1.0 / bn_rstd,
                  layer_norm=ln, layer_mean=ln_mean, layer_std=1.0 / ln_rstd, eps=EPS,
                  placeholders=placeholders)
    if verbose:
        _print(result)
    return finish(result, figures, plot_dir, "ztable", verbose)


def _print(r: dict) -> None:
    f, z = r["f"], r["z"]
    rows = [[f"row {i + 1}", *f[i], *z[i]] for i in range(len(z))]
    print(table(["the notes' table", *F_NAMES, *Z_NAMES], rows, digits=0))
    print("  z1, z2, z3 are three hidden nodes fed by f1, f2 (z_j = f1 w + f2 w' + b_j); 5 rows = 5 training cases.\n")

    rows = [[f"row {i + 1}", *r["batch_norm"][i]] for i in range(len(z))]
    rows += [["mean (per column)", *r["batch_mean"]], ["std (per column)", *r["batch_std"]]]
    print(table(["batch norm: each column", *Z_NAMES], rows,
                title="Batch norm: one mean and std per node (column), over the 5 rows"))
    print()
    rows = [[f"row {i + 1}", *r["layer_norm"][i], r["layer_mean"][i], r["layer_std"][i]] for i in range(len(z))]
    print(table(["layer norm: each row", *Z_NAMES, "mean (row)", "std (row)"], rows,
                title="Layer norm: one mean and std per row (training case), over its 3 nodes"))
    print("  (biased std, eps = 0; every output is then scaled by gamma_j and shifted by beta_j, here 1 and 0)\n")

    rows = [[what, kind + " norm", notes, value] for what, kind, notes, value in r["placeholders"]]
    print(table(["worked value in the notes", "normalization", "notes", "computed"], rows,
                title='The notes\' worked values are placeholders ("all values are hypothetical"); the real ones:'))


def figures(r: dict) -> dict:
    """'table': the z table, its batch-norm (per column) and layer-norm (per row) versions."""
    fig = new_figure(13.0, 4.4)
    ax_z, ax_bn, ax_ln = fig.subplots(1, 3)
    rows = [f"row {i + 1}" for i in range(len(r["z"]))]
    annotate_heatmap(ax_z, r["z"], digits=0, cmap="Greys", vmax=12, row_labels=rows, col_labels=Z_NAMES)
    ax_z.set_title("summed inputs z (the notes' table)", fontsize=10)
    ax_z.set_xlabel("hidden node")
    ax_z.set_ylabel("training case")

    bn_cols = [f"{n}\nmean {m:.2f}\nstd {s:.2f}" for n, m, s in zip(Z_NAMES, r["batch_mean"], r["batch_std"])]
    annotate_heatmap(ax_bn, r["batch_norm"], vmax=2.0, row_labels=rows, col_labels=bn_cols)
    ax_bn.set_title("batch norm: each column uses its own mean, std", fontsize=10)
    ax_bn.set_xlabel("hidden node, with its column statistics")

    ln_rows = [f"{name}: mean {m:.2f}, std {s:.2f}" for name, m, s in zip(rows, r["layer_mean"], r["layer_std"])]
    im = annotate_heatmap(ax_ln, r["layer_norm"], vmax=2.0, row_labels=ln_rows, col_labels=Z_NAMES)
    ax_ln.set_title("layer norm: each row uses its own mean, std", fontsize=10)
    ax_ln.set_xlabel("hidden node")
    fig.colorbar(im, ax=[ax_bn, ax_ln], shrink=0.8, label="normalized value (x - mean) / std")
    fig.suptitle("The same 5 x 3 table normalized two ways: batch norm down the columns, layer norm along the rows")
    return {"table": fig}
