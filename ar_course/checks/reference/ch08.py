"""Chapter 08 reference that the library does not call in this form.

* :func:`neighbour_step_map` -- exercise 8.4: the next-neighbour (NAR) order as a map of step numbers. The
  library builds the same order as lists of positions (:func:`ar_course.raster.orders.schedule`
  ``("neighbour")``, :func:`ar_course.masked.functional.neighbour_steps`); this is its
  :func:`~ar_course.raster.orders.step_map`.
"""

from __future__ import annotations

import torch

from ar_course.raster import orders


def neighbour_step_map(h: int, w: int) -> torch.Tensor:
    """``(h, w)`` long: the decoding step at which each position of an ``h x w`` map is generated in the
    next-neighbour order, ``i + j`` for row ``i`` and column ``j`` (``h + w - 1`` steps in all)."""
    return orders.step_map(orders.schedule("neighbour", h, w), h, w)  # (h, w)
