"""Per-layer measurements of any ``nn.Module``: gradients, activations, rank collapse.

Nothing here knows depthlab's models: every function works on PyTorch's own
``nn.TransformerEncoder`` (or a Hugging Face model) as well as on ours. "Layers" are found by
``find_layers`` (or passed in); hooks are installed by the ``record`` context manager and
removed when it exits.

One convention for every measurement: ``f(model, batch, *, layers=None, ...)``. ``batch`` is
``(inputs, targets)``; a measurement that needs no loss also takes the inputs alone, and one
that averages over batches (``gradient_profile``) also takes a list of them. ``layers=None``
means ``find_layers(model)``; ``layer_weights`` is the one place that says which parameters
of a layer a per-layer number is about.

Every inspection leaves the model exactly as it found it: parameters, buffers (BatchNorm's
running statistics), ``.grad``, the train/eval mode of every submodule and the random state
(``untouched``). A measurement that quietly moved a BatchNorm's statistics would change the
experiment it was meant to observe.

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

from .devices import device_of, rng_devices, to_model
from .losses import log_partition, logits_of, loss_and_accuracy

SaturationRule = Callable[[Tensor], Tensor]

SATURATION_RULES: dict[str, SaturationRule] = {
    # fraction of units whose local derivative is (nearly) zero
    "sigmoid": lambda h: ((h < 0.01) | (h > 0.99)).double().mean(),
    "tanh": lambda h: (h.abs() > 0.99).double().mean(),
    "relu": lambda h: (h <= 0).double().mean(),                # "dead" units
}


# --------------------------------------------------------------------------------------------
# Which modules are "the layers", and leaving a model as it was found
# --------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a ``torch.compile`` or ``DistributedDataParallel`` wrapper.

    Hooks do not see inside a compiled graph (a profile of a compiled model came out NaN), so
    inspections run the original module, which shares the compiled one's parameters.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)              # torch.compile
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def find_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated layers (blocks) of ``model``, in order.

    ``model.layers`` if it has one; otherwise the shallowest ``nn.ModuleList`` (or
    ``nn.Sequential``) of at least two modules of one type, i.e. the stack of blocks rather
    than, say, the heads inside each block: Hugging Face's GPT-2 (``transformer.h``), BERT
    (``bert.encoder.layer``) and Llama (``model.layers``) are found this way (chapter 9).
    Raises naming the candidates when two lists are equally shallow, or when there is none:
    then pass ``layers=[...]`` yourself.
    """
    model = unwrap(model)
    layers = getattr(model, "layers", None)
    if isinstance(layers, (nn.ModuleList, nn.Sequential, list, tuple)) and len(layers) > 0:
        return list(layers)
    candidates = []
    for name, m in model.named_modules():
        if (isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2
                and len({type(child) for child in m}) == 1):
            candidates.append((name.count(".") + 1 if name else 0, name or "(the model)", m))
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no list of repeated layers: looked for "
                         "model.layers and for an nn.ModuleList or nn.Sequential of two or more "
                         "modules of one type (GPT-2's transformer.h, BERT's encoder.layer); "
                         "pass layers=[block, block, ...] explicitly")
    shallowest = min(c[0] for c in candidates)
    top = [c for c in candidates if c[0] == shallowest]
    if len(top) > 1:
        names = ", ".join(f"{n} ({len(m)} × {type(m[0]).__name__})" for _, n, m in top)
        raise ValueError(f"{type(model).__name__} has several equally shallow lists of layers: "
                         f"{names}; pass layers=... to say which to measure")
    return list(top[0][2])


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[nn.Module]:
    """Run measurements on ``model`` and leave no trace: on exit its buffers (BatchNorm's
    running statistics), every parameter's ``.grad``, the train/eval mode of every submodule
    and torch's random state (CPU and the model's CUDA device) are exactly as on entry."""
    device = device_of(model)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, None if p.grad is None else p.grad.detach().clone())
             for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    with torch.random.fork_rng(devices=rng_devices(device)):
        try:
            yield model
        finally:
            for m, mode in modes:
                m.training = mode
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for p, g in grads:
                p.grad = g


@contextlib.contextmanager
def isolated(model: nn.Module, seed: int = 0, *, train: bool = True) -> Iterator[None]:
    """Measurement passes that leave no trace on a training run.

    Inside: training mode (BatchNorm uses batch statistics, as in training) or, with
    ``train=False``, eval mode (running statistics); torch's random generator seeded with
    ``seed`` (so noisy layers draw the same noise in passes that share a seed, and the run's
    own draws are untouched). On exit everything ``untouched`` restores is restored
    (chapter 4).
    """
    with untouched(model):
        torch.manual_seed(seed)
        model.train(train)
        yield


def inputs_of(batch) -> Tensor:
    """The inputs of a batch: ``batch[0]`` of an ``(inputs, targets)`` pair, or the batch
    itself when it is a tensor of inputs."""
    return batch if isinstance(batch, Tensor) else batch[0]


def _one_or_many(batch) -> list[tuple[Tensor, Tensor]]:
    """``batch`` as a list of (inputs, targets) pairs: one pair, or a list of them."""
    if isinstance(batch, tuple) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return [batch]
    batches = list(batch)
    if not batches:
        raise ValueError("a measurement needs at least one (inputs, targets) batch")
    return batches


def run_once(model: nn.Module, inputs: Tensor, handles: list) -> None:
    """One forward pass without gradients that leaves the model untouched, then remove the
    hooks in ``handles`` whatever happens."""
    try:
        with untouched(model), torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()


def backward(model: nn.Module, batch: tuple[Tensor, Tensor], *,
             dtype: torch.dtype | None = None, loss_scale: float = 1.0) -> None:
    """Clear the gradients, then one forward (under autocast in ``dtype`` if given) and
    backward pass of ``loss_scale`` times depthlab's loss: the model's .grad is filled.
    Callers run it inside ``untouched``."""
    inputs, targets = batch
    device = device_of(model)
    model.zero_grad(set_to_none=True)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    with autocast:
        logits = logits_of(model(to_model(model, inputs)))
    loss, _ = loss_and_accuracy(logits.float(), targets.to(device))
    (loss * loss_scale).backward()


# --------------------------------------------------------------------------------------------
# Per-layer recording
# --------------------------------------------------------------------------------------------


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
    The hooks are removed on exit, also after an exception.
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
        with np.errstate(divide="ignore", invalid="ignore"):
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


def layer_weights(layer: nn.Module, weight: str | None = None) -> list[Tensor]:
    """The parameters of one layer that a per-layer measurement is about.

    ``None``: the weight matrices (every parameter with two or more axes), what an
    update-to-weight ratio or a weight norm means; biases and norm gains are left out.
    ``"all"``: every parameter. A parameter's name inside the layer (``"mlp.fc2.weight"``):
    that parameter alone (Xiong et al. track the second MLP matrix of each block).
    """
    if weight == "all":
        return list(layer.parameters())
    if weight is not None:
        named = dict(layer.named_parameters())
        if weight not in named:
            raise ValueError(f"{type(layer).__name__} has no parameter {weight!r}; it has "
                             f"{sorted(named)}")
        return [named[weight]]
    return [p for p in layer.parameters() if p.dim() >= 2]


def layer_grad_norms(layers: Sequence[nn.Module], weight: str | None = "all") -> list[float]:
    """‖∂loss/∂θ_l‖ over the parameters ``layer_weights(layer, weight)`` selects (default: all
    of them), in float64, from the current ``.grad``. NaN for a layer without gradients."""
    out = []
    for layer in layers:
        sq = [p.grad.detach().double().pow(2).sum() for p in layer_weights(layer, weight)
              if p.grad is not None]
        out.append(math.sqrt(float(torch.stack(sq).sum())) if sq else math.nan)
    return out


def gradient_profile(model: nn.Module, batch, *,
                     layers: Sequence[nn.Module] | None = None,
                     loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                     saturation: str | SaturationRule | None = None,
                     keep_samples: bool = False, weight: str | None = "all") -> LayerProfile:
    """Forward and backward passes on ``batch`` (one (inputs, targets) pair, or a list of
    them to average over); per-layer averages of what ``record`` sees (chapter 1).

    ``loss_fn(output, targets)`` defaults to depthlab's cross-entropy (ignoring ``IGNORE``).
    ``weight`` says which parameters ``weight_grad_norm`` is about (``layer_weights``;
    default all of each layer's). Runs in the model's current mode and leaves the model
    untouched (``.grad`` and BatchNorm statistics included). Returns a ``LayerProfile``; with
    ``keep_samples`` it also has ``.recorder``.
    """
    model = unwrap(model)
    batches = _one_or_many(batch)
    layers = list(layers) if layers is not None else find_layers(model)
    loss_fn = loss_fn or (lambda out, y: loss_and_accuracy(out, y)[0])
    wsum = np.zeros(len(layers))
    with untouched(model), record(model, layers, saturation=saturation,
                                  keep_samples=keep_samples) as rec:
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(logits_of(model(to_model(model, x))), to_model(model, y))
            loss.backward()
            wsum += np.array(layer_grad_norms(layers, weight))
    profile = rec.profile(wsum / len(batches))
    if keep_samples:
        profile.recorder = rec  # type: ignore[attr-defined]
    return profile


def layer_outputs(model: nn.Module, batch, *,
                  layers: Sequence[nn.Module] | None = None) -> list[Tensor]:
    """The output of each layer for one batch (detached, on the CPU), the model untouched.

    Pass ``layers=[layer.linear for layer in mlp.layers]`` for pre-activations."""
    model = unwrap(model)
    layers = list(layers) if layers is not None else find_layers(model)
    outs: list[Tensor | None] = [None] * len(layers)

    def keep(i: int):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            outs[i] = out.detach().cpu()
        return hook

    run_once(model, to_model(model, inputs_of(batch)),
             [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)])
    return outs  # type: ignore[return-value]


def distinct_values(h: Tensor) -> Tensor:
    """(units,) how many different values each unit (last axis) takes over a batch.

    A forward-collapse measure: 128 different digits should give a unit up to 128 different
    values; a unit that takes 2 cannot tell them apart (chapter 1). h: (N, units)."""
    flat = h.reshape(-1, h.shape[-1])
    return torch.tensor([len(torch.unique(flat[:, j])) for j in range(flat.shape[1])])


def input_independent_share(h: Tensor) -> float:
    """The share of a layer's power that does not depend on the input: mean over units of
    (mean over the batch)² divided by the mean of h². 0: every unit is centred over inputs;
    1: each unit takes the same value whatever the input (chapter 1). h: (N, units)."""
    flat = h.reshape(-1, h.shape[-1]).double()
    return float(flat.mean(0).pow(2).mean() / flat.pow(2).mean())


def weight_gradient_products(model: nn.Module, batch: tuple[Tensor, Tensor], *,
                             layers: Sequence[nn.Module] | None = None) -> np.ndarray:
    """(L,) ⟨∂L/∂θ_l, θ_l⟩ over each layer's parameters, in float64, the model untouched.

    For a network that is positively homogeneous in each layer's parameters (ReLU, no biases
    or zero biases), Euler's theorem makes this the same number for every layer (balancedness).
    It fixes these inner products, not the gradient norms: ‖∂L/∂W_l‖ also depends on ‖W_l‖ and
    on the angle between the gradient and the weights, which varies from layer to layer
    (chapter 1)."""
    model = unwrap(model)
    layers = list(layers) if layers is not None else find_layers(model)
    with untouched(model):
        backward(model, batch)
        return np.array([float(sum((p.grad.double() * p.detach().double()).sum()
                                   for p in layer.parameters() if p.grad is not None))
                         for layer in layers])


def gradient_norms_by_layer(model: nn.Module, batch: tuple[Tensor, Tensor], *,
                            clip_norm: float | None = None, normalise: bool = False,
                            layers: Sequence[nn.Module] | None = None) -> np.ndarray:
    """(L,) norm of each layer's parameter gradient for one batch, in float64.

    ``clip_norm`` applies ``torch.nn.utils.clip_grad_norm_`` to all parameters first, as the
    training loop does; ``normalise`` divides the whole gradient by its global norm. Both
    multiply every layer by the same factor, which is the point of measuring them (chapter 6).
    The model is left untouched.
    """
    model = unwrap(model)
    layers = list(layers) if layers is not None else find_layers(model)
    with untouched(model):
        backward(model, batch)
        params = [p for p in model.parameters() if p.grad is not None]
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        if normalise:
            total = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params))
            for p in params:
                p.grad.div_(total.to(p.grad.dtype))
        return np.array(layer_grad_norms(layers))


def parameter_gradients(model: nn.Module, batch: tuple[Tensor, Tensor]) -> list[Tensor]:
    """The gradient of every parameter for one batch (copies; the model is left untouched)."""
    model = unwrap(model)
    with untouched(model):
        backward(model, batch)
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for p in model.parameters()]


def activation_kind(module: nn.Module) -> str | None:
    """"relu", "gelu", "silu", "tanh" or "sigmoid" for an activation module, else None.

    PyTorch's own classes, and by class name those of other libraries: Hugging Face's
    ``GELUActivation``, ``NewGELUActivation`` (GPT-2), ``GELUTanh``, ``QuickGELUActivation``,
    ``SiLUActivation`` (Llama) are GELU and SiLU under other names (chapter 9)."""
    for cls, kind in ((nn.ReLU, "relu"), (nn.GELU, "gelu"), (nn.SiLU, "silu"),
                      (nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid")):
        if isinstance(module, cls):
            return kind
    name = type(module).__name__.lower()
    for part, kind in (("gelu", "gelu"), ("silu", "silu"), ("swish", "silu"), ("relu", "relu"),
                       ("tanh", "tanh"), ("sigmoid", "sigmoid")):
        if part in name and not list(module.parameters()):
            return kind
    return None


def activation_modules(layer: nn.Module) -> list[nn.Module]:
    """The activation modules inside ``layer`` (``activation_kind`` is not None), in order."""
    return [m for m in layer.modules() if activation_kind(m) is not None]


def activation_saturation(model: nn.Module, batch, *,
                          layers: Sequence[nn.Module] | None = None) -> np.ndarray:
    """(L,) fraction of saturated or dead units among each layer's activation modules.

    ReLU, GELU and SiLU: units that are off (output 0, or input below -3 for GELU and SiLU)
    for *every* example and token of the batch: dead units, whose gradient is zero (a ReLU
    that is off for half the inputs is working normally). tanh: entries with |output| > 0.99;
    sigmoid: entries outside [0.01, 0.99]. NaN for a layer without such modules (e.g. a model
    that calls ``F.relu`` directly, which hooks cannot see). Activation modules are found by
    ``activation_kind`` (Hugging Face's too). The model is left untouched.
    """
    model = unwrap(model)
    layers = list(layers) if layers is not None else find_layers(model)
    fractions: list[list[float]] = [[] for _ in layers]
    handles = []

    def watch(i: int, module: nn.Module, kind: str):
        def hook(mod, args, out):
            if kind in ("relu", "gelu", "silu"):
                off = (out <= 0) if kind == "relu" else (args[0] < -3)
                frac = off.reshape(-1, off.shape[-1]).all(dim=0).double().mean()   # dead units
            else:
                frac = SATURATION_RULES[kind](out)
            fractions[i].append(float(frac))
        return module.register_forward_hook(hook)

    for i, layer in enumerate(layers):
        for m in activation_modules(layer):
            handles.append(watch(i, m, activation_kind(m)))
    run_once(model, to_model(model, inputs_of(batch)), handles)
    return np.array([float(np.mean(f)) if f else math.nan for f in fractions])


def activation_memory(model: nn.Module, batch: tuple[Tensor, Tensor]) -> int:
    """Bytes of activations the autograd graph keeps for the backward pass of one batch.

    Counted exactly with saved-tensor hooks: every tensor saved for backward, each storage
    once, parameters excluded. This is the memory that gradient checkpointing trades for
    recomputation (tensors saved inside a checkpointed block are recomputed in backward and
    not kept). Device-agnostic; on CUDA, ``torch.cuda.max_memory_allocated`` tells the rest.
    The model is left untouched.
    """
    model = unwrap(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    inputs, targets = batch
    with untouched(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loss_and_accuracy(logits_of(model(to_model(model, inputs))),
                                    to_model(model, targets))
        del loss                                              # free the graph
    return sum(kept.values())


@torch.no_grad()
def output_change(model: nn.Module, batch, changed: Tensor, *, at=0,
                  train_mode: bool = True) -> float:
    """Largest |Δ| in ``model(inputs)[at]`` when the inputs become ``changed``.

    A test of what an output depends on: keep the part of the input that ``at`` selects the
    same, change something else (other sequences of the batch, future tokens, padding) and see
    whether the selected outputs move. ``at`` is any index, e.g. ``0`` (the first example) or
    ``(slice(None), slice(0, 5))`` (the first 5 positions of every sequence); ``inputs`` and
    ``changed`` may differ in shape as long as ``at`` selects the same part of both. Runs in
    training mode by default, where BatchNorm uses the current batch's statistics (chapter 3);
    the model (mode, running statistics, random state) is left untouched.
    """
    model = unwrap(model)
    with untouched(model):
        model.train(train_mode)
        inputs = inputs_of(batch)
        return (logits_of(model(inputs))[at] - logits_of(model(changed))[at]).abs().max().item()


@torch.no_grad()
def output_change_under_update(model: nn.Module, batch, step, *, seed: int = 0,
                               direction: Sequence[Tensor] | None = None):
    """RMS change of the model's output when every parameter moves by ±``step`` (random signs):
    the size of one Adam update of learning rate ``step``, in a random direction.

    Liu et al. (2020) show that the output change caused by such an update grows like O(N)
    with the number of blocks N in Post-LN and like O(log N) in Pre-LN ("amplification",
    chapter 5). ``direction`` (one tensor per parameter, in ``model.parameters()`` order)
    replaces the random signs: the parameters move by ``step · direction``, e.g. the update
    of one optimiser step divided by its learning rate (Adam's first step is lr·g/(|g| + ε),
    so that direction serves every learning rate; chapter 9). ``step`` may be a list: then
    the output is compared at each size, from one forward pass before, and an array comes
    back. The model is left untouched."""
    model = unwrap(model)
    g = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    if direction is not None and len(direction) != len(params):
        raise ValueError(f"direction has {len(direction)} tensors; the model has "
                         f"{len(params)} parameters")
    sizes = [float(step)] if np.ndim(step) == 0 else [float(v) for v in step]
    changes = []
    with untouched(model):
        model.eval()
        x = to_model(model, inputs_of(batch))
        before = logits_of(model(x)).double()
        saved = [p.detach().clone() for p in params]
        if direction is None:
            direction = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p.device, p.dtype)
                         for p in params]
        else:
            direction = [d.to(p.device, p.dtype) for p, d in zip(params, direction)]
        try:
            for size in sizes:
                for p, old, d in zip(params, saved, direction):
                    p.copy_(old + size * d)
                after = logits_of(model(x)).double()
                changes.append(float((after - before).pow(2).mean().sqrt()))
        finally:
            for p, old in zip(params, saved):
                p.copy_(old)
    return changes[0] if np.ndim(step) == 0 else np.array(changes)


@contextlib.contextmanager
def ablate(model: nn.Module, index: int, *, layers: Sequence[nn.Module] | None = None):
    """Delete layer ``index`` (replace it with the identity) inside a ``with`` block.

    For a residual layer this leaves only its skip connection; for a plain layer it passes its
    input straight on. The layer is put back on exit (Veit et al. 2016; chapter 2).
    """
    container = getattr(unwrap(model), "layers", None) if layers is None else layers
    if not isinstance(container, nn.ModuleList):
        raise ValueError("ablate needs model.layers (an nn.ModuleList) or layers=...")
    original = container[index]
    container[index] = nn.Identity()
    try:
        yield model
    finally:
        container[index] = original


def attention_logit_stats(model: nn.Module, batch) -> tuple[np.ndarray, np.ndarray]:
    """Per attention module of ``model``, in order: the largest |attention logit| and the mean
    entropy (nats) of the attention rows, on one batch; the model untouched.

    An attention module is any submodule with ``attention_logits(x)`` (depthlab's
    ``SelfAttention``; chapter 8). The logits are QKᵀ/√Dh over the positions a token may see;
    the entropy is that of softmax(logits) per row, ln(i + 1) at most for row i of a causal
    model and 0 for attention on a single position.
    """
    modules = [m for m in model.modules() if callable(getattr(m, "attention_logits", None))]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention module with "
                         "attention_logits(x) to measure")
    biggest, entropy = [], []

    def measure(module, args):
        logits = module.attention_logits(args[0]).detach().double()   # (B, H, T, T)
        seen = torch.isfinite(logits)
        biggest.append(float(logits.masked_fill(~seen, 0.0).abs().max()))
        p = logits.softmax(-1)
        plogp = torch.where(p > 0, p * p.log(), torch.zeros_like(p))
        entropy.append(float(-plogp.sum(-1).mean()))

    handles = [m.register_forward_pre_hook(measure) for m in modules]
    with isolated(model):
        run_once(model, to_model(model, inputs_of(batch)), handles)
    return np.array(biggest), np.array(entropy)


def attention_probabilities(model: nn.Module, batch) -> list[Tensor]:
    """The attention matrix of every attention layer, in order: (B, H, T, T) each, in
    float64 on the CPU, for one batch; the model untouched.

    depthlab's attention modules (any submodule with ``attention_weights(x)``) are read
    directly. A Hugging Face model is asked for its attentions (``output_attentions=True``),
    with the eager attention implementation switched on for the call (the fused kernels never
    form the matrix) and switched back after it. Raises ``ValueError`` saying so when neither
    works: then the attention is not readable from outside (chapter 9). Read in eval mode (no
    dropout on the probabilities); the model is left untouched.
    """
    model = unwrap(model)
    x = to_model(model, inputs_of(batch))
    own = [m for m in model.modules() if callable(getattr(m, "attention_weights", None))]
    if own:
        maps: list[Tensor] = []

        def keep(module, args):
            maps.append(module.attention_weights(args[0]).detach().double().cpu())

        with untouched(model):
            model.eval()
            run_once(model, x, [m.register_forward_pre_hook(keep) for m in own])
        return maps
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "output_attentions"):
        raise ValueError(f"{type(model).__name__} has no attention module with "
                         "attention_weights(x) and is not a Hugging Face model: its attention "
                         "is not readable")
    before = getattr(config, "_attn_implementation", None)
    switch = before != "eager" and callable(getattr(model, "set_attn_implementation", None))
    out = None
    try:
        if switch:
            model.set_attn_implementation("eager")
        with untouched(model), torch.no_grad():
            model.eval()
            out = model(x, output_attentions=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{type(model).__name__} did not return its attentions ({exc}): "
                         "its attention is not readable") from None
    finally:
        if switch:
            model.set_attn_implementation(before)
    found = getattr(out, "attentions", None)
    if not found or any(not isinstance(a, Tensor) for a in found):
        raise ValueError(f"{type(model).__name__} returned no attention matrices (its attention "
                         "implementation does not form them): not readable")
    return [a.detach().double().cpu() for a in found]


def attention_entropy(maps: Sequence[Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per attention matrix (B, H, T, T): the mean entropy of its rows in nats, and the mean
    entropy of uniform attention over the positions a row may see: ln(i + 1) for row i of a
    causal matrix (nothing above the diagonal), ln T otherwise. Their ratio is 1 for uniform
    attention and 0 for attention on one position (entropy collapse; chapter 8). Visibility
    is read from the mask's shape, not from which entries are 0: a collapsed row's
    probabilities underflow to 0 and must not shrink the reference."""
    entropy, uniform = [], []
    for a in maps:
        p = a.double()
        plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
        entropy.append(float(-plogp.sum(-1).mean()))
        T = p.shape[-1]
        causal = T > 1 and bool((p.triu(1) == 0).all())
        rows = torch.arange(1, T + 1, dtype=torch.float64) if causal else torch.full((T,), T)
        uniform.append(float(rows.double().log().mean()))
    return np.array(entropy), np.array(uniform)


def output_log_partition(model: nn.Module, batch) -> Tensor:
    """log Z of the model's output logits at every position of the batch's inputs: (B, T) in
    float64, the model untouched (``losses.log_partition``; chapter 8)."""
    with isolated(model), torch.no_grad():
        logits = logits_of(model(to_model(model, inputs_of(batch))))
    return log_partition(logits.detach().double())
