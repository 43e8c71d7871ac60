"""A small multilayer perceptron in NumPy whose hidden layers are plain, batch- or layer-normalized.

Each hidden layer is ``h = relu(norm(h_prev @ W))`` with ``norm`` one of

- ``"none"``: ``a + b`` (a bias, nothing normalized),
- ``"batch"``: ``fastnorm.batch_norm(a, gamma, beta, ...)``, statistics per unit over the batch,
  running statistics (momentum 0.1) for evaluation,
- ``"layer"``: ``fastnorm.layer_norm(a, gamma, beta)``, statistics per sample over its units;

then ``logits = h @ W_out + b_out`` and a softmax cross-entropy loss. Gradients are NumPy matrix
products, relu' and ``fastnorm.batch_norm_backward`` / ``fastnorm.layer_norm_backward``; training is
Adam on shuffled mini-batches (the last incomplete batch is dropped).
"""
from __future__ import annotations

import numpy as np

import fastnorm

NORMS = ("none", "batch", "layer")
EPS = 1e-5


class MLP:
    """Weights of an MLP with ``sizes = (inputs, hidden..., classes)``; He-initialized (scale ``init_scale``)."""

    def __init__(self, sizes, norm: str, rng, momentum: float = 0.1, init_scale: float = 1.0):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm, self.momentum = norm, momentum
        pairs = list(zip(sizes[:-1], sizes[1:]))
        self.W = [rng.standard_normal(p) * init_scale * np.sqrt(2.0 / p[0]) for p in pairs]
        self.b = [np.zeros(p[1]) for p in pairs]               # hidden biases are used by "none" only
        hidden = sizes[1:-1]
        self.gamma = [np.ones(h) for h in hidden]
        self.beta = [np.zeros(h) for h in hidden]
        self.running_mean = [np.zeros(h) for h in hidden]
        self.running_var = [np.ones(h) for h in hidden]

    def parameters(self) -> list[np.ndarray]:
        """Every trained array, in the order of the gradients ``loss_and_grads`` returns."""
        return [*self.W, *self.b, *self.gamma, *self.beta]

    def _normalize(self, i: int, a, mode: str):
        """Layer i's normalization of the summed inputs a; returns (n, mean, rstd)."""
        if self.norm == "none":
            return a + self.b[i], None, None
        if self.norm == "layer":
            return fastnorm.layer_norm(a, self.gamma[i], self.beta[i], eps=EPS, return_stats=True)
        if mode == "eval":                                    # running statistics
            n = fastnorm.batch_norm(a, self.gamma[i], self.beta[i], running_mean=self.running_mean[i],
                                    running_var=self.running_var[i], training=False, eps=EPS)
            return n, None, None
        update = mode == "train"                              # "batch" leaves the running statistics alone
        return fastnorm.batch_norm(a, self.gamma[i], self.beta[i], momentum=self.momentum, eps=EPS,
                                   running_mean=self.running_mean[i] if update else None,
                                   running_var=self.running_var[i] if update else None, return_stats=True)

    def forward(self, x, mode: str = "train"):
        """Logits of x and what backward needs.

        mode: "train" (batch statistics, running statistics updated), "batch" (batch statistics,
        running statistics left alone) or "eval" (running statistics). Only batch norm tells them apart.
        """
        h, cache = x, []
        for i in range(len(self.gamma)):
            a = h @ self.W[i]
            n, mean, rstd = self._normalize(i, a, mode)
            cache.append((h, a, mean, rstd, n > 0))
            h = np.maximum(n, 0.0)
        return h @ self.W[-1] + self.b[-1], (cache, h)

    def loss_and_grads(self, x, y, mode: str = "train"):
        """Mean cross-entropy on (x, y) and its gradients (in ``parameters()`` order)."""
        logits, (cache, h) = self.forward(x, mode)
        loss, dlogits = cross_entropy(logits, y)
        L = len(self.gamma)
        dW, db = [None] * (L + 1), [np.zeros_like(b) for b in self.b]
        dgamma, dbeta = [np.zeros_like(g) for g in self.gamma], [np.zeros_like(g) for g in self.beta]
        dW[L], db[L] = h.T @ dlogits, dlogits.sum(axis=0)
        dh = dlogits @ self.W[L].T
        for i in reversed(range(L)):
            h_prev, a, mean, rstd, active = cache[i]
            dn = dh * active                                           # through relu
            if self.norm == "none":
                da, db[i] = dn, dn.sum(axis=0)
            elif self.norm == "layer":
                da, dgamma[i], dbeta[i] = fastnorm.layer_norm_backward(dn, a, mean, rstd, self.gamma[i])
            else:
                da, dgamma[i], dbeta[i] = fastnorm.batch_norm_backward(dn, a, mean, rstd, self.gamma[i])
            dW[i] = h_prev.T @ da
            dh = da @ self.W[i].T
        return loss, [*dW, *db, *dgamma, *dbeta]

    def exact_statistics(self, x) -> list[tuple[np.ndarray, np.ndarray]]:
        """PreciseBN: each batch-norm layer's statistics over all of x, layer by layer.

        Layer i's summed inputs depend on the layers below, so those are first set to their exact
        statistics. Returns [(mean, unbiased var)] per layer (PyTorch's running_var convention);
        the model is left unchanged.
        """
        saved = [(m.copy(), v.copy()) for m, v in zip(self.running_mean, self.running_var)]
        stats, h = [], x
        try:
            for i in range(len(self.gamma)):
                a = h @ self.W[i]
                _, mean, rstd = fastnorm.batch_norm(a, eps=EPS, return_stats=True)
                var = (1.0 / rstd ** 2 - EPS) * len(a) / (len(a) - 1)
                stats.append((mean, var))
                self.running_mean[i][...], self.running_var[i][...] = mean, var
                h = np.maximum(self._normalize(i, a, "eval")[0], 0.0)
        finally:
            for i, (m, v) in enumerate(saved):
                self.running_mean[i][...], self.running_var[i][...] = m, v
        return stats

    def set_running_statistics(self, stats) -> None:
        """Replace the running statistics, e.g. by ``exact_statistics``."""
        for i, (mean, var) in enumerate(stats):
            self.running_mean[i][...], self.running_var[i][...] = mean, var


def cross_entropy(logits, y):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    rows = np.arange(len(y))
    dlogits = np.exp(logp)
    dlogits[rows, y] -= 1.0
    return float(-logp[rows, y].mean()), dlogits / len(y)


class Adam:
    """Adam (Kingma and Ba) over a list of arrays, updated in place."""

    def __init__(self, params, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.params, self.lr, self.beta1, self.beta2, self.eps = params, lr, beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads) -> None:
        self.t += 1
        c1, c2 = 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            p -= self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)


def evaluate(model: MLP, x, y, mode: str = "eval", batch_size: int | None = None,
             running=None) -> tuple[float, float]:
    """(mean cross-entropy, error rate) of the model on (x, y).

    mode "eval" uses the running statistics (all of x at once), or ``running`` instead when given
    (e.g. ``model.exact_statistics(x_train)``; the model's own are restored afterwards); mode
    "batch" uses each batch's own statistics on consecutive batches of batch_size (the last,
    smaller one too if it has 2 or more samples).
    """
    if mode == "eval":
        saved = [(m.copy(), v.copy()) for m, v in zip(model.running_mean, model.running_var)]
        if running is not None:
            model.set_running_statistics(running)
        try:
            logits = model.forward(x, "eval")[0]
        finally:
            model.set_running_statistics(saved)
    else:
        if batch_size is None:
            raise TypeError(f"evaluate: mode {mode!r} needs batch_size, an int; got None")
        starts = [s for s in range(0, len(x), batch_size) if len(x) - s >= 2]
        logits = np.concatenate([model.forward(x[s:s + batch_size], "batch")[0] for s in starts])
        y = y[:len(logits)]
    loss, _ = cross_entropy(logits, y)
    return loss, float(np.mean(logits.argmax(axis=1) != y))


def train(data: dict, norm: str, batch_size: int, seed: int, epochs: int, lr: float,
          hidden=(64, 64), evals_per_epoch: int = 1, on_eval=None, momentum: float = 0.1) -> MLP:
    """Train an MLP on data['x_train'], data['y_train'] with Adam; returns the model.

    The initial weights depend on seed only (the same for every norm and batch size), the batch
    order on seed and batch size; ``momentum`` is batch norm's. ``on_eval(model, epoch)`` is called
    ``evals_per_epoch`` times per epoch (epoch a float) and once before training (epoch 0).
    """
    x, y = data["x_train"], data["y_train"]
    model = MLP((x.shape[1], *hidden, int(y.max()) + 1), norm, np.random.default_rng(seed), momentum=momentum)
    opt = Adam(model.parameters(), lr)
    rng = np.random.default_rng([seed, batch_size])
    steps = len(x) // batch_size
    marks = {round(steps * k / evals_per_epoch) for k in range(1, evals_per_epoch + 1)}
    if on_eval is not None:
        on_eval(model, 0.0)
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            _, grads = model.loss_and_grads(x[idx], y[idx])
            opt.step(grads)
            if on_eval is not None and step + 1 in marks:
                on_eval(model, epoch + (step + 1) / steps)
    return model
