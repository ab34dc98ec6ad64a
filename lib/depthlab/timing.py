"""Timing that can be compared: functions timed interleaved, as ratios, on any device.

Absolute times on a shared machine drift from minute to minute; functions timed in turn, round
after round, see the same load, so their *ratio* is the number to report (chapter 3). On a GPU
kernels run asynchronously: the clock is read only after ``torch.cuda.synchronize()``, or it
would time the launch and not the work.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None \
            and torch.backends.mps.is_available():
        torch.mps.synchronize()


def compare_times(fns: dict[str, Callable[[], object]], repeats: int = 200,
                  rounds: int = 5, *, backward: bool = False,
                  threads: int | None = 1) -> dict[str, float]:
    """Seconds per call of each function in its fastest round, measured interleaved.

    Each round times ``repeats`` calls of every function in turn, so that load on the machine
    hits all of them alike, and each function keeps its fastest round: load only ever slows a
    round down. ``threads`` torch threads (default 1; None keeps the current setting): with
    two threads on a busy 2-core machine every operation waits for its slower thread, and
    RMSNorm's ratio to LayerNorm came out anywhere in 0.6-1.2 (median of rounds), against
    0.60-0.72 on one. Compare the results as ratios, measured in the same run (chapter 3).
    With ``backward=True`` each function returns a tensor and the time includes
    ``.sum().backward()`` on it (a forward and backward pass). Waits for queued GPU work
    before reading the clock.
    """
    if backward:
        fns = {name: (lambda f=fn: f().sum().backward()) for name, fn in fns.items()}

    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch_threads(threads) if threads else contextlib.nullcontext():
        for fn in fns.values():                               # warm-up
            fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                _synchronize()
                start = time.perf_counter()
                for _ in range(repeats):
                    fn()
                _synchronize()
                times[name].append((time.perf_counter() - start) / repeats)
    return {name: min(t) for name, t in times.items()}
