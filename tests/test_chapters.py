"""Every chapter runs from top to bottom without an error: the check ``nbval --nbval-lax``
makes, done on the notebooks executed once for the whole test session (tools/execute.py)."""

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
