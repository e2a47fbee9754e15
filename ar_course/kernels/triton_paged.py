"""Paged decode attention in Triton (chapter 09): one program per (sequence, head) walks the sequence's block
table, loads one block of keys and values at a time straight from the pool, and keeps an online softmax, so
no contiguous copy of the cache is ever made (vLLM's PagedAttention kernel, in its simplest form).

Without a GPU it runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by :mod:`.env`). The torch reference
that gathers the blocks is :func:`ar_course.serving.paged_attention`; tests check that both agree.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ar_course.utils import is_integer_tensor

from . import env  # noqa: F401  (TRITON_INTERPRET must be decided before the kernels are decorated)
from .launch import pow2_at_least


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, len_ptr, out_ptr, qk_scale, dim, n_heads, max_blocks,
                         BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    # program bh = (sequence b, head h): keys and values of positions [0, length) of sequence b, block by block
    bh = tl.program_id(0)
    b = bh // n_heads
    h = bh % n_heads
    length = tl.load(len_ptr + b)
    dims = tl.arange(0, BLOCK_D)
    offs = tl.arange(0, BLOCK_SIZE)
    q = tl.load(q_ptr + bh * dim + dims, mask=dims < dim, other=0.0).to(tl.float32) * qk_scale
    m = tl.full([1], -3.4028234e38, tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    n_blocks = (length + BLOCK_SIZE - 1) // BLOCK_SIZE
    for i in range(0, n_blocks):
        block = tl.load(tables_ptr + b * max_blocks + i)
        pos = i * BLOCK_SIZE + offs  # positions in the sequence
        slots = block * BLOCK_SIZE + offs  # rows of the pool, (num_blocks * block_size, H, D)
        inside = (pos[:, None] < length) & (dims[None, :] < dim)
        k = tl.load(k_ptr + (slots[:, None] * n_heads + h) * dim + dims[None, :], mask=inside, other=0.0)
        s = tl.where(pos < length, tl.sum(k.to(tl.float32) * q[None, :], 1), float("-inf"))  # (BLOCK_SIZE,)
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        l = l * alpha + tl.sum(p, 0)
        v = tl.load(v_ptr + (slots[:, None] * n_heads + h) * dim + dims[None, :], mask=inside, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m = m_new
    tl.store(out_ptr + bh * dim + dims, acc / l, mask=dims < dim)


def paged_attention_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           lengths: torch.Tensor) -> torch.Tensor:
    """:func:`ar_course.serving.paged_attention` as one Triton kernel: ``q`` ``(B, H, D)`` over the first
    ``lengths[b]`` positions read from ``k_pool, v_pool`` ``(num_blocks, block_size, H, D)`` (``block_size`` a
    power of two) through ``block_tables`` ``(B, max_blocks)``. Returns ``(B, H, D)`` in ``q``'s dtype."""
    B, H, D = q.shape
    block_size = k_pool.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two block_size, got {block_size}")
    if k_pool.shape != v_pool.shape or k_pool.shape[2:] != (H, D):
        raise ValueError(f"pools {tuple(k_pool.shape)}, {tuple(v_pool.shape)} do not match q {tuple(q.shape)}")
    if block_tables.shape[0] != B or lengths.shape != (B,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and lengths {tuple(lengths.shape)} need {B} rows")
    if not is_integer_tensor(lengths):
        raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if bool((lengths < 1).any()) or bool((lengths > block_tables.shape[1] * block_size).any()):
        raise ValueError("every length must be in [1, max_blocks * block_size]")
    out = torch.empty(B, H, D, device=q.device, dtype=torch.float32)
    tables = block_tables.to(torch.int32).contiguous()
    _paged_decode_kernel[(B * H,)](
        q.contiguous(), k_pool.contiguous(), v_pool.contiguous(), tables, lengths.to(torch.int32).contiguous(), out,
        math.log2(math.e) / math.sqrt(D), D, H, tables.shape[1], BLOCK_SIZE=block_size, BLOCK_D=pow2_at_least(D))
    return out.to(q.dtype)
