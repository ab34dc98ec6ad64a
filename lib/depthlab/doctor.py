"""The doctor: what is wrong with a model that does not train, and what the book measured
against it (chapter 9; chapter 6's ``diagnose`` is its first, lighter version).

``dl.doctor(model, batch)`` examines any PyTorch model (depthlab's, a Hugging Face GPT-2, BERT
or Llama, your own) on one batch and returns a ``Report``: per block and for the model, each
measurement with its value, a verdict (fine, warning, problem), the threshold and where it
comes from, the chapter that explains it and the remedies the book measured. Everything is
measured on copies of the model, so the model is left exactly as found (parameters, buffers,
``.grad``, train/eval flags, the random state). Given a data source instead of one batch
(anything with ``batch(step)``), it also takes the first optimiser steps on a copy and watches
what they do: the failure of a deep Post-LN stack without warm-up shows there and nowhere at
initialisation (chapters 5, 6, 9).

``depthlab.doctor`` is a module and also callable: ``dl.doctor(...)`` is ``examine(...)``;
``dl.doctor.coord_check(build, widths, data, cfg)`` is μP's coordinate check
(``probes.coordinate_check``, chapter 8); ``python -m depthlab.doctor`` is its command line.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import sys
import textwrap
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from . import plots
from .callbacks import UpdateRatio
from .config import TrainConfig
from .data import PreviousToken
from .devices import device_of, rng_devices, to_model
from .losses import IGNORE, logits_of, loss_and_accuracy
from .measure import (
    LayerProfile,
    activation_modules,
    activation_saturation,
    attention_entropy,
    attention_logit_stats,
    attention_probabilities,
    find_layers,
    gradient_profile,
    input_independent_share,
    isolated,
    layer_outputs,
    layer_weights,
    output_change_under_update,
    token_similarity,
    unwrap,
)
from .probes import coordinate_check
from .training import lr_at, make_optimizer, set_lr, train

VERDICTS = ("fine", "warning", "problem", "not measured")
EARLY_STEPS = 20          # optimiser steps of the early-steps probe (a data source only)

coord_check = coordinate_check            # dl.doctor.coord_check: μP's coordinate check


@dataclass
class Finding:
    """One measurement of the doctor's and what it means.

    ``name`` says what was measured, ``value`` the number (NaN where it could not be read),
    ``verdict`` one of ``VERDICTS``, ``threshold`` the rule that gave the verdict and
    ``origin`` where that rule comes from (chance, float, paper, theory, spread, decade,
    definition: the book's origin words, as its claims state theirs). ``chapter`` explains it;
    ``remedies`` are what the book measured against it; ``message`` says it in a sentence."""

    name: str
    value: float
    verdict: str
    threshold: str
    origin: str
    chapter: str
    message: str
    remedies: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "value": _num(self.value), "verdict": self.verdict,
                "threshold": self.threshold, "origin": self.origin, "chapter": self.chapter,
                "message": self.message, "remedies": list(self.remedies)}


def _num(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass
class Report:
    """What ``examine`` found: the findings and the per-block numbers behind them.

    ``print(report)`` shows a table, ``report.to_markdown()`` the same in Markdown,
    ``report.to_dict()`` everything as JSON-ready values, ``report.figure()`` one figure.
    ``per_block`` maps a measurement to one value per block (index 0 nearest the input)."""

    model: str
    blocks: str                          # where the blocks were found, and how many
    placement: str                       # "pre", "post", "none" or "mixed"
    device: str
    optimizer: str
    findings: list[Finding]
    per_block: dict[str, np.ndarray] = field(default_factory=dict)
    early: dict[str, list[float]] = field(default_factory=dict)   # loss per step, per lr tried

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == "problem"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == "warning"]

    @property
    def ok(self) -> bool:
        """True when no finding is a problem."""
        return not self.problems

    def finding(self, name: str) -> Finding:
        """The finding called ``name``."""
        for f in self.findings:
            if f.name == name:
                return f
        raise KeyError(f"no finding {name!r}; the report has {[f.name for f in self.findings]}")

    def _rows(self) -> list[tuple[str, str, str, str, str]]:
        return [(f.verdict, f.name, _fmt(f.value), f"{f.threshold} ({f.origin})", f.chapter)
                for f in self.findings]

    def __str__(self) -> str:
        head = [f"doctor: {self.model}, {self.blocks}, norm placement {self.placement}, "
                f"{self.optimizer}, on {self.device}"]
        rows = [("verdict", "finding", "value", "rule (origin)", "ch.")] + self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = []
        for r in rows:
            rule = textwrap.wrap(r[3], 58) or [""]
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  "
                         + rule[0].ljust(58) + "  " + r[4])
            lines += [" " * (sum(widths) + 6) + extra for extra in rule[1:]]
        notes = []
        for f in self.problems + self.warnings:
            notes.append(textwrap.fill(f"{f.verdict.upper()} {f.name}: {f.message}", 98,
                                       subsequent_indent="  "))
            if f.remedies:
                notes.append(textwrap.fill("remedies: " + "; ".join(f.remedies), 98,
                                           initial_indent="  ", subsequent_indent="    "))
        verdict = ("no problem found" if self.ok else
                   f"{len(self.problems)} problem(s): " + ", ".join(f.name for f in self.problems))
        return "\n".join(head + [""] + lines + [""] + notes + [verdict])

    def to_markdown(self) -> str:
        """The report as Markdown: a table of the findings, then what each problem or warning
        means and what to do about it."""
        out = [f"**doctor**: {self.model}, {self.blocks}, norm placement {self.placement}, "
               f"{self.optimizer}, on {self.device}", "",
               "| verdict | finding | value | rule (origin) | chapter |", "|---|---|---|---|---|"]
        out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in self._rows()]
        for f in self.problems + self.warnings:
            out.append(f"\n- **{f.verdict}, {f.name}**: {f.message}"
                       + (f" Remedies: {'; '.join(f.remedies)}." if f.remedies else ""))
        if self.ok:
            out.append("\nNo problem found.")
        return "\n".join(out)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> dict:
        """Everything as JSON-ready values (NaN and infinities as None)."""
        return {"model": self.model, "blocks": self.blocks, "placement": self.placement,
                "device": self.device, "optimizer": self.optimizer, "ok": self.ok,
                "findings": [f.to_dict() for f in self.findings],
                "per_block": {k: [_num(v) for v in np.asarray(a, dtype=float)]
                              for k, a in self.per_block.items()},
                "early": {k: [_num(v) for v in a] for k, a in self.early.items()}}

    def figure(self, *, takeaway: str | None = None):
        """One figure in the book's style: six panels per block (gradient, update ratio,
        residual stream, token similarity, attention entropy, dead or saturated units)."""
        fig, axes = plots.figure(3, 2, width=3.9, height=2.9, takeaway=takeaway or (
            "no problem found" if self.ok else
            "problems: " + ", ".join(f.name for f in self.problems)))
        pb = self.per_block
        x = np.arange(len(pb["gradient norm"]))
        panels = [
            (axes[0, 0], {"‖∂L/∂h‖": pb["gradient norm"]}, "gradient norm", True, None,
             "gradient reaching each block (ch. 1)"),
            (axes[0, 1], {"one step": pb["update log10"],
                          "Adam's lr/RMS(W)": pb["expected update log10"]},
             "log10 ‖ΔW‖/‖W‖", False, None, "one optimiser step (ch. 6)"),
            (axes[0, 2], {"stream": pb["stream RMS"]}, "RMS of the block output", True, None,
             "residual stream (ch. 2, 5)"),
            (axes[1, 0], {"tokens": pb["token similarity"]}, "cosine similarity", False, 0.9,
             "rank collapse (ch. 2)"),
            (axes[1, 1], {"attention": pb["attention entropy ratio"]},
             "entropy ÷ uniform's", False, 0.1, "attention entropy (ch. 8)"),
            (axes[1, 2], {"units": pb["dead or saturated"]}, "fraction of units", False, 0.5,
             "dead or saturated units (ch. 1)"),
        ]
        for ax, series, ylabel, log, ref, title in panels:
            series = {k: np.where(np.isfinite(np.asarray(v, float)), v, np.nan)
                      for k, v in series.items()}
            if not any(np.isfinite(v).any() for v in series.values()):
                ax.text(0.5, 0.5, "not readable", ha="center", va="center",
                        transform=ax.transAxes, color="grey")
                ax.set_xlabel("block (0 = nearest the input)")
                ax.set_ylabel(ylabel)
                ax.set_title(title)
                continue
            if log:                    # a log scale only across a decade or more
                vals = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in series.values()])
                log = len(vals) > 0 and vals.max() >= 10 * vals.min()
            plots.versus(ax, x[:len(next(iter(series.values())))], series,
                         xlabel="block (0 = nearest the input)", ylabel=ylabel, logy=log,
                         title=title, reference=ref)
            if len(series) == 1 and ax.get_legend():
                ax.get_legend().remove()
        return fig


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "n/a" if math.isnan(v) else str(v)
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-2):
        return f"{v:.2g}"
    return f"{v:.3g}"


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def _split(batch):
    """(one batch, the data source or None) from ``batch``; errors name the argument."""
    data = None
    if not isinstance(batch, (tuple, list)) and callable(getattr(batch, "batch", None)):
        data, batch = batch, batch.batch(0)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError("doctor: batch must be an (inputs, targets) pair of tensors, or a data "
                        f"source with batch(step); got {type(batch).__name__}"
                        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    for i, what in enumerate(("inputs", "targets")):
        if not isinstance(batch[i], Tensor):
            raise TypeError(f"doctor: batch[{i}] ({what}) must be a tensor; got "
                            f"{type(batch[i]).__name__}")
    return (batch[0], batch[1]), data


def _config(optimizer, lr: float | None, device: torch.device) -> TrainConfig:
    where = "cpu" if device.type == "cpu" else str(device)
    if isinstance(optimizer, TrainConfig):
        cfg = optimizer if lr is None else optimizer.replace(lr=lr)
    elif optimizer in ("adam", "adamw", "sgd"):
        default = 0.1 if optimizer == "sgd" else 1e-3
        cfg = TrainConfig(optimizer=optimizer, lr=default if lr is None else lr)
    else:
        raise ValueError(f"doctor: optimizer={optimizer!r} must be 'adam', 'adamw', 'sgd' or a "
                         "TrainConfig")
    return cfg.replace(device=where, progress=False)


def _describe(cfg: TrainConfig) -> str:
    warm = f", warm-up {cfg.warmup_steps} steps" if cfg.warmup_steps else ", no warm-up"
    return f"{cfg.optimizer} at lr {cfg.lr:g}{warm}"


def _check_batch(model: nn.Module, batch, loss) -> Tensor:
    """The logits of one forward pass, after checking that the batch fits the model."""
    x, y = batch
    try:
        with isolated(model, train=False), torch.no_grad():
            logits = logits_of(model(to_model(model, x)))
    except Exception as exc:           # the model's own error, named after the argument
        raise ValueError(f"doctor: the model could not run on batch[0] (inputs, shape "
                         f"{tuple(x.shape)}, {x.dtype}): {type(exc).__name__}: {exc}") from exc
    if loss is None:
        if y.is_floating_point() or y.shape != logits.shape[:-1]:
            raise ValueError(f"doctor: batch[1] (targets) must hold one class index per output "
                             f"position, shape {tuple(logits.shape[:-1])} (the logits' "
                             f"{tuple(logits.shape)} without the last axis); got "
                             f"{tuple(y.shape)} {y.dtype}. For another objective pass loss=")
        if not bool((y != IGNORE).any()):
            raise ValueError(f"doctor: every target in batch[1] is IGNORE ({IGNORE})")
    return logits


def _blocks(model: nn.Module, layers) -> list[nn.Module]:
    if layers is not None:
        layers = list(layers)
        inside = {id(m) for m in model.modules()}
        if not layers or any(id(m) not in inside for m in layers):
            raise ValueError("doctor: layers= must be a list of modules inside the model "
                             "(its blocks, in order)")
        return layers
    try:
        return find_layers(model)
    except ValueError as exc:
        raise ValueError(f"doctor could not find the blocks of {type(model).__name__}. "
                         f"{exc}. Example: dl.doctor(model, batch, "
                         "layers=model.encoder.blocks)") from None


def _same_modules(original: nn.Module, clone: nn.Module, mods: Sequence[nn.Module]):
    names = {id(m): n for n, m in original.named_modules()}
    inside = dict(clone.named_modules())
    return [inside[names[id(m)]] for m in mods]


def _where(model: nn.Module, blocks: Sequence[nn.Module]) -> str:
    names = {id(m): n for n, m in model.named_modules()}
    first = names.get(id(blocks[0]), "?")
    parent = first.rsplit(".", 1)[0] if "." in first else "(the model)"
    return f"{len(blocks)} blocks ({parent})"


# --------------------------------------------------------------------------------------------
# Measurements (each on a copy of the model)
# --------------------------------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer: PyTorch's, or a leaf module (no child modules) whose class name
    says it is one (LlamaRMSNorm, depthlab's LayerNorm). A container whose name merely contains
    "LayerNorm" (transformers' RobertaPreLayerNormOutput, a whole block) is not one."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
        return True
    name = type(module).__name__
    leaf = next(module.children(), None) is None
    return leaf and (name.endswith("Norm") or "LayerNorm" in name or "RMSNorm" in name)


def _structure(blocks: Sequence[nn.Module], run: Callable[[], object]) -> tuple[dict, object]:
    """Watch the forward pass that ``run()`` makes (the gradient profile's: no pass of its
    own) and record each block's output (RMS, token similarity), the stream entering block 0,
    and whether a block's output IS the output of a norm inside it (Post-LN), a norm sits
    inside but the output is the skip's sum (Pre-LN), or there is none. Returns that and what
    ``run`` returned."""
    outs: dict[int, Tensor] = {}
    norm_outs: dict[int, list[Tensor]] = {}
    entering: list[Tensor] = []
    handles = []

    def on_block(i: int):
        def hook(module, args, out):
            outs[i] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    def on_norm(i: int):
        def hook(module, args, out):
            norm_outs.setdefault(i, []).append(out)
        return hook

    def on_enter(module, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        if isinstance(h, Tensor):
            entering.append(h.detach())

    handles.append(blocks[0].register_forward_pre_hook(on_enter, with_kwargs=True))
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(on_block(i)))
        for m in block.modules():
            if m is not block and _is_norm(m):
                handles.append(m.register_forward_hook(on_norm(i)))
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    placement, rms, similarity = [], [], []
    for i in range(len(blocks)):
        out = outs.get(i)
        if not isinstance(out, Tensor):
            placement.append("none")
            rms.append(math.nan)
            similarity.append(math.nan)
            continue
        norms = [n for n in norm_outs.get(i, []) if isinstance(n, Tensor)
                 and n.shape[-1] == out.shape[-1]]          # not a qk-norm on head vectors
        placement.append("post" if any(n is out for n in norms) else "pre" if norms else "none")
        out = out.detach()
        rms.append(float(out.double().pow(2).mean().sqrt()))
        similarity.append(token_similarity(out) if out.dim() == 3 and out.shape[1] > 1
                          else math.nan)
    kinds = set(placement)
    return {"placement": placement,
            "model placement": kinds.pop() if len(kinds) == 1 else "mixed",
            "stream RMS": np.array(rms), "token similarity": np.array(similarity),
            "entering RMS": (float(entering[0].double().pow(2).mean().sqrt())
                             if entering else math.nan)}, result


class _Once:
    """A data source that serves one batch at every step."""

    def __init__(self, batch) -> None:
        self._batch = batch

    def batch(self, step: int):
        return self._batch


def _one_step(clone: nn.Module, batch, cfg: TrainConfig, loss, blocks) -> tuple:
    """One optimiser step of ``cfg`` on ``clone``: (log10 ‖ΔW‖/‖W‖ per block, the update of
    every parameter divided by the step's learning rate)."""
    watch = UpdateRatio(blocks)
    before = [p.detach().clone() for p in clone.parameters()]
    lr0 = lr_at(0, cfg)
    if loss is None:
        train(clone, _Once(batch), cfg.replace(steps=1), [watch])
    else:                              # the loop minimises cross-entropy: the same step by hand
        clone.train()
        params = [p for p in clone.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg)
        set_lr(opt, lr0)
        with torch.random.fork_rng(devices=rng_devices(device_of(clone))):
            torch.manual_seed(cfg.seed)
            watch.before_step(0, clone)
            opt.zero_grad(set_to_none=True)
            loss(logits_of(clone(to_model(clone, batch[0]))), to_model(clone, batch[1])).backward()
            if cfg.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
            opt.step()
            watch.after_step(0, clone)
    update = watch.log10[0] if watch.log10 else np.full(len(blocks), math.nan)
    direction = [(p.detach() - b.to(p.device)) / lr0 for p, b in zip(clone.parameters(), before)]
    return update, direction


def _expected_update(blocks, cfg: TrainConfig) -> np.ndarray:
    """log10 of lr/RMS(W) per block: the update-to-weight ratio of Adam's first step for a
    gradient well above its ε (chapter 6); NaN for SGD, which has no such scale."""
    out = np.full(len(blocks), math.nan)
    if cfg.optimizer not in ("adam", "adamw"):
        return out
    for i, block in enumerate(blocks):
        ws = [p.detach().double() for p in layer_weights(block)]
        n = sum(w.numel() for w in ws)
        if n:
            rms = math.sqrt(sum(float(w.pow(2).sum()) for w in ws) / n)
            out[i] = math.log10(lr_at(0, cfg) / rms) if rms > 0 else math.nan
    return out


def _attention(model: nn.Module, x: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entropy, uniform attention's entropy, largest |logit|) per attention layer; raises
    ValueError when the attention is not readable. Largest logits only where a module has
    ``attention_logits`` (depthlab's): probabilities do not tell the logits' level."""
    with isolated(model, train=False):
        maps = attention_probabilities(model, x)
    entropy, uniform = attention_entropy(maps)
    try:
        largest, _ = attention_logit_stats(model, x)
    except ValueError:
        largest = np.full(len(maps), math.nan)
    if len(largest) != len(maps):
        largest = np.full(len(maps), math.nan)
    return entropy, uniform, largest


def _units(model: nn.Module, x: Tensor, blocks) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per block: the fraction of dead or saturated units, and the input-independent share of
    the activations' output (1: every unit gives the same value whatever the input; chapter 1);
    and the kinds of activation found."""
    with isolated(model, train=True):
        saturated = activation_saturation(model, x, layers=blocks)
    acts = [activation_modules(b) for b in blocks]
    flat = [m for a in acts for m in a]
    kinds = sorted({type(m).__name__ for m in flat})
    share = np.full(len(blocks), math.nan)
    if flat:
        with isolated(model, train=True):
            outs = layer_outputs(model, x, layers=flat)
        k = 0
        for i, a in enumerate(acts):
            if a:
                share[i] = float(np.mean([input_independent_share(o) for o in outs[k:k + len(a)]]))
                k += len(a)
    return saturated, share, kinds


def _early(work: nn.Module, original: nn.Module, data, cfg: TrainConfig, blocks,
           probe: Tensor, steps: int) -> dict:
    """Train copies for ``steps`` steps on ``data`` at ``cfg.lr`` (and, if the tokens collapse
    there, at lr/3 and lr/10) and compare the last block's token similarity before and after."""
    out: dict = {"runs": {}}

    def similarity(model, block) -> float:
        with isolated(model, train=False):
            h = layer_outputs(model, probe, layers=[block])[0]
        return token_similarity(h) if h.dim() == 3 and h.shape[1] > 1 else math.nan

    out["before"] = similarity(work, _same_modules(original, work, [blocks[-1]])[0])
    for factor in (1, 3, 10):
        lr = cfg.lr / factor
        clone = copy.deepcopy(original)
        last = _same_modules(original, clone, [blocks[-1]])[0]
        hist = train(clone, data, cfg.replace(lr=lr, steps=steps))
        after = similarity(clone, last) if hist.status != "diverged" else math.nan
        shrink = ((1 - out["before"]) / max(1 - after, 1e-12)
                  if math.isfinite(after) else math.inf)
        out["runs"][lr] = {"after": after, "shrink": shrink, "loss": list(hist.loss),
                           "status": hist.status}
        if shrink < COLLAPSE_WARNING:
            break
    return out


# --------------------------------------------------------------------------------------------
# Verdicts: thresholds and where they come from
# --------------------------------------------------------------------------------------------

COLLAPSE_PROBLEM = 10.0    # (1 - token similarity) shrinks tenfold in the first steps
COLLAPSE_WARNING = 3.0
REMEDY = {
    "skips": "residual connections (chapter 2)",
    "pre-ln": "Pre-LN: the norm inside the branch, not after the sum (chapter 5)",
    "warm-up": "a learning-rate warm-up (chapter 5)",
    "smaller lr": "a smaller learning rate (chapter 5)",
    "init": "initialise the weights at std 0.02 or 1/√fan_in (chapter 1)",
    "norm": "a LayerNorm in every block (chapter 3)",
    "qk-norm": "qk-layernorm (chapter 8)",
    "qk-init": "queries and keys initialised small, as the rest (chapter 8)",
    "activation": "a centred activation, GELU or ReLU, instead of sigmoid (chapter 1)",
    "adam": "Adam, which gives every weight a step of about lr (chapter 6)",
}


def _verdict(value: float, warn, bad) -> str:
    """``warn``/``bad``: functions of the value; a non-finite value is a problem."""
    if not math.isfinite(value):
        return "problem"
    return "problem" if bad(value) else "warning" if warn(value) else "fine"


def _judge(m: dict, cfg: TrainConfig, depth: int, early: dict | None,
              custom_loss: bool) -> list[Finding]:
    out = []
    grad = m["gradient norm"]
    ratio = float(grad[0] / grad[-1]) if np.isfinite(grad).all() and grad[-1] > 0 else math.nan
    if np.isfinite(grad).all() and grad[-1] > 0 and grad[0] == 0:
        ratio = 0.0
    v = _verdict(ratio if ratio > 0 else math.nan,
                 lambda r: not 0.1 <= r <= 10, lambda r: not 0.01 <= r <= 100)
    where = ("the gradient does not reach block 0" if ratio == 0 else
             "the gradient or the forward pass is not finite (overflow)" if not ratio >= 0 else
             f"block 0 receives {ratio:.2g} × the gradient of block {depth - 1}")
    out.append(Finding(
        "gradient first/last", ratio, v, "outside 10^-2..10^2 a problem, 10^-1..10^1 fine",
        "decade: two decades from 1", "1",
        where + (": gradients vanish toward the input" if 0 <= ratio < 0.01 else
                 ": gradients explode toward the input" if ratio > 100 else ""),
        (REMEDY["skips"], REMEDY["pre-ln"], REMEDY["init"]) if v != "fine" else ()))

    update, expected = m["update log10"], m["expected update log10"]
    still = np.isneginf(update)
    lag = np.where(still, np.nan, expected - update)
    worst_lag = float(np.nanmax(lag)) if np.isfinite(lag).any() else math.nan
    fastest = float(np.nanmax(np.where(np.isfinite(update), update, np.nan))) \
        if np.isfinite(update).any() else math.nan
    if still.any():
        k = int(np.argmax(still))
        out.append(Finding("one-step update", -math.inf, "problem",
                           "a block whose weights do not change at all a problem",
                           "float: the step is below float32's resolution", "6",
                           f"one {cfg.optimizer} step leaves block {k}'s weights unchanged: its "
                           "step is too small for float32 to add (the gradient does not reach it)",
                           (REMEDY["skips"], REMEDY["pre-ln"], REMEDY["adam"])))
    elif math.isfinite(worst_lag):
        k = int(np.nanargmax(lag))
        v = "problem" if worst_lag > 2 else "warning" if fastest > -1 else "fine"
        msg = (f"one {cfg.optimizer} step changes block {k}'s weights by 10^{update[k]:.1f} of "
               f"their norm, {worst_lag:.1f} decades below the lr/RMS(W) = 10^{expected[k]:.1f} "
               "Adam gives a gradient well above its ε" if worst_lag > 2 else
               f"the fastest block moves 10^{fastest:.1f} of its weights in one step "
               "(more than a tenth)" if fastest > -1 else
               "every block moves by about Adam's lr/RMS(W)")
        fast = worst_lag <= 2 and fastest > -1       # the fastest block drives the verdict
        out.append(Finding("one-step update", fastest if fast else worst_lag, v,
                           "value: decades a block lags lr/RMS(W), > 2 a problem; or, when a "
                           "block moved > 10^-1 of its norm (a warning), that block's log10 "
                           "‖ΔW‖/‖W‖", "decade: two decades; a tenth",
                           "6", msg, (REMEDY["skips"], REMEDY["pre-ln"]) if worst_lag > 2 else
                           (REMEDY["smaller lr"], REMEDY["warm-up"]) if v != "fine" else ()))
    else:
        finite = update[np.isfinite(update)]
        spread = float(finite.max() - finite.min()) if len(finite) else math.nan
        v = _verdict(spread, lambda s: s > 1, lambda s: s > 2)
        out.append(Finding("one-step update", spread, v,
                           "blocks' log10 update ratios spread over > 2 decades a problem",
                           "decade: two decades", "6",
                           f"one {cfg.optimizer} step's update ratios span {spread:.1f} decades "
                           "over the blocks", (REMEDY["adam"], REMEDY["skips"])
                           if v != "fine" else ()))

    rel = m["output change"]
    out.append(Finding(
        "first step moves logits", rel, _verdict(rel, lambda r: r > 10, lambda r: False),
        "> 10 × the logits' spread a warning", "decade: ten times the spread", "5, 9",
        f"one step at lr {lr_at(0, cfg):g} changes the logits by {rel:.2g} × their spread "
        f"(RMS over the vocabulary): a step of about {m['largest gentle step']:.2g} would move "
        "them by their spread (linear estimate). On its own this number did not tell a failing "
        "model from a healthy one in chapter 9's runs", ()))

    rms, placement = m["stream RMS"], m["model placement"]
    growth = float(rms[-1] / m["entering RMS"]) if m["entering RMS"] > 0 else math.nan
    v = _verdict(growth, lambda g: not 0.1 <= g <= 10, lambda g: not 0.01 <= g <= 100)
    out.append(Finding(
        "residual stream growth", growth, v, "outside 10^-2..10^2 a problem",
        "decade: two decades", "2, 5",
        f"the stream leaves the last block at {growth:.3g} × the RMS it enters block 0 with "
        f"(norm placement: {placement})" + (": the forward pass explodes" if growth > 100 else
                                            ": the signal dies out" if growth < 0.01 else ""),
        (REMEDY["init"], REMEDY["pre-ln"]) if v != "fine" else ()))

    sim = m["token similarity"]
    last = float(sim[-1]) if len(sim) else math.nan
    if math.isfinite(last):
        v = "problem" if last > 0.9 else "fine"
        first = int(np.argmax(sim > 0.9)) if v == "problem" else -1
        out.append(Finding(
            "token similarity", last, v, "> 0.9 after the last block a problem",
            "definition: chapter 6's threshold for rank collapse", "2",
            (f"rank collapse: from block {first} on the tokens of a sequence are nearly the "
             f"same vector (mean cosine {last:.2f})") if v == "problem" else
            f"the tokens stay distinct (mean cosine {last:.2f} after the last block)",
            (REMEDY["skips"], REMEDY["norm"]) if v == "problem" else ()))

    ent = m["attention entropy ratio"]
    if m["attention"] == "readable" and np.isfinite(ent).any():
        low = float(np.nanmin(ent))
        k = int(np.nanargmin(ent))
        big = m["largest attention logit"]
        logit = (f"; largest attention logit {np.nanmax(big):.3g}" if np.isfinite(big).any()
                 else "; the logits themselves are not readable (probabilities only)")
        v = _verdict(low, lambda e: e < 0.5, lambda e: e < 0.1)
        out.append(Finding(
            "attention entropy", low, v, "below 0.1 × uniform attention's a problem, 0.5 a "
            "warning", "decade: a tenth of uniform attention's entropy", "8",
            f"layer {k} attends with {low:.2g} × the entropy of uniform attention"
            + (" (entropy collapse: each query looks at one key)" if v == "problem" else "")
            + logit, (REMEDY["qk-init"], REMEDY["qk-norm"], REMEDY["smaller lr"])
            if v != "fine" else ()))
    else:
        out.append(Finding("attention entropy", math.nan, "not measured", "-", "-", "8",
                           f"not readable: {m['attention']}"))

    V = m["vocabulary"]
    chance = math.log(V)
    loss0 = m["initial loss"]
    if not custom_loss:
        v = _verdict(loss0, lambda v_: v_ > chance + 1, lambda v_: v_ > 2 * chance)
        out.append(Finding(
            "initial loss", loss0, v, f"above ln V + 1 = {chance + 1:.2f} a warning, 2 ln V "
            f"= {2 * chance:.2f} a problem", "chance: ln V, uniform guessing over V classes",
            "1, 8", f"loss {loss0:.3g} against ln {V} = {chance:.3g} for uniform guessing; the "
            f"logits spread {m['logit spread']:.3g} (RMS over the vocabulary), log Z "
            f"{m['log Z']:.3g}" + (": the model is confidently wrong before any training"
                                    if v != "fine" else ""),
            (REMEDY["init"],) if v != "fine" else ()))

    sat = m["dead or saturated"]
    if np.isfinite(sat).any():
        top = float(np.nanmax(sat))
        k = int(np.nanargmax(sat))
        v = _verdict(top, lambda s: s > 0.1, lambda s: s > 0.5)
        out.append(Finding(
            "dead or saturated units", top, v, "> 0.5 of a block's units a problem, 0.1 a "
            "warning", "definition: most units pass no gradient", "1",
            f"{top:.0%} of block {k}'s units are dead or saturated ({', '.join(m['activations'])})",
            (REMEDY["init"], REMEDY["activation"]) if v != "fine" else ()))
        share = m["uncentred share"]
        if np.isfinite(share).any():
            s = float(np.nanmax(share))
            v = "warning" if s > 0.9 else "fine"
            sigmoid = any("sigmoid" in k.lower() for k in m["activations"])
            why = (": the units are uncentred (sigmoid's output sits near 0.5), so each block "
                   "adds nearly the same vector to every token" if sigmoid else
                   ": the activations' input no longer depends on the input (a collapsed "
                   "stream, see the token similarity)")
            out.append(Finding(
                "activation output constant", s, v, "> 0.9 of the power input-independent a "
                "warning", "decade: the input-dependent part below a tenth", "1, 9",
                f"{s:.0%} of the activations' output power is the same for every input"
                + (why if v == "warning" else ""),
                (REMEDY["activation"],) if v != "fine" and sigmoid else ()))
    else:
        out.append(Finding("dead or saturated units", math.nan, "not measured", "-", "-", "1",
                           "no activation module found (a model that calls F.relu is not "
                           "seen by hooks)"))

    warm = cfg.warmup_steps > 0
    if early is not None and early["runs"]:
        (lr, run), *rest = early["runs"].items()
        shrink = run["shrink"]
        # a collapse is a problem only in a Post-LN stack: a Pre-LN GPT-2 of 12 blocks at Adam
        # 1e-2 collapsed its tokens 3.8e3-fold in these steps and went on to train (chapter 9)
        v = _verdict(shrink, lambda s: s >= COLLAPSE_WARNING,
                     lambda s: s >= COLLAPSE_PROBLEM and placement == "post")
        if run["status"] == "diverged":
            v, what = "problem", f"the run diverged within {len(run['loss'])} steps"
        else:
            what = (f"after {len(run['loss'])} steps at lr {lr:g} the last block's token "
                    f"similarity went {early['before']:.2f} → {run['after']:.2f} "
                    f"(1 − similarity ÷{shrink:.2g})")
        gentle = [k for k, r in early["runs"].items() if r["shrink"] < COLLAPSE_WARNING]
        if v != "fine":
            what += (f"; at lr {gentle[0]:.2g} the tokens stay distinct" if gentle and
                     gentle[0] != lr else f"; also at lr {min(early['runs']):.2g}")
            if placement == "post" and v == "problem":
                what += (f". A {depth}-block Post-LN stack whose first steps collapse the "
                         "tokens, as chapter 6 measured; chapter 5 measured deep Post-LN "
                         "failing without warm-up where a warm-up or Pre-LN trains")
            elif v == "warning" and run["status"] != "diverged":
                what += (". On its own this is a warning: healthy Pre-LN models also shrink "
                         "their tokens' differences in their first steps and go on to train "
                         "(chapter 9); watch whether the loss falls")
        out.append(Finding(
            "early steps", shrink, v, f"1 − similarity shrinking ≥ {COLLAPSE_PROBLEM:g}× in "
            f"{len(run['loss'])} steps in a Post-LN stack a problem, ≥ {COLLAPSE_WARNING:g}× "
            "a warning", "decade: tenfold, set after the pilot it flags (a 24-block Post-LN "
            "BERT); negative control: a 12-block Pre-LN GPT-2 at Adam 1e-2 shrank 3.8e3-fold "
            "and trained, hence Post-LN only", "5, 6", what,
            ((REMEDY["warm-up"], REMEDY["smaller lr"], REMEDY["pre-ln"]) if placement == "post"
             else (REMEDY["smaller lr"], REMEDY["warm-up"])) if v != "fine" else ()))
    elif placement == "post" and depth >= 6 and not warm and cfg.optimizer != "sgd":
        out.append(Finding(
            "early steps", math.nan, "warning", "Post-LN, ≥ 6 blocks, no warm-up",
            "paper: Post-LN models of 6 or more layers were trained with a warm-up (Vaswani "
            "et al., Devlin et al.)", "5, 9",
            f"a {depth}-block Post-LN stack at lr {cfg.lr:g} without warm-up: chapter 5 "
            "measured deep Post-LN failing where warm-up or Pre-LN train. Not measured here: "
            "pass a data source (anything with batch(step)) to watch the first steps",
            (REMEDY["warm-up"], REMEDY["smaller lr"], REMEDY["pre-ln"])))
    else:
        out.append(Finding("early steps", math.nan, "not measured", "-", "-", "5, 6",
                           "pass a data source (anything with batch(step)) instead of one batch "
                           "to watch the first optimiser steps"
                           + (" (the probe needs the default loss)" if custom_loss else "")))
    return out


def examine(model: nn.Module, batch, *, loss: Callable[[Tensor, Tensor], Tensor] | None = None,
            optimizer: str | TrainConfig = "adam", lr: float | None = None,
            layers: Sequence[nn.Module] | None = None, steps: int = EARLY_STEPS) -> Report:
    """Examine ``model`` on ``batch`` and say what is wrong with it (chapter 9).

    ``batch``: an ``(inputs, targets)`` pair (targets: one class index per output position,
    ``IGNORE`` where there is none), or a data source with ``batch(step)``: then the first
    ``steps`` optimiser steps are also taken on a copy (the early-steps probe). ``loss(logits,
    targets)`` replaces the cross-entropy (the early-steps probe then is not run). The
    optimiser: "adam", "adamw" or "sgd" at ``lr`` (default 1e-3 for Adam, 0.1 for SGD), or a
    ``TrainConfig`` (its warm-up and clipping count). ``layers``: the blocks, when
    ``find_layers`` cannot find them. A Hugging Face model is taken as it is (its ``.logits``;
    attention read with the eager implementation). Runs on the model's own device; the model
    is left exactly as found.
    """
    original = unwrap(model)
    batch, data = _split(batch)
    device = device_of(original)
    cfg = _config(optimizer, lr, device)
    blocks = _blocks(original, layers)
    with torch.random.fork_rng(devices=rng_devices(device)):
        work = copy.deepcopy(original)
        wb = _same_modules(original, work, blocks)
        logits = _check_batch(work, batch, loss)
        x, y = batch
        m: dict = {"vocabulary": logits.shape[-1]}
        z = logits.double()
        m["logit spread"] = float(z.std(-1).mean())
        m["log Z"] = float(torch.logsumexp(z, -1).mean())
        yy = to_model(work, y)
        m["initial loss"] = float((loss(logits, yy) if loss is not None else
                                   loss_and_accuracy(logits, yy)[0]).detach())
        def profile() -> LayerProfile:
            with isolated(work, train=True):
                return gradient_profile(work, batch, layers=wb, loss_fn=loss)

        found, prof = _structure(wb, profile)
        m.update(found)
        m["gradient norm"] = prof.act_grad_norm
        m["dead or saturated"], m["uncentred share"], m["activations"] = _units(work, x, wb)
        try:
            ent, uni, big = _attention(work, x)
            m["attention"] = "readable"
        except ValueError as exc:
            ent = uni = big = np.full(len(blocks), math.nan)
            m["attention"] = str(exc)
        with np.errstate(divide="ignore", invalid="ignore"):
            m["attention entropy ratio"] = ent / uni
        m["largest attention logit"] = big
        m["expected update log10"] = _expected_update(wb, cfg)
        stepped = copy.deepcopy(original)
        m["update log10"], direction = _one_step(
            stepped, batch, cfg, loss, _same_modules(original, stepped, blocks))
        del stepped
        first = lr_at(0, cfg)
        change = output_change_under_update(work, x, first, direction=direction)
        spread = max(m["logit spread"], 1e-12)
        m["output change"] = float(change / spread)
        # the change grows about linearly with the step while it is small (one forward pass)
        m["largest gentle step"] = first * spread / change if change > 0 else math.inf
        early = None
        if data is not None and loss is None and steps > 0:
            probe = (data.eval_batch(len(x)) if callable(getattr(data, "eval_batch", None))
                     else data.batch(10_000))[0]
            early = _early(work, original, data, cfg.replace(seed=0), blocks, probe, steps)
    per_block = {k: np.asarray(m[k], dtype=float) for k in (
        "gradient norm", "update log10", "expected update log10", "stream RMS",
        "token similarity", "dead or saturated", "uncentred share")}
    per_block["attention entropy ratio"] = _per_block(m["attention entropy ratio"], len(blocks))
    per_block["largest attention logit"] = _per_block(m["largest attention logit"], len(blocks))
    findings = _judge(m, cfg, len(blocks), early, loss is not None)
    runs = (early or {"runs": {}})["runs"]
    return Report(model=type(original).__name__, blocks=_where(original, blocks),
                  placement=m["model placement"], device=str(device), optimizer=_describe(cfg),
                  findings=findings, per_block=per_block,
                  early={f"lr {k:g}": r["loss"] for k, r in runs.items()})


def _per_block(values: np.ndarray, n: int) -> np.ndarray:
    """Per-layer values (one per attention layer) as one per block where the counts agree."""
    values = np.asarray(values, dtype=float)
    return values if len(values) == n else np.full(n, math.nan)


# --------------------------------------------------------------------------------------------
# Chapter 6's diagnose: the first, lighter examination (its Diagnosis keeps raw arrays)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The command line: python -m depthlab.doctor
# --------------------------------------------------------------------------------------------


def _value(text: str):
    """A --set value: JSON (numbers, true/false, lists, quoted strings), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def hf_model(model_type: str, overrides: dict | None = None, *, seed: int = 0) -> nn.Module:
    """A Hugging Face model with random weights, built from the configuration of
    ``model_type`` ("gpt2", "bert", "llama", ...) with ``overrides``: a masked LM where the
    type has one (BERT's own objective), else a causal LM. Nothing is downloaded (chapter 9)."""
    import transformers  # noqa: I001 - optional dependency (depthlab[hf]), heavy to import

    config = transformers.AutoConfig.for_model(model_type, **(overrides or {}))
    torch.manual_seed(seed)
    for auto in (transformers.AutoModelForMaskedLM, transformers.AutoModelForCausalLM):
        try:
            return auto.from_config(config)
        except ValueError:
            continue
    raise ValueError(f"transformers has no causal or masked language model for {model_type!r}")


def _vocabulary(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    v = getattr(config, "vocab_size", None) or getattr(getattr(model, "cfg", None), "vocab_size",
                                                       None)
    if not v:
        raise ValueError("cannot tell the model's vocabulary size for a synthetic batch: "
                         "let the factory return (model, batch)")
    return int(v)


def _load(target: str):
    """``PACKAGE.MODULE:FACTORY`` -> what the factory returns: a model, or (model, batch)."""
    module, _, name = target.partition(":")
    if not module or not name:
        raise SystemExit(f"doctor: {target!r} must look like PACKAGE.MODULE:FACTORY")
    sys.path.insert(0, os.getcwd())
    factory = getattr(importlib.import_module(module), name)
    made = factory()
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        return made
    if not isinstance(made, nn.Module):
        raise SystemExit(f"doctor: {target} returned {type(made).__name__}, not a model or "
                         "(model, batch)")
    return made, None


def main(argv: list[str] | None = None) -> int:
    """``python -m depthlab.doctor PACKAGE.MODULE:FACTORY`` or ``--hf MODEL_TYPE --set k=v``:
    print the report, write its figure (and ``--json``); exit 1 when a finding is a problem."""
    ap = argparse.ArgumentParser(prog="python -m depthlab.doctor",
                                 description="Examine a model that does not train (depthlab's "
                                 "doctor, chapter 9). Exit status 1 when a finding is a problem.")
    ap.add_argument("target", nargs="?", help="PACKAGE.MODULE:FACTORY, a function returning the "
                    "model, or (model, batch); a batch may be (inputs, targets) or a data source")
    ap.add_argument("--hf", metavar="MODEL_TYPE", help="a transformers configuration by model "
                    "type (gpt2, bert, llama, ...), random weights, nothing downloaded")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override one configuration field (--hf), e.g. n_layer=24")
    ap.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps of the early probe")
    ap.add_argument("--steps", type=int, default=EARLY_STEPS,
                    help="optimiser steps of the early-steps probe (0: none)")
    ap.add_argument("--length", type=int, default=16, help="sequence length, synthetic batch")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences, synthetic batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figure", default="doctor.png", help="where to write the figure "
                    "('' for none)")
    ap.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = ap.parse_args(argv)
    if bool(args.target) == bool(args.hf):
        ap.error("give either PACKAGE.MODULE:FACTORY or --hf MODEL_TYPE")
    if args.hf:
        overrides = {}
        for item in args.set:
            name, sep, value = item.partition("=")
            if not sep:
                ap.error(f"--set {item!r} must be NAME=VALUE")
            overrides[name] = _value(value)
        model, batch = hf_model(args.hf, overrides, seed=args.seed), None
    else:
        if args.set:
            ap.error("--set changes a --hf configuration; a factory builds its own model")
        model, batch = _load(args.target)
    if batch is None:                  # the probe task: copy the previous token
        batch = PreviousToken(vocab=_vocabulary(model), length=args.length,
                              batch_size=args.batch_size, seed=args.seed)
    default = 0.1 if args.optimizer == "sgd" else 1e-3
    cfg = TrainConfig(optimizer=args.optimizer, lr=args.lr or default, seed=args.seed,
                      warmup_steps=args.warmup)
    report = examine(model, batch, optimizer=cfg, steps=args.steps)
    print(report)
    if args.figure:
        report.figure().savefig(args.figure, dpi=110)
        print(f"figure: {args.figure}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
        print(f"json: {args.json}")
    return 0 if report.ok else 1


class _CallableModule(types.ModuleType):
    """``depthlab.doctor`` stays a module (``python -m depthlab.doctor``, ``dl.doctor.examine``,
    ``dl.doctor.coord_check``) and is also the doctor: ``dl.doctor(model, batch, ...)`` calls
    ``examine`` with the same arguments."""

    def __call__(self, model: nn.Module, batch, **kwargs) -> Report:
        return examine(model, batch, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    sys.exit(main())
