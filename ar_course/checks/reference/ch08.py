"""Chapter 08 reference that the library does not call in this form.

* :func:`neighbour_step_map` -- exercise 8.4: the pass at which each position is generated when every token
  waits for a given set of earlier neighbours. With the upper and left neighbours (the default) it is the
  library's next-neighbour (NAR) order, :func:`ar_course.raster.orders.schedule` ``("neighbour")`` and
  :func:`ar_course.masked.functional.neighbour_steps`, as a map: ``i + j``.
* :func:`mdlm_loss` -- exercise 8.5: the MDLM loss of each row under the linear schedule (the library's
  :class:`~ar_course.diffusion_lm.DiffusionLM` computes it inside its forward pass, for any schedule).
* :func:`reveal_step` -- exercise 8.6: one reverse step with the uniform draws given.
* :func:`block_schedule` -- exercise 8.7: :func:`ar_course.diffusion_lm.functional.block_schedule`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ar_course import diffusion_lm


def neighbour_step_map(h: int, w: int, neighbours: Sequence[tuple[int, int]] = ((-1, 0), (0, -1))) -> torch.Tensor:
    """Exercise 8.4: ``(h, w)`` long, the pass at which each position of an ``h x w`` map is generated when the
    token at ``(i, j)`` needs the tokens at ``(i + di, j + dj)`` for every ``(di, dj)`` in ``neighbours`` (those
    inside the map) and is generated as soon as they are known: pass 0 without any, else one more than the latest
    of them. Every offset must point to an earlier position in raster order (``di < 0``, or ``di == 0`` and
    ``dj < 0``), else ``ValueError``: a later one could make two tokens wait for each other."""
    for di, dj in neighbours:
        if not (di < 0 or (di == 0 and dj < 0)):
            raise ValueError(f"neighbour offset {(di, dj)} does not point to an earlier position in raster order")
    step = torch.zeros(h, w, dtype=torch.long)  # (h, w)
    for i in range(h):  # raster order: every neighbour's pass is known before the position's own
        for j in range(w):
            known = [int(step[i + di, j + dj]) for di, dj in neighbours if 0 <= i + di < h and 0 <= j + dj < w]
            step[i, j] = 1 + max(known) if known else 0
    return step


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
