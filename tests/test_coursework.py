"""Coursework: exercises that cannot be gamed, notebooks that read well, grading that a class
folder cannot break.

The four-submission test is the definition of "cannot be gamed": for every exercise of every
chapter, the instructor's answer scores, and the untouched stub, constants copied from what the
student version shows, and an object whose comparisons are all true do not.
"""

import ast
import builtins
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import coursework  # noqa: E402
import notebooks  # noqa: E402

CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
TEMPLATE = ROOT / "templates" / "chapter_template.ipynb"
RAW_MARKUP = re.compile(r"\{(exercise|solution-start|solution-end|cite(:\w+)?)\}")


def _cells(path):
    nb = path if isinstance(path, dict) else json.loads(Path(path).read_text())
    return nb["cells"]


def _graded(path):
    return [c for c in _cells(path) if "nbgrader" in c["metadata"]]


@pytest.mark.parametrize("path", CHAPTERS + [TEMPLATE], ids=lambda p: p.stem)
def test_exercises_carry_consistent_metadata_and_hidden_tests(path):
    cells = _graded(path)
    solutions = [c for c in cells if c["metadata"]["nbgrader"]["solution"]]
    checks = [c for c in cells if c["metadata"]["nbgrader"]["grade"]]
    assert len(solutions) == len(checks) >= (1 if path == TEMPLATE else 3)
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
        check = "".join(chk["source"])
        assert notebooks.HIDDEN_BEGIN in check and notebooks.HIDDEN_END in check, \
            f"{label}: the reference must sit in hidden tests"
        assert chk["metadata"].get("depthlab", {}).get("answers"), f"{label}: name its answers"
        text = "".join(s for c in _cells(path) for s in c["source"])
        assert f":label: {label}" in text, f"{label} has no exercise text"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_has_a_predict_and_an_implement_exercise(path):
    ids = [e.id for e in coursework.exercises(path)]
    assert any("predict" in i for i in ids) and any("implement" in i for i in ids), ids


def _names(source, ctx):
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ctx):
            found.add(node.id)
        if ctx is ast.Store:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found.add(node.name)
            elif isinstance(node, ast.arg):
                found.add(node.arg)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                found |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.ExceptHandler) and node.name:
                found.add(node.name)
    return found


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_exercises_use_only_the_setup_names(path):
    """Grading runs each answer after the chapter's exercise-setup cells only: an exercise may
    use the setup's names and its own, nothing the experiments or another exercise define."""
    setup = set()
    for src in coursework.setup_code(path):
        setup |= _names(src.replace("%pip", "#"), ast.Store)
    allowed = setup | set(dir(builtins)) | {"display", "get_ipython"}
    for e in coursework.exercises(path):
        own = _names(e.solution, ast.Store) | _names(e.check, ast.Store)
        used = _names(e.solution, ast.Load) | _names(e.check, ast.Load)
        assert used <= allowed | own, f"{e.id} uses {sorted(used - allowed - own)}"


def test_chapter_selection():
    assert [p.stem for p in coursework.find_chapters(["3"])] == ["03_batch_vs_layer_norm"]
    assert coursework.find_chapters(["all"]) == CHAPTERS
    with pytest.raises(SystemExit, match="no chapter"):
        coursework.find_chapters(["99"])


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_student_version_hides_solutions_and_references_and_reads_plainly(path):
    student = notebooks.student_version(path)
    source = {c["metadata"]["nbgrader"]["grade_id"]: "".join(c["source"])
              for c in _graded(path)}
    for c in student["cells"]:
        text = "".join(c["source"])
        meta = c["metadata"].get("nbgrader")
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None
        else:
            assert not RAW_MARKUP.search(text), text[:200]
        if meta and meta["solution"]:
            assert "BEGIN SOLUTION" not in text and "NotImplementedError" in text
        if meta and meta["grade"]:
            assert "HIDDEN TESTS" not in text
            assert text == notebooks.without_hidden_tests(source[meta["grade_id"]])
    first = next(c for c in student["cells"] if c["cell_type"] == "code")
    assert "colab-setup" in first["metadata"]["tags"]              # still opens in Colab
    titles = [t for t in ("".join(c["source"]) for c in student["cells"])
              if t.startswith(f"### Exercise {notebooks.chapter_number(path)}.")]
    assert len(titles) == len(coursework.exercises(path))           # numbered per chapter


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_the_colab_notebook_is_current_and_has_no_raw_markup(path):
    """The file the Colab button opens (colab/NN_name.ipynb) is generated from the chapter:
    regenerate it with `python3 tasks.py colab` after editing a chapter."""
    committed = ROOT / "colab" / path.name
    assert committed.exists(), "run python3 tasks.py colab"
    assert committed.read_text() == notebooks.dump(notebooks.colab_version(path)), \
        f"{committed.name} is stale: run python3 tasks.py colab"
    nb = json.loads(committed.read_text())
    for c in nb["cells"]:
        text = "".join(c["source"])
        if c["cell_type"] == "markdown":
            assert not RAW_MARKUP.search(text), text[:200]
        if c["metadata"].get("nbgrader", {}).get("solution"):
            assert text.startswith("#@title") and c["metadata"]["cellView"] == "form"
            assert c["metadata"]["jupyter"]["source_hidden"]
            assert "BEGIN SOLUTION" not in text
    assert "Xiong et al. (2020)" in json.dumps(nb) or "xiong" not in path.read_text()


def test_citations_read_as_author_and_year():
    bib = notebooks.bibliography()
    assert bib["xiong2020layer"] == ("Xiong et al.", "2020")
    assert bib["ioffe2015batch"] == ("Ioffe & Szegedy", "2015")
    text = notebooks._plain_markdown("{cite:t}`xiong2020layer` and {cite}`ioffe2015batch`", {},
                                     bib)
    assert text.strip() == "Xiong et al. (2020) and (Ioffe & Szegedy 2015)"


def _four_submissions(path):
    trials, kinds = [], []
    for e in coursework.exercises(path):
        constants = coursework.visible_constants(path, e.id)
        trials += [{"exercise": e.id, "answer": e.solution},
                   {"exercise": e.id, "answer": notebooks.STUB},
                   {"exercise": e.id, "always_true": True},
                   {"exercise": e.id, "constants": constants}]
        kinds += [(e.id, "instructor"), (e.id, "untouched"), (e.id, "always true")]
        kinds += [(e.id, f"constant {c!r}") for c in constants]
    return kinds, coursework.run_trials(path, trials)


@pytest.fixture(scope="module")
def four_submissions():
    """Every chapter's trials, two chapters at a time (one process each, one torch thread)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CHAPTERS, pool.map(_four_submissions, CHAPTERS)))


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_four_submissions_per_exercise(path, four_submissions):
    """The instructor's answer scores; the untouched stub, copied constants and an always-true
    object score nothing, for every exercise."""
    kinds, results = four_submissions[path]
    assert len(results) == len(kinds)
    for (ex, kind), r in zip(kinds, results):
        if kind == "instructor":
            assert r["passed"], f"{ex}: the instructor's answer fails: {r['error']}"
        else:
            assert not r["passed"], f"{ex}: {kind} scores"


# --------------------------------------------------------------------------------------------
# A class folder
# --------------------------------------------------------------------------------------------

CHAPTER = next(p for p in CHAPTERS if p.stem.startswith("05_"))   # fast exercises


def _with_answer(nb, exercise, code):
    nb = json.loads(json.dumps(nb))
    for c in nb["cells"]:
        if c["metadata"].get("nbgrader", {}).get("grade_id") == f"{exercise}-solution":
            c["source"] = code
    return nb


def test_grading_a_class_folder_with_every_fault(tmp_path):
    exercises = coursework.exercises(CHAPTER)
    points = {e.id: e.points for e in exercises}
    handout = notebooks.student_version(CHAPTER)
    instructor = json.loads(CHAPTER.read_text())
    first, second = exercises[0].id, exercises[1].id
    # an honest student who deleted the check cells and, copying, lost the answers' metadata
    honest = json.loads(json.dumps(instructor))
    honest["cells"] = [c for c in honest["cells"]
                       if not c["metadata"].get("nbgrader", {}).get("grade")]
    for c in honest["cells"]:
        c["metadata"].pop("nbgrader", None)
    # a wrong answer to the first exercise, with its check weakened to pass anything
    tamper = _with_answer(instructor, first, "my_lr = beta_for = None\n")
    for c in tamper["cells"]:
        if c["metadata"].get("nbgrader", {}).get("grade_id") == f"{first}-check":
            c["source"] = "pass\n"
    files = {
        "instructor": (CHAPTER.name, json.dumps(instructor)),
        "untouched": (CHAPTER.name, json.dumps(handout)),
        "crash": (CHAPTER.name, json.dumps(_with_answer(instructor, second,
                                                        "raise RuntimeError('oops')\n"))),
        "renamed": (f"{CHAPTER.stem} (1).ipynb", json.dumps(instructor)),
        "honest": (CHAPTER.name, json.dumps(honest)),
        "tamper": (CHAPTER.name, json.dumps(tamper)),
        "broken": (CHAPTER.name, '{"cells": [ this is not JSON'),
    }
    for student, (name, text) in files.items():
        (tmp_path / student).mkdir()
        (tmp_path / student / name).write_text(text)
    report = coursework.grade(tmp_path, keep=tmp_path / "feedback", log=lambda *a: None)
    got = {(s.student, s.exercise): s.score for s in report.scores}
    assert len(report.scores) == len(files) * len(exercises)
    for ex, p in points.items():
        assert got[("instructor", ex)] == p
        assert got[("renamed", ex)] == p
        assert got[("honest", ex)] == p
        assert got[("untouched", ex)] == 0
        assert got[("broken", ex)] == 0
        assert got[("crash", ex)] == (0 if ex == second else p)
        assert got[("tamper", ex)] == (0 if ex == first else p)
    problems = "\n".join(report.problems)
    assert "broken:" in problems and "unreadable" in problems
    assert f"graded {CHAPTER.stem} (1).ipynb as {CHAPTER.name}" in problems
    assert f"tamper: {CHAPTER.stem}: the check cell of {first} was changed" in problems
    assert "honest:" in problems and "lost its grading metadata" in problems
    table = tmp_path / "grades.csv"
    written = coursework.write_table(report, table)
    assert table.read_text().splitlines()[0] == "student,chapter,exercise,score,max_score,note"
    assert "unreadable" in written.read_text()
    text = coursework.summary(report)
    assert "instructor" in text and "per notebook" in text and "class of 30" in text
    assert (tmp_path / "feedback" / "crash" / f"{CHAPTER.stem}.md").read_text().count("failed")
