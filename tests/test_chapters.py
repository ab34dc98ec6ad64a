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
