"""Remedies under the microscope (chapter 6): gradients in reduced precision, and a one-call
diagnosis of a model that does not train.

``diagnose`` measures before any remedy is tried: where the gradient vanishes, which layers do
not move, which units are dead, whether the tokens have collapsed. Works on any ``nn.Module``
whose layers ``hooks.find_layers`` can see; the model is left untouched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .callbacks import UpdateRatio
from .hooks import (
    LayerProfile,
    activation_saturation,
    backward,
    find_layers,
    gradient_profile,
    layer_grad_norms,
    untouched,
    unwrap,
)


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


def _layer_grads(model: nn.Module, layers: Sequence[nn.Module], inputs: Tensor,
                 targets: Tensor, dtype: torch.dtype | None,
                 loss_scale: float) -> tuple[list[Tensor], list[float]]:
    """Each layer's flattened gradient (float64, unscaled) and its norm, model untouched."""
    with untouched(model):
        backward(model, inputs, targets, dtype=dtype, loss_scale=loss_scale)
        grads = [torch.cat([p.grad.detach().reshape(-1).double() / loss_scale
                            for p in layer.parameters() if p.grad is not None])
                 for layer in layers]
        norms = [n / loss_scale for n in layer_grad_norms(layers)]
    return grads, norms


def gradient_precision(model: nn.Module, inputs: Tensor, targets: Tensor, dtype: torch.dtype,
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
    reference, _ = _layer_grads(model, layers, inputs, targets, None, 1.0)
    reduced, norms = _layer_grads(model, layers, inputs, targets, dtype, loss_scale)
    underflow = []
    for ref, red in zip(reference, reduced):
        nonzero = ref != 0
        lost = (red == 0) & nonzero
        underflow.append(float(lost.sum()) / max(1, int(nonzero.sum())))
    return PrecisionReport(str(dtype).replace("torch.", ""), loss_scale, np.array(underflow),
                           np.array(norms))


@dataclass
class Diagnosis:
    """What ``diagnose`` measured on one batch, and what it concludes. Arrays are (L,)."""

    profile: LayerProfile
    update_log10: np.ndarray      # log10 ‖ΔW‖/‖W‖ of each layer after one optimiser step
    saturation: np.ndarray        # fraction of saturated or dead units (NaN: none found)
    findings: list[str]

    @property
    def ratio(self) -> float:
        return self.profile.ratio

    def report(self) -> str:
        """The findings as a short bulleted text."""
        return "\n".join(f"- {f}" for f in self.findings)

    def _repr_markdown_(self) -> str:
        return "**Diagnosis**\n\n" + self.report()


def diagnose(model: nn.Module, batch: tuple[Tensor, Tensor], train_cfg=None, *,
             layers: Sequence[nn.Module] | None = None) -> Diagnosis:
    """Examine a model on one batch before trying any remedy (chapter 6).

    Measures, per layer: the activation-gradient norm (the first/last ratio tells vanishing
    from exploding), the update-to-weight ratio of one optimiser step taken with ``train_cfg``
    (default: Adam at 1e-3) on a copy of the model, the fraction of saturated or dead units,
    and the token similarity (rank collapse). ``findings`` says in words what is wrong. Works
    on any ``nn.Module`` whose layers ``find_layers`` can see; the model is left unchanged.
    """
    from .config import TrainConfig
    from .training import train

    model = unwrap(model)
    cfg = (train_cfg or TrainConfig(lr=1e-3)).replace(steps=1, progress=False)
    layers = list(layers) if layers is not None else find_layers(model)
    profile = gradient_profile(model, [batch], layers=layers)
    saturation = activation_saturation(model, batch[0], layers)

    names = {id(m): n for n, m in model.named_modules()}
    clone = copy.deepcopy(model)
    clone_modules = dict(clone.named_modules())
    watch = UpdateRatio([clone_modules[names[id(layer)]] for layer in layers])

    class _Once:
        def batch(self, step: int) -> tuple[Tensor, Tensor]:
            return batch

    train(clone, _Once(), cfg, [watch])
    update = watch.log10[0] if watch.log10 else np.full(len(layers), math.nan)
    return Diagnosis(profile, update, saturation, _findings(profile, update, saturation))


def _findings(profile: LayerProfile, update: np.ndarray, saturation: np.ndarray) -> list[str]:
    out = [profile.describe()]
    finite = update[np.isfinite(update)]
    if len(finite) and (finite.min() < -6 or finite.max() - finite.min() > 2):
        k = int(np.nanargmin(np.where(np.isfinite(update), update, np.inf)))
        out.append(f"layer {k} barely moves: one step changes its weights by "
                   f"10^{update[k]:.1f} of their norm (healthy is near 10^-3; the fastest "
                   f"layer moves 10^{finite.max():.1f})")
    if len(finite) and finite.max() > -1.5:
        k = int(np.nanargmax(np.where(np.isfinite(update), update, -np.inf)))
        out.append(f"layer {k} is being overwritten: one step changes its weights by "
                   f"10^{update[k]:.1f} of their norm")
    if np.isfinite(saturation).any() and np.nanmax(saturation) > 0.5:
        k = int(np.nanargmax(saturation))
        out.append(f"{saturation[k]:.0%} of the units in layer {k} are saturated or dead")
    sim = profile.token_similarity
    if len(sim) and np.isfinite(sim[-1]) and sim[-1] > 0.9:
        first = int(np.argmax(sim > 0.9))
        out.append(f"rank collapse: from layer {first} on, the tokens of a sequence are nearly "
                   f"the same vector (mean cosine similarity {sim[-1]:.2f} after the last "
                   "layer)")
    if len(out) == 1 and 1e-2 <= profile.ratio <= 1e2:
        out.append("no problem found in gradients, updates, saturation or token diversity")
    return out
