"""Command line: ``python -m fastnorm demo [NAME] [--plot DIR]``."""
import sys

from .demos import main

if __name__ == "__main__":
    sys.exit(main())
