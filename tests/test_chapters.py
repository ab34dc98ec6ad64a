"""Every chapter runs from top to bottom without an error, as nbval runs it.

The ``executed`` fixture runs each chapter once for the whole test session with nbval
(``pytest --nbval-lax``, one pytest process per chapter, two at a time: tools/execute.py); the
plugin tools/nbval_capture.py keeps each run's outputs, and the website is built from them. A
test here fails with nbval's report of the failing cell, and also when any cell of the executed
notebook holds an error output or never ran. The fast tests run the same path on tiny
notebooks."""

from pathlib import Path

import execute
import pytest

CHAPTERS = [p.stem for p in execute.chapters()]


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_runs_without_errors(executed, chapter):
    result = executed[chapter]
    assert result.error is None, result.error[-4000:]
    assert execute.cell_errors(Path(result.executed)) == []


def test_cell_errors_sees_an_error_and_a_cell_that_never_ran(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    ran = nbformat.v4.new_code_cell("1 / 0", execution_count=1)
    ran.outputs = [nbformat.v4.new_output("error", ename="ZeroDivisionError",
                                          evalue="division by zero", traceback=[])]
    nb.cells = [ran, nbformat.v4.new_code_cell("x = 1")]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    assert execute.cell_errors(path) == ["cell 0: ZeroDivisionError: division by zero",
                                         "cell 1 never ran"]


def _tiny(path: Path, *sources: str) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# A tiny notebook")]
    nb.cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nb.cells[1].metadata["tags"] = ["a-tag"]          # cell metadata must come back unchanged
    nbformat.write(nb, path)
    return path


def test_nbval_run_keeps_outputs_counts_and_the_failing_cell(tmp_path):
    """nbval runs a notebook; the captured notebook has every output and count in place, the
    error output of the failing cell, and the cell after it never ran (-x); the error is
    nbval's report and cell_errors sees it."""
    import nbformat

    path = _tiny(tmp_path / "tiny.ipynb",
                 'print("hello")\nprint("world")',
                 'from IPython.display import HTML, display\n'
                 'display(HTML("<b>rich</b>"))\n"last value"',
                 'raise ValueError("the tiny notebook fails here")',
                 'print("never")')
    text, seconds, error = execute._execute_one(str(path), execute.kernel_env(None))
    nb = nbformat.reads(text, as_version=4)
    nbformat.validate(nb)
    source = nbformat.read(path, as_version=4)
    assert [c.metadata for c in nb.cells] == [c.metadata for c in source.cells]  # no timings
    code = nb.cells[1:]
    assert [c.execution_count for c in code] == [1, 2, 3, None]
    assert [(o.output_type, o.get("name")) for o in code[0].outputs] == [("stream", "stdout")]
    assert code[0].outputs[0].text == "hello\nworld\n"
    shown, result = code[1].outputs
    assert shown.output_type == "display_data" and shown.data["text/html"] == "<b>rich</b>"
    assert result.output_type == "execute_result" and result.execution_count == 2
    assert result.data["text/plain"] == "'last value'"
    (err,) = code[2].outputs
    assert (err.output_type, err.ename, err.evalue) == ("error", "ValueError",
                                                        "the tiny notebook fails here")
    assert err.traceback and code[3].outputs == []
    assert nb.metadata.language_info["pygments_lexer"] == "ipython3"   # as nbclient puts it
    assert error is not None and "Cell 2: Cell execution caused an exception" in error
    assert "ValueError: the tiny notebook fails here" in error and "\x1b[" not in error
    assert 0 < seconds < 120
    executed = tmp_path / "executed.ipynb"
    executed.write_text(text)
    assert execute.cell_errors(executed) == [
        "cell 3: ValueError: the tiny notebook fails here", "cell 4 never ran"]


def test_nbval_run_of_a_passing_notebook_is_found_in_the_cache(tmp_path):
    """What the build looks up: the executed notebook, stored as execute() stores it, is found
    again by the source notebook's hash, with its outputs."""
    import nbformat
    from jupyter_cache import get_cache

    path = _tiny(tmp_path / "passes.ipynb", 'print("hello")',
                 'from IPython.display import Markdown\nMarkdown("**rich**")')
    text, seconds, error = execute._execute_one(str(path), execute.kernel_env(None))
    assert error is None
    cache = get_cache(str(tmp_path / "cache"))
    execute._store(cache, path, nbformat.reads(text, as_version=4), seconds)
    source = nbformat.read(path, as_version=4)
    found = cache.match_cache_notebook(source)
    assert found.data["execution_seconds"] == seconds
    _, merged = cache.merge_match_into_notebook(source)
    assert [c.execution_count for c in merged.cells[1:]] == [1, 2]
    assert merged.cells[1].outputs[0].text == "hello\n"
    assert merged.cells[2].outputs[0].data["text/markdown"] == "**rich**"


def test_nbval_run_reports_a_kernel_that_dies(tmp_path):
    """A dead kernel fails its cell at once (not after the cell timeout); the cells after it
    never ran."""
    path = _tiny(tmp_path / "dies.ipynb", 'print("hello")', "import os\nos._exit(1)",
                 'print("never")')
    text, seconds, error = execute._execute_one(str(path), execute.kernel_env(None))
    assert error is not None and "Kernel died" in error
    assert seconds < 60                                    # the cell timeout is 600 s
    executed = tmp_path / "executed.ipynb"
    executed.write_text(text)
    assert execute.cell_errors(executed) == [
        "cell 2: DeadKernelError: Kernel died while executing the cell", "cell 3 never ran"]


def test_every_chapter_states_its_running_time(tmp_path):
    """execute() starts the chapters by the time their opening line states, longest first: two
    at a time in file order, the last long chapter ran alone at the end of the build."""
    import nbformat

    stated = {p.stem: execute.stated_seconds(p) for p in execute.chapters()}
    assert all(s > 0 for s in stated.values()), stated
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 9. A chapter\n\n⏱ about 12.5 s on a 2-core CPU")]
    nbformat.write(nb, tmp_path / "09_x.ipynb")
    assert execute.stated_seconds(tmp_path / "09_x.ipynb") == 12.5
    nb.cells = [nbformat.v4.new_markdown_cell("# 9. A chapter")]
    nbformat.write(nb, tmp_path / "09_x.ipynb")
    assert execute.stated_seconds(tmp_path / "09_x.ipynb") == 0.0
