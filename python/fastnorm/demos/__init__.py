"""Teaching demos: each is a function that returns its numbers and can print them.

``name_demo(verbose=True, plot_dir=None) -> dict``: ``verbose`` prints readable tables,
``plot_dir`` saves the demo's figures there as PNG (needs matplotlib) and the returned dict holds
every number shown (and ``'figures'``, the paths written). Each module also has a ``figures``
function that returns the matplotlib figures, for notebooks.

From the command line: ``python -m fastnorm demo [NAME] [--plot DIR] [--quick]``. The demos that
train on scikit-learn's digits (batchsize, groups, bafig6) need scikit-learn (``fastnorm-numpy[demos]``);
``--quick`` runs those that train with fewer seeds and epochs.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import textwrap

from ._common import PlotUnavailable
from ._digits import DataUnavailable
from .affine import affine_demo
from .axes import axes_demo
from .bafig6 import bafig6_demo
from .batchsize import batchsize_demo
from .data import data_demo
from .groups import groups_demo
from .invariance import invariance_demo
from .padding import padding_demo
from .rnn import rnn_demo
from .transformer import transformer_demo
from .ztable import ztable_demo

DEMOS = {
    "padding": (padding_demo, "the notes' padded batch ('Hi Rohan' + 'How are you today'): batch norm with "
                              "and without mask= vs layer norm; then 100 sentences padded to 60 (default)"),
    "ztable": (ztable_demo, "the notes' f1, f2 -> z1, z2, z3 table: batch norm per column, layer norm per row"),
    "invariance": (invariance_demo, "Ba et al.'s invariance table for batch, weight and layer norm, measured"),
    "rnn": (rnn_demo, "a layer-normalized RNN trained with fastnorm's gradients vs a plain one; per-time-step "
                      "batch statistics on variable-length sequences"),
    "data": (data_demo, "data normalization: z-score and min-max scaling of a small feature table"),
    "axes": (axes_demo, "which elements share one statistic in batch, layer, instance and group norm, "
                        "measured on an (N, C, H, W) tensor"),
    "batchsize": (batchsize_demo, "batch-statistics noise against batch size, a batch of one, running vs "
                                  "exact (PreciseBN) statistics, the notes' second batch [digits]"),
    "groups": (groups_demo, "instance and group norm on the digits: per-image contrast and brightness "
                            "invariance, and why batch norm does not give it [digits]"),
    "affine": (affine_demo, "the notes' 0.3 * gamma_1 + beta_1 = p_1; gamma = sigma, beta = mu recovers the "
                            "input; (x - mu) / (sigma + eps) vs / sqrt(sigma^2 + eps)"),
    "transformer": (transformer_demo, "why not batch norm in a transformer? a one-block encoder on padded "
                                      "sequences: batch norm, masked batch norm, layer norm"),
    "bafig6": (bafig6_demo, "Ba et al.'s figure 6 in small: layer vs batch norm vs none on the digits at "
                            "batch sizes 128 and 4 [digits]"),
}

__all__ = ["DEMOS", "main", "padding_demo", "ztable_demo", "invariance_demo", "rnn_demo", "data_demo",
           "axes_demo", "batchsize_demo", "groups_demo", "affine_demo", "transformer_demo", "bafig6_demo"]


def _epilog() -> str:
    width = max(map(len, DEMOS))
    lines = ["demos:"]
    for name, (_, text) in DEMOS.items():
        lines += textwrap.wrap(text, 96, initial_indent=f"  {name:<{width}}  ", subsequent_indent=" " * (width + 4))
    lines += [f"  {'all':<{width}}  every demo, one after the other", "",
              "[digits]: needs scikit-learn (pip install \"fastnorm-numpy[demos]\")", "",
              "examples:", "  python -m fastnorm demo", "  python -m fastnorm demo ztable",
              "  python -m fastnorm demo padding --plot figures",
              "  python -m fastnorm demo transformer --quick"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastnorm", description="fastnorm teaching demos")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a demo (default: padding); 'demo --help' lists them",
                          description="Run a teaching demo: it prints its numbers as tables and, with "
                                      "--plot DIR, saves its figures as PNG files in DIR.",
                          epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("name", nargs="?", default="padding", choices=[*DEMOS, "all"], metavar="NAME",
                      help="which demo (default: padding); one of: " + ", ".join([*DEMOS, "all"]))
    demo.add_argument("--plot", metavar="DIR", help="save the figures (PNG) into DIR (needs matplotlib)")
    demo.add_argument("--quick", action="store_true",
                      help="demos that train: fewer seeds and epochs (seconds instead of tens of seconds)")
    bench = sub.add_parser("bench", help="time fastnorm against NumPy on this machine (a few seconds)",
                           description="Time fastnorm against the equivalent NumPy code and print a table.")
    bench.add_argument("--quick", action="store_true", help="smaller arrays, fewer rounds (about a second)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .._bench import bench as run_bench
        run_bench(quick=args.quick)
        return 0
    if args.plot is not None and os.path.exists(args.plot) and not os.path.isdir(args.plot):
        demo.error(f"argument --plot: {args.plot!r} is a file; --plot takes a directory to write the PNGs into")
    names = list(DEMOS) if args.name == "all" else [args.name]
    missing = []                    # demos that could not run: their data needs scikit-learn
    try:
        for k, name in enumerate(names):
            if len(names) > 1:
                print(("\n" if k else "") + f"==== {name} " + "=" * (60 - len(name)))
            fn = DEMOS[name][0]
            quick = {"quick": True} if args.quick and "quick" in inspect.signature(fn).parameters else {}
            try:
                fn(verbose=True, plot_dir=args.plot, **quick)
            except DataUnavailable as err:          # 'all' goes on with the other demos
                print(f"python -m fastnorm demo {name}: {err}", file=sys.stderr)
                missing.append(name)
    except PlotUnavailable as err:
        print(f"python -m fastnorm demo: --plot: {err}", file=sys.stderr)
        return 2
    except OSError as err:          # the figure directory cannot be created or written
        if args.plot is None or err.filename is None:
            raise
        print(f"python -m fastnorm demo: --plot: cannot write the figures into {args.plot!r}: "
              f"{err.strerror} ({err.filename})", file=sys.stderr)
        return 2
    except BrokenPipeError:         # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if missing and len(names) > 1:
        print(f"python -m fastnorm demo all: not run (scikit-learn missing): {', '.join(missing)}", file=sys.stderr)
    return 2 if missing else 0
