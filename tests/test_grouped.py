"""Groups of runs trained as one (training.train_group, sweeps.train_grid) give the runs that
dl.train gives one by one, whatever number differs between the members."""

import math
import os

import pytest
import torch

import depthlab as dl
from depthlab import sweeps
from depthlab.callbacks import AttentionLogits, GradientRMS, LayerGradNorms, UpdateRatio
from depthlab.grouped import GroupError, StackedOptimizer

TF = dl.TransformerConfig(d_model=16, n_heads=2, n_layers=2, vocab_size=16, max_len=12)
BASE = dl.TrainConfig(steps=12, lr=3e-3, progress=False)


def _task(seed):
    return dl.SequenceTask("sort", n=6, vocab=16, batch_size=8, seed=seed)


def _alone_and_grouped(cfgs, configs=None, data=_task):
    configs = configs or [TF] * len(cfgs)
    seeds = list(range(len(cfgs)))
    alone = []
    for s, cfg, mc in zip(seeds, cfgs, configs):
        model = dl.SequenceModel(mc, seed=s)
        alone.append((dl.train(model, data(s), cfg), model))
    models = [dl.SequenceModel(mc, seed=s) for s, mc in zip(seeds, configs)]
    hists = dl.train_group(models, [data(s) for s in seeds], cfgs)
    return alone, list(zip(hists, models))


def _assert_same(alone, grouped, rtol=2e-4, probe=None):
    """Same history to float32 round-off, and the same function after training: outputs on a
    probe batch, not raw parameters (Adam turns the round-off gradient of a parameter the loss
    does not depend on, such as a key bias, into steps of about lr in any direction)."""
    for (ha, ma), (hg, mg) in zip(alone, grouped):
        assert ha.status == hg.status and ha.steps_run == hg.steps_run
        for a, g in zip(ha.loss, hg.loss):
            assert abs(a - g) <= rtol * abs(a) + 1e-6, (ha.loss, hg.loss)
        assert hg.lr == pytest.approx(ha.lr, rel=1e-12)
        x = _task(99).eval_batch(16)[0] if probe is None else probe
        with torch.no_grad():
            ya, yg = ma.eval()(x), mg.eval()(x)
        gap = float((ya - yg).abs().max())
        assert gap <= 3e-3 * float(ya.abs().max()), gap


# One kind of number per case: members differing only in that number.
CASES = {
    "seed": [BASE] * 3,
    "learning rate": [BASE.replace(lr=lr) for lr in (1e-3, 3e-3, 1e-2)],
    "warm-up and schedule": [BASE.replace(warmup_steps=w, schedule=s)
                             for w, s in ((0, "constant"), (4, "cosine"), (8, "linear"))],
    "clipping threshold": [BASE.replace(clip_norm=c) for c in (None, 0.5, 0.05)],
    "Adam's L2 decay": [BASE.replace(weight_decay=w) for w in (0.0, 0.1, 0.5)],
    "AdamW's decay, coupled and independent": [
        BASE.replace(optimizer="adamw", weight_decay=0.3),
        BASE.replace(optimizer="adamw", weight_decay=1e-2, independent_decay=True),
        BASE.replace(optimizer="adamw", lr=1e-2, weight_decay=0.0)],
    "SGD with momentum and decay": [BASE.replace(optimizer="sgd", lr=lr, weight_decay=w)
                                    for lr, w in ((0.1, 0.0), (0.3, 1e-2), (0.03, 0.1))],
    "z-loss": [BASE.replace(z_loss=z) for z in (0.0, 1e-2, 1.0)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_member_is_the_run_trained_alone(case):
    _assert_same(*_alone_and_grouped(CASES[case]))


def test_members_may_differ_in_their_initialisation():
    configs = [TF, TF.replace(init="gpt2"), TF.replace(init_gain=3.0, embed_std=0.5)]
    _assert_same(*_alone_and_grouped([BASE] * 3, configs))


def test_mup_members_keep_their_per_parameter_rates():
    cfg = TF.replace(d_model=32, n_heads=2, init="fan_in", mup_base_width=16)
    _assert_same(*_alone_and_grouped([BASE.replace(lr=1e-2)] * 2, [cfg, cfg]))


def test_batchnorm_members_keep_their_own_running_statistics():
    # SGD, not Adam: the bias before a BatchNorm has no true gradient (the norm removes it),
    # and Adam turns its round-off into steps of about lr, which differ with the thread count
    # (1.4 % apart in the outputs at one thread); this test is about the statistics.
    sgd = BASE.replace(optimizer="sgd", lr=0.1)
    mlp = dl.MLPConfig(depth=3, width=32, norm_kind="batch")
    alone = []
    for s in (0, 1):
        model = dl.DeepMLP(mlp, seed=s)
        dl.train(model, dl.Digits(batch_size=16, seed=s), sgd)
        alone.append(model)
    grouped = [dl.DeepMLP(mlp, seed=s) for s in (0, 1)]
    dl.train_group(grouped, [dl.Digits(batch_size=16, seed=s) for s in (0, 1)], sgd)
    x = dl.Digits(seed=0).test[0][:64]
    for a, g in zip(alone, grouped):
        with torch.no_grad():                 # training mode: each batch's own statistics
            ya, yg = a.train()(x), g.train()(x)
        assert float((ya - yg).abs().max()) <= 1e-4 * float(ya.abs().max())
        for name, ba in a.named_buffers():
            bg = dict(g.named_buffers())[name]
            assert torch.allclose(ba.float(), bg.float(), rtol=1e-4, atol=1e-6), name
    assert not torch.allclose(grouped[0].layers[0].norm.running_mean,
                              grouped[1].layers[0].norm.running_mean)      # each its own


def test_a_diverging_member_stops_alone_and_leaves_the_others_unchanged():
    sgd = BASE.replace(optimizer="sgd")
    cfgs = [sgd.replace(lr=0.1), sgd.replace(lr=1e4), sgd.replace(lr=0.03)]
    alone, grouped = _alone_and_grouped(cfgs)
    assert alone[1][0].status == "diverged"
    assert grouped[1][0].status == "diverged"
    assert grouped[1][0].diverged_at == alone[1][0].diverged_at
    assert all(math.isfinite(float(p.detach().abs().max())) for p in grouped[1][1].parameters())
    _assert_same([alone[0], alone[2]], [grouped[0], grouped[2]])


def test_groupable_callbacks_watch_a_member_as_they_watch_it_alone():
    probe = _task(9).eval_batch(4)[0]
    cfgs = [BASE.replace(lr=lr) for lr in (3e-3, 3e-2)]
    watched_alone = []
    for s, cfg in enumerate(cfgs):
        cbs = [AttentionLogits(probe, every=4), GradientRMS(every=3), UpdateRatio(every=5)]
        dl.train(dl.SequenceModel(TF, seed=s), _task(s), cfg, cbs)
        watched_alone.append(cbs)
    cbs = [[AttentionLogits(probe, every=4), GradientRMS(every=3), UpdateRatio(every=5)]
           for _ in cfgs]
    dl.train_group([dl.SequenceModel(TF, seed=s) for s in range(2)], [_task(s) for s in range(2)],
                   cfgs, cbs)
    for a, g in zip(watched_alone, cbs):
        assert a[0].steps == g[0].steps == [0, 4, 8]
        for x, y in zip(a[0].max_logit, g[0].max_logit):
            assert torch.allclose(torch.tensor(x), torch.tensor(y), rtol=1e-3)
        for x, y in zip(a[1].rms, g[1].rms):
            assert torch.allclose(torch.tensor(x), torch.tensor(y), rtol=1e-3)
        assert a[2].steps == g[2].steps
        for x, y in zip(a[2].log10, g[2].log10):
            assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-3)


def test_a_group_says_why_it_cannot_be_one():
    models = [dl.SequenceModel(TF, seed=0), dl.SequenceModel(TF.replace(norm_placement="post"),
                                                             seed=1)]
    with pytest.raises(GroupError, match="configurations"):
        dl.train_group(models, [_task(0), _task(1)], BASE)
    drop = [dl.SequenceModel(TF.replace(dropout=0.1), seed=s) for s in (0, 1)]
    with pytest.raises(GroupError, match="random numbers"):
        dl.train_group(drop, [_task(0), _task(1)], BASE)
    same = [dl.SequenceModel(TF, seed=s) for s in (0, 1)]
    with pytest.raises(GroupError, match="TrainConfig.steps"):
        dl.train_group(same, [_task(0), _task(1)], [BASE, BASE.replace(steps=5)])
    with pytest.raises(GroupError, match="float16"):
        dl.train_group(same, [_task(0), _task(1)], BASE.replace(amp="fp16"))
    with pytest.raises(GroupError, match="LayerGradNorms"):
        dl.train_group(same, [_task(0), _task(1)], BASE, [[LayerGradNorms()], []])
    marked = [dl.SequenceModel(TF, seed=s) for s in (0, 1)]
    marked[1].head.weight.lr_scale = 0.1
    with pytest.raises(GroupError, match="lr_scale"):
        dl.train_group(marked, [_task(0), _task(1)], BASE)
    foreign = [torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
               for _ in (0, 1)]
    with pytest.raises(GroupError, match="structure_key"):
        dl.train_group(foreign, [_task(0), _task(1)], BASE)


def test_the_stacked_optimiser_is_torch_optims_arithmetic():
    """One (N, P) matrix, N members with their own rates, against torch.optim per member."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(3, 50, generator=g)
    grads = [torch.randn(3, 50, generator=g) for _ in range(4)]
    lrs, wds = torch.tensor([1e-3, 1e-2, 1e-1]), torch.tensor([0.0, 0.1, 0.3])
    for kind in ("adam", "adamw", "sgd"):
        flat = start.clone().requires_grad_(True)
        opt = StackedOptimizer(flat, torch.ones(50), kind=kind, betas=(0.9, 0.95), eps=1e-8,
                               momentum=0.9, weight_decay=wds,
                               independent=torch.zeros(3, dtype=torch.bool), peak_lr=lrs)
        for gr in grads:
            flat.grad = gr.clone()
            opt.step(lrs)
        for i in range(3):
            p = torch.nn.Parameter(start[i].clone())
            cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                   "sgd": torch.optim.SGD}[kind]
            kw = dict(momentum=0.9) if kind == "sgd" else dict(betas=(0.9, 0.95), eps=1e-8)
            ref = cls([p], lr=float(lrs[i]), weight_decay=float(wds[i]), foreach=True, **kw)
            for gr in grads:
                p.grad = gr[i].clone()
                ref.step()
            assert torch.allclose(flat[i].detach(), p.detach(), rtol=1e-6, atol=1e-7), kind


def test_the_stacked_parameters_are_one_split_of_the_flat_matrix():
    """Each parameter's view comes from one split of ``flat`` (its backward concatenates the
    gradients once), not from a slice per parameter (each slice's backward is a zero-filled
    (N, P) matrix, all of them added up: the grouped step ran x1.4 slower on a 16-layer MLP)."""
    from depthlab.grouped import Stack
    stack = Stack([dl.SequenceModel(TF, seed=s) for s in (0, 1)], torch.device("cpu"))
    views = [v for name, v in stack.parameters_as_dict().items() if name in stack.layout]
    bases = {type(v.grad_fn.next_functions[0][0]).__name__ for v in views}
    assert bases == {"SplitWithSizesBackward0"}, bases


def test_write_back_finds_a_members_tensors_once(monkeypatch):
    """A callback on a member costs two write-backs a step; walking the module each time was
    40 % of chapter 1's grouped training. The second write-back still copies the new values."""
    from depthlab.grouped import Stack
    models = [dl.SequenceModel(TF, seed=s) for s in (0, 1)]
    stack = Stack(models, torch.device("cpu"))
    stack.write_back(1, models[1])
    monkeypatch.setattr(models[1], "named_parameters",
                        lambda *a, **k: pytest.fail("write_back walked the module again"))
    with torch.no_grad():
        stack.flat[1] += 1.0
    stack.write_back(1, models[1])
    views = stack.parameters_as_dict()
    for name in dict(models[0].named_parameters()):            # model 0's names, unpatched
        if name in stack.layout:
            assert torch.equal(getattr_path(models[1], name), views[name][1].detach()), name


def getattr_path(module, dotted):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def test_train_grid_returns_every_point_and_seed_as_a_plain_loop_would():
    def make(point, seed):
        lr, depth = point
        return dl.Run(dl.SequenceModel(TF.replace(n_layers=depth), seed=seed), _task(seed),
                      BASE.replace(lr=lr, seed=seed))

    points = [(1e-3, 1), (1e-2, 1), (1e-2, 2)]
    keep = lambda run: run.history.loss  # noqa: E731
    grouped = dl.train_grid(make, points, [0, 1], keep=keep, group="always", workers=2)
    plain = dl.train_grid(make, points, [0, 1], keep=keep, group="never", workers=1)
    assert list(grouped) == points and all(len(v) == 2 for v in grouped.values())
    for p in points:
        for a, b in zip(plain[p], grouped[p]):
            assert a == pytest.approx(b, rel=2e-4)
    one = dl.train_grid(lambda p: make(p, 5), points[:1], keep=keep)
    assert list(one) == points[:1] and len(one[points[0]]) == BASE.steps


def test_small_models_are_grouped_on_a_cpu_and_wide_ones_are_not():
    small = dl.Run(dl.SequenceModel(TF, seed=0), _task(0), BASE)
    wide = dl.Run(dl.SequenceModel(TF.replace(d_model=256, n_heads=4, n_layers=4), seed=0),
                  _task(0), BASE)
    assert sweeps.run_flops(small) < sweeps.GROUP_BELOW_FLOPS < sweeps.run_flops(wide)
    tasks = sweeps._tasks([small, small, wide, wide], "auto", workers=1)
    assert sorted(map(sorted, tasks)) == [[0, 1], [2], [3]]
    assert sorted(map(sorted, sweeps._tasks([small, small], "never", workers=1))) == [[0], [1]]


def test_a_sweep_never_forks_once_cuda_is_in_use(monkeypatch):
    """A forked child cannot use CUDA once the parent has initialised it, so the sweep runs
    in this process (simulated: no GPU here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    pids = dl.sweep(lambda _: os.getpid(), range(4), workers=2)
    assert set(pids) == {os.getpid()}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert os.getpid() not in dl.sweep(lambda _: os.getpid(), range(4), workers=2)


def test_train_grid_keeps_per_parameter_rates_set_by_hand():
    """Runs that differ only in a hand-set ``lr_scale`` are not put into one group (a group
    steps every member with the first member's scales): each ends as ``dl.train`` leaves it."""
    def make(scale, seed):
        model = dl.SequenceModel(TF, seed=seed)
        model.head.weight.lr_scale = scale
        return dl.Run(model, _task(seed), BASE.replace(lr=1e-2, seed=seed), [])

    scales = [1.0, 1e-3]
    got = dl.train_grid(make, scales, [0], keep=lambda run: run.history.loss[-1],
                        group="always")
    for scale in scales:
        run = make(scale, 0)
        alone = dl.train(run.model, run.data, run.cfg)
        assert got[scale][0] == pytest.approx(alone.loss[-1], rel=1e-4)
    assert got[1.0][0] != pytest.approx(got[1e-3][0], rel=1e-3)     # the scale matters here
