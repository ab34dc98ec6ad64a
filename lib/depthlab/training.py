"""One training loop for every run of the book: one model, or a group of them at once.

The loop knows nothing of models or tasks: it takes a module, a data source with
``batch(step) -> (inputs, targets)`` and a ``TrainConfig``, and minimises ``losses.objective``
(cross-entropy over the last axis, skipping ``IGNORE``). Measurements plug in through
``Callback`` objects, so diagnostics never require editing the loop (chapter 0).

``train(model, data, cfg)`` trains one model; ``train_group(models, datas, cfgs)`` trains
several models of one structure together (``grouped``: their parameters stacked, one
vectorised step for all), each with its own data, learning rate, warm-up, schedule, clipping
threshold, weight decay and z-loss. Both go through the same loop below, so warm-up,
clipping, divergence, plateaus, callbacks and messages are the same code for both.

A run never raises because training went badly: a non-finite loss (or, without a loss scaler,
a non-finite gradient) stops it and is reported as ``"diverged at step k"``; in a group that
member stops alone, where it was, and the others go on unchanged. A loss that barely moves is
reported as a plateau. The loop does raise for bad input: a batch with no labelled target is
a data error, not a divergence.

Metrics stay on the device and are read back every ``TrainConfig.sync_every`` steps (nanoGPT
reads its loss once per log interval): on a GPU a per-step ``.item()`` would make the host wait
for every step. Divergence is detected at those reads; on the CPU they happen every step.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .config import TrainConfig
from .devices import autocast_context, device_of, pick_device, resolve_amp, rng_devices
from .distributed import data_parallel_world, shard, whole_batch_objective
from .grouped import GroupError, Stack, StackedOptimizer, obstacle
from .losses import IGNORE, DataError, logits_of, loss_and_accuracy, objective

ARITHMETIC_LOG_ENV = "DEPTHLAB_ARITHMETIC_LOG"


@runtime_checkable
class DataSource(Protocol):
    """Anything with ``batch(step) -> (inputs, targets)``, deterministic in ``step``."""

    def batch(self, step: int) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class HeldOutSource(DataSource, Protocol):
    """A data source that also has held-out data no training step uses (``Digits``'s test
    split, a separate stream of ``SequenceTask``)."""

    def eval_batch(self, size: int | None = None) -> tuple[Tensor, Tensor]: ...


class Callback:
    """A measurement during training. Override what you need.

    The loop calls ``before_step`` and ``after_step`` on the steps where ``step % every == 0``
    (``every``: the constructor's argument, default every step). Values returned by
    ``after_step`` (a dict of floats) are stored in ``History.extras`` under the step number.
    ``on_train_end`` is always called, also when the run raises, so a callback that installs
    hooks removes them there.

    ``groupable``: True for a callback that reads the model only between steps (its weights,
    gradients, or forward passes of its own). Such a callback can watch one member of a group
    (``train_group``): the loop writes that member into its module before calling it. A
    callback whose hooks must see the training step itself (forward hooks, as
    ``LayerGradNorms`` uses) is not groupable, and its run is trained alone.
    """

    groupable = False

    def __init__(self, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"{type(self).__name__}: every={every!r} must be an integer >= 1")
        self.every = every

    def on_train_start(self, model: nn.Module) -> None:
        pass

    def before_step(self, step: int, model: nn.Module) -> None:
        pass

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        return None

    def on_train_end(self, model: nn.Module) -> None:
        pass


def _due(cb: Callback, step: int) -> bool:
    return step % getattr(cb, "every", 1) == 0


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


def lr_scales(model: nn.Module) -> tuple[float, ...]:
    """Each trainable parameter's learning-rate multiplier (``lr_scale``, 1 if unmarked), in
    order. A group steps every member with one vector of these, so runs whose scales differ
    (μP at another width is another structure anyway; a scale set by hand is not) are never
    grouped."""
    return tuple(float(getattr(p, "lr_scale", 1.0)) for p in model.parameters()
                 if p.requires_grad)


def make_optimizer(params: Iterable[Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer`` with its learning rate, betas, eps and decay.

    A parameter marked with ``lr_scale`` (``models.apply_mup``) goes into a group of its own
    that learns at ``lr_scale`` × the schedule's rate (``set_lr``), with its weight decay
    divided by ``lr_scale`` so that the decay per step (rate × decay) is the same as the other
    groups' (μP's rule, as the ``mup`` package's MuAdam applies it); all others share one."""
    by_scale: dict[float, list[Tensor]] = {}
    for p in params:
        by_scale.setdefault(float(getattr(p, "lr_scale", 1.0)), []).append(p)
    groups = [{"params": ps, "lr_scale": scale, "weight_decay": cfg.weight_decay / scale}
              for scale, ps in by_scale.items()]
    # foreach=True batches the per-tensor updates: about 2x faster for our small models on CPU,
    # where PyTorch would otherwise pick the one-tensor-at-a-time loop.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    if cfg.independent_decay:
        # PyTorch's AdamW multiplies the weights by 1 - lr_group·decay each step, so the decay
        # moves with the learning rate (Loshchilov & Hutter 2019). Independent decay
        # (Wortsman et al. 2024) multiplies them by 1 - weight_decay·lr_t/lr: the schedule's
        # shape only. Dividing each group's decay by its peak rate gives exactly that.
        for group in groups:
            group["weight_decay"] = cfg.weight_decay / (cfg.lr * group["lr_scale"])
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate for this step, times each group's ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def step_flops(model: nn.Module, batch: tuple[Tensor, Tensor]) -> float:
    """Arithmetic of one training step of ``model`` on ``batch``: about 6 FLOPs per trainable
    parameter per input position (2 in the forward pass, 4 in the backward; Kaplan et al.
    2020). An estimate for budgets and grouping decisions, not a measurement."""
    inputs = batch[0]
    positions = inputs.shape[0] * (inputs.shape[1] if inputs.dim() > 1
                                   and not inputs.is_floating_point() else 1)
    return 6.0 * sum(p.numel() for p in model.parameters() if p.requires_grad) * positions


def _log_arithmetic(models: Sequence[nn.Module], datas: Sequence[DataSource],
                    hists: Sequence[History]) -> None:
    """With ``DEPTHLAB_ARITHMETIC_LOG=path`` set, append one JSON line per run: its steps and
    estimated FLOPs (``step_flops``). ``benchmarks/budget.py`` sets it to tell how much of a
    chapter's time is arithmetic."""
    path = os.environ.get(ARITHMETIC_LOG_ENV)
    if not path:
        return
    lines = [json.dumps({"steps": h.steps_run, "flops_per_step": step_flops(m, d.batch(0)),
                         "grouped": len(models) > 1}) for m, d, h in zip(models, datas, hists)]
    with open(path, "a") as f:                     # one short write per run: workers append
        f.write("\n".join(lines) + "\n")


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
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

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


# --------------------------------------------------------------------------------------------
# What one step does: for one model (_One) or for a group (_Group). Both return the metrics of
# every member as (N,) tensors on the device; the loop around them is the same.
# --------------------------------------------------------------------------------------------


class _One:
    """One model, possibly over several torchrun processes (DistributedDataParallel)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, rank: int,
                 world: int) -> None:
        self.model, self.cfg, self.device, self.rank, self.world = model, cfg, device, rank, world
        model.to(device)
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters to train")
        self.forward = model
        if world > 1:
            # One run over every process (torchrun): DistributedDataParallel averages the
            # gradients over the ranks during backward, so every rank takes the same step.
            self.forward = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = make_optimizer(self.params, cfg)
        self.scaler = _Scaler(device, resolve_amp(device, cfg.amp))
        self.checks_grads = not self.scaler.active     # a scaler's overflow is no divergence

    def models(self) -> list[nn.Module]:
        return [self.model]

    def forward_backward(self, step: int, lrs: list[float],
                         batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
        set_lr(self.optimizer, lrs[0])
        inputs, targets = batches[0]
        if self.world > 1:                                 # this rank's share of the batch
            inputs = shard(inputs, self.rank, self.world, step)
            targets = shard(targets, self.rank, self.world, step)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        with autocast_context(self.device, self.cfg.amp):
            logits = logits_of(self.forward(inputs))     # a Hugging Face model's .logits
        if self.world > 1:
            minimised, loss, acc = whole_batch_objective(logits, targets, self.world,
                                                         self.cfg.z_loss)
        else:
            minimised, loss, acc = objective(logits, targets, self.cfg.z_loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(minimised).backward()
        self.scaler.unscale_(self.optimizer)
        norm = clip_and_norm(self.params, self.cfg.clip_norm)
        labelled = (targets != IGNORE).sum()
        if self.world > 1:                                 # labelled somewhere in the batch
            torch.distributed.all_reduce(labelled)
        return tuple(t.detach().reshape(1) for t in (loss, acc, norm.to(loss.device), labelled))

    def apply(self, alive: list[bool]) -> str | None:
        """Take the step; "skipped" (float16 overflow) or "collapsed" (scale below 1)."""
        if self.scaler.step(self.optimizer):
            return "collapsed" if self.scaler.collapsed() else "skipped"
        return None

    def write_back(self, i: int, *, grads: bool) -> None:
        pass                                               # the model is trained in place


class _Group:
    """N models of one structure, stacked (``grouped.Stack``), one optimiser for all."""

    def __init__(self, models: Sequence[nn.Module], cfgs: Sequence[TrainConfig],
                 device: torch.device) -> None:
        self.members, self.cfgs, self.device = list(models), list(cfgs), device
        self.stack = Stack(self.members, device)
        c = cfgs[0]
        vec = lambda values, dtype=torch.float32: torch.tensor(values, dtype=dtype,  # noqa: E731
                                                               device=device)
        self.clip = vec([cf.clip_norm if cf.clip_norm is not None else math.inf for cf in cfgs])
        if all(cf.clip_norm is None for cf in cfgs):
            self.clip = None                           # no member clips: no rescaling pass
        self.z_loss = vec([cf.z_loss for cf in cfgs])
        self.optimizer = StackedOptimizer(
            self.stack.flat, self.stack.lr_scale, kind=c.optimizer, betas=c.betas, eps=c.eps,
            momentum=c.momentum, weight_decay=vec([cf.weight_decay for cf in cfgs]),
            independent=vec([cf.independent_decay for cf in cfgs], torch.bool),
            peak_lr=vec([cf.lr for cf in cfgs]))
        self.checks_grads = True
        self._lrs = vec([0.0] * len(cfgs))

    def models(self) -> list[nn.Module]:
        return self.members

    def forward_backward(self, step: int, lrs: list[float],
                         batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
        self._lrs = torch.tensor(lrs, dtype=torch.float32, device=self.device)
        try:
            xs = torch.stack([x for x, _ in batches]).to(self.device)      # (N, B, ...)
            ys = torch.stack([y for _, y in batches]).to(self.device)      # (N, B, ...)
        except RuntimeError as exc:
            raise DataError(f"the members' batches of step {step} differ in shape, so they "
                            f"cannot be stacked into one group: {exc}") from None
        loss, acc = self.stack.forward_backward(xs, ys, self.z_loss, self.cfgs[0].amp)
        norm = self.stack.clip_and_norm(self.clip)
        labelled = (ys != IGNORE).reshape(len(batches), -1).sum(1)
        return loss, acc.detach(), norm.detach(), labelled

    def apply(self, alive: list[bool]) -> str | None:
        frozen = None if all(alive) else torch.tensor([not a for a in alive], device=self.device)
        self.optimizer.step(self._lrs, frozen)
        return None

    def write_back(self, i: int, *, grads: bool) -> None:
        self.stack.write_back(i, self.members[i], grads=grads)


def train(model: nn.Module, data: DataSource, cfg: TrainConfig,
          callbacks: Iterable[Callback] = ()) -> History:
    """Train ``model`` in place on ``data`` for ``cfg.steps`` steps and return its ``History``.

    The model is moved to the chosen device and left there. Reproducible on CPU for a given
    model initialisation, data seed and ``cfg.seed``. Callbacks are ended, and the progress bar
    closed, even if the run raises.

    Launched with ``torchrun --nproc-per-node N`` (see the README's "Running at scale"), the same
    call trains one model over N processes: the model is wrapped in DistributedDataParallel,
    every rank draws the same batch and trains on its share (``distributed.shard``), the
    gradients are averaged so that each step is the single-process step on the whole batch,
    every rank returns the same History (whole-batch loss and accuracy) and only rank 0 draws a
    progress bar. Build the model from the same seed on every rank. A BatchNorm then normalises
    with each rank's own share (per-rank statistics, as ``nn.BatchNorm`` does under DDP), not
    the whole batch's, and its running statistics are rank 0's (DDP broadcasts buffers).
    """
    rank, world = data_parallel_world()
    device = pick_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())   # this rank's GPU
    stepper = _One(model, cfg, device, rank, world)
    return _loop(stepper, [data], [cfg], [list(callbacks)], device, show=rank == 0)[0]


def group_obstacle(models: Sequence[nn.Module], cfgs: Sequence[TrainConfig],
                   callbacks: Sequence[Sequence[Callback]] = ()) -> str | None:
    """Why these runs cannot be trained as one group (a sentence), or None if they can."""
    why = obstacle(models)
    if why:
        return why
    if len(cfgs) != len(models):
        return f"{len(models)} models but {len(cfgs)} TrainConfigs"
    if len({lr_scales(m) for m in models}) > 1:
        return ("the models' parameters carry different lr_scale marks, and a group steps "
                "every member with the first member's")
    shared = ("optimizer", "betas", "eps", "momentum", "steps", "amp", "device", "sync_every")
    for name in shared:
        if len({getattr(c, name) for c in cfgs}) > 1:
            return (f"the runs differ in TrainConfig.{name}, which a group shares (it may differ "
                    "in lr, warm-up, schedule, clipping, weight decay and z-loss)")
    device = pick_device(cfgs[0].device)
    if resolve_amp(device, cfgs[0].amp) == "fp16":
        return "float16 needs a loss scaler per run, which a group does not have"
    for cbs in callbacks:
        for cb in cbs:
            if not getattr(cb, "groupable", False):
                return (f"{type(cb).__name__} must see the training step itself "
                        "(Callback.groupable is False), so its run is trained alone")
    if data_parallel_world()[1] > 1:
        return "under torchrun a group trains inside one process only (a sweep's point)"
    return None


def train_group(models: Sequence[nn.Module], datas: Sequence[DataSource],
                cfgs: TrainConfig | Sequence[TrainConfig],
                callbacks: Sequence[Sequence[Callback]] | None = None) -> list[History]:
    """Train several models of one structure at once; History i is (to float32 round-off) what
    ``train(models[i], datas[i], cfgs[i], callbacks[i])`` would return.

    The members may differ in their initial values (seed, init scheme, gain), their data
    (same batch shapes) and, in their TrainConfigs, in lr, warm-up, schedule, clipping, weight
    decay, independent decay and z-loss; everything else is shared (``group_obstacle`` says
    what is not allowed and why). Each model is trained in place and left on the device, as
    ``train`` leaves it. A member that diverges stops where it was, alone. See ``grouped``.
    """
    models = list(models)
    cfgs = list(cfgs) if isinstance(cfgs, Sequence) else [cfgs] * len(models)
    if len(datas) != len(models):
        raise GroupError(f"{len(models)} models but {len(datas)} data sources")
    callbacks = [list(c) for c in callbacks] if callbacks is not None else [[] for _ in models]
    why = group_obstacle(models, cfgs, callbacks)
    if why:
        raise GroupError(why)
    device = pick_device(cfgs[0].device)
    stepper = _Group(models, cfgs, device)
    return _loop(stepper, list(datas), cfgs, callbacks, device, show=True)


def _loop(stepper, datas: list[DataSource], cfgs: list[TrainConfig],
          callbacks: list[list[Callback]], device: torch.device, *, show: bool) -> list[History]:
    """The training loop of ``train`` and ``train_group``: N members, N = 1 for ``train``."""
    n = len(cfgs)
    models = stepper.models()
    hists = [History(device=str(device)) for _ in range(n)]
    alive = [True] * n
    steps = cfgs[0].steps
    every = sync_interval(cfgs[0], device)
    pending: list = []
    show = show and (_interactive() if cfgs[0].progress is None else cfgs[0].progress)
    bar = None
    if show:
        bar = tqdm(total=steps, desc="train" if n == 1 else f"train {n} runs", leave=False)

    started: list[tuple[Callback, nn.Module]] = []
    try:
        for i, cbs in enumerate(callbacks):
            for cb in cbs:
                cb.on_train_start(models[i])
                started.append((cb, models[i]))
        with torch.random.fork_rng(devices=rng_devices(device)):   # dropout draws stay local
            torch.manual_seed(cfgs[0].seed + getattr(stepper, "rank", 0))  # each rank's masks
            for step in range(steps):
                lrs = [lr_at(step, c) for c in cfgs]
                batches = [d.batch(step) for d in datas]
                for x, y in batches:
                    _check_batch(x, y, step)
                for i, cbs in enumerate(callbacks):
                    due = [cb for cb in cbs if _due(cb, step)]
                    if due and alive[i]:
                        stepper.write_back(i, grads=False)
                        for cb in due:
                            cb.before_step(step, models[i])
                metrics = stepper.forward_backward(step, lrs, batches)
                pending.append((step, lrs, metrics))
                if len(pending) >= every or step == steps - 1:
                    _flush(pending, hists, alive, check_grads=stepper.checks_grads)
                    if not any(alive):
                        break                           # before the bad step is applied
                outcome = stepper.apply(alive)
                if outcome is not None:                 # a float16 loss scaler's verdict
                    hists[0].skipped.append(step)
                    if outcome == "collapsed":
                        hists[0].status, hists[0].diverged_at = "diverged", step
                        hists[0].message = (f"diverged at step {step}: the float16 loss scale "
                                            "fell below 1, so the gradients overflow float16 "
                                            "even unscaled")
                        break
                for i, cbs in enumerate(callbacks):
                    due = [cb for cb in cbs if _due(cb, step)]
                    if due and alive[i]:
                        stepper.write_back(i, grads=True)
                        for cb in due:
                            extra = cb.after_step(step, models[i])
                            if extra:
                                hists[i].extras.setdefault(step, {}).update(extra)
                if bar is not None:
                    bar.update(1)
                    if not pending and hists[0].loss:
                        bar.set_postfix(loss=f"{hists[0].loss[-1]:.3f}",
                                        acc=f"{hists[0].accuracy[-1]:.2f}")
        if pending and any(alive) and hists[0].status != "diverged":
            _flush(pending, hists, alive, check_grads=stepper.checks_grads)
    finally:
        if bar is not None:
            bar.close()
        for i in range(len(models)):
            stepper.write_back(i, grads=True)
        for cb, model in started:
            cb.on_train_end(model)

    for hist, cfg in zip(hists, cfgs):
        if hist.diverged_at is not None:       # steps after the divergence are not history
            hist.extras = {k: v for k, v in hist.extras.items() if k < hist.diverged_at}
        if hist.status == "ok":
            _check_plateau(hist, cfg)
        if not hist.message:
            hist.message = (f"trained {hist.steps_run} steps: loss {hist.loss[0]:.3f} -> "
                            f"{hist.final('loss'):.3f}, accuracy {hist.final('accuracy'):.3f}")
    _log_arithmetic(models, datas, hists)
    return hists


def _flush(pending: list, hists: list[History], alive: list[bool], *, check_grads: bool) -> None:
    """Read the pending metrics of every member from the device (one synchronisation) into the
    histories. A member whose loss (or gradient) is not finite is marked dead: its history
    ends before the first bad step."""
    steps = [p[0] for p in pending]
    lrs = [p[1] for p in pending]
    values = torch.stack([torch.stack([t.float() for t in p[2]]) for p in pending])  # (K, 4, N)
    values = values.cpu().tolist()
    pending.clear()
    for step, step_lrs, (losses, accs, norms, labelled) in zip(steps, lrs, values):
        for i, hist in enumerate(hists):
            if not alive[i]:
                continue
            if labelled[i] == 0:
                raise DataError(f"every target of the batch of step {step} is IGNORE "
                                f"({IGNORE}): there is nothing to compute a loss on")
            loss, norm = losses[i], norms[i]
            if not math.isfinite(loss) or (check_grads and not math.isfinite(norm)):
                alive[i] = False
                hist.status, hist.diverged_at = "diverged", step
                hist.message = f"diverged at step {step}: loss={loss:.3g}, gradient norm={norm:.3g}"
                continue
            hist.loss.append(loss)
            hist.accuracy.append(accs[i])
            hist.grad_norm.append(norm)
            hist.lr.append(step_lrs[i])


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


def train_and_evaluate(model: nn.Module, data: DataSource, cfg: TrainConfig,
                       callbacks: Iterable[Callback] = (), *,
                       held_out: tuple[Tensor, Tensor] | None = None,
                       eval_size: int | None = None) -> tuple[History, float]:
    """Train ``model``, then return its History and its held-out accuracy (eval mode).

    The held-out data is ``held_out`` when given, else ``data.eval_batch(eval_size)`` (the test
    split for ``Digits``, a stream no training step uses for ``SequenceTask``): a data source
    without ``eval_batch`` needs ``held_out``.
    """
    if held_out is None and not isinstance(data, HeldOutSource):
        raise TypeError(f"{type(data).__name__} has no eval_batch(): pass the held-out data as "
                        "held_out=(inputs, targets)")
    hist = train(model, data, cfg, callbacks)
    if held_out is None:
        held_out = data.eval_batch() if eval_size is None else data.eval_batch(eval_size)
    return hist, evaluate(model, *held_out)["accuracy"]


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
            loss, acc = loss_and_accuracy(logits_of(target(x.to(device))), y.to(device))
            losses += loss.item() * n
            hits += acc.item() * n
            counted += n
    finally:
        model.train(was_training)
    if counted == 0:
        raise ValueError("evaluate found no labelled target to score (all IGNORE, or, with "
                         "batch_stats=True, no mini-batch of at least 2 examples)")
    return {"loss": losses / counted, "accuracy": hits / counted}
