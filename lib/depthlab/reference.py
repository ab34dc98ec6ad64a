"""Reference layers written the way tutorials and blog posts write them, for comparison.

``TutorialEncoderLayer`` is a BERT-style encoder layer built on ``nn.MultiheadAttention``, the
form readers meet in tutorials: Post-LN, GELU, dropout on both branches. Chapter 2 loads its
weights into a depthlab ``Block`` and shows the two compute the same function.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import models
from .config import TransformerConfig
from .interop import check_same_block, copy_encoder_weights
from .models import Block


class TutorialEncoderLayer(nn.Module):
    """x -> LN(x + MHA(x)) -> LN(· + FFN(·)), as in BERT (Post-LN). x: (B, T, D) -> (B, T, D)."""

    def __init__(self, d_model: int = 64, n_heads: int = 4, d_ff: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(d_model, n_heads, dropout=dropout,
                                               batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.feed_forward = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(),
                                          nn.Linear(d_ff, d_model))
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        attended, _ = self.attention(x, x, x, key_padding_mask=key_padding_mask,
                                     need_weights=False)
        x = self.norm1(x + self.dropout(attended))            # add, then normalise: Post-LN
        return self.norm2(x + self.dropout(self.feed_forward(x)))

    def depthlab_config(self) -> TransformerConfig:
        """The ``TransformerConfig`` of the equivalent one-block depthlab stack."""
        d = self.norm1.normalized_shape[0]
        return TransformerConfig(
            d_model=d, n_heads=self.attention.num_heads, n_layers=1,
            mlp_ratio=self.feed_forward[0].out_features / d, norm_placement="post",
            norm_kind="layer", final_norm=False, causal=False, activation="gelu",
            norm_eps=self.norm1.eps, dropout=self.dropout.p)


def load_tutorial_layer(block: Block, layer: TutorialEncoderLayer) -> Block:
    """Copy a ``TutorialEncoderLayer``'s weights into a Post-LN depthlab ``Block``.

    The block must compute the same function (checked field by field, as for PyTorch's layer).
    """
    check_same_block(block, layer.depthlab_config(), "the tutorial layer")
    mha = layer.attention
    return copy_encoder_weights(block, in_proj_weight=mha.in_proj_weight,
                                in_proj_bias=mha.in_proj_bias, out_proj=mha.out_proj,
                                linear1=layer.feed_forward[0], linear2=layer.feed_forward[2],
                                norm1=layer.norm1, norm2=layer.norm2)


def tutorial_parity(layer: TutorialEncoderLayer, x: Tensor) -> float:
    """Max abs output difference between ``layer`` and a depthlab Block loaded with its weights.

    Both are compared in eval mode (dropout off). x: (B, T, D).
    """
    block = load_tutorial_layer(Block(layer.depthlab_config()), layer).to(x.device)
    was_training = layer.training
    layer.eval()
    block.eval()
    try:
        with torch.no_grad():
            return (layer(x) - block(x)).abs().max().item()
    finally:
        layer.train(was_training)


def norm_parity(x: Tensor, eps: float = 1e-5) -> dict[str, float]:
    """Max abs difference between depthlab's written-out norms and PyTorch's layers on ``x``.

    x: (B, T, D). Compares ``models.layer_norm`` with ``nn.LayerNorm``, ``models.rms_norm``
    with ``nn.RMSNorm`` and ``models.batch_norm`` with ``nn.BatchNorm1d`` in training mode.
    ``nn.BatchNorm1d`` wants the features on axis 1, (B, D, T), so the reference call
    transposes: forgetting that normalises over the wrong axis without any error (chapter 3).
    Default affine parameters (weight 1, bias 0) on both sides.
    """
    d = x.shape[-1]
    kw = {"device": x.device, "dtype": x.dtype}               # compare where x lives
    ones, zeros = torch.ones(d, **kw), torch.zeros(d, **kw)
    with torch.no_grad():
        pairs = {
            "LayerNorm": (models.layer_norm(x, ones, zeros, eps),
                          nn.LayerNorm(d, eps=eps, **kw)(x)),
            "RMSNorm": (models.rms_norm(x, ones, eps), nn.RMSNorm(d, eps=eps, **kw)(x)),
            "BatchNorm": (models.batch_norm(x, ones, zeros, eps),
                          nn.BatchNorm1d(d, eps=eps, **kw)(x.transpose(1, 2)).transpose(1, 2)),
        }
    return {name: (ours - theirs).abs().max().item() for name, (ours, theirs) in pairs.items()}
