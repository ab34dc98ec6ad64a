"""Coursework: student versions of chapters and automatic grading, on top of nbgrader.

Every chapter's exercises carry nbgrader metadata: the solution cell (tag ``solution``, code
between ``### BEGIN SOLUTION`` and ``### END SOLUTION``) and the check cell (tag ``check``,
locked, with ``points``). This module drives nbgrader in a throw-away course directory, so
teachers never have to set one up:

    python3 tasks.py assign 03 05 --to handout/     student versions of chapters 3 and 5
    python3 tasks.py grade submissions/ --to grades.csv

``submissions/`` holds one folder per student with their notebooks, named as handed out
(``submissions/alice/03_batch_vs_layer_norm.ipynb``). Grading re-runs each notebook with its
check cells restored from the chapter (a student cannot weaken a check), and writes one row
per student, chapter and exercise. The instructor guide in the book describes the workflow.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
CELL_TIMEOUT = 600        # seconds per cell while grading (the longest chapter cell is ~50 s)


def find_chapters(selectors: list[str]) -> list[Path]:
    """Chapter notebooks named by number ("03"), stem ("03_batch_vs_layer_norm") or "all"."""
    every = sorted(CHAPTERS.glob("[0-9][0-9]_*.ipynb"))
    if not selectors or selectors == ["all"]:
        return every
    chosen = []
    for sel in selectors:
        hits = [p for p in every if p.stem == sel or p.stem.split("_")[0] == sel.zfill(2)]
        if not hits:
            raise SystemExit(f"no chapter matches {sel!r}; chapters: "
                             f"{', '.join(p.stem for p in every)}")
        chosen += hits
    return chosen


def exercises(notebook: Path) -> dict[str, float]:
    """Points per graded check cell of a chapter: {grade_id: points}."""
    nb = json.loads(notebook.read_text())
    return {c["metadata"]["nbgrader"]["grade_id"]: float(c["metadata"]["nbgrader"]["points"])
            for c in nb["cells"] if c["metadata"].get("nbgrader", {}).get("grade")}


def _nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEPTHLAB_STATIC="1", DEPTHLAB_QUIET="1", MPLBACKEND="Agg")
    # nbgrader runs the ``alembic`` program that sits beside this Python: put it on PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "nbgrader", *args, f"--CourseDirectory.root={course}",
           f"--ExecutePreprocessor.timeout={CELL_TIMEOUT}", "--log-level=WARN"]
    proc = subprocess.run(cmd, cwd=course, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nbgrader {args[0]} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _course_with_sources(course: Path, chapters: list[Path]) -> None:
    """One nbgrader assignment per chapter, named after it, generated into ``course``."""
    (course / "nbgrader_config.py").write_text("c = get_config()\n")
    for nb in chapters:
        source = course / "source" / nb.stem
        source.mkdir(parents=True, exist_ok=True)
        shutil.copy(nb, source / nb.name)
        _nbgrader(course, "generate_assignment", nb.stem, "--force")


def make_student_versions(selectors: list[str], out: Path) -> list[Path]:
    """Write the student version of each chosen chapter to ``out``: solutions replaced by a
    stub, check cells kept and locked, outputs cleared. Returns the written paths."""
    chapters = find_chapters(selectors)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        course = Path(tmp)
        _course_with_sources(course, chapters)
        for nb in chapters:
            target = out / nb.name
            shutil.copy(course / "release" / nb.stem / nb.name, target)
            written.append(target)
    return written


@dataclass(frozen=True)
class Score:
    student: str
    chapter: str
    exercise: str
    score: float
    max_score: float


def grade(submissions: Path, keep: Path | None = None) -> list[Score]:
    """Autograde every ``submissions/<student>/<chapter>.ipynb``; one Score per exercise.

    A notebook that raises, or a solution left as the stub, scores 0 on the exercises whose
    checks fail; it never stops the grading of the others. ``keep`` receives the executed
    notebooks (``keep/<student>/<chapter>.ipynb``, with outputs) as feedback for students.
    """
    from nbgrader.api import Gradebook

    students = sorted(p for p in submissions.iterdir() if p.is_dir())
    handed_in = {nb.name for s in students for nb in s.glob("*.ipynb")}
    chapters = [p for p in find_chapters([]) if p.name in handed_in]
    if not chapters:
        raise SystemExit(f"no chapter notebooks found in {submissions}/<student>/")
    scores: list[Score] = []
    with tempfile.TemporaryDirectory() as tmp:
        course = Path(tmp)
        _course_with_sources(course, chapters)
        for student in students:
            for nb in student.glob("*.ipynb"):
                target = course / "submitted" / student.name / nb.stem / nb.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(nb, target)
        for chapter in chapters:
            _nbgrader(course, "autograde", chapter.stem, "--create", "--force")
        if keep is not None:
            for done in (course / "autograded").glob("*/*/*.ipynb"):
                target = keep / done.parent.parent.name / done.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(done, target)
        with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
            for student in students:
                for chapter in chapters:
                    points = exercises(chapter)
                    try:
                        sub = gb.find_submission_notebook(chapter.stem, chapter.stem,
                                                          student.name)
                        got = {g.name: float(g.score) for g in sub.grades}
                    except Exception:         # not handed in: every exercise scores 0
                        if not (student / chapter.name).exists():
                            got = {}
                        else:
                            raise
                    for grade_id, max_score in points.items():
                        scores.append(Score(student.name, chapter.stem,
                                            grade_id.removesuffix("-check"),
                                            got.get(grade_id, 0.0), max_score))
    return scores


def write_table(scores: list[Score], path: Path) -> None:
    """The scores as CSV: student, chapter, exercise, score, max_score."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "chapter", "exercise", "score", "max_score"])
        for s in scores:
            w.writerow([s.student, s.chapter, s.exercise, s.score, s.max_score])


def summary(scores: list[Score]) -> str:
    """Total per student and chapter, as printed by ``tasks.py grade``."""
    totals: dict[tuple[str, str], list[float]] = {}
    for s in scores:
        t = totals.setdefault((s.student, s.chapter), [0.0, 0.0])
        t[0] += s.score
        t[1] += s.max_score
    return "\n".join(f"{student:20s} {chapter:32s} {got:g} / {best:g}"
                     for (student, chapter), (got, best) in sorted(totals.items()))


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python3 tasks.py",
                                     description="Student versions and grading (nbgrader).")
    sub = parser.add_subparsers(dest="command", required=True)
    assign = sub.add_parser("assign", help="write student versions of chapters")
    assign.add_argument("chapters", nargs="*", default=["all"],
                        help='chapter numbers or names, e.g. 03 05 (default: all)')
    assign.add_argument("--to", type=Path, required=True, help="folder for the handout")
    grader = sub.add_parser("grade", help="grade submissions/<student>/<chapter>.ipynb")
    grader.add_argument("submissions", type=Path)
    grader.add_argument("--to", type=Path, required=True, help="CSV file for the scores")
    grader.add_argument("--keep", type=Path, default=None,
                        help="folder for the executed notebooks (feedback for students)")
    args = parser.parse_args(argv)
    if args.command == "assign":
        for path in make_student_versions(args.chapters, args.to):
            print(f"wrote {path}")
    else:
        scores = grade(args.submissions, args.keep)
        write_table(scores, args.to)
        print(summary(scores))
        print(f"wrote {args.to}")


if __name__ == "__main__":
    main(sys.argv[1:])
