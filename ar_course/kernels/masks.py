"""Attention masks as the kernels see them: prefix lengths.

Causal attention, VAR's block-causal attention and attention over a partly filled KV cache share one
shape: query ``i`` sees a *prefix* of the keys, ``0 .. kv_len[i] - 1``. So every kernel takes one int32
vector ``kv_len`` (T_q,) instead of a T_q x T_k boolean matrix:

* no mask: ``kv_len[i] = T_k``;
* causal: ``kv_len[i] = i + 1``;
* block-causal with block lengths ``(1, 4, 9)``: a query in block ``b`` sees every key up to the end of
  block ``b``, so ``kv_len = [1, 5, 5, 5, 5, 14, ..., 14]``.

A dense boolean mask (True = may attend) whose rows are prefixes converts to ``kv_len`` too; any other
dense mask only runs on the torch backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class BlockCausal:
    """VAR's block-causal mask: position ``i`` sees position ``j`` iff ``block(j) <= block(i)``.

    ``lengths`` are the tokens per block in order, e.g. ``(1, 4, 9, 16)`` for scales 1x1 .. 4x4.
    """

    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        lengths = tuple(int(n) for n in self.lengths)
        if not lengths or min(lengths) < 1:
            raise ValueError(f"BlockCausal needs one or more positive block lengths, got {self.lengths!r}")
        object.__setattr__(self, "lengths", lengths)

    @property
    def size(self) -> int:
        """Total number of positions T."""
        return sum(self.lengths)

    def kv_len(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(T,) int32: how many keys each position sees (the end of its own block)."""
        ends = torch.tensor(self.lengths, device=device).cumsum(0)
        return ends.repeat_interleave(torch.tensor(self.lengths, device=device)).to(torch.int32)

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(T, T) bool, True where attention is allowed."""
        return prefix_to_dense(self.kv_len(device), self.size)


MaskSpec = Union[None, str, torch.Tensor, BlockCausal]


def prefix_to_dense(kv_len: torch.Tensor, t_k: int) -> torch.Tensor:
    """(T_q,) prefix lengths -> (T_q, T_k) bool mask, True for ``j < kv_len[i]``."""
    return torch.arange(t_k, device=kv_len.device)[None, :] < kv_len.to(torch.long)[:, None]


def _dense_to_prefix(mask: torch.Tensor) -> torch.Tensor | None:
    """(T_q, T_k) bool -> (T_q,) int32 prefix lengths, or None when some row is not a prefix."""
    kv_len = mask.sum(-1)
    if bool((prefix_to_dense(kv_len, mask.shape[-1]) == mask).all()):
        return kv_len.to(torch.int32)
    return None


def dense_mask(mask: MaskSpec, t_q: int, t_k: int, device: torch.device | str) -> torch.Tensor | None:
    """Any mask spec -> (T_q, T_k) bool (True = may attend), or None for no mask."""
    if isinstance(mask, torch.Tensor):
        _check_dense(mask, t_q, t_k)
        return mask.to(device)
    kv_len = prefix_lengths(mask, t_q, t_k, device)
    return None if kv_len is None else prefix_to_dense(kv_len, t_k)


def prefix_lengths(mask: MaskSpec, t_q: int, t_k: int, device: torch.device | str) -> torch.Tensor | None:
    """Any mask spec -> (T_q,) int32 prefix lengths, or None for no mask.

    Raises ``ValueError`` for a dense mask whose rows are not prefixes (use the torch backend for those),
    for a mask that does not fit (T_q, T_k), and when some query would see no key at all.
    """
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown mask {mask!r}: use None, 'causal', a BlockCausal or a bool tensor")
        if t_q != t_k:
            raise ValueError(f"a causal mask needs as many queries as keys, got T_q={t_q}, T_k={t_k}")
        return torch.arange(1, t_q + 1, dtype=torch.int32, device=device)
    if isinstance(mask, BlockCausal):
        if mask.size != t_q or t_q != t_k:
            raise ValueError(f"BlockCausal{mask.lengths} covers {mask.size} positions, but T_q={t_q}, T_k={t_k}")
        return mask.kv_len(device)
    if isinstance(mask, torch.Tensor):
        _check_dense(mask, t_q, t_k)
        kv_len = _dense_to_prefix(mask)
        if kv_len is None:
            raise ValueError("this bool mask is not a prefix mask (some row is not True...True False...False); "
                             "only backend='torch' handles arbitrary masks")
        return kv_len.to(device)
    raise ValueError(f"mask must be None, 'causal', a BlockCausal or a bool tensor, got {type(mask).__name__}")


def _check_dense(mask: torch.Tensor, t_q: int, t_k: int) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"a dense mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
    if tuple(mask.shape) != (t_q, t_k):
        raise ValueError(f"a dense mask must have shape (T_q, T_k) = {(t_q, t_k)}, got {tuple(mask.shape)}")
    if not bool(mask.any(-1).all()):
        raise ValueError("every query must be allowed to see at least one key (a mask row is all False)")
