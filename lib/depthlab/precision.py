"""Reduced precision under the microscope (chapter 6): which gradients float16 flushes to
zero, and which updates a weight stored in low precision cannot absorb.

Works on any ``nn.Module`` whose layers ``measure.find_layers`` can see (or ``layers=``); the
model is left untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .measure import backward, find_layers, layer_grad_norms, untouched, unwrap


@dataclass
class PrecisionReport:
    """Per-layer gradients computed in reduced precision, against float32 (chapter 6)."""

    dtype: str
    loss_scale: float
    underflow: np.ndarray         # (L,) fraction of nonzero float32 gradient entries that are 0
    weight_grad_norm: np.ndarray  # (L,) gradient norm of each layer's parameters (unscaled)

    @property
    def ratio(self) -> float:
        """First-layer / last-layer weight-gradient norm (0 when the first layer underflowed)."""
        return float(self.weight_grad_norm[0] / self.weight_grad_norm[-1])


def _layer_grads(model: nn.Module, layers: Sequence[nn.Module], batch: tuple[Tensor, Tensor],
                 dtype: torch.dtype | None,
                 loss_scale: float) -> tuple[list[Tensor], list[float]]:
    """Each layer's flattened gradient (float64, unscaled) and its norm, model untouched."""
    with untouched(model):
        backward(model, batch, dtype=dtype, loss_scale=loss_scale)
        grads = [torch.cat([p.grad.detach().reshape(-1).double() / loss_scale
                            for p in layer.parameters() if p.grad is not None])
                 for layer in layers]
        norms = [n / loss_scale for n in layer_grad_norms(layers)]
    return grads, norms


def gradient_precision(model: nn.Module, batch: tuple[Tensor, Tensor], dtype: torch.dtype,
                       *, loss_scale: float = 1.0,
                       layers: Sequence[nn.Module] | None = None) -> PrecisionReport:
    """Compute the gradients under autocast in ``dtype`` and compare with float32.

    float16 has 5 exponent bits: values below about 6e-8 flush to zero, so tiny (vanishing)
    gradients become exactly 0. ``loss_scale`` multiplies the loss before backward and divides
    the gradients after, as a GradScaler does, lifting small gradients into range. bfloat16
    keeps float32's exponent range and so its small gradients.
    """
    model = unwrap(model)
    layers = list(layers) if layers is not None else find_layers(model)
    reference, _ = _layer_grads(model, layers, batch, None, 1.0)
    reduced, norms = _layer_grads(model, layers, batch, dtype, loss_scale)
    underflow = []
    for ref, red in zip(reference, reduced):
        nonzero = ref != 0
        lost = (red == 0) & nonzero
        underflow.append(float(lost.sum()) / max(1, int(nonzero.sum())))
    return PrecisionReport(str(dtype).replace("torch.", ""), loss_scale, np.array(underflow),
                           np.array(norms))


def lost_updates(weights: Tensor, update: Tensor, dtype: torch.dtype) -> float:
    """Fraction of the nonzero entries of ``update`` that leave ``weights`` unchanged when the
    two are added in ``dtype``: the update is below half a unit in the last place of the
    weight and rounds away.

    Where the weights themselves are stored in bfloat16 (8 significant bits) every update
    smaller than about 2^-9 ≈ 0.2 % of the weight is lost; in float32 (24 bits) below about
    6e-8 of it. That is why mixed-precision training keeps a float32 copy of the weights
    (Micikevicius et al. 2018) and why no precision rescues a gradient 13 decades below the
    weights (chapter 6).
    """
    moved = update.detach() != 0               # before the cast: an update that underflows to
    if not moved.any():                        # zero in ``dtype`` is lost too
        raise ValueError("lost_updates: the update has no nonzero entry")
    w = weights.detach().to(dtype)
    unchanged = (w + update.detach().to(dtype)) == w
    return float((unchanged & moved).sum()) / float(moved.sum())
