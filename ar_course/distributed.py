"""Data-parallel training helpers: the same trainer runs alone or under ``torchrun``.

``torchrun --nproc_per_node=2 -m ar_course train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
:func:`init_distributed` then joins the process group (NCCL on GPUs, gloo on CPU). Each process reads its
own contiguous slice of every global batch (:func:`shard_batch`, the role a distributed sampler plays for a
dataset), :class:`torch.nn.parallel.DistributedDataParallel` averages the gradients, and only rank 0 logs
and writes checkpoints (:func:`is_main_process`); :func:`close_distributed` leaves the group at the end.
With equal slices, the averaged gradient equals the gradient of the mean loss over the global batch, so N
processes train exactly like one process on the same global batch (up to floating-point reduction order).

Random numbers a training loss draws for its examples (masks, noise levels, noise) must be the global batch's
too: inside :func:`global_batch_draws` (which :func:`~ar_course.train.train_loop` enters around every loss),
:func:`draw_rows` makes every process draw them for the whole global batch and keep its own rows, so that the
processes neither repeat one another's numbers nor draw other ones than a single process would. A loss term
that is not a mean over examples (LFQ's codebook entropy) sums over the processes there with
:func:`global_batch_sum`.

What a model computes from batch statistics outside autograd must see the global batch too: the VQ
codebook's hit counts, EMA updates and dead-code restarts sum and gather across processes
(:func:`sum_across_processes`, :func:`gather_in_rank_order`), and :class:`SyncBatchNorm2d` normalises with
the global batch's mean and variance (on gloo as well as NCCL, unlike ``torch.nn.SyncBatchNorm``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the process group (0 alone)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes in the group (1 alone)."""
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


_GLOBAL_DRAWS = contextvars.ContextVar("ar_course_global_draws", default=False)


@contextlib.contextmanager
def global_batch_draws() -> Iterator[None]:
    """While active (a training step's loss), :func:`draw_rows` draws for the global batch and slices, and
    :func:`global_batch_sum` sums over the processes."""
    token = _GLOBAL_DRAWS.set(True)
    try:
        yield
    finally:
        _GLOBAL_DRAWS.reset(token)


def draw_rows(draw: Callable[[int], torch.Tensor], rows: int, dim: int = 0) -> torch.Tensor:
    """Random numbers for this process's ``rows`` examples: ``draw(n)`` makes them for ``n`` examples, along
    ``dim`` of its result.

    Alone, or outside :func:`global_batch_draws`, this is ``draw(rows)``. Inside it under a process group, every
    process calls ``draw(world_size() * rows)`` (from the same generator state: every process seeds alike and
    draws alike) and keeps the slice of its own examples, the contiguous one :func:`shard_batch` gave it. N
    processes then use exactly the numbers one process draws for the global batch."""
    w = world_size()
    if w == 1 or not _GLOBAL_DRAWS.get():
        return draw(rows)
    return draw(rows * w).narrow(dim, rank() * rows, rows)  # this process's rows of the global draw


def global_batch_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A loss's sum over this process's examples (``tensor``, any shape) made the global batch's: inside
    :func:`global_batch_draws` under a process group, the elementwise sum over processes, through which
    gradients flow (as :class:`SyncBatchNorm2d`'s statistics); else ``tensor`` itself.

    For a loss term that is not a mean over examples (an entropy of the batch's average distribution, say):
    every process then computes the global batch's term, and DistributedDataParallel's averaging gives each
    input the gradient one process computes. Every process must call it with the same shape."""
    if not (is_distributed() and _GLOBAL_DRAWS.get()):
        return tensor
    return _SumWithGradient.apply(tensor)


def share_of_global_mean(count: torch.Tensor) -> float:
    """The factor that turns a loss averaged over this process's ``count`` items (masked tokens, say, whose
    number differs between processes) into its part of the average over the global batch's items, once
    DistributedDataParallel has averaged the processes' gradients: ``world_size() * count / total count``.
    Exactly ``1.0`` alone."""
    if not is_distributed():
        return 1.0
    count = count.detach().double()  # on the process's GPU with NCCL (sum_across_processes)
    return float(world_size() * count / sum_across_processes(count))


def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of ``tensor`` (any shape) over all processes, as a new tensor (``tensor`` itself alone).

    Every process must call it with the same shape; with NCCL the tensor must be on the process's GPU."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def gather_in_rank_order(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` ``(n, ...)`` concatenated along dim 0 in rank order: ``(world_size * n, ...)``.

    With the contiguous slices of :func:`shard_batch` this puts a per-example tensor back in global batch
    order. Every process must call it with the same shape (``tensor`` itself is returned alone)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)  # (world_size * n, ...)


class _SumWithGradient(torch.autograd.Function):
    """Sum over processes whose gradient is again the sum over processes (every process's loss depends on
    the total, so each input receives the upstream gradients of all of them)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, in training mode inside a process group, normalises with the mean and
    (biased) variance of the global batch and updates its running statistics from them, so N processes
    compute what one process does on the whole batch. Gradients flow through the cross-process sums.

    Alone, or in eval mode, it is exactly ``nn.BatchNorm2d`` (same parameters, buffers and state dict).
    Input ``(N, C, H, W)``; every process must pass the same shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, C, H, W)`` normalised per channel -> ``(N, C, H, W)``."""
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        count = x.shape[0] * x.shape[2] * x.shape[3] * world_size()  # values per channel, all processes
        mean = _SumWithGradient.apply(x.sum(dim=(0, 2, 3))) / count  # (C,)
        centred = x - mean[None, :, None, None]  # (N, C, H, W)
        var = _SumWithGradient.apply(centred.pow(2).sum(dim=(0, 2, 3))) / count  # (C,) biased
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * count / max(count - 1, 1))
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """``nn.BatchNorm2d``'s update: an exponential average with ``momentum`` (a cumulative one when
        ``momentum`` is None)."""
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)
