"""Chapter 11 reference that the library does not call in this form.

* :func:`group_advantages` -- exercise 11.2: GRPO's advantages with the groups given by an id per sample (any
  order, any group sizes). The library's :func:`~ar_course.align.functional.group_advantages` takes the
  rewards already laid out as ``(N, G)``.
* :func:`grpo_rollout` -- exercise 11.4: the sampling half of :func:`~ar_course.align.grpo.grpo_step`.
* :func:`grpo_update` -- exercise 11.5: its optimizer half.
* :func:`cca_loss` -- exercise 11.6: CCA's loss from the two models and the data pairs, the body of
  :func:`~ar_course.align.cca.cca_step` before its optimizer step.
"""

from __future__ import annotations

from typing import Callable

import torch

from ar_course.align.functional import cca_loss as cca_loss_from_logratios
from ar_course.align.grpo import grpo_objective
from ar_course.align.model import token_log_probs
from ar_course.raster.model import generate_tokens
from ar_course.transformer.model import GPT


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``(B,)``: each of ``rewards`` ``(B,)`` minus the mean of its group, divided by the group's population
    standard deviation plus ``eps``; ``groups`` ``(B,)`` long holds each sample's group id (any values, any
    order). A group of one sample, or of equal rewards, gets advantages 0."""
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)  # (B,), (n,)
    counts = counts.to(rewards.dtype)
    mean = torch.zeros_like(counts).index_add_(0, inverse, rewards) / counts  # (n,)
    centred = rewards - mean[inverse]  # (B,)
    var = torch.zeros_like(counts).index_add_(0, inverse, centred**2) / counts  # (n,)
    return centred / (var.sqrt()[inverse] + eps)


def grpo_rollout(policy: GPT, reference: GPT, reward_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 group_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Sample ``group_size`` token maps per class from ``policy`` (one :func:`generate_tokens` call with
    ``generator``, classes ``arange(n_classes).repeat_interleave(group_size)``), score them with
    ``reward_fn(maps, classes)``, and return the batch the updates train on, without gradients: ``classes``,
    ``maps``, ``rewards``, ``advantages`` (grouped by class), ``logp_old`` (the policy's) and ``logp_ref`` (the
    reference's) per token."""
    device = next(policy.parameters()).device
    classes = torch.arange(policy.config.n_classes, device=device).repeat_interleave(group_size)  # (N * G,)
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        maps = generate_tokens(policy, classes, policy.config.grid, generator=generator)  # (N * G, h, w)
        rewards = reward_fn(maps, classes)  # (N * G,)
        advantages = group_advantages(rewards, classes)  # (N * G,)
        logp_old = token_log_probs(policy, maps, classes)  # (N * G, T)
        logp_ref = token_log_probs(reference, maps, classes)  # (N * G, T)
    policy.train(was_training)
    return {"classes": classes, "maps": maps, "rewards": rewards, "advantages": advantages,
            "logp_old": logp_old, "logp_ref": logp_ref}


def grpo_update(policy: GPT, optimizer: torch.optim.Optimizer, rollout: dict[str, torch.Tensor], clip: float = 0.2,
                kl_coef: float = 0.05, inner_steps: int = 2) -> list[float]:
    """``inner_steps`` optimizer steps on the GRPO loss of one ``rollout`` (:func:`grpo_rollout`): each step
    recomputes the policy's log-probabilities with gradients, against the fixed ``logp_old`` and ``logp_ref``,
    and clips the gradient norm to 1. Returns the loss of each step."""
    losses = []
    for _ in range(inner_steps):
        logp = token_log_probs(policy, rollout["maps"], rollout["classes"])  # (B, T)
        loss, _ = grpo_objective(logp, rollout["logp_old"], rollout["logp_ref"], rollout["advantages"], clip,
                                 kl_coef)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def cca_loss(policy: GPT, reference: GPT, maps: torch.Tensor, classes: torch.Tensor, negatives: torch.Tensor,
             beta: float = 0.02, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, logratio_pos, logratio_neg)``: CCA's loss (a scalar with gradients to ``policy``) and the
    log-ratios ``log p(x | c) - log p_ref(x | c)`` ``(B,)`` of the data ``maps`` ``(B, h, w)`` with their
    ``classes`` (positives) and with the wrong ``negatives`` (negatives), each the sum over the map's tokens."""
    both_maps, both_classes = torch.cat([maps, maps]), torch.cat([classes, negatives])  # (2B, h, w), (2B,)
    with torch.no_grad():
        ref = token_log_probs(reference, both_maps, both_classes).sum(1)  # (2B,)
    pos, neg = (token_log_probs(policy, both_maps, both_classes).sum(1) - ref).chunk(2)  # (B,), (B,)
    return cca_loss_from_logratios(pos, neg, beta, lam), pos, neg
