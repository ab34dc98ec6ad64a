"""Measurements taken during training, as ``Callback`` objects for ``depthlab.train``.

Per-layer update sizes and gradient norms at every step, and the probes of chapter 4: how each
layer's input distribution drifts (Ioffe & Szegedy's internal covariate shift), how much a
layer's gradient changes when the layers before it move (Santurkar et al.'s gradient ICS), and
how smooth the loss is along the gradient; the attention and output logits and the gradients'
size of chapter 8. Each probe measures on a fixed batch inside ``measure.isolated``, so a
watched run is bit for bit the run it would have been unwatched.

Every callback acts every ``every`` steps (``training.Callback``); those marked ``groupable``
read the model only between steps and can watch one member of a group of runs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .devices import device_of
from .losses import loss_and_accuracy
from .measure import (
    Recorder,
    attention_logit_stats,
    find_layers,
    isolated,
    layer_weights,
    output_log_partition,
    record,
    run_once,
)
from .models import SkipLinear
from .training import Callback


class UpdateRatio(Callback):
    """Log10 of ‖ΔW‖ / ‖W‖ per layer and step, over the weight matrices of each layer.

    What is healthy depends on the optimiser: under SGD a rule of thumb (Karpathy) puts it
    near -3; Adam moves every entry by about the learning rate, so about log10(lr / RMS(W))
    (``remedies.diagnose`` compares with that). -inf: the step did not change the weights at
    all (too small for float32 to add). Results: ``self.log10`` is a list
    of per-step arrays (L,), also returned to the loop as ``update/<l>`` extras.
    """

    groupable = True

    def __init__(self, layers: Sequence[nn.Module] | None = None, every: int = 1) -> None:
        super().__init__(every)
        self._layers = list(layers) if layers is not None else None
        self.steps: list[int] = []
        self.log10: list[np.ndarray] = []
        self._before: list[list[Tensor]] = []
        self._watched: list[list[Tensor]] = []

    def _weights(self, model: nn.Module) -> list[list[Tensor]]:
        layers = self._layers if self._layers is not None else find_layers(model)
        return [layer_weights(layer) for layer in layers]

    def before_step(self, step: int, model: nn.Module) -> None:
        # the same tensors are read after the step (updated in place): found once per step,
        # not twice (find_layers and layer_weights walk the model's modules)
        self._watched = self._weights(model)
        self._before = [[w.detach().clone() for w in ws] for ws in self._watched]

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        ratios = []
        for ws, olds in zip(self._watched, self._before):
            du = sum(float((w.detach() - o).double().pow(2).sum()) for w, o in zip(ws, olds))
            ww = sum(float(o.double().pow(2).sum()) for o in olds)
            ratios.append(0.5 * math.log10(du / ww) if du > 0 and ww > 0 else -math.inf)
        self.steps.append(step)
        self.log10.append(np.array(ratios))
        return {f"update/{i}": r for i, r in enumerate(ratios)}

    def as_array(self) -> np.ndarray:
        """(steps, L) array of log10 update-to-weight ratios."""
        return np.stack(self.log10) if self.log10 else np.zeros((0, 0))


class WeightNorms(Callback):
    """The norm of each layer's weight matrices, and of their gradient, at every step.

    ``start`` (L,) holds the norms before training; ``weight`` and ``grad`` are lists of (L,)
    arrays, one per step, read after the optimiser's step (the gradient is the one that step
    used). Chapter 3 uses it to watch weights that feed a norm layer grow under SGD: their
    gradient is orthogonal to them, so every step can only lengthen them.
    """

    groupable = True

    def __init__(self, layers: Sequence[nn.Module] | None = None, every: int = 1) -> None:
        super().__init__(every)
        self._layers = list(layers) if layers is not None else None
        self.start = np.zeros(0)
        self.weight: list[np.ndarray] = []
        self.grad: list[np.ndarray] = []

    def _matrices(self, model: nn.Module) -> list[list[Tensor]]:
        layers = self._layers if self._layers is not None else find_layers(model)
        return [layer_weights(layer) for layer in layers]

    @staticmethod
    def _norm(tensors: list[Tensor]) -> float:
        return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))

    def on_train_start(self, model: nn.Module) -> None:
        self.start = np.array([self._norm(ws) for ws in self._matrices(model)])

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        mats = self._matrices(model)
        self.weight.append(np.array([self._norm(ws) for ws in mats]))
        self.grad.append(np.array([self._norm([w.grad for w in ws if w.grad is not None])
                                   for ws in mats]))
        return None


class LayerGradNorms(Callback):
    """Records the per-layer activation-gradient norms at every step of a training run.

    ``self.history`` is a list of (L,) arrays. Cheap enough to leave on (see benchmarks/).
    """

    def __init__(self, layers: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self._layers = layers
        self._ctx = None
        self._rec: Recorder | None = None
        self.history: list[np.ndarray] = []

    def on_train_start(self, model: nn.Module) -> None:
        self._ctx = record(model, self._layers, similarity=False)
        self._rec = self._ctx.__enter__()

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        rec = self._rec
        assert rec is not None
        self.history.append(np.array([float(g[-1]) if g else math.nan for g in rec.act_grad]))
        for rows in (rec.act_grad, rec.act_mean, rec.act_std):
            for r in rows:
                r.clear()
        return None

    def on_train_end(self, model: nn.Module) -> None:
        """Remove the hooks when training ends."""
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None


def _loss_grads(model: nn.Module, params: Sequence[Tensor], inputs: Tensor, targets: Tensor,
                seed: int) -> tuple[float, list[Tensor]]:
    """Loss on (inputs, targets) and its gradient with respect to ``params``, inside probing."""
    with isolated(model, seed):
        loss, _ = loss_and_accuracy(model(inputs), targets)
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return loss.item(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@contextlib.contextmanager
def _stepped(pairs: Sequence[tuple[Tensor, Tensor]], lr: float) -> Iterator[None]:
    """Temporarily move each parameter p to p − lr·g; restore the exact old values on exit."""
    saved = [p.detach().clone() for p, _ in pairs]
    with torch.no_grad():
        for p, g in pairs:
            p.sub_(lr * g)
    try:
        yield
    finally:
        with torch.no_grad():
            for (p, _), old in zip(pairs, saved):
                p.copy_(old)


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


# How the probes of internal covariate shift treat a network that draws random numbers in its
# forward pass (noisy BatchNorm, dropout). Both measures take the same convention (chapter 4).
NOISE_CONVENTIONS = {
    "fresh": "the layers before l draw new noise in every pass, as they do at every training "
             "step: a measurement sees what layer l sees from one step to the next",
    "fixed": "every pass draws the same noise: only the weights' change is measured",
}


def _check_noise(noise: str) -> str:
    if noise not in NOISE_CONVENTIONS:
        raise ValueError(f"noise={noise!r}; choose one of {sorted(NOISE_CONVENTIONS)}: "
                         + "; ".join(f"{k}: {v}" for k, v in NOISE_CONVENTIONS.items()))
    return noise


def _pass_seed(noise: str, step: int, k: int = 0) -> int:
    """The seed of pass ``k`` of a record taken at ``step``: one seed for everything under
    "fixed", a seed of its own for every pass under "fresh"."""
    return 0 if noise == "fixed" else step * 4096 + k


def _rng_state(device: torch.device) -> tuple:
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def _draws_at(layers: Sequence[nn.Module], device: torch.device, *,
              keep: list | None = None, replay: tuple[int, tuple] | None = None
              ) -> Iterator[None]:
    """Forward pre-hooks on ``layers``: ``keep`` receives the random state as each layer
    starts (one entry per layer); ``replay=(l, state)`` sets that state as layer l starts, so
    that layer l and every later layer draw exactly what they drew in the pass that kept it."""
    def keeper(i: int):
        def hook(module, args):
            assert keep is not None
            keep[i] = _rng_state(device)
        return hook

    def replayer(module, args):
        assert replay is not None
        _set_rng_state(device, replay[1])

    handles = []
    if keep is not None:
        keep[:] = [None] * len(layers)
        handles = [layer.register_forward_pre_hook(keeper(i)) for i, layer in enumerate(layers)]
    if replay is not None:
        handles.append(layers[replay[0]].register_forward_pre_hook(replayer))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class InputDrift(Callback):
    """How the distribution of each layer's input moves during training (Ioffe & Szegedy).

    Every ``every`` steps, the probe inputs go through the model and each layer's input is
    summarised by its per-feature mean and standard deviation. ``self.mean[r][l]`` and
    ``self.std[r][l]`` are (D_l,) arrays for record r (at ``self.steps[r]``) and layer l.
    ``drift()`` turns them into one number per layer (chapter 4).

    ``mode="train"`` passes the probe in training mode, where BatchNorm standardises the probe
    batch itself, so a BatchNorm network's next layer sees mean 0 and sd 1 by construction (up
    to γ, β). ``mode="eval"`` uses the running statistics, as at inference, so a BatchNorm
    network can drift too.

    ``noise`` (``NOISE_CONVENTIONS``), for a network that draws random numbers in training
    mode: "fresh" (default) draws new noise at every record, as every training step does, so
    the drift includes the noise's; "fixed" draws the same noise at every record, so only the
    weights move the inputs. ``GradientICS`` takes the same convention.
    """

    groupable = True

    def __init__(self, probe: Tensor, layers: Sequence[nn.Module] | None = None,
                 every: int = 10, mode: str = "train", noise: str = "fresh") -> None:
        super().__init__(every)
        if mode not in ("train", "eval"):
            raise ValueError(f"mode={mode!r}; choose 'train' or 'eval'")
        self.probe, self._layers, self.mode = probe, layers, mode
        self.noise = _check_noise(noise)
        self.steps: list[int] = []
        self.mean: list[list[np.ndarray]] = []
        self.std: list[list[np.ndarray]] = []

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        layers = list(self._layers) if self._layers is not None else find_layers(model)
        seen: list[Tensor] = [torch.empty(0)] * len(layers)

        def keep(i: int):
            def hook(module, args):
                seen[i] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            return hook

        handles = [layer.register_forward_pre_hook(keep(i)) for i, layer in enumerate(layers)]
        with isolated(model, seed=_pass_seed(self.noise, step), train=self.mode == "train"):
            run_once(model, self.probe.to(device_of(model)), handles)
        self.steps.append(step)
        self.mean.append([s.mean(0).cpu().numpy() for s in seen])
        self.std.append([s.std(0).cpu().numpy() for s in seen])
        return None

    def drift(self) -> np.ndarray:
        """(L,) mean change of each feature's mean and sd between consecutive records, in
        units of that feature's average sd: (|Δμ| + |Δσ|) / σ̄, averaged over features and time.
        0 means a layer's input distribution never moved."""
        out = []
        for layer in range(len(self.mean[0])):
            mean = np.stack([m[layer] for m in self.mean])          # (R, D)
            std = np.stack([s[layer] for s in self.std])            # (R, D)
            scale = std.mean(axis=0) + 1e-12                        # (D,)
            change = np.abs(np.diff(mean, axis=0)) + np.abs(np.diff(std, axis=0))
            out.append(float((change / scale).mean()))
        return np.array(out)


class GradientICS(Callback):
    """Santurkar et al.'s gradient measure of internal covariate shift, per layer.

    Every ``every`` steps, on the probe batch: G_l is the gradient of layer l's parameters;
    G'_l is the same gradient after every earlier layer has taken a gradient step of size
    ``lr`` (layer l and later ones unchanged). Records ‖G_l − G'_l‖₂ (``absolute``, the
    measure the paper plots, with the cosine), ‖G_l − G'_l‖ / ‖G_l‖ (``relative``) and the
    cosine between them (``cosine``): how much a layer's gradient changes because the layers
    before it moved. Lists of (L,) arrays, one per record (layer 0 has no earlier layer:
    0, 0 and 1).

    ``noise`` (``NOISE_CONVENTIONS``), for a network that draws random numbers in training
    mode (noisy BatchNorm): under "fresh" (default) the earlier layers of G'_l draw new noise,
    as they will at the next step, while layer l and the later ones draw exactly the noise of
    G_l (their state is replayed as layer l starts): "the earlier layers moved", noise
    included, and nothing else. Under "fixed" G and G' draw the same noise, so only the
    earlier layers' weights differ. ``InputDrift`` takes the same convention, so the two
    measures of internal covariate shift can be compared (chapter 4).
    """

    groupable = True

    def __init__(self, probe: tuple[Tensor, Tensor], lr: float,
                 layers: Sequence[nn.Module] | None = None, every: int = 10,
                 noise: str = "fresh") -> None:
        super().__init__(every)
        self.probe, self.lr, self._layers = probe, lr, layers
        self.noise = _check_noise(noise)
        self.steps: list[int] = []
        self.relative: list[np.ndarray] = []
        self.absolute: list[np.ndarray] = []
        self.cosine: list[np.ndarray] = []

    def before_step(self, step: int, model: nn.Module) -> None:
        layers = list(self._layers) if self._layers is not None else find_layers(model)
        params = [list(layer.parameters()) for layer in layers]
        device = device_of(model)
        x, y = (t.to(device) for t in self.probe)
        starts: list = []                          # the random state as each layer starts, in G
        with _draws_at(layers, device, keep=starts):
            _, flat_grads = _loss_grads(model, [p for ps in params for p in ps], x, y,
                                        seed=_pass_seed(self.noise, step))
        grads, k = [], 0
        for ps in params:
            grads.append(flat_grads[k:k + len(ps)])
            k += len(ps)
        rel, ab, cos = [0.0], [0.0], [1.0]
        for i in range(1, len(layers)):
            earlier = [(p, g) for ps, gs in zip(params[:i], grads[:i]) for p, g in zip(ps, gs)]
            with _stepped(earlier, self.lr), _draws_at(layers, device, replay=(i, starts[i])):
                _, moved = _loss_grads(model, params[i], x, y,
                                       seed=_pass_seed(self.noise, step, i))
            g0, g1 = _flat(grads[i]), _flat(moved)
            ab.append(float((g0 - g1).norm()))
            rel.append(ab[-1] / (float(g0.norm()) + 1e-30))
            cos.append(float(torch.nn.functional.cosine_similarity(g0, g1, dim=0)))
        self.steps.append(step)
        self.relative.append(np.array(rel))
        self.absolute.append(np.array(ab))
        self.cosine.append(np.array(cos))


class Smoothness(Callback):
    """The loss landscape along the gradient, every ``every`` steps (Santurkar et al. 2018).

    From the current parameters θ with probe gradient g, step to θ − η·d for each step size η
    in ``step_sizes`` and record: ``loss_range``, the spread (max − min) of the loss over those
    points (how much the loss varies where an optimiser might step), and ``beta``, the largest
    ‖∇L(θ) − ∇L(θ − η·d)‖ / ‖η·d‖, an effective smoothness constant (how fast the gradient
    changes, i.e. how far the current gradient can be trusted); also ``grad_norm``, ‖g‖.

    The direction d is g itself (``normalised=False``, the paper's probe: a step of η·‖g‖ in
    parameter space, so a network with a larger gradient is probed farther) or the unit vector
    g/‖g‖ (``normalised=True``: every network is probed at the same distances, and the loss
    range compares landscapes rather than gradient sizes). Lists of floats.
    """

    groupable = True

    def __init__(self, probe: tuple[Tensor, Tensor],
                 step_sizes: Sequence[float] = (0.05, 0.1, 0.2, 0.4),
                 every: int = 10, normalised: bool = False) -> None:
        super().__init__(every)
        self.probe, self.step_sizes = probe, tuple(step_sizes)
        self.normalised = normalised
        self.steps: list[int] = []
        self.loss_range: list[float] = []
        self.beta: list[float] = []
        self.grad_norm: list[float] = []

    def before_step(self, step: int, model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        device = device_of(model)
        x, y = (t.to(device) for t in self.probe)
        loss0, g0 = _loss_grads(model, params, x, y, seed=step)
        g0_flat = _flat(g0)
        norm = float(g0_flat.norm())
        scale = 1.0 / max(norm, 1e-30) if self.normalised else 1.0      # d = scale · g
        losses, betas = [loss0], []
        for eta in self.step_sizes:
            with _stepped(list(zip(params, g0)), eta * scale):
                loss_m, g_m = _loss_grads(model, params, x, y, seed=step)
            losses.append(loss_m)
            distance = eta * scale * norm
            betas.append(float((_flat(g_m) - g0_flat).norm()) / max(distance, 1e-30))
        self.steps.append(step)
        self.grad_norm.append(norm)
        finite = all(math.isfinite(v) for v in losses + betas)
        self.loss_range.append(max(losses) - min(losses) if finite else math.inf)
        self.beta.append(max(betas) if finite else math.inf)


class AttentionLogits(Callback):
    """The attention logits' growth during training (Dehghani et al. 2023; chapter 8).

    Every ``every`` steps the probe inputs go through the model and
    ``attention_logit_stats`` records, per attention module, the largest |logit| and the mean
    row entropy. Results: ``self.steps``, ``self.max_logit`` and ``self.entropy`` (lists of
    (L,) arrays, one per record); the loop's extras get ``attn_logit/<l>`` and
    ``attn_entropy/<l>``. Measures inside ``measure.isolated``: the run is the run it would have
    been unwatched.
    """

    groupable = True

    def __init__(self, probe: Tensor, every: int = 10) -> None:
        super().__init__(every)
        self.probe = probe
        self.steps: list[int] = []
        self.max_logit: list[np.ndarray] = []
        self.entropy: list[np.ndarray] = []

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        biggest, entropy = attention_logit_stats(model, self.probe)
        self.steps.append(step)
        self.max_logit.append(biggest)
        self.entropy.append(entropy)
        return {**{f"attn_logit/{i}": float(v) for i, v in enumerate(biggest)},
                **{f"attn_entropy/{i}": float(v) for i, v in enumerate(entropy)}}


class OutputLogits(Callback):
    """log Z of the output logits on ``probe`` during training (``measure.output_log_partition``).

    Every ``every`` steps records ``self.steps``, ``self.log_z_mean`` and ``self.log_z_min``
    (over the probe's positions); the loop's extras get ``log_z/mean`` and ``log_z/min``.
    """

    groupable = True

    def __init__(self, probe: Tensor, every: int = 10) -> None:
        super().__init__(every)
        self.probe = probe
        self.steps: list[int] = []
        self.log_z_mean: list[float] = []
        self.log_z_min: list[float] = []

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        log_z = output_log_partition(model, self.probe)
        self.steps.append(step)
        self.log_z_mean.append(float(log_z.mean()))
        self.log_z_min.append(float(log_z.min()))
        return {"log_z/mean": self.log_z_mean[-1], "log_z/min": self.log_z_min[-1]}


class GradientRMS(Callback):
    """The root-mean-square gradient of every weight matrix, as the optimiser used it (after
    clipping), every ``every`` steps (Wortsman et al. 2024; chapter 8).

    Adam divides by √v + ε, with √v about the gradient RMS: once that RMS falls toward
    ε (1e-8 by default) the update shrinks by the factor rms / (rms + ε). Records
    ``self.steps``, ``self.names`` (the matrices' parameter names) and ``self.rms`` (one
    (P,) array per record). Reads gradients only: the run is unchanged.
    """

    groupable = True

    def __init__(self, every: int = 10) -> None:
        super().__init__(every)
        self.steps: list[int] = []
        self.names: list[str] = []
        self.rms: list[np.ndarray] = []

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        named = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2 and p.grad is not None]
        self.names = [n for n, _ in named]
        rms = np.array([float(p.grad.detach().double().pow(2).mean().sqrt()) for _, p in named])
        self.steps.append(step)
        self.rms.append(rms)
        return {"grad_rms/min": float(rms.min()), "grad_rms/median": float(np.median(rms))}


class SkipGains(Callback):
    """β/α of every ``models.SkipLinear`` (values and projections written ``α·I + β·W̃``,
    He & Hofmann 2023, Eq. 6) every ``every`` steps, and before training (chapter 7).

    With trainable gains, β/α falling toward 0 means training pulls the map back toward the
    identity: the evidence behind fixing values and projections to I (their Fig. 4). Records
    ``self.names`` (the modules' names, e.g. ``encoder.layers.0.attn.value``), ``self.steps``
    (optimiser steps taken: 0 before training) and ``self.ratio`` (one (M,) array per record).
    Reads the gains only: the run is unchanged.
    """

    groupable = True

    def __init__(self, every: int = 10) -> None:
        super().__init__(every)
        self.names: list[str] = []
        self.steps: list[int] = []
        self.ratio: list[np.ndarray] = []

    def _record(self, step: int, model: nn.Module) -> np.ndarray:
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, SkipLinear)]
        if not found:
            raise ValueError(f"{type(model).__name__} has no SkipLinear (values and projections "
                             "written α·I + β·W̃: TransformerConfig.value_gain)")
        self.names = [n for n, _ in found]
        ratio = np.array([float(m.beta.detach()) / float(m.alpha.detach()) for _, m in found])
        self.steps.append(step)
        self.ratio.append(ratio)
        return ratio

    def on_train_start(self, model: nn.Module) -> None:
        self._record(0, model)

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        ratio = self._record(step + 1, model)
        return {f"skip_gain/{i}": float(r) for i, r in enumerate(ratio)}

    def as_array(self) -> np.ndarray:
        """(records, M) array of β/α."""
        return np.stack(self.ratio) if self.ratio else np.zeros((0, 0))
