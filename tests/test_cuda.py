"""The library on a CUDA device. Skipped where there is none (this project's CI machines);
run on a GPU machine with ``python -m pytest tests/test_cuda.py``."""

import math

import pytest
import torch
from torch import nn

import depthlab as dl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SMALL = dl.TransformerConfig(d_model=32, n_layers=2, vocab_size=16, max_len=16)


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_training_steps_on_the_gpu(amp):
    task = dl.SequenceTask("copy", n=4, batch_size=32, seed=0)
    hist = dl.train(dl.SequenceModel(SMALL, seed=0), task,
                    dl.TrainConfig(steps=60, lr=3e-3, amp=amp, device="cuda"))
    assert hist.device.startswith("cuda") and hist.status == "ok", hist.message
    assert all(math.isfinite(v) for v in hist.loss)
    assert hist.final("loss") < 0.7 * hist.loss[0]


def test_block_parity_on_the_gpu():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True,
                                       norm_first=True).cuda()
    diffs = dl.torch_parity(layer, torch.randn(4, 17, 64, device="cuda"))
    assert diffs["output"] <= 1e-4 and diffs["input_grad"] <= 1e-4, diffs


def test_gradient_profile_on_the_gpu_matches_the_cpu():
    model = dl.DeepMLP(dl.MLPConfig(depth=10, activation="tanh"), seed=0)
    batch = dl.Digits(batch_size=64, seed=0).batch(0)
    cpu = dl.gradient_profile(model, [batch]).act_grad_norm
    gpu = dl.gradient_profile(model.cuda(), [batch]).act_grad_norm
    assert ((gpu / cpu) - 1).__abs__().max() < 1e-3


def test_reference_norms_build_their_tensors_on_the_input_device():
    from depthlab.reference import norm_parity

    diffs = norm_parity(torch.randn(4, 6, 32, device="cuda"))
    assert max(diffs.values()) < 1e-5


def test_training_keeps_the_cuda_random_state_of_the_caller():
    torch.cuda.manual_seed(3)
    state = torch.cuda.get_rng_state()
    dl.train(dl.SequenceModel(SMALL.replace(dropout=0.1)), dl.SequenceTask(n=4),
             dl.TrainConfig(steps=2, device="cuda"))
    assert torch.equal(torch.cuda.get_rng_state(), state)


def test_a_group_on_the_gpu_equals_its_runs_alone():
    cfgs = [dl.TrainConfig(steps=10, lr=lr, device="cuda", sync_every=4) for lr in (1e-3, 1e-2)]
    task = lambda s: dl.SequenceTask("sort", n=6, batch_size=16, seed=s)  # noqa: E731
    alone = [dl.train(dl.SequenceModel(SMALL, seed=s), task(s), c) for s, c in enumerate(cfgs)]
    grouped = dl.train_group([dl.SequenceModel(SMALL, seed=s) for s in (0, 1)],
                             [task(s) for s in (0, 1)], cfgs)
    for a, g in zip(alone, grouped):
        assert g.device.startswith("cuda")
        assert max(abs(x - y) for x, y in zip(a.loss, g.loss)) < 1e-3 * a.loss[0]


def test_train_grid_groups_on_the_gpu_in_this_process():
    """Once CUDA is in use a sweep must not fork (a forked child cannot use CUDA): the grid
    trains here, every run of one structure in one group."""
    import os

    def run(lr, seed):
        return dl.Run(dl.SequenceModel(SMALL, seed=seed), dl.SequenceTask(n=4, seed=seed),
                      dl.TrainConfig(steps=5, lr=lr, seed=seed, device="cuda"))

    torch.zeros(1, device="cuda")                          # CUDA is now initialised here
    out = dl.train_grid(run, [1e-3, 1e-2], [0, 1], keep=lambda r: (os.getpid(), r.history))
    assert {pid for runs in out.values() for pid, _ in runs} == {os.getpid()}
    assert all(h.device.startswith("cuda") for runs in out.values() for _, h in runs)
