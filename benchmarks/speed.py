"""Many small runs: one by one, in two processes, or stacked into groups, measured side by side.

The book trains many tiny models that share an architecture and differ in a seed or a learning
rate. For each model size below, 15 runs (5 learning rates × 3 seeds, ``--steps`` steps each)
are trained every way depthlab can train them, timed interleaved (every way once per round,
``--rounds`` rounds, median), and reported per model-step and as a speed-up over the plain
loop with one thread:

- loop, 1 thread / 2 threads: ``dl.train`` one run after another;
- 2 processes: ``dl.sweep`` over two worker processes, one thread each;
- group, 1 thread / 2 threads: ``dl.train_group`` on all 15 at once (stacked parameters);
- group in 2 processes: ``dl.train_runs(group="always")``, two groups of 7-8, one per core.

It also measures one core's matmul peak (float32, 1 thread) and reports each model's training
arithmetic rate (6 FLOPs per parameter per input position, forward and backward) as a fraction
of it: near 1 a step is arithmetic and nothing but fewer FLOPs helps; far below 1 it is
PyTorch's fixed cost per operation, which grouping removes. ``sweeps.GROUP_BELOW_FLOPS`` (where
``train_grid`` starts grouping on a CPU) is set from this table.

Run from the repository root: ``.venv/bin/python benchmarks/speed.py`` (about 6 minutes on 2
idle cores; ``--quick`` for two sizes and one round).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import depthlab as dl
from depthlab.sweeps import Run, run_flops, sweep, train_runs, usable_cores
from depthlab.timing import torch_threads

SIZES = {   # name: (model config, data source factory)
    "transformer w16 × 6": (dl.TransformerConfig(d_model=16, n_heads=2, n_layers=6,
                                                 vocab_size=16, max_len=16), "sort"),
    "transformer w32 × 6": (dl.TransformerConfig(d_model=32, n_heads=4, n_layers=6,
                                                 vocab_size=16, max_len=16), "sort"),
    "transformer w64 × 4": (dl.TransformerConfig(d_model=64, n_heads=4, n_layers=4,
                                                 vocab_size=16, max_len=16), "sort"),
    "MLP 64-128×3 (digits)": (dl.MLPConfig(width=128, depth=3, norm_kind="layer"), "digits"),
}
LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SEEDS = (0, 1, 2)


def matmul_peak(n: int = 512, repeats: int = 20) -> float:
    """float32 GFLOP/s of one core on an n × n matmul (median of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = []
    with torch_threads(1):
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def _runs(size: str, steps: int) -> list[Run]:
    cfg, task = SIZES[size]
    out = []
    for lr in LRS:
        for s in SEEDS:
            model = (dl.SequenceModel(cfg, seed=s) if isinstance(cfg, dl.TransformerConfig)
                     else dl.DeepMLP(cfg, seed=s))
            data = (dl.SequenceTask("sort", n=6, batch_size=32, seed=s) if task == "sort"
                    else dl.Digits(batch_size=64, seed=s))
            out.append(Run(model, data, dl.TrainConfig(steps=steps, lr=lr, seed=s,
                                                       progress=False, device="cpu")))
    return out


def _ways(size: str, steps: int) -> dict:
    def loop(threads):
        with torch_threads(threads):
            for r in _runs(size, steps):
                dl.train(r.model, r.data, r.cfg)

    def processes():
        sweep(lambda r: dl.train(r.model, r.data, r.cfg).final("loss"), _runs(size, steps),
              workers=2)

    def group(threads):
        runs = _runs(size, steps)
        with torch_threads(threads):
            dl.train_group([r.model for r in runs], [r.data for r in runs],
                           [r.cfg for r in runs])

    return {"loop, 1 thread": lambda: loop(1), "loop, 2 threads": lambda: loop(2),
            "2 processes": processes, "group, 1 thread": lambda: group(1),
            "group, 2 threads": lambda: group(2),
            "group in 2 processes": lambda: train_runs(_runs(size, steps), group="always",
                                                       workers=2)}


def compare(size: str, steps: int, rounds: int, peak: float) -> None:
    ways = _ways(size, steps)
    for fn in ways.values():                                   # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(rounds):
        for k, fn in ways.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    model_steps = len(LRS) * len(SEEDS) * steps
    flops = run_flops(_runs(size, 1)[0])
    base = med["loop, 1 thread"]
    arith = flops / (base / model_steps) / 1e9
    print(f"\n{size}: {flops / 1e6:.0f} MFLOP per step; the plain loop does {arith:.1f} "
          f"GFLOP/s = {arith / peak:.0%} of one core's matmul peak")
    print(f"   {'way':22s} {'ms per model-step':>18s} {'speed-up':>9s}")
    for k, t in med.items():
        print(f"   {k:22s} {1e3 * t / model_steps:18.2f} {base / t:9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    peak = matmul_peak()
    print(f"torch {torch.__version__}, {usable_cores()} usable cores; one core's float32 "
          f"matmul peak: {peak:.1f} GFLOP/s (512 × 512, 1 thread)")
    sizes = list(SIZES)[1:3] if args.quick else list(SIZES)
    for size in sizes:
        compare(size, args.steps, 1 if args.quick else args.rounds, peak)


if __name__ == "__main__":
    main()
