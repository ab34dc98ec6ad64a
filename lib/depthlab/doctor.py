"""A model that does not train, examined before any remedy is tried (chapter 6).

``diagnose`` measures where the gradient vanishes, which layers do not move, which units are
dead and whether the tokens have collapsed, and says in words what it found. Works on any
``nn.Module`` whose layers ``measure.find_layers`` can see; the model is left untouched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor, nn

from .callbacks import UpdateRatio
from .config import TrainConfig
from .measure import (
    LayerProfile,
    activation_saturation,
    find_layers,
    gradient_profile,
    layer_weights,
    unwrap,
)
from .training import train


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
    model = unwrap(model)
    cfg = (train_cfg or TrainConfig(lr=1e-3)).replace(steps=1, progress=False)
    layers = list(layers) if layers is not None else find_layers(model)
    profile = gradient_profile(model, batch, layers=layers)
    saturation = activation_saturation(model, batch, layers=layers)

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
            ws = [p.detach().double() for p in layer_weights(layer)]
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
