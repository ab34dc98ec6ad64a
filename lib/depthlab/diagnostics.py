"""Diagnostics for any ``nn.Module``: per-layer gradients, activations, updates, rank collapse.

Hooks are installed by the ``record`` context manager and removed when it exits, so a model
is never left modified. "Layers" are found by ``find_layers``: the model's ``.layers`` if it has
one, otherwise its longest ``nn.ModuleList`` (e.g. ``nn.TransformerEncoder.layers``), or a list
you pass in.

Gradient norms are computed in float64: the norm of a 1e-29 gradient squares to 1e-58, below
float32's range, and would come out as exactly 0 (chapter 1).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .train import Callback, loss_and_accuracy

SaturationRule = Callable[[Tensor], Tensor]

SATURATION_RULES: dict[str, SaturationRule] = {
    # fraction of units whose local derivative is (nearly) zero
    "sigmoid": lambda h: ((h < 0.01) | (h > 0.99)).double().mean(),
    "tanh": lambda h: (h.abs() > 0.99).double().mean(),
    "relu": lambda h: (h <= 0).double().mean(),                # "dead" units
}


def find_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of ``model``, in order: ``model.layers`` or its longest ModuleList."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, (nn.ModuleList, list, tuple)) and len(layers) > 0:
        return list(layers)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of layers; "
                         "pass layers=[...] explicitly")
    return list(max(lists, key=len))


def token_similarity(h: Tensor) -> float:
    """Mean cosine similarity between the distinct token vectors of each sequence.

    h: (B, T, D). 1.0 means every position carries the same vector (rank collapse,
    Dong et al. 2021); random vectors give about 0.
    """
    if h.dim() != 3 or h.shape[1] < 2:
        raise ValueError("token_similarity expects (B, T, D) with T >= 2")
    u = torch.nn.functional.normalize(h.double(), dim=-1)      # (B, T, D)
    sims = u @ u.transpose(1, 2)                               # (B, T, T)
    T = h.shape[1]
    off_diag = sims.sum(dim=(1, 2)) - sims.diagonal(dim1=1, dim2=2).sum(-1)  # (B,)
    return (off_diag / (T * (T - 1))).mean().item()


class Recorder:
    """What ``record`` collected. Each list has one entry per layer; entries are lists over
    forward (or backward) passes. Use ``profile()`` for per-layer averages."""

    def __init__(self, n_layers: int) -> None:
        self.act_grad: list[list[Tensor]] = [[] for _ in range(n_layers)]
        self.act_mean: list[list[Tensor]] = [[] for _ in range(n_layers)]
        self.act_std: list[list[Tensor]] = [[] for _ in range(n_layers)]
        self.saturation: list[list[Tensor]] = [[] for _ in range(n_layers)]
        self.similarity: list[list[float]] = [[] for _ in range(n_layers)]
        self.samples: list[Tensor | None] = [None] * n_layers  # last output (for histograms)
        self.grad_samples: list[Tensor | None] = [None] * n_layers

    def profile(self, weight_grad_norm: Sequence[float] | None = None) -> LayerProfile:
        def avg(rows: list[list]) -> np.ndarray:
            return np.array([float(torch.stack([torch.as_tensor(v) for v in r]).double()
                                   .mean()) if r else math.nan for r in rows])
        return LayerProfile(
            act_grad_norm=avg(self.act_grad),
            weight_grad_norm=(np.array(weight_grad_norm, dtype=float)
                              if weight_grad_norm is not None
                              else np.full(len(self.act_grad), math.nan)),
            act_mean=avg(self.act_mean),
            act_std=avg(self.act_std),
            saturation=avg(self.saturation),
            token_similarity=avg(self.similarity),
        )


@contextlib.contextmanager
def record(model: nn.Module, layers: Sequence[nn.Module] | None = None, *,
           saturation: str | SaturationRule | None = None, similarity: bool = True,
           keep_samples: bool = False) -> Iterator[Recorder]:
    """Install forward hooks on each layer for the duration of the ``with`` block.

    For every forward pass the recorder stores the layer output's mean, std, saturated fraction
    (``saturation``: "sigmoid", "tanh", "relu" or a function of the output) and, for (B, T, D)
    outputs, the token similarity; on the backward pass, ‖∂loss/∂output‖ in float64.
    ``keep_samples`` keeps the last output and its gradient of each layer (for histograms).
    """
    layers = list(layers) if layers is not None else find_layers(model)
    rec = Recorder(len(layers))
    sat = SATURATION_RULES[saturation] if isinstance(saturation, str) else saturation
    handles = []

    def make_hook(i: int):
        def hook(module: nn.Module, inputs, output) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if not isinstance(out, Tensor):
                return
            with torch.no_grad():
                rec.act_mean[i].append(out.detach().double().mean())
                rec.act_std[i].append(out.detach().double().std())
                if sat is not None:
                    rec.saturation[i].append(sat(out.detach()))
                if similarity and out.dim() == 3 and out.shape[1] > 1:
                    rec.similarity[i].append(token_similarity(out.detach()))
                if keep_samples:
                    rec.samples[i] = out.detach().cpu()
            if out.requires_grad:
                def grad_hook(g: Tensor) -> None:
                    rec.act_grad[i].append(g.detach().double().norm())
                    if keep_samples:
                        rec.grad_samples[i] = g.detach().cpu()
                out.register_hook(grad_hook)
        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(make_hook(i)))
        yield rec
    finally:
        for h in handles:
            h.remove()


@dataclass
class LayerProfile:
    """Per-layer measurements, index 0 = the layer nearest the input. All arrays are (L,)."""

    act_grad_norm: np.ndarray     # ‖∂loss/∂h_l‖, the gradient reaching layer l's output
    weight_grad_norm: np.ndarray  # ‖∂loss/∂W_l‖ over all parameters of layer l
    act_mean: np.ndarray
    act_std: np.ndarray
    saturation: np.ndarray        # fraction of saturated units (NaN if no rule was given)
    token_similarity: np.ndarray  # mean cosine similarity between tokens (NaN for 2-D outputs)

    @property
    def n_layers(self) -> int:
        return len(self.act_grad_norm)

    @property
    def ratio(self) -> float:
        """First-layer / last-layer activation-gradient norm: < 1 vanishing, > 1 exploding."""
        with np.errstate(divide="ignore", invalid="ignore"):     # 0 or inf are answers too
            return float(self.act_grad_norm[0] / self.act_grad_norm[-1])

    @property
    def weight_ratio(self) -> float:
        """First-layer / last-layer weight-gradient norm."""
        return float(self.weight_grad_norm[0] / self.weight_grad_norm[-1])

    def measured_factors(self) -> np.ndarray:
        """‖∂L/∂h_{l-1}‖ / ‖∂L/∂h_l‖ for l = 1..L-1: what one layer does to the gradient."""
        return self.act_grad_norm[:-1] / self.act_grad_norm[1:]

    def per_layer_factor(self) -> float:
        """Geometric-mean change of the gradient norm per layer, going from output to input."""
        return float(self.ratio ** (1.0 / max(1, self.n_layers - 1)))

    def describe(self) -> str:
        """One sentence that says what the numbers mean."""
        L = self.n_layers
        r = self.ratio
        if math.isnan(r) or not np.isfinite(self.act_grad_norm).all():
            return (f"first/last gradient ratio {r:.2g}: gradients are not finite across {L} "
                    "layers: the forward or backward pass overflowed (exploding)")
        if r == 0:
            return (f"first/last gradient ratio 0: the gradient does not reach layer 0 at all "
                    f"(underflow or a dead path) across {L} layers")
        if math.isinf(r):
            return (f"first/last gradient ratio inf: the last of {L} layers receives no "
                    "gradient (a dead path after it)")
        if r < 1e-2:
            verdict = f"gradients vanish between layer {L - 1} and layer 0"
        elif r > 1e2:
            verdict = f"gradients explode between layer {L - 1} and layer 0"
        else:
            verdict = "gradient norms stay within two decades across the stack"
        return (f"first/last gradient ratio {r:.2g} over {L} layers "
                f"(×{self.per_layer_factor():.3g} per layer): {verdict}")


def weight_grad_norms(layers: Sequence[nn.Module], weight: str | None = None) -> list[float]:
    """‖∂loss/∂θ_l‖ over all parameters of each layer (float64), after a backward pass.

    With ``weight`` (a parameter name inside each layer, e.g. ``"mlp.fc2.weight"``), only that
    parameter: Xiong et al. (2020) track the second MLP matrix of each block (chapter 5).
    """
    out = []
    for layer in layers:
        params = ([dict(layer.named_parameters())[weight]] if weight is not None
                  else list(layer.parameters()))
        sq = [p.grad.detach().double().pow(2).sum() for p in params if p.grad is not None]
        out.append(math.sqrt(float(torch.stack(sq).sum())) if sq else math.nan)
    return out


def gradient_profile(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], *,
                     layers: Sequence[nn.Module] | None = None,
                     loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                     saturation: str | SaturationRule | None = None,
                     keep_samples: bool = False, weight: str | None = None) -> LayerProfile:
    """Forward and backward passes on ``batches``; per-layer averages of what ``record`` sees.

    ``loss_fn(output, targets)`` defaults to depthlab's cross-entropy (ignoring ``IGNORE``).
    ``weight`` restricts ``weight_grad_norm`` to one named parameter of each layer.
    Parameter gradients are cleared before and after, so the model is left as it was found.
    Returns a ``LayerProfile``; with ``keep_samples`` it also has ``.recorder`` for histograms.
    """
    layers = list(layers) if layers is not None else find_layers(model)
    loss_fn = loss_fn or (lambda out, y: loss_and_accuracy(out, y)[0])
    device = next(model.parameters()).device
    wsum = np.zeros(len(layers))
    model.zero_grad(set_to_none=True)
    with record(model, layers, saturation=saturation, keep_samples=keep_samples) as rec:
        for x, y in batches:
            loss = loss_fn(model(x.to(device)), y.to(device))
            loss.backward()
            wsum += np.array(weight_grad_norms(layers, weight))
            model.zero_grad(set_to_none=True)
    profile = rec.profile(wsum / max(1, len(batches)))
    if keep_samples:
        profile.recorder = rec  # type: ignore[attr-defined]
    return profile


def softmax_jacobian_norms(probs: Tensor) -> Tensor:
    """Spectral norm of the softmax Jacobian J = diag(p) − p pᵀ for every row p of ``probs``.

    probs: (..., T) rows summing to 1 -> (...,). The norm is at most 1/2 (two tokens sharing
    the weight equally), 0 for a one-hot row, and 1/T for a uniform row over T tokens
    (chapter 1): near-uniform attention at initialisation passes little gradient to the scores.
    """
    p = probs.double()
    jac = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)   # (..., T, T), symmetric
    return torch.linalg.eigvalsh(jac).abs().amax(dim=-1)


def _run_once(model: nn.Module, inputs: Tensor, handles: list) -> None:
    """One forward pass without gradients, then remove the hooks whatever happens."""
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()


def attention_maps(model: nn.Module, inputs: Tensor) -> list[Tensor]:
    """Attention matrices of every ``SelfAttention`` in ``model`` on one batch, in order.

    Returns a list of (B, H, T, T) tensors (detached). Works through forward pre-hooks, so the
    model runs its usual fused attention and is left unchanged.
    """
    from .models import SelfAttention

    captured: list[Tensor] = []
    modules = [m for m in model.modules() if isinstance(m, SelfAttention)]
    handles = [m.register_forward_pre_hook(
        lambda mod, args: captured.append(mod.attention_weights(args[0]).detach()))
        for m in modules]
    _run_once(model, inputs, handles)
    return captured


def predicted_gradient_factors(model: nn.Module, inputs: Tensor) -> np.ndarray:
    """The product-of-Jacobians prediction for a plain ``DeepMLP`` (no norm, no skips).

    Backpropagation through layer l multiplies the gradient by Wₗᵀ·diag(φ'(aₗ)). For weights
    with i.i.d. entries this scales a vector's norm by about ‖Wₗ‖_F/√n_out, and the diagonal
    scales it by the root mean square of φ'(aₗ) over units and examples. The prediction for
    ‖∂L/∂h_{l-1}‖ / ‖∂L/∂h_l‖ is the product of the two, for l = 1..L-1 -> (L-1,) array.
    Compare with ``LayerProfile.measured_factors()`` (chapter 1).
    """
    from .models import MLPLayer

    layers = [m for m in find_layers(model) if isinstance(m, MLPLayer)]
    if any(layer.residual or not isinstance(layer.norm, nn.Identity) for layer in layers):
        raise ValueError("the prediction is for plain MLP layers (no norm, no residual)")
    pre: list[Tensor] = []
    handles = [layer.linear.register_forward_hook(lambda m, a, out: pre.append(out.detach()))
               for layer in layers]
    _run_once(model, inputs, handles)
    factors = []
    for layer, a in list(zip(layers, pre))[1:]:
        a = a.clone().requires_grad_(True)
        (dphi,) = torch.autograd.grad(layer.act(a).sum(), a)   # φ'(a), elementwise
        w = layer.linear.weight.detach().double()
        scale = w.norm() / math.sqrt(w.shape[0])
        factors.append(float(scale * dphi.double().pow(2).mean().sqrt()))
    return np.array(factors)


def jacobian_singular_values(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Singular values of the Jacobian of ``fn`` at ``x``, computed with autograd.

    ``fn`` maps a tensor shaped like x to any tensor; the Jacobian is taken between the
    flattened input and output, so keep x small (one example: a few hundred numbers).
    Returns a float64 vector sorted in decreasing order (chapter 2).
    """
    jac = torch.autograd.functional.jacobian(fn, x.detach())      # (*out_shape, *x.shape)
    out_size = jac.numel() // x.numel()
    return torch.linalg.svdvals(jac.reshape(out_size, x.numel()).double())


@contextlib.contextmanager
def ablate(model: nn.Module, index: int, layers: Sequence[nn.Module] | None = None):
    """Delete layer ``index`` (replace it with the identity) inside a ``with`` block.

    For a residual layer this leaves only its skip connection; for a plain layer it passes its
    input straight on. The layer is put back on exit (Veit et al. 2016; chapter 2).
    """
    container = getattr(model, "layers", None) if layers is None else layers
    if not isinstance(container, nn.ModuleList):
        raise ValueError("ablate needs model.layers (an nn.ModuleList) or layers=...")
    original = container[index]
    container[index] = nn.Identity()
    try:
        yield model
    finally:
        container[index] = original


def compare_times(fns: dict[str, Callable[[], object]], repeats: int = 200,
                  rounds: int = 5, *, backward: bool = False) -> dict[str, float]:
    """Median seconds per call of each function, measured interleaved.

    Each round times ``repeats`` calls of every function in turn, so that load on the machine
    hits all of them alike; the median over ``rounds`` is returned. Compare the results as
    ratios, measured in the same run (chapter 3). With ``backward=True`` each function returns
    a tensor and the time includes ``.sum().backward()`` on it (a forward and backward pass).
    """
    import statistics
    import time

    if backward:
        fns = {name: (lambda f=fn: f().sum().backward()) for name, fn in fns.items()}

    for fn in fns.values():                                   # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            times[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def output_change(model: nn.Module, inputs: Tensor, changed: Tensor, at=0, *,
                  train_mode: bool = True) -> float:
    """Largest |Δ| in ``model(inputs)[at]`` when the inputs become ``changed``.

    A test of what an output depends on: keep the part of the input that ``at`` selects the
    same, change something else (other sequences of the batch, future tokens, padding) and see
    whether the selected outputs move. ``at`` is any index, e.g. ``0`` (the first example) or
    ``(slice(None), slice(0, 5))`` (the first 5 positions of every sequence); ``inputs`` and
    ``changed`` may differ in shape as long as ``at`` selects the same part of both. Runs in
    training mode by default, where BatchNorm uses the current batch's statistics (chapter 3);
    the model's mode is restored afterwards.
    """
    was_training = model.training
    model.train(train_mode)
    try:
        return (model(inputs)[at] - model(changed)[at]).abs().max().item()
    finally:
        model.train(was_training)


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
    from .models import BatchNorm

    g = torch.Generator().manual_seed(seed)
    bn = BatchNorm(features, momentum=momentum)
    trace = np.empty(steps)
    with torch.no_grad():
        for step in range(steps):
            bn(mean + sd * torch.randn(batch_size, features, generator=g))
            trace[step] = float(bn.running_mean[0])
    return float(bn.running_mean.std()), trace


class UpdateRatio(Callback):
    """Log10 of ‖ΔW‖ / ‖W‖ per layer and step, over the weight matrices of each layer.

    A common rule of thumb (Karpathy) puts healthy values near -3: much lower and a layer
    barely learns, much higher and it is being overwritten. Results: ``self.log10`` is a list
    of per-step arrays (L,), also returned to the loop as ``update/<l>`` extras.
    """

    def __init__(self, layers: Sequence[nn.Module] | None = None, every: int = 1) -> None:
        self._layers = list(layers) if layers is not None else None
        self.every = every
        self.steps: list[int] = []
        self.log10: list[np.ndarray] = []
        self._before: list[list[Tensor]] = []

    def _weights(self, model: nn.Module) -> list[list[Tensor]]:
        layers = self._layers if self._layers is not None else find_layers(model)
        return [[p for p in layer.parameters() if p.dim() >= 2] for layer in layers]

    def before_step(self, step: int, model: nn.Module) -> None:
        if step % self.every == 0:
            self._before = [[w.detach().clone() for w in ws] for ws in self._weights(model)]

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        if step % self.every:
            return None
        ratios = []
        for ws, olds in zip(self._weights(model), self._before):
            du = sum(float((w.detach() - o).double().pow(2).sum()) for w, o in zip(ws, olds))
            ww = sum(float(o.double().pow(2).sum()) for o in olds)
            ratios.append(0.5 * math.log10(du / ww) if du > 0 and ww > 0 else -math.inf)
        self.steps.append(step)
        self.log10.append(np.array(ratios))
        return {f"update/{i}": r for i, r in enumerate(ratios)}

    def as_array(self) -> np.ndarray:
        """(steps, L) array of log10 update-to-weight ratios."""
        return np.stack(self.log10) if self.log10 else np.zeros((0, 0))


class LayerGradNorms(Callback):
    """Records the per-layer activation-gradient norms at every step of a training run.

    ``self.history`` is a list of (L,) arrays. Cheap enough to leave on (see benchmarks/).
    """

    def __init__(self, layers: Sequence[nn.Module] | None = None) -> None:
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


# --------------------------------------------------------------------------------------------
# Internal covariate shift and smoothness during training (chapter 4). Each callback measures
# on a fixed probe batch, in training mode, inside ``probing``: the run itself is unchanged.
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def probing(model: nn.Module, seed: int = 0) -> Iterator[None]:
    """Measurement passes that leave no trace on a training run.

    Inside: training mode (BatchNorm uses batch statistics, as in training), torch's random
    generator forked and seeded with ``seed`` (so noisy layers draw the same noise in passes
    that share a seed, and the run's own draws are untouched). On exit the buffers (BatchNorm's
    running statistics), the mode and the generator are restored.
    """
    device = next(model.parameters()).device
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.train()
        try:
            yield
        finally:
            model.train(was_training)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


def _loss_grads(model: nn.Module, params: Sequence[Tensor], inputs: Tensor, targets: Tensor,
                seed: int) -> tuple[float, list[Tensor]]:
    """Loss on (inputs, targets) and its gradient with respect to ``params``, inside probing."""
    with probing(model, seed):
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


class InputDrift(Callback):
    """How the distribution of each layer's input moves during training (Ioffe & Szegedy).

    Every ``every`` steps, the probe inputs go through the model and each layer's input is
    summarised by its per-feature mean and standard deviation. ``self.mean[r][l]`` and
    ``self.std[r][l]`` are (D_l,) arrays for record r (at ``self.steps[r]``) and layer l.
    ``drift()`` turns them into one number per layer (chapter 4).
    """

    def __init__(self, probe: Tensor, layers: Sequence[nn.Module] | None = None,
                 every: int = 10) -> None:
        self.probe, self._layers, self.every = probe, layers, every
        self.steps: list[int] = []
        self.mean: list[list[np.ndarray]] = []
        self.std: list[list[np.ndarray]] = []

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        if step % self.every:
            return None
        layers = list(self._layers) if self._layers is not None else find_layers(model)
        seen: list[Tensor] = [torch.empty(0)] * len(layers)

        def keep(i: int):
            def hook(module, args):
                seen[i] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            return hook

        handles = [layer.register_forward_pre_hook(keep(i)) for i, layer in enumerate(layers)]
        with probing(model, seed=step):
            _run_once(model, self.probe.to(next(model.parameters()).device), handles)
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
    ``lr`` (layer l and later ones unchanged). Records ‖G_l − G'_l‖ / ‖G_l‖ (``relative``) and
    the cosine between them (``cosine``): how much a layer's gradient changes because the
    layers before it moved. Lists of (L,) arrays, one per record (layer 0 has no earlier layer:
    0 and 1).
    """

    def __init__(self, probe: tuple[Tensor, Tensor], lr: float,
                 layers: Sequence[nn.Module] | None = None, every: int = 10) -> None:
        self.probe, self.lr, self._layers, self.every = probe, lr, layers, every
        self.steps: list[int] = []
        self.relative: list[np.ndarray] = []
        self.cosine: list[np.ndarray] = []

    def before_step(self, step: int, model: nn.Module) -> None:
        if step % self.every:
            return
        layers = list(self._layers) if self._layers is not None else find_layers(model)
        params = [list(layer.parameters()) for layer in layers]
        device = next(model.parameters()).device
        x, y = (t.to(device) for t in self.probe)
        _, flat_grads = _loss_grads(model, [p for ps in params for p in ps], x, y, seed=step)
        grads, k = [], 0
        for ps in params:
            grads.append(flat_grads[k:k + len(ps)])
            k += len(ps)
        rel, cos = [0.0], [1.0]
        for i in range(1, len(layers)):
            earlier = [(p, g) for ps, gs in zip(params[:i], grads[:i]) for p, g in zip(ps, gs)]
            with _stepped(earlier, self.lr):
                _, moved = _loss_grads(model, params[i], x, y, seed=step)
            g0, g1 = _flat(grads[i]), _flat(moved)
            rel.append(float((g0 - g1).norm() / (g0.norm() + 1e-30)))
            cos.append(float(torch.nn.functional.cosine_similarity(g0, g1, dim=0)))
        self.steps.append(step)
        self.relative.append(np.array(rel))
        self.cosine.append(np.array(cos))


class Smoothness(Callback):
    """The loss landscape along the gradient, every ``every`` steps (Santurkar et al. 2018).

    From the current parameters θ with probe gradient g, step to θ − η·g for each step size η
    in ``step_sizes`` and record: ``loss_range``, the spread (max − min) of the loss over those
    points (how much the loss varies where an optimiser might step), and ``beta``, the largest
    ‖∇L(θ) − ∇L(θ − η·g)‖ / ‖η·g‖, an effective smoothness constant (how fast the gradient
    changes, i.e. how far the current gradient can be trusted). Lists of floats.
    """

    def __init__(self, probe: tuple[Tensor, Tensor],
                 step_sizes: Sequence[float] = (0.05, 0.1, 0.2, 0.4),
                 every: int = 10) -> None:
        self.probe, self.step_sizes, self.every = probe, tuple(step_sizes), every
        self.steps: list[int] = []
        self.loss_range: list[float] = []
        self.beta: list[float] = []

    def before_step(self, step: int, model: nn.Module) -> None:
        if step % self.every:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        device = next(model.parameters()).device
        x, y = (t.to(device) for t in self.probe)
        loss0, g0 = _loss_grads(model, params, x, y, seed=step)
        g0_flat = _flat(g0)
        losses, betas = [loss0], []
        for eta in self.step_sizes:
            with _stepped(list(zip(params, g0)), eta):
                loss_m, g_m = _loss_grads(model, params, x, y, seed=step)
            losses.append(loss_m)
            distance = eta * float(g0_flat.norm())
            betas.append(float((_flat(g_m) - g0_flat).norm()) / max(distance, 1e-30))
        self.steps.append(step)
        finite = all(math.isfinite(v) for v in losses + betas)
        self.loss_range.append(max(losses) - min(losses) if finite else math.inf)
        self.beta.append(max(betas) if finite else math.inf)


# --------------------------------------------------------------------------------------------
# Remedies under the microscope (chapter 6): memory, precision, and a one-call diagnosis.
# --------------------------------------------------------------------------------------------


def activation_memory(model: nn.Module, inputs: Tensor, targets: Tensor) -> int:
    """Bytes of activations the autograd graph keeps for the backward pass of one batch.

    Counted exactly with saved-tensor hooks: every tensor saved for backward, each storage
    once, parameters excluded. This is the memory that gradient checkpointing trades for
    recomputation (tensors saved inside a checkpointed block are recomputed in backward and
    not kept). Device-agnostic; on CUDA, ``torch.cuda.max_memory_allocated`` tells the rest.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    device = next(model.parameters()).device
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loss_and_accuracy(model(inputs.to(device)), targets.to(device))
    del loss                                                  # free the graph
    return sum(kept.values())


@dataclass
class PrecisionReport:
    """Per-layer gradients computed in reduced precision, against float32 (chapter 6)."""

    dtype: str
    loss_scale: float
    underflow: np.ndarray         # (L,) fraction of nonzero float32 gradient entries that are 0
    weight_grad_norm: np.ndarray  # (L,) gradient norm of each layer's parameters (unscaled)

    @property
    def ratio(self) -> float:
        """First-layer / last-layer weight-gradient norm (0 when the first layer underflowed)."""
        return float(self.weight_grad_norm[0] / self.weight_grad_norm[-1])


def _backward(model: nn.Module, inputs: Tensor, targets: Tensor, *,
              dtype: torch.dtype | None = None, loss_scale: float = 1.0) -> None:
    """Clear the gradients, then one forward (under autocast in ``dtype`` if given) and
    backward pass of ``loss_scale`` times depthlab's loss: the model's .grad is filled."""
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    with autocast:
        logits = model(inputs.to(device))
    loss, _ = loss_and_accuracy(logits.float(), targets.to(device))
    (loss * loss_scale).backward()


def _layer_grads(model: nn.Module, layers: Sequence[nn.Module], inputs: Tensor,
                 targets: Tensor, dtype: torch.dtype | None, loss_scale: float) -> list[Tensor]:
    _backward(model, inputs, targets, dtype=dtype, loss_scale=loss_scale)
    grads = [torch.cat([p.grad.detach().reshape(-1).double() / loss_scale
                        for p in layer.parameters() if p.grad is not None])
             for layer in layers]
    model.zero_grad(set_to_none=True)
    return grads


def gradient_precision(model: nn.Module, inputs: Tensor, targets: Tensor, dtype: torch.dtype,
                       *, loss_scale: float = 1.0,
                       layers: Sequence[nn.Module] | None = None) -> PrecisionReport:
    """Compute the gradients under autocast in ``dtype`` and compare with float32.

    float16 has 5 exponent bits: values below about 6e-8 flush to zero, so tiny (vanishing)
    gradients become exactly 0. ``loss_scale`` multiplies the loss before backward and divides
    the gradients after, as a GradScaler does, lifting small gradients into range. bfloat16
    keeps float32's exponent range and so its small gradients.
    """
    layers = list(layers) if layers is not None else find_layers(model)
    reference = _layer_grads(model, layers, inputs, targets, None, 1.0)
    reduced = _layer_grads(model, layers, inputs, targets, dtype, loss_scale)
    underflow = []
    for ref, red in zip(reference, reduced):
        nonzero = ref != 0
        lost = (red == 0) & nonzero
        underflow.append(float(lost.sum()) / max(1, int(nonzero.sum())))
    return PrecisionReport(str(dtype).replace("torch.", ""), loss_scale, np.array(underflow),
                           np.array([float(g.norm()) for g in reduced]))


def activation_saturation(model: nn.Module, inputs: Tensor,
                          layers: Sequence[nn.Module] | None = None) -> np.ndarray:
    """(L,) fraction of saturated or dead units among each layer's activation modules.

    ReLU and GELU: units that are off (output 0, or input below -3 for GELU) for *every*
    example and token of the batch: dead units, whose gradient is zero (a ReLU that is off for
    half the inputs is working normally). tanh: entries with |output| > 0.99; sigmoid: entries
    outside [0.01, 0.99]. NaN for a layer without such modules (e.g. a model that calls
    ``F.relu`` directly, which hooks cannot see).
    """
    layers = list(layers) if layers is not None else find_layers(model)
    fractions: list[list[float]] = [[] for _ in layers]
    handles = []

    def watch(i: int, module: nn.Module):
        def hook(mod, args, out):
            if isinstance(mod, (nn.ReLU, nn.GELU)):
                off = (out <= 0) if isinstance(mod, nn.ReLU) else (args[0] < -3)
                frac = off.reshape(-1, off.shape[-1]).all(dim=0).double().mean()   # dead units
            elif isinstance(mod, nn.Tanh):
                frac = SATURATION_RULES["tanh"](out)
            else:
                frac = SATURATION_RULES["sigmoid"](out)
            fractions[i].append(float(frac))
        return module.register_forward_hook(hook)

    for i, layer in enumerate(layers):
        for m in layer.modules():
            if isinstance(m, (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid)):
                handles.append(watch(i, m))
    _run_once(model, inputs.to(next(model.parameters()).device), handles)
    return np.array([float(np.mean(f)) if f else math.nan for f in fractions])


@dataclass
class Diagnosis:
    """What ``diagnose`` measured on one batch, and what it concludes. Arrays are (L,)."""

    profile: LayerProfile
    update_log10: np.ndarray      # log10 ‖ΔW‖/‖W‖ of each layer after one optimiser step
    saturation: np.ndarray        # fraction of saturated or dead units (NaN: none found)
    findings: list[str]

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
    """
    import copy

    from .config import TrainConfig
    from .train import train

    cfg = (train_cfg or TrainConfig(lr=1e-3)).replace(steps=1, progress=False)
    layers = list(layers) if layers is not None else find_layers(model)
    profile = gradient_profile(model, [batch], layers=layers)
    saturation = activation_saturation(model, batch[0], layers)

    names = {id(m): n for n, m in model.named_modules()}
    clone = copy.deepcopy(model)
    clone_modules = dict(clone.named_modules())
    watch = UpdateRatio([clone_modules[names[id(layer)]] for layer in layers])

    class _Once:
        def batch(self, step: int) -> tuple[Tensor, Tensor]:
            return batch

    train(clone, _Once(), cfg, [watch])
    update = watch.log10[0] if watch.log10 else np.full(len(layers), math.nan)
    return Diagnosis(profile, update, saturation, _findings(profile, update, saturation))


def _findings(profile: LayerProfile, update: np.ndarray, saturation: np.ndarray) -> list[str]:
    out = [profile.describe()]
    finite = update[np.isfinite(update)]
    if len(finite) and (finite.min() < -6 or finite.max() - finite.min() > 2):
        k = int(np.nanargmin(np.where(np.isfinite(update), update, np.inf)))
        out.append(f"layer {k} barely moves: one step changes its weights by "
                   f"10^{update[k]:.1f} of their norm (healthy is near 10^-3; the fastest "
                   f"layer moves 10^{finite.max():.1f})")
    if len(finite) and finite.max() > -1.5:
        k = int(np.nanargmax(np.where(np.isfinite(update), update, -np.inf)))
        out.append(f"layer {k} is being overwritten: one step changes its weights by "
                   f"10^{update[k]:.1f} of their norm")
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


def parameter_gradients(model: nn.Module, batch: tuple[Tensor, Tensor]) -> list[Tensor]:
    """The gradient of every parameter for one batch (copies; the model's .grad is cleared)."""
    _backward(model, *batch)
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def gradient_norms_by_layer(model: nn.Module, batch: tuple[Tensor, Tensor], *,
                            clip_norm: float | None = None, normalise: bool = False,
                            layers: Sequence[nn.Module] | None = None) -> np.ndarray:
    """(L,) norm of each layer's parameter gradient for one batch, in float64.

    ``clip_norm`` applies ``torch.nn.utils.clip_grad_norm_`` to all parameters first, as the
    training loop does; ``normalise`` divides the whole gradient by its global norm. Both
    multiply every layer by the same factor, which is the point of measuring them (chapter 6).
    """
    layers = list(layers) if layers is not None else find_layers(model)
    _backward(model, *batch)
    params = [p for p in model.parameters() if p.grad is not None]
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    if normalise:
        total = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params))
        for p in params:
            p.grad.div_(total.to(p.grad.dtype))
    norms = np.array(weight_grad_norms(layers))
    model.zero_grad(set_to_none=True)
    return norms
