import math

import numpy as np
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


def test_per_layer_factor_is_the_geometric_mean():
    prof = dl.LayerProfile(np.array([1e-4, 1e-2, 1.0]), np.ones(3), *(np.zeros(3),) * 4)
    assert math.isclose(prof.per_layer_factor(), 1e-2)


def test_ablate_removes_a_layer_and_puts_it_back():
    from depthlab.measure import ablate

    model = dl.DeepMLP(dl.MLPConfig(depth=4, residual=True))
    x = torch.randn(3, 64)
    before = model(x)
    third = model.layers[2]
    with ablate(model, 2):
        assert isinstance(model.layers[2], nn.Identity)
        assert not torch.allclose(model(x), before)
    assert model.layers[2] is third and torch.equal(model(x), before)


def test_output_change_sees_batchnorm_mixing_sequences_and_not_layernorm():
    from depthlab.measure import output_change

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


def test_activation_saturation_counts_dead_relus_and_saturated_sigmoids():
    from depthlab.measure import activation_saturation

    x = dl.Digits(batch_size=64).batch(0)[0]
    sig = dl.DeepMLP(dl.MLPConfig(depth=3, activation="sigmoid", init="normal"))
    assert activation_saturation(sig, x).min() > 0.3           # N(0, 1) weights saturate
    relu = dl.DeepMLP(dl.MLPConfig(depth=3, init="kaiming"))
    assert activation_saturation(relu, x).max() < 0.2          # half off per input, few dead
    assert np.isnan(activation_saturation(nn.Sequential(nn.Linear(64, 8)), x,
                                          layers=[nn.Linear(1, 1)])[0])


def test_describe_names_overflow_underflow_and_dead_ends():
    from depthlab.measure import LayerProfile

    def profile(grads):
        g = np.array(grads, dtype=float)
        return LayerProfile(g, g, g, g, g, g)

    assert "overflowed" in profile([np.nan, 1.0]).describe()
    assert "overflowed" in profile([np.inf, 1.0]).describe()
    assert "does not reach layer 0" in profile([0.0, 1.0]).describe()
    assert "receives no gradient" in profile([1.0, 0.0]).describe()
    assert "vanish" in profile([1e-5, 1.0]).describe()


def test_output_change_under_update_matches_a_linear_layer_and_restores_it():
    from depthlab.measure import output_change_under_update

    layer = nn.Linear(64, 32, bias=False)
    before = layer.weight.detach().clone()
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    got = output_change_under_update(layer, x, 1e-3, seed=1)
    # every output is a sum of 64 terms ±1e-3·x_j: its RMS is 1e-3 · RMS ‖x‖
    expected = 1e-3 * x.pow(2).sum(1).mean().sqrt().item()
    assert abs(got / expected - 1) < 0.1, (got, expected)
    assert torch.equal(layer.weight, before)
    assert abs(output_change_under_update(layer, x, 2e-3, seed=1) / got - 2) < 1e-4  # float32
