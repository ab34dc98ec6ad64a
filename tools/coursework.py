"""Coursework: student versions of chapters, and grading that a class folder cannot break.

    python3 tasks.py assign 03 05 --to handout/     student versions of chapters 3 and 5
    python3 tasks.py grade submissions/ --to grades.csv [--keep feedback/]

Every exercise of a chapter is three cells: the exercise text, a solution cell (nbgrader
metadata ``solution``, code between ``### BEGIN SOLUTION`` and ``### END SOLUTION``) and a check
cell (nbgrader ``grade`` with ``points``, and ``depthlab.answers``: the names the student must
define). The check's visible part gives sanity feedback (types, lengths); its hidden part,
between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS``, recomputes the reference
itself and is removed from the student version (``notebooks.student_version``).

Grading does not trust the handed-in notebook beyond its answers. For each student and chapter
it takes the student's answer cells (found by their nbgrader id, or, where a copy-paste lost
the metadata, by their place after the exercise's text) and runs them inside the chapter as
released: in a fresh Python process, the chapter's ``exercise-setup`` cells, then each answer
in its own copy of that namespace followed by the chapter's complete check cell. An exercise
scores its points when the check passes. So a deleted or edited check cell changes nothing
(an edited one is reported as tampering), and an exercise's score depends on its own answer
only (``tests/test_coursework.py`` checks that exercises use only the setup's names).

What a class folder can do wrong is reported, never fatal: an unreadable notebook, a file
renamed by a download (``03_batch_vs_layer_norm (1).ipynb`` is matched and reported), two files
for one chapter, an answer cell that cannot be found, a check cell that was changed. They go to
the console and to ``<table>.problems.txt`` beside the grade table.

Grading runs two notebooks at a time, each with one torch thread (on a 2-core machine two
2-thread processes ran 30 times slower than two 1-thread ones), and prints the time per
notebook and the projected time for a class.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import notebooks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
EXERCISE_TIMEOUT = 300    # seconds for one answer and its check (the slowest check takes ~10 s)
# Address space of one grading process. A chapter's setup and checks peak near 1 GiB; an answer
# that allocates without bound (a student's, or numpy turning a self-nesting object into an
# array of 3**32 entries) fails with MemoryError instead of taking the machine with it.
MEMORY_LIMIT = 4 << 30


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


@dataclass(frozen=True)
class Exercise:
    id: str                  # "ex-05-predict"
    points: float
    answers: tuple[str, ...]  # names the answer must define
    solution: str            # the instructor's answer (the code between the markers)
    check: str               # the complete check cell, hidden tests included


def exercises(chapter: Path) -> list[Exercise]:
    """The graded exercises of a chapter, in order."""
    cells = json.loads(chapter.read_text())["cells"]
    solutions = {notebooks.grade_id(c).removesuffix("-solution"): "".join(c["source"])
                 for c in cells if notebooks.is_solution(c)}
    out = []
    for c in cells:
        if notebooks.is_check(c):
            ex = notebooks.grade_id(c).removesuffix("-check")
            meta = c["metadata"]
            out.append(Exercise(ex, float(meta["nbgrader"]["points"]),
                                tuple(meta.get("depthlab", {}).get("answers", [])),
                                notebooks.solution_code(solutions.get(ex, "")),
                                "".join(c["source"])))
    return out


def setup_code(chapter: Path) -> list[str]:
    """The sources of the chapter's ``exercise-setup`` cells: all an exercise may use."""
    return ["".join(c["source"]) for c in json.loads(chapter.read_text())["cells"]
            if "exercise-setup" in c["metadata"].get("tags", [])]


# --------------------------------------------------------------------------------------------
# Running answers against checks, in a separate process
# --------------------------------------------------------------------------------------------


def _worker_env() -> dict[str, str]:
    env = dict(os.environ, DEPTHLAB_STATIC="1", DEPTHLAB_QUIET="1", MPLBACKEND="Agg",
               DEPTHLAB_WORKERS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("DEPTHLAB_LEDGER", None)
    return env


def run_trials(chapter: Path, trials: list[dict], timeout: int = EXERCISE_TIMEOUT) -> list[dict]:
    """Run ``trials`` against the chapter's checks in one fresh Python process.

    A trial is ``{"exercise": id, "answer": code}`` (a student's answer), or
    ``{"exercise": id, "constants": [...]}`` (the answer names set to constants, coerced to the
    type of the instructor's answer, one check per constant) or ``{"exercise": id,
    "always_true": True}`` (every answer an object whose comparisons are all true). Returns
    one ``{"passed", "error", "seconds"}`` per answer run (a constants trial gives one per
    constant), in order.
    """
    job = {"chapter": str(chapter), "setup": setup_code(chapter), "timeout": timeout,
           "exercises": {e.id: {"check": e.check, "solution": e.solution,
                                "answers": list(e.answers)} for e in exercises(chapter)},
           "trials": trials}
    with tempfile.TemporaryDirectory() as tmp:
        jobfile, outfile = Path(tmp) / "job.json", Path(tmp) / "out.json"
        jobfile.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, __file__, "_trials", str(jobfile), str(outfile)],
                              cwd=CHAPTERS, env=_worker_env(), capture_output=True, text=True,
                              timeout=timeout * (len(trials) + 2))
        if not outfile.exists():
            raise RuntimeError(f"grading process failed:\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-4000:]}")
        return json.loads(outfile.read_text())


class AlwaysTrue:
    """An answer that passes every comparison: what a check must not accept."""

    def __eq__(self, other): return True       # noqa: E704
    __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __eq__
    def __bool__(self): return True            # noqa: E704
    def __call__(self, *a, **k): return self   # noqa: E704
    # Items are plain True: items that were AlwaysTrue again would make numpy read the object as
    # an array nested 32 deep (3**32 entries).
    def __getitem__(self, key): return True    # noqa: E704
    def __iter__(self): return iter([True, True, True])  # noqa: E704
    def __len__(self): return 3                # noqa: E704
    def __contains__(self, item): return True  # noqa: E704
    def __hash__(self): return 0               # noqa: E704


def _like(value, constant):
    """``constant`` shaped like the instructor's answer ``value``, or None if it cannot be."""
    if callable(value) and not isinstance(value, type):
        return lambda *a, **k: constant
    if isinstance(value, str):
        return constant if isinstance(constant, str) else None
    if isinstance(constant, str):
        return None
    if isinstance(value, bool):
        return bool(constant)
    if isinstance(value, (int, float)):
        return constant
    try:
        n = len(value)
    except TypeError:
        return constant
    return [constant] * n


def _driver(jobfile: str, outfile: str) -> None:
    """The grading process: see ``run_trials``."""
    job = json.loads(Path(jobfile).read_text())
    import resource

    import torch
    from IPython.core.interactiveshell import InteractiveShell

    torch.set_num_threads(1)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    def alarm(signum, frame):
        raise TimeoutError(f"took longer than {job['timeout']} s")

    signal.signal(signal.SIGALRM, alarm)
    shell = InteractiveShell.instance()
    results: list[dict] = []
    real_stdout = sys.stdout
    sys.stdout = open(os.devnull, "w")                 # student prints are not the report
    try:
        for src in job["setup"]:
            r = shell.run_cell(src, silent=True)
            if not r.success:
                raise RuntimeError(f"the chapter's setup failed: {r.error_in_exec!r}")
        base = dict(shell.user_ns)

        def attempt(code: str | None, check: str, values: dict | None = None) -> dict:
            shell.user_ns.clear()
            shell.user_ns.update(base)
            start = time.perf_counter()
            signal.alarm(job["timeout"])
            try:
                if values is not None:
                    shell.user_ns.update(values)
                    ok, err = True, None
                else:
                    r = shell.run_cell(code, silent=True)
                    ok, err = r.success, r.error_before_exec or r.error_in_exec
                if ok:
                    r = shell.run_cell(check, silent=True)
                    ok, err = r.success, r.error_before_exec or r.error_in_exec
            finally:
                signal.alarm(0)
            return {"passed": bool(ok), "seconds": time.perf_counter() - start,
                    "error": None if ok else f"{type(err).__name__}: {err}"[:300]}

        for trial in job["trials"]:
            ex = job["exercises"].get(trial["exercise"])
            if ex is None:
                results.append({"passed": False, "seconds": 0.0,
                                "error": f"no exercise {trial['exercise']}"})
            elif "answer" in trial:
                results.append(attempt(trial["answer"], ex["check"]))
            elif trial.get("always_true"):
                results.append(attempt(None, ex["check"],
                                       {n: AlwaysTrue() for n in ex["answers"]}))
            else:                                       # constants, typed like the reference
                shell.user_ns.clear()
                shell.user_ns.update(base)
                shell.run_cell(ex["solution"], silent=True)
                reference = {n: shell.user_ns.get(n) for n in ex["answers"]}
                for constant in trial["constants"]:
                    values = {}
                    for n, v in reference.items():       # a string answer gets the next
                        fits = [c for c in [constant] + trial["constants"]   # string, etc.
                                if _like(v, c) is not None]
                        values[n] = _like(v, fits[0]) if fits else _like(v, 0.0)
                    results.append(attempt(None, ex["check"], values) | {"constant": constant})
    except Exception as exc:                          # setup failed: every trial fails
        results += [{"passed": False, "seconds": 0.0, "error": f"{exc}"[:300]}
                    for _ in range(len(job["trials"]) - len(results))]
    finally:
        sys.stdout = real_stdout
    Path(outfile).write_text(json.dumps(results))


def visible_constants(chapter: Path, exercise: str) -> list:
    """Every number and string a student of ``exercise`` can read: in the exercise's text and
    in the visible part of its check (what copying without working would use)."""
    student = notebooks.student_version(chapter)
    text = []
    titles = notebooks.exercise_titles(json.loads(chapter.read_text()),
                                       notebooks.chapter_number(chapter))
    grab = False
    for cell in student["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            grab = titles.get(exercise, "\0") in source
        if grab or notebooks.grade_id(cell) == f"{exercise}-check":
            text.append(source)
    found: list = []
    for chunk in text:
        found += [float(x) for x in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?", chunk)]
        found += re.findall(r'"([^"\n]{1,40})"', chunk)
    unique = []
    for c in found:
        if c not in unique:
            unique.append(c)
    return unique[:8] or [0.0]


# --------------------------------------------------------------------------------------------
# Student versions
# --------------------------------------------------------------------------------------------


def make_student_versions(selectors: list[str], out: Path) -> list[Path]:
    """Write the student version of each chosen chapter to ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for chapter in find_chapters(selectors):
        target = out / chapter.name
        target.write_text(notebooks.dump(notebooks.student_version(chapter)))
        written.append(target)
    return written


# --------------------------------------------------------------------------------------------
# Grading a class folder
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    student: str
    chapter: str
    exercise: str
    score: float
    max_score: float
    note: str = ""


@dataclass
class Report:
    scores: list[Score] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)


def match_files(files: list[Path], chapters: list[Path]) -> tuple[dict[Path, Path], list[str]]:
    """{chapter: the student's file for it} and the problems found. Exact names first; then a
    file whose name starts with the chapter's number and contains its name, as browsers and
    Colab rename downloads ("03_batch_vs_layer_norm (1).ipynb", "Copy of 03_…")."""
    chosen: dict[Path, Path] = {}
    problems = []
    for chapter in chapters:
        exact = [f for f in files if f.name == chapter.name]
        loose = [f for f in files if f not in exact and chapter.stem in f.stem]
        if exact:
            chosen[chapter] = exact[0]
            if loose:
                problems.append(f"also handed in {', '.join(f.name for f in loose)} for "
                                f"{chapter.stem}: graded {exact[0].name}")
        elif loose:
            newest = max(loose, key=lambda f: f.stat().st_mtime)
            chosen[chapter] = newest
            problems.append(f"graded {newest.name} as {chapter.name}"
                            + (f" (the newest of {len(loose)} files)" if len(loose) > 1 else ""))
    for f in files:
        if f not in chosen.values() and not any(c.stem in f.stem for c in chapters):
            problems.append(f"{f.name} is not a chapter of the book: not graded")
    return chosen, problems


def student_answers(nb: dict, chapter: Path) -> tuple[dict[str, str | None], list[str]]:
    """{exercise: the student's answer code (None: not found)} and the problems found: a
    changed check cell (tampering), an answer found only by its place."""
    cells = nb.get("cells", [])
    released = {notebooks.grade_id(c): "".join(c["source"])
                for c in notebooks.student_version(chapter)["cells"] if notebooks.grade_id(c)}
    titles = notebooks.exercise_titles(json.loads(chapter.read_text()),
                                       notebooks.chapter_number(chapter))
    answers, problems = {}, []
    by_id = {notebooks.grade_id(c): c for c in cells if notebooks.grade_id(c)}
    for ex in (e.id for e in exercises(chapter)):
        check = by_id.get(f"{ex}-check")
        if check is not None and "".join(check["source"]).strip() != \
                released.get(f"{ex}-check", "").strip():
            problems.append(f"the check cell of {ex} was changed: graded with the original")
        cell = by_id.get(f"{ex}-solution")
        if cell is None:
            cell = _answer_by_place(cells, ex, titles.get(ex, ""), released)
            if cell is not None:
                problems.append(f"the answer cell of {ex} had lost its grading metadata: "
                                "found by its place after the exercise")
        if cell is None:
            problems.append(f"no answer cell found for {ex}: scored 0")
            answers[ex] = None
        else:
            answers[ex] = notebooks.solution_code("".join(cell["source"]))
    return answers, problems


def _answer_by_place(cells: list[dict], ex: str, title: str, released: dict) -> dict | None:
    """The first code cell after the exercise's text that is not a check cell."""
    checks = {v.strip() for k, v in released.items() if k.endswith("-check")}
    after = False
    for c in cells:
        source = "".join(c["source"])
        if c["cell_type"] == "markdown":
            if f":label: {ex}" in source or (title and title in source):
                after = True
            elif after and re.search(r"^#+ |\{exercise\}", source, re.M):
                return None                              # the next exercise or section
        elif after and not notebooks.is_check(c) and source.strip() not in checks:
            return c
    return None


def grade(submissions: Path, *, jobs: int = 2, keep: Path | None = None,
          log=print) -> Report:
    """Grade ``submissions/<student>/*.ipynb`` against every chapter; see the module text."""
    chapters = find_chapters([])
    students = sorted(p for p in submissions.iterdir() if p.is_dir())
    if not students:
        raise SystemExit(f"no student folders in {submissions}/")
    report = Report()
    work = []                                              # (student, chapter, answers)
    for student in students:
        files = sorted(student.glob("*.ipynb"))
        chosen, problems = match_files(files, chapters)
        report.problems += [f"{student.name}: {p}" for p in problems]
        for chapter, path in chosen.items():
            try:
                nb = json.loads(path.read_text())
                if not isinstance(nb, dict) or "cells" not in nb:
                    raise ValueError("not a notebook (no cells)")
            except (ValueError, UnicodeDecodeError, OSError) as exc:
                report.problems.append(f"{student.name}: {path.name} is unreadable "
                                       f"({type(exc).__name__}: {exc}): scored 0")
                report.scores += [Score(student.name, chapter.stem, e.id, 0.0, e.points,
                                        "unreadable notebook") for e in exercises(chapter)]
                continue
            answers, problems = student_answers(nb, chapter)
            report.problems += [f"{student.name}: {chapter.stem}: {p}" for p in problems]
            work.append((student.name, chapter, answers))

    def one(item):
        name, chapter, answers = item
        ids = [ex for ex, code in answers.items() if code is not None]
        start = time.perf_counter()
        results = run_trials(chapter, [{"exercise": ex, "answer": answers[ex]} for ex in ids])
        return item, dict(zip(ids, results)), time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for (name, chapter, _answers), results, seconds in pool.map(one, work):
            report.seconds[(name, chapter.stem)] = seconds
            for e in exercises(chapter):
                r = results.get(e.id)
                note = ("no answer cell" if r is None else "" if r["passed"] else r["error"])
                report.scores.append(Score(name, chapter.stem, e.id,
                                           e.points if r and r["passed"] else 0.0, e.points,
                                           note or ""))
            if keep is not None:
                _feedback(keep / name / f"{chapter.stem}.md", chapter, results)
    return report


def _feedback(path: Path, chapter: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {chapter.stem}", ""]
    for e in exercises(chapter):
        r = results.get(e.id)
        verdict = ("no answer found" if r is None else
                   f"passed ({e.points:g} points)" if r["passed"] else f"failed: {r['error']}")
        lines.append(f"- {e.id}: {verdict}")
    path.write_text("\n".join(lines) + "\n")


def write_table(report: Report, path: Path) -> Path:
    """The scores as CSV (student, chapter, exercise, score, max_score, note), and the
    problems beside it in ``<name>.problems.txt``; returns the problems file."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "chapter", "exercise", "score", "max_score", "note"])
        for s in report.scores:
            w.writerow([s.student, s.chapter, s.exercise, s.score, s.max_score, s.note])
    problems = path.with_suffix(".problems.txt")
    problems.write_text("".join(f"{p}\n" for p in report.problems) or "no problems found\n")
    return problems


def summary(report: Report, jobs: int = 2, class_size: int = 30) -> str:
    """Totals per student and chapter, the problems, and the time per notebook."""
    totals: dict[tuple[str, str], list[float]] = {}
    for s in report.scores:
        t = totals.setdefault((s.student, s.chapter), [0.0, 0.0])
        t[0] += s.score
        t[1] += s.max_score
    lines = [f"{student:20s} {chapter:32s} {got:g} / {best:g}"
             for (student, chapter), (got, best) in sorted(totals.items())]
    if report.problems:
        lines += ["", "problems:"] + [f"  {p}" for p in report.problems]
    if report.seconds:
        mean = sum(report.seconds.values()) / len(report.seconds)
        chapters = len({c for _, c in report.seconds})
        lines += ["", f"{mean:.0f} s per notebook on average, {jobs} at a time: a class of "
                      f"{class_size} handing in {chapters} chapter(s) takes about "
                      f"{mean * class_size * chapters / jobs / 60:.0f} min"]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    import argparse

    if argv and argv[0] == "_trials":
        _driver(argv[1], argv[2])
        return
    parser = argparse.ArgumentParser(prog="python3 tasks.py",
                                     description="Student versions and grading.")
    sub = parser.add_subparsers(dest="command", required=True)
    assign = sub.add_parser("assign", help="write student versions of chapters")
    assign.add_argument("chapters", nargs="*", default=["all"],
                        help="chapter numbers or names, e.g. 03 05 (default: all)")
    assign.add_argument("--to", type=Path, required=True, help="folder for the handout")
    grader = sub.add_parser("grade", help="grade submissions/<student>/<chapter>.ipynb")
    grader.add_argument("submissions", type=Path)
    grader.add_argument("--to", type=Path, required=True, help="CSV file for the scores")
    grader.add_argument("--keep", type=Path, default=None,
                        help="folder for per-student feedback (one Markdown file per chapter)")
    grader.add_argument("--jobs", type=int, default=2, help="notebooks graded at a time")
    args = parser.parse_args(argv)
    if args.command == "assign":
        for path in make_student_versions(args.chapters, args.to):
            print(f"wrote {path}")
    else:
        report = grade(args.submissions, jobs=args.jobs, keep=args.keep)
        problems = write_table(report, args.to)
        print(summary(report, args.jobs))
        print(f"wrote {args.to} and {problems}")


if __name__ == "__main__":
    main(sys.argv[1:])
