"""Plain torch versions of every kernel: the definitions the kernels are tested against."""

from __future__ import annotations

import torch

from .masks import MaskSpec, dense_mask


def pairwise_sqdist_reference(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, K) squared distances between rows of ``z`` (N, D) and ``codebook`` (K, D)."""
    return ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)


def vq_nearest_reference(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``(...)`` int64 index of the nearest code for every vector of ``z`` ``(..., D)``; ties go to the lowest index.

    Raises ``TypeError`` for inputs that are not torch tensors and ``ValueError`` for a non-float dtype, a
    ``codebook`` that is not (K, D) with K, D >= 1, a ``z`` that does not end in the codebook's D, or inputs on
    two devices (the checks of :func:`~.ops.vq_nearest`)."""
    from .ops import _check_vq  # here: ops imports this module

    _check_vq(z, codebook)
    return _nearest_rows(z.reshape(-1, z.shape[-1]), codebook).reshape(z.shape[:-1])  # (N, D) -> (N,) -> (...)


def _nearest_rows(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """:func:`vq_nearest_reference` of checked rows ``flat`` ``(N, D)``: ``(N,)`` (what ``vq_nearest``'s torch
    path runs, having checked its input once)."""
    return torch.cdist(flat, codebook).argmin(dim=-1)


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec = None, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention written out: q (B, H, T_q, D), k and v (B, H, T_k, D) -> (B, H, T_q, D).

    ``mask`` is None, ``"causal"``, a :class:`~ar_course.kernels.masks.BlockCausal` or a (T_q, T_k) bool
    tensor with True where attention is allowed.

    Raises as :func:`~.ops.flash_attention` does: ``TypeError`` for q, k, v that are not torch tensors or a
    ``scale`` that is not a number, ``ValueError`` for bad shapes, dtypes, devices, masks or a ``scale`` that is not
    a finite number > 0.
    """
    from .ops import _check_attention, _scale  # here: ops imports this module

    _check_attention(q, k, v)
    scale = _scale(scale, q.shape[-1])
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

    q (B, H, D); k_cache, v_cache (B, H, T_max, D); ``length`` an int or a (B,) integer tensor with
    1 <= length <= T_max (a tensor's values are read: one host sync on CUDA) -> (B, H, D).

    Raises as :func:`~.ops.decode_attention` does: ``TypeError`` for inputs that are not torch tensors, a
    ``length`` neither an int nor a tensor, or a ``scale`` that is not a number; ``ValueError`` for bad shapes,
    dtypes, devices, lengths or a ``scale`` that is not a finite number > 0.
    """
    from .ops import _check_attention, _check_float, _check_length, _scale  # here: ops imports this module

    _check_float("q", q)
    if q.ndim != 3:
        raise ValueError(f"q must be (B, H, D), got shape {tuple(q.shape)}")
    _check_attention(q[:, :, None, :], k_cache, v_cache, ("k_cache", "v_cache"))
    b, _, t_max, _ = k_cache.shape
    _check_length(length, b, t_max, q.device)
    scale = _scale(scale, q.shape[-1])
    lengths = torch.as_tensor(length, device=q.device).expand(b)  # (B,)
    visible = torch.arange(t_max, device=q.device)[None, :] < lengths[:, None]  # (B, T_max)
    scores = (k_cache @ q[..., None]).squeeze(-1) * scale  # (B, H, T_max)
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    v = torch.where(visible[:, None, :, None], v_cache, 0.0)  # whatever lies past `length` is never read
    return (torch.softmax(scores, dim=-1)[:, :, None, :] @ v).squeeze(-2)  # (B, H, D)
