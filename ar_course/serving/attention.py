"""Attention that reads keys and values through block tables (the torch reference of paged attention).

:func:`gather_kv` turns one sequence's block table into its contiguous keys (or values);
:func:`paged_attention` is decode attention (one query per sequence) over a paged pool, by gathering every
sequence's blocks, padding to the longest and masking the padding. Tests check both against dense attention.
"""

from __future__ import annotations

import math

import torch

from ar_course.utils import check_ids, check_int, is_integer_tensor


def _check_pool(name: str, pool: object, heads_dim: tuple[int, int] | None = None) -> None:
    """``pool`` is a ``(num_blocks, block_size, H, D)`` tensor (with ``(H, D) == heads_dim`` when given)."""
    what = f"{name} must be a (num_blocks, block_size, H, D) tensor"
    if not isinstance(pool, torch.Tensor):
        raise TypeError(f"{what}, got {type(pool).__name__}")
    if pool.ndim != 4 or (heads_dim is not None and tuple(pool.shape[2:]) != heads_dim):
        like = "" if heads_dim is None else f" with (H, D) = {heads_dim} like q"
        raise ValueError(f"{what}{like}, got shape {tuple(pool.shape)}")


def gather_kv(pool: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` positions stored in ``pool`` ``(num_blocks, block_size, H, D)`` through
    ``block_table`` ``(n_blocks,)`` long: ``(length, H, D)``.

    Raises:
        TypeError: ``pool`` or ``block_table`` is not a tensor, or ``length`` is not an integer.
        ValueError: ``pool`` is not 4-D, ``block_table`` is not a 1-D integer tensor of ids in
            ``[0, num_blocks)`` (one host sync), ``length < 0`` or more than the table's blocks hold."""
    _check_pool("pool", pool)
    length = check_int("length", length, lo=0)
    check_ids("block_table", block_table, pool.shape[0], ("n_blocks",), dtype=None, allow_empty=True)
    if length > block_table.numel() * pool.shape[1]:
        raise ValueError(f"length {length} exceeds the {block_table.numel()} blocks of the table")
    blocks = pool[block_table.long()]  # (n_blocks, block_size, H, D); a uint8 index would be a mask
    return blocks.flatten(0, 1)[:length]  # (length, H, D)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    lengths: torch.Tensor) -> torch.Tensor:
    """Decode attention of ``q`` ``(B, H, D)`` (one new query per sequence, its own key already stored) over
    the first ``lengths[b]`` positions of sequence ``b``, read from ``k_pool, v_pool``
    ``(num_blocks, block_size, H, D)`` through ``block_tables`` ``(B, max_blocks)`` long (entries past a
    sequence's blocks are ignored; any valid id). Returns ``(B, H, D)``.

    Not on the engine's per-step path (the engine reads its pool in :func:`~.engine.packed_forward`), so the
    values of ``block_tables`` and ``lengths`` are checked here (host syncs).

    Raises:
        TypeError: an argument that is not a tensor.
        ValueError: ``q`` is not a floating-point ``(B, H, D)`` tensor; the pools are not
            ``(num_blocks, block_size, H, D)`` with ``q``'s ``H, D`` and dtype; ``block_tables`` is not a
            ``(B, max_blocks)`` integer tensor of ids in ``[0, num_blocks)``; ``lengths`` is not an integer ``(B,)``
            tensor with values in ``[1, max_blocks * block_size]``."""
    for name, x in (("q", q), ("lengths", lengths)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if q.ndim != 3:
        raise ValueError(f"q must be a (B, H, D) tensor, got shape {tuple(q.shape)}")
    if not q.is_floating_point():
        raise ValueError(f"q must be a (B, H, D) floating-point tensor, got {q.dtype}")
    B, H, D = q.shape
    _check_pool("k_pool", k_pool, (H, D))
    _check_pool("v_pool", v_pool, (H, D))
    for name, pool in (("k_pool", k_pool), ("v_pool", v_pool)):
        if pool.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {pool.dtype}")
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"k_pool and v_pool must have the same shape, got {tuple(k_pool.shape)} and "
                         f"{tuple(v_pool.shape)}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be ({B},) like q's rows, got shape {tuple(lengths.shape)}")
    if not is_integer_tensor(lengths):
        raise ValueError(f"lengths must be an integer tensor (a length of 2.5 has no meaning), got "
                         f"{lengths.dtype}")
    check_ids("block_tables", block_tables, k_pool.shape[0], (B, "max_blocks"), dtype=None)
    bs = k_pool.shape[1]
    if bool((lengths.long() < 1).any()) or bool((lengths.long() > block_tables.shape[1] * bs).any()):  # uint8: 256 is 0
        raise ValueError("every length must be in [1, max_blocks * block_size]")
    tables = block_tables.long()  # any integer dtype (torch reads a uint8 index as a mask)
    k = k_pool[tables].flatten(1, 2)  # (B, max_blocks * bs, H, D)
    v = v_pool[tables].flatten(1, 2)  # (B, max_blocks * bs, H, D)
    scores = torch.einsum("bhd,bthd->bht", q, k) / math.sqrt(D)  # (B, H, T_max)
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < lengths[:, None].to(q.device)  # (B, T_max)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bht,bthd->bhd", scores.softmax(-1), v)  # (B, H, D)
