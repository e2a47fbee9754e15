"""Image grids and PNG files with NumPy alone (no matplotlib or Pillow), for the library and its CLI.

    grid = to_grid(images, nrow=10)              # (N, C, H, W) in [0, 1] -> (H', W', C) float array
    Path("grid.png").write_bytes(encode_png((grid * 255).round().astype(np.uint8)))
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from ar_course.utils import check_image_values, check_int, check_number

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grey, RGB, RGBA


def to_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tile ``images`` (N, C, H, W) with values in [0, 1] into one float32 array
    (rows*(H+pad)+pad, cols*(W+pad)+pad, C), every image framed by ``pad`` pixels of ``pad_value``.

    ``nrow`` images per row; ``C`` is 1 (grey) or 3 (RGB), channels first. Any float dtype. Values slightly
    outside [0, 1] (decoder outputs that overshoot) are clipped; a range that looks like 0..255 (above 1.5) or
    [-1, 1] (below -0.5) is refused. One min/max read.

    Raises:
        TypeError: ``images`` is not a tensor, ``nrow`` or ``pad`` not an integer, ``pad_value`` not a number.
        ValueError: not ``(N, C, H, W)`` with ``N >= 1`` and ``C`` in (1, 3) (a channels-last batch, say), integer
            images (divide uint8 images by 255), values far outside [0, 1] or NaN, ``nrow < 1``, ``pad < 0`` or
            ``pad_value`` outside [0, 1].
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a float tensor (N, C, H, W) in [0, 1], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W) with C = 1 or 3 channels first, got shape "
                         f"{tuple(images.shape)} (for channels-last (N, H, W, C) use images.permute(0, 3, 1, 2))")
    if images.shape[0] == 0 or images.numel() == 0:
        raise ValueError(f"images is empty (shape {tuple(images.shape)})")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1], got {images.dtype} (divide uint8 images by 255)")
    nrow, pad = check_int("nrow", nrow, lo=1), check_int("pad", pad, lo=0)
    pad_value = check_number("pad_value", pad_value, lo=0, hi=1)  # the frame is a pixel value too
    check_image_values("images", images)
    x = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), pad_value)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid.permute(1, 2, 0).numpy()  # (H', W', C)


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray) -> bytes:
    """A PNG file (8 bits per sample, no interlacing) of ``pixels``: a uint8 array ``(H, W)`` (grey) or
    ``(H, W, C)`` with C = 1 (grey), 3 (RGB) or 4 (RGBA). Raises ``ValueError`` for another dtype or shape."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be a uint8 numpy array, got {getattr(pixels, 'dtype', type(pixels))}")
    if pixels.ndim == 2:
        pixels = pixels[..., None]  # (H, W, 1)
    if pixels.ndim != 3 or pixels.shape[2] not in _COLOR_TYPES or 0 in pixels.shape[:2]:
        raise ValueError(f"pixels must be (H, W) or (H, W, 1 | 3 | 4) with H, W >= 1, got {pixels.shape}")
    h, w, c = pixels.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), pixels.reshape(h, w * c)], axis=1)  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPES[c], 0, 0, 0)
    return (_PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _chunk(b"IEND", b""))
