import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture(autouse=True)
def _no_ledger(monkeypatch):
    """Unit tests never write the book's ledger; tests that need one set their own path.
    They also run on the default seeds unless they set an offset themselves."""
    monkeypatch.delenv("DEPTHLAB_LEDGER", raising=False)
    monkeypatch.delenv("DEPTHLAB_SEED_OFFSET", raising=False)


@pytest.fixture(scope="session")
def executed():
    """Every chapter run once by nbval (two at a time) into the book's cache: {stem: Result}."""
    import execute

    return {r.chapter: r for r in execute.execute()}


@pytest.fixture(scope="session")
def book(executed):
    """The website built with -W from the executed chapters (nothing executes again)."""
    jb = Path(sys.executable).with_name("jupyter-book")
    return subprocess.run([str(jb), "build", ".", "-W", "-n", "--keep-going"], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.fixture(scope="session")
def pdfs(book):
    """The book's PDFs printed from the built site (tools/pdf.py, as tasks.py book does):
    the book's PDF, or the build's log when the site did not build."""
    import pdf

    assert book.returncode == 0, (book.stdout + book.stderr)[-3000:]
    # its own process, as tasks.py book runs it (and Playwright's sync API cannot start inside
    # the browser another test module holds open)
    made = subprocess.run([sys.executable, str(ROOT / "tools" / "pdf.py")], cwd=ROOT,
                          capture_output=True, text=True)
    assert made.returncode == 0, (made.stdout + made.stderr)[-3000:]
    return pdf.HTML / "pdf" / pdf.BOOK_PDF
