"""Chapter 05 reference that the library does not call.

* :func:`relaxed_acceptance_probability` -- exercise 5.7: the accept test of LANTERN-style relaxed
  speculative decoding as one function. The library's loops get the same numbers in two steps: they verify
  against :func:`~ar_course.speculative.functional.relaxed_target` with
  :func:`~ar_course.speculative.functional.acceptance_probability`, which is exactly what this function does.
* :func:`best_draft_length` -- exercise 5.5: the draft length that the cost model of
  :mod:`ar_course.speculative.analysis` predicts to be fastest, searched over
  :func:`~ar_course.speculative.analysis.expected_speedup` (the library leaves the choice of ``gamma`` to its
  caller).
"""

from __future__ import annotations

import torch

from ar_course.speculative.analysis import expected_speedup
from ar_course.speculative.functional import acceptance_probability, relaxed_target


def relaxed_acceptance_probability(
    p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor, neighbors: torch.Tensor, delta: float
) -> torch.Tensor:
    """``min(1, (p[x] + m) / q[x])`` with ``m = min(delta, sum of p over x's neighbours)``: ``(...)``.

    ``p``, ``q``: ``(..., V)`` target and draft distributions; ``tokens``: ``(...)`` long drafted tokens;
    ``neighbors``: ``(V, k)`` long. ``delta = 0`` is the exact test ``min(1, p[x] / q[x])``."""
    return acceptance_probability(relaxed_target(p, tokens, neighbors, delta), q, tokens)


def best_draft_length(alpha: float, c: float, max_gamma: int) -> tuple[int, float]:
    """``(gamma, speedup)``: the ``gamma`` in ``0..max_gamma`` with the largest predicted speedup
    ``expected_speedup(alpha, gamma, c)`` (``gamma = 0``: plain decoding, speedup 1), the smallest on ties."""
    speedups = [expected_speedup(alpha, gamma, c) for gamma in range(max_gamma + 1)]
    best = speedups.index(max(speedups))  # the first maximum: the smallest gamma on ties
    return best, speedups[best]
