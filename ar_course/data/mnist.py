"""The shipped MNIST subset (20,000 training and 5,000 test digits) as float tensors.

The arrays live in ``mnist_subset.npz`` beside this module; ``README.md`` there says where they come from and
how they were chosen. Nothing is downloaded.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ar_course.utils import get_device

MNIST_PATH = Path(__file__).with_name("mnist_subset.npz")
# SHA-256 of the shipped file; ``scripts/extract_mnist.py`` reproduces it byte for byte.
MNIST_SHA256 = "ada184f9e8709607aa73ec28434cc5df7d9ab88c749240a6fe64de557af77eaa"
MNIST_SPLITS = ("train", "test")
MNIST_SIZES = (28, 32)


@functools.lru_cache(maxsize=None)
def _arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read-only uint8 arrays ``images (N, 28, 28)`` and ``labels (N,)`` of one split, decompressed once."""
    with np.load(MNIST_PATH) as npz:
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_mnist(split: str = "train", size: int = 28,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST digits of one fixed split.

    ``split``: ``"train"`` (20,000 images) or ``"test"`` (5,000). ``size``: 28 for the original images, or 32
    for the same digits with 2 zero pixels added on every side (handy for models that halve the resolution
    several times). Returns ``images`` float32 ``(N, 1, size, size)`` with values in ``[0, 1]`` (0 is the
    black background) and ``labels`` int64 ``(N,)`` in ``0..9``, both on ``device`` (default CPU). The
    tensors are fresh copies: changing them does not affect later calls.

    Raises:
        ValueError: an unknown ``split``, ``size`` or ``device`` (``"gpu"``; see ``ar_course.utils.get_device``).
        RuntimeError: a CUDA ``device`` on a machine without one.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"split must be one of {MNIST_SPLITS}, got {split!r}")
    if size not in MNIST_SIZES:
        raise ValueError(f"size must be one of {MNIST_SIZES}, got {size!r}")
    device = None if device is None else get_device(device)
    images_u8, labels_u8 = _arrays(split)
    images = torch.from_numpy(images_u8.copy()).to(device).unsqueeze(1).float().div_(255.0)  # (N, 1, 28, 28)
    if size == 32:
        images = F.pad(images, (2, 2, 2, 2))  # (N, 1, 32, 32)
    labels = torch.from_numpy(labels_u8.astype(np.int64)).to(device)  # (N,)
    return images, labels
