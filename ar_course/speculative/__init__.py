"""Speculative decoding (chapter 05): lossless speedups for text with a draft model, and Speculative Jacobi
Decoding with optional LANTERN-style relaxed acceptance for image tokens.

``functional`` holds the small pieces (the exercises' references); ``decoding`` the generation loops.
"""

from .decoding import SpecStats, sjd_generate, speculative_generate
from .functional import (
    acceptance_probability,
    codebook_neighbors,
    expected_speedup,
    expected_tokens_per_call,
    jacobi_verify,
    relaxed_acceptance_probability,
    relaxed_target,
    residual_distribution,
    rollback_caches,
    speculative_round,
)

__all__ = [
    "SpecStats", "speculative_generate", "sjd_generate",
    "acceptance_probability", "residual_distribution", "speculative_round", "rollback_caches",
    "expected_tokens_per_call", "expected_speedup", "jacobi_verify",
    "codebook_neighbors", "relaxed_target", "relaxed_acceptance_probability",
]
