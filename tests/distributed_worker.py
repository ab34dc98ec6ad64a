"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Not a test module itself: each rank trains the same models through the ordinary ``dl.train``
(which then uses DistributedDataParallel) and runs one distributed ``dl.sweep``, and writes what
it got to ``OUT/rank-R.pt`` for the test to compare with a single-process run.
"""

import sys
from pathlib import Path

import torch

import depthlab as dl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_cases import CASES, STEPS, sweep_fn, sweep_points  # noqa: E402


def main(out: Path) -> None:
    rank, world = dl.distributed.init_distributed()
    assert world == 2, world
    torch.set_num_threads(1)
    found = {"world": world}
    for name, (cfg, task, train_cfg) in CASES.items():
        model = dl.SequenceModel(cfg, seed=0)
        hist = dl.train(model, task, train_cfg.replace(steps=STEPS))
        found[name] = {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                       "loss": hist.loss, "accuracy": hist.accuracy}
    found["sweep"] = dl.sweep(sweep_fn, sweep_points())
    torch.save(found, out / f"rank-{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
