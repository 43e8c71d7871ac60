"""Teaching demos: each is a function that returns its numbers and can print them."""
from __future__ import annotations

import argparse

from .padding import padding_demo

DEMOS = {"padding": padding_demo}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastnorm", description="fastnorm teaching demos")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a demo (default: padding)")
    demo.add_argument("name", nargs="?", default="padding", choices=sorted(DEMOS),
                      help="which demo: " + ", ".join(sorted(DEMOS)))
    demo.add_argument("--plot", metavar="DIR", help="save figures (PNG) into DIR (needs matplotlib)")
    args = parser.parse_args(argv)
    DEMOS[args.name](verbose=True, plot_dir=args.plot)
    return 0
