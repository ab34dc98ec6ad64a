import pytest


@pytest.fixture(autouse=True)
def _no_ledger(monkeypatch):
    """Unit tests never write the book's ledger; tests that need one set their own path.
    They also run on the default seeds unless they set an offset themselves."""
    monkeypatch.delenv("DEPTHLAB_LEDGER", raising=False)
    monkeypatch.delenv("DEPTHLAB_SEED_OFFSET", raising=False)
