#!/usr/bin/env python3
"""The book's two commands. Needs only Python 3.10+ on the machine.

    python3 tasks.py book    build the website into _build/html, and its PDFs (_build/html/pdf)
    python3 tasks.py test    run every test (unit tests, notebooks, book build, browser, lint)

Both run each chapter once with nbval (tools/execute.py: pytest --nbval-lax, two chapters at a
time, the executed notebooks into the book's cache); the build and the tests then use those
runs.

Both create the virtual environment ``.venv`` from requirements.txt on first use (and again
whenever requirements.txt or pyproject.toml changes). ``test`` also installs Debian's chromium
with apt-get when it is missing and you are root. Extra arguments after ``test`` go to pytest,
e.g. ``python3 tasks.py test -k claims``.

For authors: the seed audit re-runs every chapter under other seed offsets and prints each
claim's verdict per offset (see tools/audit.py):

    python3 tasks.py audit [--offsets 1 2 3 4 5] [--chapters 02 05]

For teachers (see the book's Instructor guide and tools/coursework.py):

    python3 tasks.py assign 03 05 --to handout/       student versions of chapters 3 and 5
    python3 tasks.py grade submissions/ --to grades.csv   scores per student and exercise
    python3 tasks.py book --no-solutions              the website without any solution

For authors, after editing a chapter: ``python3 tasks.py colab`` regenerates colab/, the
notebooks the Colab buttons open (a test fails while they are stale).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / "requirements.sha256"


def run(*cmd: str | Path, **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kwargs)


def ensure_venv() -> None:
    """Create .venv and install requirements.txt, unless it is already up to date."""
    if sys.version_info < (3, 10):  # noqa: UP036 (this script may run on an older python3)
        sys.exit("Python 3.10 or newer is needed")
    want = hashlib.sha256(
        (ROOT / "requirements.txt").read_bytes() + (ROOT / "pyproject.toml").read_bytes()
    ).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == want:
        return
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(BIN / "python", "-m", "pip", "install", "--quiet", "-r", "requirements.txt")
    STAMP.write_text(want)


def ensure_chromium(required: bool = True) -> bool:
    """The browser tests and the PDFs use Debian's chromium (never a browser downloaded by a
    test tool). Installs it with apt-get when root; otherwise exits (or, not ``required``,
    returns False)."""
    if shutil.which("chromium"):
        return True
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        run("apt-get", "update", "-qq")
        run("apt-get", "install", "-y", "-qq", "chromium")
        return True
    if not required:
        return False
    sys.exit("chromium is missing: install Debian's package 'chromium' (apt-get install "
             "chromium) and run the tests again")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["VIRTUAL_ENV"] = str(VENV)
    return e


def book(args: list[str] = ()) -> None:
    ensure_venv()
    e = env()
    if "--no-solutions" in args:          # a course's site: see _ext/depthlab_book.py
        e["DEPTHLAB_NO_SOLUTIONS"] = "1"
    else:
        e.pop("DEPTHLAB_NO_SOLUTIONS", None)
    # Run the chapters with nbval (two at a time) into the build's cache, then build: the
    # build finds every chapter in the cache and executes nothing twice.
    run(BIN / "python", "-c", "import sys; sys.path.insert(0, 'tools'); import execute; "
        "sys.exit(any(r.error for r in execute.execute()))", env=env())
    run(BIN / "jupyter-book", "build", ".", "-W", "-n", "--keep-going", env=e)
    # The PDFs (one per chapter, and the book's), printed from the built pages by chromium:
    # about 40 s on two cores, so always (tools/pdf.py).
    if ensure_chromium(required=False):
        run(BIN / "python", ROOT / "tools" / "pdf.py", env=e)
    else:
        print("chromium is missing (apt-get install chromium): the website's PDF links "
              "lead nowhere until tools/pdf.py runs")
    print(f"website: {ROOT / '_build' / 'html' / 'index.html'}"
          + (" (no solutions)" if "DEPTHLAB_NO_SOLUTIONS" in e else ""))


def test(pytest_args: list[str]) -> None:
    ensure_venv()
    ensure_chromium()
    run(BIN / "ruff", "check", ".", env=env())
    # One pytest session: unit tests; every chapter run once by nbval (tools/execute.py:
    # pytest --nbval-lax per chapter, two at a time) and checked cell by cell; the -W book
    # build from those same runs; the browser check of the built site; the Colab-pins
    # environment; the coursework grading.
    run(BIN / "python", "-m", "pytest", "tests", *pytest_args, env=env())


def audit(args: list[str]) -> None:
    ensure_venv()
    run(BIN / "python", ROOT / "tools" / "audit.py", *args, env=env())


def coursework(command: str, args: list[str]) -> None:
    """``assign`` and ``grade``: tools/coursework.py, run inside .venv (see its docstring)."""
    ensure_venv()
    run(BIN / "python", ROOT / "tools" / "coursework.py", command, *args, env=env())


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in {"book", "test", "audit", "assign", "grade", "colab"}:
        sys.exit(__doc__)
    if argv[0] == "book":
        book(argv[1:])
    elif argv[0] == "colab":
        ensure_venv()
        run(BIN / "python", ROOT / "tools" / "notebooks.py", env=env())
    elif argv[0] == "test":
        test(argv[1:])
    elif argv[0] == "audit":
        audit(argv[1:])
    else:
        coursework(argv[0], argv[1:])


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except subprocess.CalledProcessError as failed:          # its output says what went wrong
        sys.exit(failed.returncode)
