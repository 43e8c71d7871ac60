"""Instance and group norm on the digits: per-image contrast and brightness invariance.

Change each image's contrast and brightness, ``x -> a_i x + b_i`` with its own a_i (0.5 to 2) and
b_i (-4 to 4; pixels run 0 to 16), and normalize before and after:

- On the images themselves, (N, 1, 8, 8): instance norm takes one mean and std per image (and
  channel), so a_i and b_i cancel and the output is the same. Batch norm takes one mean and std
  over the whole batch, so each image keeps its own a_i and b_i.
- On feature maps, as in a network: 8 fixed random 3x3 filters, applied without padding, give
  (N, 8, 6, 6). Filtering is linear, so contrast scales every channel of image i by a_i, and
  brightness adds b_i * sum(filter_c), a different shift per channel c. Instance norm removes
  both. Group norm (2 or 4 groups) and layer norm (one group) remove the scale, but only the part
  of the shift shared by the channels of a group. Batch norm removes neither.

Reported: the largest |normalize(a x + b) - normalize(x)| over all outputs, for contrast only,
brightness only, and both. What it does not show: whether the invariance helps a classifier;
real images' lighting is not a per-image affine map.
"""
from __future__ import annotations

import numpy as np

import fastnorm

from ._common import finish, new_figure, require_matplotlib, table
from ._digits import digit_images, require_sklearn
from ._style import OKABE_ITO

IMAGES = 500
INVARIANT = 1e-3                 # a deviation below this (outputs are of order 1) counts as invariant
FILTERS, KERNEL = 8, 3
CONTRAST = (0.5, 2.0)            # a_i, log-uniform
BRIGHTNESS = (-4.0, 4.0)         # b_i, uniform, pixel units
EPS = 1e-5
TRANSFORMS = ("contrast", "brightness", "both")
FEATURE_NORMS = {
    "batch": ("batch norm", lambda f: fastnorm.batch_norm(f, axis=1, eps=EPS)),
    "layer": ("layer norm (1 group)", lambda f: fastnorm.layer_norm(f, axis=(1, 2, 3), eps=EPS)),
    "group2": ("group norm (2 groups)", lambda f: fastnorm.group_norm(f, 2, axis=1, eps=EPS)),
    "group4": ("group norm (4 groups)", lambda f: fastnorm.group_norm(f, 4, axis=1, eps=EPS)),
    "instance": ("instance norm (8 groups)", lambda f: fastnorm.instance_norm(f, axis=1, eps=EPS)),
}


def conv_valid(images, filters) -> np.ndarray:
    """(N, H, W) images, (C, k, k) filters -> (N, C, H-k+1, W-k+1) feature maps, no padding."""
    k = filters.shape[-1]
    windows = np.lib.stride_tricks.sliding_window_view(images, (k, k), axis=(1, 2))   # (N, H', W', k, k)
    return np.einsum("nhwij,cij->nchw", windows, filters)


def transformed(images, seed: int = 0) -> dict:
    """Per-image a_i, b_i and the three transformed copies of the images."""
    rng = np.random.default_rng(seed)
    log_low, log_high = np.log(CONTRAST)
    a = np.exp(rng.uniform(log_low, log_high, len(images)))[:, None, None]
    b = rng.uniform(*BRIGHTNESS, len(images))[:, None, None]
    return dict(a=a[:, 0, 0], b=b[:, 0, 0], contrast=a * images, brightness=images + b, both=a * images + b)


def measure(seed: int = 0) -> dict:
    """The deviations, on the images and on the feature maps, for each transformation."""
    images = digit_images()[0][:IMAGES]
    filters = np.random.default_rng(seed + 1).standard_normal((FILTERS, KERNEL, KERNEL)) / KERNEL
    t = transformed(images, seed)
    image_dev, feature_dev = {}, {}
    base_in = fastnorm.instance_norm(images[:, None], axis=1, eps=EPS)
    base_bn = fastnorm.batch_norm(images[:, None], axis=1, eps=EPS)
    feats = conv_valid(images, filters)
    base_feat = {k: fn(feats) for k, (_, fn) in FEATURE_NORMS.items()}
    for name in TRANSFORMS:
        x = t[name]
        image_dev[name] = dict(
            instance=float(np.abs(fastnorm.instance_norm(x[:, None], axis=1, eps=EPS) - base_in).max()),
            batch=float(np.abs(fastnorm.batch_norm(x[:, None], axis=1, eps=EPS) - base_bn).max()))
        f = conv_valid(x, filters)
        feature_dev[name] = {k: float(np.abs(fn(f) - base_feat[k]).max()) for k, (_, fn) in FEATURE_NORMS.items()}
    both = t["both"][:, None]
    examples = dict(instance=(base_in[:, 0], fastnorm.instance_norm(both, axis=1, eps=EPS)[:, 0]),
                    batch=(base_bn[:, 0], fastnorm.batch_norm(both, axis=1, eps=EPS)[:, 0]))
    # filter_sums: the per-channel shift a unit of brightness causes
    return dict(images=images, filters=filters, a=t["a"], b=t["b"], transformed=t["both"],
                image_deviation=image_dev, feature_deviation=feature_dev, filter_sums=filters.sum(axis=(1, 2)),
                examples=examples)


def summary(r: dict) -> str:
    """Which feature-map norms cancel what, read off the measured deviations (< INVARIANT)."""
    dev = r["feature_deviation"]
    groups: dict[str, list[str]] = {"both": [], "contrast only": [], "neither": []}
    for key, (name, _) in FEATURE_NORMS.items():
        c, b = dev["contrast"][key] < INVARIANT, dev["brightness"][key] < INVARIANT
        groups["both" if c and b else "contrast only" if c else "neither" if not b else "brightness only"] \
            .append(name)
    return "; ".join(f"{what} cancelled by {', '.join(names)}" for what, names in
                     (("both", groups["both"]), ("contrast only", groups["contrast only"]),
                      ("neither", groups["neither"])) if names)


def _print(r: dict) -> None:
    print(f"{len(r['images'])} digits, each with its own contrast a_i in {CONTRAST} and brightness b_i in "
          f"{BRIGHTNESS}:\nlargest |normalize(a x + b) - normalize(x)| over all outputs\n")
    rows = [["on the images (N, 1, 8, 8)", "", "", ""]]
    for key, name in (("instance", "  instance norm"), ("batch", "  batch norm")):
        rows.append([name] + [f"{r['image_deviation'][t][key]:.1e}" for t in TRANSFORMS])
    rows.append([f"on {FILTERS} filtered maps (N, 8, 6, 6)", "", "", ""])
    for key, (name, _) in FEATURE_NORMS.items():
        rows.append(["  " + name] + [f"{r['feature_deviation'][t][key]:.1e}" for t in TRANSFORMS])
    print(table(["", "contrast a_i only", "brightness b_i only", "both"], rows))
    print(f"   the filters' sums (the per-channel shift per unit of brightness): {np.round(r['filter_sums'], 2)}")
    print(f"   on the filtered maps (deviation < {INVARIANT:g} counts as cancelled): {summary(r)}")


def figures(r: dict) -> dict:
    """'invariance': four digits before/after with instance and batch norm, and the deviations."""
    fig = new_figure(14.5, 5.6)
    grid = fig.add_gridspec(3, 9, width_ratios=[1] * 8 + [4.2])
    show = [0, 1, 2, 3]
    rows = [("input x", r["images"], r["transformed"], "gray_r", (BRIGHTNESS[0], 16 * CONTRAST[1] + BRIGHTNESS[1])),
            ("instance norm", *r["examples"]["instance"], "PuOr_r", (-3, 3)),
            ("batch norm", *r["examples"]["batch"], "PuOr_r", (-3, 3))]
    normalized_axes = []
    for i, (label, before, after, cmap, (lo, hi)) in enumerate(rows):
        for j, k in enumerate(show):
            for m, img in enumerate((before[k], after[k])):
                ax = fig.add_subplot(grid[i, 2 * j + m])
                im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
                ax.set_xticks([]), ax.set_yticks([])
                if i == 0:
                    ax.set_title("original" if m == 0 else f"a={r['a'][k]:.2f}\nb={r['b'][k]:+.1f}", fontsize=8)
                if j == 0 and m == 0:
                    ax.set_ylabel(label, fontsize=9)
                if i > 0:
                    normalized_axes.append(ax)
            if i == 0 and j == len(show) - 1:
                fig.colorbar(im, ax=ax, shrink=0.9, label="pixel")
    fig.colorbar(im, ax=normalized_axes[-2:], shrink=0.9, label="normalized value")
    ax = fig.add_subplot(grid[:, 8])
    names = ["instance norm\n(images)", "batch norm\n(images)"] + [v[0].replace(", ", "\n").replace(" (", "\n(")
                                                                   for v in FEATURE_NORMS.values()]
    keys = [("image", "instance"), ("image", "batch")] + [("feature", k) for k in FEATURE_NORMS]
    colors = {"contrast": OKABE_ITO["sky"], "brightness": OKABE_ITO["orange"], "both": OKABE_ITO["purple"]}
    floor = 1e-16
    for t_i, t in enumerate(TRANSFORMS):
        vals = [r[f"{kind}_deviation"][t][k] for kind, k in keys]
        ax.barh(np.arange(len(keys)) + (t_i - 1) * 0.27, np.maximum(vals, floor), 0.27, color=colors[t],
                label={"contrast": "contrast: a_i x", "brightness": "brightness: x + b_i",
                       "both": "both: a_i x + b_i"}[t])
    ax.set_xscale("log")
    ax.set_xlim(floor / 3, 100)
    ax.set_yticks(range(len(keys)), labels=names, fontsize=8)
    ax.set_ylim(len(keys) - 0.5, -2.3)                      # top to bottom, room for the legend above
    ax.axhline(1.5, color=OKABE_ITO["grey"], linewidth=0.8)
    ax.set_xlabel("max |norm(a_i x + b_i) - norm(x)| over all outputs\n(0 drawn at 1e-16)")
    ax.set_title("above the line: on the images (N, 1, 8, 8)\nbelow: on 8 filtered maps (N, 8, 6, 6)", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    on_images = {k: all(r["image_deviation"][t][k] < INVARIANT for t in TRANSFORMS) for k in ("instance", "batch")}
    fig.suptitle("Each digit with its own contrast a_i and brightness b_i (x -> a_i x + b_i): on the images, instance "
                 f"norm {'cancels' if on_images['instance'] else 'does not cancel'} both, batch norm "
                 f"{'cancels' if on_images['batch'] else 'does not cancel'} them;\non 8 filtered maps, "
                 + summary(r).replace("; neither", ";\nneither") + ". Images: left original, right transformed")
    return {"invariance": fig}


def groups_demo(verbose: bool = True, plot_dir: str | None = None) -> dict:
    """Per-image contrast and brightness invariance of instance, group, layer and batch norm.

    Returns dict(images, filters, a, b, image_deviation[transform][norm],
    feature_deviation[transform][norm], filter_sums, examples, figures).
    """
    require_sklearn()
    if plot_dir is not None:
        require_matplotlib()
    result = measure()
    if verbose:
        _print(result)
    return finish(result, figures, plot_dir, "groups", verbose)
