"""Every ```python block of README.md runs on its own, as a reader would paste it.

The blocks are found by reading README.md at test time, so blocks added later are covered too.
Each runs in its own Python process and working directory (a block may write files); one that needs
an optional package that is not installed is skipped, naming the package.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```python fenced block of a Markdown text."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


with open(README, encoding="utf-8") as f:
    BLOCKS = python_blocks(f.read())


def test_python_blocks_found():
    """The extraction itself: a known two-block text gives both blocks, with their first code line."""
    text = "intro\n```python\na = 1\n```\ntext\n```bash\nls\n```\n```python\nb = 2\nc = 3\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (10, "b = 2\nc = 3\n")]
    assert len(BLOCKS) >= 2                      # the README's "Use" section has two


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, tmp_path):
    """In a fresh interpreter (no state leaks between blocks: threads, caches, clusters)."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    missing = re.search(r"ModuleNotFoundError: No module named '([^']+)'", proc.stderr)
    if proc.returncode and missing and not missing.group(1).startswith("fastnorm"):
        pytest.skip(f"README.md:{line} needs the optional package {missing.group(1)}")
    assert proc.returncode == 0, f"README.md:{line} fails as written:\n{proc.stderr}"
