"""Chapter 02 references that the transformer modules do not call: functional versions of what
:mod:`ar_course.transformer.model` does inside its modules, built from the library's pieces.

* :func:`rotary_embedding` -- exercise 2.4: :func:`~ar_course.transformer.functional.rope_angles` then
  :func:`~ar_course.transformer.functional.apply_rope` (what :class:`~ar_course.transformer.Rotary` does).
* :func:`self_attention` -- exercise 2.5: a :class:`~ar_course.transformer.model.SelfAttention` layer run at
  rotary ``positions`` (only the signature is adapted).
* :func:`transformer_block` -- exercise 2.7: a :class:`~ar_course.transformer.model.Block` run at rotary
  ``positions`` (only the signature is adapted).
* :func:`gpt_forward` -- exercise 2.8: the logits of :meth:`~ar_course.transformer.GPT.forward`.
* :func:`train_step` -- exercise 2.9: one optimisation step on a window of tokens, what
  :func:`ar_course.train.train_loop` does each step with a next-token loss.
* :func:`cached_attention` -- exercise 2.10: attention over a preallocated KV cache, as
  :class:`~ar_course.transformer.KVCache` and :class:`~ar_course.transformer.SelfAttention` do it.
"""

from __future__ import annotations

from typing import Callable

import torch

import torch.nn.functional as F

from ar_course.transformer.functional import apply_rope, causal_mask, rope_angles, scaled_dot_product_attention
from ar_course.transformer.model import GPT, Block, SelfAttention


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """1D rotary position embedding of ``x`` ``(..., T, D)`` at integer ``positions`` ``(T,)``."""
    cos, sin = rope_angles(positions, x.shape[-1], base)
    return apply_rope(x, cos, sin)


def self_attention(x: torch.Tensor, attn: SelfAttention, positions: torch.Tensor) -> torch.Tensor:
    """Causal multi-head self-attention of ``x`` ``(B, T, C)`` with the weights of ``attn`` (``attn.qkv``,
    ``attn.proj``, ``attn.n_head`` heads), queries and keys rotated at ``positions`` ``(T,)``. ``(B, T, C)``."""
    cos, sin = rope_angles(positions, x.shape[-1] // attn.n_head)  # (T, D/2) each
    return attn(x, rope=(cos, sin), causal=True)


def transformer_block(x: torch.Tensor, block: Block, positions: torch.Tensor) -> torch.Tensor:
    """The pre-norm block ``block`` on ``x`` ``(B, T, C)`` at rotary ``positions`` ``(T,)``:
    ``h = x + attn(norm1(x))`` then ``h + mlp(norm2(h))``. ``(B, T, C)``."""
    cos, sin = rope_angles(positions, x.shape[-1] // block.attn.n_head)  # (T, D/2) each
    return block(x, rope=(cos, sin), causal=True)


def gpt_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, T, V)`` of the unconditional rotary GPT ``model`` for token ids ``idx`` ``(B, T)``."""
    return model(idx)[0]


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    chunk: torch.Tensor,
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    max_norm: float = 1.0,
) -> float:
    """One optimisation step of next-token prediction on ``chunk`` ``(B, T + 1)`` token ids.

    ``forward(model, idx)`` gives logits ``(B, T, V)`` for ``idx = chunk[:, :-1]``; the targets are
    ``chunk[:, 1:]`` (position t predicts token t + 1). Clears the old gradients, back-propagates the mean
    cross-entropy, clips the gradient norm to ``max_norm`` and steps the optimizer. Returns the loss (before
    the step) as a float."""
    optimizer.zero_grad(set_to_none=True)
    logits = forward(model, chunk[:, :-1])  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    return loss.item()


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
