"""What the figures of the experiment demos share: a colour-blind-safe palette, seed bands, mean +- sd."""
from __future__ import annotations

import numpy as np

# Okabe and Ito's colour-blind-safe palette (no red/green pair), by name
OKABE_ITO = dict(orange="#E69F00", sky="#56B4E9", green="#009E73", yellow="#F0E442", blue="#0072B2",
                 vermillion="#D55E00", purple="#CC79A7", black="#000000", grey="#999999")
# one colour per normalization, the same in every figure
ARM_COLORS = {"none": OKABE_ITO["grey"], "batch": OKABE_ITO["vermillion"], "masked batch": OKABE_ITO["orange"],
              "layer": OKABE_ITO["blue"], "instance": OKABE_ITO["green"], "group": OKABE_ITO["purple"]}


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) over seeds."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def pm(values, digits: int = 3, scale: float = 1.0) -> str:
    """'mean +- sd' of values over seeds, as text."""
    m, s = mean_sd(np.asarray(values, dtype=np.float64) * scale)
    return f"{m:.{digits}f} +- {s:.{digits}f}"


def band(ax, x, runs, color, label, **line):
    """Mean over seeds (rows of runs) as a line, the range over seeds (min to max) as a band."""
    runs = np.asarray(runs, dtype=np.float64)
    ax.fill_between(x, runs.min(axis=0), runs.max(axis=0), color=color, alpha=0.25, linewidth=0)
    ax.plot(x, runs.mean(axis=0), color=color, label=label, **line)
