import math

import numpy as np
import pytest
import torch
from torch import nn

import depthlab as dl


def _digits_batch():
    return [dl.Digits(batch_size=128).batch(0)]


def test_sigmoid_mlp_vanishes_and_relu_kaiming_does_not():
    sig = dl.gradient_profile(dl.DeepMLP(dl.MLPConfig(depth=20, activation="sigmoid")),
                              _digits_batch(), saturation="sigmoid")
    relu = dl.gradient_profile(dl.DeepMLP(dl.MLPConfig(depth=20, activation="relu",
                                                       init="kaiming")), _digits_batch())
    # sigmoid' <= 1/4 per layer: 19 layers lose many decades
    assert sig.ratio < 1e-6
    # Kaiming keeps the gradient scale of ReLU layers: within a decade over 20 layers
    assert 0.1 < relu.ratio < 10
    assert "vanish" in sig.describe()


def test_tiny_gradients_do_not_underflow_to_zero():
    """At depth 30 the first layer's gradient entries are ~1e-28: their squares underflow in
    float32 (a float32 norm gives exactly 0), so the profile must square in float64."""
    model = dl.DeepMLP(dl.MLPConfig(depth=30, activation="sigmoid"))
    prof = dl.gradient_profile(model, _digits_batch(), keep_samples=True)
    g0 = prof.recorder.grad_samples[0]
    assert g0.norm().item() == 0.0                  # what a float32 norm reports
    assert 0 < prof.act_grad_norm[0] < 1e-20


def test_profile_of_a_foreign_module_and_hooks_are_removed():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
        num_layers=5, enable_nested_tensor=False)
    assert len(dl.find_layers(enc)) == 5
    x, y = torch.randn(4, 6, 32), torch.randn(4, 6, 32)
    prof = dl.gradient_profile(enc, [(x, y)], loss_fn=lambda o, t: (o - t).pow(2).mean())
    assert prof.n_layers == 5
    assert np.all(prof.act_grad_norm > 0) and np.all(np.isfinite(prof.weight_grad_norm))
    assert all(len(layer._forward_hooks) == 0 for layer in enc.layers)
    assert all(p.grad is None for p in enc.parameters())


def test_record_counts_passes_and_saturation():
    model = dl.DeepMLP(dl.MLPConfig(depth=3, activation="tanh", init="normal", init_gain=5.0))
    x = torch.randn(64, 64)
    with dl.record(model, saturation="tanh") as rec:
        model(x).sum().backward()
        model(x).sum().backward()
    prof = rec.profile()
    assert len(rec.act_grad[0]) == 2
    assert prof.saturation[1] > 0.8                 # huge weights: tanh units pinned at ±1
    assert len(model.layers[0]._forward_hooks) == 0


def test_token_similarity_detects_collapse():
    same = torch.randn(2, 1, 16).expand(2, 8, 16)
    assert abs(dl.token_similarity(same) - 1.0) < 1e-9
    rand = torch.randn(4, 64, 256)
    assert abs(dl.token_similarity(rand)) < 0.02


def test_weight_gradient_differs_from_activation_gradient():
    prof = dl.gradient_profile(dl.DeepMLP(dl.MLPConfig(depth=6)), _digits_batch())
    assert np.all(prof.weight_grad_norm > 0)
    assert not np.allclose(prof.weight_grad_norm, prof.act_grad_norm)


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


def test_per_layer_factor_is_the_geometric_mean():
    prof = dl.LayerProfile(np.array([1e-4, 1e-2, 1.0]), np.ones(3), *(np.zeros(3),) * 4)
    assert math.isclose(prof.per_layer_factor(), 1e-2)


def test_product_of_jacobians_prediction_matches_measurement():
    from depthlab.diagnostics import predicted_gradient_factors

    x, y = dl.Digits(batch_size=256).batch(0)
    for act, init in (("sigmoid", "xavier"), ("tanh", "kaiming"), ("relu", "normal")):
        model = dl.DeepMLP(dl.MLPConfig(depth=12, activation=act, init=init))
        measured = dl.gradient_profile(model, [(x, y)]).measured_factors()
        predicted = predicted_gradient_factors(model, x)
        assert predicted.shape == measured.shape == (11,)
        # the mean-field prediction is good to about 10 % per layer at width 64
        assert np.median(np.abs(np.log10(predicted / measured))) < 0.1, (act, init)


def test_prediction_refuses_models_it_does_not_describe():
    import pytest

    from depthlab.diagnostics import predicted_gradient_factors

    with pytest.raises(ValueError, match="plain"):
        predicted_gradient_factors(dl.DeepMLP(dl.MLPConfig(residual=True)), torch.randn(4, 64))


def test_softmax_jacobian_norms():
    from depthlab.diagnostics import softmax_jacobian_norms

    T = 8
    uniform = torch.full((T,), 1 / T)
    one_hot = torch.eye(T)[0]
    pair = torch.tensor([0.5, 0.5] + [0.0] * (T - 2))
    norms = softmax_jacobian_norms(torch.stack([uniform, one_hot, pair]))
    assert torch.allclose(norms, torch.tensor([1 / T, 0.0, 0.5], dtype=torch.float64),
                          atol=1e-9)


def test_attention_maps_are_what_the_fused_kernel_computes():
    from depthlab.diagnostics import attention_maps

    model = dl.SequenceModel(dl.TransformerConfig(d_model=32, n_layers=3))
    x, _ = dl.SequenceTask(n=5).batch(0)
    maps = attention_maps(model, x)
    assert len(maps) == 3 and maps[0].shape == (32, 4, 10, 10)
    assert torch.allclose(maps[0].sum(-1), torch.ones(32, 4, 10), atol=1e-5)
    assert maps[0][..., 0, 1:].abs().max() == 0            # causal: token 0 sees only itself
    attn = model.layers[0].attn
    h = torch.randn(2, 10, 32)
    a = attn.attention_weights(h)                           # (B, H, T, T)
    v = attn.qkv(h)[..., 64:].view(2, 10, 4, 8).transpose(1, 2)
    manual = attn.proj((a @ v).transpose(1, 2).reshape(2, 10, 32))
    assert (manual - attn(h)).abs().max() < 1e-5


def test_jacobian_singular_values():
    from depthlab.diagnostics import jacobian_singular_values

    w = torch.randn(5, 5)
    sv = jacobian_singular_values(lambda v: w @ v, torch.randn(5))
    assert torch.allclose(sv, torch.linalg.svdvals(w.double()), atol=1e-5)
    ident = jacobian_singular_values(lambda v: v * 1.0, torch.randn(2, 3))
    assert torch.allclose(ident, torch.ones(6, dtype=torch.float64))


def test_ablate_removes_a_layer_and_puts_it_back():
    from depthlab.diagnostics import ablate

    model = dl.DeepMLP(dl.MLPConfig(depth=4, residual=True))
    x = torch.randn(3, 64)
    before = model(x)
    third = model.layers[2]
    with ablate(model, 2):
        assert isinstance(model.layers[2], nn.Identity)
        assert not torch.allclose(model(x), before)
    assert model.layers[2] is third and torch.equal(model(x), before)


def test_output_change_sees_batchnorm_mixing_sequences_and_not_layernorm():
    from depthlab.diagnostics import output_change

    torch.manual_seed(0)
    x = torch.randint(1, 16, (6, 10))
    others = x.clone()
    others[1:] = torch.randint(1, 16, (5, 10))               # sequence 0 stays the same
    change = {}
    for kind in ("layer", "batch"):
        model = dl.SequenceModel(dl.TransformerConfig(d_model=32, n_layers=2, norm_kind=kind))
        model.eval()
        change[kind] = output_change(model, x, others, at=0)
        assert not model.training                           # mode restored
        assert output_change(model, x, others, at=0, train_mode=False) == 0.0  # running stats
    assert change["layer"] == 0.0
    assert change["batch"] > 1e-2


def test_compare_times_returns_every_function_and_can_include_backward():
    from depthlab.diagnostics import compare_times

    w = torch.ones(3, requires_grad=True)
    calls = []
    seconds = compare_times({"a": lambda: calls.append(1), "b": lambda: None}, repeats=2,
                            rounds=3)
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
    assert len(calls) == 1 + 2 * 3                            # warm-up, then rounds x repeats
    compare_times({"grad": lambda: 2 * w}, repeats=2, rounds=1, backward=True)
    assert torch.equal(w.grad, torch.full((3,), 2.0 * 3))     # 3 backward passes of d(2w)/dw


def _bn_mlp(**kw):
    return dl.DeepMLP(dl.MLPConfig(depth=4, width=16, norm_kind="batch", **kw), seed=0)


def test_probing_leaves_running_statistics_mode_and_random_state_alone():
    from depthlab.diagnostics import probing

    model = _bn_mlp(norm_noise=0.3).eval()
    before = model.layers[0].norm.running_mean.clone()
    state = torch.random.get_rng_state()
    with probing(model, seed=3):
        assert model.training
        model(torch.randn(8, 64))
    assert not model.training
    assert torch.equal(model.layers[0].norm.running_mean, before)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_measurement_callbacks_do_not_change_the_training_run():
    from depthlab.diagnostics import GradientICS, InputDrift, Smoothness

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
    from depthlab.diagnostics import GradientICS

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
    from depthlab.diagnostics import InputDrift

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


def _broken_transformer(depth=8, **changes):
    cfg = dl.TransformerConfig(d_model=32, n_layers=depth, max_len=12, norm_placement="none",
                               norm_kind="none", residual=False).replace(**changes)
    return dl.SequenceModel(cfg, seed=0)


def test_diagnose_names_vanishing_and_rank_collapse_and_clears_a_healthy_model():
    from depthlab.diagnostics import diagnose

    batch = dl.SequenceTask("sort", n=6, batch_size=16).batch(0)
    broken = _broken_transformer()
    before = [p.detach().clone() for p in broken.parameters()]
    d = diagnose(broken, batch)
    assert d.ratio < 1e-4 and d.update_log10.shape == (8,)
    text = d.report()
    assert "vanish" in text and "rank collapse" in text and "barely moves" in text
    assert all(torch.equal(a, b) for a, b in zip(before, broken.parameters()))  # unchanged
    healthy = diagnose(_broken_transformer(norm_placement="pre", norm_kind="layer",
                                           residual=True), batch)
    assert "no problem found" in healthy.report()
    assert "**Diagnosis**" in healthy._repr_markdown_()


def test_diagnose_works_on_a_foreign_encoder():
    from depthlab.diagnostics import diagnose

    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                          batch_first=True),
                                num_layers=3, enable_nested_tensor=False)
    x = torch.randn(4, 5, 16)
    y = torch.randint(0, 16, (4, 5))                # the 16 output features act as classes
    d = diagnose(enc, (x, y))
    assert d.profile.n_layers == 3 and np.isfinite(d.update_log10).all()
    assert np.isnan(d.saturation).all()             # PyTorch's layer calls F.relu: unseen
    assert d.findings and "ratio" in d.findings[0]


def test_checkpointing_keeps_gradients_and_cuts_activation_memory():
    from depthlab.diagnostics import activation_memory
    from depthlab.models import gradient_checkpointing

    model = _broken_transformer(depth=6, norm_placement="pre", norm_kind="layer",
                                residual=True)
    x, y = dl.SequenceTask("sort", n=6, batch_size=8).batch(0)

    def grads():
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 16), y.reshape(-1),
                                                 ignore_index=dl.IGNORE)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    full = activation_memory(model, x, y)
    with gradient_checkpointing(model):
        assert model.encoder.checkpoint
        checked = grads()
        small = activation_memory(model, x, y)
    assert not model.encoder.checkpoint
    assert max((a - b).abs().max().item() for a, b in zip(plain, checked)) < 1e-6
    assert small < full / 3
    with pytest.raises(ValueError, match="Encoder"):
        with gradient_checkpointing(nn.Linear(2, 2)):
            pass


def test_float16_gradients_underflow_where_bfloat16_do_not():
    from depthlab.diagnostics import gradient_precision

    model = _broken_transformer(depth=8)
    x, y = dl.SequenceTask("sort", n=6, batch_size=16).batch(0)
    bf16 = gradient_precision(model, x, y, torch.bfloat16)
    fp16 = gradient_precision(model, x, y, torch.float16)
    scaled = gradient_precision(model, x, y, torch.float16, loss_scale=2.0 ** 16)
    assert bf16.underflow.max() < 0.01
    assert fp16.underflow[0] > 0.9 and fp16.ratio == 0.0       # the first layer flushed to 0
    assert scaled.underflow[0] < fp16.underflow[0]
    assert 0 < scaled.ratio < 1e-4                             # back in range, still vanishing


def test_activation_saturation_counts_dead_relus_and_saturated_sigmoids():
    from depthlab.diagnostics import activation_saturation

    x = dl.Digits(batch_size=64).batch(0)[0]
    sig = dl.DeepMLP(dl.MLPConfig(depth=3, activation="sigmoid", init="normal"))
    assert activation_saturation(sig, x).min() > 0.3           # N(0, 1) weights saturate
    relu = dl.DeepMLP(dl.MLPConfig(depth=3, init="kaiming"))
    assert activation_saturation(relu, x).max() < 0.2          # half off per input, few dead
    assert np.isnan(activation_saturation(nn.Sequential(nn.Linear(64, 8)), x,
                                          layers=[nn.Linear(1, 1)])[0])


def test_describe_names_overflow_underflow_and_dead_ends():
    from depthlab.diagnostics import LayerProfile

    def profile(grads):
        g = np.array(grads, dtype=float)
        return LayerProfile(g, g, g, g, g, g)

    assert "overflowed" in profile([np.nan, 1.0]).describe()
    assert "overflowed" in profile([np.inf, 1.0]).describe()
    assert "does not reach layer 0" in profile([0.0, 1.0]).describe()
    assert "receives no gradient" in profile([1.0, 0.0]).describe()
    assert "vanish" in profile([1e-5, 1.0]).describe()


def test_running_mean_stream_follows_the_moving_average_formula():
    from depthlab.diagnostics import running_mean_stream

    spread, trace = running_mean_stream(0.1, 4, mean=3.0, sd=2.0, steps=200, seed=0)
    predicted = 2.0 * math.sqrt(0.1 / ((2 - 0.1) * 4))         # σ √(m / ((2 − m) B))
    assert 0.8 < spread / predicted < 1.2
    assert trace.shape == (200,) and trace[0] == pytest.approx(0.3, abs=0.2)  # 0.9·0 + 0.1·x̄
    assert abs(trace[-50:].mean() - 3.0) < 0.5
