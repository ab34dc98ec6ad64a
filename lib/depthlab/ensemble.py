"""One configuration, several seeds: ``train_seeds``.

Every stochastic finding of the book is measured over at least three seeds, so most training
in the chapters is "the same run, once per seed". ``train_seeds`` does that through the one
training loop's API and returns one ``Run`` (seed, trained model, ``History``) per seed, in
order. Run i is the run ``dl.train(build(seed_i), data(seed_i), cfg.replace(seed=seed_i))``
would give; how the runs are executed is a separate choice (``method``):

- ``"processes"``: one worker process per core (``parallel.sweep``): on a CPU, where the
  models are too small for a second thread to help, this is what makes 3 seeds cost about
  as much as 2 (measured in ``benchmarks/speed.py``).
- ``"vmap"``: a seed *ensemble*: all members' parameters stacked along a new first axis and
  trained in one process by ``torch.func.vmap`` over ``torch.func.functional_call``, with one
  optimiser over the stacked tensors (Adam and SGD act element by element, so that is N
  independent optimisers), per-member gradient clipping and per-member divergence. On a GPU
  this turns N tiny, launch-bound runs into one run of N-times-larger kernels. On our 2-core
  CPU it gains only 10-25 %: the per-operation overhead that dominates tiny models is not
  removed by batching (profile in ``benchmarks/speed.py``).
- ``"sequential"``: a plain loop (with the one torch thread the workers use, so that the
  results are bit for bit those of "processes").
- ``"auto"`` (default): "vmap" on CUDA when the model allows it, else "processes" (which
  itself falls back to a loop where it cannot fork).

A model that draws random numbers in its forward pass (dropout, noisy BatchNorm) or a run with
callbacks or a loss scaler cannot be vmapped faithfully; "auto" then uses "processes", and an
explicit "vmap" raises saying why.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import TrainConfig
from .parallel import sweep
from .training import (
    Callback,
    DataSource,
    History,
    _check_batch,
    _check_plateau,
    autocast_context,
    lr_at,
    make_optimizer,
    objective,
    pick_device,
    resolve_amp,
    set_lr,
    sync_interval,
    train,
)

METHODS = ("auto", "processes", "vmap", "sequential")


@dataclass
class Run:
    """One trained seed: the model (on the device it trained on), its history, and the
    callbacks that watched it (in the order given)."""

    seed: int
    model: nn.Module
    history: History
    callbacks: list[Callback] = field(default_factory=list)


def train_seeds(build: Callable[[int], nn.Module], data: Callable[[int], DataSource],
                cfg: TrainConfig, seeds: Sequence[int], *,
                callbacks: Callable[[int], Sequence[Callback]] | None = None,
                method: str = "auto", workers: int | None = None) -> list[Run]:
    """Train ``build(s)`` on ``data(s)`` with ``cfg.replace(seed=s)`` for every seed s.

    ``callbacks(s)`` makes the callbacks of seed s (a factory, so no two runs share one).
    ``method``: see the module docstring. ``workers``: processes for "processes" (default:
    one per core). Returns one ``Run`` per seed, in the order of ``seeds``.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("train_seeds needs at least one seed")
    if method == "auto":
        device = pick_device(cfg.device)
        method = "processes"
        if device.type == "cuda" and callbacks is None:
            models = [build(s) for s in seeds]
            if vmap_obstacle(models, cfg) is None:
                return _train_vmap(models, [data(s) for s in seeds], cfg, seeds)
    if method == "vmap":
        if callbacks is not None:
            raise ValueError("method='vmap' cannot run callbacks (each watches one model); "
                             "use method='processes'")
        models = [build(s) for s in seeds]
        why = vmap_obstacle(models, cfg)
        if why:
            raise ValueError(f"method='vmap' is not possible here: {why}")
        return _train_vmap(models, [data(s) for s in seeds], cfg, seeds)

    def one(seed: int) -> Run:
        model = build(seed)
        cbs = list(callbacks(seed)) if callbacks is not None else []
        hist = train(model, data(seed), cfg.replace(seed=seed), cbs)
        return Run(seed, model, hist, cbs)

    # Both run each seed with one torch thread, so they give the same numbers bit for bit.
    return sweep(one, seeds, workers=1 if method == "sequential" else workers)


def vmap_obstacle(models: Sequence[nn.Module], cfg: TrainConfig) -> str | None:
    """Why these models cannot be trained as one vmapped ensemble, or None if they can."""
    shapes = [[(n, tuple(t.shape)) for n, t in m.state_dict().items()] for m in models]
    if any(s != shapes[0] for s in shapes):
        return "the members do not share one architecture"
    for m in models[0].modules():
        p = getattr(m, "p", None) if isinstance(m, nn.Dropout) else None
        if (p or 0) > 0 or getattr(m, "dropout", 0) > 0 or getattr(m, "noise", 0) > 0:
            return (f"{type(m).__name__} draws random numbers in the forward pass, which "
                    "vmap cannot draw as the separate runs would")
    if resolve_amp(pick_device(cfg.device), cfg.amp) == "fp16":
        return "float16 needs a loss scaler per member"
    if any(getattr(p, "lr_scale", 1.0) != 1.0 for p in models[0].parameters()):
        return "per-parameter learning rates (μP) do not survive stacking the members"
    return None


def _train_vmap(models: list[nn.Module], datas: list[DataSource], cfg: TrainConfig,
                seeds: list[int]) -> list[Run]:
    """The seed ensemble: see the module docstring."""
    from torch.func import functional_call, stack_module_state, vmap

    device = pick_device(cfg.device)
    n = len(models)
    for m in models:
        m.to(device).train()
    skeleton = copy.deepcopy(models[0])
    for m in skeleton.modules():
        if hasattr(m, "sdpa"):
            m.sdpa = False            # written-out attention: vmap has no rule for SDPA on CPU
    params, buffers = stack_module_state(models)
    trainable = {k for k, p in models[0].named_parameters() if p.requires_grad}
    params = {k: v.detach().requires_grad_(k in trainable) for k, v in params.items()}
    leaves = [params[k] for k in params if k in trainable]
    optimizer = make_optimizer(leaves, cfg)

    def member_loss(p, b, x, y):
        with autocast_context(device, cfg.amp):
            logits = functional_call(skeleton, (p, b), (x,))
        return objective(logits, y, cfg)

    loss_fn = vmap(member_loss)
    hists = [History(device=str(device)) for _ in range(n)]
    alive = [True] * n
    every = sync_interval(cfg, device)
    pending: list = []
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        set_lr(optimizer, lr)
        batches = [d.batch(step) for d in datas]
        for x, y in batches:
            _check_batch(x, y, step)
        xs = torch.stack([b[0] for b in batches]).to(device)          # (N, B, ...)
        ys = torch.stack([b[1] for b in batches]).to(device)          # (N, B, ...)
        minimised, losses, accs = loss_fn(params, buffers, xs, ys)      # (N,) each
        optimizer.zero_grad(set_to_none=True)
        minimised.sum().backward()       # members are independent: each gets its own gradient
        norms = _member_norms(leaves, n)                                # (N,), before clipping
        if cfg.clip_norm is not None:
            coef = (cfg.clip_norm / (norms + 1e-6)).clamp(max=1.0)      # clip_grad_norm_'s rule
            for p in leaves:
                if p.grad is not None:
                    p.grad.mul_(coef.view(-1, *([1] * (p.dim() - 1))))
        pending.append((step, lr, losses.detach(), accs, norms.detach()))
        if len(pending) >= every or step == cfg.steps - 1:
            _flush_members(pending, hists, alive)
        before = ([p.detach().clone() for p in leaves] if not all(alive) else None)
        optimizer.step()
        if before is not None:                    # a diverged member stays where it stopped
            dead = torch.tensor([not a for a in alive], device=device)
            with torch.no_grad():
                for p, old in zip(leaves, before):
                    p.copy_(torch.where(dead.view(-1, *([1] * (p.dim() - 1))), old, p))
        if not any(alive):
            break
    runs = []
    for i, (m, h, s) in enumerate(zip(models, hists, seeds)):
        with torch.no_grad():
            for name, t in list(m.named_parameters()) + list(m.named_buffers()):
                t.copy_((params if name in params else buffers)[name][i])
        if h.status == "ok":
            _check_plateau(h, cfg)
        if not h.message:
            h.message = (f"trained {h.steps_run} steps: loss {h.loss[0]:.3f} -> "
                         f"{h.final('loss'):.3f}, accuracy {h.final('accuracy'):.3f}")
        runs.append(Run(s, m, h))
    return runs


def _member_norms(leaves: list[torch.Tensor], n: int) -> torch.Tensor:
    """(N,) global gradient norm of each member over all its parameters."""
    sq = [p.grad.reshape(n, -1).float().pow(2).sum(1) for p in leaves if p.grad is not None]
    return torch.stack(sq).sum(0).sqrt()


def _flush_members(pending: list, hists: list[History], alive: list[bool]) -> None:
    """Read the pending per-member metrics (one synchronisation) into the histories."""
    rows = [(step, lr, torch.stack([loss, acc.float(), norm.float()]).cpu().tolist())
            for step, lr, loss, acc, norm in pending]
    pending.clear()
    for step, lr, (losses, accs, norms) in rows:
        for i, h in enumerate(hists):
            if not alive[i]:
                continue
            if not (math.isfinite(losses[i]) and math.isfinite(norms[i])):
                alive[i] = False
                h.status, h.diverged_at = "diverged", step
                h.message = (f"diverged at step {step}: loss={losses[i]:.3g}, gradient "
                             f"norm={norms[i]:.3g}")
                continue
            h.loss.append(losses[i])
            h.accuracy.append(accs[i])
            h.grad_norm.append(norms[i])
            h.lr.append(lr)
