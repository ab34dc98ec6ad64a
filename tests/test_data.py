import numpy as np
import pytest
import torch

import depthlab as dl


def test_sort_task_targets_are_the_sorted_inputs():
    task = dl.SequenceTask("sort", n=5, vocab=10, batch_size=8, seed=1)
    x, y = task.batch(0)
    assert x.shape == y.shape == (8, 10)
    assert (x[:, 5] == task.sep).all()
    assert torch.equal(y[:, 5:], torch.sort(x[:, :5], dim=1).values)
    assert (y[:, :5] == dl.IGNORE).all()
    # the separator sits at position n and nowhere else: every other token is a symbol
    symbols = torch.cat([x[:, :5], x[:, 6:]], dim=1)
    assert symbols.min() >= 0 and symbols.max() <= task.vocab - 2
    assert (x == task.sep).sum() == len(x)


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
    # every training example appears at most once per epoch (no sampling with replacement),
    # and all but the last partial batch appear: label each example by its index and look
    n = len(y)
    d._arrays["x_train"] = torch.arange(n, dtype=torch.float32)[:, None]
    seen = torch.cat([d.batch(s)[0][:, 0] for s in range(d.steps_per_epoch)]).long()
    assert len(seen) == len(set(seen.tolist())) == d.steps_per_epoch * 32
    assert n - len(seen) < 32
    nxt = torch.cat([d.batch(s)[0][:, 0] for s in range(d.steps_per_epoch,
                                                          2 * d.steps_per_epoch)])
    assert not torch.equal(seen.float(), nxt)                 # reshuffled every epoch


def test_shifted_gaussians_change_p_x_but_not_p_y_given_x():
    from depthlab.data import ShiftedGaussians

    prob = ShiftedGaussians()
    xtr, ytr = prob.sample(4000, "train", seed=0)
    xte, _ = prob.sample(4000, "test", seed=0)
    assert xtr.shape == (4000, 2) and ytr.dtype == torch.int64
    assert abs(float(xtr[:, 0].mean()) - prob.train_mean[0]) < 0.05
    assert abs(float(xte[:, 0].mean()) - prob.test_mean[0]) < 0.05
    # labels follow p(y | x): the mean label matches the mean probability
    assert abs(float(ytr.double().mean() - prob.p_y1(xtr).double().mean())) < 0.03
    # E_train[w(x)] = 1 for the true density ratio (an importance-sampling identity)
    assert abs(float(prob.density_ratio(xtr).mean()) - 1) < 0.15
    assert torch.equal(prob.sample(5, "train", 1)[0], prob.sample(5, "train", 1)[0])
    with pytest.raises(ValueError, match="domain"):
        prob.inputs(3, "validation", 0)
    with pytest.raises(dl.ConfigError, match="train_sd"):
        ShiftedGaussians(train_sd=0)


def test_importance_weights_from_a_domain_classifier_track_the_true_ratio():
    from depthlab.data import ShiftedGaussians, effective_sample_size, importance_weights

    prob = ShiftedGaussians()
    xtr = prob.inputs(1000, "train", seed=0)
    w = importance_weights(xtr, prob.inputs(1000, "test", seed=1))
    true = prob.density_ratio(xtr)
    assert w.shape == (1000,) and abs(float(w.mean()) - 1) < 1e-5
    corr = np.corrcoef(np.log(w.numpy()), np.log(true.numpy()))[0, 1]
    assert corr > 0.95                        # the quadratic log-ratio is learned
    assert effective_sample_size(torch.ones(10)) == pytest.approx(10)
    assert effective_sample_size(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(1)
    assert effective_sample_size(w) < 1000 / 2          # reweighting costs examples


def test_tensor_data_samples_in_proportion_to_weights():
    from depthlab.data import TensorData

    x = torch.arange(4).float().unsqueeze(1)
    y = torch.arange(4)
    data = TensorData(x, y, batch_size=1000, seed=0, weights=torch.tensor([0.0, 1, 1, 2]))
    _, yb = data.batch(0)
    counts = torch.bincount(yb, minlength=4).double() / 1000
    assert counts[0] == 0 and abs(float(counts[3]) - 0.5) < 0.06
    assert torch.equal(data.batch(3)[1], data.batch(3)[1])
    with pytest.raises(dl.ConfigError, match="weights"):
        TensorData(x, y, weights=torch.zeros(4))
    with pytest.raises(dl.ConfigError, match="targets"):
        TensorData(x, y[:3])


def test_char_text_predicts_the_next_character_and_is_reproducible():
    from depthlab.data import CharText

    text = CharText(seq_len=16, batch_size=4, seed=0)
    x, y = text.batch(3)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])                    # targets: the next character
    assert int(x.min()) >= 0 and int(x.max()) < text.vocab_size == 97
    x2, _ = CharText(seq_len=16, batch_size=4, seed=0).batch(3)
    assert torch.equal(x, x2)
    assert not torch.equal(x, CharText(seq_len=16, batch_size=4, seed=1).batch(3)[0])
    words = text.decode(x[0].tolist())
    assert len(words) == 16 and sum(c.isalpha() or c == " " for c in words) > 8
    ex, ey = text.eval_batch(8)
    assert ex.shape == (8, 16) and torch.equal(ex[:, 1:], ey[:, :-1])
    with pytest.raises(dl.ConfigError, match="seq_len"):
        CharText(seq_len=0)


def test_char_text_train_codes_are_what_batches_draw_from_and_exclude_the_held_out_text():
    """train_codes (chapter 8's unigram level counts them) is the first 90 % of the text:
    every training window lies inside it, every held-out window after it."""
    from depthlab.data import CharText

    text = CharText(seq_len=16, batch_size=64, seed=0)
    train = text.train_codes
    assert len(train) == int(0.9 * len(text._codes))
    assert torch.equal(train, text._codes[: len(train)])

    def inside(windows, codes):
        s = "".join(map(chr, codes.tolist()))
        return [("".join(map(chr, w.tolist())) in s) for w in windows]

    x, y = text.batch(0)
    assert all(inside(torch.cat([x, y[:, -1:]], 1), train))
    ex, ey = text.eval_batch(64)
    assert all(inside(torch.cat([ex, ey[:, -1:]], 1), text._codes[len(train):]))
