"""Chapter 03 reference that the library does not call.

* :func:`from_order` -- exercise 3.1: a sequence generated in any order back to its token map. The library
  only samples in raster order, where this is :func:`ar_course.raster.functional.from_raster`, which it
  ends with.
* :func:`training_loss` -- exercise 3.2: the teacher-forced loss of a batch of maps with condition dropout,
  which the library's trainer builds from :mod:`ar_course.raster.functional` (raster order, training pairs,
  condition dropout).
* :func:`sample_tokens` -- exercise 3.3: the guided sampling loop over a raster sequence, which the library
  runs inside :meth:`ar_course.transformer.GPT.generate` (and :func:`ar_course.raster.generate_tokens` on
  top of it).
"""

from __future__ import annotations

import torch

from ar_course.raster.functional import condition_dropout, from_raster, make_training_pairs, to_raster
from ar_course.sampling import SamplingConfig
from ar_course.transformer.model import GPT


def from_order(seq: torch.Tensor, order: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(B, h, w)`` map from ``seq`` ``(B, h*w)`` whose step ``k`` generated raster position ``order[k]``.

    ``order``: ``(h*w,)`` long, a permutation of ``0..h*w-1`` (``arange`` is raster order)."""
    flat = torch.empty_like(seq)  # (B, h*w), raster order
    flat[:, order] = seq  # the token of step k lands on raster position order[k]
    return from_raster(flat, h, w)  # (B, h, w)


def training_loss(
    model: GPT,
    maps: torch.Tensor,
    classes: torch.Tensor,
    *,
    p_uncond: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy (a scalar tensor) of token maps ``(B, h, w)`` given ``classes`` ``(B,)``.

    The maps are read in raster order; each class becomes ``model.null_class`` where one uniform number per
    example, ``torch.rand(B, generator=generator)``, is below ``p_uncond``; the class position predicts the
    first token, so the inputs are ``seq[:, :-1]`` and the targets all of ``seq``."""
    dropped = condition_dropout(classes, p_uncond, model.null_class, generator)  # (B,)
    inputs, targets = make_training_pairs(to_raster(maps))  # (B, L - 1), (B, L)
    _, loss = model(inputs, targets=targets, classes=dropped)
    return loss


@torch.no_grad()
def sample_tokens(
    model: GPT,
    classes: torch.Tensor,
    num_tokens: int,
    *,
    cfg: float = 0.0,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``num_tokens`` image tokens per class ``(B,)`` with a KV cache and classifier-free guidance of
    strength ``cfg = w``.

    The conditional and the null-class sequences run in one doubled batch of ``2B`` rows (rows ``B..2B-1``
    get ``model.null_class``): the first forward pass takes only the class token, every later pass only the
    token sampled last, so there are exactly ``num_tokens`` forward passes. At each step the last logits are
    mixed with :func:`ar_course.sampling.cfg_mix` (``(1 + w) cond - w uncond``), one token per class is drawn
    with ``sample(logits, sampling=sampling, generator=generator)`` and fed to both halves. (``w = 0`` needs
    no second half: the library skips it, and the tokens are the same.)

    Returns ``(B, num_tokens)`` long tokens in raster order. Raises ``ValueError`` for a GPT without classes
    and as :meth:`~ar_course.transformer.GPT.generate` for the rest."""
    if model.config.n_classes == 0:
        raise ValueError("sample_tokens needs a class-conditional GPT (n_classes > 0)")
    start = torch.zeros(classes.shape[0], 0, dtype=torch.long, device=classes.device)  # (B, 0)
    return model.generate(start, num_tokens, sampling=sampling, cfg=cfg, classes=classes, generator=generator,
                          use_cache=True)  # (B, num_tokens)
