"""Data: synthetic sequence tasks made from a seed, and scikit-learn's digits. No downloads.

Every data source answers ``batch(step) -> (inputs, targets)`` deterministically from its seed
and the step number, so a training run is reproducible and two runs with the same seed see the
same batches in the same order. Targets use ``IGNORE = -100`` where no loss is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

IGNORE = -100  # target value that the loss and accuracy skip (PyTorch's ignore_index)
TASKS = ("sort", "reverse", "copy")


@dataclass(frozen=True)
class SequenceTask:
    """``x1..xn SEP y1..yn`` with y = sorted(x), reversed(x) or x, for a causal model.

    Inputs are the first 2n tokens, targets the next-token labels; only the n answer positions
    carry a label, the rest are ``IGNORE``. Symbols are 0..vocab-2; ``SEP = vocab - 1``.
    Uniform guessing gives loss ln(vocab - 1) and accuracy 1/(vocab - 1) on the answers.

    inputs: (B, 2n) int64; targets: (B, 2n) int64.
    """

    kind: str = "sort"         # "sort", "reverse" or "copy"
    n: int = 6                 # sequence length to transform
    vocab: int = 16            # vocabulary including the separator token
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        from .config import ConfigError
        if self.kind not in TASKS:
            raise ConfigError(f"SequenceTask.kind={self.kind!r} is not allowed; choose one of "
                              f"{TASKS}")
        for name, low in (("n", 1), ("vocab", 3), ("batch_size", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < low:
                raise ConfigError(f"SequenceTask.{name}={v!r} must be an integer >= {low}")

    @property
    def seq_len(self) -> int:
        return 2 * self.n

    @property
    def sep(self) -> int:
        return self.vocab - 1

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A fresh batch drawn with ``generator``."""
        x = torch.randint(0, self.vocab - 1, (batch_size, self.n), generator=generator)
        if self.kind == "sort":
            y = torch.sort(x, dim=1).values
        elif self.kind == "reverse":
            y = torch.flip(x, dims=[1])
        else:
            y = x
        sep = torch.full((batch_size, 1), self.sep)
        seq = torch.cat([x, sep, y], dim=1)                    # (B, 2n + 1)
        inputs = seq[:, :-1]                                   # (B, 2n)
        targets = seq[:, 1:].clone()                           # (B, 2n), next token
        targets[:, : self.n] = IGNORE                          # no loss on the question
        return inputs, targets

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The training batch of ``step`` (the same for the same seed and step)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self.sample(self.batch_size, g)

    def eval_batch(self, size: int = 512) -> tuple[Tensor, Tensor]:
        """A held-out batch, drawn from a stream no training step uses."""
        g = torch.Generator().manual_seed(-(self.seed + 1) & 0x7FFF_FFFF)
        return self.sample(size, g)


@dataclass(frozen=True)
class Digits:
    """scikit-learn's 8×8 digits (1,797 images, shipped with the package), standardised.

    Pixels are centred and divided by max(sd, 1) per pixel with the training split's
    statistics: four pixel columns are constant in training, and dividing by a tiny sd turns
    them into z-scores of a million (see EXPERIMENT-NOTES). Split 75/25, stratified by class.

    ``batch(step)`` walks through shuffled epochs. inputs: (B, 64) float32; targets: (B,) int64.
    """

    batch_size: int = 64
    seed: int = 0
    _arrays: dict = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        from .config import ConfigError
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"Digits.batch_size={self.batch_size!r} must be an integer >= 1")
        X, y = load_digits(return_X_y=True)
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
        mean = Xtr.mean(0)
        sd = np.maximum(Xtr.std(0), 1.0)
        arrays = {
            "x_train": torch.tensor((Xtr - mean) / sd, dtype=torch.float32),
            "y_train": torch.tensor(ytr, dtype=torch.int64),
            "x_test": torch.tensor((Xte - mean) / sd, dtype=torch.float32),
            "y_test": torch.tensor(yte, dtype=torch.int64),
        }
        object.__setattr__(self, "_arrays", arrays)

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self._arrays["x_train"], self._arrays["y_train"]

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        return self._arrays["x_test"], self._arrays["y_test"]

    @property
    def steps_per_epoch(self) -> int:
        n = len(self._arrays["y_train"])
        return n // self.batch_size                            # drop the last partial batch

    def steps(self, epochs: int) -> int:
        return epochs * self.steps_per_epoch

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self._arrays["y_train"]), generator=g)
        idx = order[i * self.batch_size:(i + 1) * self.batch_size]
        return self._arrays["x_train"][idx], self._arrays["y_train"][idx]

    def eval_batch(self, size: int | None = None) -> tuple[Tensor, Tensor]:
        x, y = self.test
        return (x, y) if size is None else (x[:size], y[:size])
