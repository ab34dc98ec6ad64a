"""One training run and one sweep over two processes with torchrun (gloo on the CPU): what
``dl.train`` and ``dl.sweep`` compute there must be what they compute in one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import depthlab as dl

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from distributed_cases import CASES, STEPS, sweep_fn, sweep_points  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results of tests/distributed_worker.py under torchrun, 2 processes."""
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", DEPTHLAB_QUIET="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(HERE / "distributed_worker.py"), str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in (0, 1)]


def _single(name):
    cfg, task, train_cfg = CASES[name]
    model = dl.SequenceModel(cfg, seed=0)
    hist = dl.train(model, task, train_cfg.replace(steps=STEPS))
    return model.state_dict(), hist


def _max_gap(a, b, only=None):
    keys = [k for k in a if only is None or k in only]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


@pytest.mark.parametrize("name", ["layer norm", "uneven shares"])
def test_two_processes_take_the_single_process_step(ranks, name):
    state, hist = _single(name)
    for r in ranks:
        assert r["world"] == 2
        assert _max_gap(r[name]["state"], state) < 1e-5
        # the History is the whole batch's, on every rank
        assert r[name]["loss"] == pytest.approx(hist.loss, abs=1e-5)
        assert r[name]["accuracy"] == pytest.approx(hist.accuracy, abs=1e-6)
    # and the parameters did move: the comparison is not of two untouched models
    untouched = dl.SequenceModel(CASES[name][0], seed=0).state_dict()
    assert _max_gap(state, untouched) > 1e-3


def test_batchnorm_uses_each_ranks_share(ranks):
    """With BatchNorm each rank normalises its own half of the batch: the run differs from the
    single-process run on the whole batch. The ranks' parameters still agree with each other
    (the same averaged gradient); the running statistics are rank 0's at each forward pass
    (DDP broadcasts buffers), and each rank's own after its last one."""
    state, _ = _single("batch norm")
    params = {n for n, _ in dl.SequenceModel(CASES["batch norm"][0]).named_parameters()}
    a, b = ranks[0]["batch norm"]["state"], ranks[1]["batch norm"]["state"]
    assert _max_gap(a, state, params) > 1e-4
    assert _max_gap(a, b, params) < 1e-6
    assert _max_gap(a, b, {k for k in a if "running" in k}) > 1e-6


def test_a_sweep_over_two_ranks_equals_the_plain_loop(ranks):
    plain = [sweep_fn(p) for p in sweep_points()]
    for r in ranks:                                   # every rank receives every result
        assert len(r["sweep"]) == len(plain)
        for got, want in zip(r["sweep"], plain):
            assert got == pytest.approx(want, abs=1e-6)


def test_outside_torchrun_nothing_is_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dl.distributed.init_distributed() == (0, 1)
    assert dl.distributed.data_parallel_world() == (0, 1)


def test_a_batch_smaller_than_the_world_is_refused():
    from depthlab.distributed import shard

    x = torch.arange(3)
    assert [shard(x, r, 2).tolist() for r in (0, 1)] == [[0, 1], [2]]
    with pytest.raises(dl.DataError, match="fewer than the 4 processes"):
        shard(x, 3, 4)
