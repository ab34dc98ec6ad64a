"""Several runs of one architecture trained as one: stacked parameters, one optimiser step.

The book trains many tiny models that differ only in a seed or a learning rate. One by one,
each step of each model pays PyTorch's fixed cost per operation, which dominates at widths of
16-32 on a CPU and on any GPU. A *group* puts the N members' parameters side by side in one
(N, P) matrix and runs every member's forward and backward pass at once
(``torch.func.vmap`` over ``torch.func.functional_call``): the same arithmetic in N-times
larger operations. The optimiser then updates the one matrix, each member with its own
learning rate, weight decay and clipping threshold; Adam and SGD act entry by entry, so that
is exactly N independent optimisers.

This module is the mechanism only: ``training.train_group`` runs a group through the one
training loop (the same warm-up, schedule, clipping, divergence and plateau rules as
``dl.train``), and ``sweeps.train_grid`` decides what to group. Members must share their
structure (``structure``) and draw no random numbers in the forward pass; they may differ in
anything that only sets initial values (seed, init scheme, gain) and in every number the
loop reads per member (learning rate, warm-up, schedule, clipping, weight decay, z-loss).
Measured gains are in ``benchmarks/speed.py``: large at widths 16-32 on a CPU, small at 64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from .devices import autocast_context
from .losses import objective


class GroupError(ValueError):
    """Runs that cannot be trained as one group; the message says why."""


def structure(model: nn.Module):
    """What two models must have in common to be trained as one group, or None if depthlab
    cannot vouch for what the model computes.

    Parameter shapes are not enough: a Pre-LN and a Post-LN block have the same shapes and
    compute different functions, and a group runs every member through the first member's
    code. depthlab's models say what fixes their function (``structure_key``: the class and
    the configuration without the fields that only choose initial values); a model without
    one is never grouped.
    """
    key = getattr(model, "structure_key", None)
    return key() if callable(key) else None


def _draws_random_numbers(model: nn.Module) -> str | None:
    """The name of a module that draws random numbers in the forward pass (dropout, noisy
    BatchNorm), or None. vmap would draw one noise sample for every member, not N."""
    for m in model.modules():
        p = getattr(m, "p", None) if isinstance(m, nn.Dropout) else None
        if (p or 0) > 0 or (getattr(m, "dropout", 0) or 0) > 0 or (getattr(m, "noise", 0) or 0) > 0:
            return type(m).__name__
    return None


def obstacle(models: Sequence[nn.Module]) -> str | None:
    """Why these models cannot be one group (a sentence), or None if they can."""
    if len(models) < 2:
        return "a group needs at least two models"
    keys = [structure(m) for m in models]
    if keys[0] is None:
        return (f"{type(models[0]).__name__} does not say what fixes its function "
                "(structure_key): only depthlab's models are grouped")
    if any(k != keys[0] for k in keys):
        return "the models differ in more than their initial values (their configurations)"
    drawn = _draws_random_numbers(models[0])
    if drawn:
        return f"{drawn} draws random numbers in the forward pass, which vmap cannot draw per run"
    return None


class Stack:
    """N models of one structure as one: every trainable parameter in one (N, P) matrix.

    ``flat`` is the only leaf that training updates; ``forward_backward`` slices it into each
    parameter's (N, ...) view inside the step, so that autograd gathers every gradient into
    ``flat.grad``. Buffers (BatchNorm's running statistics) are stacked separately. The member
    modules keep their own tensors, written back by ``write_back``.
    """

    def __init__(self, models: Sequence[nn.Module], device: torch.device) -> None:
        why = obstacle(models)
        if why:
            raise GroupError(why)
        self.n = len(models)
        self.device = device
        for m in models:
            m.to(device).train()
        self.skeleton = models[0]
        named = list(models[0].named_parameters())
        trainable = [(name, p) for name, p in named if p.requires_grad]
        if not trainable:
            raise GroupError(f"{type(models[0]).__name__} has no trainable parameters")
        params, self.buffers = stack_module_state(list(models))
        # Every trainable parameter as a slice of one (N, P) matrix: name -> (start, stop, shape)
        self.layout: dict[str, tuple[int, int, torch.Size]] = {}
        start = 0
        for name, p in trainable:
            self.layout[name] = (start, start + p.numel(), p.shape)
            start += p.numel()
        self.flat = torch.cat([params[name].reshape(self.n, -1) for name, _ in trainable], 1)
        self.flat = self.flat.detach().requires_grad_(True)                  # (N, P)
        self._targets: dict[int, tuple] = {}          # write_back's tensors, per member
        self.frozen = {name: params[name].detach() for name, p in named if not p.requires_grad}
        # μP and similar marks: each parameter's learning-rate multiplier, per entry of P
        self.lr_scale = torch.cat([torch.full((p.numel(),), float(getattr(p, "lr_scale", 1.0)))
                                   for _, p in trainable]).to(device)        # (P,)
        skeleton = self.skeleton
        # vmap batches every operation of the forward pass; PyTorch's fused attention kernel
        # has no batching rule on the CPU (it falls back to a loop), the written-out one does
        sdpa = [(m, m.sdpa) for m in skeleton.modules() if hasattr(m, "sdpa")]

        def member(params, buffers, x, y, z_loss):
            return objective(functional_call(skeleton, (params, buffers), (x,)), y, z_loss)

        self._member = vmap(member)
        self._sdpa = sdpa

    def parameters_as_dict(self) -> dict[str, Tensor]:
        """Each parameter as an (N, ...) view of ``flat`` (and the frozen ones as they are).

        One ``split``, not a slice per parameter: autograd turns each slice's gradient into a
        zero-filled (N, P) tensor and adds them all up, K full-size passes for K parameters
        (×1.4 on a 16-layer MLP's grouped step); ``split``'s backward concatenates once."""
        sizes = [b - a for a, b, _ in self.layout.values()]
        views = {name: chunk.view(self.n, *shape) for (name, (_, _, shape)), chunk
                 in zip(self.layout.items(), self.flat.split(sizes, dim=1))}
        return {**views, **self.frozen}

    def forward_backward(self, xs: Tensor, ys: Tensor, z_loss: Tensor, amp: str
                         ) -> tuple[Tensor, Tensor]:
        """Every member's forward and backward pass on its own batch (xs[i], ys[i]).

        Returns (loss, accuracy), each (N,); ``flat.grad`` holds each member's gradient."""
        for m, _ in self._sdpa:
            m.sdpa = False
        try:
            with autocast_context(self.device, amp):
                minimised, loss, acc = self._member(self.parameters_as_dict(), self.buffers,
                                                    xs, ys, z_loss)
        finally:
            for m, was in self._sdpa:
                m.sdpa = was
        self.flat.grad = None
        minimised.sum().backward()         # the members are independent: each its own gradient
        return loss.detach(), acc

    def clip_and_norm(self, clip: Tensor | None) -> Tensor:
        """(N,) each member's gradient norm before clipping; clips member i's gradient to
        ``clip[i]`` (inf: no clipping) with ``clip_grad_norm_``'s rule. ``clip`` None: no
        member clips, and the gradient is left alone (the rule would multiply it by 1)."""
        grad = self.flat.grad
        norms = grad.norm(dim=1)                                             # (N,)
        if clip is None:
            return norms
        coef = (clip / (norms + 1e-6)).clamp(max=1.0)
        grad.mul_(coef.unsqueeze(1))
        return norms

    def write_back(self, i: int, model: nn.Module, *, grads: bool = False) -> None:
        """Copy member i's parameters and buffers (and gradients) into its own module."""
        # A callback watching a member calls this twice a step: the module's tensors and
        # their views of ``flat`` (updated in place, never replaced) are looked up once,
        # not through named_parameters(), which walks every submodule on every call.
        if self._targets.get(i, (None,))[0] is not model:
            named = dict(model.named_parameters())
            row = self.flat.detach()[i]
            params = [(named[name], row[a:b].view(shape))
                      for name, (a, b, shape) in self.layout.items()]
            buffers = [(t, self.buffers[name][i]) for name, t in model.named_buffers()]
            self._targets[i] = (model, params, buffers)
        _, params, buffers = self._targets[i]
        with torch.no_grad():
            for p, source in params:
                p.copy_(source)
            if grads and self.flat.grad is not None:
                sizes = [b - a for a, b, _ in self.layout.values()]
                for (p, source), g in zip(params, self.flat.grad[i].split(sizes)):
                    p.grad = g.view(source.shape).clone()
            for t, source in buffers:
                t.copy_(source)


class StackedOptimizer:
    """Adam, AdamW or SGD on a stacked (N, P) parameter matrix, each member with its own
    learning rate and weight decay, each entry with its own rate multiplier (μP).

    The arithmetic is torch.optim's (the same order of operations as its foreach
    implementation; a test compares them to float32 round-off): Adam's moments and bias
    corrections, L2 decay added to the gradient for Adam and SGD, AdamW's multiplicative
    decay before the update, SGD's momentum buffer that starts as the first gradient.
    A member with ``independent`` decay (``TrainConfig.independent_decay``, AdamW only) is
    multiplied by 1 − decay·lr_t/lr_peak: the schedule's shape, not the rate's size.
    """

    def __init__(self, flat: Tensor, lr_scale: Tensor, *, kind: str, betas: tuple[float, float],
                 eps: float, momentum: float, weight_decay: Tensor, independent: Tensor,
                 peak_lr: Tensor) -> None:
        self.flat, self.lr_scale = flat, lr_scale.unsqueeze(0)              # (N, P), (1, P)
        # without μP's marks every multiplier is 1, and lr × 1 is lr exactly: the step then
        # skips one (N, P) product, and its later products broadcast an (N, 1) rate
        self.unit_scale = bool((lr_scale == 1).all())
        self.kind, self.betas, self.eps, self.momentum = kind, betas, eps, momentum
        # a μP matrix (lr_scale 1/m) decays m times more per unit of rate: rate × decay stays
        # the same as the other parameters' (make_optimizer, the mup package's MuAdam)
        self.wd = weight_decay.unsqueeze(1) / self.lr_scale                 # (N, P)
        self.wd_member = weight_decay.unsqueeze(1)                          # (N, 1)
        self.independent = independent.unsqueeze(1)                         # (N, 1) bool
        self.peak_lr = peak_lr.unsqueeze(1)                                 # (N, 1)
        self.decays = bool((weight_decay != 0).any())
        self.t = 0
        self.buf: Tensor | None = None
        if kind != "sgd":
            self.m = torch.zeros_like(flat)
            self.v = torch.zeros_like(flat)
            # Adam's two (N, P) temporaries, allocated once: the same operations in the same
            # order as out-of-place ones, without a fresh matrix twice a step
            self._denom = torch.empty_like(flat, requires_grad=False)
            self._update = torch.empty_like(flat, requires_grad=False)

    @torch.no_grad()
    def step(self, lr: Tensor, frozen: Tensor | None = None) -> None:
        """One update with this step's rate of each member, lr: (N,). Members marked in
        ``frozen`` (N,) bool are left exactly as they are (a diverged run stays where it
        stopped)."""
        p, g = self.flat, self.flat.grad
        saved = p[frozen].clone() if frozen is not None and bool(frozen.any()) else None
        lr_t = lr.unsqueeze(1)                                              # (N, 1)
        lr_entry = lr_t if self.unit_scale else lr_t * self.lr_scale        # (N, 1) or (N, P)
        self.t += 1
        if self.kind == "adamw":
            if self.decays:
                p.mul_(1 - torch.where(self.independent, self.wd_member * lr_t / self.peak_lr,
                                       lr_entry * self.wd))
        elif self.decays:
            g = g.add(p * self.wd)                                         # L2: in the gradient
        if self.kind == "sgd":
            if self.momentum:
                self.buf = g.clone() if self.buf is None else self.buf.mul_(self.momentum).add_(g)
                g = self.buf
            p.sub_(lr_entry * g)
        else:
            b1, b2 = self.betas
            self.m.lerp_(g, 1 - b1)
            self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = torch.sqrt(self.v, out=self._denom)
            denom.div_(math.sqrt(1 - b2 ** self.t)).add_(self.eps)
            update = torch.mul(lr_entry / (1 - b1 ** self.t), self.m, out=self._update)
            p.sub_(update.div_(denom))
        if saved is not None:
            p[frozen] = saved
