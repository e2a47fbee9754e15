"""A small, generic training loop: AdamW, warmup + cosine schedule, gradient clipping, ``tqdm`` progress,
loss history and periodic evaluation. Chapters' trainers (``python -m ar_course train ...``) build on it.

Usage::

    history = train_loop(model, loss_fn=lambda m, b: m(*b)[1], batches=iter_batches(), config=TrainConfig(steps=500))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from ar_course import distributed as ddp


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.99)
    eval_every: int = 0  # 0: evaluate only at the end (if an eval_fn is given)
    log_every: int = 10


@dataclass
class History:
    """Loss per step and evaluation results per evaluation step."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)

    def smoothed(self, window: int = 20) -> list[float]:
        """Running mean of the training loss over ``window`` steps."""
        out, acc = [], 0.0
        for i, v in enumerate(self.loss):
            acc += v
            if i >= window:
                acc -= self.loss[i - window]
            out.append(acc / min(i + 1, window))
        return out


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup for ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cos)


def train_loop(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Iterator[Any],
    config: TrainConfig,
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
    desc: str = "train",
) -> History:
    """Train ``model`` for ``config.steps`` steps on ``batches``; return the :class:`History`.

    ``loss_fn(model, batch)`` returns a scalar loss (a mean over the batch). ``eval_fn(model)`` (called in
    eval mode under ``torch.no_grad``) returns named metrics; it runs every ``eval_every`` steps and at
    the end.

    Inside a process group (``torchrun``, see :mod:`ar_course.distributed`) each process trains on its
    slice of every global batch from ``batches`` through ``DistributedDataParallel``; the recorded loss
    is averaged over processes and only rank 0 shows progress. ``model`` is updated in place either way."""
    train_model: torch.nn.Module = model
    if ddp.is_distributed():
        train_model = torch.nn.parallel.DistributedDataParallel(model)
        progress = progress and ddp.is_main_process()
    opt = optimizer or torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr, weight_decay=config.weight_decay, betas=config.betas,
    )
    history = History()
    model.train()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        loss = loss_fn(train_model, ddp.shard_batch(next(batches)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        history.steps.append(step)
        history.loss.append(ddp.mean_across_processes(float(loss.detach())))
        if step % config.log_every == 0:
            bar.set_postfix(loss=f"{history.smoothed()[-1]:.4f}")
        last = step == config.steps - 1
        if eval_fn is not None and ((config.eval_every and (step + 1) % config.eval_every == 0) or last):
            model.eval()
            with torch.no_grad():
                metrics = eval_fn(model)
            model.train()
            history.eval_steps.append(step + 1)
            history.evals.append(metrics)
    model.eval()
    return history
