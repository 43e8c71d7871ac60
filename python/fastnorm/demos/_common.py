"""What every demo shares: plain-text tables and (lazily imported) matplotlib figures.

matplotlib is optional (``pip install "fastnorm-numpy[plot]"``): it is imported only when figures are
asked for. Figures are built with the object-oriented API on an Agg canvas, never through
pyplot, so the demos leave pyplot's global state (and a notebook's backend) alone.
"""
from __future__ import annotations

import os

import numpy as np


class PlotUnavailable(RuntimeError):
    """Figures were asked for but matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise PlotUnavailable with the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(
            "figures need matplotlib, which is not installed; install it with "
            "pip install \"fastnorm-numpy[plot]\" (or pip install matplotlib)") from None


def new_figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas, with constrained layout."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figures(figures: dict, plot_dir: str, prefix: str, verbose: bool) -> list[str]:
    """Write each figure as ``plot_dir/prefix_name.png``; returns the paths."""
    if os.path.exists(plot_dir) and not os.path.isdir(plot_dir):
        raise NotADirectoryError(20, "plot_dir is a file, not a directory for the PNGs", plot_dir)
    os.makedirs(plot_dir, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = os.path.join(plot_dir, f"{prefix}_{name}.png")
        fig.savefig(path, dpi=110)
        paths.append(path)
        if verbose:
            print(f"wrote {path}")
    return paths


def finish(result: dict, figures_of, plot_dir, prefix: str, verbose: bool) -> dict:
    """Save the demo's figures when plot_dir is given and record their paths in result['figures']."""
    result["figures"] = []
    if plot_dir is not None:
        if verbose:
            print()
        result["figures"] = save_figures(figures_of(result), plot_dir, prefix, verbose)
    return result


def fmt(value, digits: int = 3) -> str:
    """A number for a table: fixed point, 'nan', or 'yes'/'no' for booleans."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, str):
        return value
    v = float(value)
    if np.isnan(v):
        return "nan"
    text = f"{v:.{digits}f}"
    return "0." + "0" * digits if text == "-0." + "0" * digits else text


def table(headers, rows, digits: int = 3, title: str | None = None) -> str:
    """Rows of cells as aligned text: first column left-aligned, the others right-aligned."""
    cells = [[fmt(c, digits) for c in row] for row in rows]
    head = [str(h) for h in headers]
    widths = [max(len(r[i]) for r in [head] + cells) for i in range(len(head))]
    lines = [] if title is None else [title]

    def line(row):
        first = row[0].ljust(widths[0])
        return "  ".join([first] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]).rstrip()

    lines.append(line(head))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(line(r) for r in cells)
    return "\n".join(lines)


def vec(values, digits: int = 2) -> str:
    """A short vector as text: '[ 0.20  0.45  0.71]'."""
    return "[" + " ".join(f"{fmt(v, digits):>{digits + 4}}" for v in np.ravel(values)) + "]"


def annotate_heatmap(ax, data, *, digits: int = 2, vmax: float | None = None, cmap="RdBu_r",
                     row_labels=None, col_labels=None):
    """Draw ``data`` as a heatmap with each cell's value written in it; returns the image."""
    data = np.asarray(data, dtype=float)
    if vmax is None:
        vmax = float(np.nanmax(np.abs(data))) or 1.0
    vmin = -vmax if cmap in ("RdBu_r", "coolwarm", "PuOr_r") else 0.0
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for (i, j), v in np.ndenumerate(data):
        r, g, b, _ = im.cmap(im.norm(v))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5      # white text on dark cells
        ax.text(j, i, fmt(v, digits), ha="center", va="center", fontsize=9,
                color="white" if dark else "black")
    if row_labels is not None:
        ax.set_yticks(range(len(row_labels)), labels=row_labels)
    if col_labels is not None:
        ax.set_xticks(range(len(col_labels)), labels=col_labels)
    return im
