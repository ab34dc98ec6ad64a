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
the metadata, by their place after the exercise's text) and grades them against the chapter as
released. Student code never runs where the checks run (as in PrairieLearn's external grading
or Gradescope's autograder containers):

- a **judge** process per chapter (``_judge``) runs the chapter's ``exercise-setup`` cells
  and, for every answer, forks a **check process** that runs the complete check cell in a
  fresh copy of that set-up. Neither ever runs student code.
- a **student server** (tools/sandbox.py) runs the same set-up and forks a confined
  **student process** per answer, which runs the answer and sends back the values of the
  exercise's names (``depthlab.answers``, and ``depthlab.reads``: set-up objects the answer
  changes, e.g. the student's ``claims``) as data only (tools/wire.py). A student's function
  stays there; the check calls it through ``sandbox.Remote``, on arguments the check built.

An exercise scores its points when its check passes. So a deleted or edited check cell changes
nothing (an edited one is reported as tampering), an exercise's score depends on its own answer
only (``tests/test_coursework.py`` checks that exercises use only the setup's names), and an
answer that patches builtins or library helpers, crashes, hangs, hoards memory or floods its
output loses that exercise and nothing else (``tests/test_hostile_students.py``).

What a class folder can do wrong is reported, never fatal: an unreadable notebook, a file
renamed by a download (``03_batch_vs_layer_norm (1).ipynb`` is matched and reported), two files
for one chapter, an answer cell that cannot be found, a check cell that was changed. They go to
the console and to ``<table>.problems.txt`` beside the grade table.

Grading runs two lanes at a time (a lane: one judge and one student server for one chapter,
grading its students one after another), each with one torch thread (on a 2-core machine two
2-thread processes ran 30 times slower than two 1-thread ones), and prints the time per
notebook and the projected time for a class (``benchmarks/grading.py`` measures a class).
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
import sandbox  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
# Seconds a check's own computation may take (the reference it recomputes; the slowest takes
# ~10 s). The student's computation has its own limit, sandbox.TIME_LIMIT.
CHECK_LIMIT = 300
# Address space of the judge beyond its set-up: a guard, since no student code runs there.
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
    reads: tuple[str, ...] = ()  # set-up names the answer changes and the check reads back


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
                                "".join(c["source"]),
                                tuple(meta.get("depthlab", {}).get("reads", []))))
    return out


def setup_code(chapter: Path) -> list[str]:
    """The sources of the chapter's ``exercise-setup`` cells: all an exercise may use."""
    return ["".join(c["source"]) for c in json.loads(chapter.read_text())["cells"]
            if "exercise-setup" in c["metadata"].get("tags", [])]


# --------------------------------------------------------------------------------------------
# Running answers against checks: student code in its own process, checks where none ran
# --------------------------------------------------------------------------------------------


def _worker_env() -> dict[str, str]:
    env = dict(os.environ, DEPTHLAB_STATIC="1", DEPTHLAB_QUIET="1", MPLBACKEND="Agg",
               DEPTHLAB_WORKERS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("DEPTHLAB_LEDGER", None)         # nothing a grading process does writes the ledger
    return env


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


def always_true_code(names: list[str]) -> str:
    """An answer cell binding every name to an ``AlwaysTrue``: it runs as a student's would."""
    import inspect

    return inspect.getsource(AlwaysTrue) + "".join(f"{n} = AlwaysTrue()\n" for n in names)


def constants_code(solution: str, names: list[str], constants: list) -> str:
    """An answer cell that runs the instructor's answer (to learn each name's type) and then
    builds one value set per constant, typed like the reference (``_value_sets``: the student
    process reports each set and the check runs once per set)."""
    import inspect

    return "\n".join([
        solution, inspect.getsource(_like),
        f"_reference = {{_n: globals().get(_n) for _n in {names!r}}}",
        f"_constants = {constants!r}",
        "_value_sets = []",
        "for _c in _constants:",
        "    _values = {}",
        "    for _n, _v in _reference.items():      # a string answer gets the next string, etc.",
        "        _fits = [c for c in [_c] + _constants if _like(_v, c) is not None]",
        "        _values[_n] = _like(_v, _fits[0]) if _fits else _like(_v, 0.0)",
        "    _value_sets.append(_values)", ""])


def _answer_runs(chapter: Path, trials: list[dict]) -> list[dict]:
    """Trials as the judge runs them: answer code, whether it gives several value sets, and
    how many results it must produce."""
    by_id = {e.id: e for e in exercises(chapter)}
    runs = []
    for t in trials:
        ex = by_id.get(t["exercise"])
        names = list(ex.answers) if ex else []
        if "answer" in t:
            runs.append({"exercise": t["exercise"], "code": t["answer"], "sets": False,
                         "expect": 1})
        elif t.get("always_true"):
            runs.append({"exercise": t["exercise"], "code": always_true_code(names),
                         "sets": False, "expect": 1})
        else:
            runs.append({"exercise": t["exercise"], "sets": True,
                         "code": constants_code(ex.solution if ex else "", names,
                                                t["constants"]),
                         "expect": len(t["constants"])})
    return runs


@dataclass
class Lane:
    """What one judge process reports: results per trial, and what grading was like."""
    results: list[list[dict]]
    setup_seconds: float = 0.0
    confinement: str = ""
    problems: list[str] = field(default_factory=list)


def _failed(note: str) -> dict:
    return {"passed": False, "seconds": 0.0, "error": note}


def run_lane(chapter: Path, trials: list[dict], *, time_limit: float = sandbox.TIME_LIMIT,
             memory_limit: int = sandbox.MEMORY_LIMIT, protected: list[Path] = ()) -> Lane:
    """Run ``trials`` against the chapter's checks; see ``run_trials`` for the trials.

    A judge process (``_judge``) runs the set-up and every check; each answer runs in a
    student process of its own (tools/sandbox.py). If the judge itself dies (it should not: it
    never runs student code, but a student process where the machine has no Landlock could
    kill it), the answer it was grading scores 0 and a new judge grades the rest. Never raises
    for anything an answer does: every trial gets its results."""
    runs = _answer_runs(chapter, trials)
    results: list[list[dict] | None] = [None] * len(runs)
    lane = Lane([])
    todo = list(range(len(runs)))
    ex = {e.id: {"check": e.check, "answers": list(e.answers), "reads": list(e.reads)}
          for e in exercises(chapter)}
    protected = [CHAPTERS, *protected]
    while todo:
        job = {"setup": setup_code(chapter), "exercises": ex, "time_limit": time_limit,
               "memory_limit": memory_limit, "protected": [str(p) for p in protected],
               "runs": [runs[i] for i in todo]}
        with tempfile.TemporaryDirectory(prefix="depthlab-judge-") as tmp:
            jobfile, outfile = Path(tmp) / "job.json", Path(tmp) / "out.json"
            jobfile.write_text(json.dumps(job))
            budget = 900 + sum(time_limit + CHECK_LIMIT * r["expect"] + 30
                               for r in job["runs"])
            try:
                proc = subprocess.run([sys.executable, __file__, "_judge", str(jobfile),
                                       str(outfile)], cwd=CHAPTERS, env=_worker_env(),
                                      capture_output=True, text=True, timeout=budget)
                why = f"exit status {proc.returncode}: {proc.stderr.strip()[-300:]}"
            except subprocess.TimeoutExpired:
                why = f"took longer than {budget} s"
            out = json.loads(outfile.read_text()) if outfile.exists() else {}
        got = out.get("results", [])
        lane.setup_seconds += out.get("setup_seconds", 0.0)
        lane.confinement = out.get("confinement", lane.confinement)
        for i, res in zip(todo, got):
            results[i] = res
        todo = todo[len(got):]
        if not todo:
            break
        if out.get("current") is None:                  # it never got to grade anything
            note = out.get("setup_error") or f"grading error: the judge failed ({why})"
            for i in todo:
                results[i] = [_failed(note)] * runs[i]["expect"]
            lane.problems.append(f"{chapter.stem}: {note}")
            break
        culprit = todo.pop(0)
        results[culprit] = [_failed(f"grading stopped during this answer ({why})")] \
            * runs[culprit]["expect"]
        lane.problems.append(f"{chapter.stem}: the judge stopped while grading "
                             f"{runs[culprit]['exercise']} ({why}); the rest was graded again")
    lane.results = [r if r is not None else [_failed("not graded")] for r in results]
    return lane


def run_trials(chapter: Path, trials: list[dict], **limits) -> list[dict]:
    """Run ``trials`` against the chapter's checks (``run_lane`` does it).

    A trial is ``{"exercise": id, "answer": code}`` (a student's answer), or
    ``{"exercise": id, "constants": [...]}`` (the answer names set to constants, coerced to the
    type of the instructor's answer, one check per constant) or ``{"exercise": id,
    "always_true": True}`` (every answer an object whose comparisons are all true). Each runs
    as a student's answer would, in a student process. Returns one ``{"passed", "error",
    "seconds"}`` per answer run (a constants trial gives one per constant), in order.
    """
    return [r for res in run_lane(chapter, trials, **limits).results for r in res]


def _judge(jobfile: str, outfile: str) -> None:
    """The judge process: the chapter's set-up, then every check, each in a fork of itself.
    Student code runs only in the student server's processes (tools/sandbox.py)."""
    job = json.loads(Path(jobfile).read_text())
    import resource

    import torch

    torch.set_num_threads(1)
    vm = sandbox._vm_size()
    # the soft limit only: the student server, started from here, sets its own
    resource.setrlimit(resource.RLIMIT_AS,
                       (vm + MEMORY_LIMIT, resource.getrlimit(resource.RLIMIT_AS)[1]))
    out = {"results": [], "current": None, "setup_seconds": 0.0, "confinement": ""}

    def save() -> None:
        tmp = Path(outfile).with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(outfile)

    env = dict(os.environ)
    protected = [Path(p) for p in job["protected"]]

    def start_server() -> sandbox.Server:
        return sandbox.Server(job["setup"], protected=protected, workdir=CHAPTERS, env=env,
                              memory_limit=job["memory_limit"])

    start = time.perf_counter()
    server = start_server()                     # its set-up runs while this one runs ours
    shell = sandbox._make_shell()
    sys.stdout = open(os.devnull, "w")          # the checks' prints are not the report
    try:
        for src in job["setup"]:
            r = shell.run_cell(src, silent=True, store_history=False)
            if not r.success:
                raise RuntimeError(f"the chapter's set-up failed: {r.error_in_exec!r}")
        server.wait_ready(timeout=900)
    except Exception as exc:
        out["setup_error"] = f"grading error: {exc}"[:500]
        save()
        server.close()
        return
    out["setup_seconds"] = time.perf_counter() - start
    out["confinement"] = server.confinement
    base = dict(shell.user_ns)
    try:
        for i, run in enumerate(job["runs"]):
            out["current"] = i
            save()
            for attempt in (1, 2):             # a student process cannot stop the others
                if not server.alive():
                    server.close()
                    server = start_server()
                    server.wait_ready(timeout=900)
                try:
                    result = _grade_run(server, shell, base, run,
                                        job["exercises"].get(run["exercise"]),
                                        job["time_limit"])
                    break
                except RuntimeError:              # the server died before this answer began
                    if attempt == 2:
                        raise
                    server.proc.kill()
                    server.proc.wait()
            out["results"].append(result)
        out["current"] = len(job["runs"])
        save()
    finally:
        server.close()


def _grade_run(server, shell, base: dict, run: dict, ex: dict | None,
               time_limit: float) -> list[dict]:
    """One answer: a student process runs it, a fork of the judge checks it."""
    expect = run["expect"]
    if ex is None:
        return [_failed(f"no exercise {run['exercise']}")] * expect
    pid, sock = server.fork()                  # RuntimeError if the server died: see _judge
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:                                       # the check process
        os.close(read_end)
        try:
            server.ctrl.close()
            results = _check(shell, base, run, ex, sandbox.Student(sock, time_limit))
        except BaseException as exc:  # noqa: BLE001
            results = [_failed(f"grading error: {type(exc).__name__}: {exc}"[:300])] * expect
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(json.dumps(results).encode())
        os._exit(0)
    os.close(write_end)
    sock.close()
    data, deadline = b"", time.monotonic() + time_limit + CHECK_LIMIT * expect + 30
    import select

    while True:
        ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(child, signal.SIGKILL)
            break
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        data += chunk
    os.close(read_end)
    os.waitpid(child, 0)
    try:
        status = server.reap(pid)
    except RuntimeError:                 # the server died (killed?): _judge starts another
        status = -1
    try:
        results = json.loads(data)
    except ValueError:
        results = [_failed("grading error: the check took too long or failed")] * expect
    for r in results:
        if r.pop("lost", None) == "ended":
            r["error"] = sandbox.describe_status(status)
    return results


def _check(shell, base: dict, run: dict, ex: dict, student) -> list[dict]:
    """In the check process: the answer's values, then the complete check cell per value
    set. The answer names are bound to what the student process sent; a student's function
    is a ``sandbox.Remote``."""
    names = ex["answers"] + ex["reads"]
    start = time.perf_counter()
    try:
        sets = student.answer(run["code"], names, sets=run["sets"])
    except sandbox.StudentError as exc:
        return [{"passed": False, "seconds": time.perf_counter() - start,
                 "error": str(exc)[:300]}] * run["expect"]
    except sandbox.StudentLost as lost:
        return [{"passed": False, "seconds": time.perf_counter() - start, "lost": lost.kind,
                 "error": lost.detail}] * run["expect"]
    sets = (sets + [{}] * run["expect"])[:run["expect"]]

    def alarm(signum, frame):
        raise TimeoutError(f"the check took longer than {CHECK_LIMIT} s")

    signal.signal(signal.SIGALRM, alarm)
    results = []
    for values in sets:
        shell.user_ns.clear()
        shell.user_ns.update(base)
        for n in ex["answers"]:
            shell.user_ns.pop(n, None)          # an undefined answer is a NameError, never
        shell.user_ns.update(values)            # a value of the set-up's
        signal.alarm(CHECK_LIMIT)
        try:
            r = shell.run_cell(ex["check"], silent=True, store_history=False)
        finally:
            signal.alarm(0)
        err = r.error_before_exec or r.error_in_exec
        if student.lost is not None:
            results.append({"passed": False, "lost": student.lost.kind,
                            "error": student.lost.detail})
        elif err is None:
            results.append({"passed": True, "error": None})
        elif isinstance(err, sandbox.StudentError):
            results.append({"passed": False, "error": str(err)[:300]})
        else:
            results.append({"passed": False, "error": f"{type(err).__name__}: {err}"[:300]})
        results[-1]["seconds"] = time.perf_counter() - start
        start = time.perf_counter()
    student.exit()
    return results


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
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)   # answers and checks
    setup_seconds: dict[str, list[float]] = field(default_factory=dict)   # per chapter, lane
    confinement: str = ""


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


def grade(submissions: Path, *, jobs: int = 2, keep: Path | None = None, log=print,
          time_limit: float = sandbox.TIME_LIMIT,
          memory_limit: int = sandbox.MEMORY_LIMIT) -> Report:
    """Grade ``submissions/<student>/*.ipynb`` against every chapter; see the module text.
    ``time_limit`` (seconds) and ``memory_limit`` (bytes) bound each answer's process."""
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

    by_chapter: dict[Path, list[tuple[str, dict]]] = {}
    for name, chapter, answers in work:
        by_chapter.setdefault(chapter, []).append((name, answers))
    # A lane is one judge and one student server for one chapter: each runs the chapter's
    # set-up once and then grades its students one after another. Each chapter's students
    # are shared among ``jobs`` lanes, and ``jobs`` lanes run at a time: a slow chapter is
    # not left to one process while the other waits (chapters 2 and 4 for 30 students:
    # 5.9 min with one lane per chapter).
    lanes = []
    for chapter, items in by_chapter.items():
        k = max(1, min(len(items), jobs))
        lanes += [(chapter, items[j::k]) for j in range(k)]

    def one(lane):
        chapter, items = lane
        trials, owners = [], []
        for name, answers in items:
            for ex, code in answers.items():
                if code is not None:
                    trials.append({"exercise": ex, "answer": code})
                    owners.append((name, ex))
        result = run_lane(chapter, trials, time_limit=time_limit, memory_limit=memory_limit,
                          protected=[submissions.resolve()])
        return lane, owners, result

    results: dict[tuple[str, str], dict[str, dict]] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for (chapter, _items), owners, lane in pool.map(one, lanes):
            report.setup_seconds.setdefault(chapter.stem, []).append(lane.setup_seconds)
            report.confinement = lane.confinement or report.confinement
            report.problems += lane.problems
            for (name, ex), (r,) in zip(owners, lane.results):
                results.setdefault((name, chapter.stem), {})[ex] = r
    for name, chapter, _answers in work:
        got = results.get((name, chapter.stem), {})
        report.seconds[(name, chapter.stem)] = sum(r["seconds"] for r in got.values())
        for e in exercises(chapter):
            r = got.get(e.id)
            note = ("no answer cell" if r is None else "" if r["passed"] else r["error"])
            report.scores.append(Score(name, chapter.stem, e.id,
                                       e.points if r and r["passed"] else 0.0, e.points,
                                       note or ""))
        if keep is not None:
            _feedback(keep / name / f"{chapter.stem}.md", chapter, got)
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
        lines += ["", projection(report, jobs, class_size)]
    if report.confinement:
        lines += [f"student code ran in: {report.confinement}"]
    return "\n".join(lines)


def projection(report: Report, jobs: int = 2, class_size: int = 30) -> str:
    """The measured time per notebook and per set-up, and what they make for a class: each
    chapter's notebooks shared among ``jobs`` processes, each lane paying one set-up."""
    chapters = sorted({c for _, c in report.seconds})
    lanes = max(1, jobs)                                    # per chapter: see grade()
    total, per_notebook = 0.0, []
    for c in chapters:
        times = [t for (_, ch), t in report.seconds.items() if ch == c]
        setups = report.setup_seconds.get(c) or [0.0]
        per_notebook += times
        total += (class_size * sum(times) / len(times) + lanes * max(setups)) / max(1, jobs)
    setup = max(max(v) for v in report.setup_seconds.values()) if report.setup_seconds else 0
    return (f"{sum(per_notebook) / len(per_notebook):.0f} s per notebook on average (answers "
            f"and checks), set-up up to {setup:.0f} s per chapter, {jobs} at a time: a class of "
            f"{class_size} handing in {len(chapters)} chapter(s) takes about "
            f"{total / 60:.0f} min")


def main(argv: list[str]) -> None:
    import argparse

    if argv and argv[0] == "_judge":
        _judge(argv[1], argv[2])
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
    grader.add_argument("--time-limit", type=float, default=sandbox.TIME_LIMIT,
                        help="seconds of a student's computation per exercise "
                             f"(default {sandbox.TIME_LIMIT})")
    args = parser.parse_args(argv)
    if args.command == "assign":
        for path in make_student_versions(args.chapters, args.to):
            print(f"wrote {path}")
    else:
        start = time.perf_counter()
        report = grade(args.submissions, jobs=args.jobs, keep=args.keep,
                       time_limit=args.time_limit)
        problems = write_table(report, args.to)
        print(summary(report, args.jobs))
        print(f"graded in {(time.perf_counter() - start) / 60:.1f} min")
        print(f"wrote {args.to} and {problems}")


if __name__ == "__main__":
    main(sys.argv[1:])
