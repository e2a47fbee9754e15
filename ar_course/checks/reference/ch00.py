"""Chapter 00's warm-ups: the references of exercises 0.1-0.3.

The library turns logits into probabilities with :func:`ar_course.transformer.functional.masked_softmax`,
into tokens with :mod:`ar_course.sampling` (inverse-CDF draws) and into a loss with
``torch.nn.functional.cross_entropy``. The exercises write the three operations out, with the numerics that
make them safe:

* :func:`stable_softmax` -- the library's masked softmax along any ``dim``: the maximum is subtracted before
  ``exp``, so logits of any size work, and ``-inf`` rules a token out (a slice of nothing but ``-inf`` gives
  zeros, not NaN).
* :func:`sample_categorical` -- one token per row by the Gumbel-max trick, one of the two methods the exercise
  describes (its check accepts any exact sampler); temperature 0 is greedy.
* :func:`cross_entropy_from_logits` -- ``logsumexp - logit of the target`` per row, averaged over the rows
  whose target is not ``ignore_index``.
"""

from __future__ import annotations

import torch

from ar_course.transformer.functional import masked_softmax


def stable_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of ``logits`` along ``dim``, computed as ``exp(x - max) / sum(exp(x - max))``.

    ``logits``: a floating-point tensor of any shape; entries may be ``-inf`` (probability exactly 0).
    A slice along ``dim`` whose entries are all ``-inf`` has no probability mass to share and gives all
    zeros. Returns a tensor of the same shape, dtype and device whose slices along ``dim`` sum to 1 (or 0).
    The numerics are those of :func:`ar_course.transformer.functional.masked_softmax`, which attention uses.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {_describe(logits)}")
    if logits.ndim == 0:
        raise ValueError("logits must have at least one dimension to normalise over")
    return masked_softmax(logits.movedim(dim, -1)).movedim(-1, dim)  # the library's max-subtracted softmax


def sample_categorical(
    logits: torch.Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from ``softmax(logits / temperature)``: ``(B, V)`` float -> ``(B,)`` int64.

    Method (Gumbel-max): add independent standard Gumbel noise ``g = -log(-log u)``, ``u ~ U(0, 1)``, to
    the tempered logits and take the argmax of each row; the argmax then lands on token ``i`` with
    probability exactly ``softmax(logits / temperature)[i]``. ``-inf`` logits are never drawn.
    ``temperature == 0`` is greedy decoding (the first index of the largest logit; no random numbers are
    drawn); a negative temperature is a ``ValueError``. ``generator`` (a ``torch.Generator`` on the
    device of ``logits``) makes the draws reproducible.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim != 2:
        raise ValueError(f"logits must be a floating-point tensor of shape (B, V), got {_describe(logits)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature  # (B, V); float16 logits would make the noise too coarse
    u = torch.rand(scores.shape, generator=generator, device=scores.device)  # (B, V) in [0, 1)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))  # (B, V)
    return (scores + gumbel).argmax(dim=-1)  # (B,)


def cross_entropy_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits)``: a 0-d tensor.

    ``logits``: ``(N, V)`` float; ``targets``: ``(N,)`` integer class indices in ``0..V-1``, or
    ``ignore_index`` for rows that do not count (padding). Per row the loss is
    ``logsumexp(logits[n]) - logits[n, targets[n]]``, with the log-sum-exp computed after subtracting the
    row maximum so that large logits cannot overflow. The result is the mean over the counted rows, in the
    dtype of ``logits`` (NaN when no row counts, as in ``torch.nn.functional.cross_entropy``).
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim != 2:
        raise ValueError(f"logits must be a floating-point tensor of shape (N, V), got {_describe(logits)}")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.ndim != 1:
        raise ValueError(f"targets must be an integer tensor of shape (N,), got {_describe(targets)}")
    n, vocab = logits.shape
    if targets.shape[0] != n:
        raise ValueError(f"logits has {n} rows but targets has {targets.shape[0]} entries")
    counted = targets != ignore_index  # (N,) bool
    if bool(((targets < 0) | (targets >= vocab))[counted].any()):
        bad = targets[counted & ((targets < 0) | (targets >= vocab))][0].item()
        raise ValueError(f"target {bad} is outside 0..{vocab - 1} and is not ignore_index ({ignore_index})")
    top = logits.amax(dim=-1, keepdim=True).detach()  # (N, 1); a constant shift leaves the result unchanged
    log_norm = top.squeeze(-1) + torch.log(torch.exp(logits - top).sum(dim=-1))  # (N,) logsumexp per row
    safe = torch.where(counted, targets, torch.zeros_like(targets)).long()  # (N,) any valid index if ignored
    picked = logits.gather(1, safe[:, None]).squeeze(1)  # (N,) logit of the target
    per_row = torch.where(counted, log_norm - picked, torch.zeros_like(picked))  # (N,)
    return per_row.sum() / counted.sum().to(logits.dtype)


def _describe(x: object) -> str:
    """``Tensor(3, 4) float32`` or the type name, for error messages."""
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    return type(x).__name__
