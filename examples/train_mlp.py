"""Train a small NumPy MLP three ways: no normalization, batch norm, layer norm.

The network is plain NumPy matrix products; the normalization layers and their gradients are
fastnorm's. The task is synthetic: classify points of a 4-class problem whose 16 input features
have scales from 0.01 to 100, with a deep (5 hidden layers) ReLU network trained by plain SGD.
The lecture notes claim normalization gives more stable training and faster convergence; the
printed loss curves show whether that holds here. On this task (seeded) it does: without
normalization the first steps blow the loss up to ~100, the ReLUs die and the loss sits at chance
(ln 4 = 1.386); with batch or layer norm the loss falls below chance from the start (~1.07 and
~1.10 after 600 steps).

    python examples/train_mlp.py [--steps 600] [--plot losses.png]
"""
from __future__ import annotations

import argparse

import numpy as np

import fastnorm

N_FEATURES, N_CLASSES, HIDDEN, DEPTH = 16, 4, 64, 5


def make_task(rng, n):
    """Labels from a random linear-plus-quadratic rule of well-scaled features; inputs badly scaled."""
    z = rng.standard_normal((n, N_FEATURES))
    w = np.random.default_rng(1234).standard_normal((N_FEATURES, N_CLASSES))
    logits = z @ w + 0.5 * (z[:, :N_CLASSES] ** 2)
    labels = logits.argmax(axis=1)
    scales = np.logspace(-2, 2, N_FEATURES)
    return z * scales + 3.0, labels


class MLP:
    """DEPTH x (Linear -> norm -> ReLU) -> Linear, with manual backprop."""

    def __init__(self, norm: str, rng):
        sizes = [N_FEATURES] + [HIDDEN] * DEPTH
        self.W = [rng.standard_normal((a, b)) * np.sqrt(2.0 / a) for a, b in zip(sizes[:-1], sizes[1:])]
        self.b = [np.zeros(b) for b in sizes[1:]]
        self.W_out = rng.standard_normal((HIDDEN, N_CLASSES)) * np.sqrt(1.0 / HIDDEN)
        self.b_out = np.zeros(N_CLASSES)
        make = {"none": lambda: None, "batch": lambda: fastnorm.BatchNorm(HIDDEN),
                "layer": lambda: fastnorm.LayerNorm(HIDDEN)}[norm]
        self.norms = [make() for _ in range(DEPTH)]

    def forward(self, x):
        self.cache = []
        h = x
        for W, b, norm in zip(self.W, self.b, self.norms):
            a = h @ W + b
            z = norm(a) if norm is not None else a
            self.cache.append((h, z))
            h = np.maximum(z, 0.0)
        self.h_last = h
        return h @ self.W_out + self.b_out

    def backward_and_step(self, dlogits, lr):
        dh = dlogits @ self.W_out.T
        grads = [(self.W_out, self.h_last.T @ dlogits), (self.b_out, dlogits.sum(0))]
        for i in reversed(range(DEPTH)):
            h, z = self.cache[i]
            dz = dh * (z > 0)
            norm = self.norms[i]
            da = norm.backward(dz) if norm is not None else dz
            if norm is not None:
                grads += norm.parameters()
            grads += [(self.W[i], h.T @ da), (self.b[i], da.sum(0))]
            dh = da @ self.W[i].T
        for p, g in grads:
            p -= lr * np.clip(g, -1e3, 1e3)   # the clip only keeps a diverging run finite


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient w.r.t. the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -np.log(p[np.arange(n), labels] + 1e-300).mean()
    p[np.arange(n), labels] -= 1.0
    return loss, p / n


def train(norm: str, steps: int = 300, batch: int = 64, lr: float = 0.05, seed: int = 0):
    """Returns the training loss per step (evaluated on each mini-batch before its update)."""
    rng = np.random.default_rng(seed)
    x, y = make_task(np.random.default_rng(99), 4096)
    model = MLP(norm, rng)
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(x), batch)
        logits = model.forward(x[idx])
        loss, dlogits = cross_entropy(logits, y[idx])
        losses.append(loss)
        model.backward_and_step(dlogits, lr)
    return np.array(losses)


def main(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--plot", metavar="FILE", help="save the loss curves as a PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    curves = {norm: train(norm, steps=args.steps) for norm in ("none", "batch", "layer")}
    window = max(1, args.steps // 10)
    print(f"training loss (mean over windows of {window} steps), {DEPTH} hidden layers, SGD")
    print(f"{'steps':>12} " + " ".join(f"{k:>10}" for k in curves))
    for start in range(0, args.steps, window):
        row = " ".join(f"{np.mean(c[start:start + window]):10.4f}" for c in curves.values())
        print(f"{start:5d}-{start + window - 1:<6d} {row}")
    final = {k: float(np.mean(c[-window:])) for k, c in curves.items()}
    best = min(final, key=final.get)
    print(f"final loss: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()) + f"; lowest: {best}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        smooth = max(1, window // 3)
        labels = {"none": "no normalization", "batch": "batch norm", "layer": "layer norm"}
        for k, c in curves.items():
            ax.plot(np.convolve(c, np.ones(smooth) / smooth, mode="valid"), label=labels[k])
        ax.axhline(np.log(N_CLASSES), color="gray", linestyle="--", label=f"chance (ln {N_CLASSES})")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"training loss, moving mean of {smooth} (log scale)")
        ax.set_title(f"{DEPTH}-hidden-layer MLP, badly scaled inputs, plain SGD")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"saved {args.plot}")
    return curves


if __name__ == "__main__":
    main()
