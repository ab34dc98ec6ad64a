"""Where tensors live: choosing a device, finding a model's, and mixed precision on it.

The bottom of the library with ``losses``: everything above may import it, it imports nothing
of depthlab. Introduced in chapter 0.

``DEPTHLAB_DEVICE`` (an environment variable) overrides every run's device: the chapters train
on the CPU, where their claims were checked, and ``benchmarks/gpu_check.sh`` sets
``DEPTHLAB_DEVICE=cuda`` to run the same chapters on a GPU and compare the verdicts.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor, nn

DEVICE_ENV = "DEPTHLAB_DEVICE"


def pick_device(preference: str = "auto") -> torch.device:
    """The device a run uses: ``$DEPTHLAB_DEVICE`` if set, else ``preference``, where
    ``"auto"`` means CUDA if available, then Apple's MPS, then the CPU."""
    preference = os.environ.get(DEVICE_ENV, "").strip() or preference
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cuda_in_use() -> bool:
    """True once this process has initialised CUDA. A process forked after that cannot use
    CUDA at all ("Cannot re-initialize CUDA in forked subprocess"): ``sweeps`` then runs its
    points here instead of in forked workers."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for an empty module."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def rng_devices(device: torch.device) -> list:
    """The devices whose random state ``torch.random.fork_rng`` must save besides the CPU."""
    return [device] if device.type == "cuda" else []


def to_model(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` on the model's device, and in its floating-point dtype if ``x`` is floating point
    (so that a model converted with ``.double()`` is measured in float64 throughout)."""
    device = device_of(model)
    if x.is_floating_point():
        dtype = next((p.dtype for p in model.parameters()), x.dtype)
        return x.to(device=device, dtype=dtype)
    return x.to(device)


def resolve_amp(device: torch.device, amp: str) -> str:
    """"auto" means bf16 on CUDA and float32 elsewhere; other modes are taken as given."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "off"
    return amp


def autocast_context(device: torch.device, amp: str):
    """The autocast context for ``amp`` ("off", "bf16", "fp16" or "auto") on ``device``."""
    amp = resolve_amp(device, amp)
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
