"""Shared test settings: quiet, static explorers, and a private claims ledger per session."""

import os

import pytest

os.environ.setdefault("DEPTHLAB_QUIET", "1")
os.environ.setdefault("DEPTHLAB_STATIC", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _no_ledger(monkeypatch):
    """Unit tests never write the book's ledger; tests that need one set their own path."""
    monkeypatch.delenv("DEPTHLAB_LEDGER", raising=False)
