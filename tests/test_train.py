import math

import pytest
import torch

import depthlab as dl
from depthlab.models import recalibrate_batchnorm
from depthlab.training import lr_at

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


def test_depthlab_device_overrides_every_runs_device(monkeypatch):
    """The chapters train on the CPU (DEVICE = "cpu"); benchmarks/gpu_check.sh moves them all
    to a GPU with DEPTHLAB_DEVICE=cuda. Shown here with the "meta" device, which every
    machine has."""
    assert dl.pick_device("cpu").type == "cpu"
    monkeypatch.setenv("DEPTHLAB_DEVICE", "meta")
    assert dl.pick_device("cpu").type == "meta" and dl.pick_device("auto").type == "meta"


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


# --- float16 loss scaling -------------------------------------------------------------------


class _Overflow(torch.nn.Module):
    """Identity forward; in backward the gradient passes through float16 after being
    multiplied by 1e6 (first three calls), which overflows once a loss scaler has multiplied
    it by 2^16: an emulated float16 overflow on any device. ``always`` multiplies by 1e30 at
    every call, so it overflows even at a scale below 1 (the real gradients are out of
    float16's range)."""

    def __init__(self, always: bool) -> None:
        super().__init__()
        self.always, self.calls = always, 0

    def forward(self, x):
        self.calls += 1
        factor = 1e30 if self.always else (1e6 if self.calls <= 3 else None)
        if x.requires_grad and factor is not None:
            x.register_hook(lambda g, f=factor: (g * f).half().to(g.dtype))
        return x


def _fp16_model(always: bool):
    model = dl.SequenceModel(SMALL, seed=0)
    model.encoder.layers.insert(0, _Overflow(always))
    return model


def test_fp16_overflow_steps_are_skipped_not_reported_as_divergence():
    """The first three steps overflow float16 under the loss scale: a GradScaler skips them,
    halves the scale and trains on. Only a non-finite loss or a collapsed scale diverges."""
    task = dl.SequenceTask("copy", n=4, batch_size=32, seed=0)
    hist = dl.train(_fp16_model(always=False), task, dl.TrainConfig(steps=40, lr=3e-3,
                                                                     amp="fp16"))
    assert hist.status == "ok", hist.message
    assert hist.skipped == [0, 1, 2]
    assert hist.steps_run == 40 and hist.final("loss") < 0.8 * hist.loss[0]


def test_a_collapsed_fp16_loss_scale_is_a_divergence():
    task = dl.SequenceTask("copy", n=4, batch_size=32, seed=0)
    hist = dl.train(_fp16_model(always=True), task, dl.TrainConfig(steps=40, amp="fp16"))
    assert hist.status == "diverged" and "loss scale" in hist.message
    assert hist.diverged_at == 16            # 2^16 halved 17 times falls below 1


def test_bf16_autocast_really_runs_in_bfloat16_on_cpu():
    seen = []
    model = dl.SequenceModel(SMALL)
    model.head.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    task = dl.SequenceTask("sort", n=4, batch_size=8)
    hist = dl.train(model, task, dl.TrainConfig(steps=3, amp="bf16"))
    assert hist.steps_run == 3 and all(math.isfinite(v) for v in hist.loss)
    assert seen == [torch.bfloat16] * 3
    seen.clear()
    dl.train(model, task, dl.TrainConfig(steps=1))                 # the default is float32
    assert seen == [torch.float32]


# --- what the history records, and what reaches the optimiser --------------------------------


def test_recorded_gradient_norm_is_the_norm_before_clipping():
    task = dl.SequenceTask("sort", n=4, batch_size=16, seed=0)
    model = dl.SequenceModel(SMALL, seed=0)
    x, y = task.batch(0)
    loss, _ = dl.losses.loss_and_accuracy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    unclipped = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    assert unclipped > 0.05                                       # so the clip below bites
    hist = dl.train(model, task, dl.TrainConfig(steps=1, clip_norm=0.01))
    assert hist.grad_norm[0] == pytest.approx(unclipped, rel=1e-4)


def test_warmup_reaches_the_optimizer():
    """SGD without momentum moves by lr_t · ‖g‖: with 4 warm-up steps the first step is a
    quarter of the full one. A loop that computed the warm-up but never wrote it into the
    optimizer's param_groups would take the full step."""
    task = dl.SequenceTask("sort", n=4, batch_size=16, seed=0)
    for warmup, fraction in ((4, 0.25), (0, 1.0)):
        model = dl.SequenceModel(SMALL, seed=0)
        before = [p.detach().clone() for p in model.parameters()]
        hist = dl.train(model, task, dl.TrainConfig(steps=1, lr=0.1, optimizer="sgd",
                                                    momentum=0.0, warmup_steps=warmup))
        moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum()
                               for p, b in zip(model.parameters(), before)))
        assert hist.lr == [0.1 * fraction]
        assert float(moved) == pytest.approx(0.1 * fraction * hist.grad_norm[0], rel=1e-4)


def test_cosine_and_linear_schedules_decay_to_zero_after_warmup():
    cos = dl.TrainConfig(steps=10, lr=1.0, warmup_steps=2, schedule="cosine")
    lin = cos.replace(schedule="linear")
    assert [lr_at(s, cos) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_at(6, cos) == pytest.approx(0.5) and lr_at(6, lin) == pytest.approx(0.5)
    assert lr_at(9, cos) < 0.05 and lr_at(9, lin) == pytest.approx(1 / 8)


def test_reading_metrics_every_few_steps_records_the_same_history():
    task = dl.SequenceTask("sort", n=4, batch_size=16, seed=0)
    every_step = dl.train(dl.SequenceModel(SMALL, seed=0), task,
                          dl.TrainConfig(steps=23, sync_every=1))
    batched = dl.train(dl.SequenceModel(SMALL, seed=0), task,
                       dl.TrainConfig(steps=23, sync_every=5))
    assert every_step.loss == batched.loss and every_step.grad_norm == batched.grad_norm
    blown = dl.TrainConfig(steps=50, lr=1e4, optimizer="sgd", momentum=0.0)
    a = dl.train(dl.SequenceModel(SMALL), task, blown.replace(sync_every=1))
    b = dl.train(dl.SequenceModel(SMALL), task, blown.replace(sync_every=8))
    assert a.status == b.status == "diverged" and a.diverged_at == b.diverged_at
    assert a.loss == b.loss                                      # history ends at the bad step


# --- bad input is an error, not a divergence ---------------------------------------------


class _Batches:
    def __init__(self, fn):
        self.fn = fn

    def batch(self, step):
        return self.fn(step)


def test_an_all_ignored_or_empty_batch_is_a_data_error():
    x = torch.randint(0, 15, (8, 8))
    ignored = _Batches(lambda s: (x, torch.full((8, 8), dl.IGNORE)))
    with pytest.raises(dl.DataError, match="IGNORE"):
        dl.train(dl.SequenceModel(SMALL), ignored, dl.TrainConfig(steps=3))
    empty = _Batches(lambda s: (x[:0], x[:0]))
    with pytest.raises(dl.DataError, match="empty"):
        dl.train(dl.SequenceModel(SMALL), empty, dl.TrainConfig(steps=3))


def test_a_run_that_raises_ends_its_callbacks_and_removes_their_hooks():
    task = dl.SequenceTask("sort", n=4, batch_size=8)

    def flaky(step):
        if step == 2:
            raise RuntimeError("the data source broke")
        return task.batch(step)

    model = dl.SequenceModel(SMALL)
    watch = dl.LayerGradNorms()
    with pytest.raises(RuntimeError, match="broke"):
        dl.train(model, _Batches(flaky), dl.TrainConfig(steps=5), callbacks=[watch])
    assert len(watch.history) == 2
    assert all(not layer._forward_hooks for layer in model.layers)


def test_a_model_without_parameters_cannot_be_trained():
    with pytest.raises(ValueError, match="no trainable parameters"):
        dl.train(torch.nn.Identity(), dl.SequenceTask(n=4), dl.TrainConfig(steps=1))


def test_evaluate_gives_clear_errors_for_bad_input_and_works_without_parameters():
    x, y = dl.SequenceTask(n=4).eval_batch(8)
    model = dl.SequenceModel(SMALL)
    with pytest.raises(ValueError, match="at least one example"):
        dl.evaluate(model, x[:0], y[:0])
    with pytest.raises(ValueError, match="batch_size"):
        dl.evaluate(model, x, y, batch_size=0)
    with pytest.raises(ValueError, match="no labelled target"):
        dl.evaluate(model, x, torch.full_like(y, dl.IGNORE))
    logits = torch.nn.functional.one_hot(y.clamp(min=0), 16).float()
    out = dl.evaluate(torch.nn.Identity(), logits, y)           # a parameterless "model"
    assert out["accuracy"] == 1.0


def test_train_and_evaluate_needs_held_out_data_it_can_find():
    from depthlab.data import TensorData

    x, y = dl.Digits().train
    data = TensorData(x, y, batch_size=32, seed=0)
    model = dl.DeepMLP(dl.MLPConfig(depth=2))
    with pytest.raises(TypeError, match="held_out"):
        dl.train_and_evaluate(model, data, dl.TrainConfig(steps=2))
    _, acc = dl.train_and_evaluate(model, data, dl.TrainConfig(steps=2),
                                   held_out=dl.Digits().test)
    assert 0.0 <= acc <= 1.0


def test_z_loss_adds_the_mean_squared_log_normaliser_and_the_history_keeps_the_cross_entropy():
    """PaLM's z-loss: the gradient is that of CE + z·mean(log² Z) over the labelled positions,
    written out here by hand; the recorded loss is the cross-entropy alone."""
    from depthlab.losses import objective

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 7, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (4, 5), generator=g)
    targets[:, :2] = dl.IGNORE
    minimised, ce, _ = objective(logits, targets, 1e-2)
    keep = targets != dl.IGNORE
    by_hand = (torch.nn.functional.cross_entropy(logits[keep], targets[keep])
               + 1e-2 * torch.logsumexp(logits[keep], -1).pow(2).mean())
    assert torch.allclose(minimised, by_hand, atol=1e-6)
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(logits[keep], targets[keep]))
    # it acts: the z-loss pulls log Z toward 0 in training, the plain run does not
    task = dl.SequenceTask("copy", n=4, batch_size=16, seed=0)
    cfg_model = dl.TransformerConfig(d_model=16, n_heads=2, n_layers=1, max_len=8)
    log_z = {}
    for z in (0.0, 1.0):
        model = dl.SequenceModel(cfg_model, seed=0)
        hist = dl.train(model, task, dl.TrainConfig(steps=30, lr=1e-2, z_loss=z, seed=0,
                                                    progress=False))
        x, _ = task.batch(0)
        with torch.no_grad():
            log_z[z] = float(torch.logsumexp(model(x), -1).abs().mean())
        assert all(math.isfinite(v) for v in hist.loss)
    assert log_z[1.0] < 0.5 * log_z[0.0], log_z
    with pytest.raises(dl.ConfigError, match="z_loss"):
        dl.TrainConfig(z_loss=-1.0)


def test_lr_sensitivity_is_the_mean_excess_over_the_best_rate_with_failures_capped():
    from depthlab.analysis import lr_sensitivity

    assert lr_sensitivity({1e-3: 2.0, 1e-2: 1.5, 1e-1: 1.5}, init_loss=4.0) == pytest.approx(
        (0.5 + 0 + 0) / 3)
    # a divergence and a run worse than the start both count as the loss at initialisation
    assert lr_sensitivity({1e-3: 2.0, 1e-2: float("nan"), 1e-1: 9.0}, init_loss=4.0) == \
        pytest.approx((0 + 2 + 2) / 3)
    assert lr_sensitivity({1e-3: 1.0}, init_loss=4.0) == 0.0
    with pytest.raises(ValueError):
        lr_sensitivity({}, init_loss=4.0)


def _coordinates(base, train_only=None):
    """μP's coordinate check over widths 32-256 (3 Adam steps at 1e-2)."""
    from depthlab.probes import coordinate_check

    def build(width):
        cfg = dl.TransformerConfig(d_model=width, n_heads=width // 16, n_layers=2, vocab_size=16,
                                   max_len=12, init="fan_in", mup_base_width=base)
        return dl.SequenceModel(cfg, seed=0)

    return coordinate_check(build, [32, 64, 128, 256], dl.SequenceTask("sort", n=6, seed=0),
                            dl.TrainConfig(steps=3, lr=1e-2, device="cpu"),
                            train_only=train_only).slopes()


def test_mup_passes_its_coordinate_check_and_the_standard_parametrisation_does_not():
    """Yang et al.'s coordinate check (the mup package's get_coord_data): after a few Adam
    steps no layer's output, and not the logits' change, grows or shrinks with the width
    under μP, for the whole model and for the readout alone (log-log slopes against width,
    0 = flat, 1 = proportional); in the standard parametrisation the updates grow with the
    width. A readout whose rate is also divided by the width (depthlab 0.2) fails: its logits'
    change falls as 1/width (slope -1)."""
    mup, mup_head = _coordinates(32), _coordinates(32, train_only="head")
    sp, sp_head = _coordinates(None), _coordinates(None, train_only="head")
    assert max(abs(v) for v in mup.values()) < 0.25, mup
    assert abs(mup_head["logit change"]) < 0.25, mup_head
    assert sp["logit change"] > 0.5 and sp_head["logit change"] > 0.5, (sp, sp_head)
    assert min(sp["layer 0"], sp["layer 1"]) > 0.5, sp         # the hidden updates grow


def test_mup_groups_learning_rates():
    from depthlab.training import make_optimizer, set_lr

    cfg = dl.TransformerConfig(d_model=64, n_heads=4, n_layers=1, max_len=12, mup_base_width=16)
    model = dl.SequenceModel(cfg, seed=0)
    opt = make_optimizer(list(model.parameters()), dl.TrainConfig(lr=1e-2))
    set_lr(opt, 1e-2)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([2.5e-3, 1e-2])
    opt = make_optimizer(list(model.parameters()), dl.TrainConfig(lr=1e-2, weight_decay=0.1))
    set_lr(opt, 1e-2)        # μP's matrices decay 4 times more per unit of rate (mup's rule)
    assert sorted(g["lr"] * g["weight_decay"] for g in opt.param_groups) == pytest.approx(
        [1e-3, 1e-3])
    with pytest.raises(dl.ConfigError, match="mup_base_width"):
        dl.TransformerConfig(mup_base_width=0)


def test_independent_weight_decay_follows_the_schedule_not_the_learning_rate():
    """Wortsman et al. (2024) decay the weights by weight_decay × (lr_t / peak lr) per step;
    PyTorch's AdamW by lr_t × weight_decay. With a zero gradient Adam's own update is exactly
    0, so one step shows the decay alone: independent of the peak rate, scaled by the
    schedule (here half-way through a linear warm-up), the same for a μP group."""
    from depthlab.training import make_optimizer, set_lr

    def after_one_step(lr, independent, lr_scale=1.0):
        p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))   # resolves 1 - 5e-6
        p.lr_scale = lr_scale
        cfg = dl.TrainConfig(lr=lr, optimizer="adamw", weight_decay=1e-2, warmup_steps=2,
                             independent_decay=independent)
        opt = make_optimizer([p], cfg)
        set_lr(opt, lr_at(0, cfg))                     # step 0 of 2 warm-up steps: lr / 2
        p.grad = torch.zeros_like(p)
        opt.step()
        return float(1.0 - p.detach()[0])

    for lr in (1e-3, 1e-1):
        assert after_one_step(lr, True) == pytest.approx(0.5 * 1e-2, rel=1e-5)
        assert after_one_step(lr, True, lr_scale=0.25) == pytest.approx(0.5 * 1e-2, rel=1e-5)
        assert after_one_step(lr, False) == pytest.approx(0.5 * lr * 1e-2, rel=1e-5)
    with pytest.raises(dl.ConfigError, match="independent_decay"):
        dl.TrainConfig(optimizer="adam", weight_decay=1e-2, independent_decay=True)


def test_best_lr_finds_the_vertex_of_a_parabola_in_log_lr_and_stays_on_the_grid_at_an_edge():
    from depthlab.analysis import best_lr

    grid = [3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    for true in (0.012, 0.02, 0.05):             # loss = 1 + (ln lr - ln true)², off the grid
        losses = {r: 1.0 + (math.log(r) - math.log(true)) ** 2 for r in grid}
        assert best_lr(losses) == pytest.approx(true, rel=1e-9)
    rising = {r: 1.0 + r for r in grid}                       # best at the low edge
    assert best_lr(rising) == 3e-3
    assert best_lr({**rising, 3e-3: float("nan")}) == 1e-2   # a diverged run is the worst
    with pytest.raises(ValueError):
        best_lr({})


def test_versus_keeps_each_labels_colour_across_panels():
    import matplotlib.pyplot as plt

    from depthlab import plots

    fig, (a, b) = plt.subplots(1, 2)
    colors = {"x": "#ff0000", "y": "#0000ff"}
    plots.versus(a, [1, 2], {"x": [1, 2], "y": [2, 1]}, xlabel="s", ylabel="v", colors=colors)
    plots.versus(b, [1, 2], {"y": [[1, 2], [2, 3]]}, xlabel="s", ylabel="v", colors=colors)
    assert [ln.get_color() for ln in a.lines] == ["#ff0000", "#0000ff"]
    assert b.lines[0].get_color() == "#0000ff"
    plt.close(fig)


def test_sign_test_is_the_binomial_tail_that_scipy_computes():
    """analysis.sign_test (the chapters' paired-seed test) is P(X >= k), X ~ Binomial(n, 1/2):
    1/8 for 3 of 3, 1/64 for 6 of 6, 7/64 for 5 of 6, 1 for none; as scipy's binomtest."""
    from scipy.stats import binomtest

    from depthlab.analysis import sign_test

    assert sign_test([True] * 3) == 1 / 8
    assert sign_test(torch.tensor([0.5, 0.9, 0.7, 0.2, 0.8, 0.4]) < 1) == 1 / 64
    assert sign_test([True] * 5 + [False]) == 7 / 64
    assert sign_test([False] * 4) == 1.0
    for n in range(1, 9):
        for k in range(n + 1):
            want = binomtest(k, n, 0.5, alternative="greater").pvalue
            assert sign_test([True] * k + [False] * (n - k)) == pytest.approx(want, rel=1e-12)


def test_paired_t_test_is_scipys_one_sided_paired_test():
    """analysis.paired_t_test (chapters 5 and 6) is scipy's paired t-test, one-sided."""
    import numpy as np
    from scipy.stats import ttest_rel

    from depthlab.analysis import paired_t_test
    a, b = [0.71, 0.69, 0.75, 0.66, 0.70, 0.73], [0.62, 0.66, 0.64, 0.68, 0.60, 0.65]
    d = np.subtract(a, b)
    assert paired_t_test(d) == pytest.approx(ttest_rel(a, b, alternative="greater").pvalue)
    assert paired_t_test(d) < 0.05 < paired_t_test(d, alternative="less")
