"""Deprecated: the names of depthlab 0.1's ``diagnostics`` module, now split by concept.

``diagnostics`` grew chapter by chapter into six concepts in one file. Since 0.2 they live in
modules named after what they hold; this module re-exports the old names so that notebooks and
coursework written against 0.1 keep running, and will be removed in 0.3:

- ``hooks``      per-layer measurements of any module (``record``, ``gradient_profile``, ...)
- ``probes``     probes of depthlab's own models against theory (attention maps, Jacobians)
- ``callbacks``  measurements during training (``UpdateRatio``, ``InputDrift``, ...)
- ``remedies``   reduced precision and ``diagnose``
- ``timing``     ``compare_times``
"""

from __future__ import annotations

from .callbacks import GradientICS, InputDrift, LayerGradNorms, Smoothness, UpdateRatio
from .hooks import (
    SATURATION_RULES,
    LayerProfile,
    Recorder,
    ablate,
    activation_memory,
    activation_saturation,
    find_layers,
    gradient_norms_by_layer,
    gradient_profile,
    layer_grad_norms,
    output_change,
    parameter_gradients,
    probing,
    record,
    token_similarity,
    untouched,
)
from .probes import (
    attention_maps,
    jacobian_singular_values,
    predicted_gradient_factors,
    running_mean_stream,
    softmax_jacobian_norms,
)
from .remedies import Diagnosis, PrecisionReport, diagnose, gradient_precision
from .timing import compare_times

weight_grad_norms = layer_grad_norms   # the 0.1 name

__all__ = [
    "SATURATION_RULES", "Diagnosis", "GradientICS", "InputDrift", "LayerGradNorms",
    "LayerProfile", "PrecisionReport", "Recorder", "Smoothness", "UpdateRatio", "ablate",
    "activation_memory", "activation_saturation", "attention_maps", "compare_times",
    "diagnose", "find_layers", "gradient_norms_by_layer", "gradient_precision",
    "gradient_profile", "jacobian_singular_values", "layer_grad_norms", "output_change",
    "parameter_gradients", "predicted_gradient_factors", "probing", "record",
    "running_mean_stream", "softmax_jacobian_norms", "token_similarity", "untouched",
    "weight_grad_norms",
]
