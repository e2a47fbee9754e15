"""Chapter 08 reference that the library does not call in this form.

* :func:`neighbour_step_map` -- exercise 8.4: the next-neighbour (NAR) order as a map of step numbers. The
  library builds the same order as lists of positions (:func:`ar_course.raster.orders.schedule`
  ``("neighbour")``, :func:`ar_course.masked.functional.neighbour_steps`); this is its
  :func:`~ar_course.raster.orders.step_map`.
* :func:`mdlm_loss` -- exercise 8.5: the MDLM loss of each row under the linear schedule (the library's
  :class:`~ar_course.diffusion_lm.DiffusionLM` computes it inside its forward pass, for any schedule).
* :func:`reveal_step` -- exercise 8.6: one reverse step with the uniform draws given.
* :func:`block_schedule` -- exercise 8.7: :func:`ar_course.diffusion_lm.functional.block_schedule`.
"""

from __future__ import annotations

import torch

from ar_course import diffusion_lm
from ar_course.raster import orders


def neighbour_step_map(h: int, w: int) -> torch.Tensor:
    """``(h, w)`` long: the decoding step at which each position of an ``h x w`` map is generated in the
    next-neighbour order, ``i + j`` for row ``i`` and column ``j`` (``h + w - 1`` steps in all)."""
    return orders.step_map(orders.schedule("neighbour", h, w), h, w)  # (h, w)


def mdlm_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exercise 8.5: the MDLM loss of each row under the linear schedule, in nats per token ``(B,)``: the
    cross-entropy of ``logits`` ``(B, L, V)`` against ``targets`` ``(B, L)`` at the ``masked`` ``(B, L)`` positions,
    weighted by ``1 / t`` (``t`` ``(B,)``: each row's time), summed and divided by ``L``. The library's
    :meth:`~ar_course.diffusion_lm.DiffusionLM.forward` computes it with
    :func:`~ar_course.diffusion_lm.functional.masked_nll` and the schedule's
    :func:`~ar_course.diffusion_lm.functional.loss_weight`."""
    weight = diffusion_lm.loss_weight(t, "linear")[:, None]  # (B, 1)
    return diffusion_lm.masked_nll(logits, targets, masked, weight) / targets.shape[1]  # (B,)


def reveal_step(x: torch.Tensor, proposal: torch.Tensor, t: float, s: float, mask_id: int, u: torch.Tensor
                ) -> torch.Tensor:
    """Exercise 8.6: one reverse step from ``t`` to ``s`` under the linear schedule, with the uniform draws ``u``
    ``(B, L)`` given: :func:`~ar_course.diffusion_lm.functional.denoise_step` (which draws ``u`` itself)."""
    return diffusion_lm.denoise_step(x, proposal, t, s, mask_id, "linear", u=u)


def block_schedule(length: int, block_size: int, steps: int) -> list[tuple[int, int, float, float]]:
    """Exercise 8.7: :func:`~ar_course.diffusion_lm.functional.block_schedule`."""
    return diffusion_lm.block_schedule(length, block_size, steps)
