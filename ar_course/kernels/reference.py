"""Plain torch versions of every kernel: the definitions the kernels are tested against."""

from __future__ import annotations

import math

import torch

from .masks import MaskSpec, dense_mask


def pairwise_sqdist_reference(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, K) squared distances between rows of ``z`` (N, D) and ``codebook`` (K, D)."""
    return ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)


def vq_nearest_reference(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N,) int64 index of the nearest code for every row of ``z`` (N, D); ties go to the lowest index."""
    return torch.cdist(z, codebook).argmin(dim=-1)


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec = None, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention written out: q (B, H, T_q, D), k and v (B, H, T_k, D) -> (B, H, T_q, D).

    ``mask`` is None, ``"causal"``, a :class:`~ar_course.kernels.masks.BlockCausal` or a (T_q, T_k) bool
    tensor with True where attention is allowed.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T_q, T_k)
    allowed = dense_mask(mask, q.shape[-2], k.shape[-2], q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: int | torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One query per head over the first ``length`` cached keys.

    q (B, H, D); k_cache, v_cache (B, H, T_max, D); ``length`` an int or a (B,) tensor -> (B, H, D).
    """
    b, _, t_max, _ = k_cache.shape
    lengths = torch.as_tensor(length, device=q.device).expand(b)  # (B,)
    visible = torch.arange(t_max, device=q.device)[None, :] < lengths[:, None]  # (B, T_max)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (k_cache @ q[..., None]).squeeze(-1) * scale  # (B, H, T_max)
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    v = torch.where(visible[:, None, :, None], v_cache, 0.0)  # whatever lies past `length` is never read
    return (torch.softmax(scores, dim=-1)[:, :, None, :] @ v).squeeze(-2)  # (B, H, D)
