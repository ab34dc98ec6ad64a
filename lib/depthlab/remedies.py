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
from dataclasses import dataclass, field

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


@dataclass
class Diagnosis:
    """What ``diagnose`` measured on one batch, and what it concludes. Arrays are (L,)."""

    profile: LayerProfile
    update_log10: np.ndarray      # log10 ‖ΔW‖/‖W‖ of each layer after one optimiser step
    saturation: np.ndarray        # fraction of saturated or dead units (NaN: none found)
    findings: list[str]
    # log10 of the update-to-weight ratio the optimiser gives a layer whose gradient is not the
    # problem: Adam moves every entry by about lr, so lr / RMS(W); NaN for SGD (no such scale)
    expected_update_log10: np.ndarray = field(default_factory=lambda: np.zeros(0))

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

    What counts as a healthy update depends on the optimiser. Adam divides each gradient entry
    by a running estimate of its own size, so its first step moves every entry by about
    ``lr`` whatever the gradient's scale, as long as the gradient is well above Adam's ``eps``:
    the expected ratio is lr / RMS(W), and a layer far below it is one whose gradient has sunk
    under ``eps``. For SGD the step is lr times the gradient and there is no such scale; the
    rule of thumb "near 10^-3" (Karpathy) is an SGD rule, and the findings compare layers with
    each other instead. A step that changes a layer by more than 10 % is flagged for both.
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

    expected = np.full(len(layers), math.nan)
    if cfg.optimizer in ("adam", "adamw"):
        for i, layer in enumerate(layers):
            ws = [p.detach().double() for p in layer.parameters() if p.dim() >= 2]
            n = sum(w.numel() for w in ws)
            if n:
                rms = math.sqrt(sum(float(w.pow(2).sum()) for w in ws) / n)
                expected[i] = math.log10(cfg.lr / rms) if rms > 0 else math.nan
    train(clone, _Once(), cfg, [watch])
    update = watch.log10[0] if watch.log10 else np.full(len(layers), math.nan)
    return Diagnosis(profile, update, saturation,
                     _findings(profile, update, saturation, expected, cfg.optimizer), expected)


def _findings(profile: LayerProfile, update: np.ndarray, saturation: np.ndarray,
              expected: np.ndarray | None = None, optimizer: str = "adam") -> list[str]:
    out = [profile.describe()]
    finite = update[np.isfinite(update)]
    expected = np.full(len(update), math.nan) if expected is None else expected
    lag = update - expected                                   # decades below Adam's scale
    slow = np.isfinite(lag) & (lag < -2)
    if slow.any():
        k = int(np.nanargmin(np.where(slow, lag, np.inf)))
        out.append(f"layer {k} barely moves: one {optimizer} step changes its weights by "
                   f"10^{update[k]:.1f} of their norm, {-lag[k]:.1f} decades less than the "
                   f"lr/RMS(W) = 10^{expected[k]:.1f} Adam gives a gradient well above its eps")
    elif np.isneginf(update).any() and len(finite):
        k = int(np.argmax(np.isneginf(update)))
        out.append(f"layer {k} does not move at all: its {optimizer} step is smaller than "
                   "float32 can add to its weights (the fastest layer moves "
                   f"10^{finite.max():.1f} of its norm)")
    elif len(finite) and (finite.min() < -6 or finite.max() - finite.min() > 2):
        k = int(np.nanargmin(np.where(np.isfinite(update), update, np.inf)))
        out.append(f"layer {k} barely moves: one {optimizer} step changes its weights by "
                   f"10^{update[k]:.1f} of their norm (the fastest layer moves "
                   f"10^{finite.max():.1f})")
    if len(finite) and finite.max() > -1:
        k = int(np.nanargmax(np.where(np.isfinite(update), update, -np.inf)))
        out.append(f"layer {k} is being overwritten: one step changes its weights by "
                   f"10^{update[k]:.1f} of their norm (more than 10 %)")
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
