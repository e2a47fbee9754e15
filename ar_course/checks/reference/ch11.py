"""Chapter 11 reference that the library does not call in this form.

* :func:`group_advantages` -- exercise 11.2: GRPO's advantages with the groups given by an id per sample (any
  order, any group sizes). The library's :func:`~ar_course.align.functional.group_advantages` takes the
  rewards already laid out as ``(N, G)``.
* :func:`grpo_update` -- exercise 11.5: the losses of :func:`~ar_course.align.grpo.grpo_update` (the library
  also returns each step's KL).

Exercise 11.4 is :func:`~ar_course.align.grpo.grpo_rollout` and 11.6 is
:func:`~ar_course.align.cca.cca_batch_loss`, as the library has them.
"""

from __future__ import annotations

import torch

from ar_course.align.grpo import grpo_update as library_update
from ar_course.transformer.model import GPT


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``(B,)``: each of ``rewards`` ``(B,)`` minus the mean of its group, divided by the group's population
    standard deviation plus ``eps``; ``groups`` ``(B,)`` long holds each sample's group id (any values, any
    order). A group of one sample, or of equal rewards, gets advantages 0 up to rounding (the float32 mean of
    seven 0.9s is an ulp off 0.9, ~6e-4 once divided by ``eps``: the check allows it; the library's
    :func:`~ar_course.align.functional.group_advantages` returns exact zeros)."""
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)  # (B,), (n,)
    counts = counts.to(rewards.dtype)
    mean = torch.zeros_like(counts).index_add_(0, inverse, rewards) / counts  # (n,)
    centred = rewards - mean[inverse]  # (B,)
    var = torch.zeros_like(counts).index_add_(0, inverse, centred**2) / counts  # (n,)
    return centred / (var.sqrt()[inverse] + eps)


def grpo_update(policy: GPT, optimizer: torch.optim.Optimizer, rollout: dict[str, torch.Tensor], clip: float = 0.2,
                kl_coef: float = 0.05, inner_steps: int = 2) -> list[float]:
    """Exercise 11.5: the losses of the library's :func:`~ar_course.align.grpo.grpo_update` (which also reports
    each step's KL)."""
    return [loss for loss, _ in library_update(policy, optimizer, rollout, clip, kl_coef, inner_steps)]
