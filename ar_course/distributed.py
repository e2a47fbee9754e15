"""Data-parallel training helpers: the same trainer runs alone or under ``torchrun``.

``torchrun --nproc_per_node=2 -m ar_course train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
:func:`init_distributed` then joins the process group (NCCL on GPUs, gloo on CPU). Each process reads its
own contiguous slice of every global batch (:func:`shard_batch`, the role a distributed sampler plays for a
dataset), :class:`torch.nn.parallel.DistributedDataParallel` averages the gradients, and only rank 0 logs
and writes checkpoints (:func:`is_main_process`); :func:`close_distributed` leaves the group at the end.
With equal slices, the averaged gradient equals the gradient of the mean loss over the global batch, so N
processes train exactly like one process on the same global batch (up to floating-point reduction order).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that logs and saves."""
    return rank() == 0


def init_distributed() -> bool:
    """Join the process group when launched by ``torchrun`` with ``WORLD_SIZE > 1``; return whether it did.

    Uses NCCL when CUDA is available (and pins ``LOCAL_RANK``'s GPU), else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def close_distributed() -> None:
    """Leave the process group joined by :func:`init_distributed` (a no-op when none is initialised).

    Call it before the process exits: a gloo process group still alive at interpreter shutdown can abort
    the process (SIGABRT) while its worker threads release their last tensors."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_batch(batch: Any) -> Any:
    """This process's contiguous slice of a global batch (tensors sliced along dim 0; tuples/lists/dicts
    recursively; other values unchanged). The batch size must divide by the world size."""
    w = world_size()
    if w == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        n = batch.shape[0]
        if n % w:
            raise ValueError(f"global batch size {n} is not divisible by the world size {w}")
        per = n // w
        r = rank()
        return batch[r * per : (r + 1) * per]  # (n / w, ...)
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard_batch(b) for b in batch)
    if isinstance(batch, dict):
        return {k: shard_batch(v) for k, v in batch.items()}
    return batch


def mean_across_processes(value: float) -> float:
    """Average a Python number over all processes (identity when not distributed)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / world_size()
