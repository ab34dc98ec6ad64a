"""Execution time of every chapter against the budget (90 s each on 2 cores, 6 min for the book).

Two measurements, in one run:

1. each chapter alone, from scratch, with nbclient (both cores: the chapter's own sweeps use
   them), against the 90 s chapter budget; their sum is the book executed one chapter at a time;
2. the whole book as the build and the tests execute it (tools/execute.py: two chapters at a
   time, one core and one torch thread each), against the 6 min book budget.

Run from the repository root: ``.venv/bin/python benchmarks/budget.py`` (about 12 minutes).
``--alone`` or ``--book`` runs one part; chapter names (e.g. ``05``) select chapters.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import execute  # noqa: E402

CHAPTER_BUDGET, BOOK_BUDGET = 90.0, 360.0


def alone(paths: list[Path]) -> tuple[float, list[str]]:
    env = execute.kernel_env(None)          # as the build runs a kernel, on both cores
    total, over = 0.0, []
    print(f"{'chapter, alone on 2 cores':32s} {'seconds':>8s}  budget {CHAPTER_BUDGET:.0f} s")
    for path in paths:
        _, seconds, error = execute._execute_one(str(path), env)
        total += seconds
        flag = ("  FAILED" if error else "") + ("" if seconds <= CHAPTER_BUDGET
                                               else "  OVER BUDGET")
        if flag:
            over.append(path.name)
        print(f"{path.name:32s} {seconds:8.1f}  ({seconds / CHAPTER_BUDGET:.0%} of budget){flag}")
    print(f"{'one chapter at a time, in all':32s} {total:8.1f}")
    return total, over


def as_built(paths: list[Path]) -> float:
    print(f"\n{'book as built, 2 at a time':32s} {'seconds':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        results = execute.execute(paths, jobs=2, ledger=Path(tmp) / "ledger.json",
                                  use_cache=False, out=Path(tmp), log=lambda *_: None)
        wall = time.perf_counter() - start
    for r in results:
        print(f"{r.chapter + '.ipynb':32s} {r.seconds:8.1f}" + ("  FAILED" if r.error else ""))
    print(f"{'whole book, wall clock':32s} {wall:8.1f}  ({wall / BOOK_BUDGET:.0%} of "
          f"{BOOK_BUDGET:.0f} s)")
    return wall


def main(args: list[str]) -> int:
    names = [a for a in args if not a.startswith("--")]
    paths = execute.chapters(names or None)
    over, wall = [], 0.0
    if "--book" not in args:
        _, over = alone(paths)
    if "--alone" not in args:
        wall = as_built(paths)
    return 1 if over or wall > BOOK_BUDGET else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
