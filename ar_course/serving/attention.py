"""Attention that reads keys and values through block tables (the torch reference of paged attention).

:func:`gather_kv` turns one sequence's block table into its contiguous keys (or values);
:func:`paged_attention` is decode attention (one query per sequence) over a paged pool, by gathering every
sequence's blocks, padding to the longest and masking the padding. Tests check both against dense attention.
"""

from __future__ import annotations

import math

import torch


def gather_kv(pool: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` positions stored in ``pool`` ``(num_blocks, block_size, H, D)`` through
    ``block_table`` ``(n_blocks,)`` long: ``(length, H, D)``."""
    if length > block_table.numel() * pool.shape[1]:
        raise ValueError(f"length {length} exceeds the {block_table.numel()} blocks of the table")
    blocks = pool[block_table]  # (n_blocks, block_size, H, D)
    return blocks.flatten(0, 1)[:length]  # (length, H, D)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    lengths: torch.Tensor) -> torch.Tensor:
    """Decode attention of ``q`` ``(B, H, D)`` (one new query per sequence, its own key already stored) over
    the first ``lengths[b]`` positions of sequence ``b``, read from ``k_pool, v_pool``
    ``(num_blocks, block_size, H, D)`` through ``block_tables`` ``(B, max_blocks)`` long (entries past a
    sequence's blocks are ignored; any valid id). Returns ``(B, H, D)``."""
    B, H, D = q.shape
    bs = k_pool.shape[1]
    if block_tables.shape[0] != B or lengths.shape != (B,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and lengths {tuple(lengths.shape)} must have "
                         f"{B} rows like q")
    if bool((lengths < 1).any()) or bool((lengths > block_tables.shape[1] * bs).any()):
        raise ValueError("every length must be in [1, max_blocks * block_size]")
    k = k_pool[block_tables].flatten(1, 2)  # (B, max_blocks * bs, H, D)
    v = v_pool[block_tables].flatten(1, 2)  # (B, max_blocks * bs, H, D)
    scores = torch.einsum("bhd,bthd->bht", q, k) / math.sqrt(D)  # (B, H, T_max)
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < lengths[:, None].to(q.device)  # (B, T_max)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bht,bthd->bhd", scores.softmax(-1), v)  # (B, H, D)
