"""Pure functions of the causal transformer that the modules in :mod:`.model` are built from: no modules, no
state, written to be read.

They are the plain paths beside the fused PyTorch kernels the modules use where those exist (tests check
that both agree), and most of chapter 02's exercises are checked against them.

Conventions used everywhere in :mod:`ar_course.transformer`:

* a boolean mask is ``True`` where a query **may** attend to a key;
* heads live in dimension 1: ``(B, H, T, D)`` with ``D = C // H``;
* rotary embeddings pair feature ``i`` with feature ``i + D/2`` (the "rotate half" layout).
"""

from __future__ import annotations

import math

import torch

from ar_course.utils import at_least_float32, check_int, check_number


def _check_bool_mask(mask: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``mask`` is a tensor of dtype bool (its dtype and type only: no values read)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor of dtype bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(
            f"mask must have dtype torch.bool (True = may attend), got {mask.dtype}; "
            "convert an additive float mask with `mask == 0` or build it with causal_mask()"
        )


def check_mask(mask: torch.Tensor, t_q: int, t_k: int) -> None:
    """Raise ``ValueError`` unless ``mask`` is a bool tensor whose last two dims are ``(t_q, t_k)``.

    Allowed shapes: ``(t_q, t_k)`` or ``(B | 1, H | 1, t_q, t_k)``."""
    _check_bool_mask(mask)
    if mask.dim() not in (2, 4) or tuple(mask.shape[-2:]) != (t_q, t_k):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected (T_q, T_k) = ({t_q}, {t_k}) "
            f"or (B, H, {t_q}, {t_k}) with broadcastable B and H"
        )


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Numerically stable softmax over the last dimension, ignoring masked-out entries.

    Args:
        scores: ``(..., N)`` float tensor of finite numbers or ``-inf`` (not checked: that would read the values
            on every call; a ``+inf`` or NaN score gives NaN in its row).
        mask: bool tensor broadcastable to ``scores``; ``True`` keeps an entry. ``None`` keeps all.

    Returns:
        ``(..., N)`` probabilities; masked entries are exactly 0 and a row with no kept entry is all 0
        (rather than NaN). The row maximum over kept entries is subtracted before ``exp``.

    Raises:
        ValueError: ``mask`` is not a bool tensor (an integer or additive float mask).
    """
    if mask is not None:
        _check_bool_mask(mask)
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)  # exp(-inf) = 0 for masked entries
    total = e.sum(dim=-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def causal_mask(t_q: int, t_k: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean causal mask of shape ``(t_q, t_k)``, ``True`` where attention is allowed.

    The queries are the **last** ``t_q`` of ``t_k`` positions (``t_k`` defaults to ``t_q``): query ``i``
    sits at absolute position ``t_k - t_q + i`` and may attend to keys ``0 .. t_k - t_q + i`` inclusive.
    With ``t_q == t_k`` this is the lower triangle including the diagonal; with a KV cache holding
    ``t_k - t_q`` earlier positions it is the same triangle shifted right.

    Raises:
        TypeError: ``t_q`` or ``t_k`` is not an integer (``2.5``).
        ValueError: ``t_q < 0`` or ``t_k < t_q``.
    """
    if not torch.compiler.is_compiling():  # sizes traced by torch.compile stay symbolic (check_int would fix them)
        t_q = check_int("t_q", t_q, lo=0)
        t_k = None if t_k is None else check_int("t_k", t_k, lo=0)
    t_k = t_q if t_k is None else t_k
    if t_k < t_q:
        raise ValueError(f"t_k ({t_k}) must be >= t_q ({t_q}): queries are the last t_q of t_k positions")
    q_pos = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)  # (t_q, 1)
    k_pos = torch.arange(t_k, device=device)[None, :]  # (1, t_k)
    return k_pos <= q_pos


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` with an optional boolean mask (the plain path).

    Args:
        q: ``(..., T_q, D)``; k: ``(..., T_k, D)``; v: ``(..., T_k, D_v)``.
        mask: bool ``(T_q, T_k)`` or ``(B, H, T_q, T_k)`` (broadcastable), ``True`` = may attend.

    Returns:
        ``(..., T_q, D_v)``. A query that may attend to nothing gets a zero vector.
    """
    if mask is not None:
        check_mask(mask, q.shape[-2], k.shape[-2])
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., T_q, T_k)
    return masked_softmax(scores, mask) @ v


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """``(B, T, C)`` -> ``(B, H, T, C // H)``: channel block ``h`` becomes head ``h``.

    Raises ``TypeError`` for an ``n_head`` that is not an integer, ``ValueError`` for ``n_head < 1`` or one that
    does not divide ``C``."""
    n_head = check_int("n_head", n_head, lo=1)
    B, T, C = x.shape
    if C % n_head:
        raise ValueError(f"channels ({C}) must be divisible by the number of heads ({n_head})")
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, H, T, D)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, D)`` -> ``(B, T, H * D)``, the inverse of :func:`split_heads`."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)  # (B, T, C)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Root-mean-square normalisation over the last dim: ``x / sqrt(mean(x^2) + eps) * weight``.

    ``x``: ``(..., C)``; ``weight``: ``(C,)`` or ``None``. Unlike LayerNorm there is no mean subtraction
    and no bias. The statistics are computed in float32 at least (float64 for float64 ``x``; in float16,
    ``x^2`` overflows from ``|x| > 256`` and underflows below about ``1e-4``), and the normalised ``x`` is cast
    back to its dtype before the weight is applied, as Llama does.

    ``eps``: a finite number ``> 0`` (``TypeError`` / ``ValueError`` otherwise: ``eps <= 0`` can divide by 0)."""
    eps = _check_eps(eps)
    xf = at_least_float32(x)  # no copy when x is float32
    out = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return out if weight is None else out * weight


def _check_eps(eps: float) -> float:
    """``eps`` as a finite float ``> 0`` (:func:`~ar_course.utils.check_number`); a float in range is returned
    at once, since the norms of a model call this in every layer."""
    if type(eps) is float and 0 < eps < math.inf:
        return eps
    return check_number("eps", eps, lo=0, lo_open=True)


def rope_angles(
    positions: torch.Tensor, dim: int, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the rotary angles ``pos * base^(-2i/dim)``, ``i = 0 .. dim/2 - 1``.

    ``positions``: ``(T,)`` integer or float tensor. ``dim``: even (``ValueError`` otherwise). ``base``: a finite
    number ``> 0`` (``TypeError`` / ``ValueError`` otherwise; ``0`` would give NaN). Returns ``(cos, sin)``, each
    ``(T, dim // 2)`` float32 (computed in float64)."""
    base = check_number("base", base, lo=0, lo_open=True)
    if dim % 2:
        raise ValueError(f"rotary dimension must be even, got {dim}")
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, dim/2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def rope_2d_angles(
    rows: torch.Tensor, cols: torch.Tensor, dim: int, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """2D rotary angles for a token map: half the rotated pairs follow the row, half the column.

    ``rows``, ``cols``: ``(T,)``. Returns ``(cos, sin)``, each ``(T, dim // 2)``: the first ``dim // 4``
    pairs rotate with the row index, the rest with the column index (each axis uses the 1D frequencies of
    a ``dim // 2``-dimensional rotary embedding)."""
    if dim % 4:
        raise ValueError(f"2D rotary dimension must be divisible by 4, got {dim}")
    cos_r, sin_r = rope_angles(rows, dim // 2, base)  # (T, dim/4)
    cos_c, sin_c = rope_angles(cols, dim // 2, base)  # (T, dim/4)
    return torch.cat([cos_r, cos_c], dim=-1), torch.cat([sin_r, sin_c], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs ``(x_i, x_{i+D/2})`` of ``x`` ``(..., T, D)`` by the angles in ``cos, sin``.

    ``cos``, ``sin``: ``(T, D // 2)`` (or broadcastable). Each pair is multiplied by the 2x2 rotation
    ``[[cos, -sin], [sin, cos]]``, so a query at position m and a key at position n get a dot product that
    depends only on ``m - n``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
