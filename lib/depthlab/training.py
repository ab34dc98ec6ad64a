"""One training loop for every chapter.

The loop knows nothing of models or tasks: it takes a module, a data source with
``batch(step) -> (inputs, targets)`` and a ``TrainConfig``. The loss is cross-entropy over the
last axis of the logits, skipping targets equal to ``IGNORE``. Measurements plug in through
``Callback`` objects, so diagnostics never require editing the loop (chapter 0).

A run never raises because training went badly: a non-finite loss (or, without a loss scaler,
a non-finite gradient) stops it and is reported as ``"diverged at step k"``; a loss that barely
moves is reported as a plateau. It does raise for bad input: a batch with no labelled target is
a data error, not a divergence.

Metrics stay on the device and are read back every ``TrainConfig.sync_every`` steps (nanoGPT
reads its loss once per log interval): on a GPU a per-step ``.item()`` would make the host wait
for every step. Divergence is detected at those reads; on the CPU they happen every step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TrainConfig
from .data import IGNORE


@runtime_checkable
class DataSource(Protocol):
    """Anything with ``batch(step) -> (inputs, targets)``, deterministic in ``step``."""

    def batch(self, step: int) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class HeldOutSource(DataSource, Protocol):
    """A data source that also has held-out data no training step uses (``Digits``'s test
    split, a separate stream of ``SequenceTask``)."""

    def eval_batch(self, size: int | None = None) -> tuple[Tensor, Tensor]: ...


class DataError(ValueError):
    """A batch the loss cannot be computed on (empty, or every target ``IGNORE``)."""


class Callback:
    """Hooks into the loop. Override what you need; return values of ``after_step`` (a dict of
    floats) are stored in ``History.extras`` under the step number. ``on_train_end`` is always
    called, also when the run raises, so a callback that installs hooks removes them there."""

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
    skipped: list[int] = field(default_factory=list)       # steps a float16 loss scaler skipped
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
        """Mean of the last ``window`` steps of a metric (NaN for a run with no steps)."""
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


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for an empty module."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def rng_devices(device: torch.device) -> list:
    """The devices whose random state ``torch.random.fork_rng`` must save besides the CPU."""
    return [device] if device.type == "cuda" else []


def loss_and_accuracy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy and accuracy over positions whose target is not ``IGNORE``.

    logits: (..., C); targets: (...). Returns two scalars (accuracy is detached). With no
    labelled position both are NaN; the loop refuses such batches before they get here.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, C)
    flat_targets = targets.reshape(-1)                          # (N,)
    loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE)
    with torch.no_grad():
        keep = flat_targets != IGNORE
        hits = (flat_logits.argmax(-1) == flat_targets) & keep
        acc = hits.sum() / keep.sum()
    return loss, acc


def log_z_squared(logits: Tensor, targets: Tensor) -> Tensor:
    """Σ (log Z)² over the positions whose target is not ``IGNORE``, Z = Σ_c exp(logit_c).

    The z-loss of PaLM (Chowdhery et al. 2022) is a small multiple of its mean: it keeps the
    softmax's normaliser near 1 and stops the output logits from drifting (chapter 8)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()         # (N, C)
    keep = (targets.reshape(-1) != IGNORE).to(flat.dtype)       # (N,); a mask, not an index,
    return (torch.logsumexp(flat, dim=-1) ** 2 * keep).sum()    # so that vmap can batch it


def objective(logits: Tensor, targets: Tensor, cfg: TrainConfig) -> tuple[Tensor, Tensor,
                                                                          Tensor]:
    """(what is minimised, cross-entropy, accuracy) of one batch: the cross-entropy plus
    ``cfg.z_loss`` × the mean (log Z)². The History records the cross-entropy alone, so runs
    with and without a z-loss are compared on the same loss."""
    loss, acc = loss_and_accuracy(logits, targets)
    if not cfg.z_loss:
        return loss, loss, acc
    count = (targets != IGNORE).sum().clamp(min=1)
    return loss + cfg.z_loss * log_z_squared(logits, targets) / count, loss, acc


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up to ``cfg.lr``, then ``cfg.schedule``.

    "constant" stays at ``cfg.lr``; "cosine" and "linear" decay from ``cfg.lr`` at the end of
    warm-up to 0 at step ``cfg.steps`` (cosine: ½(1 + cos πt), Loshchilov & Hutter 2017).
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)              # 0 after warm-up, 1 at the end
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return cfg.lr * (1.0 - t)


def make_optimizer(params: Iterable[Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer`` with its learning rate, betas, eps and decay.

    A parameter marked with ``lr_scale`` (``models.apply_mup``) goes into a group of its own
    that learns at ``lr_scale`` × the schedule's rate (``set_lr``); all others share one."""
    by_scale: dict[float, list[Tensor]] = {}
    for p in params:
        by_scale.setdefault(float(getattr(p, "lr_scale", 1.0)), []).append(p)
    groups = [{"params": ps, "lr_scale": scale} for scale, ps in by_scale.items()]
    # foreach=True batches the per-tensor updates: about 2x faster for our small models on CPU,
    # where PyTorch would otherwise pick the one-tensor-at-a-time loop.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, foreach=True)
    if cfg.independent_decay:
        # PyTorch's AdamW multiplies the weights by 1 - lr_group·decay each step, so the decay
        # moves with the learning rate (Loshchilov & Hutter 2019). Independent decay
        # (Wortsman et al. 2024) multiplies them by 1 - weight_decay·lr_t/lr: the schedule's
        # shape only. Dividing each group's decay by its peak rate gives exactly that.
        for group in groups:
            group["weight_decay"] = cfg.weight_decay / (cfg.lr * group["lr_scale"])
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
               weight_decay=cfg.weight_decay, foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate for this step, times each group's ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def resolve_amp(device: torch.device, amp: str) -> str:
    """"auto" means bf16 on CUDA and float32 elsewhere; other modes are taken as given."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "off"
    return amp


def autocast_context(device: torch.device, amp: str):
    """The autocast context for ``amp`` on ``device``."""
    amp = resolve_amp(device, amp)
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _interactive() -> bool:
    """True in a terminal or a live notebook; False under tests and book builds."""
    if os.environ.get("DEPTHLAB_QUIET"):
        return False
    return sys.stderr.isatty() or "google.colab" in sys.modules or "ipykernel" in sys.modules


def sync_interval(cfg: TrainConfig, device: torch.device) -> int:
    """Steps between reads of the metrics: ``cfg.sync_every``, or 1 on CPU and 16 elsewhere."""
    if cfg.sync_every is not None:
        return cfg.sync_every
    return 1 if device.type == "cpu" else 16


def clip_and_norm(params: list[Tensor], clip_norm: float | None) -> Tensor:
    """The global gradient norm *before* clipping, as a 0-d tensor on the device; clips the
    gradients in place to ``clip_norm`` when it is set. One call per step either way."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if clip_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=True)
    return torch.nn.utils.get_total_norm(grads, foreach=True)


def _check_batch(inputs: Tensor, targets: Tensor, step: int) -> None:
    """Refuse an empty batch, or one whose targets are all ``IGNORE``: the loss of such a batch
    is NaN, and calling that a divergence would send the reader after the wrong problem. On the
    CPU this costs nothing; device-resident batches are checked at the next metric read."""
    if inputs.shape[0] == 0 or targets.numel() == 0:
        raise DataError(f"the batch of step {step} is empty (inputs {tuple(inputs.shape)}, "
                        f"targets {tuple(targets.shape)}): check the data source's batch size")
    if targets.device.type == "cpu" and not bool((targets != IGNORE).any()):
        raise DataError(f"every target of the batch of step {step} is IGNORE ({IGNORE}): "
                        "there is nothing to compute a loss on")


class _Scaler:
    """Loss scaling for float16 (bfloat16 has float32's exponent range and needs none).

    Wraps ``torch.amp.GradScaler``: a step whose gradients overflow is *skipped* and the scale
    halved, which is normal early in float16 training and not a divergence. A scale that falls
    below 1 means the unscaled gradients themselves overflow float16: that is one.
    """

    def __init__(self, device: torch.device, amp: str) -> None:
        self.scaler = None
        if amp == "fp16":
            self.scaler = torch.amp.GradScaler(device.type)

    @property
    def active(self) -> bool:
        return self.scaler is not None

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler else loss

    def unscale_(self, optimizer) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """Step (or let the scaler skip); True if the step was skipped."""
        if not self.scaler:
            optimizer.step()
            return False
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() < before

    def collapsed(self) -> bool:
        return bool(self.scaler) and self.scaler.get_scale() < 1.0


def train(model: nn.Module, data: DataSource, cfg: TrainConfig,
          callbacks: Iterable[Callback] = ()) -> History:
    """Train ``model`` in place on ``data`` for ``cfg.steps`` steps and return its ``History``.

    The model is moved to the chosen device and left there. Reproducible on CPU for a given
    model initialisation, data seed and ``cfg.seed``. Callbacks are ended, and the progress bar
    closed, even if the run raises.

    Launched with ``torchrun --nproc-per-node N`` (see the README's "Running at scale"), the same
    call trains one model over N processes: the model is wrapped in DistributedDataParallel,
    every rank draws the same batch and trains on its share (``shard``), the gradients are
    averaged so that each step is the single-process step on the whole batch, every rank
    returns the same History (whole-batch loss and accuracy) and only rank 0 draws a progress
    bar. Build the model from the same seed on every rank. A BatchNorm then normalises with
    each rank's own share (per-rank statistics, as ``nn.BatchNorm`` does under DDP), not the
    whole batch's, and its running statistics are rank 0's (DDP broadcasts buffers).
    """
    from .parallel import data_parallel_world

    rank, world = data_parallel_world()
    device = pick_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())   # this rank's GPU
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to train")
    forward = model
    if world > 1:
        # One run over every process (torchrun): DistributedDataParallel averages the gradients
        # over the ranks during backward, so every rank takes the same step.
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    callbacks = list(callbacks)
    optimizer = make_optimizer(params, cfg)
    scaler = _Scaler(device, resolve_amp(device, cfg.amp))
    hist = History(device=str(device))
    every = sync_interval(cfg, device)
    pending: list[tuple[int, float, Tensor, Tensor, Tensor, Tensor]] = []

    show = (_interactive() if cfg.progress is None else cfg.progress) and rank == 0
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, desc="train", leave=False)

    started: list[Callback] = []
    try:
        for cb in callbacks:
            cb.on_train_start(model)
            started.append(cb)
        with torch.random.fork_rng(devices=rng_devices(device)):   # dropout draws stay local
            torch.manual_seed(cfg.seed + rank)                 # each rank's own dropout masks
            for step in range(cfg.steps):
                lr = lr_at(step, cfg)
                set_lr(optimizer, lr)
                inputs, targets = data.batch(step)
                _check_batch(inputs, targets, step)
                if world > 1:                                  # this rank's share of the batch
                    inputs = shard(inputs, rank, world, step)
                    targets = shard(targets, rank, world, step)
                inputs, targets = inputs.to(device), targets.to(device)
                for cb in callbacks:
                    cb.before_step(step, model)

                with autocast_context(device, cfg.amp):
                    logits = forward(inputs)
                if world > 1:
                    minimised, loss, acc = _distributed_loss(logits, targets, world, cfg.z_loss)
                else:
                    minimised, loss, acc = objective(logits, targets, cfg)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(minimised).backward()
                scaler.unscale_(optimizer)
                grad_norm = clip_and_norm(params, cfg.clip_norm)
                labelled = (targets != IGNORE).sum()
                if world > 1:                                  # labelled somewhere in the batch
                    torch.distributed.all_reduce(labelled)
                pending.append((step, lr, loss.detach(), acc, grad_norm.detach(), labelled))
                if len(pending) >= every or step == cfg.steps - 1:
                    if _flush(pending, hist, scaler, check_grads=not scaler.active):
                        break                               # before the bad step is applied
                if scaler.step(optimizer):
                    hist.skipped.append(step)
                    if scaler.collapsed():
                        hist.status, hist.diverged_at = "diverged", step
                        hist.message = (f"diverged at step {step}: the float16 loss scale "
                                        "fell below 1, so the gradients overflow float16 "
                                        "even unscaled")
                        break

                for cb in callbacks:
                    extra = cb.after_step(step, model)
                    if extra:
                        hist.extras.setdefault(step, {}).update(extra)
                if bar is not None:
                    bar.update(1)
                    if not pending and hist.loss:
                        bar.set_postfix(loss=f"{hist.loss[-1]:.3f}",
                                        acc=f"{hist.accuracy[-1]:.2f}")
        if pending and hist.status == "ok":
            _flush(pending, hist, scaler, check_grads=not scaler.active)
    finally:
        if bar is not None:
            bar.close()
        for cb in started:
            cb.on_train_end(model)

    if hist.diverged_at is not None:           # steps after the divergence are not history
        hist.extras = {k: v for k, v in hist.extras.items() if k < hist.diverged_at}
    if hist.status == "ok":
        _check_plateau(hist, cfg)
    if not hist.message:
        hist.message = (f"trained {hist.steps_run} steps: loss {hist.loss[0]:.3f} -> "
                        f"{hist.final('loss'):.3f}, accuracy {hist.final('accuracy'):.3f}")
    return hist


def shard(batch: Tensor, rank: int, world: int, step: int = 0) -> Tensor:
    """Rank ``rank``'s share of a batch split over ``world`` processes: consecutive rows,
    as even as the batch size allows (``torch.tensor_split``)."""
    part = torch.tensor_split(batch, world)[rank]
    if part.shape[0] == 0:
        raise DataError(f"the batch of step {step} has {batch.shape[0]} examples, fewer than "
                        f"the {world} processes that share it: use a batch of at least {world}")
    return part


def _distributed_loss(logits: Tensor, targets: Tensor, world: int,
                      z_loss: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(what is minimised, loss, accuracy) of one rank's share, in a run over ``world``
    processes (see ``objective``).

    The loss and accuracy are those of the whole batch (summed over the ranks). What is
    minimised is this rank's summed loss over the whole batch's labelled count, times
    ``world``: DistributedDataParallel averages the ranks' gradients, so the step is exactly
    the single-process step on the whole batch, even when the ranks hold different numbers of
    labelled targets."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, C)
    flat_targets = targets.reshape(-1)                          # (N,)
    loss_sum = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, reduction="sum")
    with torch.no_grad():
        keep = flat_targets != IGNORE
        hits = ((flat_logits.argmax(-1) == flat_targets) & keep).sum()
        totals = torch.stack([loss_sum.detach(), hits.float(), keep.sum().float()])
        torch.distributed.all_reduce(totals)                   # the whole batch's sums
    count = totals[2].clamp(min=1.0)
    if z_loss:
        loss_sum = loss_sum + z_loss * log_z_squared(logits, targets)
    return loss_sum * world / count, totals[0] / count, totals[1] / count


def _flush(pending: list, hist: History, scaler: _Scaler, *, check_grads: bool) -> bool:
    """Read the pending metrics from the device (one synchronisation) into ``hist``.

    Returns True if the run diverged: the history then ends before the first bad step."""
    steps = [p[0] for p in pending]
    lrs = [p[1] for p in pending]
    values = torch.stack([torch.stack([p[2].float(), p[3].float(), p[4].float(),
                                       p[5].float()]) for p in pending]).cpu().tolist()
    pending.clear()
    for step, lr, (loss, acc, norm, labelled) in zip(steps, lrs, values):
        if labelled == 0:
            raise DataError(f"every target of the batch of step {step} is IGNORE ({IGNORE}): "
                            "there is nothing to compute a loss on")
        if not math.isfinite(loss) or (check_grads and not math.isfinite(norm)):
            hist.status, hist.diverged_at = "diverged", step
            hist.message = f"diverged at step {step}: loss={loss:.3g}, gradient norm={norm:.3g}"
            return True
        hist.loss.append(loss)
        hist.accuracy.append(acc)
        hist.grad_norm.append(norm)
        hist.lr.append(lr)
    return False


def train_and_evaluate(model: nn.Module, data: DataSource, cfg: TrainConfig,
                       callbacks: Iterable[Callback] = (), *,
                       held_out: tuple[Tensor, Tensor] | None = None,
                       eval_size: int | None = None) -> tuple[History, float]:
    """Train ``model``, then return its History and its held-out accuracy (eval mode).

    The held-out data is ``held_out`` when given, else ``data.eval_batch(eval_size)`` (the test
    split for ``Digits``, a stream no training step uses for ``SequenceTask``): a data source
    without ``eval_batch`` needs ``held_out``. The one-liner behind every "train this
    configuration for several seeds" loop of the chapters.
    """
    if held_out is None and not isinstance(data, HeldOutSource):
        raise TypeError(f"{type(data).__name__} has no eval_batch(): pass the held-out data as "
                        "held_out=(inputs, targets)")
    hist = train(model, data, cfg, callbacks)
    if held_out is None:
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


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor, *,
             batch_size: int | None = None, batch_stats: bool = False) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``inputs``, in mini-batches of ``batch_size``.

    By default in eval mode (BatchNorm uses its running statistics). ``batch_stats=True``
    evaluates a copy of the model in training mode, so that every BatchNorm normalises with
    the statistics of the current mini-batch, as during training (chapter 3); the model
    itself, and its running statistics, are left untouched either way.
    """
    if len(inputs) == 0 or len(inputs) != len(targets):
        raise ValueError(f"evaluate needs at least one example and as many targets as inputs; "
                         f"got {len(inputs)} inputs and {len(targets)} targets")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"evaluate: batch_size={batch_size!r} must be an integer >= 1 or None")
    target = copy.deepcopy(model) if batch_stats else model
    was_training = model.training
    target.train(batch_stats)
    device = device_of(model)
    size = batch_size or len(inputs)
    losses, hits, counted = 0.0, 0.0, 0
    try:
        for start in range(0, len(inputs), size):
            x, y = inputs[start:start + size], targets[start:start + size]
            if batch_stats and len(x) < 2:                     # BatchNorm needs 2 examples
                break
            n = int((y != IGNORE).sum())
            if n == 0:
                continue
            loss, acc = loss_and_accuracy(target(x.to(device)), y.to(device))
            losses += loss.item() * n
            hits += acc.item() * n
            counted += n
    finally:
        model.train(was_training)
    if counted == 0:
        raise ValueError("evaluate found no labelled target to score (all IGNORE, or, with "
                         "batch_stats=True, no mini-batch of at least 2 examples)")
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
    fresh = copy.deepcopy(model)
    norms = batchnorm_layers(fresh)
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer to recalibrate")
    saved = [n.momentum for n in norms]
    device = device_of(fresh)
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


def best_lr(final_loss: dict[float, float]) -> float:
    """The learning rate with the lowest final loss, between the grid's points (chapter 8).

    ``final_loss`` maps learning rates to final losses. Through the grid's best rate and its
    two neighbours goes a parabola in log(lr); its vertex is the estimate. At an edge of the
    grid, or where the three points do not curve upward, the best grid rate itself: the
    optimum is then not bracketed, and no estimate beyond the grid is made. A run that
    diverged (NaN, inf) counts as the worst loss.
    """
    if not final_loss:
        raise ValueError("best_lr needs the final loss of at least one learning rate")
    lrs = sorted(final_loss)
    loss = [final_loss[r] if math.isfinite(final_loss[r]) else math.inf for r in lrs]
    i = min(range(len(lrs)), key=loss.__getitem__)
    if i in (0, len(lrs) - 1) or not math.isfinite(loss[i - 1] + loss[i + 1]):
        return float(lrs[i])
    x = [math.log(r) for r in lrs[i - 1:i + 2]]
    y = loss[i - 1:i + 2]
    # the vertex of the parabola through three points (x0, y0), (x1, y1), (x2, y2)
    num = (x[1] - x[0]) ** 2 * (y[1] - y[2]) - (x[1] - x[2]) ** 2 * (y[1] - y[0])
    den = (x[1] - x[0]) * (y[1] - y[2]) - (x[1] - x[2]) * (y[1] - y[0])
    if den == 0:
        return float(lrs[i])
    return float(math.exp(x[1] - 0.5 * num / den))


def lr_sensitivity(final_loss: dict[float, float], init_loss: float) -> float:
    """Learning-rate sensitivity (Wortsman et al. 2024; chapter 8): how much worse than the
    best learning rate the others end, on average.

    ``final_loss`` maps each learning rate of a sweep to the run's final loss; a run that
    diverged (NaN, inf) or ended above the loss at initialisation counts as ``init_loss``.
    Returns mean over the rates of min(loss, init_loss) − the best loss: 0 when every rate
    does as well as the best, up to init_loss − best when all but one fail.
    """
    if not final_loss:
        raise ValueError("lr_sensitivity needs the final loss of at least one learning rate")
    capped = [min(v, init_loss) if math.isfinite(v) else init_loss for v in final_loss.values()]
    return sum(capped) / len(capped) - min(capped)
