"""depthlab: the small PyTorch library behind the book "Deep & Stable".

Modules, by concept (each introduced in chapter 0, "Setup and a tour of depthlab"):

- ``seeding``    the one source of random seeds (shifted by ``DEPTHLAB_SEED_OFFSET``)
- ``config``     frozen, validated dataclasses: TransformerConfig, MLPConfig, TrainConfig
- ``models``     norms, the transformer Block / Encoder / SequenceModel, DeepMLP, init_weights
- ``interop``    loading PyTorch's ``nn.TransformerEncoderLayer`` into a Block, parity checks
- ``data``       seeded synthetic sequence tasks, scikit-learn's digits, covariate shift
- ``training``   the one training loop (``dl.train``), with warm-up, clipping, autocast
- ``ensemble``   one configuration on several seeds (``dl.train_seeds``), seed ensembles
- ``parallel``   independent runs on every core or torchrun rank (``dl.sweep``)
- ``experiments`` chapters' experiments at any scale, from the command line (torchrun)
- ``hooks``      per-layer gradients, activations and rank collapse of any module
- ``probes``     probes of depthlab's models against theory (attention, Jacobians)
- ``callbacks``  measurements during training (update ratios, input drift, smoothness)
- ``remedies``   reduced precision and ``diagnose``
- ``timing``     interleaved timing for ratios
- ``plots``      the book's figure style and plot helpers
- ``claims``     checked claims with visible verdicts and a JSON ledger
- ``explore``    interactive widgets that leave a static figure on the website
- ``reference``  layers written as tutorials write them, to compare against

``diagnostics`` is the deprecated 0.1 module that held hooks, probes, callbacks, remedies and
timing in one file; it re-exports their names until 0.3.
"""

from . import (
    callbacks,
    claims,
    config,
    data,
    diagnostics,
    ensemble,
    experiments,
    explore,
    hooks,
    interop,
    models,
    parallel,
    plots,
    probes,
    reference,
    remedies,
    seeding,
    timing,
    training,
)
from .callbacks import LayerGradNorms, UpdateRatio
from .claims import ClaimBook, above, below, between
from .config import ConfigError, MLPConfig, TrainConfig, TransformerConfig
from .data import IGNORE, CharText, Digits, SequenceTask
from .ensemble import Run, train_seeds
from .hooks import (
    LayerProfile,
    find_layers,
    gradient_profile,
    record,
    token_similarity,
)
from .interop import config_from_torch_layer, load_torch_encoder_layer, torch_parity
from .models import Block, DeepMLP, Encoder, SequenceModel, init_weights
from .parallel import sweep
from .seeding import seeds
from .training import (
    Callback,
    DataError,
    History,
    evaluate,
    pick_device,
    recalibrate_batchnorm,
    train,
    train_and_evaluate,
)

__version__ = "0.2.0.dev0"

__all__ = [
    "callbacks", "claims", "config", "data", "diagnostics", "ensemble", "experiments",
    "explore", "hooks",
    "interop", "models", "parallel", "plots", "probes", "reference", "remedies", "seeding",
    "timing", "training",
    "Block", "Callback", "CharText", "ClaimBook", "ConfigError", "DataError", "DeepMLP", "Digits",
    "Encoder", "History", "IGNORE", "LayerGradNorms", "LayerProfile", "MLPConfig",
    "SequenceModel", "SequenceTask", "TrainConfig", "TransformerConfig", "UpdateRatio", "above",
    "below", "between", "config_from_torch_layer", "evaluate", "find_layers",
    "gradient_profile", "init_weights", "load_torch_encoder_layer", "pick_device",
    "recalibrate_batchnorm", "record", "Run", "seeds", "sweep", "token_similarity",
    "torch_parity", "train", "train_and_evaluate", "train_seeds", "__version__",
]

# The modules the tour's API table lists, in reading order (diagnostics is only re-exports).
API_MODULES = ("seeding", "config", "models", "interop", "data", "training", "ensemble",
               "parallel", "experiments", "hooks", "probes", "callbacks", "remedies", "timing",
               "plots", "claims", "explore", "reference")


def api_table() -> str:
    """The public API as a Markdown table: module, name, first sentence of the docstring.

    Lists every public class and function defined in each module, generated from the code so
    that the tour chapter's reference can never fall behind it.
    """
    import importlib
    import inspect

    rows = ["| module | name | what it is |", "|---|---|---|"]
    for module_name in API_MODULES:
        mod = importlib.import_module(f"{__name__}.{module_name}")  # dl.train is the function
        short = mod.__name__.replace("depthlab.", "")
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            doc = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ")
            rows.append(f"| `{short}` | `{name}` | {doc.replace('|', '/')} |")
    return "\n".join(rows)

