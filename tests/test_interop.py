"""Loading PyTorch's encoder layer into a depthlab Block: refused unless both compute the same
function, and then equal to float round-off."""

import pytest
import torch
from torch import nn

import depthlab as dl
from depthlab import reference

TOL = 1e-5


def test_a_layer_with_other_heads_is_refused_naming_the_field():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    block = dl.Block(dl.config_from_torch_layer(layer, n_heads=2))
    with pytest.raises(ValueError, match="n_heads: block has 2, the PyTorch layer has 4"):
        dl.load_torch_encoder_layer(block, layer)


@pytest.mark.parametrize("change, field", [
    ({"mlp_ratio": 4.0}, "d_mlp"), ({"activation": "gelu"}, "activation"),
    ({"norm_eps": 1e-6}, "norm_eps"), ({"norm_placement": "pre"}, "norm_placement"),
    ({"bias": False}, "bias"), ({"beta_ff": 0.5}, "beta_ff"),
    ({"attention": "shaped"}, "attention"), ({"attention": "value_skipinit"}, "attention"),
    ({"parallel": True, "norm_placement": "pre"}, "parallel"), ({"qk_norm": True}, "qk_norm"),
])
def test_every_setting_that_changes_the_function_is_compared(change, field):
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    block = dl.Block(dl.config_from_torch_layer(layer, **change))
    with pytest.raises(ValueError, match=field):
        dl.load_torch_encoder_layer(block, layer)


def test_a_block_without_values_is_refused_before_any_copy():
    """identity_values has no value or output matrix to copy into: refused by name, not by a
    shape error halfway through the copy."""
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    block = dl.Block(dl.config_from_torch_layer(layer, identity_values=True))
    with pytest.raises(ValueError, match="identity_values"):
        dl.load_torch_encoder_layer(block, layer)


def test_a_layer_without_biases_loads_and_matches():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, bias=False)
    assert dl.config_from_torch_layer(layer).bias is False
    diffs = dl.torch_parity(layer, torch.randn(2, 5, 32))
    assert diffs["output"] <= TOL and diffs["input_grad"] <= TOL, diffs


def test_parity_refuses_a_layer_with_dropout():
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    with pytest.raises(ValueError, match="dropout"):
        dl.torch_parity(layer, torch.randn(2, 5, 32))


def test_the_tutorial_loader_checks_too():
    layer = reference.TutorialEncoderLayer(d_model=32, n_heads=4, d_ff=64)
    wrong = dl.Block(layer.depthlab_config().replace(n_heads=2))
    with pytest.raises(ValueError, match="n_heads"):
        reference.load_tutorial_layer(wrong, layer)
    assert reference.tutorial_parity(layer, torch.randn(2, 5, 32)) <= TOL
