"""Several processes started by ``torchrun``: joining them, and one run split over them.

torchrun (also under SLURM, on several nodes) starts one process per GPU or CPU slot and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``; ``init_distributed`` joins them.
Two uses, never mixed in one call (see the README's "Running at scale"):

- a sweep (``sweeps``): every rank trains its own share of the points alone;
- one ``dl.train`` outside a sweep: DistributedDataParallel over every rank, each taking its
  share of every batch (``shard``), the step being exactly the one-process step on the whole
  batch (``whole_batch_objective``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import IGNORE, DataError, log_z_squared

# True while this rank runs one of its own sweep points: dl.train must not wrap it in DDP
_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("depthlab_alone", default=False)


def init_distributed() -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes, once: (rank, world size).

    Joins with the NCCL backend where CUDA is available and gloo elsewhere, and puts each
    process on GPU ``LOCAL_RANK`` of its node. Outside torchrun (no ``WORLD_SIZE`` > 1 in the
    environment) it does nothing and returns (0, 1).
    """
    dist = torch.distributed
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
            return 0, 1
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside: this process trains its runs by itself, even under torchrun (a sweep's point)."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def data_parallel_world() -> tuple[int, int]:
    """(rank, world size) for one training run split over the processes: ``dl.train`` uses
    DistributedDataParallel when the world is larger than 1. Inside ``alone()`` (a sweep's
    point) the world is (0, 1)."""
    if _ALONE.get():
        return 0, 1
    return init_distributed()


def shard(batch: Tensor, rank: int, world: int, step: int = 0) -> Tensor:
    """Rank ``rank``'s share of a batch split over ``world`` processes: consecutive rows,
    as even as the batch size allows (``torch.tensor_split``)."""
    part = torch.tensor_split(batch, world)[rank]
    if part.shape[0] == 0:
        raise DataError(f"the batch of step {step} has {batch.shape[0]} examples, fewer than "
                         f"the {world} processes that share it: use a batch of at least {world}")
    return part


def whole_batch_objective(logits: Tensor, targets: Tensor, world: int, z_loss: float = 0.0
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(what is minimised, loss, accuracy) of one rank's share, in a run over ``world``
    processes (see ``losses.objective``).

    The loss and accuracy are those of the whole batch (summed over the ranks). What is
    minimised is this rank's summed loss over the whole batch's labelled count, times
    ``world``: DistributedDataParallel averages the ranks' gradients, so the step is exactly
    the single-process step on the whole batch, even when the ranks hold different numbers of
    labelled targets."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, C)
    flat_targets = targets.reshape(-1)                          # (N,)
    loss_sum = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, reduction="sum")
    with torch.no_grad():
        keep = flat_targets != IGNORE
        hits = ((flat_logits.argmax(-1) == flat_targets) & keep).sum()
        totals = torch.stack([loss_sum.detach(), hits.float(), keep.sum().float()])
        torch.distributed.all_reduce(totals)                   # the whole batch's sums
    count = totals[2].clamp(min=1.0)
    if z_loss:
        loss_sum = loss_sum + z_loss * log_z_squared(logits, targets)
    return loss_sum * world / count, totals[0] / count, totals[1] / count
