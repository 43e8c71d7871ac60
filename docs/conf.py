"""Sphinx configuration of fastnorm's documentation site.

Build (offline, warnings are errors):  python -m sphinx -W -b html docs docs/_build/html

Pages: the landing page, the "Batch norm vs layer norm" tutorial (a MyST notebook executed at
build), the API reference (numpydoc, from the docstrings of the installed fastnorm), the gallery
(sphinx-gallery runs every script in examples/ and one generated script per teaching demo), the
notebooks of examples/ (executed at build by myst-nb), the benchmark table, and the performance,
contract, decisions and robustness pages (docs/*.md as they are).
"""
import os
import sys

import fastnorm

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
sys.path.insert(0, os.path.join(DOCS, "_ext"))

import gallery_sources  # noqa: E402  (docs/_ext, after the path is set)

project = "fastnorm"
author = "the fastnorm developers"
copyright = "the fastnorm developers"
release = fastnorm.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_nb",
]

# Generated at build time (see gallery_sources): copies of examples/ (scripts with a title, and
# the notebooks) and one script per teaching demo.
gallery_sources.copy_examples(os.path.join(ROOT, "examples"), os.path.join(DOCS, "_example_scripts"))
gallery_sources.write_demo_scripts(os.path.join(DOCS, "_demo_scripts"))
gallery_sources.copy_notebooks(os.path.join(ROOT, "examples"), os.path.join(DOCS, "notebooks"))
gallery_sources.check_api_page(os.path.join(DOCS, "api.rst"), fastnorm.__all__)

exclude_patterns = ["_build", "_example_scripts", "_demo_scripts", "**.ipynb_checkpoints", "auto_examples/*.ipynb",
                    "auto_demos/*.ipynb"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# Offline: no intersphinx (nothing is fetched at build time).
smartquotes = False                  # keep "--plot" and quotes in prose as written

autosummary_generate = True
autodoc_typehints = "none"           # the signatures say it; numpydoc's Parameters say the types
numpydoc_show_class_members = False  # the class pages list their methods through autodoc
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "force"          # every notebook runs at build, against the installed fastnorm
nb_execution_raise_on_error = True
nb_execution_timeout = 300
nb_merge_streams = True

sphinx_gallery_conf = {
    "examples_dirs": [os.path.join(DOCS, "_example_scripts"), os.path.join(DOCS, "_demo_scripts")],
    "gallery_dirs": ["auto_examples", "auto_demos"],
    "filename_pattern": r".*\.py$",                       # run every script, not only plot_*.py
    "ignore_pattern": r"(__init__|conftest)\.py$",
    "image_scrapers": ("matplotlib", "gallery_sources.scrape_figures"),
    "reset_argv": "gallery_sources.script_arguments",
    "write_computation_times": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "show_memory": False,
    "plot_gallery": "True",
    "within_subsection_order": "FileNameSortKey",
}

html_theme = "pydata_sphinx_theme"
html_title = f"fastnorm {release}"
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version", "theme-version"],
}
# Pages without sub-pages: no (empty) section navigation on the left.
html_sidebars = {page: [] for page in ("index", "tutorial", "notebooks", "benchmarks", "contract", "decisions",
                                       "robustness", "changelog")}
html_static_path: list = []
html_show_sourcelink = False
