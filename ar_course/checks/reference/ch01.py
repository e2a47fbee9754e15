"""Chapter 01 references that the quantizers do not call.

* :func:`codebook_usage` -- exercise 1.4: :func:`ar_course.metrics.codebook_usage` as a
  ``(fraction_used, perplexity)`` pair.
* :func:`multiscale_decode` -- exercise 1.10: the decoder side of
  :func:`ar_course.tokenizers.functional.multiscale_encode` on a plain codebook and refinements
  (:meth:`ar_course.tokenizers.MultiScaleVQ.decode` does it scale by scale on its own parameters).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ar_course import metrics
from ar_course.tokenizers.functional import Refinement, check_index_maps, embed_indices, upsample_bicubic


def codebook_usage(indices: torch.Tensor, num_codes: int) -> tuple[float, float]:
    """How much of a codebook of ``num_codes`` codes the integer tensor ``indices`` (any shape) uses.

    Returns ``(fraction_used, perplexity)``: the fraction of the codes that appear at least once, and
    ``exp(entropy)`` of the empirical code distribution (natural log), the effective number of codes: 1 when
    a single code is used, ``num_codes`` when all are used equally often. Raises ``ValueError`` as
    :func:`ar_course.metrics.codebook_usage` does."""
    usage = metrics.codebook_usage(indices, num_codes)
    return usage["fraction_used"], usage["perplexity"]


def multiscale_decode(
    indices: Sequence[torch.Tensor], codebook: torch.Tensor, phis: Sequence[Refinement]
) -> torch.Tensor:
    """Rebuild ``f_hat`` ``(B, C, H, H)`` from one index map ``(B, s_k, s_k)`` per scale (``H`` is the last
    map's side), with ``codebook`` ``(K, C)`` and one refinement per scale.

    ``f_hat = sum_k phis[k](upsample(codebook[indices[k]]))``: the decoder side of
    :func:`~ar_course.tokenizers.functional.multiscale_encode`."""
    check_index_maps(indices, codebook, phis)
    side = indices[-1].shape[-1]
    f_hat = 0
    for idx, phi in zip(indices, phis):
        f_hat = f_hat + phi(upsample_bicubic(embed_indices(idx, codebook), side))
    return f_hat
