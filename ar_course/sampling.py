"""Turning logits into tokens: greedy, temperature, top-k, top-p (nucleus), their composition, and
classifier-free guidance.

Every function works on batched logits ``(..., V)`` (usually ``(B, V)``). Filters return logits with
``-inf`` at excluded tokens, so they compose and a softmax afterwards gives the renormalised distribution.
The processing order is fixed: temperature, then top-k, then top-p (on the tempered distribution).

:func:`probs` returns the exact distribution :func:`sample` draws from; speculative decoding uses it to get
the target's ``p`` and the draft's ``q`` after identical processing.
"""

from __future__ import annotations

import torch


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Index of the largest logit: ``(..., V)`` -> ``(...)`` long (the first one on ties)."""
    return logits.argmax(dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` (``temperature > 0``); below 1 sharpens, above 1 flattens."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 here (use greedy for 0), got {temperature}")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to ``-inf``. ``(..., V)`` -> ``(..., V)``.

    Ties with the k-th largest value are all kept (so a row can keep more than ``k`` tokens when values
    tie): the result depends only on the values, never on the order of tied entries. ``k >= V`` keeps all."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sum reaches ``p``.

    Tokens are sorted by probability; a token is kept when the mass of the tokens before it is ``< p``, so
    the token that crosses the threshold is kept (the top token always is). Tokens tied with the least
    likely kept token are kept too. ``p = 1`` keeps every token. ``(..., V)`` -> ``(..., V)``."""
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # exclusive cumulative sum
    keep_sorted = mass_before < p
    # smallest kept probability per row; every token at least that likely stays
    threshold = torch.where(keep_sorted, sorted_probs, torch.ones_like(sorted_probs)).amin(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Temperature, then top-k, then top-p. ``temperature == 0`` means greedy: every logit but the argmax
    becomes ``-inf``. ``(..., V)`` float -> ``(..., V)`` float."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()
    if temperature == 0:
        best = greedy(logits)[..., None]  # (..., 1)
        return torch.full_like(logits, float("-inf")).scatter(-1, best, 0.0)
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """The distribution :func:`sample` draws from: ``softmax(process_logits(...))``, ``(..., V)``."""
    return torch.softmax(process_logits(logits, temperature, top_k, top_p), dim=-1)


def sample_from_probs(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of the (not necessarily normalised) distribution ``p`` ``(..., V)`` -> ``(...)`` long.

    Inverse-CDF sampling: one uniform number per row, scaled by the row's total, located in the running sum
    of ``p`` (``torch.multinomial`` draws ``V`` exponentials per row instead, ~30x slower on CPU for
    ``V = 256``). Zero-probability tokens are never drawn; every row needs a positive total."""
    flat = p.reshape(-1, p.shape[-1]).float()  # (N, V)
    cdf = flat.cumsum(dim=-1)  # (N, V)
    total = cdf[:, -1:]  # (N, 1)
    u = torch.rand(flat.shape[0], 1, generator=generator, device=p.device) * total  # (N, 1)
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total even after rounding
    # the first token whose running sum exceeds u; a zero-probability token never raises the running sum
    return torch.searchsorted(cdf, u, right=True).view(p.shape[:-1])  # (...)


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits`` ``(..., V)`` -> ``(...)`` long.

    ``temperature == 0`` is greedy (no random numbers drawn); otherwise the distribution is
    :func:`probs` ``(logits, temperature, top_k, top_p)``. ``generator`` makes draws reproducible."""
    if temperature == 0:
        return greedy(logits)
    return sample_from_probs(probs(logits, temperature, top_k, top_p), generator)


def cfg_mix(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``.

    ``scale = 1`` gives the conditional logits, ``0`` the unconditional ones, ``> 1`` pushes away from
    the unconditional prediction. Shapes ``(..., V)``."""
    if cond_logits.shape != uncond_logits.shape:
        raise ValueError(f"shapes differ: {tuple(cond_logits.shape)} vs {tuple(uncond_logits.shape)}")
    return uncond_logits + scale * (cond_logits - uncond_logits)
