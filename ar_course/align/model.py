"""Log-probabilities of data under the models GRPO and CCA fine-tune, the one quantity they train on: token maps
under the chapter 03 raster model, token pyramids under chapter 04's VAR."""

from __future__ import annotations

import torch

from ar_course.raster.functional import make_training_pairs, to_raster
from ar_course.raster.model import check_model_grid
from ar_course.tokenizers import MultiScaleVQ
from ar_course.transformer.model import GPT
from ar_course.utils import at_least_float32, check_ids
from ar_course.var import functional as var_ref
from ar_course.var.model import VAR, check_pyramid, check_tokenizer


def token_log_probs(model: GPT, token_maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``(B, h * w)``: the log-probability of every token of ``token_maps`` ``(B, h, w)`` under ``model`` given
    ``classes`` ``(B,)``, in raster order (one causal forward pass, with gradients if ``model`` has them), in
    float32 at least (a float64 model's in float64).

    Raises:
        TypeError: ``model`` is not a GPT.
        ValueError: ``token_maps`` not a ``(B, h, w)`` long tensor on the grid of a ``pos="rope2d"`` model
            (:func:`~ar_course.raster.model.check_model_grid`), a token of it (the last one too, which is only
            a target) outside ``[0, vocab_size)``, or as :meth:`GPT.forward` (classes).
    """
    if not isinstance(getattr(model, "_orig_mod", model), GPT):
        raise TypeError(f"model must be a class-conditional GPT (a raster model), got {type(model).__name__}")
    check_ids("token_maps", token_maps, model.config.vocab_size, ("B", "h", "w"))  # the last token is no input
    check_model_grid(model, "token_maps", token_maps.shape)
    inputs, targets = make_training_pairs(to_raster(token_maps))  # (B, L - 1), (B, L)
    logits, _ = model(inputs, classes=classes)  # (B, L, V)
    logp = torch.log_softmax(at_least_float32(logits), dim=-1)  # (B, L, V)
    return logp.gather(-1, targets[..., None]).squeeze(-1)  # (B, L)


def sequence_log_probs(model: GPT, token_maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the log-probability of each whole token map (the sum of :func:`token_log_probs`); raises as
    :func:`token_log_probs`."""
    return token_log_probs(model, token_maps, classes).sum(dim=-1)


def pyramid_token_log_probs(model: VAR, vq: MultiScaleVQ, pyramid: list[torch.Tensor],
                            classes: torch.Tensor) -> torch.Tensor:
    """``(B, L)``: the log-probability of every token of a teacher-forced ``pyramid`` (one ``(B, s_k, s_k)`` map
    per scale of ``vq``) under the VAR ``model`` given ``classes`` ``(B,)``, scale by scale, row-major (one
    block-causal forward pass, with gradients if ``model`` has them). ``-mean`` equals the first value
    :meth:`VAR.loss` returns (the mean over all tokens, without condition dropout).

    Raises as :meth:`VAR.loss` for a tokenizer or pyramid that does not fit the model, and as :meth:`VAR.forward`
    for bad ``classes``."""
    check_tokenizer(vq, model.config)
    check_pyramid("pyramid", pyramid, model.config)
    with torch.no_grad():
        inputs, targets = var_ref.teacher_forcing_sequence(vq, pyramid)  # (B, L - 1, D), (B, L)
    logp = torch.log_softmax(at_least_float32(model(inputs, classes)), dim=-1)  # (B, L, V)
    return logp.gather(-1, targets[..., None]).squeeze(-1)  # (B, L)


def pyramid_log_probs(model: VAR, vq: MultiScaleVQ, pyramid: list[torch.Tensor],
                      classes: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the log-probability of each whole pyramid (the sum of :func:`pyramid_token_log_probs`)."""
    return pyramid_token_log_probs(model, vq, pyramid, classes).sum(dim=-1)
