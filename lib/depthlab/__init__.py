"""depthlab: the small PyTorch library behind the book "Deep & Stable".

Its modules, one concept each, are listed in ``LAYERS`` below, bottom layer first: a module
imports only from layers below its own (``tests/test_layering.py`` checks every import,
transitively). The tour (chapter 0) prints the public API as a table from the code itself
(``api_table``), and the README's "Layout" section describes each module.

The names below are the ones a chapter uses most (``dl.train``, ``dl.SequenceModel``, ...);
everything else is reached through its module (``dl.measure.layer_outputs``).
"""

from __future__ import annotations

import importlib

# The modules by layer, bottom first. The one list of them: the imports below, __all__, the
# tour's API table and the layering test all read it.
LAYERS: tuple[tuple[str, ...], ...] = (
    # foundations: nothing of depthlab
    ("seeding", "devices", "losses", "timing", "plots", "explore"),
    # settings, verdicts and numbers from finished runs
    ("config", "claims", "analysis"),
    # what is trained on what; processes; measurements of any nn.Module
    ("models", "data", "distributed", "measure"),
    # PyTorch's own layers side by side with ours; many models stacked as one
    ("interop", "grouped"),
    # the training loop; tutorial-style layers to compare against
    ("training", "reference"),
    # what watches, probes and spreads training
    ("callbacks", "probes", "precision", "sweeps"),
    # tools built on all of the above
    ("doctor", "experiments"),
)
MODULES: tuple[str, ...] = tuple(name for layer in LAYERS for name in layer)

for _name in MODULES:                          # binds depthlab.<name> for every module
    importlib.import_module(f".{_name}", __name__)

from .callbacks import LayerGradNorms, UpdateRatio  # noqa: E402
from .claims import ClaimBook, above, below, between  # noqa: E402
from .config import ConfigError, MLPConfig, TrainConfig, TransformerConfig  # noqa: E402
from .data import CharText, Digits, SequenceTask  # noqa: E402
from .devices import pick_device  # noqa: E402
from .interop import config_from_torch_layer, load_torch_encoder_layer, torch_parity  # noqa: E402
from .losses import IGNORE, DataError  # noqa: E402
from .measure import LayerProfile, find_layers, gradient_profile, record, token_similarity  # noqa: E402
from .models import Block, DeepMLP, Encoder, SequenceModel, init_weights  # noqa: E402
from .seeding import seeds  # noqa: E402
from .sweeps import Run, sweep, train_grid  # noqa: E402
from .training import (  # noqa: E402
    Callback,
    History,
    evaluate,
    train,
    train_and_evaluate,
    train_group,
)

__version__ = "0.3.0"

__all__ = [
    *MODULES,
    "Block", "Callback", "CharText", "ClaimBook", "ConfigError", "DataError", "DeepMLP",
    "Digits", "Encoder", "History", "IGNORE", "LayerGradNorms", "LayerProfile", "MLPConfig",
    "Run", "SequenceModel", "SequenceTask", "TrainConfig", "TransformerConfig", "UpdateRatio",
    "above", "below", "between", "config_from_torch_layer", "evaluate",
    "find_layers", "gradient_profile", "init_weights", "load_torch_encoder_layer",
    "pick_device", "record", "seeds", "sweep", "token_similarity", "torch_parity", "train",
    "train_and_evaluate", "train_grid", "train_group", "__version__",
]


def api_table() -> str:
    """The public API as a Markdown table: module, name, first sentence of the docstring.

    Lists every public class and function defined in each module, in the order of
    ``LAYERS``, generated from the code so that the tour chapter's reference can never fall
    behind it.
    """
    import inspect

    rows = ["| module | name | what it is |", "|---|---|---|"]
    for module_name in MODULES:
        mod = importlib.import_module(f"{__name__}.{module_name}")
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            doc = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ")
            rows.append(f"| `{module_name}` | `{name}` | {doc.replace('|', '/')} |")
    return "\n".join(rows)


def module_table() -> str:
    """The modules as a Markdown table, by layer (bottom first), each with the first sentence
    of its docstring: what the module holds, written once, in the module itself."""
    rows = ["| layer | module | what it holds |", "|---|---|---|"]
    for i, layer in enumerate(LAYERS):
        for name in layer:
            doc = (importlib.import_module(f"{__name__}.{name}").__doc__ or "").strip()
            first = doc.split("\n\n")[0].replace("\n", " ")
            rows.append(f"| {i} | `{name}` | {first.replace('|', '/')} |")
    return "\n".join(rows)
