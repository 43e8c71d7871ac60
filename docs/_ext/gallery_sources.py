"""Sources the docs build makes for itself, and the sphinx-gallery hooks.

- Copies of the scripts in examples/ for the gallery, each with a title: sphinx-gallery takes the
  first line of a script's docstring as the page title only when an rST underline follows it;
  the copy adds one where it is missing (the scripts themselves keep plain docstrings).
- One gallery script per teaching demo in ``fastnorm.demos.DEMOS``, so a demo added there appears
  in the gallery with its tables and figures without any change here.
- Copies of the notebooks in examples/ for myst-nb, which executes them.
- ``scrape_figures``: the demos draw on matplotlib Figures of their own (an Agg canvas, never
  pyplot), which sphinx-gallery's matplotlib scraper does not see; this saves every such Figure
  a script holds in a variable (or in a dict or list in one).
- ``script_arguments``: the command line a gallery script runs with: what its
  ``# gallery arguments:`` line asks for (a smaller run), and ``--plot FILE`` for the examples
  that save their figure that way (the figure stays open in pyplot for the scraper).
"""
from __future__ import annotations

import glob
import importlib
import inspect
import os
import re
import tempfile
import textwrap
import weakref

EXAMPLES_HEADER = """Examples
========

The scripts in ``examples/``, run when this site is built: their printed output and figures
appear beside the code. Each also runs on its own, ``python examples/NAME.py`` (``--help`` for
its options). The notebooks of ``examples/`` are on the :doc:`../notebooks` page.
"""

DEMOS_HEADER = """Teaching demos
==============

The demos of ``python -m fastnorm demo NAME``: each page runs the demo function, prints its
tables and shows its figures. The numbers are the lecture notes' examples, computed by fastnorm.
"""


def _title(name: str) -> str:
    return f"Demo: {name}"


def write_demo_scripts(out_dir: str) -> None:
    """One ``demo_NAME.py`` per entry of fastnorm.demos.DEMOS (and the gallery's header)."""
    from fastnorm.demos import DEMOS

    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "demo_*.py")):
        os.remove(old)
    _write_if_changed(os.path.join(out_dir, "GALLERY_HEADER.rst"), DEMOS_HEADER)
    for k, (name, (function, description)) in enumerate(DEMOS.items()):
        module = function.__module__
        figures_call = _figures_call(importlib.import_module(module).figures)
        title = _title(name)
        text = f'''"""
{title}
{"=" * len(title)}

{textwrap.fill(description[0].upper() + description[1:] + ".", 96)}

The same tables print with ``python -m fastnorm demo {name}``; ``--plot DIR`` saves the figures.
"""
from {module} import {function.__name__}, figures

result = {function.__name__}(verbose=True)

# %%
# The figures:
demo_figures = {figures_call}
'''
        _write_if_changed(os.path.join(out_dir, f"demo_{k:02d}_{name}.py"), text)


def _figures_call(figures) -> str:
    """``figures(result)``, or ``figures(result["a"], result["b"])`` for a demo whose figures
    function takes the parts of its result by name."""
    names = list(inspect.signature(figures).parameters)
    if len(names) == 1:
        return "figures(result)"
    return "figures(" + ", ".join(f'result["{n}"]' for n in names) + ")"


def check_api_page(path: str, names) -> None:
    """Every public name of fastnorm (``__all__``) must be on the API page."""
    with open(path, encoding="utf-8") as f:
        listed = {line.strip() for line in f}
    missing = [n for n in names if n not in listed]
    if missing:
        raise RuntimeError(f"{os.path.basename(path)} does not list {', '.join(missing)} (in fastnorm.__all__)")


def with_title(source: str, fallback: str) -> str:
    """The script's text with an rST underline below the first line of its docstring (or a
    docstring ``fallback`` when it has none)."""
    found = re.match(r'(\s*(?:#[^\n]*\n\s*)*[rRuU]?("""|\'\'\')\n?)([^\n]+)\n', source)
    if not found:
        return f'"""\n{fallback}\n{"=" * len(fallback)}\n"""\n' + source
    rest = source[found.end():]
    if re.match(r"[=\-~^#*+]{3,}\s*\n", rest):
        return source
    title = found.group(3).strip()
    return source[:found.end()] + "=" * len(title) + "\n" + rest


def copy_examples(examples_dir: str, out_dir: str) -> None:
    """examples/*.py, each with a title, into out_dir (and the gallery's header)."""
    os.makedirs(out_dir, exist_ok=True)
    wanted = {os.path.basename(p) for p in glob.glob(os.path.join(examples_dir, "*.py"))}
    for old in glob.glob(os.path.join(out_dir, "*.py")):
        if os.path.basename(old) not in wanted:
            os.remove(old)
    _write_if_changed(os.path.join(out_dir, "GALLERY_HEADER.rst"), EXAMPLES_HEADER)
    for name in sorted(wanted):
        with open(os.path.join(examples_dir, name), encoding="utf-8") as f:
            source = f.read()
        _write_if_changed(os.path.join(out_dir, name), with_title(source, os.path.splitext(name)[0]))


def copy_notebooks(examples_dir: str, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for path in sorted(glob.glob(os.path.join(examples_dir, "*.ipynb"))):
        target = os.path.join(out_dir, os.path.basename(path))
        with open(path, encoding="utf-8") as f:
            text = f.read()
        # Links into the repository: the README is this site's landing page, docs/X.md is X.md.
        text = text.replace("](../README.md)", "](../index.md)").replace("](../docs/", "](../")
        _write_if_changed(target, text)


def _write_if_changed(path: str, text: str) -> None:
    """Rewrite only when the text differs, so an unchanged source does not rebuild its page."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _figures_in(value):
    from matplotlib.figure import Figure

    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
    return [v for v in items if isinstance(v, Figure) and v.canvas.manager is None]   # not pyplot's


_saved: weakref.WeakSet = weakref.WeakSet()      # Figures already on a page


def scrape_figures(block, block_vars, gallery_conf):
    """sphinx-gallery scraper: save the Figures a script holds that pyplot does not manage, and
    show each at full width (sphinx-gallery puts several of one block side by side, too small)."""
    from sphinx_gallery.scrapers import figure_rst

    found = []
    for value in list(block_vars["example_globals"].values()):
        for fig in _figures_in(value):
            if fig not in _saved and all(fig is not f for f in found):
                found.append(fig)
    rst = ""
    for fig, path in zip(found, block_vars["image_path_iterator"]):
        fig.savefig(path, dpi=110)
        _saved.add(fig)
        rst += figure_rst([path], gallery_conf["src_dir"])     # one below the other, full width
    return rst


GALLERY_ARGUMENTS = "# gallery arguments:"


def script_arguments(gallery_conf, script_vars):
    """sys.argv[1:] for a gallery script: the words after a ``# gallery arguments:`` line in it (a
    smaller run for the docs), and ``--plot FILE`` when the script takes that option."""
    with open(script_vars["src_file"], encoding="utf-8") as f:
        text = f.read()
    args = [word for line in text.splitlines() if line.startswith(GALLERY_ARGUMENTS)
            for word in line[len(GALLERY_ARGUMENTS):].split()]
    if '"--plot"' not in text:
        return args
    name = os.path.splitext(os.path.basename(script_vars["src_file"]))[0]
    return [*args, "--plot", os.path.join(tempfile.gettempdir(), f"fastnorm-docs-{name}.png")]
