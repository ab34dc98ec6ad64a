"""Seed ensembles and parallel sweeps against plain loops, measured side by side in one run.

Prints, as ratios (loop time ÷ faster time, > 1 means faster), each measured interleaved
(A, B, A, B, ...) and reported as the median of ``--rounds`` rounds:

1. N seeds of one transformer configuration (6 blocks, batch 32 × 12 tokens, Adam, 40 steps):
   a plain loop (one torch thread, and two) against the vmap seed ensemble and against one
   worker process per core, for N = 2, 4, 8 at widths 32 and 64;
2. a 16-run sweep (4 learning rates × 4 seeds) in a loop against ``parallel.sweep``;
3. with ``--profile``, where the time of one vmapped ensemble step goes (torch.profiler).

Run from the repository root: ``.venv/bin/python benchmarks/speed.py`` (about 5 minutes on
2 cores; ``--quick`` for one width and N = 4). Chapter times against their budget:
``benchmarks/budget.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import depthlab as dl  # noqa: E402
from depthlab.ensemble import train_seeds  # noqa: E402
from depthlab.parallel import sweep, torch_threads, usable_cores  # noqa: E402

STEPS = 40


def _setup(width: int):
    cfg = dl.TransformerConfig(d_model=width, n_heads=4, n_layers=6, vocab_size=16,
                               max_len=16)
    tc = dl.TrainConfig(steps=STEPS, lr=1e-3, progress=False)

    def build(s):
        return dl.SequenceModel(cfg, seed=s)

    def data(s):
        return dl.SequenceTask("sort", n=6, batch_size=32, seed=s)

    return build, data, tc


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(fns: dict, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():                                   # warm-up
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_time(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def _compare(width: int, n: int, rounds: int) -> dict[str, float]:
    build, data, tc = _setup(width)
    seeds = list(range(n))

    def loop(threads):
        with torch_threads(threads):
            for s in seeds:
                dl.train(build(s), data(s), tc.replace(seed=s))

    return _interleaved({
        "loop1": lambda: loop(1),
        "loop2": lambda: loop(2),
        "vmap": lambda: train_seeds(build, data, tc, seeds, method="vmap"),
        "proc": lambda: train_seeds(build, data, tc, seeds, method="processes"),
    }, rounds)


def ensembles(widths, sizes, rounds: int) -> None:
    print(f"1. N seeds, 6 blocks, {STEPS} steps: seconds (median of {rounds}) and speed-up")
    print(f"   {'width':>5} {'N':>2} {'loop 1 thr':>10} {'loop 2 thr':>10} {'vmap':>8} "
          f"{'processes':>9}   vmap ÷ loop1  processes ÷ loop1")
    for width in widths:
        for n in sizes:
            t = _compare(width, n, rounds)
            print(f"   {width:>5} {n:>2} {t['loop1']:>10.2f} {t['loop2']:>10.2f} "
                  f"{t['vmap']:>8.2f} {t['proc']:>9.2f}   {t['loop1'] / t['vmap']:>11.2f}  "
                  f"{t['loop1'] / t['proc']:>16.2f}")


def sweeps(rounds: int) -> None:
    build, data, tc = _setup(32)
    points = [(lr, s) for lr in (3e-4, 1e-3, 3e-3, 1e-2) for s in range(4)]

    def one(point):
        lr, s = point
        return dl.train(build(s), data(s), tc.replace(lr=lr, seed=s)).final("loss")

    t = _interleaved({"loop": lambda: sweep(one, points, workers=1),
                      "parallel": lambda: sweep(one, points)}, rounds)
    same = sweep(one, points, workers=1) == sweep(one, points)
    print(f"2. 16-run sweep: loop {t['loop']:.2f} s, {usable_cores()} worker processes "
          f"{t['parallel']:.2f} s: speed-up {t['loop'] / t['parallel']:.2f} "
          f"(results identical: {same})")


def profile() -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    build, data, tc = _setup(32)
    with torch_threads(1), prof(activities=[ProfilerActivity.CPU]) as p:
        train_seeds(build, data, tc.replace(steps=10), range(4), method="vmap")
    print("3. where a vmapped 4-member ensemble spends its time (10 steps, 1 thread):")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {usable_cores()} usable cores")
    if args.quick:
        ensembles([32], [4], args.rounds)
    else:
        ensembles([32, 64], [2, 4, 8], args.rounds)
    sweeps(args.rounds)
    if args.profile:
        profile()


if __name__ == "__main__":
    main()
