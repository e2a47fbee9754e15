"""Plain reference functions of chapter 03; the chapter's exercises are checked against them.

* :func:`to_raster` / :func:`from_raster` -- a token map ``(B, h, w)`` as a sequence ``(B, h*w)`` and back.
* :func:`make_training_pairs` -- next-token inputs and targets with the class as the first token.
* :func:`condition_dropout` -- replace a random fraction of the classes by the null class.
* :func:`cfg_logits` -- classifier-free guidance on logits.
* :func:`sample_tokens` -- the sampling loop over a token map: one forward pass per token, a KV cache, and
  the conditional and null-class sequences in one doubled batch.
"""

from __future__ import annotations

import torch

from ar_course import sampling
from ar_course.transformer.model import GPT


def _check_long(x: torch.Tensor, ndim: int, name: str, shape: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != ndim or x.dtype != torch.long:
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a long tensor of shape {shape}, got {got}")


def to_raster(token_map: torch.Tensor) -> torch.Tensor:
    """Flatten a token map ``(B, h, w)`` into raster order ``(B, h*w)``: row 0 left to right, then row 1...

    Token ``(i, j)`` lands at position ``i * w + j``."""
    _check_long(token_map, 3, "token_map", "(B, h, w)")
    B, h, w = token_map.shape
    return token_map.reshape(B, h * w)  # (B, h*w)


def from_raster(seq: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_raster`: a raster sequence ``(B, h*w)`` back to a token map ``(B, h, w)``."""
    _check_long(seq, 2, "seq", "(B, h*w)")
    if seq.shape[1] != h * w:
        raise ValueError(f"a {h}x{w} map has {h * w} tokens, the sequence has {seq.shape[1]}")
    return seq.reshape(seq.shape[0], h, w)  # (B, h, w)


def make_training_pairs(
    tokens: torch.Tensor, classes: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token training pairs for a class-conditional model whose class is an extra vocabulary entry.

    Args:
        tokens: ``(B, L)`` long image tokens in ``[0, vocab_size)``.
        classes: ``(B,)`` long class ids (the null class included), written as token ``vocab_size + class``.
        vocab_size: number of image tokens.

    Returns:
        ``inputs (B, L)``: the class token followed by ``tokens[:, :-1]``; ``targets (B, L)``: ``tokens``.
        Position ``t`` of ``inputs`` has seen the class and the first ``t`` image tokens and must predict
        image token ``t``; the class token itself is never a target.
    """
    _check_long(tokens, 2, "tokens", "(B, L)")
    _check_long(classes, 1, "classes", "(B,)")
    if classes.shape[0] != tokens.shape[0]:
        raise ValueError(f"{tokens.shape[0]} sequences but {classes.shape[0]} classes")
    class_token = (classes + vocab_size)[:, None]  # (B, 1)
    inputs = torch.cat([class_token, tokens[:, :-1]], dim=1)  # (B, L)
    return inputs, tokens.clone()


def condition_dropout(
    classes: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each class by ``null_class`` with probability ``p`` (training for classifier-free guidance).

    One uniform number per example, ``torch.rand(B, generator=generator)``, drawn on the CPU; example ``b``
    is dropped when its number is ``< p``. Returns a new ``(B,)`` long tensor; ``classes`` is unchanged."""
    _check_long(classes, 1, "classes", "(B,)")
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    drop = torch.rand(classes.shape[0], generator=generator) < p  # (B,)
    return torch.where(drop.to(classes.device), torch.full_like(classes, null_class), classes)


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``, shapes ``(..., V)``.

    ``scale = 1``: the conditional logits; ``0``: the unconditional ones; ``> 1``: pushed further from the
    unconditional prediction (sharper class, less diversity)."""
    return sampling.cfg_mix(cond, uncond, scale)


@torch.no_grad()
def sample_tokens(
    model: GPT,
    classes: torch.Tensor,
    num_tokens: int,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``num_tokens`` image tokens per class with a KV cache and classifier-free guidance.

    The conditional and the null-class sequences run in one doubled batch of ``2B`` rows (rows ``B..2B-1``
    get ``model.null_class``): the first forward pass takes only the class token, every later pass only the
    token sampled last, so there are exactly ``num_tokens`` forward passes. At each step the last logits are
    mixed with :func:`cfg_logits`, one token per class is drawn with
    ``sampling.sample(logits, temperature, top_k, None, generator)``, and fed to both halves.

    Args:
        model: a class-conditional :class:`GPT` (``n_classes > 0``).
        classes: ``(B,)`` long.
    Returns:
        ``(B, num_tokens)`` long tokens in raster order.
    """
    _check_long(classes, 1, "classes", "(B,)")
    if model.config.n_classes == 0:
        raise ValueError("sample_tokens needs a class-conditional GPT (n_classes > 0)")
    start = torch.zeros(classes.shape[0], 0, dtype=torch.long, device=classes.device)  # (B, 0)
    out = model.generate(start, num_tokens, temperature=temperature, top_k=top_k, generator=generator,
                         classes=classes, cfg_scale=cfg_scale, use_cache=True)
    return out  # (B, num_tokens)
