"""The invariance table of Ba et al.'s layer-norm paper (2016, Table 1), measured.

One layer with inputs X (N cases, D inputs) and weight matrix W (H units, D); its summed inputs are
``A = X W^T``. The three normalizations give the layer's normalized summed inputs:

- batch norm: ``batch_norm(A)``, one (mean, std) per unit over the N cases;
- weight norm: ``X weight_norm(W, g)^T``, each unit's weight vector scaled to length g;
- layer norm: ``layer_norm(A)``, one (mean, std) per case over the H units.

Each transformation of the weights or the data is applied, the output computed again, and the
cell says "invariant" when nothing changed (to 1e-9 relative; eps = 0 so the normalizations are
exact). Nothing is typed in: the table the paper prints is only used to check the measurement.
"""
from __future__ import annotations

import numpy as np

import fastnorm

from ._common import finish, new_figure, require_matplotlib, table
from ._style import OKABE_ITO

METHODS = ("batch norm", "weight norm", "layer norm")
TRANSFORMS = (
    "weight matrix re-scaling",
    "weight matrix re-centering",
    "weight vector re-scaling",
    "dataset re-scaling",
    "dataset re-centering",
    "single training case re-scaling",
)
HOW = {
    "weight matrix re-scaling": "W -> 3.7 W",
    "weight matrix re-centering": "W -> W + 1 c^T (same vector c added to every unit's weights)",
    "weight vector re-scaling": "row i of W -> s_i W[i] (each unit its own s_i > 0)",
    "dataset re-scaling": "X -> 3.7 X",
    "dataset re-centering": "X -> X + 1 c^T (same vector c added to every case)",
    "single training case re-scaling": "X[0] -> 3.7 X[0] (one case only)",
}
# the same, short enough for a figure's tick labels
SHORT = {
    "weight matrix re-scaling": "W -> 3.7 W",
    "weight matrix re-centering": "W[i] -> W[i] + c\n(every unit i)",
    "weight vector re-scaling": "W[i] -> s_i W[i]\n(s_i > 0 per unit)",
    "dataset re-scaling": "X -> 3.7 X",
    "dataset re-centering": "X[n] -> X[n] + c\n(every case n)",
    "single training case re-scaling": "X[0] -> 3.7 X[0]\n(one case only)",
}
FORMULA = {
    "batch norm": "batch_norm(X W^T)\nper unit over cases",
    "weight norm": "X (g W[i] / |W[i]|)^T",
    "layer norm": "layer_norm(X W^T)\nper case over units",
}
# Ba, Kiros and Hinton (2016), Table 1: True = invariant. Used only to check the measurement.
PAPER = {
    "batch norm": (True, False, True, True, True, False),
    "weight norm": (True, False, True, False, False, False),
    "layer norm": (True, True, False, True, False, True),
}
TOL = 1e-9
SCALE = 3.7


def layer_outputs(X, W, g) -> dict:
    """The normalized summed inputs of one layer under each method, shape (N, H)."""
    A = X @ W.T
    return {
        "batch norm": fastnorm.batch_norm(A, eps=0.0),
        "weight norm": X @ fastnorm.weight_norm(W, g, axis=0).T,
        "layer norm": fastnorm.layer_norm(A, eps=0.0),
    }


def transformations(X, W, rng) -> dict:
    """Each transformation as the new (X, W)."""
    c_in = rng.standard_normal(X.shape[1])
    scales = rng.uniform(0.3, 4.0, W.shape[0])
    X_case = X.copy()
    X_case[0] *= SCALE
    return {
        "weight matrix re-scaling": (X, SCALE * W),
        "weight matrix re-centering": (X, W + c_in[None, :]),
        "weight vector re-scaling": (X, scales[:, None] * W),
        "dataset re-scaling": (SCALE * X, W),
        "dataset re-centering": (X + c_in[None, :], W),
        "single training case re-scaling": (X_case, W),
    }


def relative_change(before, after) -> float:
    """max |after - before| relative to the output's scale."""
    return float(np.abs(after - before).max() / max(1.0, float(np.abs(before).max())))


def invariance_demo(verbose: bool = True, plot_dir: str | None = None, seed: int = 0) -> dict:
    """Measure each cell of the invariance table.

    Returns a dict: 'methods', 'transforms', 'change' and 'invariant' ({method: {transform:
    value}}, the measured relative change of the output and whether it is below 'tol'), 'X',
    'W', 'g' (the layer used), 'transformed' ({transform: (X', W')}), 'paper' (the paper's
    table) and 'matches_paper'.
    """
    if plot_dir is not None:
        require_matplotlib()
    rng = np.random.default_rng(seed)
    N, D, H = 16, 5, 6
    X = rng.standard_normal((N, D)) + 0.5
    W = rng.standard_normal((H, D))
    g = rng.uniform(0.5, 2.0, H)
    base = layer_outputs(X, W, g)
    change: dict[str, dict[str, float]] = {m: {} for m in METHODS}
    transformed = transformations(X, W, rng)
    for name, (X2, W2) in transformed.items():
        after = layer_outputs(X2, W2, g)
        for m in METHODS:
            change[m][name] = relative_change(base[m], after[m])
    invariant = {m: {t: change[m][t] < TOL for t in TRANSFORMS} for m in METHODS}
    matches = all(invariant[m][t] == PAPER[m][i] for m in METHODS for i, t in enumerate(TRANSFORMS))
    result = dict(methods=METHODS, transforms=TRANSFORMS, change=change, invariant=invariant, tol=TOL,
                  X=X, W=W, g=g, transformed=transformed, paper={m: dict(zip(TRANSFORMS, PAPER[m])) for m in METHODS},
                  matches_paper=matches)
    if verbose:
        _print(result)
    return finish(result, figures, plot_dir, "invariance", verbose)


def _cell(r, m, t) -> str:
    c = r["change"][m][t]
    return f"invariant ({c:.0e})" if r["invariant"][m][t] else f"no ({c:.2f})"


def _print(r: dict) -> None:
    print("One layer, X (16 cases x 5 inputs), W (6 units x 5), summed inputs A = X W^T; eps = 0.")
    print("Each cell: the largest change of the normalized output when the weights or data are")
    print(f"transformed, relative to its scale; 'invariant' below {r['tol']:g}.\n")
    rows = [[t, *[_cell(r, m, t) for m in r["methods"]]] for t in r["transforms"]]
    print(table(["transformation", *r["methods"]], rows))
    print()
    for t in r["transforms"]:
        print(f"  {t}: {HOW[t]}")
    verdict = "matches" if r["matches_paper"] else "DOES NOT match"
    print(f"\nThe measured table {verdict} Table 1 of Ba, Kiros and Hinton (2016).")


def _only_invariant(r: dict) -> str:
    """'Only layer norm is invariant to ...; only batch norm to ...', from the measured table."""
    parts: list[str] = []
    for m in r["methods"]:
        alone = [t for t in r["transforms"] if r["invariant"][m][t]
                 and not any(r["invariant"][o][t] for o in r["methods"] if o != m)]
        if alone:
            parts.append(f"only {m} {'is invariant to ' if not parts else 'to '}{' and '.join(alone)}")
    text = "; ".join(parts) if parts else "no normalization is invariant to a transformation the others are not"
    return text[0].upper() + text[1:]


def figures(r: dict) -> dict:
    """'table': methods x transformations, coloured invariant / not, with the measured change."""
    from matplotlib.colors import ListedColormap

    methods, transforms = r["methods"], r["transforms"]
    inv = np.array([[r["invariant"][m][t] for t in transforms] for m in methods], dtype=float)
    fig = new_figure(13.0, 4.6)
    ax = fig.subplots()
    light = {True: "#A6CEE3", False: "#FDD9A5"}            # light blue / light orange (Okabe-Ito hues)
    ax.imshow(inv, cmap=ListedColormap([light[False], light[True]]), vmin=0, vmax=1, aspect="auto")
    for i, m in enumerate(methods):
        for j, t in enumerate(transforms):
            c = r["change"][m][t]
            text = f"invariant\nchange {c:.0e}" if inv[i, j] else f"changes\nby {c:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, fontweight="bold" if inv[i, j] else "normal",
                    color="black" if inv[i, j] else OKABE_ITO["vermillion"])
    ax.set_xticks(range(len(transforms)), labels=[f"{t.replace(' re-', chr(10) + 're-')}\n{SHORT[t]}"
                                                  for t in transforms], fontsize=8.5)
    ax.set_yticks(range(len(methods)), labels=[f"{m}\n{FORMULA[m]}" for m in methods], fontsize=8.5)
    ax.set_xticks(np.arange(len(transforms) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(methods) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=3)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("transformation of the weights W (units x inputs) or the data X (cases x inputs); "
                  "c: one random vector, s_i: a random factor per unit")
    ax.set_ylabel("normalized summed inputs")
    same = "the same pattern as" if r["matches_paper"] else "NOT the pattern of"
    ax.set_title(f"{_only_invariant(r)}.\nMeasured on one layer (blue: max relative change < 1e-9, orange: "
                 f"changed; eps = 0): {same} Ba et al.'s Table 1 (2016)", fontsize=10)
    return {"table": fig}
