import math

import pytest
import torch

import depthlab as dl
from depthlab.train import lr_at, recalibrate_batchnorm

SMALL = dl.TransformerConfig(d_model=32, n_layers=2, vocab_size=16, max_len=16)


def test_training_learns_the_copy_task():
    task = dl.SequenceTask("copy", n=4, batch_size=32, seed=0)
    hist = dl.train(dl.SequenceModel(SMALL, seed=0), task, dl.TrainConfig(steps=120, lr=3e-3))
    assert hist.status == "ok", hist.message
    chance = 1 / 15
    assert hist.final("accuracy") > 5 * chance
    assert hist.final("loss") < 0.5 * hist.loss[0]
    assert len(hist.lr) == len(hist.grad_norm) == 120


def test_training_is_reproducible_on_cpu():
    task = dl.SequenceTask("sort", n=4, batch_size=16, seed=2)
    cfg = dl.TrainConfig(steps=15, lr=1e-3)
    a = dl.train(dl.SequenceModel(SMALL, seed=1), task, cfg)
    b = dl.train(dl.SequenceModel(SMALL, seed=1), task, cfg)
    assert a.loss == b.loss


def test_divergence_is_reported_not_raised():
    task = dl.SequenceTask("sort", n=4, batch_size=16)
    hist = dl.train(dl.SequenceModel(SMALL), task,
                    dl.TrainConfig(steps=50, lr=1e4, optimizer="sgd", momentum=0.0))
    assert hist.status == "diverged"
    assert hist.diverged_at is not None and hist.diverged_at < 50
    assert f"diverged at step {hist.diverged_at}" in hist.message
    assert all(math.isfinite(v) for v in hist.loss)


def test_plateau_is_detected():
    task = dl.SequenceTask("sort", n=4, batch_size=16)
    hist = dl.train(dl.SequenceModel(SMALL), task, dl.TrainConfig(steps=60, lr=1e-7))
    assert hist.status == "plateau" and "plateau" in hist.message


def test_warmup_schedule_is_linear_then_constant():
    cfg = dl.TrainConfig(lr=1e-2, warmup_steps=4)
    assert [lr_at(s, cfg) for s in range(6)] == [
        2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2]


def test_clipping_bounds_the_update():
    """With clip_norm, SGD's first update has norm lr * clip_norm at most."""
    task = dl.SequenceTask("sort", n=4, batch_size=16)
    model = dl.SequenceModel(SMALL)
    before = [p.detach().clone() for p in model.parameters()]
    dl.train(model, task, dl.TrainConfig(steps=1, lr=1.0, optimizer="sgd", momentum=0.0,
                                         clip_norm=0.1))
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(),
                                                                          before)))
    assert step.item() <= 0.1 + 1e-6


def test_callbacks_receive_every_step():
    class Count(dl.Callback):
        def __init__(self):
            self.before, self.after, self.ended = 0, 0, False

        def before_step(self, step, model):
            self.before += 1

        def after_step(self, step, model):
            self.after += 1
            return {"seen": float(step)}

        def on_train_end(self, model):
            self.ended = True

    cb = Count()
    hist = dl.train(dl.SequenceModel(SMALL), dl.SequenceTask(n=4),
                    dl.TrainConfig(steps=5), callbacks=[cb])
    assert cb.before == cb.after == 5 and cb.ended
    assert hist.extras[4]["seen"] == 4.0


def test_evaluate_restores_training_mode():
    model = dl.SequenceModel(SMALL)
    model.train()
    out = dl.evaluate(model, *dl.SequenceTask(n=4).eval_batch(64))
    assert model.training and 0 <= out["accuracy"] <= 1


def test_pick_device_returns_an_available_device():
    assert dl.pick_device().type in {"cpu", "cuda", "mps"}
    assert dl.pick_device("cpu").type == "cpu"


def test_bf16_autocast_runs_on_cpu():
    task = dl.SequenceTask("sort", n=4, batch_size=8)
    hist = dl.train(dl.SequenceModel(SMALL), task, dl.TrainConfig(steps=3, amp="bf16"))
    assert hist.steps_run == 3 and all(math.isfinite(v) for v in hist.loss)


def test_evaluate_with_batch_statistics_leaves_running_stats_alone():
    model = dl.DeepMLP(dl.MLPConfig(depth=2, norm_kind="batch"))
    digits = dl.Digits(batch_size=8)
    dl.train(model, digits, dl.TrainConfig(steps=20, lr=1e-3))
    before = model.layers[0].norm.running_mean.clone()
    x, y = digits.test
    eval_mode = dl.evaluate(model, x, y)
    batch_mode = dl.evaluate(model, x, y, batch_size=2, batch_stats=True)
    assert torch.equal(model.layers[0].norm.running_mean, before)
    assert model.training
    assert abs(eval_mode["loss"] - batch_mode["loss"]) > 1e-3   # the statistics matter
    assert 0 <= batch_mode["accuracy"] <= 1


def test_recalibrate_batchnorm_averages_batch_statistics_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = dl.DeepMLP(dl.MLPConfig(depth=2, width=8, d_in=5, norm_kind="batch"))
    before = model.layers[0].norm.running_mean.clone()
    x = torch.randn(40, 5) * 3 + 1
    pre = model.layers[0].linear(x).detach()               # the first BatchNorm's input
    fresh = recalibrate_batchnorm(model, x)
    assert not fresh.training
    assert torch.allclose(fresh.layers[0].norm.running_mean, pre.mean(0), atol=1e-5)
    assert torch.allclose(fresh.layers[0].norm.running_var, pre.var(0), atol=1e-4)
    assert torch.equal(model.layers[0].norm.running_mean, before)   # original untouched
    halves = recalibrate_batchnorm(model, x, batch_size=20)
    want = (pre[:20].mean(0) + pre[20:].mean(0)) / 2        # plain average of the two batches
    assert torch.allclose(halves.layers[0].norm.running_mean, want, atol=1e-5)
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_batchnorm(dl.DeepMLP(dl.MLPConfig(depth=2)), x)


def test_first_step_below_uses_a_moving_average():
    hist = dl.History(loss=[5.0] * 10 + [1.0] * 10)
    assert hist.first_step_below(3.0, window=4) == 12      # at 11, mean of 5,5,1,1 = 3: not < 3
    assert hist.first_step_below(0.5) is None
    assert dl.History(loss=[0.1] * 3).first_step_below(1.0, window=10) is None  # too short


def test_train_and_evaluate_scores_on_held_out_data():
    task = dl.SequenceTask("copy", n=4, batch_size=32, seed=0)
    hist, acc = dl.train_and_evaluate(dl.SequenceModel(SMALL, seed=0), task,
                                      dl.TrainConfig(steps=20, lr=3e-3), eval_size=128)
    assert hist.steps_run == 20 and 0.0 <= acc <= 1.0
    model = dl.SequenceModel(SMALL, seed=0)
    dl.train(model, task, dl.TrainConfig(steps=20, lr=3e-3))
    assert acc == dl.evaluate(model, *task.eval_batch(128))["accuracy"]   # the same run
