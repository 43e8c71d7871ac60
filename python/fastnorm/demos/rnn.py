"""A layer-normalized recurrent network, as in the notes, trained with fastnorm's gradients.

The simplest recurrent network (no LSTM, no GRU): at every time step the summed inputs

    a_t = x_t W_xh + h_{t-1} W_hh

go through a nonlinearity, ``h_t = tanh(a_t + b)``. The layer-normalized version normalizes
``a_t`` over its H hidden units, one mean and std per sequence and time step:

    h_t = tanh(layer_norm(a_t) * gamma + beta)

Backpropagation through time is plain NumPy matrix products, tanh' and
``fastnorm.layer_norm_backward``. Sequences have different lengths: a sequence's hidden state stops
changing after its last token, and the class is read from it.

The task: remember the first token. Each sequence is 4 to 12 tokens from a 4-symbol alphabet
(one-hot inputs); the target is the first symbol, so the network must carry it through up to 11
further steps. Sequences are zero-padded to 12: padded steps have input 0 and leave the hidden state
unchanged, so padding never reaches the loss of either network. For each of 20 seeds both networks
start from the same weights and see the same batches (Adam, gradient clipping); the demo reports
mean and spread over the seeds and, paired by seed, how often layer norm reached 95% test accuracy
sooner, later or at the same evaluation (a sign test says whether that count could be chance). It
claims nothing beyond this task and these settings: on the adding problem (sum the two marked
numbers of a sequence) with inputs scaled by 5, tried while choosing the task, the plain network
did as well or better.

The second half looks at the statistics batch norm would need: one (mean, var) per hidden unit
and time step over the batch. The summed inputs of padded positions are set to 0, as a
zero-padded activation tensor holds them, and batch norm without a mask would average those zeros
in: as fewer real values remain at each step the zeros drag the statistics, the real ones rest on
few samples, and with fewer than two real sequences there are none.
"""
from __future__ import annotations

import math
import textwrap

import numpy as np

import fastnorm

from ._common import finish, new_figure, require_matplotlib, table
from ._style import ARM_COLORS, OKABE_ITO, band, pm

SYMBOLS, HIDDEN = 4, 32
MIN_LEN, MAX_LEN = 4, 12          # training lengths
LONG_MIN, LONG_MAX = 13, 24       # longer than anything seen in training
STEPS, BATCH, LR, CLIP = 200, 32, 3e-3, 1.0
EVAL_EVERY, TEST_SIZE, STATS_BATCH = 20, 256, 64
SEEDS = tuple(range(20))
TARGET_ACCURACY = 0.95


# ---- data ----------------------------------------------------------------------------------------

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]     # x, mask, y


def first_token_batch(rng, n: int, min_len: int = MIN_LEN, max_len: int = MAX_LEN) -> Batch:
    """n one-hot sequences of random length in [min_len, max_len], zero-padded to max_len.

    Returns x (n, max_len, SYMBOLS), mask (n, max_len), y (n,) = the first symbol.
    """
    lengths = rng.integers(min_len, max_len + 1, n)
    mask = fastnorm.mask_from_lengths(lengths, max_len)
    tokens = rng.integers(0, SYMBOLS, (n, max_len))
    x = np.eye(SYMBOLS)[tokens] * mask[:, :, None]
    return x, mask, tokens[:, 0]


# ---- the network ---------------------------------------------------------------------------------

def init_params(rng, inputs: int = SYMBOLS, hidden: int = HIDDEN, classes: int = SYMBOLS) -> dict:
    """Orthogonal recurrent weights, scaled Gaussian input and output weights, zero biases."""
    q, _ = np.linalg.qr(rng.standard_normal((hidden, hidden)))
    return dict(
        W_xh=rng.standard_normal((inputs, hidden)) / np.sqrt(inputs),   # (D, H)
        W_hh=q,                                                          # (H, H)
        b=np.zeros(hidden),                                              # plain network's bias
        gamma=np.ones(hidden), beta=np.zeros(hidden),                    # layer norm's gain and bias
        W_hy=rng.standard_normal((hidden, classes)) / np.sqrt(hidden),   # (H, K)
        b_y=np.zeros(classes),
    )


def forward(p: dict, x, mask, layer_norm: bool):
    """Run the network over (B, T, D) inputs; returns the final hidden states (B, H) and a cache.

    Padded steps (mask False) leave a sequence's hidden state unchanged; their layer-norm values
    are computed but never used (so no ``mask=`` is needed for layer norm here).
    """
    B, T, _ = x.shape
    h = np.zeros((B, p["W_hh"].shape[0]))
    cache = []
    for t in range(T):
        a = x[:, t] @ p["W_xh"] + h @ p["W_hh"]                        # summed inputs (B, H)
        if layer_norm:
            n, mean, rstd = fastnorm.layer_norm(a, p["gamma"], p["beta"], return_stats=True)
        else:
            n, mean, rstd = a + p["b"], None, None
        h_new = np.tanh(n)
        cache.append((h, a, h_new, mean, rstd))
        h = np.where(mask[:, t, None], h_new, h)
    return h, cache


def loss_and_grads(p: dict, x, mask, y, layer_norm: bool):
    """Mean cross-entropy of the class read from the final hidden state, and its gradients.

    Returns (loss, grads, logits); grads has the keys of p (zeros for the unused bias).
    """
    h, cache = forward(p, x, mask, layer_norm)
    logits = h @ p["W_hy"] + p["b_y"]
    B = len(y)
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z)
    prob /= prob.sum(axis=1, keepdims=True)
    loss = float(-np.mean(np.log(prob[np.arange(B), y])))
    dlogits = prob
    dlogits[np.arange(B), y] -= 1.0
    dlogits /= B

    g = {k: np.zeros_like(v) for k, v in p.items()}
    g["W_hy"], g["b_y"] = h.T @ dlogits, dlogits.sum(axis=0)
    dh = dlogits @ p["W_hy"].T
    for t in reversed(range(len(cache))):                              # backpropagation through time
        h_prev, a, h_new, mean, rstd = cache[t]
        real = mask[:, t, None]
        dn = np.where(real, dh, 0.0) * (1.0 - h_new ** 2)                # through tanh
        if layer_norm:
            da, dgamma, dbeta = fastnorm.layer_norm_backward(dn, a, mean, rstd, p["gamma"])
            g["gamma"] += dgamma
            g["beta"] += dbeta
        else:
            da = dn
            g["b"] += dn.sum(axis=0)
        g["W_xh"] += x[:, t].T @ da
        g["W_hh"] += h_prev.T @ da
        dh = da @ p["W_hh"].T + np.where(real, 0.0, dh)                # padded steps pass dh through
    return loss, g, logits


def _accuracy(logits, y) -> float:
    return float(np.mean(logits.argmax(axis=1) == y))


def train(layer_norm: bool, seed: int, steps: int = STEPS, test: Batch | None = None,
          long_test: Batch | None = None) -> dict:
    """Adam with global-norm clipping; the same initial weights and batches for both networks."""
    p = init_params(np.random.default_rng(1000 + seed))
    rng = np.random.default_rng(seed)
    m1 = {k: np.zeros_like(v) for k, v in p.items()}
    m2 = {k: np.zeros_like(v) for k, v in p.items()}
    test = test if test is not None else first_token_batch(np.random.default_rng(10_000), TEST_SIZE)
    curve_steps, test_loss, test_acc, train_loss = [], [], [], []
    for step in range(1, steps + 1):
        x, mask, y = first_token_batch(rng, BATCH)
        loss, g, _ = loss_and_grads(p, x, mask, y, layer_norm)
        train_loss.append(loss)
        norm = np.sqrt(sum(float((v * v).sum()) for v in g.values()))
        clip = min(1.0, CLIP / norm) if norm > 0 else 1.0
        for k in p:
            gk = g[k] * clip
            m1[k] = 0.9 * m1[k] + 0.1 * gk
            m2[k] = 0.999 * m2[k] + 0.001 * gk * gk
            p[k] -= LR * (m1[k] / (1 - 0.9 ** step)) / (np.sqrt(m2[k] / (1 - 0.999 ** step)) + 1e-8)
        if step % EVAL_EVERY == 0 or step == steps:
            tl, _, logits = loss_and_grads(p, *test, layer_norm)
            curve_steps.append(step)
            test_loss.append(tl)
            test_acc.append(_accuracy(logits, test[2]))
    reached = [s for s, a in zip(curve_steps, test_acc) if a >= TARGET_ACCURACY]
    run = dict(params=p, steps=np.array(curve_steps), test_loss=np.array(test_loss),
               test_acc=np.array(test_acc), train_loss=np.array(train_loss),
               steps_to_target=reached[0] if reached else None)
    if long_test is not None:
        _, _, logits = loss_and_grads(p, *long_test, layer_norm)
        run["long_acc"] = _accuracy(logits, long_test[2])
    return run


# ---- what batch norm would see at each time step -------------------------------------------------

def summed_inputs(p: dict, x, mask) -> np.ndarray:
    """The summed inputs a_t of the plain network as a zero-padded (B, T, H) batch: padded
    positions hold 0, what batch norm without a mask averages in."""
    _, cache = forward(p, x, mask, layer_norm=False)
    a = np.stack([c[1] for c in cache], axis=1)
    return np.where(mask[:, :, None], a, 0.0)


def per_step_statistics(p: dict, x, mask) -> dict:
    """Batch-norm statistics of the summed inputs a_t at each step: zero padding counted vs real only.

    For each t: the number of real sequences, the mean over hidden units of
    |mean_padded - mean_real| / std_real and of std_padded / std_real (NaN where batch norm on the
    real sequences is undefined: fewer than 2), and whether ``fastnorm.batch_norm(a_t, mask=)``
    could be computed at all. 'a' is the zero-padded (B, T, H) batch of summed inputs, 'x' and
    'mask' the batch it came from.
    """
    A = summed_inputs(p, x, mask)
    T = x.shape[1]
    n_real = mask.sum(axis=0)
    mean_shift, std_ratio = np.full(T, np.nan), np.full(T, np.nan)
    defined = np.zeros(T, dtype=bool)
    for t in range(T):
        a = A[:, t]
        _, mean_pad, rstd_pad = fastnorm.batch_norm(a, eps=0.0, return_stats=True)
        try:
            _, mean_real, rstd_real = fastnorm.batch_norm(a, eps=0.0, mask=mask[:, t], return_stats=True)
        except ValueError:          # fewer than 2 real sequences at this step: no statistics
            continue
        defined[t] = True
        mean_shift[t] = np.mean(np.abs(mean_pad - mean_real) * rstd_real)
        std_ratio[t] = np.mean(rstd_real / rstd_pad)
    return dict(t=np.arange(1, T + 1), n_real=n_real, mean_shift=mean_shift, std_ratio=std_ratio,
                batch_norm_defined=defined, standard_error=1.0 / np.sqrt(np.maximum(n_real, 1)),
                a=A, x=x, mask=mask)


def _alone_vs_batch(p: dict, x, mask) -> dict:
    """Layer-norm RNN: one sequence alone vs. in the batch; batch norm of a batch of one."""
    h_batch, _ = forward(p, x, mask, layer_norm=True)
    h_alone, _ = forward(p, x[:1], mask[:1], layer_norm=True)
    a0 = x[:1, 0] @ p["W_xh"]
    try:
        fastnorm.batch_norm(a0)
        batch_of_one = "computed"
    except ValueError as err:
        batch_of_one = f"ValueError: {str(err).split(';')[0]}"
    return dict(layer_norm_alone_diff=float(np.abs(h_alone[0] - h_batch[0]).max()), batch_norm_batch_of_one=batch_of_one)


# ---- the demo ------------------------------------------------------------------------------------

def sign_test(wins: int, losses: int) -> float:
    """Two-sided sign test: the probability of a split at least this uneven if either arm were as
    likely to win each untied seed (exact binomial with p = 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def _steps(run, never: int) -> int:
    return run["steps_to_target"] if run["steps_to_target"] is not None else never


def compare(plain_runs, ln_runs, steps: int = STEPS) -> dict:
    """Paired by seed: how often layer norm reached the target sooner / later / at the same
    evaluation, the sign test of that, and a verdict that says no more than those numbers.

    A run that never reached the target counts as later than any run that did.
    """
    never = steps + EVAL_EVERY
    pairs = [(_steps(pl, never), _steps(ln, never)) for pl, ln in zip(plain_runs, ln_runs)]
    sooner = sum(ln < pl for pl, ln in pairs)
    later = sum(ln > pl for pl, ln in pairs)
    ties = len(pairs) - sooner - later
    p = sign_test(sooner, later)
    if p < 0.05:
        verdict = "sooner" if sooner > later else "later"
    else:
        verdict = "no clear difference"
    reached = {name: sum(r["steps_to_target"] is not None for r in runs)
               for name, runs in (("plain", plain_runs), ("layer_norm", ln_runs))}
    return dict(sooner=sooner, later=later, ties=ties, p=p, verdict=verdict, reached=reached, n=len(pairs))


def rnn_demo(verbose: bool = True, plot_dir: str | None = None, seeds=SEEDS, steps: int = STEPS) -> dict:
    """Train the plain and the layer-normalized RNN on the first-token task; look at the statistics.

    Returns a dict: 'plain' and 'layer_norm' (one run per seed: steps, test_loss, test_acc,
    train_loss, steps_to_target, long_acc, params), 'comparison' (see compare: sooner, later, ties,
    p, verdict, reached), 'verdict', 'per_step' (see per_step_statistics, seed 0's plain network,
    on a test batch padded to LONG_MAX), 'per_step_seeds' (mean_shift and std_ratio per seed and
    step), 'layer_norm_alone_diff', 'batch_norm_batch_of_one', 'config' and 'figures'.
    """
    if plot_dir is not None:
        require_matplotlib()
    test = first_token_batch(np.random.default_rng(10_000), TEST_SIZE)
    long_test = first_token_batch(np.random.default_rng(20_000), TEST_SIZE, LONG_MIN, LONG_MAX)
    plain = [train(False, s, steps, test, long_test) for s in seeds]
    ln = [train(True, s, steps, test, long_test) for s in seeds]
    comparison = compare(plain, ln, steps)

    # statistics on a padded batch with lengths up to LONG_MAX (beyond the training lengths)
    x, mask, _ = first_token_batch(np.random.default_rng(30_000), STATS_BATCH, MIN_LEN, LONG_MAX)
    every = [per_step_statistics(run["params"], x, mask) for run in plain]
    per_step_seeds = {k: np.array([s[k] for s in every]) for k in ("mean_shift", "std_ratio")}
    alone = _alone_vs_batch(ln[0]["params"], x, mask)
    result = dict(plain=plain, layer_norm=ln, comparison=comparison, verdict=comparison["verdict"],
                  per_step=every[0], per_step_seeds=per_step_seeds, **alone,
                  config=dict(symbols=SYMBOLS, hidden=HIDDEN, lengths=(MIN_LEN, MAX_LEN), steps=steps,
                              batch=BATCH, lr=LR, seeds=tuple(seeds), target_accuracy=TARGET_ACCURACY,
                              long_lengths=(LONG_MIN, LONG_MAX), eval_every=EVAL_EVERY, test_size=TEST_SIZE))
    if verbose:
        _print(result)
    return finish(result, figures, plot_dir, "rnn", verbose)


def headline(r: dict) -> str:
    """The finding in one sentence, from the comparison."""
    c, target, n = r["comparison"], f"{r['config']['target_accuracy']:.0%}", r["comparison"]["n"]
    if c["verdict"] == "no clear difference":
        return (f"No clear difference: layer norm reached {target} test accuracy sooner in {c['sooner']} of {n} seeds, "
                f"later in {c['later']}, tied in {c['ties']} (sign test p = {c['p']:.2g})")
    first, other = ("sooner", "later") if c["verdict"] == "sooner" else ("later", "sooner")
    return (f"The layer-norm RNN reached {target} test accuracy {first} in {c[first]} of {n} seeds "
            f"({other} in {c[other]}, tied in {c['ties']}; sign test p = {c['p']:.1g})")


def _print(r: dict) -> None:
    c = r["config"]
    print(f"Task: remember the first of {c['lengths'][0]}-{c['lengths'][1]} tokens ({c['symbols']} symbols, "
          f"one-hot), zero-padded to {c['lengths'][1]}; padded steps leave the hidden state unchanged.")
    print(f"H = {c['hidden']} tanh units; {c['steps']} Adam steps of {c['batch']} sequences, lr {c['lr']:g}; "
          f"{len(c['seeds'])} seeds, each with the same initial weights and batches for both networks;")
    print(f"test accuracy on {c['test_size']} held-out sequences every {c['eval_every']} steps. "
          "Mean +- std over seeds:\n")
    never = c["steps"] + c["eval_every"]
    rows = []
    for name, runs in (("plain RNN", r["plain"]), ("layer-norm RNN", r["layer_norm"])):
        reached = [run["steps_to_target"] for run in runs if run["steps_to_target"] is not None]
        rows.append([name, f"{len(reached)} of {len(runs)}",
                     f"{np.median([_steps(run, never) for run in runs]):g}",
                     pm([run["test_acc"][-1] for run in runs]), pm([run["test_loss"][-1] for run in runs]),
                     pm([run["long_acc"] for run in runs])])
    print(table(["", f"reached {c['target_accuracy']:.0%}", f"median steps to {c['target_accuracy']:.0%}",
                 "final accuracy", "final loss", f"acc. len {c['long_lengths'][0]}-{c['long_lengths'][1]}"], rows))
    print(f"  (median steps: a run that never reached {c['target_accuracy']:.0%} counts as {never})")
    for name, runs in (("plain", r["plain"]), ("layer norm", r["layer_norm"])):
        print(f"  steps to {c['target_accuracy']:.0%} per seed, {name + ':':<11} " +
              " ".join(f"{run['steps_to_target']}" if run["steps_to_target"] else "-" for run in runs))
    print()
    print(textwrap.fill(headline(r) + ".", 100))
    both = [k for k, (pl, ln) in enumerate(zip(r["plain"], r["layer_norm"]))
            if pl["steps_to_target"] is not None and ln["steps_to_target"] is not None]
    if both:
        print(textwrap.fill(
            f"On lengths {c['long_lengths'][0]}-{c['long_lengths'][1]}, longer than any training sequence, in the "
            f"{len(both)} seeds where both reached {c['target_accuracy']:.0%}: accuracy "
            f"{pm([r['layer_norm'][k]['long_acc'] for k in both])} with layer norm, "
            f"{pm([r['plain'][k]['long_acc'] for k in both])} without. Over all seeds the plain network's lower "
            "numbers mostly reflect the runs that had not learned the task yet.", 100))
    print(textwrap.fill(
        "What this does not show: that layer norm helps on other tasks or settings (on the adding problem, "
        "tried while choosing this one, it did not), or that a trained layer-norm RNN is more accurate once "
        "both have learned the task.", 100))
    print()

    s, seeds = r["per_step"], r["per_step_seeds"]
    print("What batch norm would need at each time step: statistics of the summed inputs a_t over the batch.")
    lo, hi = c["lengths"][0], c["long_lengths"][1]
    print(f"{len(s['mask'])} test sequences of lengths {lo}-{hi}, zero-padded to {hi}; a_t of each seed's trained plain "
          "network,\nset to 0 at padded positions (what a zero-padded activation tensor holds). 'padded': batch norm "
          "counting\nevery position; 'real': with mask=. Ratios are means over hidden units; mean +- std over the "
          f"{len(seeds['std_ratio'])} seeds:")
    rows = []
    undefined = np.flatnonzero(~s["batch_norm_defined"])
    last_defined = np.flatnonzero(s["batch_norm_defined"])[-1:]
    show = {0, len(s["t"]) - 1, *undefined[:1], *last_defined, *range(1, len(s["t"]), 2)}
    for k in range(len(s["t"])):
        if k in show:
            ok = s["batch_norm_defined"][k]
            rows.append([f"t = {s['t'][k]}", s["n_real"][k], s["standard_error"][k],
                         pm(seeds["mean_shift"][:, k], 2) if ok else "undefined",
                         pm(seeds["std_ratio"][:, k], 2) if ok else "undefined"])
    print(table(["time step", "real sequences n", "1/sqrt(n)", "|mean padded - real| / std real",
                 "std padded / std real"], rows, digits=2))
    print("  As sequences end, the zeros of the padding outnumber the real values and drag the")
    print("  statistics; the real ones rest on fewer and fewer samples (noise ~ 1/sqrt(n) std), and with")
    print(f"  fewer than 2 there are none. Steps beyond {c['lengths'][1]} never occurred in training, so there are")
    print("  no running statistics for them either. Layer norm needs none of this: each sequence and step")
    print("  has its own statistics.")
    print("  One sequence alone vs. in the batch, layer-norm RNN: max |h difference| = "
          f"{r['layer_norm_alone_diff']:.1e} (rounding);")
    print(f"  batch norm of a batch of one: {r['batch_norm_batch_of_one']}")


def figures(r: dict) -> dict:
    """'training': test accuracy over seeds and steps to the target per seed; 'statistics': per time step."""
    return {"training": _training_figure(r), "statistics": _statistics_figure(r)}


def _training_figure(r: dict):
    c, comp = r["config"], r["comparison"]
    target, never = c["target_accuracy"], c["steps"] + c["eval_every"]
    fig = new_figure(12.5, 4.8)
    ax_acc, ax_pair = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.35, 1]})
    arms = (("plain RNN", r["plain"], ARM_COLORS["none"], "o"), ("layer-norm RNN", r["layer_norm"],
                                                                 ARM_COLORS["layer"], "s"))
    for name, runs, color, marker in arms:
        band(ax_acc, runs[0]["steps"], [run["test_acc"] for run in runs], color, f"{name}: mean", marker=marker,
             markersize=4)
    ax_acc.axhline(target, color="black", linestyle="--", linewidth=1, label=f"{target:.0%} target")
    ax_acc.axhline(1 / c["symbols"], color="black", linestyle=":", linewidth=1, label="chance (1/4)")
    ax_acc.set_xlabel("training step (Adam, batches of 32)")
    ax_acc.set_ylabel(f"test accuracy ({c['test_size']} held-out sequences)")
    ax_acc.set_title(f"test accuracy: line = mean over {comp['n']} seeds, band = min to max", fontsize=10)
    ax_acc.legend(fontsize=8, loc="lower right")
    ax_acc.grid(alpha=0.3)

    pl = np.array([_steps(run, never) for run in r["plain"]], dtype=float)
    ln = np.array([_steps(run, never) for run in r["layer_norm"]], dtype=float)
    jitter = np.random.default_rng(0).uniform(-4, 4, (2, len(pl)))       # separate identical pairs
    ax_pair.plot([0, never + 10], [0, never + 10], color="black", linewidth=1)
    ax_pair.scatter(pl + jitter[0], ln + jitter[1], s=40, color=OKABE_ITO["blue"], alpha=0.75,
                    edgecolor="black", linewidth=0.5, zorder=3, label="one seed")
    ax_pair.axvline(never - c["eval_every"] / 2, color=OKABE_ITO["grey"], linestyle=":", linewidth=1)
    ax_pair.text(never, c["eval_every"], "not reached\nin 200 steps", ha="center", fontsize=8)
    ax_pair.text(never * 0.32, never * 0.9, f"above the diagonal:\nlayer norm later ({comp['later']})",
                 fontsize=9, ha="center")
    ax_pair.text(never * 0.75, never * 0.25, f"below: layer norm\nsooner ({comp['sooner']})", fontsize=9,
                 ha="center")
    ax_pair.set_xlim(0, never + 10)
    ax_pair.set_ylim(0, never + 10)
    ax_pair.set_xlabel(f"plain RNN: steps to {target:.0%} test accuracy")
    ax_pair.set_ylabel(f"layer-norm RNN: steps to {target:.0%}")
    ax_pair.set_title(f"each seed: same initial weights and batches; on the diagonal: tied ({comp['ties']})",
                      fontsize=10)
    ax_pair.set_aspect("equal")
    ax_pair.grid(alpha=0.3)
    lo, hi = c["lengths"]
    fig.suptitle(f"Remember the first of {lo}-{hi} tokens (zero-padded; padding leaves the state unchanged).\n"
                 f"{headline(r)}")
    return fig


def _statistics_figure(r: dict):
    c, s, seeds = r["config"], r["per_step"], r["per_step_seeds"]
    fig = new_figure(12.5, 4.6)
    ax_n, ax_stat = fig.subplots(1, 2)
    ax_n.bar(s["t"], s["n_real"], color=OKABE_ITO["grey"])
    ax_n.axvline(c["lengths"][1] + 0.5, color="black", linestyle="--", linewidth=1,
                 label=f"longest training length ({c['lengths'][1]})")
    ax_n.set_xlabel("time step t")
    ax_n.set_ylabel("real (not padded) sequences n")
    ax_n.set_title(f"{len(s['mask'])} test sequences of lengths {c['lengths'][0]}-{c['long_lengths'][1]}, padded to "
                   f"{c['long_lengths'][1]}:\nhow many are still running at step t", fontsize=10)
    ax_n.legend(fontsize=8)

    defined = s["batch_norm_defined"]
    t = s["t"][defined]
    band(ax_stat, t, seeds["std_ratio"][:, defined], OKABE_ITO["blue"], "std padded / std real", marker="s",
         markersize=4)
    band(ax_stat, t, seeds["mean_shift"][:, defined], OKABE_ITO["vermillion"],
         "|mean padded - mean real| / std real", marker="o", markersize=4)
    ax_stat.plot(t, s["standard_error"][defined], linestyle="--", color="black",
                 label="1/sqrt(n): noise of a mean of n real values, in std")
    undefined = s["t"][~defined]
    if len(undefined):
        ax_stat.axvspan(undefined[0] - 0.5, s["t"][-1] + 0.5, color=OKABE_ITO["grey"], alpha=0.25,
                        label="fewer than 2 real sequences: no batch statistics")
    top = 1.6
    over = seeds["mean_shift"][:, defined].mean(axis=0) > top
    for k in np.flatnonzero(over):                        # off the scale: say so, with the value
        ax_stat.annotate(f"mean {seeds['mean_shift'][:, defined][:, k].mean():.1f}, off the scale", (t[k], top),
                         xytext=(-120, -25), textcoords="offset points", color=OKABE_ITO["vermillion"], fontsize=9,
                         arrowprops=dict(arrowstyle="->", color=OKABE_ITO["vermillion"]))
    ax_stat.set_ylim(0, top)
    ax_stat.set_xlim(0.5, s["t"][-1] + 0.5)
    ax_stat.set_xlabel("time step t")
    ax_stat.set_ylabel("ratio (mean over the 32 hidden units)")
    ax_stat.set_title(f"a_t of each seed's plain RNN, padding set to 0\nline = mean over "
                      f"{len(seeds['std_ratio'])} seeds, band = min to max", fontsize=10)
    ax_stat.legend(fontsize=8, loc="upper left")
    ax_stat.grid(alpha=0.3)
    ratio = seeds["std_ratio"][:, defined].mean(axis=0)
    lowest = int(np.argmin(ratio))
    fig.suptitle(f"Batch norm per time step over a zero-padded batch: counting the padding shrinks the std of a_t to "
                 f"{ratio[lowest]:.2f} of the real\nsequences' (t = {t[lowest]}), "
                 f"and from t = {undefined[0] if len(undefined) else '-'} "
                 "fewer than 2 sequences remain, so there are no statistics at all")
    return fig
