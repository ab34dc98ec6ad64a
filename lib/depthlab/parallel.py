"""Both cores (or every GPU of a cluster) for independent runs: ``sweep``.

The book's models are tiny, so one training run barely uses a second CPU core (a second torch
thread bought 8 % here), and two runs that each ask for two threads slow each other down many
times over. The fast way to use a machine is one run per core, one torch thread per run:
``sweep(fn, points)`` calls ``fn(point)`` for every point in worker processes and returns the
results in the order of ``points``, exactly as a plain loop would (a test checks it).

How the work is spread, in this order:

- under ``torchrun`` (several processes; ``init_distributed`` joins them), rank r takes points
  r, r + W, r + 2W, ... on its own device, and every rank gets all results back (the chapters'
  large settings; see the README's "Running at scale"). Each rank trains its points alone:
  ``dl.train`` inside such a sweep does not use DistributedDataParallel;
- on Linux with more than one usable core, forked worker processes (the way PyTorch's
  DataLoader starts its workers): they inherit everything the notebook defined, so ``fn`` may
  be a lambda or a closure, and only its result travels back (pickled);
- otherwise (macOS, Windows, one core, ``DEPTHLAB_WORKERS=1``, or already inside a worker) a
  plain loop in this process.

Every path runs ``fn`` with the same number of torch threads (``threads``, default 1), so the
floating-point results are the same whichever path ran.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

P = TypeVar("P")
R = TypeVar("R")
WORKERS_ENV = "DEPTHLAB_WORKERS"

_TASK: tuple[Callable, Sequence] | None = None     # what forked workers inherit
_IN_WORKER = False


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                                   # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """``DEPTHLAB_WORKERS`` if set, else one worker per usable core; 1 inside a worker."""
    if _IN_WORKER:
        return 1
    raw = os.environ.get(WORKERS_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{WORKERS_ENV}={raw!r} must be a whole number >= 1") from None
        if value < 1:
            raise ValueError(f"{WORKERS_ENV}={raw!r} must be a whole number >= 1")
        return value
    return usable_cores()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_INDEPENDENT = False    # True while a distributed sweep runs one of this rank's points


def init_distributed() -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes, once: (rank, world size).

    torchrun (also under SLURM, on several nodes) starts one process per GPU or CPU slot and
    sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``; it does not join them.
    This joins with the NCCL backend where CUDA is available and gloo elsewhere, and puts each
    process on GPU ``LOCAL_RANK`` of its node. Outside torchrun (no ``WORLD_SIZE`` > 1 in the
    environment) it does nothing and returns (0, 1). See the README's "Running at scale".
    """
    dist = torch.distributed
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
            return 0, 1
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def data_parallel_world() -> tuple[int, int]:
    """(rank, world size) for one training run split over the processes: ``dl.train`` uses
    DistributedDataParallel when the world is larger than 1. Inside a distributed ``sweep``
    every rank trains its own points alone, so there the world is (0, 1)."""
    if _INDEPENDENT:
        return 0, 1
    return init_distributed()


def _can_fork() -> bool:
    import multiprocessing as mp

    return sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()


def _worker_start(threads: int) -> None:
    """In a freshly forked worker: one torch thread, no progress bars, no output to the
    notebook (the parent's output streams belong to the kernel's threads, absent here)."""
    global _IN_WORKER
    _IN_WORKER = True
    torch.set_num_threads(threads)
    os.environ["DEPTHLAB_QUIET"] = "1"
    devnull = open(os.devnull, "w")                            # noqa: SIM115 (for the process)
    sys.stdout = sys.stderr = devnull


def _run_index(i: int) -> tuple[bool, Any]:
    """Run task i of the inherited sweep; (True, result) or (False, formatted traceback)."""
    fn, points = _TASK  # type: ignore[misc]
    try:
        return True, fn(points[i])
    except BaseException:                                      # report, never hang the pool
        return False, traceback.format_exc()


def sweep(fn: Callable[[P], R], points: Sequence[P], *, workers: int | None = None,
          threads: int = 1) -> list[R]:
    """``[fn(p) for p in points]``, spread over worker processes (or torchrun ranks).

    ``workers``: processes to use (default: ``default_workers()``, one per core); 1 runs a
    plain loop here. ``threads``: torch threads for each call, in every path. Results come
    back in the order of ``points``; an exception in ``fn`` is raised here with the worker's
    traceback. Each call must be independent of the others (its own seeds, its own model).
    """
    global _TASK
    points = list(points)
    if not points:
        return []
    rank, world = init_distributed()
    if world > 1:
        return _sweep_distributed(fn, points, rank, world, threads)
    n = min(default_workers() if workers is None else workers, len(points))
    if n <= 1 or _IN_WORKER or not _can_fork():
        with torch_threads(threads):
            return [fn(p) for p in points]

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    _TASK = (fn, points)
    try:
        with warnings.catch_warnings():
            # Python >= 3.12 warns when forking a process that has threads (a notebook kernel
            # always has). The workers never touch the kernel's threads or streams.
            warnings.filterwarnings("ignore", message=".*multi-threaded.*fork",
                                    category=DeprecationWarning)
            with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("fork"),
                                     initializer=_worker_start, initargs=(threads,)) as pool:
                outcomes = list(pool.map(_run_index, range(len(points))))
    finally:
        _TASK = None
    results = []
    for i, (ok, value) in enumerate(outcomes):
        if not ok:
            raise RuntimeError(f"sweep: fn failed on point {i} ({points[i]!r}) in a worker "
                               f"process:\n{value}")
        results.append(value)
    return results


def _sweep_distributed(fn: Callable, points: list, rank: int, world: int,
                       threads: int) -> list:
    """Each rank runs points rank, rank + world, ...; all ranks receive every result."""
    global _INDEPENDENT
    dist = torch.distributed
    mine, failed = [], None
    _INDEPENDENT = True
    try:
        with torch_threads(threads):
            for i in range(rank, len(points), world):
                try:
                    mine.append((i, fn(points[i])))
                except BaseException:              # tell every rank, never leave one waiting
                    failed = (i, traceback.format_exc())
                    break
    finally:
        _INDEPENDENT = False
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (mine, failed))
    results: list = [None] * len(points)
    for r, (part, fail) in enumerate(gathered):
        if fail is not None:
            raise RuntimeError(f"sweep: fn failed on point {fail[0]} ({points[fail[0]]!r}) on "
                               f"rank {r}:\n{fail[1]}")
        for i, value in part:
            results[i] = value
    return results
