"""Models: normalisation layers, the transformer block, encoders, sequence models, deep MLPs.

Shape vocabulary used everywhere in depthlab:
    B batch, T tokens, D model width, H heads, Dh = D / H, V vocabulary, C classes.

Norm placement is always an explicit config field. PyTorch's ``nn.TransformerEncoderLayer``
defaults to Post-LN (``norm_first=False``); ``norm_placement="post"`` is that default and
``norm_placement="pre"`` is ``norm_first=True``. ``interop.load_torch_encoder_layer`` copies
PyTorch's weights into a ``Block`` so the two can be compared number for number (chapter 0).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .config import NORM_GROUPS, MLPConfig, TransformerConfig
from .devices import device_of
from .seeding import default_seed

# --------------------------------------------------------------------------------------------
# Normalisation. Each norm is written out in a pure function (the formula the book teaches)
# and wrapped in a module that, by default, calls PyTorch's fused kernel. Tests check that the
# two agree with each other and with nn.LayerNorm / nn.BatchNorm1d / nn.RMSNorm.
# --------------------------------------------------------------------------------------------


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise each token over its D features. x: (..., D) -> (..., D). (Chapter 3.)"""
    centred = x - x.mean(dim=-1, keepdim=True)               # (..., D)
    var = centred.pow(2).mean(dim=-1, keepdim=True)          # (..., 1), biased variance
    return centred / torch.sqrt(var + eps) * weight + bias


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Divide each token by the root mean square of its features; no centring. (Chapter 3.)"""
    rms = torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)   # (..., 1)
    return x / rms * weight


def batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise each feature over every other axis: for (B, T, D), over all B·T tokens.

    Training-mode statistics only (biased variance, as PyTorch uses for normalising).
    (Chapter 3.)
    """
    dims = tuple(range(x.dim() - 1))                          # all axes but the feature axis
    centred = x - x.mean(dim=dims, keepdim=True)              # (..., D)
    var = centred.pow(2).mean(dim=dims, keepdim=True)         # (1, ..., D), biased variance
    return centred / torch.sqrt(var + eps) * weight + bias


class LayerNorm(nn.Module):
    """Per-token normalisation over features (Ba et al. 2016). x: (..., D)."""

    def __init__(self, d: int, eps: float = 1e-5, fused: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps, self.fused = eps, fused

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Per-token division by the root mean square (Zhang & Sennrich 2019). x: (..., D)."""

    def __init__(self, d: int, eps: float = 1e-5, fused: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps, self.fused = eps, fused

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


class BatchNorm(nn.Module):
    """Per-feature normalisation over the batch (Ioffe & Szegedy 2015). x: (..., D).

    For a (B, T, D) tensor the statistics pool all B·T tokens, so one sequence's output depends
    on the other sequences in the batch (chapter 3). Keeps running statistics for eval mode
    with PyTorch's convention: running = (1 - momentum)·running + momentum·batch, using the
    unbiased batch variance.
    """

    def __init__(self, d: int, eps: float = 1e-5, momentum: float = 0.1,
                 fused: bool = True, noise: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.register_buffer("running_mean", torch.zeros(d))
        self.register_buffer("running_var", torch.ones(d))
        self.eps, self.momentum, self.fused, self.noise = eps, momentum, fused, noise

    def forward(self, x: Tensor) -> Tensor:
        out = self._normalise(x)
        if self.training and self.noise > 0:
            out = self._add_noise(out)
        return out

    def _add_noise(self, out: Tensor) -> Tensor:
        """Noisy BatchNorm (Santurkar et al. 2018, chapter 4): every call draws, per feature,
        a scale exp(noise·z₁) and a shift noise·z₂ (z ~ N(0, 1), from torch's global generator)
        and applies them to every example, so the distribution each later layer sees moves at
        every step: internal covariate shift added on purpose. Training mode only."""
        d = out.shape[-1]
        scale = torch.exp(self.noise * torch.randn(d, device=out.device, dtype=out.dtype))
        shift = self.noise * torch.randn(d, device=out.device, dtype=out.dtype)
        return out * scale + shift

    def _normalise(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])                      # (N, D), N = all tokens
        if self.training and flat.shape[0] < 2:
            raise ValueError(
                "BatchNorm needs at least 2 values per feature in training mode, got 1: "
                "with batch size 1 there are no batch statistics to compute (chapter 3)"
            )
        if self.fused:
            out = F.batch_norm(flat, self.running_mean, self.running_var, self.weight,
                               self.bias, self.training, self.momentum, self.eps)
            return out.reshape(x.shape)
        if not self.training:
            out = (flat - self.running_mean) / torch.sqrt(self.running_var + self.eps)
            return (out * self.weight + self.bias).reshape(x.shape)
        with torch.no_grad():
            n = flat.shape[0]
            self.running_mean.lerp_(flat.mean(0), self.momentum)
            self.running_var.lerp_(flat.var(0, unbiased=False) * n / (n - 1), self.momentum)
        return batch_norm(flat, self.weight, self.bias, self.eps).reshape(x.shape)


class GroupNorm(nn.Module):
    """LayerNorm within each of ``groups`` groups of features (Wu & He 2018). x: (..., D).

    Like LayerNorm it works per example, so it does not care about the batch size; with one
    group it is LayerNorm. (In a CNN its groups also pool the spatial positions.)"""

    def __init__(self, d: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.groups, self.eps = groups, eps

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])                     # (N, D)
        return F.group_norm(flat, self.groups, self.weight, self.bias, self.eps).reshape(x.shape)


@torch.no_grad()
def fold_batchnorm(linear: nn.Linear, bn: nn.Module) -> nn.Linear:
    """A new Linear computing ``bn(linear(x))`` with ``bn`` in eval mode, in one layer.

    In eval mode BatchNorm is an affine map per feature, y = γ·(z − μ̂)/√(σ̂² + ε) + β, so it
    can be folded into the preceding layer: W' = diag(s)·W and b' = s·(b − μ̂) + β with
    s = γ/√(σ̂² + ε). Inference then costs nothing extra (chapter 3). Works for depthlab's
    ``BatchNorm`` and ``nn.BatchNorm1d``."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)              # (D,)
    bias = linear.bias if linear.bias is not None else torch.zeros_like(bn.running_mean)
    folded = nn.Linear(linear.in_features, linear.out_features, bias=True)
    folded.to(linear.weight.device, linear.weight.dtype)
    folded.weight.copy_(linear.weight * scale[:, None])
    folded.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return folded


def make_norm(kind: str, d: int, eps: float = 1e-5, noise: float = 0.0) -> nn.Module:
    """The norm layer named by a config's ``norm_kind``; "none" gives ``nn.Identity``.

    ``noise`` > 0 makes a noisy BatchNorm (see ``BatchNorm._add_noise``); batch only."""
    if kind == "layer":
        return LayerNorm(d, eps)
    if kind == "rms":
        return RMSNorm(d, eps)
    if kind == "batch":
        return BatchNorm(d, eps, noise=noise)
    if kind == "group":
        return GroupNorm(d, NORM_GROUPS, eps)
    return nn.Identity()


def make_activation(name: str) -> nn.Module:
    """The activation module named by a config's ``activation``."""
    return {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
            "identity": nn.Identity}[name]()


# --------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------


class SkipLinear(nn.Module):
    """A square linear map written as ``α·I + β·W̃``, with W̃ = 0 and α = 1 at initialisation
    (He & Hofmann 2023, Eq. 6; chapter 7). x: (..., D) -> (..., D).

    It starts as the identity, and under Adam W̃ moves by about the learning rate per step, so
    the map moves by β times that: the same as a plain matrix started at I and trained at β
    times the rate (their appendix A; ``probes.branch_after_one_step``). With ``trainable``,
    α and β are parameters (scalars), whose ratio β/α says how far training takes the map
    from the identity (their Fig. 4). No bias, as in their code."""

    def __init__(self, d: int, beta: float, trainable: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d, d))          # W̃ (out, in), 0 at init
        for name, value in (("alpha", 1.0), ("beta", beta)):
            t = torch.tensor(float(value))
            if trainable:
                self.register_parameter(name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)

    def matrix(self) -> Tensor:
        """α·I + β·W̃, (D, D)."""
        eye = torch.eye(self.weight.shape[0], dtype=self.weight.dtype, device=self.weight.device)
        return self.alpha * eye + self.beta * self.weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.matrix())


class SelfAttention(nn.Module):
    """Multi-head self-attention. x: (B, T, D) -> (B, T, D).

    ``qkv`` holds the query, key and value projections stacked in that order, the same layout
    as ``nn.MultiheadAttention.in_proj_weight``. By default the attention runs through PyTorch's
    fused ``F.scaled_dot_product_attention``; ``sdpa = False`` switches to the written-out
    softmax(QKᵀ/√Dh)·V of ``attention_weights``, the same function to float round-off, which
    ``torch.func.vmap`` can batch (seed ensembles set it; chapter 0).
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool, dropout: float = 0.0,
                 bias: bool = True, kind: str = "softmax", alpha: float = 1.0,
                 beta: float = 1.0, trainable_gains: bool = False,
                 identity_values: bool = False, qk_norm: bool = False,
                 norm_eps: float = 1e-5, value_gain: float | None = None) -> None:
        super().__init__()
        # identity_values: only queries and keys are projected; V = X and no output projection.
        # value_gain (He & Hofmann's Eq. 6): V and the projection are α_V·I + β_V·W̃ (SkipLinear)
        own_values = identity_values or value_gain is not None
        self.qkv = nn.Linear(d_model, (2 if own_values else 3) * d_model, bias=bias)
        self.value = (SkipLinear(d_model, value_gain, trainable_gains)
                      if value_gain is not None else None)
        if value_gain is not None:
            self.proj = SkipLinear(d_model, value_gain, trainable_gains)
        else:
            self.proj = (nn.Identity() if identity_values
                         else nn.Linear(d_model, d_model, bias=bias))
        self.proj.is_residual_out = True                       # scaled by 1/sqrt(2L) in gpt2 init
        self.qkv.feeds_relu = self.proj.feeds_relu = False     # Kaiming's gain 2 would not apply
        self.n_heads, self.causal, self.dropout = n_heads, causal, dropout
        self.kind, self.identity_values = kind, own_values
        if kind != "softmax":              # the matrix's α, β (and γ on −C, = β at init), per head
            gains = [("alpha", alpha), ("beta", beta)] + ([("gamma", beta)] if kind == "shaped"
                                                          else [])
            for name, value in gains:
                t = torch.full((n_heads,), float(value))
                if trainable_gains:
                    self.register_parameter(name, nn.Parameter(t))
                else:
                    self.register_buffer(name, t)
        # The fused kernel computes softmax(QKᵀ/√Dh)·V only; the shaped matrices are written out.
        self.sdpa = kind == "softmax"
        # qk-layernorm (Dehghani et al. 2023; Wortsman et al. 2024): each head's query and key
        # vectors normalised over Dh, so |q·k|/√Dh stays below √Dh·(gains) at any weight scale
        d_head = d_model // n_heads
        self.q_norm = LayerNorm(d_head, norm_eps) if qk_norm else nn.Identity()
        self.k_norm = LayerNorm(d_head, norm_eps) if qk_norm else nn.Identity()
        # None, or a list (probes.attention_logit_gradients): while it is a list, the forward
        # pass runs the written-out softmax and keeps its logits, in the graph, in the list
        self.logit_taps: list[Tensor] | None = None

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, D = x.shape
        H = self.n_heads
        if self.identity_values:
            q, k = self.qkv(x).split(D, dim=-1)                # 2 x (B, T, D)
            v = x if self.value is None else self.value(x)     # (B, T, D)
        else:
            q, k, v = self.qkv(x).split(D, dim=-1)             # 3 x (B, T, D)
        q = self.q_norm(q.view(B, T, H, D // H)).transpose(1, 2)   # (B, H, T, Dh)
        k = self.k_norm(k.view(B, T, H, D // H)).transpose(1, 2)   # (B, H, T, Dh)
        v = v.view(B, T, H, D // H).transpose(1, 2)            # (B, H, T, Dh)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self._heads(x)
        if self.sdpa and self.logit_taps is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=self.causal,
                dropout_p=self.dropout if self.training else 0.0)   # (B, H, T, Dh)
        else:
            a = self._matrix(q, k)                                  # (B, H, T, T)
            if self.training and self.dropout > 0:
                a = F.dropout(a, self.dropout)
            y = a @ v                                               # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, D)                      # (B, T, D)
        return self.proj(y)

    def _scores(self, q: Tensor, k: Tensor) -> Tensor:
        """QKᵀ/√Dh with the future at -inf when causal: the attention logits, (B, H, T, T)."""
        T = q.shape[-2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, T)
        if self.causal:
            future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        if self.logit_taps is not None and scores.requires_grad:
            scores.retain_grad()                                    # keep ∂L/∂z for the probe
            self.logit_taps.append(scores)
        return scores

    def _softmax(self, q: Tensor, k: Tensor) -> Tensor:
        return self._scores(q, k).softmax(dim=-1)

    def attention_logits(self, x: Tensor) -> Tensor:
        """The logits QKᵀ/√Dh before the softmax, written out: x (B, T, D) -> (B, H, T, T),
        the future at -inf in a causal model. Their growth is the instability of chapter 8."""
        q, k, _ = self._heads(x)
        return self._scores(q, k)

    def _matrix(self, q: Tensor, k: Tensor) -> Tensor:
        """The matrix that mixes the values: softmax A, αI + βA, or αI + βA − γC (γ = β at
        initialisation, and always unless the gains are trainable)."""
        a = self._softmax(q, k)                                     # (B, H, T, T)
        if self.kind == "softmax":
            return a
        T = a.shape[-1]
        alpha = self.alpha.to(a.dtype).view(-1, 1, 1)              # (H, 1, 1)
        beta = self.beta.to(a.dtype).view(-1, 1, 1)
        m = alpha * torch.eye(T, dtype=a.dtype, device=a.device) + beta * a
        if self.kind == "shaped":
            gamma = self.gamma.to(a.dtype).view(-1, 1, 1)
            m = m - gamma * uniform_attention(T, self.causal, dtype=a.dtype, device=a.device)
        return m

    def attention_weights(self, x: Tensor) -> Tensor:
        """The attention matrix, written out: x (B, T, D) -> (B, H, T, T).

        The softmax matrix A, or for ``kind`` "value_skipinit"/"shaped" the matrix that
        actually mixes the values (αI + βA, αI + βA − βC). The fused kernel never forms A;
        this is for inspection (chapters 1, 7) and matches what the kernel computes.
        """
        q, k, _ = self._heads(x)
        return self._matrix(q, k)


def uniform_attention(T: int, causal: bool, *, dtype=None, device=None) -> Tensor:
    """C: every position attends equally to every position it may see, (T, T).

    Causal: row i holds 1/(i+1) on columns 0..i. It is the softmax of all-zero scores, so
    shaped attention αI + β·softmax(QKᵀ/√Dh) − βC equals αI when the queries are 0.
    """
    if not causal:
        return torch.full((T, T), 1.0 / T, dtype=dtype, device=device)
    lower = torch.ones(T, T, dtype=dtype, device=device).tril()
    return lower / lower.sum(dim=-1, keepdim=True)


class MLP(nn.Module):
    """Position-wise feed-forward network: D -> mlp_ratio·D -> D. x: (B, T, D) -> (B, T, D)."""

    def __init__(self, d_model: int, d_hidden: int, activation: str, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden, bias=bias)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(d_hidden, d_model, bias=bias)
        self.fc2.is_residual_out = True
        self.fc2.feeds_relu = False                            # fc1 feeds the activation

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """One transformer block with explicit norm placement and He & Hofmann's scalar gains.

    Pre-LN (Xiong et al. 2020; PyTorch ``norm_first=True``)::

        X̂     = alpha_sa·X + beta_sa·MHA(Norm1(X))
        X_out = alpha_ff·X̂ + beta_ff·MLP(Norm2(X̂))

    Post-LN (Vaswani et al. 2017; PyTorch ``norm_first=False``, its default)::

        X̂     = Norm1(alpha_sa·X + beta_sa·MHA(X))
        X_out = Norm2(alpha_ff·X̂ + beta_ff·MLP(X̂))

    Parallel (GPT-J; He & Hofmann's SAS-P), one norm and one skip::

        X_out = alpha_sa·X + beta_sa·MHA(Norm1(X)) + beta_ff·MLP(Norm1(X))

    ``residual=False`` sets both alphas to 0 (no skip). x: (B, T, D) -> (B, T, D).
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm1 = make_norm(cfg.norm_kind, cfg.d_model, cfg.norm_eps)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.causal, cfg.dropout, cfg.bias,
                                  kind=cfg.attention, alpha=cfg.attn_alpha, beta=cfg.attn_beta,
                                  trainable_gains=cfg.trainable_gains,
                                  identity_values=cfg.identity_values, qk_norm=cfg.qk_norm,
                                  norm_eps=cfg.norm_eps, value_gain=cfg.value_gain)
        # a parallel block normalises once: no second norm (its parameter count is exact)
        self.norm2 = (nn.Identity() if cfg.parallel
                      else make_norm(cfg.norm_kind, cfg.d_model, cfg.norm_eps))
        self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.activation, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def _attn_block(self, x: Tensor) -> Tensor:
        return self.drop(self.attn(x))

    def _mlp_block(self, x: Tensor) -> Tensor:
        return self.drop(self.mlp(x))

    def forward(self, x: Tensor) -> Tensor:
        c = self.cfg
        a_sa, a_ff = (c.alpha_sa, c.alpha_ff) if c.residual else (0.0, 0.0)
        if c.parallel:
            h = self.norm1(x)
            branches = _mix(1.0, c.beta_sa * self._attn_block(h), c.beta_ff, self._mlp_block(h))
            return _mix(a_sa, x, 1.0, branches)
        if c.norm_placement == "pre":
            x = _mix(a_sa, x, c.beta_sa, self._attn_block(self.norm1(x)))
            x = _mix(a_ff, x, c.beta_ff, self._mlp_block(self.norm2(x)))
        elif c.norm_placement == "post":
            x = self.norm1(_mix(a_sa, x, c.beta_sa, self._attn_block(x)))
            x = self.norm2(_mix(a_ff, x, c.beta_ff, self._mlp_block(x)))
        else:                      # no norms: norm1 is the identity, except in the first
            #                          block of a stack with input_norm (Encoder)
            x = _mix(a_sa, x, c.beta_sa, self._attn_block(self.norm1(x)))
            x = _mix(a_ff, x, c.beta_ff, self._mlp_block(x))
        return x


def apply_mup(model: nn.Module, width: int, base_width: int) -> nn.Module:
    """μP for Adam (Yang et al. 2022, Tensor Programs V; chapter 8) relative to
    ``base_width``, as the ``mup`` package implements it (MuReadout, MuAdam, set_base_shapes).
    With m = width / base_width:

    - every *hidden* weight matrix (attention's query/key/value and output projections, both
      MLP matrices: both dimensions grow with the width) learns at lr/m, and its weight decay
      is multiplied by m, so that the decay per step, lr·decay, stays the same;
    - the readout keeps a width-independent learning rate; its logits are multiplied by 1/m
      (``SequenceModel.forward``), and its initial weights and bias by √m, so that its
      effective initial scale is 1/width (μP's 1/fan_in² variance);
    - embeddings, biases and norm gains keep the peak rate.

    (Scaling the readout's rate by 1/m as well would scale its effect twice: the logits'
    change would fall as 1/m².) Why: under Adam each entry of a matrix moves by about the
    learning rate, so a hidden layer's output changes by about lr·fan_in per step, m times
    more at m times the width; lr/m keeps that change the same at every width, which is what
    lets the best learning rate carry over from a narrow model to a wide one. μP assumes
    weights of variance 1/fan_in (``init="fan_in"``). Attention keeps its 1/√Dh: the book's
    models keep the head width Dh fixed as they widen, where μP's 1/Dh and 1/√Dh differ by a
    constant. Marks the hidden matrices with ``lr_scale`` = 1/m, which the optimisers read.
    The coordinate check (``probes.coordinate_check``) tests the result.
    """
    m = width / base_width
    head = getattr(model, "head", None)
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            module.weight.lr_scale = 1.0 / m                # type: ignore[attr-defined]
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            for p in head.parameters():
                p.mul_(math.sqrt(m))
    return model


def zero_queries(model: nn.Module, only_shaped: bool = False) -> nn.Module:
    """Set every attention's query weights and biases to 0 (with ``only_shaped``, those of
    shaped attention only): all scores are 0, the softmax is the uniform matrix C, and shaped
    attention starts as exactly αI (Noci et al. 2023). ``init_weights`` calls it."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SelfAttention) and (m.kind == "shaped" or not only_shaped):
                D = m.qkv.in_features
                m.qkv.weight[:D].zero_()
                if m.qkv.bias is not None:
                    m.qkv.bias[:D].zero_()
    return model


def _mix(alpha: float, skip: Tensor, beta: float, branch: Tensor) -> Tensor:
    """alpha·skip + beta·branch, without multiplying by 1 or adding 0 (keeps PyTorch parity)."""
    if beta != 1.0:
        branch = beta * branch
    if alpha == 0.0:
        return branch
    return (skip if alpha == 1.0 else alpha * skip) + branch


class Encoder(nn.Module):
    """A stack of ``n_layers`` independently initialised blocks, plus the optional final norm.

    x: (B, T, D) -> (B, T, D). ``self.layers`` is the list diagnostics probe by default.
    """

    def __init__(self, cfg: TransformerConfig, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        seed = default_seed() if seed is None else seed
        with torch.random.fork_rng(devices=[]):                # leave the caller's RNG alone
            # Each block is constructed on its own (never a deepcopy of one layer, which is how
            # nn.TransformerEncoder starts every layer identical), then re-initialised from seed.
            self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            if cfg.input_norm:
                # He & Hofmann's norm-free blocks, as their code builds them: "always use LN in
                # first layer to normalise input activation norms" (block 1's branch input)
                self.layers[0].norm1 = LayerNorm(cfg.d_model, cfg.norm_eps)
            # a final norm in a norm-free stack is GPT-2's LayerNorm (ln_f), as in their code
            final_kind = cfg.norm_kind if cfg.norm_kind != "none" else "layer"
            self.final_norm = (make_norm(final_kind, cfg.d_model, cfg.norm_eps)
                               if cfg.has_final_norm else nn.Identity())
        init_weights(self, cfg.init, n_layers=cfg.n_layers, gain=cfg.init_gain, seed=seed)
        self.checkpoint = False    # recompute each block in backward (``gradient_checkpointing``)

    def structure_key(self):
        """What fixes this model's function (see ``grouped.structure``)."""
        return _structure(self)

    def forward(self, x: Tensor) -> Tensor:
        recompute = self.checkpoint and torch.is_grad_enabled()
        if recompute and self.training and self.cfg.norm_kind == "batch":
            raise ValueError(_CHECKPOINT_BATCHNORM)
        for block in self.layers:
            if recompute:
                # Keep only each block's input for backward and run the block again there:
                # the same gradients for less activation memory (chapter 6).
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.final_norm(x)


_CHECKPOINT_BATCHNORM = (
    "gradient checkpointing runs every block's forward pass twice (once more in backward), so "
    "a BatchNorm in training mode would update its running statistics twice per step; depthlab "
    "refuses the combination: use norm_kind='layer' or 'rms', or train without checkpointing")


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module) -> Iterator[nn.Module]:
    """Turn on activation checkpointing in every depthlab ``Encoder`` inside ``model``.

    Inside the ``with`` block each transformer block's activations are recomputed during the
    backward pass instead of stored. Gradients are unchanged; memory drops and time rises.
    """
    encoders = [m for m in model.modules() if isinstance(m, Encoder)]
    if not encoders:
        raise ValueError(f"{type(model).__name__} has no depthlab Encoder to checkpoint")
    if any(e.cfg.norm_kind == "batch" for e in encoders):
        raise ValueError(_CHECKPOINT_BATCHNORM)
    before = [e.checkpoint for e in encoders]
    for e in encoders:
        e.checkpoint = True
    try:
        yield model
    finally:
        for e, b in zip(encoders, before):
            e.checkpoint = b


class SequenceModel(nn.Module):
    """Token + learned position embeddings, an ``Encoder``, and a linear head.

    idx: (B, T) integer tokens -> logits (B, T, V).
    """

    def __init__(self, cfg: TransformerConfig, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        seed = default_seed() if seed is None else seed
        with torch.random.fork_rng(devices=[]):
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
            self.encoder = Encoder(cfg, seed=seed)
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.bias)
            self.head.feeds_relu = False
        init_weights(self, cfg.init, n_layers=cfg.n_layers, gain=cfg.init_gain, seed=seed,
                     embed_std=cfg.embed_std)
        if cfg.mup_base_width is not None:
            apply_mup(self, cfg.d_model, cfg.mup_base_width)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    def structure_key(self):
        """What fixes this model's function (see ``grouped.structure``)."""
        return _structure(self)

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        if T > self.cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds TransformerConfig.max_len="
                             f"{self.cfg.max_len}")
        pos = torch.arange(T, device=idx.device)               # (T,)
        try:
            tokens = self.tok_emb(idx)                         # (B, T, D)
        except IndexError:                                     # say which setting is wrong
            raise ValueError(f"token ids must lie in [0, TransformerConfig.vocab_size="
                             f"{self.cfg.vocab_size}); got ids from {int(idx.min())} to "
                             f"{int(idx.max())}") from None
        x = tokens + self.pos_emb(pos)                         # (B, T, D)
        logits = self.head(self.encoder(x))                    # (B, T, V)
        if self.cfg.mup_base_width is not None:                # μP's output multiplier
            logits = logits * (self.cfg.mup_base_width / self.cfg.d_model)
        return logits


# --------------------------------------------------------------------------------------------
# Deep MLP
# --------------------------------------------------------------------------------------------


class MLPLayer(nn.Module):
    """h -> act(norm(W h + b)); with ``residual``, h + β·act(norm(W h + b)).

    β (``branch_gain``) is 1 by default; 1/√L keeps the stream's variance bounded over L
    layers, and a trainable β that starts at 0 is SkipInit (De & Smith 2020; chapter 2).
    h: (B, d_in) -> (B, d_out).
    """

    def __init__(self, d_in: int, d_out: int, activation: str, norm_kind: str,
                 residual: bool, bias: bool = True, eps: float = 1e-5,
                 noise: float = 0.0, branch_gain: float = 1.0,
                 learn_branch_gain: bool = False) -> None:
        super().__init__()
        if residual and d_in != d_out:
            raise ValueError("a residual MLPLayer needs d_in == d_out")
        self.linear = nn.Linear(d_in, d_out, bias=bias)
        self.norm = make_norm(norm_kind, d_out, eps, noise)
        self.act = make_activation(activation)
        self.residual = residual
        self.branch_gain = (nn.Parameter(torch.tensor(float(branch_gain)))
                            if learn_branch_gain else float(branch_gain))

    def branch(self, h: Tensor) -> Tensor:
        """act(norm(W h + b)), without the skip and without β."""
        return self.act(self.norm(self.linear(h)))

    def forward(self, h: Tensor) -> Tensor:
        out = self.branch(h)
        if not self.residual:
            return out
        if isinstance(self.branch_gain, Tensor) or self.branch_gain != 1.0:
            out = self.branch_gain * out
        return h + out


class DeepMLP(nn.Module):
    """``depth`` hidden layers of width ``width`` and a linear classifier head.

    x: (B, d_in) -> logits (B, d_out). ``self.layers`` holds the hidden layers in order.
    """

    def __init__(self, cfg: MLPConfig, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        seed = default_seed() if seed is None else seed
        with torch.random.fork_rng(devices=[]):
            dims = [cfg.d_in, *cfg.hidden_widths]
            self.layers = nn.ModuleList(
                MLPLayer(dims[i], dims[i + 1], cfg.activation, cfg.norm_kind,
                         residual=cfg.residual and i > 0, bias=cfg.bias, eps=cfg.norm_eps,
                         noise=cfg.norm_noise, branch_gain=cfg.branch_gain if i > 0 else 1.0,
                         learn_branch_gain=cfg.learn_branch_gain and i > 0)
                for i in range(cfg.depth)
            )
            self.head = nn.Linear(dims[-1], cfg.d_out)
        init_weights(self, cfg.init, n_layers=cfg.depth, gain=cfg.init_gain, seed=seed)

    def structure_key(self):
        """What fixes this model's function (see ``grouped.structure``)."""
        return _structure(self)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _structure(model: nn.Module):
    """The class and the configuration without the fields that only choose initial values:
    two depthlab models with equal keys compute the same function of their parameters."""
    only_initial = {"init": "torch", "init_gain": 1.0}
    if isinstance(model.cfg, TransformerConfig):
        only_initial["embed_std"] = None
    return type(model).__name__, model.cfg.replace(**only_initial)


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


def init_weights(model: nn.Module, scheme: str, *, n_layers: int = 1, gain: float = 1.0,
                 seed: int = 0, embed_std: float | None = None) -> nn.Module:
    """Re-initialise every Linear and Embedding of ``model`` from ``seed``; returns ``model``.

    Which parameters get which scale (fan_in = input features of the layer):

    ==========  ==============================================  ==========  ===============
    scheme      Linear weight                                   Linear bias  Embedding
    ==========  ==============================================  ==========  ===============
    torch       U(±1/√fan_in)  (nn.Linear's default)            U(±1/√fan_in)  N(0, 1)
    xavier      U(±√(6/(fan_in+fan_out)))  (Glorot & Bengio)     0           N(0, 1)
    kaiming     N(0, 2/fan_in)  (He et al. 2015, for ReLU);      0           N(0, 1)
                N(0, 1/fan_in) where no ReLU follows (*)
    normal      N(0, 1)  (the naive choice of chapter 1)         0           N(0, 1)
    gpt2        N(0, 0.02²); residual outputs N(0, (0.02/√(2L))²)  0         N(0, 0.02²)
    fan_in      N(0, 1/fan_in)  (LeCun: keeps the forward variance)  0       N(0, 1)
    fan_out     N(0, 1/fan_out)  (keeps the backward variance)   0           N(0, 1)
    orthogonal  a random orthogonal matrix (Saxe et al. 2014)    0           N(0, 1)
    constant    every entry 1/fan_in (no symmetry breaking)      0           N(0, 1)
    ==========  ==============================================  ==========  ===============

    (*) Kaiming's factor 2 undoes a ReLU halving the variance, so it belongs only on a matrix
    whose output goes into one: a transformer's query/key/value and output projections, its
    second MLP matrix and its head are marked ``feeds_relu = False`` and get N(0, 1/fan_in).
    (An unmarked Linear, e.g. every layer of ``DeepMLP``, gets 2/fan_in, as PyTorch's
    ``kaiming_normal_`` with ``nonlinearity="relu"`` would give it.) Putting the factor 2 on
    every matrix of a 12-block transformer multiplies the logits' scale by about 10^5.

    Every Linear weight is then multiplied by ``gain``; ``embed_std`` overrides the embeddings'
    standard deviation (chapters 5 and 7 vary it). Norm layers keep weight 1, bias 0.
    Only the generator seeded here is used, so the caller's global RNG is untouched.
    """
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            fan_out, fan_in = w.shape
            with torch.no_grad():
                if scheme == "torch":
                    bound = 1.0 / math.sqrt(fan_in)
                    _fill(w, lambda t, b=bound: t.uniform_(-b, b, generator=g))
                    if module.bias is not None:
                        _fill(module.bias, lambda t, b=bound: t.uniform_(-b, b, generator=g))
                else:
                    if scheme == "xavier":
                        b = math.sqrt(6.0 / (fan_in + fan_out))
                        _fill(w, lambda t, b=b: t.uniform_(-b, b, generator=g))
                    elif scheme == "kaiming":
                        relu_gain = 2.0 if getattr(module, "feeds_relu", True) else 1.0
                        std = math.sqrt(relu_gain / fan_in)
                        _fill(w, lambda t, s=std: t.normal_(0.0, s, generator=g))
                    elif scheme == "normal":
                        _fill(w, lambda t: t.normal_(0.0, 1.0, generator=g))
                    elif scheme == "gpt2":
                        std = 0.02
                        if getattr(module, "is_residual_out", False):
                            std /= math.sqrt(2 * n_layers)
                        _fill(w, lambda t, s=std: t.normal_(0.0, s, generator=g))
                    elif scheme in ("fan_in", "fan_out"):
                        std = 1.0 / math.sqrt(fan_in if scheme == "fan_in" else fan_out)
                        _fill(w, lambda t, s=std: t.normal_(0.0, s, generator=g))
                    elif scheme == "orthogonal":
                        _fill(w, lambda t: nn.init.orthogonal_(t, generator=g))
                    elif scheme == "constant":
                        w.fill_(1.0 / fan_in)
                    else:
                        raise ValueError(f"unknown init scheme {scheme!r}")
                    if module.bias is not None:
                        module.bias.zero_()
                if gain != 1.0:
                    w.mul_(gain)
        elif isinstance(module, nn.Embedding):
            std = embed_std if embed_std is not None else (0.02 if scheme == "gpt2" else 1.0)
            with torch.no_grad():
                _fill(module.weight, lambda t, s=std: t.normal_(0.0, s, generator=g))
    # shaped attention starts as exactly αI whatever the scheme: its queries start at 0
    zero_queries(model, only_shaped=True)
    return model


def init_variance(scheme: str, fan_in: int, fan_out: int) -> tuple[float, float]:
    """The variance of one weight entry and of one bias entry that ``init_weights`` draws
    for a Linear layer under ``scheme``: what a mean-field prediction starts from (chapter 1).
    """
    table = {
        "torch": (1.0 / (3 * fan_in), 1.0 / (3 * fan_in)),      # U(±a) has variance a²/3
        "xavier": (2.0 / (fan_in + fan_out), 0.0),
        "kaiming": (2.0 / fan_in, 0.0),
        "normal": (1.0, 0.0),
        "gpt2": (0.02 ** 2, 0.0),
        "fan_in": (1.0 / fan_in, 0.0),
        "fan_out": (1.0 / fan_out, 0.0),
        "orthogonal": (1.0 / max(fan_in, fan_out), 0.0),        # rows or columns of norm 1
    }
    if scheme not in table:
        raise ValueError(f"no variance for init scheme {scheme!r} (constant has none)")
    return table[scheme]


def _fill(param: Tensor, sample) -> None:
    """Draw on the CPU with the seeded generator (same numbers on every device), then copy."""
    param.copy_(sample(torch.empty(param.shape, dtype=torch.float32)))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm in ``model``: depthlab's ``BatchNorm`` and PyTorch's BatchNorm1d/2d/3d."""
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
