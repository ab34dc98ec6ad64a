"""Runs spread over processes give the runs a plain loop gives (groups: test_grouped.py)."""

import os

import pytest
import torch

import depthlab as dl
from depthlab.sweeps import sweep

SMALL = dl.TransformerConfig(d_model=32, n_layers=2, vocab_size=16, max_len=16)
CFG = dl.TrainConfig(steps=12, lr=3e-3)


def _loss_after(seed):
    model = dl.SequenceModel(SMALL, seed=seed)
    hist = dl.train(model, dl.SequenceTask("sort", n=4, batch_size=16, seed=seed),
                    CFG.replace(seed=seed))
    return hist.loss, [p.detach().clone() for p in model.parameters()]


def test_a_sweep_over_processes_equals_a_plain_loop():
    points = [3, 1, 2, 0]
    parallel = sweep(_loss_after, points, workers=2)
    plain = sweep(_loss_after, points, workers=1)
    for (la, pa), (lb, pb) in zip(parallel, plain):
        assert la == lb                                       # bit for bit
        assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert sweep(lambda p: (p, os.getpid()), [0, 1], workers=2)[1][0] == 1   # order kept


def test_a_failing_point_raises_here_with_the_workers_traceback():
    def fail(p):
        if p == 2:
            raise ZeroDivisionError("point two")
        return p

    with pytest.raises(RuntimeError, match="(?s)point 2.*ZeroDivisionError: point two"):
        sweep(fail, [0, 1, 2, 3], workers=2)


def test_under_torchrun_a_grid_still_groups_its_small_runs(monkeypatch):
    """Under torchrun each task of a grid trains on one rank, alone, so small runs of one
    structure are grouped there as in one process (the two paths then give the same numbers:
    tests/test_experiments.py). Only a run split over the ranks cannot be a group member."""
    from depthlab import distributed, sweeps

    runs = [dl.Run(dl.SequenceModel(SMALL, seed=s),
                   dl.SequenceTask("sort", n=4, batch_size=16, seed=s), CFG.replace(seed=s))
            for s in range(4)]
    alone = sweeps._tasks(runs, "auto", workers=1)
    monkeypatch.setattr(distributed, "init_distributed", lambda: (0, 2))   # as under torchrun
    assert distributed.data_parallel_world() == (0, 2)
    assert sweeps._tasks(runs, "auto", workers=1) == alone == [[0, 1, 2, 3]]


def test_groups_import_what_their_first_step_needs_before_the_workers_fork():
    """A group's first step imports sympy (0.5 s, through torch's symbolic shapes); imported in
    the parent before sweep forks, each worker of each train_grid call inherits it. Run in a
    fresh interpreter: this one may have imported it already."""
    import subprocess
    import sys
    code = (
        "import sys, depthlab as dl\n"
        "from depthlab import sweeps\n"
        "seen = []\n"
        "sweeps.sweep = lambda fn, tasks, **kw: seen.append("
        "'torch.fx.experimental.symbolic_shapes' in sys.modules) or []\n"
        "runs = [dl.Run(dl.DeepMLP(dl.MLPConfig(depth=2, width=8), seed=s), dl.Digits(seed=s),"
        " dl.TrainConfig(steps=1, seed=s)) for s in (0, 1)]\n"
        "sweeps.train_runs(runs, group='always')\n"
        "print(seen)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[True]", out
