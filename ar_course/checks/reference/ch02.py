"""Chapter 02 references that the transformer modules do not call: functional versions of what
:mod:`ar_course.transformer.model` does inside its modules, built from the library's pieces.

* :func:`rotary_embedding` -- exercise 2.7: :func:`~ar_course.transformer.functional.rope_angles` then
  :func:`~ar_course.transformer.functional.apply_rope` (what :class:`~ar_course.transformer.Rotary` does).
* :func:`pre_norm_block` -- exercise 2.8: the residual wiring of :class:`~ar_course.transformer.Block`.
* :func:`cached_attention` -- exercise 2.9: attention over a preallocated KV cache, as
  :class:`~ar_course.transformer.KVCache` and :class:`~ar_course.transformer.SelfAttention` do it.
"""

from __future__ import annotations

from typing import Callable

import torch

from ar_course.transformer.functional import apply_rope, causal_mask, rope_angles, scaled_dot_product_attention


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """1D rotary position embedding of ``x`` ``(..., T, D)`` at integer ``positions`` ``(T,)``."""
    cos, sin = rope_angles(positions, x.shape[-1], base)
    return apply_rope(x, cos, sin)


def pre_norm_block(
    x: torch.Tensor,
    norm1: Callable[[torch.Tensor], torch.Tensor],
    attn: Callable[[torch.Tensor], torch.Tensor],
    norm2: Callable[[torch.Tensor], torch.Tensor],
    mlp: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """One pre-norm transformer block on ``x`` ``(B, T, C)``: normalise, transform, add back.

    ``h = x + attn(norm1(x))`` then ``h + mlp(norm2(h))``. The residual stream itself is never
    normalised, which keeps gradients well behaved in deep stacks."""
    h = x + attn(norm1(x))
    return h + mlp(norm2(h))


def cached_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: int,
) -> torch.Tensor:
    """Attention for ``T`` new tokens against a preallocated KV cache (one decode step when ``T = 1``).

    Args:
        q, k_new, v_new: ``(B, H, T, D)`` for the new tokens, which sit at positions ``pos .. pos+T-1``.
        k_cache, v_cache: ``(B, H, L_max, D)`` buffers holding positions ``0 .. pos-1``; the new keys and
            values are written **in place** at ``pos .. pos+T-1``.
        pos: number of positions already in the cache.

    Returns:
        ``(B, H, T, D)``: each new token attends causally to positions ``0 .. its own position``.
    """
    T = q.shape[-2]
    if pos + T > k_cache.shape[-2]:
        raise ValueError(f"cache holds {k_cache.shape[-2]} positions, cannot write {T} at position {pos}")
    k_cache[:, :, pos : pos + T] = k_new
    v_cache[:, :, pos : pos + T] = v_new
    k = k_cache[:, :, : pos + T]  # (B, H, pos+T, D)
    v = v_cache[:, :, : pos + T]  # (B, H, pos+T, D)
    return scaled_dot_product_attention(q, k, v, causal_mask(T, pos + T, device=q.device))
