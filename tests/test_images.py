"""PNG files written with NumPy and zlib alone decode (with Pillow) to exactly the pixels written."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ar_course.images import encode_png, to_grid


@pytest.mark.parametrize("shape, mode", [((7, 13), "L"), ((5, 3, 1), "L"), ((9, 4, 3), "RGB"), ((1, 1, 4), "RGBA"),
                                         ((66, 34, 3), "RGB")])
def test_png_round_trips_through_pillow(shape, mode):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    with Image.open(io.BytesIO(encode_png(pixels))) as img:
        assert img.format == "PNG" and img.mode == mode and img.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(img).reshape(shape), pixels)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8),
                                 np.zeros((0, 4), np.uint8), np.zeros((2, 2, 2, 3), np.uint8), [[0, 1]]])
def test_png_refuses_what_it_cannot_write(bad):
    with pytest.raises(ValueError, match="pixels must be"):
        encode_png(bad)


def test_grid_tiles_images_with_padding():
    images = torch.stack([torch.full((3, 4, 5), v) for v in (0.0, 0.5, 1.0)])  # (3, C, H, W)
    grid = to_grid(images, nrow=2, pad=1, pad_value=0.25)
    assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
    assert grid[1, 1, 0] == 0.0 and grid[1, 7, 0] == 0.5 and grid[6, 1, 0] == 1.0 and grid[0, 0, 0] == 0.25
    assert grid[6, 7, 0] == 0.25  # the empty fourth cell keeps the padding value


def _expected_grid(images: torch.Tensor, ncol: int, pad: int, pad_value: float) -> np.ndarray:
    """The grid built cell by cell: ``ncol`` columns, each image at its own ``(H, W)`` step."""
    n, c, h, w = images.shape
    nrows = -(-n // ncol)
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.float32)
    for i in range(n):
        top, left = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[top : top + h, left : left + w] = images[i].permute(1, 2, 0).numpy()
    return grid


@pytest.mark.parametrize("h, w", [(2, 5), (5, 2)])
def test_grid_of_non_square_images_steps_by_their_own_width_and_height(h, w):
    images = torch.rand(5, 1, h, w, generator=torch.Generator().manual_seed(h))
    grid = to_grid(images, nrow=3, pad=1, pad_value=0.5)
    assert grid.shape == (2 * (h + 1) + 1, 3 * (w + 1) + 1, 1)
    np.testing.assert_array_equal(grid, _expected_grid(images, 3, 1, 0.5))


def test_grid_of_fewer_images_than_nrow_has_no_empty_columns():
    images = torch.stack([torch.full((1, 3, 4), v) for v in (0.0, 1.0)])
    grid = to_grid(images, nrow=8, pad=2, pad_value=0.25)
    assert grid.shape == (3 + 2 * 2, 2 * (4 + 2) + 2, 1)  # one row of two cells, not eight
    np.testing.assert_array_equal(grid, _expected_grid(images, 2, 2, 0.25))
