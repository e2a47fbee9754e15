"""Chapter 05 reference that the library does not call.

* :func:`relaxed_acceptance_probability` -- exercise 5.7: the accept test of LANTERN-style relaxed
  speculative decoding as one function. The library's loops get the same numbers in two steps: they verify
  against :func:`~ar_course.speculative.functional.relaxed_target` with
  :func:`~ar_course.speculative.functional.acceptance_probability`, which is exactly what this function does.
"""

from __future__ import annotations

import torch

from ar_course.speculative.functional import acceptance_probability, relaxed_target


def relaxed_acceptance_probability(
    p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor, neighbors: torch.Tensor, delta: float
) -> torch.Tensor:
    """``min(1, (p[x] + m) / q[x])`` with ``m = min(delta, sum of p over x's neighbours)``: ``(...)``.

    ``p``, ``q``: ``(..., V)`` target and draft distributions; ``tokens``: ``(...)`` long drafted tokens;
    ``neighbors``: ``(V, k)`` long. ``delta = 0`` is the exact test ``min(1, p[x] / q[x])``."""
    return acceptance_probability(relaxed_target(p, tokens, neighbors, delta), q, tokens)
