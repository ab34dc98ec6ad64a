"""PyTorch interop: load ``nn.TransformerEncoderLayer`` weights into a depthlab ``Block``.

"Our block is PyTorch's block" is a parity claim the book checks (chapter 0), so the loader
refuses to copy weights into a block that computes something else: every setting that changes
the function (width, heads, MLP width, biases, activation, epsilon, norm kind and placement,
gains, the simplified blocks' attention, identity values and parallel layout) is compared
first and a mismatch is named. One copy function serves every layer that stores its weights
the way ``nn.MultiheadAttention`` does (``reference.TutorialEncoderLayer`` too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TransformerConfig
from .models import Block


def _activation_name(act) -> str:
    if isinstance(act, nn.Module):
        name = {nn.ReLU: "relu", nn.GELU: "gelu"}.get(type(act))
    else:
        name = {F.relu: "relu", F.gelu: "gelu"}.get(act) if callable(act) else None
    if name is None:
        raise ValueError(f"unsupported activation {act!r}: depthlab mirrors relu and gelu")
    return name


def config_from_torch_layer(layer: nn.TransformerEncoderLayer, **overrides) -> TransformerConfig:
    """The ``TransformerConfig`` of a single-layer stack equivalent to a PyTorch encoder layer."""
    fields = dict(
        d_model=layer.linear1.in_features,
        n_heads=layer.self_attn.num_heads,
        n_layers=1,
        mlp_ratio=layer.linear1.out_features / layer.linear1.in_features,
        norm_placement="pre" if layer.norm_first else "post",
        norm_kind="layer",
        final_norm=False,
        causal=False,
        activation=_activation_name(layer.activation),
        norm_eps=layer.norm1.eps,
        bias=layer.linear1.bias is not None,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def check_same_block(block: Block, want: TransformerConfig, what: str) -> None:
    """Raise naming every setting in which ``block`` differs from the layer described by
    ``want``: those that change the function the block computes."""
    have = block.cfg
    checks = [
        ("d_model", have.d_model, want.d_model),
        ("n_heads", have.n_heads, want.n_heads),
        ("d_mlp (mlp_ratio · d_model)", have.d_mlp, want.d_mlp),
        ("bias", have.bias, want.bias),
        ("activation", have.activation, want.activation),
        ("norm_eps", have.norm_eps, want.norm_eps),
        ("norm_placement", have.norm_placement, want.norm_placement),
        ("norm_kind", have.norm_kind, want.norm_kind),
        ("residual", have.residual, True),
        ("alpha_sa, beta_sa, alpha_ff, beta_ff",
         (have.alpha_sa, have.beta_sa, have.alpha_ff, have.beta_ff), (1.0, 1.0, 1.0, 1.0)),
        # He & Hofmann's simplified blocks (chapter 7) are other functions of the same weights
        ("attention", have.attention, "softmax"),
        ("identity_values", have.identity_values, False),
        ("value_gain", have.value_gain, None),
        ("parallel", have.parallel, False),
        ("qk_norm", have.qk_norm, False),
    ]
    wrong = [f"{name}: block has {a!r}, {what} has {b!r}" for name, a, b in checks if a != b]
    if wrong:
        raise ValueError(f"cannot load {what} into this Block, they compute different "
                         "functions; " + "; ".join(wrong))


@torch.no_grad()
def copy_encoder_weights(block: Block, *, in_proj_weight: Tensor, in_proj_bias: Tensor | None,
                         out_proj: nn.Linear, linear1: nn.Linear, linear2: nn.Linear,
                         norm1: nn.LayerNorm, norm2: nn.LayerNorm) -> Block:
    """Copy attention (stacked q, k, v), MLP and norm weights into ``block``; returns it."""
    block.attn.qkv.weight.copy_(in_proj_weight)               # (3D, D): q, k, v stacked
    pairs = [(block.attn.proj, out_proj), (block.mlp.fc1, linear1), (block.mlp.fc2, linear2)]
    for ours, theirs in pairs:
        ours.weight.copy_(theirs.weight)
    if block.cfg.bias:
        block.attn.qkv.bias.copy_(in_proj_bias)
        for ours, theirs in pairs:
            ours.bias.copy_(theirs.bias)
    for ours, theirs in ((block.norm1, norm1), (block.norm2, norm2)):
        ours.weight.copy_(theirs.weight)
        if getattr(theirs, "bias", None) is not None:
            ours.bias.copy_(theirs.bias)
        ours.eps = theirs.eps
    return block


def load_torch_encoder_layer(block: Block, layer: nn.TransformerEncoderLayer) -> Block:
    """Copy the weights of ``nn.TransformerEncoderLayer`` into a depthlab ``Block``.

    Requires ``batch_first=True`` and a block that computes the same function (checked field by
    field; a mismatch raises and names it). After loading, both compute the same function
    (chapter 0 test).
    """
    if not layer.self_attn.batch_first:
        raise ValueError("load_torch_encoder_layer expects batch_first=True")
    check_same_block(block, config_from_torch_layer(layer), "the PyTorch layer")
    mha = layer.self_attn
    return copy_encoder_weights(block, in_proj_weight=mha.in_proj_weight,
                                in_proj_bias=mha.in_proj_bias, out_proj=mha.out_proj,
                                linear1=layer.linear1, linear2=layer.linear2,
                                norm1=layer.norm1, norm2=layer.norm2)


def torch_parity(layer: nn.TransformerEncoderLayer, x: Tensor) -> dict[str, float]:
    """Max abs differences between a PyTorch encoder layer and a depthlab ``Block`` loaded with
    its weights, on input x: (B, T, D). Keys: "output" and "input_grad" (of sum of squares).

    Compares in training mode (PyTorch's eval-mode fast path is a different kernel), so the
    layer must have no dropout: with dropout > 0 the two draw different masks and the
    "difference" would be noise, not a fact about the code. The check behind "our block is
    PyTorch's block" in chapter 0.
    """
    if layer.dropout.p > 0:
        raise ValueError(f"torch_parity needs a layer without dropout (got dropout="
                         f"{layer.dropout.p}): build it with dropout=0.0")
    block = load_torch_encoder_layer(Block(config_from_torch_layer(layer)), layer)
    block.to(x.device)
    x_theirs = x.detach().clone().requires_grad_(True)
    x_ours = x.detach().clone().requires_grad_(True)
    y_theirs, y_ours = layer(x_theirs), block(x_ours)
    y_theirs.pow(2).sum().backward()
    y_ours.pow(2).sum().backward()
    return {
        "output": (y_theirs - y_ours).abs().max().item(),
        "input_grad": (x_theirs.grad - x_ours.grad).abs().max().item(),
    }
