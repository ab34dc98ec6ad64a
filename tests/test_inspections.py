"""Every inspection leaves the model exactly as it found it, and looks at the right layers.

"Exactly" means bit for bit: parameters, buffers (BatchNorm's running statistics, which any
forward pass in training mode moves), every parameter's .grad, the train/eval mode of every
submodule, and torch's random state. The models carry BatchNorm and noisy BatchNorm on
purpose: on a model without them most of these checks could not fail.
"""

import numpy as np
import pytest
import torch
from torch import nn

import depthlab as dl
from depthlab import doctor, measure, precision, probes


def _snapshot(model):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.detach().clone() for b in model.buffers()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "rng": torch.random.get_rng_state(),
    }


def _same(a, b):
    def equal(x, y):
        return (x is None and y is None) or (x is not None and y is not None
                                             and torch.equal(x, y))
    return (all(equal(x, y) for x, y in zip(a["params"], b["params"]))
            and all(equal(x, y) for x, y in zip(a["buffers"], b["buffers"]))
            and all(equal(x, y) for x, y in zip(a["grads"], b["grads"]))
            and a["modes"] == b["modes"] and torch.equal(a["rng"], b["rng"]))


def _bn_mlp():
    model = dl.DeepMLP(dl.MLPConfig(depth=4, width=16, norm_kind="batch", norm_noise=0.1),
                       seed=0)
    model.train()
    model.layers[1].eval()              # a mixed mode must survive too
    x, y = dl.Digits(batch_size=16, seed=0).batch(0)
    nn.functional.cross_entropy(model(x), y).backward()        # the caller's own .grad
    return model, (x, y)


def _bn_transformer():
    cfg = dl.TransformerConfig(d_model=16, n_heads=2, n_layers=3, norm_kind="batch",
                               max_len=12)
    model = dl.SequenceModel(cfg, seed=0).train()
    batch = dl.SequenceTask("sort", n=6, batch_size=8, seed=0).batch(0)
    loss, _ = dl.losses.loss_and_accuracy(model(batch[0]), batch[1])
    loss.backward()
    return model, batch


MLP_INSPECTIONS = {
    "gradient_profile": lambda m, b: dl.gradient_profile(m, [b]),
    "activation_saturation": lambda m, b: measure.activation_saturation(m, b),
    "activation_memory": lambda m, b: measure.activation_memory(m, b),
    "gradient_norms_by_layer": lambda m, b: measure.gradient_norms_by_layer(m, b, clip_norm=0.1),
    "parameter_gradients": lambda m, b: measure.parameter_gradients(m, b),
    "output_change": lambda m, b: measure.output_change(m, b, b[0].flip(0)),
    "diagnose": lambda m, b: doctor.diagnose(m, b),
    "doctor": lambda m, b: dl.doctor(m, b),
    "gradient_precision": lambda m, b: precision.gradient_precision(m, b, torch.bfloat16),
}
TRANSFORMER_INSPECTIONS = {
    "attention_maps": lambda m, b: probes.attention_maps(m, b[0]),
    "gradient_profile": lambda m, b: dl.gradient_profile(m, [b]),
    "diagnose": lambda m, b: doctor.diagnose(m, b),
    "doctor": lambda m, b: dl.doctor(m, b),
    "doctor on a data source": lambda m, b: dl.doctor(m, dl.data.TensorData(*b, batch_size=4,
                                                                         seed=0), steps=2),
}


@pytest.mark.parametrize("name", MLP_INSPECTIONS)
def test_inspections_leave_a_batchnorm_mlp_bit_for_bit_as_found(name):
    model, batch = _bn_mlp()
    before = _snapshot(model)
    MLP_INSPECTIONS[name](model, batch)
    assert _same(before, _snapshot(model)), name


@pytest.mark.parametrize("name", TRANSFORMER_INSPECTIONS)
def test_inspections_leave_a_batchnorm_transformer_as_found(name):
    model, batch = _bn_transformer()
    before = _snapshot(model)
    TRANSFORMER_INSPECTIONS[name](model, batch)
    assert _same(before, _snapshot(model)), name


def test_the_prediction_probe_leaves_the_model_alone():
    model = dl.DeepMLP(dl.MLPConfig(depth=5, activation="tanh"), seed=0)
    x, y = dl.Digits(batch_size=32, seed=0).batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    before = _snapshot(model)
    probes.predicted_gradient_factors(model, x)
    assert _same(before, _snapshot(model))


def test_checkpointing_refuses_batchnorm():
    model, batch = _bn_transformer()
    with pytest.raises(ValueError, match="BatchNorm"):
        with dl.models.gradient_checkpointing(model):
            pass
    model.encoder.checkpoint = True                  # set by hand: refused at the forward pass
    with pytest.raises(ValueError, match="twice"):
        model(batch[0])


# --- finding the layers -------------------------------------------------------------------


class _HeadsBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(8, 8) for _ in range(8))

    def forward(self, x):
        return sum(h(x) for h in self.heads) / 8


class _Stack(nn.Module):
    """4 blocks, each with a list of 8 heads inside: the longest list is not the blocks."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_HeadsBlock() for _ in range(4))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_find_layers_prefers_the_blocks_over_the_lists_inside_them():
    model = _Stack()
    assert dl.find_layers(model) == list(model.blocks)
    ours = dl.SequenceModel(dl.TransformerConfig(d_model=16, n_heads=2, n_layers=3))
    assert dl.find_layers(ours) == list(ours.layers)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
                                num_layers=3, enable_nested_tensor=False)
    assert dl.find_layers(enc) == list(enc.layers)


def test_find_layers_names_the_candidates_when_it_cannot_choose():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.decoder = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))

    with pytest.raises(ValueError, match="encoder .*decoder"):
        dl.find_layers(Two())
    with pytest.raises(ValueError, match="layers="):
        dl.find_layers(nn.Linear(3, 3))


def test_a_compiled_model_is_measured_through_the_module_it_wraps():
    model = dl.DeepMLP(dl.MLPConfig(depth=4), seed=0)
    compiled = torch.compile(model)              # compiles lazily: never run here
    batch = dl.Digits(batch_size=32, seed=0).batch(0)
    assert dl.find_layers(compiled) == list(model.layers)
    plain = dl.gradient_profile(model, [batch])
    through = dl.gradient_profile(compiled, [batch])
    assert np.isfinite(through.act_grad_norm).all()
    assert np.array_equal(plain.act_grad_norm, through.act_grad_norm)
