"""Chapters' experiments at any scale, from the command line: ``python -m depthlab.experiments``.

A chapter's ``SCALE = "gpu"`` settings outgrow one machine quickly (chapter 5's learning-rate
map at width 512 is 3 learning rates × 3 blocks × 3 seeds × 2000 steps). The same experiments
run here outside the notebook, on every process ``torchrun`` starts, and write one JSON file
that the chapter reads back with ``load`` and draws::

    python -m depthlab.experiments lr-map --scale cpu --out lr-map-cpu.json
    torchrun --nproc-per-node 8 -m depthlab.experiments lr-map --scale gpu --out lr-map-gpu.json
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m depthlab.experiments xiong-profile --scale gpu --out xiong-gpu.json

The learning-rate map's runs are trained by ``dl.train_grid`` and the profiles measured by
``dl.sweep``, both spread over the processes (torchrun's ranks, each on its own GPU; without
torchrun, one process per core, small models grouped), so the records are the same however
many processes ran them; rank 0 writes the file. ``--set name=value`` changes one setting (a
JSON value), e.g. ``--set steps=500 --set 'lrs=[1e-3, 3e-3]'``. The seeds come from
``dl.seeds`` and follow ``DEPTHLAB_SEED_OFFSET``. ``SCALES`` is the one place these settings
are written: chapter 5 calls ``run`` itself, so the page and the command line run the same
experiment. Only the CPU path and 2 gloo processes are tested (see the README's "Running at
scale").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TrainConfig, TransformerConfig
from .data import SequenceTask
from .distributed import init_distributed
from .measure import gradient_profile
from .models import SequenceModel
from .seeding import seeds
from .sweeps import Run, sweep, train_grid
from .training import evaluate

# Chapter 5's settings for these two experiments, by experiment and scale (the chapter reads
# them from here: ``settings``).
SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "lr-map": {
        "cpu": dict(d_model=32, n_heads=4, depth=6, n=6, batch=32, steps=100, warmup=33,
                    lrs=[3e-3, 1e-2, 3e-2], seeds=3),
        "gpu": dict(d_model=512, n_heads=8, depth=6, n=8, batch=64, steps=2000, warmup=600,
                    lrs=[3e-4, 1e-3, 3e-3], seeds=3),
    },
    "xiong-profile": {
        "cpu": dict(d_model=64, n_heads=4, depths=[6, 12, 24, 48], n=6, probe_batch=32,
                    seeds=9),
        "gpu": dict(d_model=512, n_heads=8, depths=[6, 12, 24, 48], n=8, probe_batch=64,
                    seeds=9),
    },
}
# The three blocks of chapter 5's learning-rate map: norm placement, warm-up on or off.
LR_MAP_BLOCKS = {"Post-LN": ("post", False), "Post-LN + warm-up": ("post", True),
                 "Pre-LN": ("pre", False)}
# The blocks of the gradient profiles: norm placement, final norm on or off. Pre-LN without
# its final norm tests what makes Pre-LN's last-layer gradient shrink with depth (chapter 5).
PROFILE_BLOCKS = {"Post-LN": ("post", True), "Pre-LN": ("pre", True),
                  "Pre-LN, no final norm": ("pre", False)}
HELD_OUT = 256                     # held-out sequences per run of the learning-rate map


def model_config(s: dict, depth: int, placement: str,
                 final_norm: bool = True) -> TransformerConfig:
    """Chapter 5's model at the settings ``s``: Xavier initialisation, vocabulary 16, learned
    positions up to 16 (the chapter starts every model of its own from this one)."""
    return TransformerConfig(d_model=s["d_model"], n_heads=s["n_heads"], n_layers=depth,
                             vocab_size=16, max_len=2 * 8, init="xavier",
                             norm_placement=placement, final_norm=final_norm)


def sort_task(seed: int, n: int, batch: int) -> SequenceTask:
    """Chapter 5's task: sort n tokens of a vocabulary of 16, batches of ``batch``."""
    return SequenceTask("sort", n=n, vocab=16, batch_size=batch, seed=seed)


def _lr_map(s: dict, device: str) -> list[dict]:
    """Every run of the learning-rate map, as records in the order lr, block, seed."""
    def make(point: tuple, seed: int) -> Run:
        block, lr = point
        placement, warm = LR_MAP_BLOCKS[block]
        cfg = TrainConfig(device=device, steps=s["steps"], lr=lr,
                          warmup_steps=s["warmup"] if warm else 0, seed=seed)
        return Run(SequenceModel(model_config(s, s["depth"], placement), seed=seed),
                   sort_task(seed, s["n"], s["batch"]), cfg)

    def keep(run: Run) -> dict:                # runs where the run trained
        h = run.history
        return {"accuracy": float(evaluate(run.model, *run.data.eval_batch(HELD_OUT))["accuracy"]),
                "loss": [float(v) for v in h.loss], "grad_norm": [float(v) for v in h.grad_norm],
                "status": h.status}

    ids = seeds(s["seeds"])
    points = [(b, lr) for lr in s["lrs"] for b in LR_MAP_BLOCKS]
    trained = train_grid(make, points, ids, keep=keep)
    return [{"block": b, "lr": lr, "seed": seed, **rec}
            for b, lr in points for seed, rec in zip(ids, trained[(b, lr)])]


def _xiong_point(point: tuple) -> dict:
    s, block, depth, seed = point
    placement, final_norm = PROFILE_BLOCKS[block]
    cfg = model_config(s, depth, placement, final_norm)
    batch = sort_task(seed, s["n"], s["probe_batch"]).batch(0)
    p = gradient_profile(SequenceModel(cfg, seed=seed), batch, weight="mlp.fc2.weight")
    return {"block": block, "placement": placement, "final_norm": final_norm, "depth": depth,
            "seed": seed, "weight_grad_norm": [float(v) for v in p.weight_grad_norm],
            "stream_std": float(p.act_std[-1])}


def settings(experiment: str, scale: str, changes: dict | None = None) -> dict:
    """The settings of ``experiment`` at ``scale``, with ``changes`` applied (checked)."""
    if experiment not in SCALES:
        raise ValueError(f"unknown experiment {experiment!r}; choose one of {sorted(SCALES)}")
    if scale not in SCALES[experiment]:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES[experiment])}")
    s = dict(SCALES[experiment][scale])
    for name, value in (changes or {}).items():
        if name not in s:
            raise ValueError(f"{experiment} has no setting {name!r}; settings are {sorted(s)}")
        s[name] = value
    return s


def run(experiment: str, scale: str = "cpu", changes: dict | None = None, *,
        device: str = "auto") -> dict:
    """Run ``experiment`` ("lr-map" or "xiong-profile") over every process; the result
    ``{"experiment", "scale", "settings", "records"}`` (every rank gets it). ``device``: where
    the learning-rate map trains ("auto": CUDA when there is one; chapter 5 passes "cpu")."""
    s = settings(experiment, scale, changes)
    if experiment == "lr-map":
        records = _lr_map(s, device)
    else:
        points = [(s, b, d, seed) for b in PROFILE_BLOCKS for d in s["depths"]
                  for seed in seeds(s["seeds"])]
        records = sweep(_xiong_point, points)
    return {"experiment": experiment, "scale": scale, "settings": s, "records": records}


def load(path: str | Path) -> dict:
    """What ``run`` returned, read back from the JSON file the command line wrote."""
    result = json.loads(Path(path).read_text())
    if result.get("experiment") not in SCALES:
        raise ValueError(f"{path} does not hold a depthlab experiment")
    return result


def lr_map_accuracy(result: dict) -> dict[str, np.ndarray]:
    """{block: (learning rates, seeds) held-out accuracies} of an lr-map result."""
    lrs, ids = result["settings"]["lrs"], sorted({r["seed"] for r in result["records"]})
    acc = {(r["block"], r["lr"], r["seed"]): r["accuracy"] for r in result["records"]}
    return {b: np.array([[acc[(b, lr, s)] for s in ids] for lr in lrs]) for b in LR_MAP_BLOCKS}


def plot_lr_map(result: dict):
    """Held-out accuracy against learning rate for each block (bands: seeds), the chapter 5
    figure, from a result at any scale."""
    from . import plots  # matplotlib only when something is drawn, not for the command line

    s = result["settings"]
    fig, axes = plots.figure(width=5.5, takeaway=f"Learning-rate map at the {result['scale']} "
                             f"settings (width {s['d_model']}, {s['steps']} steps)")
    plots.versus(axes[0, 0], s["lrs"], lr_map_accuracy(result), xlabel="peak learning rate",
                 ylabel="held-out accuracy", logx=True, reference=1 / 15,
                 reference_label="chance", title="bands: lowest to highest seed")
    return fig


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python -m depthlab.experiments EXPERIMENT --out FILE`` (see above)."""
    ap = argparse.ArgumentParser(prog="python -m depthlab.experiments",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", choices=sorted(SCALES))
    ap.add_argument("--scale", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--out", required=True, help="JSON file to write (by rank 0)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="change one setting; VALUE is JSON, e.g. steps=500 or 'lrs=[1e-3]'")
    args = ap.parse_args(argv)
    changes = {}
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            ap.error(f"--set {item!r}: the value must be JSON (a number, a list, a string)")
    rank, _ = init_distributed()
    result = run(args.experiment, args.scale, changes)
    if rank == 0:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {len(result['records'])} records to {args.out}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Leave the group together: a rank that exits while another still holds the gloo
        # connection can be aborted (SIGABRT) at interpreter exit - seen in 1 of 4 test runs.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
