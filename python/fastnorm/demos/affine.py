"""The affine step after normalizing, and where eps goes.

1. The notes' worked example. Layer norm of row 1 of the notes' table, (z1, z2, z3) = (7, 5, 4):
   one mean mu_1 and std sigma_1 for the row, then per node j its own gamma_j and beta_j,
   ``p_j = ((z_j - mu_1) / sigma_1) * gamma_j + beta_j``. The notes write (7 - mu_1) / sigma_1 = 0.3
   ("all values are hypothetical"); the row gives 1.336. We compute both: the notes' row, and a row
   built so that its first value normalizes to exactly 0.3, which then gives p_1 = 0.3 gamma_1 + beta_1.
2. gamma = sigma, beta = mu undo the normalization: with per-feature statistics (batch norm,
   per column of the table) ``batch_norm(z, weight=sqrt(var + eps), bias=mean)`` returns z. Layer
   norm's statistics are per row while gamma and beta are per feature, so one (gamma, beta) can
   undo only rows that share a mean and std: row 1's recovers row 1 and no other.
3. The notes (and many write-ups) divide by sigma + eps; fastnorm, PyTorch and the papers divide by
   sqrt(sigma^2 + eps). For a row of std sigma the output's std is sigma / (sigma + eps) or
   sigma / sqrt(sigma^2 + eps): the same for sigma >> sqrt(eps), different once sigma approaches
   sqrt(eps) (0.0032 for eps = 1e-5), where the sqrt form shrinks the output towards 0.

What it does not show: whether the two eps conventions change training; only the forward values.
"""
from __future__ import annotations

import numpy as np

import fastnorm

from ._common import finish, new_figure, require_matplotlib, table, vec
from ._style import OKABE_ITO
from .ztable import TABLE

ROW = TABLE[0, 2:]                                  # (z1, z2, z3) = (7, 5, 4), row 1 of the notes' table
NOTES_VALUE = 0.3                                   # the notes' (7 - mu_1) / sigma_1
GAMMA = np.array([2.0, 0.5, -1.0])                  # example gamma_j, beta_j (the notes leave them symbolic)
BETA = np.array([0.1, -0.2, 0.3])
EPS = 1e-5
SIGMAS = np.logspace(-6, 1, 57)


def row_normalizing_to(first: float, mean: float = 5.0, std: float = 2.0) -> np.ndarray:
    """Three values with the given mean and (biased) std whose first normalizes to ``first``.

    Normalized values (eps = 0) sum to 0 and their squares to 3, so with n_1 = first the other two
    have sum s = -first and product p = (s^2 - (3 - first^2)) / 2: the roots of t^2 - s t + p.
    """
    s, p = -first, (first ** 2 - (3.0 - first ** 2)) / 2.0
    root = np.sqrt(s * s - 4 * p)
    n = np.array([first, (s + root) / 2, (s - root) / 2])
    return mean + std * n


def worked_example() -> dict:
    """The notes' row and a row whose first value normalizes to 0.3, each with gamma_j, beta_j."""
    out = {}
    for key, row in (("notes_row", ROW.astype(np.float64)), ("row_0.3", row_normalizing_to(NOTES_VALUE))):
        n, mean, rstd = fastnorm.layer_norm(row, eps=0.0, return_stats=True)
        p = fastnorm.layer_norm(row, GAMMA, BETA, eps=0.0)
        initial = fastnorm.layer_norm(row, np.ones(3), np.zeros(3), eps=0.0)          # gamma 1, beta 0
        out[key] = dict(row=row, mean=float(mean), std=float(1 / rstd), normalized=n, p=p,
                        p_by_hand=n * GAMMA + BETA, p_initial=initial)
    return out


def recovery() -> dict:
    """gamma = sigma, beta = mu: batch norm recovers the table; layer norm with row 1's statistics
    recovers row 1 only. Max |recovered - z| per row for each."""
    z = TABLE[:, 2:].astype(np.float64)
    _, mean, rstd = fastnorm.batch_norm(z, eps=EPS, return_stats=True)
    bn_back = fastnorm.batch_norm(z, weight=1 / rstd, bias=mean, eps=EPS)
    _, lmean, lrstd = fastnorm.layer_norm(z, eps=EPS, return_stats=True)
    gamma, beta = np.full(3, 1 / lrstd[0]), np.full(3, lmean[0])
    ln_back = fastnorm.layer_norm(z, weight=gamma, bias=beta, eps=EPS)
    return dict(z=z, bn_weight=1 / rstd, bn_bias=mean, bn_recovered=bn_back,
                bn_error=np.abs(bn_back - z).max(axis=1), ln_weight=gamma, ln_bias=beta,
                ln_recovered=ln_back, ln_error=np.abs(ln_back - z).max(axis=1))


def eps_placement(sigmas=SIGMAS, eps: float = EPS) -> dict:
    """For rows (-sigma, +sigma), whose biased std is sigma: the std of fastnorm's layer-norm output
    (measured), and the two formulas' sigma / sqrt(sigma^2 + eps) and sigma / (sigma + eps)."""
    rows = np.outer(sigmas, [-1.0, 1.0])
    measured = fastnorm.layer_norm(rows, eps=eps).std(axis=1)
    sqrt_form = sigmas / np.sqrt(sigmas ** 2 + eps)
    notes_form = sigmas / (sigmas + eps)
    rel = np.abs(notes_form - sqrt_form) / notes_form
    over_1pct = sigmas[rel > 0.01]
    return dict(sigmas=sigmas, eps=eps, measured=measured, sqrt_form=sqrt_form, notes_form=notes_form,
                relative_difference=rel, differ_below=float(over_1pct.max()) if over_1pct.size else 0.0)


def _print(r: dict) -> None:
    w = r["worked"]
    print("1. The notes' worked example, layer norm of row 1, (z1, z2, z3) = (7, 5, 4), eps = 0:")
    for key, what in (("notes_row", "the notes' row"), ("row_0.3", "a row whose z1 normalizes to 0.3")):
        v = w[key]
        print(f"   {what} {vec(v['row'], 3)}: mu_1 = {v['mean']:.4f}, sigma_1 = {v['std']:.4f}, "
              f"normalized {vec(v['normalized'], 4)}")
        print(f"     gamma {vec(GAMMA)}, beta {vec(BETA)}: p = {vec(v['p'], 4)}  (by hand n * gamma + beta: "
              f"{vec(v['p_by_hand'], 4)})")
    v = w["row_0.3"]
    print(f"   so p_1 = 0.3 * {GAMMA[0]:g} + {BETA[0]:g} = {v['p'][0]:.4f}; at the initial gamma = 1, beta = 0, "
          f"p = the normalized values.\n")
    c = r["recovery"]
    print("2. gamma = sigma, beta = mu on the notes' z table (eps = 1e-5):")
    rows = [[f"row {i + 1}", vec(c["z"][i], 1), f"{c['bn_error'][i]:.1e}", f"{c['ln_error'][i]:.3f}"]
            for i in range(len(c["z"]))]
    print(table(["", "z", "batch norm: max |back - z|", "layer norm, row 1's mu, sigma"], rows, digits=3))
    print("   (batch norm: weight = sqrt(var_j + eps), bias = mean_j per column; layer norm's statistics are per "
          "row,\n   and one per-feature gamma, beta can only undo the row they came from)\n")
    e = r["eps"]
    print(f"3. Where eps goes, eps = {e['eps']:g}: output std of a row of std sigma")
    picks = [np.argmin(np.abs(e["sigmas"] - s)) for s in (1e-5, 1e-4, 1e-3, 3.16e-3, 1e-2, 1e-1, 1.0)]
    rows = [[f"{e['sigmas'][k]:.1e}", e["measured"][k], e["sqrt_form"][k], e["notes_form"][k]] for k in picks]
    print(table(["sigma", "fastnorm (measured)", "sigma/sqrt(sigma^2+eps)", "sigma/(sigma+eps)"], rows, digits=4))
    print(f"   the two differ by more than 1% for sigma below {e['differ_below']:.3g} "
          f"(sqrt(eps) = {np.sqrt(e['eps']):.3g}).")


def figures(r: dict) -> dict:
    """'affine': the worked example, recovery, and the two eps conventions."""
    fig = new_figure(15, 4.8)
    ax_w, ax_r, ax_e = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.2]})
    v = r["worked"]["notes_row"]
    idx = np.arange(3)
    ax_w.bar(idx - 0.2, v["normalized"], 0.4, color=OKABE_ITO["sky"], label=r"$n_j = (z_j - \mu_1)/\sigma_1$")
    ax_w.bar(idx + 0.2, v["p"], 0.4, color=OKABE_ITO["blue"], label=r"$p_j = n_j\gamma_j + \beta_j$")
    for j in idx:
        ax_w.annotate(f"$\\gamma$={GAMMA[j]:g}\n$\\beta$={BETA[j]:g}", (j + 0.2, v["p"][j]),
                      xytext=(0, 4 if v["p"][j] >= 0 else -26), textcoords="offset points", ha="center", fontsize=8)
    ax_w.axhline(0, color="black", linewidth=0.8)
    ax_w.set_xticks(idx, labels=[f"$z_{j + 1}$ = {z:g}" for j, z in enumerate(v["row"])])
    ax_w.set_ylabel("value")
    ax_w.set_title(f"the notes' row (7, 5, 4): $\\mu_1$ = {v['mean']:.3f}, $\\sigma_1$ = {v['std']:.3f};\n"
                   f"$n_1$ = {v['normalized'][0]:.3f} (the notes' placeholder: 0.3)", fontsize=10)
    ax_w.legend(fontsize=8, loc="lower left")
    ax_w.set_ylim(-3, 3.9)

    c = r["recovery"]
    rows = np.arange(len(c["z"]))
    floor = 1e-17
    ax_r.bar(rows - 0.2, np.maximum(c["bn_error"], floor), 0.4, color=OKABE_ITO["vermillion"],
             label=r"batch norm, $\gamma_j = \sqrt{\sigma_j^2+\epsilon}$, $\beta_j = \mu_j$ (per column)")
    ax_r.bar(rows + 0.2, np.maximum(c["ln_error"], floor), 0.4, color=OKABE_ITO["blue"],
             label=r"layer norm, $\gamma = \sigma_1$, $\beta = \mu_1$ of row 1")
    ax_r.set_yscale("log")
    ax_r.set_ylim(floor / 2, 1e6)
    ax_r.set_xticks(rows, labels=[f"row {i + 1}" for i in rows])
    ax_r.set_ylabel("max |recovered - z| in the row (0 drawn at 1e-17)")
    ax_r.set_title("$\\gamma = \\sigma$, $\\beta = \\mu$ undo batch norm on every row,\n"
                   "layer norm only on the row they came from", fontsize=10)
    ax_r.legend(fontsize=7.5, loc="upper left")

    e = r["eps"]
    ax_e.semilogx(e["sigmas"], e["notes_form"], color=OKABE_ITO["orange"], linewidth=2,
                  label=r"$\sigma/(\sigma+\epsilon)$: $(x-\mu)/(\sigma+\epsilon)$, the notes")
    ax_e.semilogx(e["sigmas"], e["sqrt_form"], color=OKABE_ITO["blue"], linewidth=2,
                  label=r"$\sigma/\sqrt{\sigma^2+\epsilon}$: $(x-\mu)/\sqrt{\sigma^2+\epsilon}$")
    ax_e.semilogx(e["sigmas"], e["measured"], "o", color=OKABE_ITO["black"], markersize=3,
                  label="fastnorm.layer_norm (measured)")
    ax_e.axvline(np.sqrt(e["eps"]), color=OKABE_ITO["grey"], linestyle=":", label=r"$\sigma = \sqrt{\epsilon}$")
    ax_e.axvspan(e["sigmas"][0], e["differ_below"], color=OKABE_ITO["yellow"], alpha=0.25,
                 label=f"the two differ by > 1% (σ < {e['differ_below']:.2g})")
    ax_e.set_xlabel(r"std $\sigma$ of the row (log scale)")
    ax_e.set_ylabel("std of the normalized row")
    ax_e.set_title(f"where $\\epsilon$ = {e['eps']:g} goes matters only for $\\sigma$ near or below "
                   f"$\\sqrt{{\\epsilon}}$", fontsize=10)
    ax_e.legend(fontsize=7.5, loc="center right")
    fig.suptitle("The affine step: $p_j = n_j\\gamma_j + \\beta_j$ per feature; $\\gamma=\\sigma$, $\\beta=\\mu$ "
                 "recover the input only where the statistics are per feature (batch norm); "
                 f"eps placement changes outputs only for σ < {e['differ_below']:.2g}")
    return {"example": fig}


def affine_demo(verbose: bool = True, plot_dir: str | None = None) -> dict:
    """The notes' p_1 = 0.3 gamma_1 + beta_1, recovering the input, and where eps goes.

    Returns dict(worked, recovery, eps, figures); see worked_example, recovery, eps_placement.
    """
    if plot_dir is not None:
        require_matplotlib()
    result = dict(worked=worked_example(), recovery=recovery(), eps=eps_placement())
    if verbose:
        _print(result)
    return finish(result, figures, plot_dir, "affine", verbose)
