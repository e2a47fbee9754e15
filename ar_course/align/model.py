"""Log-probabilities of token maps under the chapter 03 raster model, the one quantity GRPO and CCA train on."""

from __future__ import annotations

import torch

from ar_course.raster.functional import make_training_pairs, to_raster
from ar_course.transformer.model import GPT


def token_log_probs(model: GPT, token_maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``(B, h * w)``: the log-probability of every token of ``token_maps`` ``(B, h, w)`` under ``model`` given
    ``classes`` ``(B,)``, in raster order (one causal forward pass, with gradients if ``model`` has them)."""
    inputs, targets = make_training_pairs(to_raster(token_maps))  # (B, L - 1), (B, L)
    logits, _ = model(inputs, classes=classes)  # (B, L, V)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, L, V)
    return logp.gather(-1, targets[..., None]).squeeze(-1)  # (B, L)


def sequence_log_probs(model: GPT, token_maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the log-probability of each whole token map (the sum of :func:`token_log_probs`)."""
    return token_log_probs(model, token_maps, classes).sum(dim=-1)
