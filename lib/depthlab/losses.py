"""The loss every run minimises and reports, and the softmax's normaliser log Z.

Cross-entropy over the last axis of the logits, skipping targets equal to ``IGNORE``; the
z-loss of PaLM on top when asked for. The bottom of the library with ``devices``: training,
measurements and callbacks all compute the loss here, so a measurement and the run it watches
can never disagree on what "the loss" is. Introduced in chapter 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # target value that the loss and accuracy skip (PyTorch's ignore_index)


def logits_of(output) -> Tensor:
    """The logits in a model's output: the output itself when it is a tensor, its ``.logits``
    (a Hugging Face ``ModelOutput``), or the first element of a tuple. Lets the loss, the loop
    and every measurement take a Hugging Face model as it is (chapter 9)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"the model returned {type(output).__name__}, which holds no logits: "
                    "return a tensor, a tuple whose first element is the logits, or an object "
                    "with .logits")


class DataError(ValueError):
    """A batch the loss cannot be computed on: empty, every target ``IGNORE``, or too small to
    give every process a share."""


def loss_and_accuracy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy and accuracy over positions whose target is not ``IGNORE``.

    logits: (..., C); targets: (...). Returns two scalars (accuracy is detached). With no
    labelled position both are NaN; the training loop refuses such batches before they get
    here.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, C)
    flat_targets = targets.reshape(-1)                          # (N,)
    loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE)
    with torch.no_grad():
        keep = flat_targets != IGNORE
        hits = (flat_logits.argmax(-1) == flat_targets) & keep
        acc = hits.sum() / keep.sum()
    return loss, acc


def log_partition(logits: Tensor) -> Tensor:
    """log Z = logsumexp over the last axis of the logits, at every position: (...).

    A softmax is unchanged when all logits shift together, so nothing in the cross-entropy
    holds log Z in place; Chowdhery et al. (2022) saw it drift far from 0 late in long runs and
    added the z-loss, 1e-4·(log Z)², to pull it back (chapter 8)."""
    return torch.logsumexp(logits.float(), dim=-1)


def log_z_squared(logits: Tensor, targets: Tensor) -> Tensor:
    """Σ (log Z)² over the positions whose target is not ``IGNORE``: the z-loss's sum."""
    keep = (targets != IGNORE).to(torch.float32)    # a mask, not an index, so that vmap and
    return (log_partition(logits) ** 2 * keep).sum()  # several models at once can batch it


def objective(logits: Tensor, targets: Tensor, z_loss: float | Tensor = 0.0
              ) -> tuple[Tensor, Tensor, Tensor]:
    """(what is minimised, cross-entropy, accuracy) of one batch: the cross-entropy plus
    ``z_loss`` × the mean (log Z)² over the labelled positions. A run's History records the
    cross-entropy alone, so runs with and without a z-loss are compared on the same loss.
    ``z_loss`` may be a 0-d tensor (each member of a group of runs has its own)."""
    loss, acc = loss_and_accuracy(logits, targets)
    if isinstance(z_loss, float) and not z_loss:
        return loss, loss, acc
    count = (targets != IGNORE).sum().clamp(min=1)
    return loss + z_loss * log_z_squared(logits, targets) / count, loss, acc
