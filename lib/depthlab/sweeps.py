"""Many runs at once: ``sweep`` for any function, ``train_grid`` for training runs.

``sweep(fn, points)`` is ``[fn(p) for p in points]`` spread over the machine:

- under ``torchrun`` (several processes), rank r takes points r, r + W, r + 2W, ... on its own
  device, each trained alone (``distributed.alone``), and every rank gets all results back
  (the chapters' large settings; see the README's "Running at scale");
- on Linux with more than one usable core, forked worker processes, one per core, each with one
  torch thread (the way PyTorch's DataLoader starts its workers): they inherit everything the
  notebook defined, so ``fn`` may be a lambda or a closure, and only its result travels back;
- otherwise a plain loop in this process: macOS, Windows, one core, ``DEPTHLAB_WORKERS=1``,
  inside a worker already, and **whenever this process has initialised CUDA** (a forked child
  cannot use CUDA at all: "Cannot re-initialize CUDA in forked subprocess").

The book's models are tiny, so one run barely uses a second CPU core, and two runs that each
ask for two threads slow each other down many times over: one run per core, one thread per
run, is the fast way to use a CPU. Every path runs ``fn`` with the same number of torch threads
(``threads``, default 1), so the floating-point results are the same whichever path ran.

``train_grid(make, points, seeds)`` trains "this grid of runs over these seeds" and returns
``{point: [result per seed]}``. It also trains runs together where that pays: runs that share
a structure are stacked into groups (``training.train_group``), on a GPU always, on a CPU for
the small models where PyTorch's fixed cost per operation dominates (``GROUP_BELOW_FLOPS``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from .config import TrainConfig
from .devices import cuda_in_use, pick_device
from .distributed import alone, init_distributed
from .grouped import structure
from .timing import torch_threads
from .training import (
    Callback,
    DataSource,
    History,
    group_obstacle,
    lr_scales,
    step_flops,
    train,
    train_group,
)

P = TypeVar("P")
R = TypeVar("R")
WORKERS_ENV = "DEPTHLAB_WORKERS"

# What a forked worker runs; set in the worker only (by its initializer), never in the parent
_TASK: tuple[Callable, Sequence] | None = None
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


def _can_fork() -> bool:
    """True where ``sweep`` may fork workers: Linux, and CUDA not initialised here."""
    return (sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()
            and not cuda_in_use())


def _worker_start(threads: int, fn: Callable, points: Sequence) -> None:
    """In a freshly forked worker: the task, one torch thread, no progress bars, no output to
    the notebook (the parent's output streams belong to the kernel's threads, absent here)."""
    global _IN_WORKER, _TASK
    _IN_WORKER = True
    _TASK = (fn, points)
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
    plain loop here, as does a process that has initialised CUDA. ``threads``: torch threads
    for each call, in every path. Results come back in the order of ``points``; an exception
    in ``fn`` is raised here with the worker's traceback. Each call must be independent of the
    others (its own seeds, its own model).
    """
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

    with warnings.catch_warnings():
        # Python >= 3.12 warns when forking a process that has threads (a notebook kernel
        # always has). The workers never touch the kernel's threads or streams.
        warnings.filterwarnings("ignore", message=".*multi-threaded.*fork",
                                category=DeprecationWarning)
        with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("fork"),
                                 initializer=_worker_start,
                                 initargs=(threads, fn, points)) as pool:
            outcomes = list(pool.map(_run_index, range(len(points))))
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
    dist = torch.distributed
    mine, failed = [], None
    with alone(), torch_threads(threads):
        for i in range(rank, len(points), world):
            try:
                mine.append((i, fn(points[i])))
            except BaseException:              # tell every rank, never leave one waiting
                failed = (i, traceback.format_exc())
                break
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


# --------------------------------------------------------------------------------------------
# Training runs: a grid of them over seeds, grouped where that pays
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run: the model, its data, its settings and the callbacks that watch it.
    ``train_grid`` fills in ``history`` and trains ``model`` in place."""

    model: nn.Module
    data: DataSource
    cfg: TrainConfig
    callbacks: list[Callback] = field(default_factory=list)
    history: History | None = None


# On a CPU a group pays where PyTorch's fixed cost per operation dominates a step, i.e. for
# models whose step is little arithmetic. Measured in benchmarks/speed.py (one thread, 15 runs
# of 5 learning rates × 3 seeds): a group of Pre-LN transformers of width 16-32 ran ×1.4-1.6
# faster per run than the same runs one by one; at width 64 (about 4e8 FLOPs per step) ×1.0-1.1.
GROUP_BELOW_FLOPS = 2e8


def run_flops(run: Run) -> float:
    """Arithmetic of one training step of ``run`` (``training.step_flops``)."""
    return step_flops(run.model, run.data.batch(0))


def _group_key(run: Run):
    """Runs with equal keys may share one group (``training.group_obstacle`` decides)."""
    key = structure(run.model)
    if key is None:
        return None
    x, y = run.data.batch(0)
    c = run.cfg
    return (key, lr_scales(run.model), tuple(x.shape), x.dtype, tuple(y.shape), c.optimizer,
            c.betas, c.eps, c.momentum, c.steps, c.amp, c.device, c.sync_every)


def _tasks(runs: list[Run], group: str, workers: int) -> list[list[int]]:
    """The indices of ``runs`` split into tasks: each a group trained together, or one run."""
    if group not in ("auto", "always", "never"):
        raise ValueError(f"group={group!r}; choose 'auto', 'always' or 'never'")
    by_key: dict[Any, list[int]] = {}
    singles: list[list[int]] = []
    for i, run in enumerate(runs):
        key = None if group == "never" else _group_key(run)
        if key is not None and group == "auto":
            on_gpu = pick_device(run.cfg.device).type == "cuda"
            if not on_gpu and run_flops(run) >= GROUP_BELOW_FLOPS:
                key = None
        # judged as the sweep will train it: under torchrun each task trains on one rank,
        # alone (a group is refused only where one run would be split over the processes)
        with alone():
            why = key is None or group_obstacle([run.model, run.model], [run.cfg, run.cfg],
                                                [run.callbacks, run.callbacks])
        if why:
            singles.append([i])
        else:
            by_key.setdefault(key, []).append(i)
    tasks = []
    for members in by_key.values():
        if len(members) == 1:
            tasks.append(members)
            continue
        # On a CPU, split a group over the workers so that every core has a share
        parts = 1 if pick_device(runs[members[0]].cfg.device).type == "cuda" else workers
        parts = max(1, min(parts, len(members) // 2))
        tasks += [members[k::parts] for k in range(parts)]
    return tasks + singles


def train_runs(runs: Sequence[Run], *, keep: Callable[[Run], R] | None = None,
               group: str = "auto", workers: int | None = None) -> list:
    """Train every run (in place: each ``run.history`` is filled) and return ``keep(run)``
    for each, in order (default: the Run itself).

    ``group``: "auto" trains runs that share a structure as groups where that pays (on a GPU,
    or small models on a CPU, see ``GROUP_BELOW_FLOPS``), "always" wherever allowed, "never"
    one by one. Every run's History is the one ``dl.train`` would give, to float32 round-off.
    Groups and single runs are spread over the cores with ``sweep``; ``keep`` runs where the
    run trained (in a worker process its result is what travels back).
    """
    runs = list(runs)
    keep = keep or (lambda run: run)
    n_workers = default_workers() if workers is None else workers
    tasks = _tasks(runs, group, n_workers if _can_fork() else 1)
    if any(len(task) > 1 for task in tasks):
        # A heavy import, done here on purpose: a group's first step imports sympy (vmap's
        # cross-entropy goes through torch's symbolic shapes), 0.5 s. Imported once in this
        # process, every worker that sweep forks inherits it, instead of each worker of each
        # train_grid call importing it again.
        import torch.fx.experimental.symbolic_shapes  # noqa: F401

    def do(task: list[int]) -> list:
        members = [runs[i] for i in task]
        if len(members) == 1:
            r = members[0]
            r.history = train(r.model, r.data, r.cfg, r.callbacks)
        else:
            hists = train_group([r.model for r in members], [r.data for r in members],
                                [r.cfg for r in members], [r.callbacks for r in members])
            for r, h in zip(members, hists):
                r.history = h
        return [(i, keep(r)) for i, r in zip(task, members)]

    out: list = [None] * len(runs)
    for part in sweep(do, tasks, workers=workers):
        for i, value in part:
            out[i] = value
    return out


def train_grid(make: Callable[..., Run], points: Sequence[P], seeds: Sequence[int] | None = None,
               *, keep: Callable[[Run], R] | None = None, group: str = "auto",
               workers: int | None = None) -> dict:
    """Train the run ``make(point, seed)`` for every point and seed (or ``make(point)`` when
    ``seeds`` is None) and return ``{point: [keep(run) per seed]}`` (or ``{point: keep(run)}``).

    The one helper behind "this grid of runs over the seeds" in every chapter::

        def run(point, seed):
            name, lr = point
            return dl.Run(dl.SequenceModel(CONFIGS[name], seed=seed), task(seed),
                          TRAIN.replace(lr=lr, seed=seed))

        results = dl.train_grid(run, [(n, lr) for n in CONFIGS for lr in LRS], SEEDS)
        final = {p: [r.history.final("loss") for r in runs] for p, runs in results.items()}

    ``keep(run)`` reduces a trained run to what the chapter needs (it runs where the run
    trained); by default the whole Run comes back. Grouping and processes: ``train_runs``.
    Points must be usable as dictionary keys.
    """
    points = list(points)
    if seeds is None:
        runs = [make(p) for p in points]
    else:
        seeds = list(seeds)
        runs = [make(p, s) for p in points for s in seeds]
    for r in runs:
        if not isinstance(r, Run):
            raise TypeError(f"train_grid: make(...) must return a dl.Run, got {type(r).__name__}")
    results = train_runs(runs, keep=keep, group=group, workers=workers)
    if seeds is None:
        return dict(zip(points, results))
    k = len(seeds)
    return {p: results[i * k:(i + 1) * k] for i, p in enumerate(points)}
