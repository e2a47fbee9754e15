"""Plotting helpers: image grids and loss curves (matplotlib; return the Figure so notebooks can save it).

Course layer: the library never imports this module (its grids come from :mod:`ar_course.images`)."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure, SubFigure

from ar_course.images import to_grid

__all__ = ["plot_losses", "show_images", "to_grid"]


def show_images(
    images: torch.Tensor, nrow: int = 8, title: str | None = None, ax: plt.Axes | None = None,
    row_labels: Sequence[str] | None = None,
) -> Figure | SubFigure:
    """Show a batch of images (N, C, H, W) in [0, 1] as a grid, ``nrow`` per row; grayscale when C == 1.

    ``title`` goes above the grid; ``ax``: draw on these axes (default: a new figure); ``row_labels``: one label
    per grid row, on the y axis. Returns the figure.

    Raises as :func:`ar_course.images.to_grid` (checked before any figure is made): ``TypeError`` for a
    non-tensor or a non-integer ``nrow``; ``ValueError`` for integer images (divide uint8 images by 255), a range
    that looks like 0..255 or [-1, 1], ``C`` not 1 or 3 (channels last), an empty batch or ``nrow < 1``; and
    ``ValueError`` for ``row_labels`` that do not give one label per grid row."""
    grid = to_grid(images, nrow=nrow)
    rows = int(np.ceil(images.shape[0] / min(nrow, images.shape[0])))
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"row_labels must have one label per row ({rows} row{'s' * (rows != 1)}), "
                         f"got {len(row_labels)}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(min(12, 1.1 * min(nrow, images.shape[0])), 1.1 * rows + 0.4))
    else:
        fig = ax.figure  # a SubFigure when ax is in one
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray" if grid.shape[-1] == 1 else None,
              vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if row_labels is not None:
        h = images.shape[-2] + 2
        ax.set_yticks([2 + h * i + h / 2 - 1 for i in range(len(row_labels))])
        ax.set_yticklabels(row_labels)
    if title:
        ax.set_title(title)
    return fig


def plot_losses(
    curves: Mapping[str, Sequence[float]], title: str = "loss", xlabel: str = "step", ylabel: str = "loss",
    logy: bool = False, ax: plt.Axes | None = None, steps: Mapping[str, Sequence[int]] | None = None,
) -> Figure | SubFigure:
    """Plot named curves on one axis (e.g. ``{"train": history.smoothed(), "val": vals}``); returns the figure.

    ``steps``: the x values of a curve by name (default ``0, 1, ...``); ``logy``: a log-scale y axis; ``ax``: draw
    on these axes (default: a new figure, laid out tight; the layout of a figure you pass is left to you, so a
    constrained layout or a subfigure's axes work).

    Raises ``ValueError`` for an empty ``curves`` or a ``steps[name]`` whose length is not that of
    ``curves[name]`` (checked before any figure is made)."""
    if not curves:
        raise ValueError("curves is empty: pass at least one named curve, e.g. {'train': losses}")
    for name, ys in curves.items():
        if steps and name in steps and len(steps[name]) != len(ys):
            raise ValueError(f"steps[{name!r}] must have one x value per point of curves[{name!r}] ({len(ys)}), "
                             f"got {len(steps[name])}")
    created = ax is None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    else:
        fig = ax.figure  # a SubFigure when ax is in one
    for name, ys in curves.items():
        xs = steps[name] if steps and name in steps else range(len(ys))
        ax.plot(list(xs), list(ys), label=name, marker="o" if len(ys) < 20 else None)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if created:
        fig.tight_layout()
    return fig
