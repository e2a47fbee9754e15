"""Triton versions of the course's kernels: softmax, nearest-code search, FlashAttention, decode attention.

Triton programs work on blocks (tiles) rather than single threads: one *program* loads a tile with
``tl.load``, computes on it as a whole and stores the result; the compiler maps the tile onto the threads
of a GPU block. Without a GPU, ``TRITON_INTERPRET=1`` (set by :mod:`.env`) runs each program with NumPy.

Triton is an optional dependency: :mod:`ar_course.kernels` imports this module only when it is asked for a
Triton backend, and falls back to torch when Triton is missing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import env  # noqa: F401  (TRITON_INTERPRET must be decided before the kernels are decorated)
from .launch import cdiv

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2 e); exp2 is the cheaper instruction


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


@triton.jit
def _softmax_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK: tl.constexpr):
    # one program per row: a first pass keeps a running (max, sum) per lane, a second writes
    row = tl.program_id(0)
    m = tl.full([BLOCK], -3.4028234e38, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    row_max = tl.max(m, 0)
    row_sum = tl.sum(s * tl.exp(m - row_max), 0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, tl.exp(x - row_max) / row_sum, mask=cols < n_cols)


def softmax_triton(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Row-wise softmax of x (R, C) with an online first pass; returns (R, C) in x's dtype."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (R, C), got shape {tuple(x.shape)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        _softmax_kernel[(x.shape[0],)](x, out, x.shape[1], x.stride(0), out.stride(0),
                                       BLOCK=min(_pow2(x.shape[1]), block))
    return out


@triton.jit
def _vq_nearest_kernel(z_ptr, c_ptr, norms_ptr, out_ptr, n, k, dim, stride_z, stride_c,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per BLOCK_N rows of z; the codebook streams through in tiles of BLOCK_K codes
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    z = tl.load(z_ptr + rows[:, None] * stride_z + dims[None, :],
                mask=(rows[:, None] < n) & (dims[None, :] < dim), other=0.0)
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    for start in range(0, k, BLOCK_K):
        codes = start + tl.arange(0, BLOCK_K)
        c = tl.load(c_ptr + codes[:, None] * stride_c + dims[None, :],
                    mask=(codes[:, None] < k) & (dims[None, :] < dim), other=0.0)
        norms = tl.load(norms_ptr + codes, mask=codes < k, other=float("inf"))
        score = norms[None, :] - 2.0 * tl.dot(z, tl.trans(c), input_precision="ieee")  # (BLOCK_N, BLOCK_K)
        tile_best = tl.min(score, 1)
        tile_idx = tl.argmin(score, 1) + start  # ties inside a tile: lowest index
        better = tile_best < best  # ties across tiles: the earlier tile wins
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)
    tl.store(out_ptr + rows, best_idx, mask=rows < n)


def vq_nearest_triton(z: torch.Tensor, codebook: torch.Tensor, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """(N,) int64 nearest-code indices for z (N, D) and codebook (K, D); distances stay in registers.

    Codes are ranked by ``||c||^2 - 2 z.c`` computed with ``tl.dot`` in full float32 precision.
    """
    z = z.detach().to(torch.float32).contiguous()
    codebook = codebook.detach().to(torch.float32).contiguous()
    norms = (codebook * codebook).sum(-1)  # (K,)
    out = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    if z.shape[0]:
        _vq_nearest_kernel[(cdiv(z.shape[0], block_n),)](
            z, codebook, norms, out, z.shape[0], codebook.shape[0], z.shape[1], z.stride(0), codebook.stride(0),
            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=_pow2(z.shape[1]))
    return out


@triton.jit
def _flash_attention_kernel(q_ptr, k_ptr, v_ptr, kv_len_ptr, out_ptr, qk_scale, t_q, t_k, dim,
                            stride_qb, stride_qt, stride_kb, stride_kt, stride_vb, stride_vt, stride_ob, stride_ot,
                            HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    # program (i, bh) computes query rows i*BLOCK_M ... of batch-head bh; scores live in base-2 units
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + bh * stride_qb + rows[:, None] * stride_qt + dims[None, :],
                mask=(rows[:, None] < t_q) & (dims[None, :] < dim), other=0.0)
    if HAS_MASK:  # prefix mask: row i sees keys j < kv_len[i]; padding rows see key 0 (never stored)
        kv_len = tl.load(kv_len_ptr + rows, mask=rows < t_q, other=1)
        hi = tl.max(kv_len, 0)  # key tiles past every row's prefix are skipped (causal: about half)
    else:
        kv_len = tl.full([BLOCK_M], t_k, tl.int32)
        hi = t_k
    m = tl.full([BLOCK_M], -3.4028234e38, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        tile_mask = (cols[:, None] < t_k) & (dims[None, :] < dim)
        k = tl.load(k_ptr + bh * stride_kb + cols[:, None] * stride_kt + dims[None, :], mask=tile_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(cols[None, :] < kv_len[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + bh * stride_vb + cols[:, None] * stride_vt + dims[None, :], mask=tile_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + bh * stride_ob + rows[:, None] * stride_ot + dims[None, :], out,
             mask=(rows[:, None] < t_q) & (dims[None, :] < dim))


def flash_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_len: torch.Tensor | None,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """FlashAttention forward: q (B, H, T_q, D), k, v (B, H, T_k, D) -> (B, H, T_q, D) in q's dtype.

    ``kv_len`` (T_q,) int32 prefix lengths (causal, block-causal) or None. Block sizes default to 128 x 64
    on a GPU and 32 x 32 in the interpreter.
    """
    b, h, t_q, dim = q.shape
    t_k = k.shape[2]
    q3 = q.reshape(b * h, t_q, dim).contiguous()  # (BH, T_q, D)
    k3 = k.reshape(b * h, t_k, dim).contiguous()  # (BH, T_k, D)
    v3 = v.reshape(b * h, t_k, dim).contiguous()  # (BH, T_k, D)
    out = torch.empty_like(q3)
    gpu = q.is_cuda and not env.triton_interpreted()
    block_m = block_m or (128 if gpu and dim <= 64 else 64 if gpu else 32)
    block_n = block_n or (64 if gpu else 32)
    mask_arg = kv_len.to(torch.int32).contiguous() if kv_len is not None else q3
    options = {"num_warps": 4 if dim <= 64 else 8, "num_stages": 3} if gpu else {}
    _flash_attention_kernel[(cdiv(t_q, block_m), b * h)](
        q3, k3, v3, mask_arg, out, scale * LOG2E, t_q, t_k, dim,
        q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
        out.stride(0), out.stride(1),
        HAS_MASK=kv_len is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(dim), **options)
    return out.reshape(b, h, t_q, dim)  # (B, H, T_q, D)


@triton.jit
def _decode_partial_kernel(q_ptr, k_ptr, v_ptr, len_ptr, m_ptr, l_ptr, acc_ptr, qk_scale, chunk, dim, n_splits,
                           stride_qb, stride_kb, stride_kt, stride_vb, stride_vt,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # program (bh, split) summarises keys [split*chunk, min((split+1)*chunk, length)) as (m, l, acc)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + bh * stride_qb + dims, mask=dims < dim, other=0.0).to(tl.float32) * qk_scale
    start = split * chunk
    stop = tl.minimum(start + chunk, tl.load(len_ptr + bh))
    m = tl.full([1], -3.4028234e38, tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for first in range(start, stop, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        tile_mask = (cols[:, None] < stop) & (dims[None, :] < dim)
        k = tl.load(k_ptr + bh * stride_kb + cols[:, None] * stride_kt + dims[None, :], mask=tile_mask, other=0.0)
        s = tl.where(cols < stop, tl.sum(k.to(tl.float32) * q[None, :], 1), float("-inf"))  # (BLOCK_N,)
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        l = l * alpha + tl.sum(p, 0)
        v = tl.load(v_ptr + bh * stride_vb + cols[:, None] * stride_vt + dims[None, :], mask=tile_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m = m_new
    one = tl.arange(0, 1)
    tl.store(m_ptr + bh * n_splits + split + one, m)
    tl.store(l_ptr + bh * n_splits + split + one, l)
    tl.store(acc_ptr + (bh * n_splits + split) * dim + dims, acc, mask=dims < dim)


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    chunk: int = 256,
    block_n: int = 64,
) -> torch.Tensor:
    """Split-K decode attention: q (B, H, D), caches (B, H, T_max, D), lengths (B,) -> (B, H, D).

    One program per (batch-head, chunk of ``chunk`` keys) writes (m, l, acc); torch combines the
    summaries with weights 2^(m - max m) (the kernel works in base-2 units).
    """
    b, h, t_max, dim = k_cache.shape
    q2 = q.reshape(b * h, dim).contiguous()  # (BH, D)
    k3 = k_cache.reshape(b * h, t_max, dim)  # (BH, T_max, D)
    v3 = v_cache.reshape(b * h, t_max, dim)  # (BH, T_max, D)
    if k3.stride(-1) != 1 or v3.stride(-1) != 1:
        k3, v3 = k3.contiguous(), v3.contiguous()
    lengths_bh = lengths.to(device=q.device, dtype=torch.int32).repeat_interleave(h).contiguous()  # (BH,)
    n_splits = cdiv(t_max, chunk)
    m_part = torch.empty(b * h, n_splits, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(b * h, n_splits, dim, device=q.device, dtype=torch.float32)
    _decode_partial_kernel[(b * h, n_splits)](
        q2, k3, v3, lengths_bh, m_part, l_part, acc_part, scale * LOG2E, chunk, dim, n_splits,
        q2.stride(0), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
        BLOCK_N=min(block_n, _pow2(chunk)), BLOCK_D=_pow2(dim))
    w = torch.exp2(m_part - m_part.amax(dim=1, keepdim=True))  # (BH, S)
    out = (w[:, :, None] * acc_part).sum(1) / (w * l_part).sum(1)[:, None]  # (BH, D)
    return out.to(q.dtype).reshape(b, h, dim)  # (B, H, D)
