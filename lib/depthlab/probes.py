"""Probes of depthlab's own models, set against theory: attention maps, the softmax Jacobian,
the product-of-Jacobians prediction, end-to-end Jacobian spectra, BatchNorm's running-mean noise.

Unlike ``hooks`` (which works on any module), these know what is inside a depthlab
``SelfAttention``, ``MLPLayer`` or ``BatchNorm``. Each leaves the model untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .hooks import find_layers, run_once
from .models import BatchNorm, MLPLayer, SelfAttention


def softmax_jacobian_norms(probs: Tensor) -> Tensor:
    """Spectral norm of the softmax Jacobian J = diag(p) − p pᵀ for every row p of ``probs``.

    probs: (..., T) rows summing to 1 -> (...,). The norm is at most 1/2 (two tokens sharing
    the weight equally), 0 for a one-hot row, and 1/T for a uniform row over T tokens
    (chapter 1): near-uniform attention at initialisation passes little gradient to the scores.
    """
    p = probs.double()
    jac = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)   # (..., T, T), symmetric
    return torch.linalg.eigvalsh(jac).abs().amax(dim=-1)


def attention_maps(model: nn.Module, inputs: Tensor) -> list[Tensor]:
    """Attention matrices of every ``SelfAttention`` in ``model`` on one batch, in order.

    Returns a list of (B, H, T, T) tensors (detached). Works through forward pre-hooks, so the
    model runs its usual fused attention and is left unchanged.
    """
    captured: list[Tensor] = []
    modules = [m for m in model.modules() if isinstance(m, SelfAttention)]
    handles = [m.register_forward_pre_hook(
        lambda mod, args: captured.append(mod.attention_weights(args[0]).detach()))
        for m in modules]
    run_once(model, inputs, handles)
    return captured


def predicted_gradient_factors(model: nn.Module, inputs: Tensor) -> np.ndarray:
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
    run_once(model, inputs, handles)
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
