"""Endless random mini-batches for training loops: windows of a token stream, and shuffled image sets.

Both take an optional CPU ``torch.Generator``; the same seeded generator gives the same batches. Without one
they draw from torch's global generator (see ``ar_course.utils.seed_everything``).
"""

from __future__ import annotations

from typing import Iterator

import torch


def text_batches(ids: torch.Tensor, block_size: int, batch_size: int,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(x, y)`` pairs of random windows of ``ids`` for next-token prediction.

    ``ids``: int64 ``(N,)`` with ``N > block_size``. Each step yields ``x`` and ``y``, both int64
    ``(batch_size, block_size)``, where ``y[b, t] == x[b, t + 1]``: row ``b`` of ``y`` is the window of ``x``
    shifted one token to the right. Windows start uniformly at random (with replacement) anywhere they fit.
    The batches are placed on ``device`` (default: the device of ``ids``)."""
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}")
    if ids.numel() <= block_size:
        raise ValueError(f"need more than block_size={block_size} tokens to cut a window, got {ids.numel()}")
    device = ids.device if device is None else torch.device(device)
    offsets = torch.arange(block_size + 1)  # (T + 1,)
    while True:
        starts = torch.randint(0, ids.numel() - block_size, (batch_size,), generator=generator)  # (B,)
        window = ids[(starts[:, None] + offsets).to(ids.device)].to(device)  # (B, T + 1)
        yield window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T) each


def image_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                  generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(images, labels)`` mini-batches, reshuffled at the start of every pass over the data.

    ``images``: ``(N, ...)``, e.g. ``(N, C, H, W)``; ``labels``: ``(N,)``. Yields ``(batch_size, ...)`` and
    ``(batch_size,)`` slices on the inputs' device. Every batch is full: the last ``N % batch_size`` examples
    of each shuffled pass are skipped (they differ from pass to pass)."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}")
    if not 1 <= batch_size <= images.shape[0]:
        raise ValueError(f"batch_size must be between 1 and the number of images ({images.shape[0]}), "
                         f"got {batch_size}")
    n_batches = images.shape[0] // batch_size
    while True:
        order = torch.randperm(images.shape[0], generator=generator)  # (N,)
        for chunk in order[: n_batches * batch_size].view(n_batches, batch_size):  # (B,) each
            yield images[chunk.to(images.device)], labels[chunk.to(labels.device)]
