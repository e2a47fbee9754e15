"""Speculative decoding (chapter 05): lossless speedups for text with a draft model, and Speculative Jacobi
Decoding with optional LANTERN-style relaxed acceptance for image tokens.

``functional`` holds the small pieces the loops are built from; ``decoding`` the generation loops;
``analysis`` the analytic model of the speedup.
"""

from .analysis import expected_speedup, expected_tokens_per_call
from .decoding import SpecStats, sjd_generate, speculative_generate
from .functional import (
    acceptance_probability,
    accepted_prefix,
    codebook_neighbors,
    jacobi_verify,
    relaxed_target,
    residual_distribution,
    rollback_caches,
    speculative_round,
)

__all__ = [
    "SpecStats", "speculative_generate", "sjd_generate",
    "acceptance_probability", "accepted_prefix", "residual_distribution", "speculative_round", "rollback_caches",
    "expected_tokens_per_call", "expected_speedup", "jacobi_verify",
    "codebook_neighbors", "relaxed_target",
]
