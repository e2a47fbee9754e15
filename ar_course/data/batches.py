"""Endless random mini-batches for training loops: windows of a token stream, and shuffled image sets.

Both take an optional CPU ``torch.Generator``; the same seeded generator gives the same batches. Without one
they draw from torch's global generator (see ``ar_course.utils.seed_everything``).
"""

from __future__ import annotations

from typing import Iterator

import torch

from ar_course.utils import check_int, get_device, is_integer_tensor


def _check_generator(generator: object) -> None:
    """A one-line error unless ``generator`` is ``None`` or a CPU ``torch.Generator`` (what the batches draw from)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a CPU torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")


def _check_leading(name: str, x: object, shape: str) -> torch.Tensor:
    """``x`` if it is a tensor with at least one dimension, else a one-line error naming ``name`` (``shape``
    says what is expected)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a {shape} tensor, got {type(x).__name__}")
    if x.ndim == 0:
        raise ValueError(f"{name} must be a {shape} tensor, got a 0-d tensor")
    return x


def text_batches(ids: torch.Tensor, block_size: int, batch_size: int,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(x, y)`` pairs of random windows of ``ids`` for next-token prediction.

    ``ids``: integer ``(N,)`` (int64, as ``CharTokenizer.encode`` gives) with ``N > block_size``. Each step
    yields ``x`` and ``y``, both ``(batch_size, block_size)`` of the dtype of ``ids``, where
    ``y[b, t] == x[b, t + 1]``: row ``b`` of ``y`` is the window of ``x`` shifted one token to the right.
    Windows start uniformly at random (with replacement) anywhere they fit. The batches are placed on
    ``device`` (default: the device of ``ids``).

    The arguments are checked when it is called, before the first batch is drawn.

    Raises:
        TypeError: ``ids`` is not a tensor, ``block_size`` or ``batch_size`` is not an integer, ``generator``
            is not a ``torch.Generator``.
        ValueError: ``ids`` is not 1-D, not of an integer dtype or not longer than ``block_size``;
            ``block_size`` or ``batch_size`` < 1; a ``generator`` that is not on the CPU; an unknown ``device``.
        RuntimeError: a CUDA ``device`` on a machine without one (``ar_course.utils.get_device``).
    """
    _check_leading("ids", ids, "1-D (N,) integer")
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    if not is_integer_tensor(ids):
        raise ValueError(f"ids must be a 1-D tensor of integer token ids, got dtype {ids.dtype}")
    block_size = check_int("block_size", block_size, lo=1)
    batch_size = check_int("batch_size", batch_size, lo=1)
    if ids.numel() <= block_size:
        raise ValueError(f"need more than block_size={block_size} tokens to cut a window, got {ids.numel()}")
    _check_generator(generator)
    device = ids.device if device is None else get_device(device)
    return _text_batches(ids, block_size, batch_size, generator, device)


def _text_batches(ids: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator | None,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`text_batches` after its checks."""
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
    of each shuffled pass are skipped (they differ from pass to pass).

    The arguments are checked when it is called, before the first batch is drawn.

    Raises:
        TypeError: ``images`` or ``labels`` is not a tensor, ``batch_size`` is not an integer, ``generator`` is
            not a ``torch.Generator``.
        ValueError: ``images`` or ``labels`` is 0-d, they differ in length, ``batch_size`` is not between 1
            and the number of images, or ``generator`` is not on the CPU.
    """
    _check_leading("images", images, "(N, ...)")
    _check_leading("labels", labels, "(N,)")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}")
    batch_size = check_int("batch_size", batch_size)
    if not 1 <= batch_size <= images.shape[0]:
        raise ValueError(f"batch_size must be between 1 and the number of images ({images.shape[0]}), "
                         f"got {batch_size}")
    _check_generator(generator)
    return _image_batches(images, labels, batch_size, generator)


def _image_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                   generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`image_batches` after its checks."""
    n_batches = images.shape[0] // batch_size
    while True:
        order = torch.randperm(images.shape[0], generator=generator)  # (N,)
        for chunk in order[: n_batches * batch_size].view(n_batches, batch_size):  # (B,) each
            yield images[chunk.to(images.device)], labels[chunk.to(labels.device)]
