"""Why not batch norm in a transformer? A one-block encoder on padded sequences, three norms.

The notes' headline question. One encoder block, written in NumPy, gradients by hand with
``fastnorm``'s backward functions for the norms:

    e  = embed(tokens) + position            zero at padded positions
    h1 = e + attention(e)                    single head, padded keys masked out
    n1 = Norm1(h1)                           "Add & Norm"
    h2 = n1 + FFN(n1)                        Linear, ReLU, Linear
    n2 = Norm2(h2)                           "Add & Norm"
    class = Linear(mean of n2 over the sequence's real tokens)

Padded positions are set to zero after every sublayer, as in the notes' padded batch. Three arms
fill the two Norm slots (as Shen et al.'s PowerNorm paper compares them):

- batch norm: statistics per feature over every position of the batch, padding included;
- masked batch norm: over the real tokens only (``mask=``);
- layer norm: per token, over its features.

Both batch norms keep running statistics (momentum 0.1) for evaluation. The task: sequences of
2 to 16 tokens from 4 symbols; do the counts of symbols 1 and 2 differ by at most 1? The answer is
not a linear function of the token counts, so the block needs attention (each token sees the
whole sequence) and the feed-forward layer, not only the final average. Batches of 32 are padded
to their longest sequence.

Each arm trains from the same initial weights on the same batches (Adam), at least 5 seeds.
Reported: test accuracy with the batch's own statistics (train mode, test batches of the training
batch size) and with the running statistics (eval mode), side by side; layer norm has one number.
What it does not show: a real language task, depth (one block), or large batches; the numbers are
for this toy at this scale.
"""
from __future__ import annotations

import numpy as np

import fastnorm

from . import _mlp
from ._common import finish, new_figure, require_matplotlib, table
from ._style import ARM_COLORS, OKABE_ITO, band, mean_sd, pm

ARMS = ("batch", "masked batch", "layer")
SYMBOLS = 4                          # token ids 1..4; 0 is padding
MIN_LEN, MAX_LEN = 2, 16
D_MODEL, D_FF = 16, 32
BATCH, LR, MOMENTUM, EPS = 32, 3e-3, 0.1, 1e-5
TEST_SIZE = 384
FULL = dict(seeds=8, steps=300, eval_every=50)
QUICK = dict(seeds=5, steps=100, eval_every=50)


# ---- data ------------------------------------------------------------------------------------------

def make_batch(rng, n: int):
    """n sequences padded to the longest: tokens (n, L) int (0 = padding), mask (n, L), labels (n,)
    = 1 when the counts of symbols 1 and 2 differ by at most 1."""
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, n)
    mask = fastnorm.mask_from_lengths(lengths, int(lengths.max()))
    tokens = rng.integers(1, SYMBOLS + 1, mask.shape) * mask
    labels = (np.abs((tokens == 1).sum(axis=1) - (tokens == 2).sum(axis=1)) <= 1).astype(np.int64)
    return tokens, mask, labels


# ---- the block ------------------------------------------------------------------------------------

def init_params(rng) -> dict:
    """Scaled Gaussian weights, zero biases, gamma 1 and beta 0 in both norms."""
    def w(fan_in, *shape):
        return rng.standard_normal(shape) / np.sqrt(fan_in)

    D, F = D_MODEL, D_FF
    return dict(embed=rng.standard_normal((SYMBOLS + 1, D)), pos=0.1 * rng.standard_normal((MAX_LEN, D)),
                Wq=w(D, D, D), Wk=w(D, D, D), Wv=w(D, D, D), Wo=w(D, D, D),
                g1=np.ones(D), b1=np.zeros(D), W1=w(D, D, F), c1=np.zeros(F), W2=w(F, F, D), c2=np.zeros(D),
                g2=np.ones(D), b2=np.zeros(D), Wc=w(D, D, 2), cc=np.zeros(2))


def new_running() -> dict:
    """Running statistics of the two norm slots (used by the batch norms only)."""
    return {slot: (np.zeros(D_MODEL), np.ones(D_MODEL)) for slot in (1, 2)}


def norm_forward(arm: str, h, mask, gamma, beta, running, mode: str):
    """One Add & Norm's normalization of h (B, L, D); padded positions of the result are zero.

    mode "train" (batch statistics, running statistics updated), "batch" (batch statistics only)
    or "eval" (running statistics). Returns (n, cache for norm_backward).
    """
    if arm == "layer":
        n, mean, rstd = fastnorm.layer_norm(h, gamma, beta, eps=EPS, mask=mask, return_stats=True)
        return n, (h, mean, rstd)
    bn_mask = mask if arm == "masked batch" else None
    rm, rv = running
    if mode == "eval":
        n = fastnorm.batch_norm(h, gamma, beta, running_mean=rm, running_var=rv, training=False, eps=EPS, mask=bn_mask)
        return n * mask[..., None], None
    stats = dict(running_mean=rm, running_var=rv, momentum=MOMENTUM) if mode == "train" else {}
    n, mean, rstd = fastnorm.batch_norm(h, gamma, beta, eps=EPS, mask=bn_mask, return_stats=True, **stats)
    return n * mask[..., None], (h, mean, rstd)


def norm_backward(arm: str, dn, mask, gamma, cache):
    """Gradients (dh, dgamma, dbeta) of norm_forward in training, given dn (zero at padding)."""
    h, mean, rstd = cache
    if arm == "layer":
        return fastnorm.layer_norm_backward(dn, h, mean, rstd, gamma, mask=mask)
    return fastnorm.batch_norm_backward(dn * mask[..., None], h, mean, rstd, gamma,
                                        mask=mask if arm == "masked batch" else None)


def softmax(s, axis=-1):
    z = np.exp(s - s.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def forward(p: dict, tokens, mask, arm: str, running: dict, mode: str = "train"):
    """Logits (B, 2) and everything backward needs."""
    m = mask[..., None].astype(np.float64)                         # (B, L, 1)
    L = tokens.shape[1]
    e = (p["embed"][tokens] + p["pos"][:L]) * m
    q, k, v = e @ p["Wq"], e @ p["Wk"], e @ p["Wv"]
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(D_MODEL) + np.where(mask[:, None, :], 0.0, -1e9)
    att = softmax(scores)                                          # (B, L queries, L keys)
    ctx = att @ v
    h1 = e + (ctx @ p["Wo"]) * m
    n1, c1 = norm_forward(arm, h1, mask, p["g1"], p["b1"], running[1], mode)
    pre = n1 @ p["W1"] + p["c1"]
    act = np.maximum(pre, 0.0)
    h2 = n1 + (act @ p["W2"] + p["c2"]) * m
    n2, c2 = norm_forward(arm, h2, mask, p["g2"], p["b2"], running[2], mode)
    lengths = m.sum(axis=1)                                        # (B, 1)
    pooled = (n2 * m).sum(axis=1) / lengths
    logits = pooled @ p["Wc"] + p["cc"]
    cache = dict(m=m, e=e, q=q, k=k, v=v, att=att, ctx=ctx, n1=n1, c1=c1, pre=pre, act=act, c2=c2,
                 lengths=lengths, pooled=pooled, tokens=tokens, mask=mask)
    return logits, cache


def backward(p: dict, dlogits, c: dict, arm: str) -> dict:
    """Gradients of every parameter from dlogits (B, 2), through the cache of forward (train mode)."""
    g = {}
    m, mask = c["m"], c["mask"]
    g["Wc"], g["cc"] = c["pooled"].T @ dlogits, dlogits.sum(axis=0)
    dn2 = (dlogits @ p["Wc"].T)[:, None, :] * m / c["lengths"][:, None]
    dh2, g["g2"], g["b2"] = norm_backward(arm, dn2, mask, p["g2"], c["c2"])
    dffn = dh2 * m
    g["W2"], g["c2"] = _sum_outer(c["act"], dffn), dffn.sum(axis=(0, 1))
    dpre = (dffn @ p["W2"].T) * (c["pre"] > 0)
    g["W1"], g["c1"] = _sum_outer(c["n1"], dpre), dpre.sum(axis=(0, 1))
    dn1 = (dh2 + dpre @ p["W1"].T) * m
    dh1, g["g1"], g["b1"] = norm_backward(arm, dn1, mask, p["g1"], c["c1"])
    dout = dh1 * m
    g["Wo"] = _sum_outer(c["ctx"], dout)
    dctx = dout @ p["Wo"].T
    att = c["att"]
    datt = dctx @ c["v"].transpose(0, 2, 1)
    dv = att.transpose(0, 2, 1) @ dctx
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True)) / np.sqrt(D_MODEL)
    dq, dk = dscores @ c["k"], dscores.transpose(0, 2, 1) @ c["q"]
    e = c["e"]
    g["Wq"], g["Wk"], g["Wv"] = _sum_outer(e, dq), _sum_outer(e, dk), _sum_outer(e, dv)
    de = (dh1 + dq @ p["Wq"].T + dk @ p["Wk"].T + dv @ p["Wv"].T) * m
    g["embed"] = np.zeros_like(p["embed"])
    np.add.at(g["embed"], c["tokens"], de)
    g["pos"] = np.zeros_like(p["pos"])
    g["pos"][:de.shape[1]] = de.sum(axis=0)
    return g


def _sum_outer(a, b):
    """sum over batch and positions of a^T b: (B, L, I), (B, L, J) -> (I, J)."""
    return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


def loss_and_grads(p: dict, tokens, mask, labels, arm: str, running: dict, mode: str = "train"):
    """Mean cross-entropy and the gradients of every parameter."""
    logits, cache = forward(p, tokens, mask, arm, running, mode)
    loss, dlogits = _mlp.cross_entropy(logits, labels)
    return loss, backward(p, dlogits, cache, arm)


# ---- training and evaluation -----------------------------------------------------------------------

def accuracy(p, batches, arm, running, mode: str) -> float:
    """Accuracy over a list of (tokens, mask, labels) batches."""
    right = total = 0
    for tokens, mask, labels in batches:
        logits, _ = forward(p, tokens, mask, arm, running, mode)
        right += int((logits.argmax(axis=1) == labels).sum())
        total += len(labels)
    return right / total


def train(arm: str, seed: int, steps: int, eval_every: int, test) -> dict:
    """Train one arm; test accuracy in train mode (batch statistics) and eval mode (running) along
    the way. The initial weights and the batches depend on seed only."""
    p = init_params(np.random.default_rng([seed, 1]))
    running = new_running()
    keys = list(p)
    opt = _mlp.Adam([p[k] for k in keys], LR)
    rng = np.random.default_rng([seed, 2])
    curve: dict[str, list[float]] = dict(step=[], batch=[], eval=[], loss=[])
    for step in range(1, steps + 1):
        tokens, mask, labels = make_batch(rng, BATCH)
        loss, g = loss_and_grads(p, tokens, mask, labels, arm, running)
        opt.step([g[k] for k in keys])
        curve["loss"].append(loss)
        if step % eval_every == 0:
            curve["step"].append(step)
            curve["batch"].append(accuracy(p, test, arm, running, "batch"))
            curve["eval"].append(accuracy(p, test, arm, running, "eval"))
    return dict(params=p, running=running, **{k: np.array(v) for k, v in curve.items()})


def test_batches(seed: int = 10_000, size: int = TEST_SIZE):
    """The test set, as batches of BATCH sequences each padded to its longest."""
    rng = np.random.default_rng(seed)
    return [make_batch(rng, BATCH) for _ in range(size // BATCH)]


def run(seeds: int, steps: int, eval_every: int) -> dict:
    """Every arm and seed. Returns dict(steps, curves[arm] = dict(batch (S, E), eval (S, E), loss
    (S, steps)), final[arm] = dict(batch (S,), eval (S,)), models[arm] = per-seed (params, running)
    after training, test (the test batches), config)."""
    test = test_batches()
    curves, final, models = {}, {}, {}
    for arm in ARMS:
        runs = [train(arm, seed, steps, eval_every, test) for seed in range(seeds)]
        curves[arm] = {k: np.stack([r[k] for r in runs]) for k in ("batch", "eval", "loss")}
        final[arm] = {k: curves[arm][k][:, -1].copy() for k in ("batch", "eval")}
        models[arm] = [(r["params"], r["running"]) for r in runs]
    padding = np.mean([1 - m.mean() for _, m, _ in test])
    config = dict(seeds=seeds, steps=steps, batch=BATCH, lr=LR, d_model=D_MODEL, d_ff=D_FF, lengths=(MIN_LEN, MAX_LEN),
                  test_size=sum(len(b[2]) for b in test), test_padding=float(padding))
    return dict(steps=np.arange(eval_every, steps + 1, eval_every), curves=curves, final=final, models=models,
                test=test, config=config)


def finding(r: dict) -> str:
    """The arm with the best and the arm with the most spread-out eval accuracy, from the numbers."""
    ev = {arm: mean_sd(r["final"][arm]["eval"] * 100) for arm in ARMS}
    best = max(ARMS, key=lambda a: ev[a][0])
    widest = max(ARMS, key=lambda a: ev[a][1])
    return (f"highest test accuracy: {best} norm ({ev[best][0]:.1f} \u00b1 {ev[best][1]:.1f}%); "
            f"widest spread over seeds: {widest} norm ({ev[widest][0]:.1f} \u00b1 {ev[widest][1]:.1f}%), "
            "both with running statistics")


def _print(r: dict) -> None:
    c = r["config"]
    print(f"One transformer encoder block (d_model {c['d_model']}, FFN {c['d_ff']}, one head) on sequences of "
          f"{c['lengths'][0]}-{c['lengths'][1]} tokens,\nbatches of {c['batch']} padded to their longest "
          f"({c['test_padding']:.0%} of the test batches' positions are padding);\n"
          "task: do the counts of 1s and 2s differ by at most 1? "
          f"{c['steps']} Adam steps, {c['seeds']} seeds; test set {c['test_size']} sequences.\n")
    rows = [[arm + " norm", pm(r["final"][arm]["batch"] * 100, 1), pm(r["final"][arm]["eval"] * 100, 1),
             pm((r["final"][arm]["batch"] - r["final"][arm]["eval"]) * 100, 1)] for arm in ARMS]
    print(table(["Add & Norm", "test acc. %, batch statistics", "test acc. %, running statistics",
                 "difference (points)"], rows))
    print("   (layer norm has no batch or running statistics: both columns are the same model, the same number)")
    print("\n" + finding(r).replace("\u00b1", "+-") + ".")


def figures(r: dict) -> dict:
    """'accuracy': test accuracy against steps per arm, train mode and eval mode; final numbers."""
    fig = new_figure(13, 4.8)
    ax_curve, ax_final = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.5, 1]})
    for arm in ARMS:
        label = "layer norm" if arm == "layer" else f"{arm} norm, running statistics"
        band(ax_curve, r["steps"], r["curves"][arm]["eval"] * 100, ARM_COLORS[arm], label, marker=".")
    ax_curve.axhline(50, color=OKABE_ITO["grey"], linestyle=":", linewidth=1, label="chance")
    ax_curve.set_xlabel("training steps (batches of 32)")
    ax_curve.set_ylabel("test accuracy (%)")
    ax_curve.set_title(f"test accuracy during training (eval mode); line: mean of {r['config']['seeds']} seeds, "
                       "band: min to max", fontsize=10)
    ax_curve.legend(fontsize=8)
    ax_curve.grid(alpha=0.3)
    x = np.arange(len(ARMS))
    for j, mode in enumerate(("batch", "eval")):
        vals = [r["final"][arm][mode] * 100 for arm in ARMS]
        for i, (arm, v) in enumerate(zip(ARMS, vals)):
            xpos = i + (j - 0.5) * 0.36
            ax_final.bar(xpos, v.mean(), 0.34, color=ARM_COLORS[arm], alpha=1.0 if mode == "eval" else 0.45,
                         hatch=None if mode == "eval" else "//", edgecolor="white")
            ax_final.plot(np.full(len(v), xpos), v, "o", color=OKABE_ITO["black"], markersize=3)
    ax_final.set_xticks(x, labels=[f"{a} norm" for a in ARMS])
    lo = min(min(r["final"][a][m].min() for a in ARMS for m in ("batch", "eval")) * 100 - 5, 90)
    ax_final.set_ylim(max(lo, 0), 100.5)
    ax_final.set_ylabel("final test accuracy (%); dots: seeds")
    ax_final.set_title("after training; hatched: with batch statistics (train mode),\nsolid: with running "
                       "statistics (eval mode)", fontsize=10)
    ax_final.grid(alpha=0.3, axis="y")
    fig.suptitle("One transformer encoder block on zero-padded sequences, three choices for Add & Norm:\n"
                 + finding(r), fontsize=10.5)
    return {"accuracy": fig}


def transformer_demo(verbose: bool = True, plot_dir: str | None = None, quick: bool = False) -> dict:
    """Batch norm, masked batch norm and layer norm in a one-block transformer encoder.

    quick: 5 seeds and 100 training steps instead of 8 and 300. Returns run()'s dict plus 'figures'.
    """
    if plot_dir is not None:
        require_matplotlib()
    result = run(**(QUICK if quick else FULL))
    if verbose:
        _print(result)
    return finish(result, figures, plot_dir, "transformer", verbose)
