"""Attention masks as the kernels see them: prefix lengths.

Causal attention, VAR's block-causal attention and attention over a partly filled KV cache share one
shape: query ``i`` sees a *prefix* of the keys, ``0 .. kv_len[i] - 1``. So no kernel takes a T_q x T_k
boolean matrix; they take a :class:`PrefixMask`, one of

* no mask: ``kv_len[i] = T_k``;
* causal: the queries are the *last* T_q of T_k positions (a KV cache may hold ``T_k - T_q`` earlier ones),
  so ``kv_len[i] = i + 1 + (T_k - T_q)``: a formula the kernel evaluates itself, with nothing to read;
* lengths: an int32 vector ``kv_len`` (T_q,). Block-causal with block lengths ``(1, 4, 9)``: a query in
  block ``b`` sees every key up to the end of block ``b``, so ``kv_len = [1, 5, 5, 5, 5, 14, ..., 14]``.

A dense boolean mask (True = may attend) whose rows are prefixes converts to lengths too, but checking
that takes a pass over the mask and a host sync: pass ``"causal"`` or a :class:`BlockCausal` where you can.
Any other dense mask only runs on the torch backend. Inside a CUDA-graph capture or a ``torch.compile`` trace,
where reading a value back would break the graph, a dense mask is not checked: it is taken to be a prefix
mask (the static KV cache's masks are) and its lengths are counted on the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from functools import lru_cache
from typing import Union

import torch

from ar_course.utils import check_int


@dataclass(frozen=True)
class BlockCausal:
    """VAR's block-causal mask: position ``i`` sees position ``j`` iff ``block(j) <= block(i)``.

    ``lengths`` are the tokens per block in order, e.g. ``(1, 4, 9, 16)`` for scales 1x1 .. 4x4 (a tuple,
    list, range, array or 1-D tensor of integers; stored as a tuple of ints).

    Raises:
        TypeError: ``lengths`` is not a sequence (a str, a set, a number) or holds a non-integer (``1.5``).
        ValueError: it is empty or holds a length ``< 1``.
    """

    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        given = self.lengths
        if isinstance(given, (str, bytes, Set, Mapping)) or not isinstance(given, Iterable):
            raise TypeError(f"BlockCausal lengths must be a sequence of ints such as (1, 4, 9), got {given!r} "
                            f"({type(given).__name__})")
        lengths = tuple(check_int(f"BlockCausal lengths[{i}]", n) for i, n in enumerate(given))
        if not lengths or min(lengths) < 1:
            raise ValueError(f"BlockCausal needs one or more positive block lengths, got {given!r}")
        object.__setattr__(self, "lengths", lengths)

    @property
    def size(self) -> int:
        """Total number of positions T."""
        return sum(self.lengths)

    def kv_len(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(T,) int32: how many keys each position sees (the end of its own block). Built once per device
        and reused: treat it as read-only."""
        return _block_kv_len(self.lengths, str(torch.device(device or "cpu")))

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(T, T) bool, True where attention is allowed."""
        return prefix_to_dense(self.kv_len(device), self.size)


@lru_cache(maxsize=64)
def _block_kv_len(lengths: tuple[int, ...], device: str) -> torch.Tensor:
    """(T,) int32 block ends, one per position; cached so that every layer of every pass reuses one tensor."""
    sizes = torch.tensor(lengths)
    return sizes.cumsum(0).repeat_interleave(sizes).to(device=device, dtype=torch.int32)


MaskSpec = Union[None, str, torch.Tensor, BlockCausal]


@dataclass(frozen=True, eq=False)
class PrefixMask:
    """A mask whose rows are prefixes, in the form a kernel takes: query ``i`` sees keys ``0 .. kv_len(i)-1``.

    At most one of ``causal_offset`` (``kv_len(i) = i + 1 + causal_offset``) and ``lengths`` (a (T_q,) int32
    tensor) is set; neither means no mask (``kv_len(i) = T_k``). Build one with :func:`prefix_mask`.
    """

    t_q: int
    t_k: int
    causal_offset: int | None = None
    lengths: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        """``"none"``, ``"causal"`` or ``"lengths"``."""
        return "causal" if self.causal_offset is not None else "lengths" if self.lengths is not None else "none"

    def kv_len(self, device: torch.device | str) -> torch.Tensor | None:
        """(T_q,) int32 prefix lengths, or None without a mask (for kernels that read a lengths vector)."""
        if self.causal_offset is not None:
            return torch.arange(1 + self.causal_offset, self.t_q + 1 + self.causal_offset, dtype=torch.int32,
                                device=device)
        return None if self.lengths is None else self.lengths.to(device)


def prefix_to_dense(kv_len: torch.Tensor, t_k: int) -> torch.Tensor:
    """(T_q,) prefix lengths -> (T_q, T_k) bool mask, True for ``j < kv_len[i]``."""
    return torch.arange(t_k, device=kv_len.device)[None, :] < kv_len.to(torch.long)[:, None]


def values_readable(device: torch.device) -> bool:
    """Whether reading values of tensors on ``device`` back on the host is allowed: not inside a
    ``torch.compile`` trace, nor inside a CUDA-graph capture on a CUDA ``device`` (a host sync breaks it)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing())


def _dense_to_prefix(mask: torch.Tensor) -> torch.Tensor | None:
    """(T_q, T_k) bool -> (T_q,) int32 prefix lengths, or None when some row is not a prefix (a host sync;
    where values cannot be read, the rows are taken to be prefixes unchecked)."""
    kv_len = mask.sum(-1)
    if not values_readable(mask.device) or bool((prefix_to_dense(kv_len, mask.shape[-1]) == mask).all()):
        return kv_len.to(torch.int32)
    return None


def dense_mask(mask: MaskSpec, t_q: int, t_k: int, device: torch.device | str) -> torch.Tensor | None:
    """Any mask spec -> (T_q, T_k) bool (True = may attend), or None for no mask."""
    if isinstance(mask, torch.Tensor):
        _check_dense(mask, t_q, t_k)
        return mask.to(device)
    kv_len = prefix_lengths(mask, t_q, t_k, device)
    return None if kv_len is None else prefix_to_dense(kv_len, t_k)


def prefix_mask(mask: MaskSpec, t_q: int, t_k: int, device: torch.device | str) -> PrefixMask:
    """Any mask spec -> the :class:`PrefixMask` the kernels take. No host sync except for a dense mask.

    ``"causal"`` needs ``T_q <= T_k`` and puts the queries at the last T_q positions (``T_q == T_k``: the
    usual lower triangle). Raises ``ValueError`` for a dense mask whose rows are not prefixes (use the
    torch backend for those), for a mask that does not fit (T_q, T_k), and when some query would see no key.
    """
    if mask is None:
        return PrefixMask(t_q, t_k)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown mask {mask!r}: use None, 'causal', a BlockCausal or a bool tensor")
        if t_q > t_k:
            raise ValueError(f"a causal mask needs no more queries than keys (the queries are the last T_q of "
                             f"T_k positions), got T_q={t_q}, T_k={t_k}")
        return PrefixMask(t_q, t_k, causal_offset=t_k - t_q)
    if isinstance(mask, BlockCausal):
        if mask.size != t_q or t_q != t_k:
            raise ValueError(f"BlockCausal{mask.lengths} covers {mask.size} positions, but T_q={t_q}, T_k={t_k}")
        return PrefixMask(t_q, t_k, lengths=mask.kv_len(device))
    if isinstance(mask, torch.Tensor):
        _check_dense(mask, t_q, t_k)
        kv_len = _dense_to_prefix(mask)
        if kv_len is None:
            raise ValueError("this bool mask is not a prefix mask (some row is not True...True False...False); "
                             "only backend='torch' handles arbitrary masks")
        return PrefixMask(t_q, t_k, lengths=kv_len.to(device))
    raise ValueError(f"mask must be None, 'causal', a BlockCausal or a bool tensor, got {type(mask).__name__}")


def prefix_lengths(mask: MaskSpec, t_q: int, t_k: int, device: torch.device | str) -> torch.Tensor | None:
    """Any mask spec -> (T_q,) int32 prefix lengths, or None for no mask; errors as :func:`prefix_mask`."""
    return prefix_mask(mask, t_q, t_k, device).kv_len(device)


def _check_dense(mask: torch.Tensor, t_q: int, t_k: int) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"a dense mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
    if tuple(mask.shape) != (t_q, t_k):
        raise ValueError(f"a dense mask must have shape (T_q, T_k) = {(t_q, t_k)}, got {tuple(mask.shape)}")
    if values_readable(mask.device) and not bool(mask.any(-1).all()):
        raise ValueError("every query must be allowed to see at least one key (a mask row is all False)")
