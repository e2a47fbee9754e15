"""The shipped MNIST subset (20,000 training and 5,000 test digits) as float tensors.

The arrays live in ``mnist_subset.npz`` beside this module; ``README.md`` there says where they come from and
how they were chosen. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ar_course.cli import exception_line
from ar_course.utils import get_device

MNIST_PATH = Path(__file__).with_name("mnist_subset.npz")
# SHA-256 of the shipped file; ``scripts/extract_mnist.py`` reproduces it byte for byte.
MNIST_SHA256 = "ada184f9e8709607aa73ec28434cc5df7d9ab88c749240a6fe64de557af77eaa"
MNIST_SPLITS = ("train", "test")
MNIST_SIZES = (28, 32)


_SPLIT_SIZES = {"train": 20_000, "test": 5_000}


@functools.lru_cache(maxsize=None)
def _arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read-only uint8 arrays ``images (N, 28, 28)`` and ``labels (N,)`` of one split, decompressed once; a
    one-line ``RuntimeError`` naming :data:`MNIST_PATH` and what is wrong when it is not the shipped file."""
    try:
        data = MNIST_PATH.read_bytes()
    except OSError as exc:
        raise RuntimeError(f"cannot read the MNIST subset {MNIST_PATH}: {exc.strerror or exc}") from None
    if hashlib.sha256(data).hexdigest() == MNIST_SHA256:  # the shipped file: nothing more to check
        with np.load(io.BytesIO(data)) as npz:
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    else:
        images, labels = _checked(data, split)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _checked(data: bytes, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The arrays of ``split`` in ``data``, a file that is not byte for byte the shipped one: ``RuntimeError``
    naming :data:`MNIST_PATH` and the first thing wrong (a git-lfs pointer, not a .npz archive, a missing array, a
    shape, dtype or label out of place), else that its SHA-256 differs."""
    def bad(what: str) -> RuntimeError:
        return RuntimeError(f"the MNIST subset {MNIST_PATH} {what}")

    if data.startswith(b"version https://git-lfs"):
        raise bad("is a git-lfs pointer, not the data: fetch it with `git lfs pull`")
    n = _SPLIT_SIZES[split]
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            missing = [f"{split}_{a}" for a in ("images", "labels") if f"{split}_{a}" not in npz.files]
            if missing:
                raise bad(f"has no array {missing[0]!r} (it holds {sorted(npz.files)})")
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise bad(f"is not a readable .npz archive (empty, truncated or damaged: {exception_line(exc)})") from None
    if images.dtype != np.uint8 or images.shape != (n, 28, 28):
        raise bad(f"holds {split}_images of {images.dtype} {images.shape}, expected uint8 {(n, 28, 28)}")
    if labels.dtype != np.uint8 or labels.shape != (n,):
        raise bad(f"holds {split}_labels of {labels.dtype} {labels.shape}, expected uint8 {(n,)}")
    if labels.max(initial=0) > 9:
        raise bad(f"holds {split}_labels outside 0..9 (up to {labels.max()})")
    raise bad(f"is not the shipped file: its SHA-256 is {hashlib.sha256(data).hexdigest()}, expected "
              f"{MNIST_SHA256}")


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
        RuntimeError: a CUDA ``device`` on a machine without one, or an MNIST file that is not the shipped one
            (missing, a git-lfs pointer, truncated, arrays of other shapes or dtypes, labels outside 0..9: one line
            naming the file and what is wrong).
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
