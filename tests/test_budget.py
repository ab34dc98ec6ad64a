"""Every chapter states the running time measured for it (benchmarks/budget.py), for the code
it has now: a stated time is never typed, and a changed chapter must be measured again."""

import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import budget  # noqa: E402
import execute  # noqa: E402

MEASURED = json.loads(budget.RESULTS.read_text()) if budget.RESULTS.exists() else {}
REMEASURE = "measure it again: .venv/bin/python benchmarks/budget.py --write {}"


@pytest.mark.parametrize("path", execute.chapters(), ids=lambda p: p.stem)
def test_a_chapter_states_the_time_measured_for_its_current_code(path):
    entry = MEASURED.get("chapters", {}).get(path.stem)
    number = path.stem[:2]
    assert entry is not None, f"{path.stem} was never measured: " + REMEASURE.format(number)
    assert entry["code_hash"] == budget.code_hash(path), (
        f"{path.stem} changed since it was measured: " + REMEASURE.format(number))
    seconds, steps = budget.stated(path)
    assert steps is not None, f"{path.stem} states no reference steps: " + REMEASURE.format(number)
    assert abs(seconds / entry["seconds"] - 1) <= 0.25, (seconds, entry["seconds"])
    assert abs(steps / entry["reference_steps"] - 1) <= 0.25, (steps, entry["reference_steps"])
    assert not entry["failed"], f"{path.stem} failed when it was measured"


def test_stated_times_are_written_and_read_back(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 9. X\n\n⏱ about 12 s on a 2-core CPU: it "
                                              "trains 3 models"),
                nbformat.v4.new_code_cell("x = 1")]
    path = tmp_path / "09_x.ipynb"
    nbformat.write(nb, path)
    before = budget.code_hash(path)
    assert budget.stated(path) == (12.0, None)
    budget.write_stated(path, {"seconds": 73.4, "reference_steps": 6123})
    assert budget.stated(path) == (75.0, 6123)
    assert "it trains 3 models" in path.read_text()          # the rest of the line stays
    assert budget.code_hash(path) == before                  # only the text changed
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].source = "x = 2"
    nbformat.write(nb, path)
    assert budget.code_hash(path) != before
    assert execute.stated_seconds(path) == 75.0              # the build's longest-first order
