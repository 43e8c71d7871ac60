"""Shared pytest setup for the fastnorm tests: make ``reference`` importable in any import mode."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
