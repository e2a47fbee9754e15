"""Attention kernels in numba.cuda: FlashAttention forward and split-K decode attention.

FlashAttention (FlashAttention; FlashAttention-2) never stores the T_q x T_k score matrix. A block of
threads owns ``block_m`` query rows; it streams the keys and values through shared memory one tile of
``block_n`` rows at a time, and each thread keeps, for its query row, the online-softmax state
(running max m, running sum l, un-normalised output acc), rescaling l and acc by exp(m_old - m_new)
whenever the max grows. Masks are prefix lengths (see :mod:`.masks`): query i sees keys j < kv_len[i].

Decoding produces one query per head that must read the whole KV cache: a memory-bound job with little
parallelism per query. Split-K (flash decoding) cuts the cache into chunks, lets one thread summarise
each chunk as (m, l, acc), and combines the summaries in a second kernel with the same rescaling rule.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch
from numba import float32

from .cuda_softmax import LOWEST
from .env import cuda
from .launch import cdiv, float32_input, launch


@lru_cache(maxsize=None)
def make_flash_attention_kernel(block_m: int, block_n: int, dim: int) -> Any:
    """Kernel ``(q, k, v, kv_len, scale, out)`` for head size ``dim``.

    q (BH, T_q, dim), k and v (BH, T_k, dim), kv_len (T_q,) int32 with 1 <= kv_len[i] <= T_k, out
    (>=BH, >=T_q, >=dim), all float32. Launch grid (cdiv(T_q, block_m), BH), block (block_m,): thread t of
    block (x, bh) computes output row x * block_m + t of batch-head bh.
    """

    @cuda.jit
    def flash_attention_kernel(q, k, v, kv_len, scale, out):
        k_tile = cuda.shared.array((block_n, dim), float32)
        v_tile = cuda.shared.array((block_n, dim), float32)
        q_row = cuda.local.array(dim, float32)
        acc = cuda.local.array(dim, float32)
        t = cuda.threadIdx.x
        bh = cuda.blockIdx.y
        first = cuda.blockIdx.x * block_m
        row = first + t
        t_q = q.shape[1]
        t_k = k.shape[1]
        visible = 0
        if row < t_q:
            visible = kv_len[row]
            for d in range(dim):
                q_row[d] = q[bh, row, d] * scale
                acc[d] = 0.0
        n_keys = 0  # the block walks as many key tiles as its most-seeing row needs
        for r in range(first, min(first + block_m, t_q)):
            n_keys = max(n_keys, kv_len[r])
        m = float32(LOWEST)
        l = float32(0.0)
        for start in range(0, n_keys, block_n):
            for e in range(t, block_n * dim, block_m):  # all threads load the tiles together
                j = e // dim
                d = e % dim
                if start + j < t_k:
                    k_tile[j, d] = k[bh, start + j, d]
                    v_tile[j, d] = v[bh, start + j, d]
            cuda.syncthreads()
            for j in range(min(block_n, visible - start)):  # only the keys this row may see
                s = float32(0.0)
                for d in range(dim):
                    s += q_row[d] * k_tile[j, d]
                if s > m:
                    correction = math.exp(m - s)
                    l *= correction
                    for d in range(dim):
                        acc[d] *= correction
                    m = s
                p = math.exp(s - m)
                l += p
                for d in range(dim):
                    acc[d] += p * v_tile[j, d]
            cuda.syncthreads()
        if row < t_q:
            for d in range(dim):
                out[bh, row, d] = acc[d] / l

    return flash_attention_kernel


@lru_cache(maxsize=None)
def make_decode_partial_kernel(dim: int) -> Any:
    """Kernel ``(q, k_cache, v_cache, lengths, chunk, scale, m_out, l_out, acc_out)`` for head size ``dim``.

    q (BH, dim); k_cache, v_cache (BH, T_max, dim); lengths (BH,) int32; m_out, l_out (>=BH, >=S) and
    acc_out (>=BH, >=S, >=dim) float32 with S = cdiv(T_max, chunk). Thread (split, bh) of a launch with
    grid (cdiv(S, threads), BH), block (threads,) summarises keys [split*chunk, min((split+1)*chunk,
    lengths[bh])) as (max score, sum of exp(score - max), sum of exp(score - max) * v). An empty split
    writes (LOWEST, 0, 0). Keys at or past ``lengths[bh]`` are never read.
    """

    @cuda.jit
    def decode_partial_kernel(q, k_cache, v_cache, lengths, chunk, scale, m_out, l_out, acc_out):
        split = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        bh = cuda.blockIdx.y
        n_splits = (k_cache.shape[1] + chunk - 1) // chunk
        if split < n_splits and bh < q.shape[0]:
            acc = cuda.local.array(dim, float32)
            for d in range(dim):
                acc[d] = 0.0
            m = float32(LOWEST)
            l = float32(0.0)
            for j in range(split * chunk, min((split + 1) * chunk, lengths[bh])):
                s = float32(0.0)
                for d in range(dim):
                    s += q[bh, d] * k_cache[bh, j, d]
                s *= scale
                if s > m:
                    correction = math.exp(m - s)
                    l *= correction
                    for d in range(dim):
                        acc[d] *= correction
                    m = s
                p = math.exp(s - m)
                l += p
                for d in range(dim):
                    acc[d] += p * v_cache[bh, j, d]
            m_out[bh, split] = m
            l_out[bh, split] = l
            for d in range(dim):
                acc_out[bh, split, d] = acc[d]

    return decode_partial_kernel


@cuda.jit
def decode_combine_kernel(m_part, l_part, acc_part, out):
    """out[bh, d] = sum_s w_s acc_part[bh, s, d] / sum_s w_s l_part[bh, s] with w_s = exp(m_part[bh, s] - M).

    m_part, l_part (BH, S), acc_part (BH, S, D), out (>=BH, >=D) float32; M = max_s m_part[bh, s].
    2-D launch: the x index runs over d, the y index over bh.
    """
    d, bh = cuda.grid(2)
    if bh < acc_part.shape[0] and d < acc_part.shape[2]:
        n_splits = m_part.shape[1]
        top = m_part[bh, 0]
        for s in range(1, n_splits):
            top = max(top, m_part[bh, s])
        num = float32(0.0)
        den = float32(0.0)
        for s in range(n_splits):
            w = math.exp(m_part[bh, s] - top)
            num += w * acc_part[bh, s, d]
            den += w * l_part[bh, s]
        out[bh, d] = num / den


def flash_attention_numba(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_len: torch.Tensor | None,
    scale: float,
    block_m: int = 32,
    block_n: int = 32,
) -> torch.Tensor:
    """Attention with :func:`make_flash_attention_kernel`: q (B, H, T_q, D), k, v (B, H, T_k, D).

    ``kv_len`` (T_q,) int32 prefix lengths or None (every key visible). Returns (B, H, T_q, D) float32.
    """
    b, h, t_q, dim = q.shape
    t_k = k.shape[2]
    q3 = float32_input(q, 4, "q").reshape(b * h, t_q, dim)  # (BH, T_q, D)
    k3 = float32_input(k, 4, "k").reshape(b * h, t_k, dim)  # (BH, T_k, D)
    v3 = float32_input(v, 4, "v").reshape(b * h, t_k, dim)  # (BH, T_k, D)
    if kv_len is None:
        kv_len = torch.full((t_q,), t_k, dtype=torch.int32, device=q.device)
    out = torch.empty_like(q3)
    kernel = make_flash_attention_kernel(block_m, block_n, dim)
    launch(kernel, (cdiv(t_q, block_m), b * h), (block_m,), q3, k3, v3,
           kv_len.to(torch.int32).contiguous(), float(scale), out)
    return out.reshape(b, h, t_q, dim)  # (B, H, T_q, D)


def decode_attention_numba(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    chunk: int = 64,
    threads: int = 64,
) -> torch.Tensor:
    """Split-K decode attention: q (B, H, D), caches (B, H, T_max, D), lengths (B,) -> (B, H, D) float32."""
    b, h, t_max, dim = k_cache.shape
    q2 = float32_input(q, 3, "q").reshape(b * h, dim)  # (BH, D)
    k3 = float32_input(k_cache, 4, "k_cache").reshape(b * h, t_max, dim)  # (BH, T_max, D)
    v3 = float32_input(v_cache, 4, "v_cache").reshape(b * h, t_max, dim)  # (BH, T_max, D)
    lengths_bh = lengths.to(torch.int32).repeat_interleave(h).contiguous()  # (BH,)
    n_splits = cdiv(t_max, chunk)
    threads = min(threads, n_splits)
    m_part = torch.empty(b * h, n_splits, device=q.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(b * h, n_splits, dim, device=q.device)
    launch(make_decode_partial_kernel(dim), (cdiv(n_splits, threads), b * h), (threads,),
           q2, k3, v3, lengths_bh, int(chunk), float(scale), m_part, l_part, acc_part)
    out = torch.empty(b * h, dim, device=q.device)
    launch(decode_combine_kernel, (cdiv(dim, 32), cdiv(b * h, 4)), (32, 4), m_part, l_part, acc_part, out)
    return out.reshape(b, h, dim)  # (B, H, D)
