"""Coursework: every exercise is gradable by nbgrader, and the two teacher commands work.

The end-to-end test grades four submissions of chapter 0 (the quickest chapter): the
instructor version, the untouched student version, one wrong answer and one crash.
"""

import ast
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import coursework  # noqa: E402

CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _graded(path):
    return [c for c in _cells(path) if "nbgrader" in c["metadata"]]


@pytest.mark.parametrize("path", CHAPTERS + [ROOT / "templates" / "chapter_template.ipynb"],
                         ids=lambda p: p.stem)
def test_exercises_carry_consistent_nbgrader_metadata(path):
    cells = _graded(path)
    solutions = [c for c in cells if c["metadata"]["nbgrader"]["solution"]]
    checks = [c for c in cells if c["metadata"]["nbgrader"]["grade"]]
    assert len(solutions) == len(checks) >= (1 if "template" in path.name else 3)
    ids = [c["metadata"]["nbgrader"]["grade_id"] for c in cells]
    assert len(ids) == len(set(ids)), "grade ids must be unique"
    for sol, chk in zip(solutions, checks):
        label = sol["metadata"]["nbgrader"]["grade_id"].removesuffix("-solution")
        assert chk["metadata"]["nbgrader"]["grade_id"] == f"{label}-check"
        assert "solution" in sol["metadata"]["tags"] and "check" in chk["metadata"]["tags"]
        src = "".join(sol["source"])
        assert src.startswith("### BEGIN SOLUTION") and src.rstrip().endswith("### END SOLUTION")
        meta = chk["metadata"]["nbgrader"]
        assert meta["locked"] and meta["points"] > 0 and not meta["solution"]
        assert "assert" in "".join(chk["source"])
        text = "".join(c2 for c in _cells(path) for c2 in c["source"])
        assert f":label: {label}" in text, f"{label} has no exercise text"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_exercises_are_independent(path):
    """A wrong answer must cost exactly its own exercise: no exercise may use a name that
    another exercise's solution defines."""
    defined = {}
    for c in _graded(path):
        meta = c["metadata"]["nbgrader"]
        if meta["solution"]:
            for node in ast.walk(ast.parse("".join(c["source"]))):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    defined[node.id] = meta["grade_id"].removesuffix("-solution")
    for c in _graded(path):
        exercise = c["metadata"]["nbgrader"]["grade_id"].rsplit("-", 1)[0]
        for node in ast.walk(ast.parse("".join(c["source"]))):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                owner = defined.get(node.id, exercise)
                assert owner == exercise, f"{exercise} uses {node.id} from {owner}"


def test_chapter_selection():
    assert [p.stem for p in coursework.find_chapters(["3"])] == ["03_batch_vs_layer_norm"]
    assert coursework.find_chapters(["all"]) == CHAPTERS
    with pytest.raises(SystemExit, match="no chapter"):
        coursework.find_chapters(["99"])


@pytest.fixture(scope="module")
def handout(tmp_path_factory):
    out = tmp_path_factory.mktemp("handout")
    return coursework.make_student_versions(["00"], out)[0]


def test_student_version_hides_solutions_keeps_checks_and_clears_outputs(handout):
    source = {c["metadata"]["nbgrader"]["grade_id"]: c for c in _graded(CHAPTERS[0])}
    cells = _cells(handout)
    for c in cells:
        meta = c["metadata"].get("nbgrader")
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None
        if meta and meta["solution"]:
            assert "BEGIN SOLUTION" not in "".join(c["source"])
            assert "NotImplementedError" in "".join(c["source"])
        if meta and meta["grade"]:
            assert c["source"] == source[meta["grade_id"]]["source"]
    first = next(c for c in cells if c["cell_type"] == "code")
    assert "colab-setup" in first["metadata"]["tags"]              # still opens in Colab


def _edited(notebook, grade_id, code):
    nb = json.loads(Path(notebook).read_text())
    for c in nb["cells"]:
        if c["metadata"].get("nbgrader", {}).get("grade_id") == grade_id:
            c["source"] = code
    return nb


def test_grading_scores_full_zero_one_wrong_answer_and_a_crash(tmp_path, handout):
    chapter = CHAPTERS[0]
    submissions = {
        "instructor": json.loads(chapter.read_text()),
        "untouched": json.loads(handout.read_text()),
        "wrong": _edited(chapter, "ex-00-config-solution",
                         "my_cfg = dl.TransformerConfig()\nmy_error = 'n_heads'\n"),
        "crash": _edited(chapter, "ex-00-profile-solution",
                         "raise RuntimeError('my code crashes')\n"),
    }
    for student, nb in submissions.items():
        (tmp_path / student).mkdir()
        (tmp_path / student / chapter.name).write_text(json.dumps(nb))
    scores = coursework.grade(tmp_path, keep=tmp_path / "autograded")
    got = {(s.student, s.exercise): s.score for s in scores}
    exercises = list(coursework.exercises(chapter))
    assert len(scores) == 4 * len(exercises)
    points = {e.removesuffix("-check"): p for e, p in coursework.exercises(chapter).items()}
    for ex, p in points.items():
        assert got[("instructor", ex)] == p                    # full marks
        assert got[("untouched", ex)] == 0                     # the stub scores nothing
        assert got[("wrong", ex)] == (0 if ex == "ex-00-config" else p)
        assert got[("crash", ex)] == (0 if ex == "ex-00-profile" else p)
    # the untouched version runs: only the exercise cells fail, the chapter itself does not
    ran = json.loads((tmp_path / "autograded" / "untouched" / chapter.name).read_text())
    failed = [c for c in ran["cells"] if c["cell_type"] == "code"
              and any(o["output_type"] == "error" for o in c["outputs"])]
    assert failed and all("nbgrader" in c["metadata"] for c in failed)
    table = tmp_path / "grades.csv"
    coursework.write_table(scores, table)
    assert table.read_text().splitlines()[0] == "student,chapter,exercise,score,max_score"
    assert "instructor" in coursework.summary(scores)
