import pytest


@pytest.fixture(autouse=True)
def _no_ledger(monkeypatch):
    """Unit tests never write the book's ledger; tests that need one set their own path."""
    monkeypatch.delenv("DEPTHLAB_LEDGER", raising=False)
