"""The one source of random seeds for every experiment in the book.

Every stochastic result (initialisation, data, training order) draws its seeds from
``seeds(n)``. The environment variable ``DEPTHLAB_SEED_OFFSET`` (default 0) shifts them all, so
``DEPTHLAB_SEED_OFFSET=3`` re-runs a chapter on seeds it has never used: ``tasks.py audit`` does
exactly that and checks that no verdict changes.

Offset k gives seeds ``k·1000, k·1000 + 1, ...``: different offsets never share a seed (as long
as no experiment asks for more than 1000), so an audit is a real replication, not a re-run of
mostly the same seeds. Introduced in chapter 0.
"""

from __future__ import annotations

import os

OFFSET_ENV = "DEPTHLAB_SEED_OFFSET"
STRIDE = 1000      # seeds per offset: offset k owns k·STRIDE .. k·STRIDE + STRIDE - 1


def seed_offset() -> int:
    """The offset read from ``DEPTHLAB_SEED_OFFSET`` (0 when unset or empty)."""
    raw = os.environ.get(OFFSET_ENV, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{OFFSET_ENV}={raw!r} must be a whole number >= 0") from None
    if value < 0:
        raise ValueError(f"{OFFSET_ENV}={raw!r} must be a whole number >= 0")
    return value


def seeds(n: int) -> list[int]:
    """``n`` seeds for one experiment: ``[k·1000, ..., k·1000 + n - 1]`` for offset k.

    Ask for as many as the finding needs (the book uses at least 3 for every stochastic
    finding) and use them for everything that experiment draws.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= STRIDE:
        raise ValueError(f"seeds(n) needs 1 <= n <= {STRIDE}, got {n!r}")
    base = STRIDE * seed_offset()
    return [base + i for i in range(n)]


def default_seed() -> int:
    """The seed used when a model, task or training run is given none: ``seeds(1)[0]``."""
    return seeds(1)[0]
