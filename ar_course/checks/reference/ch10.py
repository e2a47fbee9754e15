"""Chapter 10 reference that the library does not call in this form.

* :func:`lfq_entropy_terms` -- exercise 10.3: LFQ's two entropies by brute force over the ``2^d`` sign codes
  (the explicit softmax over distances). The library's
  :func:`~ar_course.tokenizers.functional.lfq_entropy_terms` computes the same numbers with the per-sample term
  factorised into ``d`` binary entropies and the batch average in chunks.
* :func:`flow_matching_loss` -- exercise 10.5: the library's
  :func:`~ar_course.continuous.functional.flow_matching_loss` with the noise and times given as arguments.
* :func:`guided_euler_sample` -- exercise 10.6: the sampler of one token, the library's
  :func:`~ar_course.continuous.functional.euler_sample` of
  :func:`~ar_course.continuous.functional.guided_velocity`, as :func:`ar_course.continuous.generate_tokens` runs it
  (the conditional head alone at ``w = 0``).
"""

from __future__ import annotations

from typing import Callable

import torch

from ar_course.continuous import functional as cref
from ar_course.tokenizers.functional import lfq_indices_to_codes


def lfq_entropy_terms(z: torch.Tensor, temperature: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_sample, codebook)`` of ``z`` ``(N, d)``: with ``p(c | z) = softmax_c(-|z - c|^2 / temperature)`` over
    the sign codes ``c``, the mean over vectors of ``H(p(. | z))`` and the entropy ``H(mean_z p(. | z))``, in nats."""
    d = z.shape[1]
    codes = lfq_indices_to_codes(torch.arange(2**d, device=z.device), d, z.dtype)  # (2^d, d)
    dist = (z[:, None, :] - codes[None, :, :]).pow(2).sum(-1)  # (N, 2^d)
    p = torch.softmax(-dist / temperature, dim=1)  # (N, 2^d)
    per_sample = -(p * torch.log_softmax(-dist / temperature, dim=1)).sum(1).mean()
    avg = p.mean(0)  # (2^d,)
    codebook = -(avg * avg.clamp_min(1e-12).log()).sum()
    return per_sample, codebook


def flow_matching_loss(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x1: torch.Tensor,
                       x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The flow-matching loss of data ``x1`` ``(N, D)`` with noise ``x0`` ``(N, D)`` and times ``t`` ``(N,)``: a
    scalar, the mean over tokens and channels of ``(velocity(x_t, t) - (x1 - x0))^2``."""
    return cref.flow_matching_loss(velocity, x1, noise=(x0, t))


def guided_euler_sample(head: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                        cond: torch.Tensor, uncond: torch.Tensor, steps: int, *, w: float) -> torch.Tensor:
    """``steps`` Euler steps from ``x0`` ``(N, D)`` at ``t = 0`` to ``t = 1`` along the guided velocity
    ``(1 + w) head(x, t, cond) - w head(x, t, uncond)``, one head call per step (on ``2N`` rows, or on the ``N``
    conditional rows alone when ``w = 0``). Returns ``(N, D)``."""
    if w == 0:
        return cref.euler_sample(lambda x, t: head(x, t, cond), x0, steps)
    return cref.euler_sample(lambda x, t: cref.guided_velocity(head, x, t, cond, uncond, w=w), x0, steps)
