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
