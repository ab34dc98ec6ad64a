"""One training loop for every chapter.

The loop knows nothing of models or tasks: it takes a module, a data source with
``batch(step) -> (inputs, targets)`` and a ``TrainConfig``. The loss is cross-entropy over the
last axis of the logits, skipping targets equal to ``IGNORE``. Measurements plug in through
``Callback`` objects, so diagnostics never require editing the loop (chapter 0).

A run never raises because training went badly: a non-finite loss or gradient stops it and is
reported as ``"diverged at step k"``; a loss that barely moves is reported as a plateau.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TrainConfig
from .data import IGNORE


class DataSource(Protocol):
    def batch(self, step: int) -> tuple[Tensor, Tensor]: ...


class Callback:
    """Hooks into the loop. Override what you need; return values of ``after_step`` (a dict of
    floats) are stored in ``History.extras`` under the step number."""

    def on_train_start(self, model: nn.Module) -> None:
        pass

    def before_step(self, step: int, model: nn.Module) -> None:
        pass

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        return None

    def on_train_end(self, model: nn.Module) -> None:
        pass


@dataclass
class History:
    """Per-step record of a run. ``status`` is "ok", "diverged" or "plateau"."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)   # global norm before clipping
    lr: list[float] = field(default_factory=list)
    extras: dict[int, dict[str, float]] = field(default_factory=dict)
    status: str = "ok"
    diverged_at: int | None = None
    message: str = ""
    device: str = "cpu"

    @property
    def steps_run(self) -> int:
        return len(self.loss)

    def first_step_below(self, threshold: float, metric: str = "loss",
                         window: int = 10) -> int | None:
        """The first step at which the ``window``-step moving average of ``metric`` is below
        ``threshold``, or None if it never is: "how fast did it get there" (chapter 5)."""
        values = getattr(self, metric)
        total = 0.0
        for step, value in enumerate(values):
            total += value
            if step >= window:
                total -= values[step - window]
            if step >= window - 1 and total / window < threshold:
                return step
        return None

    def final(self, metric: str = "accuracy", window: int = 10) -> float:
        """Mean of the last ``window`` steps of a metric (NaN for a diverged run's loss)."""
        values = getattr(self, metric)[-window:]
        return float(sum(values) / len(values)) if values else float("nan")


def pick_device(preference: str = "auto") -> torch.device:
    """``"auto"``: cuda if available, then mps, then cpu. Anything else is used as given."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def loss_and_accuracy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy and accuracy over positions whose target is not ``IGNORE``.

    logits: (..., C); targets: (...). Returns two scalars (accuracy is detached).
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, C)
    flat_targets = targets.reshape(-1)                          # (N,)
    loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE)
    with torch.no_grad():
        keep = flat_targets != IGNORE
        acc = (flat_logits.argmax(-1)[keep] == flat_targets[keep]).float().mean()
    return loss, acc


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up to ``cfg.lr``, then constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def make_optimizer(params: Iterable[Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer`` with its learning rate, betas and decay."""
    # foreach=True batches the per-tensor updates: about 2x faster for our small models on CPU,
    # where PyTorch would otherwise pick the one-tensor-at-a-time loop.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, foreach=True)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)


def autocast_context(device: torch.device, amp: str):
    """The autocast context for ``amp`` on ``device`` ("auto" = bf16 on CUDA only)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _interactive() -> bool:
    """True in a terminal or a live notebook; False under tests and book builds."""
    if os.environ.get("DEPTHLAB_QUIET"):
        return False
    return sys.stderr.isatty() or "google.colab" in sys.modules or "ipykernel" in sys.modules


def train(model: nn.Module, data: DataSource, cfg: TrainConfig,
          callbacks: Iterable[Callback] = ()) -> History:
    """Train ``model`` in place on ``data`` for ``cfg.steps`` steps and return its ``History``.

    The model is moved to the chosen device and left there. Reproducible on CPU for a given
    model initialisation, data seed and ``cfg.seed``.
    """
    device = pick_device(cfg.device)
    model.to(device)
    model.train()
    callbacks = list(callbacks)
    optimizer = make_optimizer(model.parameters(), cfg)
    scaler = _grad_scaler(device, cfg.amp)
    hist = History(device=str(device))
    for cb in callbacks:
        cb.on_train_start(model)

    show = _interactive() if cfg.progress is None else cfg.progress
    steps: Iterable[int] = range(cfg.steps)
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(steps, desc="train", leave=False)
        steps = bar

    with torch.random.fork_rng(devices=[]):                    # dropout draws stay local
        torch.manual_seed(cfg.seed)
        for step in steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = data.batch(step)
            inputs, targets = inputs.to(device), targets.to(device)
            for cb in callbacks:
                cb.before_step(step, model)

            with autocast_context(device, cfg.amp):
                logits = model(inputs)
            loss, acc = loss_and_accuracy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = _global_grad_norm(model)

            if not (math.isfinite(loss.item()) and math.isfinite(grad_norm)):
                hist.status, hist.diverged_at = "diverged", step
                hist.message = (f"diverged at step {step}: loss={loss.item():.3g}, "
                                f"gradient norm={grad_norm:.3g}")
                break
            if cfg.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            scaler.step(optimizer)
            scaler.update()

            hist.loss.append(loss.item())
            hist.accuracy.append(acc.item())
            hist.grad_norm.append(grad_norm)
            hist.lr.append(lr)
            for cb in callbacks:
                extra = cb.after_step(step, model)
                if extra:
                    hist.extras.setdefault(step, {}).update(extra)
            if bar is not None and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.2f}")
    if bar is not None:
        bar.close()
    for cb in callbacks:
        cb.on_train_end(model)

    if hist.status == "ok":
        _check_plateau(hist, cfg)
    if not hist.message:
        hist.message = (f"trained {hist.steps_run} steps: loss {hist.loss[0]:.3f} -> "
                        f"{hist.final('loss'):.3f}, accuracy {hist.final('accuracy'):.3f}")
    return hist


def train_and_evaluate(model: nn.Module, data: DataSource, cfg: TrainConfig,
                       callbacks: Iterable[Callback] = (), *,
                       eval_size: int | None = None) -> tuple[History, float]:
    """Train ``model``, then return its History and its held-out accuracy (eval mode).

    The held-out data is ``data.eval_batch(eval_size)``: the test split for ``Digits``, a
    stream no training step uses for ``SequenceTask``. The one-liner behind every "train
    this configuration for several seeds" loop of the chapters.
    """
    hist = train(model, data, cfg, callbacks)
    held_out = data.eval_batch() if eval_size is None else data.eval_batch(eval_size)
    return hist, evaluate(model, *held_out)["accuracy"]


def _check_plateau(hist: History, cfg: TrainConfig) -> None:
    w = min(cfg.plateau_window, max(1, hist.steps_run // 4))
    if hist.steps_run < 2 * w:
        return
    start = sum(hist.loss[:w]) / w
    end = sum(hist.loss[-w:]) / w
    if end > (1 - cfg.plateau_tol) * start:
        hist.status = "plateau"
        hist.message = (f"stalled on a plateau: mean loss {start:.3f} over the first {w} steps, "
                        f"{end:.3f} over the last {w} (less than {cfg.plateau_tol:.0%} lower)")


def _global_grad_norm(model: nn.Module) -> float:
    """The global gradient norm (float32 is enough here: per-layer norms use float64)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, float("inf"), foreach=True))


class _NoScaler:
    def scale(self, loss: Tensor) -> Tensor:
        return loss

    def unscale_(self, optimizer) -> None:
        pass

    def step(self, optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass


def _grad_scaler(device: torch.device, amp: str):
    """Loss scaling is needed for float16 only (bfloat16 has float32's exponent range)."""
    if amp == "fp16" and device.type == "cuda":
        if hasattr(torch.amp, "GradScaler"):                   # torch >= 2.3
            return torch.amp.GradScaler("cuda")
        return torch.cuda.amp.GradScaler()
    return _NoScaler()


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor, *,
             batch_size: int | None = None, batch_stats: bool = False) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``inputs``, in mini-batches of ``batch_size``.

    By default in eval mode (BatchNorm uses its running statistics). ``batch_stats=True``
    evaluates a copy of the model in training mode, so that every BatchNorm normalises with
    the statistics of the current mini-batch, as during training (chapter 3); the model
    itself, and its running statistics, are left untouched either way.
    """
    import copy

    target = copy.deepcopy(model) if batch_stats else model
    was_training = model.training
    target.train(batch_stats)
    device = next(model.parameters()).device
    size = batch_size or len(inputs)
    losses, hits, counted = 0.0, 0.0, 0
    try:
        for start in range(0, len(inputs), size):
            x, y = inputs[start:start + size], targets[start:start + size]
            if batch_stats and len(x) < 2:                     # BatchNorm needs 2 examples
                break
            loss, acc = loss_and_accuracy(target(x.to(device)), y.to(device))
            n = int((y != IGNORE).sum())
            losses += loss.item() * n
            hits += acc.item() * n
            counted += n
    finally:
        model.train(was_training)
    return {"loss": losses / counted, "accuracy": hits / counted}


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm in ``model``: depthlab's ``BatchNorm`` and PyTorch's BatchNorm1d/2d/3d."""
    from .models import BatchNorm

    return [m for m in model.modules()
            if isinstance(m, (BatchNorm, nn.modules.batchnorm._BatchNorm))]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs: Tensor, *,
                          batch_size: int | None = None) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``inputs``.

    The running mean and variance become the plain average over mini-batches of
    ``batch_size`` (default: one batch of all inputs) of the batch statistics, instead of the
    exponential moving average collected during training ("precise BN", Wu & Johnson 2021).
    Weights are untouched; the copy is returned in eval mode. Used in chapter 3 to ask whether
    a BatchNorm network's poor eval accuracy comes from stale running statistics.
    """
    import copy

    fresh = copy.deepcopy(model)
    norms = batchnorm_layers(fresh)
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer to recalibrate")
    saved = [n.momentum for n in norms]
    device = next(fresh.parameters()).device
    fresh.train()
    size = batch_size or len(inputs)
    starts = [s for s in range(0, len(inputs), size) if len(inputs) - s >= 2]  # BN needs 2
    for k, start in enumerate(starts):
        for n in norms:      # momentum 1/(k+1): running value = mean of the first k+1 batches
            n.momentum = 1.0 / (k + 1)
        fresh(inputs[start:start + size].to(device))
    for n, m in zip(norms, saved):
        n.momentum = m
    return fresh.eval()
