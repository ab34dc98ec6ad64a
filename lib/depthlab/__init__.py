"""depthlab: the small PyTorch library behind the book "Deep & Stable".

Modules, each introduced in chapter 0 ("Setup and a tour of depthlab"):

- ``config``      frozen, validated dataclasses: TransformerConfig, MLPConfig, TrainConfig
- ``models``      norms, the transformer Block / Encoder / SequenceModel, DeepMLP, init_weights
- ``data``        seeded synthetic sequence tasks and scikit-learn's digits
- ``train``       the one training loop, with warm-up, clipping, autocast and divergence reports
- ``diagnostics`` per-layer gradients, activations, updates and token similarity of any module
- ``plots``       the book's figure style and plot helpers
- ``claims``      checked claims with visible verdicts and a JSON ledger
- ``explore``     interactive widgets that leave a static figure on the website
- ``reference``   layers written as tutorials write them, to compare against (chapter 2)
"""

# Modules by name (``dl.plots.figure``); ``dl.train`` is the training function, not the module.
from . import claims, config, data, diagnostics, explore, models, plots, reference
from .claims import ClaimBook, above, below, between
from .config import ConfigError, MLPConfig, TrainConfig, TransformerConfig
from .data import IGNORE, Digits, SequenceTask
from .diagnostics import (
    LayerGradNorms,
    LayerProfile,
    UpdateRatio,
    find_layers,
    gradient_profile,
    record,
    token_similarity,
)
from .models import (
    Block,
    DeepMLP,
    Encoder,
    SequenceModel,
    config_from_torch_layer,
    init_weights,
    load_torch_encoder_layer,
    torch_parity,
)
from .train import (
    Callback,
    History,
    evaluate,
    pick_device,
    recalibrate_batchnorm,
    train,
    train_and_evaluate,
)

__version__ = "0.1.0"

__all__ = [
    "claims", "config", "data", "diagnostics", "explore", "models", "plots", "reference",
    "Block", "Callback", "ClaimBook", "ConfigError", "DeepMLP", "Digits", "Encoder", "History",
    "IGNORE", "LayerGradNorms", "LayerProfile", "MLPConfig", "SequenceModel", "SequenceTask",
    "TrainConfig", "TransformerConfig", "UpdateRatio", "above", "below", "between",
    "config_from_torch_layer", "evaluate", "find_layers", "gradient_profile", "init_weights",
    "load_torch_encoder_layer", "pick_device", "recalibrate_batchnorm", "record",
    "token_similarity", "torch_parity", "train", "train_and_evaluate",
    "__version__",
]



def api_table() -> str:
    """The public API as a Markdown table: module, name, first sentence of the docstring.

    Lists every public class and function defined in each module, generated from the code so
    that the tour chapter's reference can never fall behind it.
    """
    import inspect

    rows = ["| module | name | what it is |", "|---|---|---|"]
    import importlib

    train_mod = importlib.import_module(__name__ + ".train")  # dl.train is the function
    for mod in (config, models, data, train_mod, diagnostics, plots, claims, explore,
                reference):
        short = mod.__name__.replace("depthlab.", "")
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            doc = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ")
            rows.append(f"| `{short}` | `{name}` | {doc.replace('|', '/')} |")
    return "\n".join(rows)

