"""Data: synthetic sequence tasks made from a seed, text that ships with Python, scikit-learn's
digits, a covariate-shift problem and tools to reweight it (chapter 4). No downloads.

Every data source answers ``batch(step) -> (inputs, targets)`` deterministically from its seed
and the step number, so a training run is reproducible and two runs with the same seed see the
same batches in the same order. Targets use ``IGNORE = -100`` where no loss is taken.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .config import ConfigError
from .losses import IGNORE
from .seeding import default_seed

TASKS = ("sort", "reverse", "copy")


def _default_seed(obj) -> None:
    """Fill a frozen data source's ``seed=None`` from depthlab's one seed source."""
    if obj.seed is None:
        object.__setattr__(obj, "seed", default_seed())


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
    seed: int | None = None    # None = depthlab.seeding.default_seed()
    min_n: int | None = None   # variable lengths min_n..n, padded with ``pad``; None = fixed

    def __post_init__(self) -> None:
        _default_seed(self)
        if self.kind not in TASKS:
            raise ConfigError(f"SequenceTask.kind={self.kind!r} is not allowed; choose one of "
                              f"{TASKS}")
        for name, low in (("n", 1), ("vocab", 3), ("batch_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"SequenceTask.{name}={v!r} must be an integer >= {low}")
        if self.min_n is not None and (isinstance(self.min_n, bool)
                                       or not isinstance(self.min_n, int)
                                       or not 1 <= self.min_n <= self.n):
            raise ConfigError(f"SequenceTask.min_n={self.min_n!r} must be None or an integer "
                              f"in [1, n={self.n}]")

    @property
    def seq_len(self) -> int:
        return 2 * self.n

    @property
    def sep(self) -> int:
        return self.vocab - 1

    @property
    def pad(self) -> int:
        """The padding token of variable-length batches: ``vocab``, outside the task's own
        symbols (so a model needs ``vocab_size = vocab + 1``)."""
        return self.vocab

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A fresh batch drawn with ``generator``."""
        if self.min_n is not None:
            return self._sample_variable(batch_size, generator)
        x = torch.randint(0, self.vocab - 1, (batch_size, self.n), generator=generator)
        y = self._answer(x)
        sep = torch.full((batch_size, 1), self.sep)
        seq = torch.cat([x, sep, y], dim=1)                    # (B, 2n + 1)
        inputs = seq[:, :-1]                                   # (B, 2n)
        targets = seq[:, 1:].clone()                           # (B, 2n), next token
        targets[:, : self.n] = IGNORE                          # no loss on the question
        return inputs, targets

    def _answer(self, x: Tensor) -> Tensor:
        if self.kind == "sort":
            return torch.sort(x, dim=-1).values
        if self.kind == "reverse":
            return torch.flip(x, dims=[-1])
        return x

    def _sample_variable(self, batch_size: int, generator: torch.Generator):
        """Lengths drawn from min_n..n; each sequence ``x SEP y`` padded at the end with
        ``pad`` to 2n tokens (padding carries no target)."""
        lengths = torch.randint(self.min_n, self.n + 1, (batch_size,), generator=generator)
        inputs = torch.full((batch_size, 2 * self.n), self.pad)
        targets = torch.full((batch_size, 2 * self.n), IGNORE)
        symbols = torch.randint(0, self.vocab - 1, (batch_size, self.n), generator=generator)
        for i, k in enumerate(lengths.tolist()):
            x = symbols[i, :k]
            seq = torch.cat([x, torch.tensor([self.sep]), self._answer(x)])   # (2k + 1,)
            inputs[i, :2 * k] = seq[:-1]
            targets[i, k:2 * k] = seq[k + 1:]                 # the answer positions only
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
class PreviousToken:
    """Random tokens; the target at every position is the token before it (none at the first).

    Learnable by any sequence model that can attend one position back, causal (GPT-2, Llama)
    or bidirectional (BERT), and by nothing else: the tokens are uniform, so a model that
    ignores its input stays at the loss of uniform guessing, ln ``vocab``. The probe task of
    chapter 9 and of ``python -m depthlab.doctor --hf``. inputs, targets: (B, ``length``) int64.
    """

    vocab: int = 32
    length: int = 16
    batch_size: int = 16
    seed: int | None = None    # None = depthlab.seeding.default_seed()

    def __post_init__(self) -> None:
        _default_seed(self)
        for name, low in (("vocab", 2), ("length", 2), ("batch_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"PreviousToken.{name}={v!r} must be an integer >= {low}")

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A fresh batch drawn with ``generator``."""
        x = torch.randint(0, self.vocab, (batch_size, self.length), generator=generator)
        y = torch.roll(x, 1, dims=1)                           # (B, T): y[:, t] = x[:, t - 1]
        y[:, 0] = IGNORE                                       # nothing before the first
        return x, y

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The training batch of ``step`` (the same for the same seed and step)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self.sample(self.batch_size, g)

    def eval_batch(self, size: int = 256) -> tuple[Tensor, Tensor]:
        """A held-out batch, drawn from a stream no training step uses."""
        g = torch.Generator().manual_seed(-(self.seed + 1) & 0x7FFF_FFFF)
        return self.sample(size, g)


@dataclass(frozen=True)
class CharText:
    """Next-character prediction on text that ships with Python: the help topics of
    ``pydoc_data.topics`` (about 0.5 M characters; nothing downloaded). Chapter 8.

    Every batch holds ``batch_size`` windows of ``seq_len + 1`` characters at random offsets;
    inputs are the first ``seq_len``, targets the next character at every position. Characters
    outside printable ASCII map to one extra symbol, so ``vocab_size`` is 97 on any Python
    (the topics text itself differs a little between Python versions). The last 10 % of the
    text is held out for ``eval_batch``. inputs, targets: (B, seq_len) int64.
    """

    seq_len: int = 64
    batch_size: int = 8
    seed: int | None = None    # None = depthlab.seeding.default_seed()
    _codes: Tensor = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    VOCAB = 97                 # newline, the 95 printable ASCII characters, "other"

    def __post_init__(self) -> None:
        _default_seed(self)
        for name, low in (("seq_len", 1), ("batch_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"CharText.{name}={v!r} must be an integer >= {low}")
        object.__setattr__(self, "_codes", _pydoc_codes())

    def __reduce__(self):
        # rebuilt from its settings where it is unpickled: a sweep's worker sends back the
        # settings, not 0.5 M characters
        return (CharText, (self.seq_len, self.batch_size, self.seed))

    @property
    def vocab_size(self) -> int:
        return self.VOCAB

    def decode(self, ids: Sequence[int]) -> str:
        """Characters back from symbols ("\n" for 0, "?" for the catch-all 96)."""
        return "".join("\n" if i == 0 else "?" if i == 96 else chr(int(i) + 31) for i in ids)

    @property
    def _split(self) -> int:
        """Where the held-out last 10 % of the text begins."""
        return int(0.9 * len(self._codes))

    @property
    def train_codes(self) -> Tensor:
        """The training text as symbols (the first 90 %, where ``batch`` draws its windows),
        e.g. for a baseline that counts character frequencies (chapter 8's unigram level)."""
        return self._codes[: self._split]

    def _windows(self, start: int, stop: int, batch: int, g: torch.Generator):
        offsets = torch.randint(start, stop - self.seq_len - 1, (batch,), generator=g)
        idx = offsets[:, None] + torch.arange(self.seq_len + 1)            # (B, T + 1)
        chunk = self._codes[idx]
        return chunk[:, :-1].clone(), chunk[:, 1:].clone()

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The training batch of ``step``, from the first 90 % of the text."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self._windows(0, self._split, self.batch_size, g)

    def eval_batch(self, size: int = 64) -> tuple[Tensor, Tensor]:
        """A held-out batch from the last 10 % of the text."""
        g = torch.Generator().manual_seed(-(self.seed + 1) & 0x7FFF_FFFF)
        return self._windows(self._split, len(self._codes), size, g)


@dataclass(frozen=True)
class Digits:
    """scikit-learn's 8×8 digits (1,797 images, shipped with the package), standardised.

    Pixels are centred and divided by max(sd, 1) per pixel with the training split's
    statistics: four pixel columns are constant in training, and dividing by a tiny sd turns
    them into z-scores of a million (see EXPERIMENT-NOTES). Split 75/25, stratified by class.

    ``batch(step)`` walks through shuffled epochs. inputs: (B, 64) float32; targets: (B,) int64.
    """

    batch_size: int = 64
    seed: int | None = None    # shuffling order; None = depthlab.seeding.default_seed()
    _arrays: dict = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        _default_seed(self)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise ConfigError(f"Digits.batch_size={self.batch_size!r} must be an integer >= 1")
        object.__setattr__(self, "_arrays", dict(_digits_arrays()))  # own dict, shared tensors

    def __reduce__(self):
        return (Digits, (self.batch_size, self.seed))        # rebuilt, not copied (CharText)

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


# --------------------------------------------------------------------------------------------
# Covariate shift (chapter 4): p(x) changes between domains, p(y | x) does not.
# --------------------------------------------------------------------------------------------

DOMAINS = ("train", "test")


@dataclass(frozen=True)
class ShiftedGaussians:
    """A 2-D classification problem under covariate shift.

    Inputs come from an isotropic Gaussian whose mean and sd depend on the domain ("train" or
    "test"); labels come from the same rule in both domains,
    ``p(y = 1 | x) = sigmoid(sharpness · (x₂ − sin(freq · x₁)))``: a wavy boundary, so a
    linear classifier fits it well only locally and the best line depends on where p(x) puts
    its mass (Shimodaira 2000). inputs: (N, 2) float32; targets: (N,) int64.
    """

    train_mean: tuple[float, float] = (-0.6, 0.0)
    train_sd: float = 0.9
    test_mean: tuple[float, float] = (1.2, 0.0)
    test_sd: float = 0.6
    sharpness: float = 4.0
    freq: float = 1.5

    def __post_init__(self) -> None:
        for name in ("train_sd", "test_sd", "sharpness", "freq"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"ShiftedGaussians.{name}={v!r} must be a number > 0")

    def _params(self, domain: str) -> tuple[Tensor, float]:
        if domain not in DOMAINS:
            raise ValueError(f"domain={domain!r}; choose one of {DOMAINS}")
        mean = self.train_mean if domain == "train" else self.test_mean
        sd = self.train_sd if domain == "train" else self.test_sd
        return torch.tensor(mean, dtype=torch.float32), float(sd)

    def p_y1(self, x: Tensor) -> Tensor:
        """p(y = 1 | x), the same in every domain. x: (N, 2) -> (N,)."""
        return torch.sigmoid(self.sharpness * (x[:, 1] - torch.sin(self.freq * x[:, 0])))

    def inputs(self, n: int, domain: str, seed: int) -> Tensor:
        """n inputs of a domain, without labels (what a domain classifier sees). (n, 2)."""
        mean, sd = self._params(domain)
        g = torch.Generator().manual_seed(seed * 2 + DOMAINS.index(domain))
        return torch.randn(n, 2, generator=g) * sd + mean

    def sample(self, n: int, domain: str, seed: int) -> tuple[Tensor, Tensor]:
        """n labelled examples of a domain, reproducible from ``seed``."""
        x = self.inputs(n, domain, seed)
        g = torch.Generator().manual_seed(seed * 2 + DOMAINS.index(domain) + 1_000_003)
        y = (torch.rand(n, generator=g) < self.p_y1(x)).long()
        return x, y

    def log_density(self, x: Tensor, domain: str) -> Tensor:
        """log p(x) under a domain's Gaussian. x: (N, 2) -> (N,)."""
        mean, sd = self._params(domain)
        return (-((x - mean) ** 2).sum(1) / (2 * sd ** 2) - 2 * np.log(sd)
                - np.log(2 * np.pi))

    def density_ratio(self, x: Tensor) -> Tensor:
        """The true importance weight p_test(x) / p_train(x). x: (N, 2) -> (N,)."""
        return torch.exp(self.log_density(x, "test") - self.log_density(x, "train"))


@dataclass(frozen=True, eq=False)
class TensorData:
    """A data source over fixed tensors: mini-batches drawn with replacement.

    With ``weights`` (one per example), examples are drawn with probability proportional to
    their weight: importance resampling, the same expected gradient as a weighted loss, with
    the loop unchanged (chapter 4). inputs: (N, ...); targets: (N,).
    """

    inputs: Tensor
    targets: Tensor
    batch_size: int = 64
    seed: int | None = None    # None = depthlab.seeding.default_seed()
    weights: Tensor | None = None

    def __post_init__(self) -> None:
        _default_seed(self)
        if len(self.inputs) != len(self.targets):
            raise ConfigError(f"TensorData: {len(self.inputs)} inputs but "
                              f"{len(self.targets)} targets")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"TensorData.batch_size={self.batch_size!r} must be an integer "
                              ">= 1")
        if self.weights is not None and (len(self.weights) != len(self.inputs)
                                         or bool((self.weights < 0).any())
                                         or float(self.weights.sum()) <= 0):
            raise ConfigError("TensorData.weights must be one non-negative weight per example, "
                              "not all zero")

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if self.weights is None:
            idx = torch.randint(len(self.inputs), (self.batch_size,), generator=g)
        else:
            idx = torch.multinomial(self.weights.double(), self.batch_size, replacement=True,
                                    generator=g)
        return self.inputs[idx], self.targets[idx]


def quadratic_features(x: Tensor) -> np.ndarray:
    """[x, x², x_i·x_j for i < j]: with these, a logistic regression can represent the log
    density ratio of two Gaussians exactly (it is quadratic in x). x: (N, F) -> (N, F')."""
    a = x.detach().double().numpy()
    cross = [a[:, i] * a[:, j] for i in range(a.shape[1]) for j in range(i + 1, a.shape[1])]
    return np.column_stack([a, a ** 2, *cross]) if cross else np.column_stack([a, a ** 2])


def importance_weights(source: Tensor, target: Tensor, *, features=quadratic_features,
                       C: float = 10.0) -> Tensor:
    """Estimated p_target(x) / p_source(x) at each source input, from a domain classifier.

    A logistic regression learns P(target | x) from unlabelled inputs of both domains; by Bayes,
    p_target(x) / p_source(x) = (n_source / n_target) · P(target | x) / P(source | x).
    source: (N, F), target: (M, F) -> weights (N,), normalised to mean 1. (Chapter 4.)
    """
    from sklearn.linear_model import LogisticRegression  # scikit-learn: slow to import, once

    X = np.vstack([features(source), features(target)])
    domain = np.r_[np.zeros(len(source)), np.ones(len(target))]
    with warnings.catch_warnings():
        # scikit-learn 1.6 with a newer SciPy (Colab, 2026) passes an option SciPy dropped;
        # harmless, but a warning in every reader's notebook
        warnings.filterwarnings("ignore", message="Unknown solver options")
        clf = LogisticRegression(C=C, max_iter=2000).fit(X, domain)
    p = clf.predict_proba(features(source))[:, 1]
    w = (len(source) / len(target)) * p / (1 - p)
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def effective_sample_size(weights: Tensor) -> float:
    """(Σw)² / Σw²: how many equally weighted examples a weighted sample is worth."""
    w = weights.double()
    return float(w.sum() ** 2 / (w ** 2).sum())


# --------------------------------------------------------------------------------------------
# Label shift (chapter 4): p(y) changes between domains, p(x | y) does not.
# --------------------------------------------------------------------------------------------


def resample_classes(inputs: Tensor, targets: Tensor, priors: Sequence[float], n: int,
                     seed: int) -> tuple[Tensor, Tensor]:
    """``n`` examples drawn (with replacement) so that class c has probability ``priors[c]``:
    a label-shifted version of a data set, p(x | y) unchanged."""
    g = torch.Generator().manual_seed(seed)
    p = torch.as_tensor(priors, dtype=torch.float64)
    classes = torch.multinomial(p / p.sum(), n, replacement=True, generator=g)
    by_class = [torch.nonzero(targets == c).flatten() for c in range(len(p))]
    idx = torch.stack([by_class[int(c)][torch.randint(len(by_class[int(c)]), (1,),
                                                       generator=g)][0] for c in classes])
    return inputs[idx], targets[idx]


def label_shift_weights(val_predictions: Tensor, val_targets: Tensor,
                        test_predictions: Tensor, n_classes: int) -> Tensor:
    """Black-box shift estimation (Lipton et al. 2018): w_c = p_test(y=c) / p_train(y=c).

    The confusion matrix C[i, j] = P(ŷ = i, y = j) on held-out data from the training
    distribution and the distribution q[i] = P(ŷ = i) of predictions on unlabelled test data
    satisfy q = C w when only p(y) changed; w is the least-squares solution, clipped at 0.
    Predictions are class indices. Returns (n_classes,) weights."""
    C = torch.zeros(n_classes, n_classes, dtype=torch.float64)
    for i, j in zip(val_predictions.tolist(), val_targets.tolist()):
        C[i, j] += 1
    C /= len(val_targets)
    q = torch.bincount(test_predictions, minlength=n_classes).double() / len(test_predictions)
    w = torch.linalg.lstsq(C, q.unsqueeze(1)).solution.squeeze(1)
    return w.clamp(min=0.0)


@functools.lru_cache(maxsize=1)
def _pydoc_codes() -> Tensor:
    """The pydoc topics as symbols 0..96, read once per process (read-only, shared)."""
    from pydoc_data.topics import topics  # 0.5 MB of text: only when CharText is used

    text = "".join(topics[k] for k in sorted(topics))
    codes = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8).astype(np.int64)
    codes = np.where(codes == 10, 0, np.where((codes >= 32) & (codes < 127), codes - 31, 96))
    return torch.from_numpy(codes)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> dict[str, Tensor]:
    """scikit-learn's digits split and standardised once per process (read-only, shared)."""
    from sklearn.datasets import load_digits  # scikit-learn: slow to import, only
    from sklearn.model_selection import train_test_split  # when Digits is used

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    mean = Xtr.mean(0)
    sd = np.maximum(Xtr.std(0), 1.0)
    return {
        "x_train": torch.tensor((Xtr - mean) / sd, dtype=torch.float32),
        "y_train": torch.tensor(ytr, dtype=torch.int64),
        "x_test": torch.tensor((Xte - mean) / sd, dtype=torch.float32),
        "y_test": torch.tensor(yte, dtype=torch.int64),
    }
