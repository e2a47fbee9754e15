"""A procedurally generated image set: one coloured shape per image on a dark background, class = shape.

Every image is drawn from a few random numbers (class, centre, size, shape colour, background colour)
taken from a NumPy ``Generator``, so a seed fixes the whole set. Positions and sizes are drawn as fractions
of the image side, so the same seed gives the same scenes at every resolution. Edges are anti-aliased: a
pixel's coverage is ``clip(0.5 - d, 0, 1)`` where ``d`` is its signed distance (in pixels) to the outline.
"""

from __future__ import annotations

import numpy as np
import torch

from ar_course.utils import check_int, get_device

SHAPE_NAMES = ("circle", "square", "triangle", "cross")
_CHUNK = 2048  # images rendered at once, to bound memory for large sets
_SQRT3 = float(np.sqrt(3.0))


def _signed_distance(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance to the outline of shape ``label`` in units of its radius (negative inside).

    ``u, v``: ``(n, S, S)`` pixel-centre coordinates relative to the shape's centre, divided by its radius
    (``v`` points down). Polygons use the maximum of their edges' half-plane distances, which is exact on
    the edges and close enough near them for a one-pixel anti-aliasing ramp."""
    au, av = np.abs(u), np.abs(v)
    if label == 0:  # circle of radius 1
        return np.sqrt(u * u + v * v) - 1.0
    if label == 1:  # square of half-side 0.85
        return np.maximum(au, av) - 0.85
    if label == 2:  # upright equilateral triangle, circumradius 1, apex at v = -1
        return np.maximum(v - 0.5, (_SQRT3 * au - v - 1.0) / 2.0)
    # cross: union of two bars, arm length 1 and half-width 0.3
    return np.minimum(np.maximum(au - 1.0, av - 0.3), np.maximum(au - 0.3, av - 1.0))


def make_shapes(n: int, size: int = 32, seed: int = 0,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of coloured shapes, deterministic under ``seed``.

    Returns ``images`` float32 ``(n, 3, size, size)`` in ``[0, 1]`` and ``labels`` int64 ``(n,)``, indices
    into ``SHAPE_NAMES``. The classes are balanced (counts differ by at most one) and shuffled. Each shape
    has a random centre, a radius between 0.18 and 0.38 of the image side (it always fits inside the image),
    and a bright colour (its strongest channel is 1); the background is a random dark colour (channels at
    most 0.15). ``size`` must be at least 8. ``device``: default CPU.

    Raises:
        TypeError: ``n``, ``size`` or ``seed`` is not an integer (``seed=None`` too: the set must be reproducible).
        ValueError: ``n < 1``, ``size < 8``, ``seed < 0`` (NumPy seeds are non-negative), or an unknown
            ``device`` (``"gpu"``; see ``ar_course.utils.get_device``).
        RuntimeError: a CUDA ``device`` on a machine without one.
    """
    n = check_int("n", n, lo=1)
    size = check_int("size", size, lo=8)
    seed = check_int("seed", seed, lo=0)  # what np.random.default_rng accepts as an integer seed
    device = None if device is None else get_device(device)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPE_NAMES))  # (n,)
    radius = rng.uniform(0.18, 0.38, n)  # (n,) fraction of the side
    centre = rng.uniform(radius[:, None], 1.0 - radius[:, None], (n, 2))  # (n, 2) x, y as fractions
    colour = rng.uniform(0.0, 1.0, (n, 3))
    colour /= colour.max(axis=1, keepdims=True)  # (n, 3) strongest channel is 1
    background = rng.uniform(0.0, 0.15, (n, 3))  # (n, 3)

    pixel = ((np.arange(size) + 0.5) / size).astype(np.float32)  # (S,) pixel centres as fractions of the side
    radius, centre = radius.astype(np.float32), centre.astype(np.float32)  # float32 halves the rendering time
    images = np.empty((n, 3, size, size), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        sl = slice(start, start + _CHUNK)
        r = radius[sl, None, None]  # (c, 1, 1)
        u = (pixel[None, None, :] - centre[sl, 0, None, None]) / r  # (c, 1, S)
        v = (pixel[None, :, None] - centre[sl, 1, None, None]) / r  # (c, S, 1)
        u, v = np.broadcast_arrays(u, v)  # (c, S, S) each
        dist = np.empty(u.shape, dtype=np.float32)
        for label in range(len(SHAPE_NAMES)):
            rows = labels[sl] == label
            dist[rows] = _signed_distance(label, u[rows], v[rows])
        cover = np.clip(0.5 - dist * r * size, 0.0, 1.0)[:, None]  # (c, 1, S, S), distance now in pixels
        bg = background[sl, :, None, None]  # (c, 3, 1, 1)
        images[sl] = bg + (colour[sl, :, None, None] - bg) * cover  # (c, 3, S, S)
    return torch.from_numpy(images).to(device), torch.from_numpy(labels.astype(np.int64)).to(device)
