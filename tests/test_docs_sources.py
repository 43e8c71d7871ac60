"""The sources the docs build makes for itself (docs/_ext/gallery_sources.py): every example
script gets a page title, every teaching demo gets a gallery script that calls its figures
function with the right arguments, and the API page lists every public name."""

import os
import sys

import pytest

import fastnorm
from fastnorm.demos import DEMOS

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
if not os.path.isdir(os.path.join(DOCS, "_ext")):
    pytest.skip("no docs/ beside the tests", allow_module_level=True)
sys.path.insert(0, os.path.join(DOCS, "_ext"))
import gallery_sources as gs  # noqa: E402


def test_with_title_underlines_the_first_docstring_line():
    plain = '"""Train a model.\n\nMore text.\n"""\nimport os\n'
    assert gs.with_title(plain, "x") == '"""Train a model.\n' + '=' * 14 + '\n\nMore text.\n"""\nimport os\n'
    titled = '"""\nTitle\n=====\n\nbody\n"""\n'
    assert gs.with_title(titled, "x") == titled
    assert gs.with_title("# comment\n'''Doc line\n'''\n", "x") == "# comment\n'''Doc line\n========\n'''\n"
    assert gs.with_title("import os\n", "my_script") == '"""\nmy_script\n=========\n"""\nimport os\n'


def test_copy_examples_titles_every_script(tmp_path):
    src, out = tmp_path / "examples", tmp_path / "out"
    src.mkdir()
    (src / "a.py").write_text('"""Alpha example.\n"""\nprint(1)\n')
    (src / "b.py").write_text("print(2)\n")
    gs.copy_examples(str(src), str(out))
    assert sorted(os.listdir(out)) == ["GALLERY_HEADER.rst", "a.py", "b.py"]
    assert (out / "a.py").read_text().startswith('"""Alpha example.\n==============\n')
    (src / "b.py").unlink()                            # a script removed from examples/ leaves the copy
    gs.copy_examples(str(src), str(out))
    assert sorted(os.listdir(out)) == ["GALLERY_HEADER.rst", "a.py"]


def test_one_gallery_script_per_demo_that_runs(tmp_path):
    gs.write_demo_scripts(str(tmp_path))
    scripts = sorted(p for p in os.listdir(tmp_path) if p.endswith(".py"))
    assert [s.split("_", 2)[2][:-3] for s in scripts] == list(DEMOS)
    padding = (tmp_path / scripts[list(DEMOS).index("padding")]).read_text()
    assert 'demo_figures = figures(result["small"], result["large"])' in padding
    ztable = (tmp_path / scripts[list(DEMOS).index("ztable")]).read_text()
    assert "demo_figures = figures(result)" in ztable
    pytest.importorskip("matplotlib")
    namespace: dict = {}
    exec(compile(ztable, "ztable", "exec"), namespace)          # the script as the gallery runs it
    from matplotlib.figure import Figure
    assert namespace["demo_figures"] and all(isinstance(f, Figure) for f in namespace["demo_figures"].values())


def test_api_page_lists_every_public_name(tmp_path):
    gs.check_api_page(os.path.join(DOCS, "api.rst"), fastnorm.__all__)
    page = tmp_path / "api.rst"
    page.write_text("   layer_norm\n")
    with pytest.raises(RuntimeError, match="does not list rms_norm"):
        gs.check_api_page(str(page), ["layer_norm", "rms_norm"])
