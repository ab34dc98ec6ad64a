"""Static checks of the book's files: setup cells, repository URL, outputs, toc, citations."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
URL = CONFIG["repository"]["url"]


def _nb(path: Path) -> dict:
    return json.loads(path.read_text())


def _code_cells(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _setup_cell() -> str:
    return _code_cells(_nb(ROOT / "templates" / "chapter_template.ipynb"))[0]


def test_there_are_chapters():
    assert CHAPTERS, "no chapter notebooks found"


def test_setup_cell_installs_from_the_configured_repository_only_in_colab():
    cell = _setup_cell()
    assert f"git+{URL}" in cell
    assert 'if "google.colab" in sys.modules:' in cell
    assert "torch" not in cell.split("if ")[1].split("\n", 1)[1]  # never pins or installs torch


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_every_chapter_opens_with_the_shared_setup_cell(path):
    assert _code_cells(_nb(path))[0] == _setup_cell()


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapters_are_committed_without_outputs(path):
    for cell in _nb(path)["cells"]:
        if cell["cell_type"] == "code":
            assert not cell["outputs"] and cell["execution_count"] is None


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_exercises_have_solution_and_check_cells(path):
    cells = _nb(path)["cells"]
    solutions = [i for i, c in enumerate(cells) if c["cell_type"] == "code"
                 and "### BEGIN SOLUTION" in "".join(c["source"])]
    assert len(solutions) >= 3, "a chapter has at least 3 exercises"
    for i in solutions:
        src = "".join(cells[i]["source"])
        assert "### END SOLUTION" in src
        assert "solution" in cells[i]["metadata"].get("tags", [])
        checks = [c for c in cells[i + 1:] if c["cell_type"] == "code"]
        assert checks and "assert" in "".join(checks[0]["source"])
        assert "check" in checks[0]["metadata"].get("tags", [])


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_exercise_titles_are_plain_text(path):
    """sphinx-exercise 1.x cannot give a solution the title of an exercise whose title holds
    inline code or math: the build then warns "undefined label" (and fails under -W)."""
    for c in _nb(path)["cells"]:
        text = "".join(c["source"])
        if c["cell_type"] == "markdown" and text.startswith("````{exercise}"):
            title = text.splitlines()[0].split("}", 1)[1]
            assert not set("`$") & set(title), title


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapters_define_no_models_or_training_loops(path):
    # A student's solution may write a backward pass (chapter 0 asks for one); the chapter's
    # own code may not.
    text = "\n".join("".join(c["source"]) for c in _nb(path)["cells"]
                     if c["cell_type"] == "code"
                     and not c["metadata"].get("nbgrader", {}).get("solution"))
    assert not re.search(r"^\s*class \w+\((nn\.)?Module\)", text, re.M)
    assert "optimizer.step()" not in text and ".backward()" not in text


def test_every_chapter_is_in_the_toc():
    toc = (ROOT / "_toc.yml").read_text()
    for path in CHAPTERS:
        assert f"chapters/{path.stem}" in toc


def test_citations_exist_in_the_bibliography():
    keys = set(re.findall(r"@\w+\{([^,]+),", (ROOT / "references.bib").read_text()))
    pages = CHAPTERS + sorted(ROOT.glob("*.md"))
    for page in pages:
        text = page.read_text()
        for cited in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text.replace("\\n", "\n")):
            for key in cited.split(","):
                assert key.strip() in keys, f"{page.name} cites unknown key {key}"


def test_readme_agrees_with_the_config_and_names_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert URL in readme
    assert "python3 tasks.py book" in readme and "python3 tasks.py test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 tasks.py test" in ci


def test_library_dependencies_stay_loose():
    """Installing depthlab in Colab must never replace Colab's torch."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = pyproject.split("dependencies = [")[1].split("]")[0]
    assert '"torch>=' in deps and "==" not in deps
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text()


def test_a_library_change_marks_every_notebook_outdated(tmp_path, monkeypatch):
    """Jupyter-cache hashes code cells only and Sphinx re-reads only changed files: after a
    library change the extension must clear the cache *and* make Sphinx re-read every
    notebook, or pages (and the claims ledger) keep numbers from the old library."""
    import types

    for name in ("DEPTHLAB_LEDGER", "DEPTHLAB_STATIC", "DEPTHLAB_QUIET", "MPLBACKEND"):
        monkeypatch.delenv(name, raising=False)     # the extension sets them: undo afterwards
    sys.path.insert(0, str(ROOT / "_ext"))
    try:
        import depthlab_book as ext
    finally:
        sys.path.pop(0)
    src = tmp_path / "book"
    (src / "lib" / "depthlab").mkdir(parents=True)
    (src / "lib" / "depthlab" / "x.py").write_text("a = 1\n")
    (tmp_path / "out" / "html").mkdir(parents=True)

    def build():
        app = types.SimpleNamespace(srcdir=str(src), outdir=str(tmp_path / "out" / "html"))
        config = types.SimpleNamespace(nb_execution_cache_path=str(tmp_path / "out" / "cache"))
        ext.on_config_inited(app, config)
        env = types.SimpleNamespace(found_docs={"intro", "chapters/01_a", ext.LEDGER_DOCNAME},
                                    doc2path=lambda d: f"{d}.ipynb" if "chapters" in d
                                    else f"{d}.md")
        return set(ext.on_env_get_outdated(app, env, set(), set(), set()))

    assert build() == {ext.LEDGER_DOCNAME, "chapters/01_a"}      # first build: no stamp yet
    assert build() == {ext.LEDGER_DOCNAME}                       # nothing changed
    (src / "lib" / "depthlab" / "x.py").write_text("a = 2\n")
    assert build() == {ext.LEDGER_DOCNAME, "chapters/01_a"}      # library changed
