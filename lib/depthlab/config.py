"""Frozen, validated configuration dataclasses.

Every experiment in the book is described by one of these. They are frozen (an experiment's
settings cannot change behind its back) and validated at construction: a bad value raises one
``ConfigError`` that names the field and what it accepts.

Introduced in chapter 0 ("Setup and a tour of depthlab").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from .seeding import default_seed

NORM_PLACEMENTS = ("post", "pre", "none")
NORM_KINDS = ("layer", "batch", "rms", "group", "none")
NORM_GROUPS = 8                # GroupNorm: features are split into this many groups
ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "identity")
ATTENTION_KINDS = ("softmax", "value_skipinit", "shaped")
INIT_SCHEMES = ("torch", "xavier", "kaiming", "normal", "gpt2", "fan_in", "fan_out",
                "orthogonal", "constant")
AMP_MODES = ("auto", "off", "bf16", "fp16")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


class ConfigError(ValueError):
    """A configuration value is not allowed. The message names the field."""


def _choice(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(
            f"{type(obj).__name__}.{name}={value!r} is not allowed; choose one of {allowed}"
        )


def _positive_int(obj: Any, name: str, minimum: int = 1) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"{type(obj).__name__}.{name}={value!r} must be an integer >= {minimum}"
        )


def _number(obj: Any, name: str, low: float, high: float = float("inf"),
            low_open: bool = False) -> None:
    """A finite real number in [low, high] (or (low, high]): inf and NaN are never settings."""
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        closing = ")" if math.isinf(high) else "]"
        raise ConfigError(
            f"{type(obj).__name__}.{name}={value!r} must be a finite number in "
            f"{bracket}{low}, {high}{closing}"
        )


def _boolean(obj: Any, name: str, allow_none: bool = False) -> None:
    """True or False (``"no"`` is a non-empty string, hence truthy: refuse it)."""
    value = getattr(obj, name)
    if isinstance(value, bool) or (allow_none and value is None):
        return
    allowed = "True, False or None" if allow_none else "True or False"
    raise ConfigError(f"{type(obj).__name__}.{name}={value!r} must be {allowed}")


def check_device(owner: str, value: Any) -> None:
    """``"auto"`` or a torch device string that parses and exists on this machine."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{owner}={value!r} must be 'auto' or a device such as 'cpu', "
                          "'cuda', 'cuda:1' or 'mps'")
    if value == "auto":
        return
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{owner}={value!r} is not a torch device; use 'auto', 'cpu', "
                          "'cuda', 'cuda:N' or 'mps'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{owner}={value!r}, but CUDA is not available on this machine "
                              "(use device='auto' to run wherever the code lands)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{owner}={value!r}, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"{owner}={value!r}, but MPS is not available on this machine")
    elif device.type != "cpu":
        raise ConfigError(f"{owner}={value!r}: depthlab runs on 'cpu', 'cuda' or 'mps'")


class _Config:
    """Shared helpers: ``cfg.replace(field=value)`` re-validates the new copy."""

    def replace(self, **changes: Any):
        known = {f.name for f in fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(
                f"{type(self).__name__} has no field {unknown[0]!r}; fields are {sorted(known)}"
            )
        return replace(self, **changes)  # type: ignore[type-var]

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class TransformerConfig(_Config):
    """A stack of transformer blocks, optionally with token/position embeddings and a head.

    Gains follow He & Hofmann (2023): for Pre-LN,
    ``X̂ = alpha_sa·X + beta_sa·MHA(Norm(X))`` and ``X_out = alpha_ff·X̂ + beta_ff·MLP(Norm(X̂))``.

    Their simplified blocks are members of the same family: ``attention`` replaces the softmax
    matrix A by ``attn_alpha·I + attn_beta·A`` (value-SkipInit, He, Martens et al. 2023) or by
    ``attn_alpha·I + attn_beta·A − attn_beta·C`` with C the uniform (causal) attention matrix
    and the queries initialised at 0 (shaped attention, Noci et al. 2023: exactly ``attn_alpha·I``
    at initialisation); ``identity_values`` removes the value and output projections, and
    ``value_gain`` writes each of them as ``α_V·I + β_V·W̃`` started at the identity (their
    Eq. 6); ``parallel`` computes attention and MLP from the same input, ``X_out = alpha_sa·X +
    beta_sa·MHA(Norm(X)) + beta_ff·MLP(Norm(X))`` (GPT-J; He & Hofmann's SAS-P without the
    skip, ``residual=False``). ``alpha_sa = 0`` removes the attention skip alone. Their
    norm-free model keeps two norms, as their code does: ``input_norm`` (block 1's input) and
    ``final_norm=True`` (a LayerNorm after the last block).
    """

    d_model: int = 64          # width D of the residual stream
    n_heads: int = 4           # attention heads H; D must be divisible by H
    n_layers: int = 6          # depth L (number of blocks)
    mlp_ratio: float = 4.0     # hidden width of the MLP is mlp_ratio * D
    norm_placement: str = "pre"  # "post" (Vaswani 2017), "pre" (Xiong 2020) or "none"
    norm_kind: str = "layer"   # "layer", "batch", "rms", "group" (8 groups) or "none"
    residual: bool = True      # False removes both skip connections of every block
    alpha_sa: float = 1.0      # gain on the skip of the attention sub-block
    beta_sa: float = 1.0       # gain on the attention branch
    alpha_ff: float = 1.0      # gain on the skip of the MLP sub-block
    beta_ff: float = 1.0       # gain on the MLP branch
    final_norm: bool | None = None  # norm after the last block; None = only for Pre-LN;
    #                          with norm_kind="none" it is a LayerNorm (GPT-2's ln_f, which
    #                          He & Hofmann's norm-free model keeps)
    causal: bool = True        # causal (decoder) or bidirectional (encoder) attention
    activation: str = "relu"   # MLP activation; PyTorch's encoder layer uses relu
    init: str = "torch"        # weight initialisation scheme, see models.init_weights
    init_gain: float = 1.0     # multiplies every weight matrix after initialisation
    embed_std: float | None = None  # std of token/position embeddings; None = the scheme's
    norm_eps: float = 1e-5     # epsilon of the norm layers (PyTorch's default)
    dropout: float = 0.0       # dropout inside the blocks; 0 in every experiment of the book
    bias: bool = True          # biases in every Linear (PyTorch's encoder layer: bias=True)
    attention: str = "softmax"  # "softmax", "value_skipinit" (αI + βA) or "shaped" (αI + βA − βC)
    attn_alpha: float = 1.0    # α: weight of the identity in the attention matrix (not softmax)
    attn_beta: float = 1.0     # β: weight of the softmax matrix (and of −C for "shaped")
    trainable_gains: bool = False  # α, β, γ of the attention matrix become parameters, per
    #                          head (γ, on −C, starts equal to β), and α_V, β_V of value_gain
    identity_values: bool = False  # values and output projection fixed to the identity
    value_gain: float | None = None  # β_V: values and output projection α_V·I + β_V·W̃ with
    #                          W̃ = 0 and α_V = 1 at init (He & Hofmann's Eq. 6: identity at
    #                          init, W̃ moving at β_V × the rate); None = plain matrices
    input_norm: bool = False   # norm-free blocks: the first block still normalises its
    #                          branch input (a LayerNorm), as He & Hofmann's code does
    parallel: bool = False     # attention and MLP side by side on one normalised input
    qk_norm: bool = False      # LayerNorm on each head's queries and keys (Dehghani et al. 2023)
    mup_base_width: int | None = None  # simple μP (Yang et al. 2022) relative to this width;
    #                            None = standard parametrisation (see models.apply_mup)
    vocab_size: int = 16       # tokens; used by SequenceModel only
    max_len: int = 64          # longest sequence for learned positions; SequenceModel only

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "n_layers", "vocab_size", "max_len"):
            _positive_int(self, name)
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"TransformerConfig.d_model={self.d_model} must be divisible by "
                f"n_heads={self.n_heads}"
            )
        _number(self, "mlp_ratio", 0.0, low_open=True)
        _choice(self, "norm_placement", NORM_PLACEMENTS)
        _choice(self, "norm_kind", NORM_KINDS)
        if self.norm_kind == "group" and self.d_model % NORM_GROUPS:
            raise ConfigError(f"TransformerConfig.d_model={self.d_model} must be divisible by "
                              f"{NORM_GROUPS} for norm_kind='group'")
        _choice(self, "activation", ACTIVATIONS)
        _choice(self, "init", INIT_SCHEMES)
        for name in ("alpha_sa", "beta_sa", "alpha_ff", "beta_ff", "init_gain"):
            _number(self, name, 0.0)
        if self.embed_std is not None:
            _number(self, "embed_std", 0.0, low_open=True)
        _number(self, "norm_eps", 0.0, low_open=True)
        _number(self, "dropout", 0.0, 1.0)
        for name in ("residual", "causal", "bias", "trainable_gains", "identity_values",
                     "parallel", "qk_norm", "input_norm"):
            _boolean(self, name)
        _choice(self, "attention", ATTENTION_KINDS)
        for name in ("attn_alpha", "attn_beta"):
            _number(self, name, 0.0)
        if self.value_gain is not None:
            _number(self, "value_gain", 0.0, low_open=True)
            if self.identity_values:
                raise ConfigError(
                    "TransformerConfig.value_gain reparametrises the value and output matrices "
                    "(α_V·I + β_V·W̃); identity_values=True removes them: choose one")
        if self.attention == "softmax" and (
                self.attn_alpha != 1.0 or self.attn_beta != 1.0
                or (self.trainable_gains and self.value_gain is None)):
            raise ConfigError(
                "TransformerConfig.attn_alpha, attn_beta and trainable_gains shape the attention "
                "matrix of attention='value_skipinit' or 'shaped' (trainable_gains also the "
                "gains of value_gain); with attention='softmax' leave them at 1.0, 1.0, False")
        if self.input_norm and self.norm_placement != "none":
            raise ConfigError(
                "TransformerConfig.input_norm=True is for norm-free blocks (norm_placement="
                f"'none'); with norm_placement={self.norm_placement!r} the first block already "
                "normalises its input")
        if self.parallel and self.norm_placement == "post":
            raise ConfigError(
                "TransformerConfig.parallel=True needs norm_placement 'pre' or 'none': a parallel "
                "block has one input for both branches, so there is no norm between them")
        if self.parallel and self.alpha_ff != 1.0:
            raise ConfigError(
                "TransformerConfig.alpha_ff is not used when parallel=True (the block has one "
                "skip, weighted by alpha_sa): leave it at 1.0")
        _boolean(self, "final_norm", allow_none=True)
        if self.mup_base_width is not None:
            _positive_int(self, "mup_base_width")
        if self.d_mlp < 1:
            raise ConfigError(
                f"TransformerConfig.mlp_ratio={self.mlp_ratio!r} gives an MLP of width "
                f"round({self.mlp_ratio} * {self.d_model}) = {self.d_mlp}; it must be >= 1"
            )
        if (self.norm_placement == "none") != (self.norm_kind == "none"):
            raise ConfigError(
                "TransformerConfig.norm_placement and norm_kind must both be 'none' or neither: "
                f"got norm_placement={self.norm_placement!r}, norm_kind={self.norm_kind!r}"
            )

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_mlp(self) -> int:
        return int(round(self.mlp_ratio * self.d_model))

    @property
    def has_final_norm(self) -> bool:
        if self.final_norm is None:
            return self.norm_placement == "pre"
        return self.final_norm


@dataclass(frozen=True)
class MLPConfig(_Config):
    """A deep fully connected network: ``depth`` hidden layers of equal ``width``.

    Each hidden layer is ``h = act(norm(W h_prev + b))``; with ``residual`` it becomes
    ``h = h_prev + act(norm(W h_prev + b))`` (the input projection has no skip). ``widths``
    gives the hidden layers different widths instead (chapter 1: Xavier's fan-in/fan-out
    compromise only shows when a layer's fan-in and fan-out differ).
    """

    d_in: int = 64             # input features (digits: 64 pixels)
    width: int = 64            # hidden width
    depth: int = 10            # number of hidden layers
    d_out: int = 10            # output classes
    activation: str = "relu"   # one of ACTIVATIONS
    init: str = "torch"        # one of INIT_SCHEMES ("gpt2" means N(0, 0.02))
    init_gain: float = 1.0     # multiplies every weight matrix after initialisation
    norm_kind: str = "none"    # norm before each activation: "layer", "batch", "rms", "group"
    #                            (GroupNorm, 8 groups of features) or "none"
    residual: bool = False     # skip connection around each hidden layer after the first
    bias: bool = True          # biases in the linear layers (initialised to zero)
    norm_eps: float = 1e-5
    norm_noise: float = 0.0    # "noisy BatchNorm" strength (chapter 4); needs norm_kind="batch"
    widths: tuple[int, ...] | None = None  # hidden widths, one per layer; overrides width/depth
    branch_gain: float = 1.0   # β in h + β·branch(h) for residual layers (1/√depth, 0: SkipInit)
    learn_branch_gain: bool = False  # β a trainable scalar per layer (SkipInit: De & Smith 2020)

    def __post_init__(self) -> None:
        for name in ("d_in", "width", "depth", "d_out"):
            _positive_int(self, name)
        if self.widths is not None:
            if (not isinstance(self.widths, tuple) or not self.widths
                    or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1
                               for w in self.widths)):
                raise ConfigError(f"MLPConfig.widths={self.widths!r} must be a non-empty tuple "
                                  "of integers >= 1")
            object.__setattr__(self, "depth", len(self.widths))
            if self.residual and len(set(self.widths)) > 1:
                raise ConfigError("MLPConfig.residual=True needs equal widths: a skip adds a "
                                  "layer's input to its output")
        _choice(self, "activation", ACTIVATIONS)
        _choice(self, "init", INIT_SCHEMES)
        _choice(self, "norm_kind", NORM_KINDS)
        if self.norm_kind == "group" and any(w % NORM_GROUPS for w in self.hidden_widths):
            raise ConfigError(f"MLPConfig widths must be divisible by {NORM_GROUPS} for "
                              "norm_kind='group'")
        _number(self, "init_gain", 0.0)
        _number(self, "norm_eps", 0.0, low_open=True)
        _number(self, "norm_noise", 0.0)
        if self.norm_noise > 0 and self.norm_kind != "batch":
            raise ConfigError(f"MLPConfig.norm_noise={self.norm_noise!r} needs "
                              f"norm_kind='batch', got norm_kind={self.norm_kind!r}")
        _boolean(self, "residual")
        _boolean(self, "bias")
        _number(self, "branch_gain", 0.0)
        _boolean(self, "learn_branch_gain")
        if (self.branch_gain != 1.0 or self.learn_branch_gain) and not self.residual:
            raise ConfigError("MLPConfig.branch_gain and learn_branch_gain scale the residual "
                              "branch: they need residual=True")

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        """The width of every hidden layer, input side first."""
        return self.widths if self.widths is not None else (self.width,) * self.depth


@dataclass(frozen=True)
class TrainConfig(_Config):
    """How to train: optimiser, schedule, clipping, precision, device and detectors."""

    steps: int = 200            # optimiser steps
    lr: float = 1e-3            # peak learning rate
    optimizer: str = "adam"     # "adam", "adamw" or "sgd"
    betas: tuple[float, float] = (0.9, 0.98)  # Adam betas of Vaswani et al. (2017)
    eps: float = 1e-8           # Adam's epsilon (PyTorch's default)
    momentum: float = 0.9       # SGD only
    weight_decay: float = 0.0
    independent_decay: bool = False  # AdamW: decay by weight_decay × schedule, not × lr (below)
    z_loss: float = 0.0         # adds z_loss · mean(log² Z) of the output logits (PaLM: 1e-4)
    warmup_steps: int = 0       # linear warm-up from lr/warmup_steps to lr; 0 = none
    schedule: str = "constant"  # after warm-up: "constant", "cosine" (to 0) or "linear" (to 0)
    clip_norm: float | None = None  # clip the global gradient norm to this value; None = off
    amp: str = "off"            # float32 by default; "bf16", "fp16", or "auto" (bf16 on CUDA)
    device: str = "auto"        # "auto" = cuda, then mps, then cpu; or a torch device string
    seed: int | None = None     # data order, dropout, ...; None = depthlab.seeding.default_seed()
    progress: bool | None = None  # tqdm bar; None = only in an interactive session
    sync_every: int | None = None  # read metrics from the device every N steps; None = 1 on
    #                              CPU (free there), 16 on accelerators (as nanoGPT logs)
    plateau_window: int = 20    # steps averaged at the start and end to detect a plateau
    plateau_tol: float = 0.05   # relative loss drop below which a run counts as stalled

    def __post_init__(self) -> None:
        _positive_int(self, "steps")
        _number(self, "lr", 0.0, low_open=True)
        _choice(self, "optimizer", OPTIMIZERS)
        if (not isinstance(self.betas, tuple) or len(self.betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                           and 0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"TrainConfig.betas={self.betas!r} must be two numbers in [0, 1)")
        _number(self, "eps", 0.0)
        _number(self, "momentum", 0.0, 1.0)
        _number(self, "weight_decay", 0.0)
        _boolean(self, "independent_decay")
        if self.independent_decay and self.optimizer != "adamw":
            raise ConfigError(f"TrainConfig.independent_decay=True needs optimizer='adamw' "
                              f"(got {self.optimizer!r}): only AdamW decouples the decay")
        _number(self, "z_loss", 0.0)
        _positive_int(self, "warmup_steps", minimum=0)
        _choice(self, "schedule", SCHEDULES)
        if self.clip_norm is not None:
            _number(self, "clip_norm", 0.0, low_open=True)
        _choice(self, "amp", AMP_MODES)
        check_device("TrainConfig.device", self.device)
        if self.seed is None:
            object.__setattr__(self, "seed", default_seed())
        _positive_int(self, "seed", minimum=0)
        _boolean(self, "progress", allow_none=True)
        if self.sync_every is not None:
            _positive_int(self, "sync_every")
        _positive_int(self, "plateau_window")
        _number(self, "plateau_tol", 0.0, 1.0)
