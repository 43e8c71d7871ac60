"""Teaching demos: each is a function that returns its numbers and can print them.

``name_demo(verbose=True, plot_dir=None) -> dict``: ``verbose`` prints readable tables,
``plot_dir`` saves the demo's figures there as PNG (needs matplotlib) and the returned dict holds
every number shown (and ``'figures'``, the paths written). Each module also has a ``figures``
function that returns the matplotlib figures, for notebooks.

From the command line: ``python -m fastnorm demo [NAME] [--plot DIR]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

from ._common import PlotUnavailable
from .data import data_demo
from .invariance import invariance_demo
from .padding import padding_demo
from .rnn import rnn_demo
from .ztable import ztable_demo

DEMOS = {
    "padding": (padding_demo, "the notes' padded batch ('Hi Rohan' + 'How are you today'): batch norm with "
                              "and without mask= vs layer norm; then 100 sentences padded to 60 (default)"),
    "ztable": (ztable_demo, "the notes' f1, f2 -> z1, z2, z3 table: batch norm per column, layer norm per row"),
    "invariance": (invariance_demo, "Ba et al.'s invariance table for batch, weight and layer norm, measured"),
    "rnn": (rnn_demo, "a layer-normalized RNN trained with fastnorm's gradients vs a plain one; per-time-step "
                      "batch statistics on variable-length sequences"),
    "data": (data_demo, "data normalization: z-score and min-max scaling of a small feature table"),
}

__all__ = ["DEMOS", "main", "padding_demo", "ztable_demo", "invariance_demo", "rnn_demo", "data_demo"]


def _epilog() -> str:
    width = max(map(len, DEMOS))
    lines = ["demos:"]
    for name, (_, text) in DEMOS.items():
        lines += textwrap.wrap(text, 96, initial_indent=f"  {name:<{width}}  ", subsequent_indent=" " * (width + 4))
    lines += [f"  {'all':<{width}}  every demo, one after the other", "",
              "examples:", "  python -m fastnorm demo", "  python -m fastnorm demo ztable",
              "  python -m fastnorm demo padding --plot figures"]
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
    bench = sub.add_parser("bench", help="time fastnorm against NumPy on this machine (a few seconds)",
                           description="Time fastnorm against the equivalent NumPy code and print a table.")
    bench.add_argument("--quick", action="store_true", help="smaller arrays, fewer rounds (about a second)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .._bench import bench as run_bench
        run_bench(quick=args.quick)
        return 0
    names = list(DEMOS) if args.name == "all" else [args.name]
    try:
        for k, name in enumerate(names):
            if len(names) > 1:
                print(("\n" if k else "") + f"==== {name} " + "=" * (60 - len(name)))
            DEMOS[name][0](verbose=True, plot_dir=args.plot)
    except PlotUnavailable as err:
        print(f"python -m fastnorm demo: --plot: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:         # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0
