"""Probes of depthlab's own models, set against theory: attention maps, the softmax Jacobian,
the product-of-Jacobians prediction, end-to-end Jacobian spectra, BatchNorm's running-mean noise,
the residual branches' share of each block's sum.

Unlike ``measure`` (which works on any module), these know what is inside a depthlab
``SelfAttention``, ``MLPLayer`` or ``BatchNorm``, or train one. Each leaves the model
untouched. Same convention as ``measure``: ``f(model, batch, *, ...)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .config import MLPConfig, TrainConfig
from .devices import to_model
from .losses import loss_and_accuracy
from .measure import (
    backward,
    find_layers,
    inputs_of,
    isolated,
    layer_outputs,
    run_once,
    untouched,
    unwrap,
)
from .models import BatchNorm, Block, MLPLayer, SelfAttention, SequenceModel, init_variance
from .training import Callback, DataSource, train


def softmax_jacobian_norms(probs: Tensor) -> Tensor:
    """Spectral norm of the softmax Jacobian J = diag(p) − p pᵀ for every row p of ``probs``.

    probs: (..., T) rows summing to 1 -> (...,). The norm is at most 1/2 (two tokens sharing
    the weight equally), 0 for a one-hot row, and 1/T for a uniform row over T tokens
    (chapter 1): near-uniform attention at initialisation passes little gradient to the scores.
    """
    p = probs.double()
    jac = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)   # (..., T, T), symmetric
    return torch.linalg.eigvalsh(jac).abs().amax(dim=-1)


def attention_maps(model: nn.Module, batch) -> list[Tensor]:
    """Attention matrices of every ``SelfAttention`` in ``model`` on one batch, in order.

    Returns a list of (B, H, T, T) tensors (detached). Works through forward pre-hooks, so the
    model runs its usual fused attention and is left unchanged.
    """
    captured: list[Tensor] = []
    modules = [m for m in model.modules() if isinstance(m, SelfAttention)]
    handles = [m.register_forward_pre_hook(
        lambda mod, args: captured.append(mod.attention_weights(args[0]).detach()))
        for m in modules]
    run_once(model, to_model(model, inputs_of(batch)), handles)
    return captured


def predicted_gradient_factors(model: nn.Module, batch) -> np.ndarray:
    """The product-of-Jacobians prediction for a plain ``DeepMLP`` (no norm, no skips).

    Backpropagation through layer l multiplies the gradient by Wₗᵀ·diag(φ'(aₗ)). For weights
    with i.i.d. entries this scales a vector's norm by about ‖Wₗ‖_F/√n_out, and the diagonal
    scales it by the root mean square of φ'(aₗ) over units and examples. The prediction for
    ‖∂L/∂h_{l-1}‖ / ‖∂L/∂h_l‖ is the product of the two, for l = 1..L-1 -> (L-1,) array.
    It uses the measured weights and pre-activations of this batch, so it tests only the
    independence assumption. Compare with ``LayerProfile.measured_factors()`` (chapter 1).
    """
    layers = [m for m in find_layers(model) if isinstance(m, MLPLayer)]
    if any(layer.residual or not isinstance(layer.norm, nn.Identity) for layer in layers):
        raise ValueError("the prediction is for plain MLP layers (no norm, no residual)")
    pre: list[Tensor] = []
    handles = [layer.linear.register_forward_hook(lambda m, a, out: pre.append(out.detach()))
               for layer in layers]
    run_once(model, to_model(model, inputs_of(batch)), handles)
    factors = []
    for layer, a in list(zip(layers, pre))[1:]:
        a = a.clone().requires_grad_(True)
        (dphi,) = torch.autograd.grad(layer.act(a).sum(), a)   # φ'(a), elementwise
        w = layer.linear.weight.detach().double()
        scale = w.norm() / math.sqrt(w.shape[0])
        factors.append(float(scale * dphi.double().pow(2).mean().sqrt()))
    return np.array(factors)


_ACTIVATIONS = {
    "relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "identity": lambda z: z,
}


def _gaussian_mean(f: Callable[[Tensor], Tensor], q: float, points: int = 40001) -> float:
    """E[f(z)] for z ~ N(0, q), on a fine grid over ±10 standard deviations (float64).

    A grid, not Gauss-Hermite quadrature: φ'(z)² of tanh or sigmoid is a bump of width ~1,
    which a few quadrature nodes spread over ±√q·13 miss entirely once q is large."""
    sd = math.sqrt(max(q, 1e-30))
    z = torch.linspace(-10 * sd, 10 * sd, points, dtype=torch.float64)
    density = torch.exp(-0.5 * (z / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    return float(torch.trapezoid(f(z) * density, z))


def mean_field_factors(cfg: MLPConfig, input_second_moment: float) -> np.ndarray:
    """The a-priori prediction of ``LayerProfile.measured_factors()`` for a plain ``DeepMLP``.

    No model is looked at: only the configuration. The variance recursion of mean-field
    theory (Poole et al. 2016; Schoenholz et al. 2017) follows the pre-activation variance
    q_l of a random network layer by layer,

        q_1 = n_0·Var(W)·m_0 + Var(b),     q_l = n_{l-1}·Var(W_l)·E[φ(z)²] + Var(b),
        z ~ N(0, q_{l-1}),

    from the input's mean square m_0, and predicts that backpropagating through layer l
    scales the gradient's norm by √(n_l·Var(W_l)·E[φ'(z)²]) with z ~ N(0, q_l). Returns the
    (L-1,) factors for layers 1..L-1. The measured-weights version of the same product is
    ``predicted_gradient_factors``.
    """
    if cfg.residual or cfg.norm_kind != "none":
        raise ValueError("the mean-field recursion here is for plain MLP layers (no norm, no "
                         "residual)")
    act = _ACTIVATIONS[cfg.activation]

    def slope_sq(z: Tensor) -> Tensor:
        z = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(act(z).sum(), z)
        return g.pow(2)

    dims = [cfg.d_in, *cfg.hidden_widths]
    gain2 = cfg.init_gain ** 2
    q, qs = None, []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        w_var, b_var = init_variance(cfg.init, fan_in, fan_out)
        second = input_second_moment if q is None else _gaussian_mean(lambda z: act(z) ** 2, q)
        q = fan_in * gain2 * w_var * second + b_var
        qs.append(q)
    factors = []
    for k in range(1, len(qs)):
        fan_in, fan_out = dims[k], dims[k + 1]
        w_var, _ = init_variance(cfg.init, fan_in, fan_out)
        # ∂L/∂h_{k-1} = W_kᵀ D_k ∂L/∂h_k, and E‖W_kᵀ v‖² = fan_out·Var(W)·‖v‖²
        chi = fan_out * gain2 * w_var * _gaussian_mean(slope_sq, qs[k])
        factors.append(np.sqrt(chi))
    return np.array(factors)


def attention_weight_gradients(model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict:
    """Norm of the gradient of each block's query, key and value weights, for one batch.

    Returns {"query": (L,), "key": (L,), "value": (L,)} arrays, float64, one entry per
    ``SelfAttention`` in order: the score path (query, key) and the value path of attention
    measured apart (chapter 1). The model is left untouched.
    """
    model = unwrap(model)
    attns = [m for m in model.modules() if isinstance(m, SelfAttention)]
    if not attns:
        raise ValueError(f"{type(model).__name__} has no depthlab SelfAttention")
    out: dict[str, list[float]] = {"query": [], "key": [], "value": []}
    with untouched(model):
        backward(model, batch)
        for a in attns:
            g = a.qkv.weight.grad.detach().double()            # (3D, D): q, k, v stacked
            for name, part in zip(out, g.chunk(3, dim=0)):
                out[name].append(float(part.norm()))
    return {k: np.array(v) for k, v in out.items()}


def attention_logit_gradients(model: nn.Module, batch: tuple[Tensor, Tensor]) -> np.ndarray:
    """RMS of the loss gradient with respect to each attention's logits, for one batch.

    Returns (L,) float64, one entry per ``SelfAttention`` in order: the root-mean-square of
    ∂L/∂z over the logits z = q·k/√Dh that a token may see (the future of a causal model
    excluded). It is what the softmax passes back towards the queries and keys: its Jacobian
    diag(p) − ppᵀ vanishes when every row of attention is one-hot, so a collapsed attention
    (Zhai et al. 2023's entropy collapse) gets almost no gradient through its logits
    (chapter 8). The forward pass runs the written-out softmax (``SelfAttention.logit_taps``),
    the same function as the fused kernel to float round-off. The model is left untouched.
    """
    model = unwrap(model)
    attns = [m for m in model.modules() if isinstance(m, SelfAttention)]
    if not attns:
        raise ValueError(f"{type(model).__name__} has no depthlab SelfAttention")
    out = []
    with untouched(model):
        for a in attns:
            a.logit_taps = []
        try:
            backward(model, batch)
            for a in attns:
                z = a.logit_taps[-1]                               # (B, H, T, T)
                seen = torch.isfinite(z.detach())
                g = z.grad.detach().double()[seen]
                out.append(float(g.pow(2).mean().sqrt()))
        finally:
            for a in attns:
                a.logit_taps = None
    return np.array(out)


def path_gradient_norms(model: nn.Module, batch: tuple[Tensor, Tensor], *,
                        samples: int = 20, seed: int = 0) -> np.ndarray:
    """Veit et al.'s measure: how much gradient flows along residual paths of each length.

    A residual ``DeepMLP`` computes h_l = h_{l-1} + F_l(h_{l-1}) for its layers 1..L-1, so the
    gradient reaching layer 0 is a sum over 2^(L-1) paths, each through the branches of one
    subset of blocks (the identity elsewhere). For each path length k, ``samples`` random
    subsets of k blocks are drawn and the loss gradient is sent back through those branches
    only (their Jacobians at this batch's activations); returns (L,) the mean norm of that
    path gradient for k = 0..L-1. Multiply by C(L-1, k) for the total flowing along all paths
    of length k (chapter 2). The model is left untouched.
    """
    from torch.func import vjp  # noqa: I001 (torch.func imports functorch: only when used)

    inputs, targets = batch
    layers = list(find_layers(model))
    if not all(isinstance(m, MLPLayer) for m in layers) or not all(
            m.residual for m in layers[1:]):
        raise ValueError("path_gradient_norms needs a residual DeepMLP")
    with untouched(model):
        h = [to_model(model, inputs)]
        with torch.no_grad():
            for layer in layers:
                h.append(layer(h[-1]))                     # h[l + 1] is layer l's output
        top = h[-1].clone().requires_grad_(True)
        loss, _ = loss_and_accuracy(model.head(top), targets.to(top.device))
        (g_top,) = torch.autograd.grad(loss, top)
        branch_vjp = []
        for k in range(1, len(layers)):
            layer = layers[k]
            _, f = vjp(lambda x, m=layer: m.branch_gain * m.branch(x), h[k])
            branch_vjp.append(f)
        n_blocks = len(branch_vjp)
        rng = np.random.default_rng(seed)
        norms = np.zeros(n_blocks + 1)
        for k in range(n_blocks + 1):
            total = 0.0
            for _ in range(samples if 0 < k < n_blocks else 1):
                chosen = set(rng.choice(n_blocks, size=k, replace=False).tolist())
                g = g_top
                for i in reversed(range(n_blocks)):
                    if i in chosen:
                        (g,) = branch_vjp[i](g)
                total += float(g.detach().double().norm())
            norms[k] = total / (samples if 0 < k < n_blocks else 1)
    return norms


def jacobian_singular_values(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Singular values of the Jacobian of ``fn`` at ``x``, computed with autograd.

    ``fn`` maps a tensor shaped like x to any tensor; the Jacobian is taken between the
    flattened input and output, so keep x small (one example: a few hundred numbers).
    Returns a float64 vector sorted in decreasing order (chapter 2).
    """
    jac = torch.autograd.functional.jacobian(fn, x.detach())      # (*out_shape, *x.shape)
    out_size = jac.numel() // x.numel()
    return torch.linalg.svdvals(jac.reshape(out_size, x.numel()).double())


def running_mean_stream(momentum: float, batch_size: int, *, mean: float = 0.0,
                        sd: float = 1.0, features: int = 512, steps: int = 600,
                        seed: int = 0) -> tuple[float, np.ndarray]:
    """How noisy BatchNorm's running mean is: feed a fresh ``BatchNorm`` a stream of batches.

    Each of ``steps`` batches is (batch_size, features) of independent N(mean, sd²) values.
    Returns the standard deviation of the final running mean across the ``features``
    (independent copies of the same process) and the trace (steps,) of feature 0's running
    mean. Run for more than about 5/momentum steps, the spread is the stationary one
    (chapter 3).
    """
    g = torch.Generator().manual_seed(seed)
    bn = BatchNorm(features, momentum=momentum)
    trace = np.empty(steps)
    with torch.no_grad():
        for step in range(steps):
            bn(mean + sd * torch.randn(batch_size, features, generator=g))
            trace[step] = float(bn.running_mean[0])
    return float(bn.running_mean.std()), trace


def residual_dependence(model: nn.Module, batch) -> np.ndarray:
    """How much each sub-layer's output depends on its residual branch: Var(β·F) / Var(α·x + β·F)
    for the attention and the MLP sub-layer of every depthlab ``Block`` (Liu et al. 2020's
    dependence on the residual branch; chapter 5), on one batch.

    x is the sub-layer's skip input and F its branch output, both as the block computes them:
    in Post-LN the sum is what the norm after the add receives, in Pre-LN it is the stream
    itself. Variances over every entry of the batch. Liu et al. show that Post-LN's sub-layers
    depend on their branches about equally at every depth, while Pre-LN's dependence falls
    like 1/l with the block index l, as its stream accumulates the branches before it.
    Returns an array (blocks, 2): column 0 attention, column 1 MLP. The model is untouched.
    """
    model = unwrap(model)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no depthlab Block")
    seen: dict[tuple[int, str], Tensor] = {}

    def output(i: int, name: str):
        def hook(module, args, out):
            seen[(i, name)] = out.detach()
        return hook

    def given(i: int, name: str):
        def hook(module, args):
            seen[(i, name)] = args[0].detach()
        return hook

    handles = []
    for i, b in enumerate(blocks):
        c = b.cfg
        if c.parallel or c.norm_placement not in ("pre", "post"):
            raise ValueError(f"block {i}: residual_dependence needs a sequential Pre-LN or "
                             f"Post-LN block (norm_placement={c.norm_placement!r}, "
                             f"parallel={c.parallel})")
        handles += [b.attn.register_forward_hook(output(i, "F1")),
                    b.mlp.register_forward_hook(output(i, "F2"))]
        if c.norm_placement == "post":          # the sums are what the norms receive
            handles += [b.norm1.register_forward_pre_hook(given(i, "sum1")),
                        b.norm2.register_forward_pre_hook(given(i, "sum2"))]
        else:                                   # the sums are the stream after each add
            handles += [b.norm2.register_forward_pre_hook(given(i, "sum1")),
                        b.register_forward_hook(output(i, "sum2"))]
    run_once(model, to_model(model, inputs_of(batch)), handles)
    out = np.zeros((len(blocks), 2))
    for i, b in enumerate(blocks):
        for k, beta in enumerate((b.cfg.beta_sa, b.cfg.beta_ff)):
            branch = beta * seen[(i, f"F{k + 1}")].double()
            out[i, k] = float(branch.var() / seen[(i, f"sum{k + 1}")].double().var())
    return out


def branch_after_one_step(weight: Tensor, beta: float, lr: float, optimizer: str = "sgd", *,
                          seed: int = 0, eps: float = 0.0) -> Tensor:
    """The output of a residual branch ``y = x + beta·W x`` after one optimiser step on W.

    He & Hofmann's appendix A (chapter 7): a branch down-weighted by β and trained at learning
    rate η moves exactly like the full branch ``y = x + V x``, started at ``V = β·W``, trained
    at β²η with SGD (the gradient with respect to V is the one with respect to W over β, and
    the step on W counts β times in the output), or at βη with Adam, whose first step does not
    depend on the gradient's scale (exactly so with ``eps=0``, Adam's ε here; PyTorch's default
    1e-8 breaks it by a relative ε/|g|). Compare two calls to see it: a squared-error loss
    against a random target on a random probe batch, both drawn from ``seed``. weight: (D, D);
    returns the output on the probe after the step, (32, D).
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer={optimizer!r}; choose 'sgd' or 'adam'")
    d = weight.shape[-1]
    g = torch.Generator().manual_seed(seed)
    x, target = torch.randn(32, d, generator=g), torch.randn(32, d, generator=g)
    w = nn.Parameter(weight.detach().clone())
    opt = (torch.optim.SGD([w], lr=lr) if optimizer == "sgd"
           else torch.optim.Adam([w], lr=lr, eps=eps))
    (x + beta * x @ w.T - target).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        return x + beta * x @ w.T


def hidden_update_size(cfg, data, lr: float, *, seed: int = 0, block: int = 0) -> float:
    """How much one Adam step at ``lr`` moves the output of block ``block``'s first MLP
    matrix, relative to its size: ‖ΔW₁ h‖ / ‖W₁ h‖ on the step's own batch (chapter 8).

    ``cfg`` is a ``TransformerConfig`` (μP when ``mup_base_width`` is set), ``data`` a data
    source. The model is built from ``seed`` and trained one step with depthlab's loop. Under
    Adam the standard parametrisation makes this grow about linearly with the width; μP keeps
    it the same at every width (Yang et al. 2022), which is μP's defining property.
    """
    model = SequenceModel(cfg, seed=seed)
    fc1 = model.layers[block].mlp.fc1
    seen: list[Tensor] = []
    handle = fc1.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(data.batch(0)[0])
        h = seen[-1]
        with torch.no_grad():
            before = fc1(h)
        train(model, data, TrainConfig(steps=1, lr=lr, progress=False, seed=seed))
    finally:
        handle.remove()
    with torch.no_grad():
        after = fc1(h)
    return float((after - before).norm() / before.norm())


@dataclass
class CoordinateCheck:
    """What ``coordinate_check`` measured. Arrays: (widths, steps + 1, ...), index t = after t
    optimiser steps (t = 0: at initialisation)."""

    widths: list[int]
    names: list[str]           # the layers measured, input side first, then "logits"
    rms: np.ndarray            # (widths, steps + 1, layers + 1): RMS of each layer's output
    logit_change: np.ndarray   # (widths, steps + 1): RMS of logits(t) − logits(0)

    def slope(self, values: np.ndarray) -> float:
        """The log-log slope of ``values`` (one per width) against the width: 0 when the
        quantity does not depend on the width, 1 when it grows in proportion to it."""
        return float(np.polyfit(np.log(self.widths), np.log(values), 1)[0])

    def slopes(self, step: int = -1) -> dict[str, float]:
        """The slope against width of every layer's output RMS and of the logits' change,
        after ``step`` steps (default: the last)."""
        out = {name: self.slope(self.rms[:, step, i]) for i, name in enumerate(self.names)}
        out["logit change"] = self.slope(self.logit_change[:, step])
        return out


class _Coordinates(Callback):
    """Records every layer's output RMS and the logits on a fixed batch after every step."""

    groupable = True

    def __init__(self, probe: Tensor) -> None:
        super().__init__()
        self.probe = probe
        self.rms: list[list[float]] = []
        self.logits: list[Tensor] = []

    def _record(self, model: nn.Module) -> None:
        outs = layer_outputs(model, self.probe)
        with isolated(model), torch.no_grad():
            logits = model(to_model(model, self.probe)).detach().double().cpu()
        self.rms.append([float(h.double().pow(2).mean().sqrt()) for h in outs]
                        + [float(logits.pow(2).mean().sqrt())])
        self.logits.append(logits)

    def on_train_start(self, model: nn.Module) -> None:
        self._record(model)

    def after_step(self, step: int, model: nn.Module) -> None:
        self._record(model)


def coordinate_check(build: Callable[[int], nn.Module], widths: Sequence[int],
                     data: DataSource, cfg: TrainConfig, *,
                     train_only: str | None = None) -> CoordinateCheck:
    """μP's coordinate check (Yang et al. 2022; the ``mup`` package's ``get_coord_data``):
    does one training step change each layer by the same amount at every width?

    For each width, ``build(width)`` is trained for ``cfg.steps`` steps on ``data`` (Adam,
    say, at a fixed learning rate), and after every step the RMS of every layer's output
    (``find_layers``) and of the logits, and the RMS change of the logits since
    initialisation, are measured on a fixed batch. Under μP, with weights of variance
    1/fan_in, none of them grows or shrinks with the width (a log-log slope near 0); in the
    standard parametrisation the updates grow with it (chapter 8). ``train_only`` trains only
    the parameters whose name starts with it (``"head"``: the readout alone), the others
    frozen. The models are built and trained here; nothing of the caller's is changed.
    """
    probe = inputs_of(data.batch(10_000))
    rms, change, names = [], [], []
    for width in widths:
        model = build(width)
        if train_only is not None:
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith(train_only))
        watch = _Coordinates(probe)
        train(model, data, cfg.replace(progress=False), [watch])
        names = [f"layer {i}" for i in range(len(find_layers(model)))] + ["logits"]
        rms.append(watch.rms)
        change.append([float((z - watch.logits[0]).pow(2).mean().sqrt())
                       for z in watch.logits])
    return CoordinateCheck(list(widths), names, np.array(rms), np.array(change))
