"""Execution time of every chapter against the budget (90 s each, 8 min for the book).

Executes each notebook in chapters/ from scratch with nbclient, as the book build does, and
prints a table. Run from the repository root: .venv/bin/python benchmarks/budget.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
CHAPTER_BUDGET, BOOK_BUDGET = 90.0, 480.0


def main(names: list[str]) -> int:
    os.environ.update(DEPTHLAB_STATIC="1", DEPTHLAB_QUIET="1")
    os.environ.pop("DEPTHLAB_LEDGER", None)
    paths = sorted((ROOT / "chapters").glob("*.ipynb"))
    if names:
        paths = [p for p in paths if any(n in p.name for n in names)]
    total, over = 0.0, []
    print(f"{'chapter':32s} {'seconds':>8s}  budget {CHAPTER_BUDGET:.0f} s")
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        seconds = time.perf_counter() - start
        total += seconds
        flag = "" if seconds <= CHAPTER_BUDGET else "  OVER BUDGET"
        if flag:
            over.append(path.name)
        print(f"{path.name:32s} {seconds:8.1f}  ({seconds / CHAPTER_BUDGET:.0%} of budget){flag}")
    print(f"{'whole book':32s} {total:8.1f}  ({total / BOOK_BUDGET:.0%} of {BOOK_BUDGET:.0f} s)")
    return 1 if over or total > BOOK_BUDGET else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
