"""How long grading a class takes: a class folder of N students, each handing in two chapters.

    .venv/bin/python benchmarks/grading.py [--students 30] [--chapters 03 05] [--jobs 2]

Every student hands in the instructor's notebook: every answer right, so every check runs to
its end and every answer runs in full (the slowest class there is; wrong answers fail sooner).
Prints the wall time of ``tasks.py grade``'s work (tools/coursework.grade), the projection it
prints itself, and how student code was confined. The instructor guide quotes the result.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import coursework  # noqa: E402


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=30)
    parser.add_argument("--chapters", nargs="+", default=["03", "05"])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    chapters = coursework.find_chapters(args.chapters)
    folder = Path(tempfile.mkdtemp(prefix="depthlab-class-"))
    try:
        for k in range(args.students):
            student = folder / f"student{k:02d}"
            student.mkdir()
            for chapter in chapters:
                shutil.copy(chapter, student / chapter.name)
        start = time.perf_counter()
        report = coursework.grade(folder, jobs=args.jobs, log=lambda *a: None)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    full = sum(s.score == s.max_score for s in report.scores)
    print(f"{args.students} students × {len(chapters)} chapters "
          f"({', '.join(c.stem for c in chapters)}), {args.jobs} at a time: graded in "
          f"{wall / 60:.1f} min; {full} of {len(report.scores)} exercises at full marks")
    print(coursework.projection(report, args.jobs, args.students))
    print(f"student code ran in: {report.confinement}")


if __name__ == "__main__":
    main(sys.argv[1:])
