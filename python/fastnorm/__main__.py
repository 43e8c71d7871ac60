"""Command line: ``python -m fastnorm demo [NAME] [--plot DIR]`` and ``python -m fastnorm bench [--quick]``."""
import sys

from .demos import main

if __name__ == "__main__":
    sys.exit(main())
