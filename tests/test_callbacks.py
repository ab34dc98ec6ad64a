
import math

import numpy as np
import pytest
import torch

import depthlab as dl


def test_update_ratio_callback():
    cb = dl.UpdateRatio()
    dl.train(dl.DeepMLP(dl.MLPConfig(depth=4)), dl.Digits(batch_size=32),
             dl.TrainConfig(steps=5, lr=1e-3), callbacks=[cb])
    arr = cb.as_array()
    assert arr.shape == (5, 4)
    # Adam moves each weight by about lr: the ratio is lr / typical |w| = 1e-3 / 0.07 ≈ 10^-1.8
    assert np.all((arr > -3.5) & (arr < -1.0)), arr


def test_layer_grad_norms_callback_removes_its_hooks():
    model = dl.DeepMLP(dl.MLPConfig(depth=4))
    cb = dl.LayerGradNorms()
    dl.train(model, dl.Digits(batch_size=32), dl.TrainConfig(steps=3), callbacks=[cb])
    assert len(cb.history) == 3 and all(np.all(h > 0) for h in cb.history)
    assert all(len(layer._forward_hooks) == 0 for layer in model.layers)


def _bn_mlp(**kw):
    return dl.DeepMLP(dl.MLPConfig(depth=4, width=16, norm_kind="batch", **kw), seed=0)


def test_isolated_leaves_running_statistics_mode_and_random_state_alone():
    from depthlab.measure import isolated

    model = _bn_mlp(norm_noise=0.3).eval()
    before = model.layers[0].norm.running_mean.clone()
    state = torch.random.get_rng_state()
    with isolated(model, seed=3):
        assert model.training
        model(torch.randn(8, 64))
    assert not model.training
    assert torch.equal(model.layers[0].norm.running_mean, before)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_measurement_callbacks_do_not_change_the_training_run():
    from depthlab.callbacks import GradientICS, InputDrift, Smoothness

    data = dl.Digits(batch_size=32, seed=0)
    probe = data.batch(999)
    cfg = dl.TrainConfig(steps=12, lr=0.05, optimizer="sgd")
    plain, watched = _bn_mlp(norm_noise=0.2), _bn_mlp(norm_noise=0.2)
    h1 = dl.train(plain, data, cfg)
    cbs = [InputDrift(probe[0], every=4), GradientICS(probe, lr=0.05, every=4),
           Smoothness(probe, every=4)]
    h2 = dl.train(watched, data, cfg, cbs)
    assert h1.loss == h2.loss                                   # bit for bit
    assert cbs[0].steps == [0, 4, 8] and [m.shape for m in cbs[0].mean[0]][1:] == [(16,)] * 3
    assert cbs[0].drift().shape == (4,) and (cbs[0].drift()[1:] > 0).all()
    assert cbs[1].relative[0][0] == 0.0 and (cbs[1].relative[0][1:] > 0).all()
    assert all(np.isfinite(cbs[2].beta)) and all(r >= 0 for r in cbs[2].loss_range)


def test_gradient_ics_matches_its_definition():
    """G'_l: the gradient of layer l after the earlier layers took an SGD step of size lr."""
    from depthlab.callbacks import GradientICS

    model = dl.DeepMLP(dl.MLPConfig(depth=3, width=16), seed=0)
    x, y = dl.Digits(batch_size=32).batch(0)
    ics = GradientICS((x, y), lr=0.1, every=1)
    ics.before_step(0, model)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    params = list(model.parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, params)))
    layer2 = list(model.layers[2].parameters())
    with torch.no_grad():
        for layer in model.layers[:2]:
            for p in layer.parameters():
                p.sub_(0.1 * grads[p])
    moved = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), layer2)
    g0 = torch.cat([grads[p].reshape(-1) for p in layer2])
    g1 = torch.cat([g.reshape(-1) for g in moved])
    assert ics.relative[0][2] == pytest.approx(float((g0 - g1).norm() / g0.norm()), rel=1e-4)


def test_drift_is_zero_when_nothing_moves_and_noise_raises_it():
    from depthlab.callbacks import InputDrift

    probe = dl.Digits(batch_size=32).batch(0)[0]
    still = InputDrift(probe, every=1)
    model = _bn_mlp()
    for step in range(3):                                       # no training in between
        still.after_step(step, model)
    assert np.allclose(still.drift(), 0.0)
    noisy = InputDrift(probe, every=1)
    for step in range(3):
        noisy.after_step(step, _bn_mlp(norm_noise=0.5))
    assert (noisy.drift()[1:] > 0.1).all()


def test_attention_logit_stats_on_a_hand_computed_case():
    """One head, two tokens, queries and keys set by hand: the logits and entropies are
    computed here on paper."""
    import math

    from depthlab.measure import attention_logit_stats

    cfg = dl.TransformerConfig(d_model=2, n_heads=1, n_layers=1, vocab_size=4, max_len=4,
                               bias=False, mlp_ratio=1.0)
    model = dl.Encoder(cfg, seed=0)
    attn = model.layers[0].attn
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.weight[0:2] = torch.eye(2) * 3.0          # W_Q = 3·I
        attn.qkv.weight[2:4] = torch.eye(2)                # W_K = I
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])           # (B=1, T=2, D=2)
    # LayerNorm first (Pre-LN): each token becomes (1, -1) or (-1, 1)
    with torch.no_grad():
        h = model.layers[0].norm1(x)
    q, k = 3 * h, h
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(2)      # row 1 sees tokens 0 and 1
    expected_max = float(logits[0, 1].abs().max())
    p = torch.softmax(logits[0, 1], -1)
    expected_entropy = (0.0 + float(-(p * p.log()).sum())) / 2    # row 0 sees one token
    biggest, entropy = attention_logit_stats(model, x)
    assert biggest[0] == pytest.approx(expected_max, rel=1e-5)
    assert entropy[0] == pytest.approx(expected_entropy, rel=1e-5)
    assert expected_max == pytest.approx(3 * 2 / math.sqrt(2), rel=1e-3)     # 3·‖h‖²/√2


def test_attention_logits_callback_records_without_changing_the_run():
    from depthlab.callbacks import AttentionLogits

    cfg = dl.TransformerConfig(d_model=16, n_heads=2, n_layers=2, max_len=8)
    task = dl.SequenceTask("copy", n=4, batch_size=8, seed=0)
    train_cfg = dl.TrainConfig(steps=6, lr=1e-2, seed=0, progress=False)
    plain = dl.train(dl.SequenceModel(cfg, seed=0), task, train_cfg)
    watch = AttentionLogits(task.batch(99)[0], every=2)
    watched = dl.train(dl.SequenceModel(cfg, seed=0), task, train_cfg, [watch])
    assert watched.loss == plain.loss                      # bit for bit
    assert watch.steps == [0, 2, 4]
    assert all(a.shape == (2,) for a in watch.max_logit)
    assert 0 < watch.entropy[0].max() <= math.log(8)
    assert set(watched.extras[2]) == {"attn_logit/0", "attn_logit/1", "attn_entropy/0",
                                      "attn_entropy/1"}
    with pytest.raises(ValueError, match="attention module"):
        from depthlab.measure import attention_logit_stats
        attention_logit_stats(dl.DeepMLP(dl.MLPConfig(depth=2)), torch.randn(4, 64))


def test_log_partition_is_the_logsumexp_of_the_output_logits_and_shifts_with_them():
    """log Z of a model whose head is set by hand: uniform logits c give log Z = c + ln V."""
    from depthlab.measure import output_log_partition as log_partition

    cfg = dl.TransformerConfig(d_model=16, n_heads=2, n_layers=1, vocab_size=10, max_len=8)
    model = dl.SequenceModel(cfg, seed=0)
    x = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-3.0)
    log_z = log_partition(model, x)
    assert log_z.shape == (2, 8)
    assert torch.allclose(log_z, torch.full((2, 8), -3.0 + math.log(10), dtype=log_z.dtype))
    assert model.training                                   # the model as it was found
    assert all(p.shape == b.shape for p, b in zip(model.parameters(), before))


def test_output_logits_and_gradient_rms_record_without_changing_the_run():
    from depthlab.callbacks import GradientRMS, OutputLogits
    from depthlab.measure import output_log_partition as log_partition

    cfg = dl.TransformerConfig(d_model=16, n_heads=2, n_layers=2, max_len=8)
    task = dl.SequenceTask("copy", n=4, batch_size=8, seed=0)
    train_cfg = dl.TrainConfig(steps=5, lr=1e-2, seed=0, progress=False)
    plain = dl.train(dl.SequenceModel(cfg, seed=0), task, train_cfg)
    probe = task.batch(99)[0]
    logits, grads = OutputLogits(probe, every=2), GradientRMS(every=4)
    model = dl.SequenceModel(cfg, seed=0)
    watched = dl.train(model, task, train_cfg, [logits, grads])
    assert watched.loss == plain.loss                      # bit for bit
    assert logits.steps == [0, 2, 4] and grads.steps == [0, 4]
    last = log_partition(model, probe)                     # step 4 was the last step
    assert logits.log_z_mean[-1] == pytest.approx(float(last.mean()), rel=1e-6)
    assert logits.log_z_min[-1] == pytest.approx(float(last.min()), rel=1e-6)
    matrices = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    assert grads.names == [n for n, _ in matrices]
    want = [float(p.grad.pow(2).mean().sqrt()) for _, p in matrices]   # the last step's grads
    assert grads.rms[-1] == pytest.approx(want, rel=1e-5)
    assert set(watched.extras[4]) >= {"log_z/mean", "grad_rms/min", "grad_rms/median"}
    with pytest.raises(ValueError, match="every"):
        OutputLogits(probe, every=0)
    with pytest.raises(ValueError, match="every"):
        GradientRMS(every=True)


def test_ics_measures_share_one_noise_convention():
    """Chapter 4: both measures of internal covariate shift treat noisy BatchNorm alike. With
    nothing trained (lr 0, the same weights at every record), "fixed" measures exactly 0 in
    both; "fresh" sees the noise of the earlier layers in both, and only theirs: G'_l redraws
    the noise before layer l and replays the draws of layer l and later."""
    from depthlab.callbacks import GradientICS, InputDrift

    x, y = dl.Digits(batch_size=32).batch(0)
    model = _bn_mlp(norm_noise=0.5)
    for layer in model.layers[:2]:                  # layers 0 and 1 draw no noise
        layer.norm.noise = 0.0
    results = {}
    for noise in ("fixed", "fresh"):
        ics = GradientICS((x, y), lr=0.0, every=1, noise=noise)
        drift = InputDrift(x, every=1, noise=noise)
        for step in range(3):
            ics.before_step(step, model)
            drift.after_step(step, model)
        results[noise] = (np.array(ics.relative), drift.drift())
    rel, drift = results["fixed"]
    assert (rel == 0).all() and np.allclose(drift, 0.0)
    rel, drift = results["fresh"]
    # layers 1 and 2 see only noiseless earlier layers: their own (and later) noise is replayed
    assert (rel[:, :3] == 0).all() and (rel[:, 3] > 0.01).all()
    assert np.allclose(drift[:3], 0.0) and drift[3] > 0.01


def test_noise_convention_is_validated():
    from depthlab.callbacks import GradientICS, InputDrift

    x, y = dl.Digits(batch_size=8).batch(0)
    with pytest.raises(ValueError, match="fresh"):
        GradientICS((x, y), lr=0.1, noise="same")
    with pytest.raises(ValueError, match="fixed"):
        InputDrift(x, noise="new")
