import torch

import depthlab as dl


def test_sort_task_targets_are_the_sorted_inputs():
    task = dl.SequenceTask("sort", n=5, vocab=10, batch_size=8, seed=1)
    x, y = task.batch(0)
    assert x.shape == y.shape == (8, 10)
    assert (x[:, 5] == task.sep).all()
    assert torch.equal(y[:, 5:], torch.sort(x[:, :5], dim=1).values)
    assert (y[:, :5] == dl.IGNORE).all()
    assert x.max() < task.vocab - 1 or (x == task.sep).any()


def test_reverse_and_copy():
    x, y = dl.SequenceTask("reverse", n=4, seed=0).batch(0)
    assert torch.equal(y[:, 4:], torch.flip(x[:, :4], dims=[1]))
    x, y = dl.SequenceTask("copy", n=4, seed=0).batch(0)
    assert torch.equal(y[:, 4:], x[:, :4])


def test_batches_are_deterministic_per_seed_and_step():
    a, b = dl.SequenceTask(seed=0), dl.SequenceTask(seed=0)
    assert torch.equal(a.batch(5)[0], b.batch(5)[0])
    assert not torch.equal(a.batch(5)[0], a.batch(6)[0])
    assert not torch.equal(a.batch(5)[0], dl.SequenceTask(seed=1).batch(5)[0])
    assert not torch.equal(a.eval_batch(32)[0], a.batch(0)[0])


def test_digits_are_standardised_without_blowing_up_constant_pixels():
    d = dl.Digits(batch_size=32)
    x, y = d.train
    assert x.shape[1] == 64 and len(x) == len(y) and len(y) > 1300
    assert x.abs().max() < 20                      # sd floored at 1: no z-scores of a million
    assert abs(x.mean().item()) < 0.05
    xb, yb = d.batch(0)
    assert xb.shape == (32, 64) and yb.shape == (32,)
    assert d.steps(2) == 2 * d.steps_per_epoch
    # every training example appears exactly once per epoch
    seen = torch.cat([d.batch(s)[1] for s in range(d.steps_per_epoch)])
    assert len(seen) == d.steps_per_epoch * 32
