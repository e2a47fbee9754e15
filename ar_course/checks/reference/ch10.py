"""Chapter 10 reference that the library does not call in this form.

* :func:`lfq_entropy_terms` -- exercise 10.3: LFQ's two entropies by brute force over the ``2^d`` sign codes
  (the explicit softmax over distances). The library's
  :func:`~ar_course.tokenizers.functional.lfq_entropy_terms` computes the same numbers with the per-sample term
  factorised into ``d`` binary entropies and the batch average in chunks.
"""

from __future__ import annotations

import torch

from ar_course.tokenizers.functional import lfq_indices_to_codes


def lfq_entropy_terms(z: torch.Tensor, temperature: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_sample, codebook)`` of ``z`` ``(N, d)``: with ``p(c | z) = softmax_c(-|z - c|^2 / temperature)`` over
    the sign codes ``c``, the mean over vectors of ``H(p(. | z))`` and the entropy ``H(mean_z p(. | z))``, in nats."""
    d = z.shape[1]
    codes = lfq_indices_to_codes(torch.arange(2**d), d, z.dtype)  # (2^d, d)
    dist = (z[:, None, :] - codes[None, :, :]).pow(2).sum(-1)  # (N, 2^d)
    p = torch.softmax(-dist / temperature, dim=1)  # (N, 2^d)
    per_sample = -(p * torch.log_softmax(-dist / temperature, dim=1)).sum(1).mean()
    avg = p.mean(0)  # (2^d,)
    codebook = -(avg * avg.clamp_min(1e-12).log()).sum()
    return per_sample, codebook
