"""Which elements share one statistic in batch, layer, instance and group norm, measured.

Wu and He's group-norm paper draws an (N, C, H, W) feature map as a cube (batch N, channels C,
and the spatial positions H*W on one axis) and shades the elements normalized by one mean and
variance. Here the shading is measured, not drawn from the definitions: for each element of a
random (N, C, H, W) = (3, 6, 2, 2) tensor we add 0.5 to it alone, normalize with fastnorm, and
record which outputs change. Outputs change exactly when they share a statistic with the
perturbed element, so the sets found are the groups the statistics are taken over:

- batch norm, ``batch_norm(x, axis=1)``: one statistic per channel, over N, H and W;
- layer norm, ``layer_norm(x, axis=(1, 2, 3))``: one per sample, over C, H and W;
- instance norm, ``instance_norm(x, axis=1)``: one per (sample, channel), over H and W;
- group norm, ``group_norm(x, 2, axis=1)``: one per (sample, group of C/2 = 3 channels).

What it does not show: which of these suits which model; only where the statistics come from.
"""
from __future__ import annotations

import numpy as np

import fastnorm

from ._common import finish, new_figure, require_matplotlib, table
from ._style import ARM_COLORS, OKABE_ITO

SHAPE = (3, 6, 2, 2)          # (N, C, H, W)
GROUPS = 2
DELTA = 0.5
NORMS = {
    "batch": ("batch norm", lambda x: fastnorm.batch_norm(x, axis=1)),
    "layer": ("layer norm", lambda x: fastnorm.layer_norm(x, axis=(1, 2, 3))),
    "instance": ("instance norm", lambda x: fastnorm.instance_norm(x, axis=1)),
    "group": (f"group norm, {GROUPS} groups", lambda x: fastnorm.group_norm(x, GROUPS, axis=1)),
}


def sharing_sets(normalize, x, delta: float = DELTA, tol: float = 1e-12) -> np.ndarray:
    """(E, E) boolean matrix over the E elements of x (C order): [i, j] is True when adding delta
    to element i alone changes output j by more than tol."""
    base = normalize(x)
    shares = np.zeros((x.size, x.size), dtype=bool)
    for i in range(x.size):
        bumped = x.copy()
        bumped.flat[i] += delta
        shares[i] = (np.abs(normalize(bumped) - base) > tol).ravel()
    return shares


def group_labels(shares: np.ndarray, shape) -> np.ndarray:
    """Number the sets of elements that share statistics, 0, 1, ... in order of first element."""
    labels = np.full(shares.shape[0], -1)
    for i in range(shares.shape[0]):
        if labels[i] < 0:
            labels[shares[i]] = labels.max() + 1
    return labels.reshape(shape)


def measure(seed: int = 0) -> dict:
    """For each norm: 'shares' (E, E), 'labels' (N, C, H, W) group numbers, 'groups' (how many),
    'size' (elements per group, all equal), and 'symmetric' (i changes j exactly when j changes i)."""
    x = np.random.default_rng(seed).standard_normal(SHAPE)
    out = {}
    for key, (name, normalize) in NORMS.items():
        shares = sharing_sets(normalize, x)
        labels = group_labels(shares, SHAPE)
        sizes = np.bincount(labels.ravel())
        out[key] = dict(name=name, shares=shares, labels=labels, groups=len(sizes), size=int(sizes[0]),
                        equal_sizes=bool((sizes == sizes[0]).all()), symmetric=bool((shares == shares.T).all()))
    return dict(shape=SHAPE, x=x, norms=out)


def _print(r: dict) -> None:
    N, C, H, W = r["shape"]
    print(f"An (N, C, H, W) = {r['shape']} tensor; each element bumped by {DELTA} in turn, the outputs that\n"
          "change are the elements sharing its statistics:\n")
    rows = [[v["name"], v["groups"], v["size"], _over(v["labels"])] for v in r["norms"].values()]
    print(table(["", "statistics (groups)", "elements per group", "a group spans"], rows))


def _over(labels) -> str:
    """Which axes one group spans, read off the measured labels: the axes along which group 0 extends."""
    first = np.argwhere(labels == 0)
    names = [name for axis, name in enumerate("NCHW") if len(np.unique(first[:, axis])) > 1]
    return ", ".join(names)


def figures(r: dict) -> dict:
    """'cubes': the four cubes, the elements sharing element (0, 0, 0, 0)'s statistics shaded."""
    N, C, H, W = r["shape"]
    fig = new_figure(14, 5.0)
    for k, (key, v) in enumerate(r["norms"].items()):
        ax = fig.add_subplot(1, 4, k + 1, projection="3d")
        # cube axes as Wu and He draw them: x = sample N, y = channel C (depth), z = position H*W
        shaded = (v["labels"] == v["labels"][0, 0, 0, 0]).reshape(N, C, H * W)[:, :, ::-1]
        face = np.empty(shaded.shape, dtype=object)
        face[shaded] = ARM_COLORS[key]
        face[~shaded] = "#FFFFFF"
        ax.voxels(np.ones(shaded.shape, dtype=bool), facecolors=face, edgecolor=OKABE_ITO["grey"], linewidth=0.4)
        ax.set_xlabel("N (samples)", labelpad=-10)
        ax.set_ylabel("C (channels)", labelpad=-10)
        ax.set_zlabel("H, W (positions)", labelpad=-10)
        ax.set_xticks([]), ax.set_yticks([]), ax.set_zticks([])
        ax.set_box_aspect((N, C, H * W), zoom=0.95)
        ax.view_init(elev=20, azim=-60)
        ax.set_title(f"{v['name']}\n{v['groups']} statistics, each over {v['size']} elements\n"
                     f"({_over(v['labels'])})", fontsize=10, y=1.0, pad=-14)
    across = [key for key, v in r["norms"].items() if "N" in _over(v["labels"])]
    inside = [key for key, v in r["norms"].items() if "N" not in _over(v["labels"])]
    fig.suptitle("Which elements share one mean and variance, measured by perturbing each element of an "
                 f"(N, C, H, W) = {r['shape']} tensor; shaded: the elements whose\noutput moves with element "
                 f"(0, 0, 0, 0). Only {' and '.join(across)} norm mixes samples; "
                 f"{', '.join(inside)} norm stay inside one sample")
    return {"cubes": fig}


def axes_demo(verbose: bool = True, plot_dir: str | None = None) -> dict:
    """Measure which elements share statistics in batch, layer, instance and group norm.

    Returns dict(shape, x, norms={key: dict(name, shares, labels, groups, size, equal_sizes,
    symmetric)}, figures).
    """
    if plot_dir is not None:
        require_matplotlib()
    result = measure()
    if verbose:
        _print(result)
    return finish(result, figures, plot_dir, "axes", verbose)
