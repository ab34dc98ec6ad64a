"""Grading against students who try to fool or stop it (tools/sandbox.py, tools/wire.py).

Each answer runs in a process of its own and only data comes back; the checks run where no
student code ran. A class folder with a patching, a crashing, a sleeping, a hoarding and a
flooding student: each scores 0 on what they broke, with a note; everyone else is graded as
before; the table is written. Where the kernel has Landlock, a student who reads the hidden
tests from disk, overwrites classmates' notebooks or kills the grader's processes gets
nowhere either.
"""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import coursework  # noqa: E402
import notebooks  # noqa: E402
import sandbox  # noqa: E402

CHAPTER = ROOT / "chapters" / "00_tour.ipynb"          # quick set-up, quick exercises
EXERCISES = coursework.exercises(CHAPTER)
NAMES = sorted({n for e in EXERCISES for n in e.answers})
INSTRUCTOR = json.loads(CHAPTER.read_text())

# What a determined student wrote (issue #34): every comparison helper a check might use
# replaced and every answer name an object equal to anything (this earned 2 of 6 points on
# chapter 0 when answers ran beside the checks) ...
PATCH = f"""
import builtins, math
import numpy, numpy.testing, torch, torch.testing

class Yes:
    def __eq__(self, other): return True
    __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __eq__
    def __bool__(self): return True
    def __call__(self, *a, **k): return self
    def __float__(self): return 0.0
    def __len__(self): return 3
    def __getitem__(self, k): return Yes()
    def __iter__(self): return iter([Yes(), Yes(), Yes()])
    def __contains__(self, k): return True
    def __hash__(self): return 0
    def __getattr__(self, name): return Yes()

builtins.abs = lambda *a, **k: 0.0
math.isclose = lambda *a, **k: True
numpy.allclose = numpy.isclose = lambda *a, **k: True
numpy.testing.assert_allclose = numpy.testing.assert_array_equal = lambda *a, **k: None
torch.allclose = torch.isclose = torch.equal = lambda *a, **k: True
torch.testing.assert_close = lambda *a, **k: None
for _name in {NAMES!r}:
    globals()[_name] = Yes()
"""
# ... and the same with isinstance always true (this stopped the grading of the whole class).
SABOTAGE = PATCH + "builtins.isinstance = lambda *a, **k: True\n"


def _with_answers(answers: dict[str, str]) -> dict:
    """The instructor's notebook with some answer cells replaced."""
    nb = json.loads(json.dumps(INSTRUCTOR))
    for c in nb["cells"]:
        ex = (notebooks.grade_id(c) or "").removesuffix("-solution")
        if notebooks.is_solution(c) and ex in answers:
            c["source"] = answers[ex]
    return nb


def _class(tmp_path: Path, students: dict[str, dict]) -> Path:
    folder = tmp_path / "submissions"
    for name, nb in students.items():
        (folder / name).mkdir(parents=True)
        (folder / name / CHAPTER.name).write_text(json.dumps(nb))
    return folder


def _grade(folder: Path, **limits):
    report = coursework.grade(folder, log=lambda *a: None, **limits)
    scores = {(s.student, s.exercise): s for s in report.scores}
    table = folder.parent / "grades.csv"
    coursework.write_table(report, table)
    return report, scores, table


def test_patching_crashing_sleeping_hoarding_and_flooding_students(tmp_path):
    ids = [e.id for e in EXERCISES]
    points = {e.id: e.points for e in EXERCISES}
    broken = {
        "patcher": {ex: PATCH for ex in ids},
        "saboteur": {ex: SABOTAGE for ex in ids},
        "exiter": {ids[0]: "import os\nos._exit(1)\n"},
        "segfault": {ids[1]: "import ctypes\nctypes.string_at(0)\n"},
        "sleeper": {ids[0]: "import time\ntime.sleep(10 ** 6)\n"},
        "hoarder": {ids[1]: "import numpy as np\nhoard = []\nwhile True:\n"
                            "    hoard.append(np.ones(1 << 24))\n"},
        "flooder": {ids[2]: "while True:\n    print('spam ' * 1000)\n"},
    }
    students = {"honest": INSTRUCTOR, "untouched": notebooks.student_version(CHAPTER)}
    students |= {name: _with_answers(answers) for name, answers in broken.items()}
    folder = _class(tmp_path, students)
    report, scores, table = _grade(folder, time_limit=40, memory_limit=1 << 30)

    rows = table.read_text().splitlines()
    assert rows[0] == "student,chapter,exercise,score,max_score,note"
    assert len(rows) == 1 + len(students) * len(ids), "one row per student and exercise"
    for ex in ids:
        assert scores[("honest", ex)].score == points[ex], scores[("honest", ex)].note
        assert scores[("untouched", ex)].score == 0
        for name in ("patcher", "saboteur"):
            assert scores[(name, ex)].score == 0, f"the {name} scores on {ex}"
            assert scores[(name, ex)].note
        for name, answers in broken.items():
            if ex not in answers:                             # their other answers are right
                assert scores[(name, ex)].score == points[ex], (name, ex,
                                                                scores[(name, ex)].note)
    note = {name: scores[(name, next(iter(answers)))] for name, answers in broken.items()}
    for name, s in note.items():
        assert s.score == 0, f"{name} scores on {s.exercise}"
    assert "exited (status 1)" in note["exiter"].note
    assert "SIGSEGV" in note["segfault"].note
    assert "longer than 40 s" in note["sleeper"].note
    assert "MemoryError" in note["hoarder"].note
    assert f"more than {sandbox.OUTPUT_LIMIT >> 20} MiB" in note["flooder"].note
    assert "student code ran in" in coursework.summary(report)


@pytest.mark.skipif(sandbox.landlock_abi() < 6, reason="needs Landlock ABI 6 (Linux 6.12+): "
                    "without it a student process can read and signal what the grader can")
def test_a_confined_student_cannot_read_the_checks_write_elsewhere_or_kill_the_grader(
        tmp_path):
    ids = [e.id for e in EXERCISES]
    points = {e.id: e.points for e in EXERCISES}
    # Copies the reference from the chapter on the grader's disk, and runs it.
    snoop = (f"import json\nnb = json.load(open({str(CHAPTER)!r}))\n"
             "exec(''.join(next(c['source'] for c in nb['cells'] if c['metadata']"
             f".get('nbgrader', {{}}).get('grade_id') == '{ids[0]}-solution')))\n")
    # Overwrites a classmate's notebook, and writes beside the chapters.
    classmate = tmp_path / "submissions" / "honest" / CHAPTER.name
    vandal = (f"for path in ({str(classmate)!r}, {str(CHAPTER.parent / 'x.txt')!r}):\n"
              "    try:\n        open(path, 'w').write('gone')\n    except OSError:\n"
              "        pass\n")
    # Kills every process above it: the student server, the judge, this test's process.
    killer = ("import os, signal\npid = os.getpid()\nfor _ in range(4):\n"
              "    pid = int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])\n"
              "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n"
              "        pass\n")
    students = {"honest": INSTRUCTOR,
                "snooper": _with_answers({ids[0]: snoop}),
                "vandal": _with_answers({ids[1]: vandal}),
                "killer": _with_answers({ids[2]: killer})}
    folder = _class(tmp_path, students)
    before = classmate.read_text()
    report, scores, table = _grade(folder)
    assert classmate.read_text() == before and not (CHAPTER.parent / "x.txt").exists()
    assert scores[("snooper", ids[0])].score == 0
    assert "Permission" in scores[("snooper", ids[0])].note
    assert scores[("vandal", ids[1])].score == 0 and scores[("killer", ids[2])].score == 0
    for name in students:
        for ex in ids:
            if (name, ex) not in {("snooper", ids[0]), ("vandal", ids[1]), ("killer", ids[2])}:
                assert scores[(name, ex)].score == points[ex], (name, ex, scores[(name, ex)])
    assert not any("judge stopped" in p for p in report.problems), report.problems
    assert os.getpid() > 0                                   # and this process lives on
