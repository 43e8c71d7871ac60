"""Why batch norm breaks on zero-padded sequences while layer norm does not.

The lecture's batch: "Hi Rohan" (2 tokens) and "How are you today" (4 tokens), 3-dim embeddings,
padded to length 4.
"""
from __future__ import annotations

import numpy as np

import fastnorm

SENTENCES = ("Hi Rohan", "How are you today")
# (2 sentences, 4 positions, 3 embedding dims); the zero rows are padding
EMBEDDINGS = np.array([
    [[0.2, 0.45, 0.71], [0.21, 0.3, 0.8], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    [[0.1, 0.5, 0.34], [0.1, 0.0, 0.25], [0.33, 0.56, 0.9], [0.11, 0.4, 0.54]],
])
LENGTHS = (2, 4)


def padding_demo(verbose: bool = True, plot_dir: str | None = None) -> dict:
    """Batch statistics with and without the padding, and the three normalized outputs."""
    x = EMBEDDINGS
    mask = fastnorm.mask_from_lengths(LENGTHS, x.shape[1])
    plain, mean_all, rstd_all = fastnorm.batch_norm(x, return_stats=True)
    masked, mean_real, rstd_real = fastnorm.batch_norm(x, mask=mask, return_stats=True)
    layer = fastnorm.layer_norm(x, mask=mask)
    result = dict(x=x, mask=mask, mean_all=mean_all, rstd_all=rstd_all, mean_real=mean_real,
                  rstd_real=rstd_real, batch_norm=plain, masked_batch_norm=masked, layer_norm=layer)
    if verbose:
        np.set_printoptions(precision=3, suppress=True)
        print("Padded batch:", " | ".join(SENTENCES), "(padded to length 4, embedding dim 3)")
        print("batch-norm mean per dim, all 8 positions :", mean_all)
        print("batch-norm mean per dim, 6 real tokens   :", mean_real)
        print("\nbatch norm (padding counted):\n", plain)
        print("\nbatch norm (mask=):\n", masked)
        print("\nlayer norm (mask=):\n", layer)
    return result
