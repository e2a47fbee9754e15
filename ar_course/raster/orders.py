"""Generation orders over an ``h x w`` token map, and how many sequential model calls each one needs.

* ``raster``: one token per step, row by row (LlamaGen, this chapter): ``h * w`` steps.
* ``random``: one token per step in a random permutation (RandAR trains on random orders, telling the model
  which position comes next): still ``h * w`` steps, but any order, so it can fill in or edit regions.
* ``neighbour``: all tokens on one anti-diagonal ``i + j = k`` at once, each one's upper and left neighbours
  being known already (NAR's next-neighbour idea): ``h + w - 1`` steps, ``2n - 1`` for an ``n x n`` map.

A schedule is a list of steps; each step is a ``(k, 2)`` long tensor of the ``(row, col)`` positions
generated together at that step.
"""

from __future__ import annotations

import torch

from ar_course.utils import check_int

ORDERS = ("raster", "random", "neighbour")


def _check_grid(h: int, w: int) -> None:
    """``TypeError`` unless ``h`` and ``w`` are integers, ``ValueError`` unless the map is at least 1x1."""
    h, w = check_int("h", h), check_int("w", w)
    if h < 1 or w < 1:
        raise ValueError(f"the token map must be at least 1x1, got {h}x{w}")


def schedule(order: str, h: int, w: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The steps of ``order`` over an ``h x w`` map: a list of ``(k, 2)`` long ``(row, col)`` tensors.

    Every position appears exactly once; ``generator`` draws the permutation of ``"random"``."""
    _check_grid(h, w)
    rows = torch.arange(h).repeat_interleave(w)  # (h*w,) raster order
    cols = torch.arange(w).repeat(h)  # (h*w,)
    pos = torch.stack([rows, cols], dim=1)  # (h*w, 2)
    if order == "raster":
        return list(pos.split(1))
    if order == "random":
        return list(pos[torch.randperm(h * w, generator=generator)].split(1))
    if order == "neighbour":
        diag = rows + cols  # (h*w,)
        return [pos[diag == k] for k in range(h + w - 1)]
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def num_steps(order: str, h: int, w: int) -> int:
    """Sequential model calls to generate an ``h x w`` map in ``order`` (one per step of :func:`schedule`)."""
    _check_grid(h, w)
    if order in ("raster", "random"):
        return h * w
    if order == "neighbour":
        return h + w - 1
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def step_map(steps: list[torch.Tensor], h: int, w: int) -> torch.Tensor:
    """``(h, w)`` long map holding, at each position, the step at which it is generated (for plots)."""
    out = torch.full((h, w), -1, dtype=torch.long)
    for t, positions in enumerate(steps):
        out[positions[:, 0], positions[:, 1]] = t
    if (out < 0).any():
        raise ValueError("the schedule leaves some positions out")
    return out
