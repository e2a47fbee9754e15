"""Triton versions of the course's kernels: softmax, nearest-code search, FlashAttention, decode attention.

Triton programs work on blocks (tiles) rather than single threads: one *program* loads a tile with
``tl.load``, computes on it as a whole and stores the result; the compiler maps the tile onto the threads
of a GPU block. Without a GPU, ``TRITON_INTERPRET=1`` (set by :mod:`.env`) runs each program with NumPy.

The attention kernels here are the fast versions (chapter 06's notebook keeps the teaching ones simple):
FlashAttention forward with autotuned tiles and a causal loop split into unmasked and masked tiles, and
split-K decode attention sized to the GPU. They read any mix of float32 / float16 / bfloat16 inputs (what
autocast produces) and multiply in one declared dtype with float32 accumulation (:mod:`.precision`).

Triton is an optional dependency: :mod:`ar_course.kernels` imports this module only when a Triton backend is
considered (``backend="triton"``, or ``"auto"`` on a CUDA tensor), and falls back to torch when Triton is missing.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from . import env  # noqa: F401  (TRITON_INTERPRET must be decided before the kernels are decorated)
from .launch import cdiv, pow2_at_least
from .masks import PrefixMask
from .precision import compute_dtype as default_compute_dtype

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2 e); exp2 is the cheaper instruction


def _pow2(n: int, least: int = 16) -> int:
    """A block size: the power of two >= n, at least ``least`` (``tl.dot`` needs 16)."""
    return max(least, pow2_at_least(n))


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


# -- shared pieces ------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _dot_operands(dtype: torch.dtype, *xs: torch.Tensor) -> tuple[tl.dtype, list[torch.Tensor]]:
    """The ``tl.dot`` operand dtype for compute dtype ``dtype`` (float16, bfloat16 or float32), and ``xs``
    with unit stride along their last axis (other strides are kernel arguments; float64 is read as float32).

    The interpreter cannot multiply bfloat16 tiles (it multiplies their bit patterns, triton-lang/triton
    #11584), so there bfloat16 inputs are rounded on the host and multiplied in float32: the same products,
    except that the softmax weights stay float32 where a GPU rounds them to bfloat16 too."""
    if dtype not in _TL_DTYPES:
        raise ValueError(f"the kernels compute in float16, bfloat16 or float32, got {dtype}")
    if dtype == torch.bfloat16 and env.triton_interpreted():
        return tl.float32, [_rows(x.to(torch.bfloat16)) for x in xs]
    return _TL_DTYPES[dtype], [_rows(x) for x in xs]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along its last axis, float64 read as float32."""
    x = x.float() if x.dtype == torch.float64 else x
    return x if x.stride(-1) == 1 else x.contiguous()


def _configs(interpreted: list[triton.Config], gpu: list[triton.Config]) -> list[triton.Config]:
    """One configuration in the interpreter (autotuning there would only multiply the wait), else ``gpu``, or
    its first only under ``AR_COURSE_TRITON_AUTOTUNE=0`` (:data:`~ar_course.kernels.env.AUTOTUNE_ENV`)."""
    if env.triton_interpreted():
        return interpreted
    return gpu if env.triton_autotuned() else gpu[:1]


# -- nearest code ------------------------------------------------------------------------------------------


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


_vq_nearest_tuned = triton.autotune(
    _configs([triton.Config({"BLOCK_N": 64, "BLOCK_K": 64})],
             [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
              for bn, bk, w, s in ((64, 64, 4, 2), (128, 64, 4, 3), (128, 128, 8, 3), (256, 64, 8, 3),
                                   (64, 128, 4, 3))]),
    key=["k", "BLOCK_D"])(_vq_nearest_kernel)


def vq_nearest_triton(z: torch.Tensor, codebook: torch.Tensor, block_n: int | None = None,
                      block_k: int | None = None) -> torch.Tensor:
    """(N,) int64 nearest-code indices for z (N, D) and codebook (K, D); distances stay in registers.

    Codes are ranked by ``||c||^2 - 2 z.c`` computed with ``tl.dot`` in full float32 precision. Tile sizes are
    autotuned on a GPU; ``block_n`` and ``block_k`` fix them (tests use small tiles to cross tile borders).
    """
    z = z.detach().to(torch.float32).contiguous()
    codebook = codebook.detach().to(torch.float32).contiguous()
    norms = (codebook * codebook).sum(-1)  # (K,)
    out = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    if z.shape[0] == 0:
        return out
    args = (z, codebook, norms, out, z.shape[0], codebook.shape[0], z.shape[1], z.stride(0), codebook.stride(0))
    if block_n or block_k:
        bn, bk = block_n or 64, block_k or 64
        _vq_nearest_kernel[(cdiv(z.shape[0], bn),)](*args, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=_pow2(z.shape[1]))
    else:
        _vq_nearest_tuned[lambda meta: (cdiv(z.shape[0], meta["BLOCK_N"]),)](*args, BLOCK_D=_pow2(z.shape[1]))
    return out


# -- FlashAttention forward --------------------------------------------------------------------------------
#
# The ideas of FlashAttention-2 and of the Triton fused-attention tutorial, in this course's words:
# * one program owns BLOCK_M query rows of one (batch, head) and streams the keys and values past them in
#   tiles of BLOCK_N, keeping a running max m, running sum l and an unnormalised output acc in float32
#   (online softmax); the T_q x T_k score matrix never exists in memory and acc is divided by l once, at
#   the end;
# * scores are kept in base-2 units: exp(x) = exp2(x * log2 e), and the factor scale * log2 e is folded into
#   the one multiply-add that also subtracts the running max, so exp2 (one hardware instruction) needs no
#   separate scaling pass;
# * every mask here is a prefix mask, so for a block of rows the key tiles split in two ranges: tiles that
#   every row of the block sees completely (run with no mask at all: the bulk of the work) and the few
#   tiles that cross some row's prefix end (the causal diagonal, a VAR block border, the ragged end of the
#   keys), which apply the mask. Tiles past every row's prefix are never loaded (causal: about half);
# * the matrix products take tiles in one declared dtype (bf16/fp16 on the tensor cores, or fp32) and
#   accumulate in fp32, so autocast's fp32 queries with bf16 keys, or the reverse, compile and agree;
# * tile sizes, warps and pipeline stages are autotuned per kind of call (sizes bucketed to powers of two).

_MASK_KINDS = {"none": 0, "causal": 1, "lengths": 2}  # PrefixMask.kind -> the kernel's MASK


@triton.jit
def _flash_tiles(acc, m, l, q, k_base, v_base, stride_kt, stride_vt, lo, hi, kv_len, qk_scale, dim,
                 MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                 DOT_DTYPE: tl.constexpr):
    # key tiles starting at lo, lo + BLOCK_N, ... < hi folded into (acc, m, l); MASKED applies kv_len per row
    dims = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        if MASKED:
            inside = (cols[:, None] < hi) & (dims[None, :] < dim)  # hi <= T_k: keys past it are never read
        else:
            inside = dims[None, :] < dim  # the whole tile lies within every row's prefix
        k_ptrs = k_base + cols[:, None] * stride_kt + dims[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vt + dims[None, :]
        if EVEN_D and not MASKED:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=inside, other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)))  # (BLOCK_M, BLOCK_N) raw scores, fp32
        if MASKED:
            s = tl.where(cols[None, :] < kv_len[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])  # one multiply-add, then exp2
        alpha = tl.exp2(m - m_new)  # rescales what was accumulated under the old max
        l = l * alpha + tl.sum(p, 1)
        if EVEN_D and not MASKED:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=inside, other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None])
        m = m_new
    return acc, m, l


@triton.jit(do_not_specialize=["t_q", "t_k", "causal_offset", "q_bucket", "k_bucket"])
def _flash_attention_kernel(q_ptr, k_ptr, v_ptr, kv_len_ptr, out_ptr, qk_scale, t_q, t_k, causal_offset, dim,
                            n_heads, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                            stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, q_bucket, k_bucket,
                            MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_DTYPE: tl.constexpr):
    # a 1-D grid: program p owns query tile (p mod n_tiles) of batch-head (p div n_tiles). Consecutive
    # programs share a head's keys (cache reuse); with a mask the costliest tiles (most keys) start first.
    n_tiles = tl.cdiv(t_q, BLOCK_M)
    tile = tl.program_id(0) % n_tiles
    if MASK != 0:  # 0: no mask, 1: causal, 2: lengths
        tile = n_tiles - 1 - tile
    bh = tl.program_id(0) // n_tiles
    b = bh // n_heads
    h = bh % n_heads
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + dims[None, :],
                mask=(rows[:, None] < t_q) & (dims[None, :] < dim), other=0.0)
    q = q.to(DOT_DTYPE)  # every tile is cast to the one compute dtype right before its product
    last = tl.minimum(tile * BLOCK_M + BLOCK_M, t_q) - 1  # the block's last real row
    if MASK == 1:  # causal: row i sees i + 1 + causal_offset keys
        kv_len = rows + 1 + causal_offset
        lo = tile * BLOCK_M + 1 + causal_offset
        hi = last + 1 + causal_offset
    elif MASK == 2:  # lengths read from memory; rows past T_q see key 0 (never stored, but no 0 / 0)
        kv_len = tl.load(kv_len_ptr + rows, mask=rows < t_q, other=1)
        hi = tl.max(kv_len, 0)
        lo = tl.min(tl.where(rows < t_q, kv_len, hi), 0)
    else:
        kv_len = tl.full([BLOCK_M], t_k, tl.int32)
        lo = t_k
        hi = t_k
    interior = (lo // BLOCK_N) * BLOCK_N  # key tiles below this are seen completely by every row
    m = tl.full([BLOCK_M], -3.4028234e38, tl.float32)  # finite: a row that sees nothing yet gives exp2(-inf) = 0
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    acc, m, l = _flash_tiles(acc, m, l, q, k_base, v_base, stride_kt, stride_vt, 0, interior, kv_len, qk_scale,
                             dim, False, BLOCK_N, BLOCK_D, EVEN_D, DOT_DTYPE)
    acc, m, l = _flash_tiles(acc, m, l, q, k_base, v_base, stride_kt, stride_vt, interior, hi, kv_len, qk_scale,
                             dim, True, BLOCK_N, BLOCK_D, EVEN_D, DOT_DTYPE)
    out = acc / l[:, None]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + dims[None, :], out,
             mask=(rows[:, None] < t_q) & (dims[None, :] < dim))


def _prune_flash_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop query tiles much taller than the queries (VAR's first scales have 1, 4, 9 of them)."""
    fits = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, named_args["q_bucket"])]
    return fits or configs[:1]


_flash_attention_tuned = triton.autotune(
    _configs([triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})],
             [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
              for bm, bn, w, s in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3),
                                   (64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2), (16, 64, 4, 2))]),
    key=["q_bucket", "k_bucket", "BLOCK_D", "MASK", "DOT_DTYPE"],
    prune_configs_by={"early_config_prune": _prune_flash_configs})(_flash_attention_kernel)


def flash_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PrefixMask,
    scale: float,
    *,
    compute_dtype: torch.dtype | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """FlashAttention forward: q (B, H, T_q, D), k, v (B, H, T_k, D) -> (B, H, T_q, D) in q's dtype.

    ``mask`` is a :class:`~ar_course.kernels.masks.PrefixMask` (from :func:`~.masks.prefix_mask`); ``scale``
    must be > 0. Any strides with unit stride along D are read in place (no copies). The products run in
    ``compute_dtype`` (default :func:`~.precision.compute_dtype`) with float32 accumulation. The result is a
    (B, H, T_q, D) view of a (B, T_q, H, D) buffer, so merging the heads afterwards needs no copy. Tile sizes,
    warps and stages are autotuned on a GPU; ``block_m`` / ``block_n`` fix the tiles (tests, small shapes).
    """
    b, h, t_q, dim = q.shape
    t_k = k.shape[2]
    out = torch.empty(b, t_q, h, dim, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, T_q, D)
    if out.numel() == 0:
        return out
    dot_dtype, (q, k, v) = _dot_operands(compute_dtype or default_compute_dtype(q, k, v), q, k, v)
    kind = _MASK_KINDS[mask.kind]
    kv_len = mask.lengths.to(device=q.device, dtype=torch.int32).contiguous() if mask.kind == "lengths" else out
    args = (q, k, v, kv_len, out, scale * LOG2E, t_q, t_k, mask.causal_offset or 0, dim, h, *q.stride()[:3],
            *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], pow2_at_least(t_q), pow2_at_least(t_k))
    meta = {"MASK": kind, "BLOCK_D": _pow2(dim), "EVEN_D": _pow2(dim) == dim, "DOT_DTYPE": dot_dtype}
    if block_m or block_n:
        bm, bn = block_m or 32, block_n or 32
        _flash_attention_kernel[(cdiv(t_q, bm) * b * h,)](*args, BLOCK_M=bm, BLOCK_N=bn, **meta)
    else:
        _flash_attention_tuned[lambda c: (cdiv(t_q, c["BLOCK_M"]) * b * h,)](*args, **meta)
    return out


# -- decode attention: split-K flash decoding --------------------------------------------------------------
#
# One new query per (batch, head) against T cached keys: B*H programs alone would leave most of a GPU idle
# at small batch and would each stream a long cache. So the keys are cut into `splits` chunks, chosen so
# that B*H*splits programs fill every SM several times over; each program reads its chunk once (the whole
# cost of decoding is this read) and leaves a partial (m, l, acc) in base-2 units. A second, tiny kernel
# weighs the partials of a row by 2^(m - max m) and normalises. With a single split the first kernel
# finishes the row itself.

_DECODE_PROGRAMS_PER_SM = 4  # programs per SM the split count aims at (several resident per SM hide latency)
_DECODE_MAX_SPLITS = 64


@triton.jit(do_not_specialize=["length", "chunk", "chunk_bucket"])
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, length, out_ptr, m_ptr, l_ptr, acc_ptr, qk_scale, chunk,
                         n_splits, dim, n_heads, stride_qb, stride_qh, stride_kb, stride_kh, stride_kt,
                         stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, chunk_bucket,
                         HAS_LENGTHS: tl.constexpr, FINAL: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    # program (bh, split) summarises keys [split * chunk, min((split + 1) * chunk, length of row b))
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    if HAS_LENGTHS:
        length = tl.load(len_ptr + b)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + dims, mask=dims < dim, other=0.0).to(tl.float32) * qk_scale
    start = split * chunk
    stop = tl.minimum(start + chunk, length)
    m = tl.full([1], -3.4028234e38, tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    for first in range(start, stop, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        if EVEN_D:
            inside = cols[:, None] < stop  # the same for a whole row of the tile: loads stay vectorised
        else:
            inside = (cols[:, None] < stop) & (dims[None, :] < dim)
        k = tl.load(k_base + cols[:, None] * stride_kt + dims[None, :], mask=inside, other=0.0)
        s = tl.where(cols < stop, tl.sum(k.to(tl.float32) * q[None, :], 1), float("-inf"))  # (BLOCK_N,)
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        l = l * alpha + tl.sum(p, 0)
        v = tl.load(v_base + cols[:, None] * stride_vt + dims[None, :], mask=inside, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m = m_new
    if FINAL:
        tl.store(out_ptr + b * stride_ob + h * stride_oh + dims, acc / l, mask=dims < dim)
    else:
        one = tl.arange(0, 1)
        tl.store(m_ptr + bh * n_splits + split + one, m)
        tl.store(l_ptr + bh * n_splits + split + one, l)
        tl.store(acc_ptr + (bh * n_splits + split) * dim + dims, acc, mask=dims < dim)


@triton.jit
def _decode_reduce_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, n_splits, dim, n_heads, stride_ob, stride_oh,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # program bh combines its row's partials; empty chunks (m at the float minimum, l = 0) weigh nothing
    bh = tl.program_id(0)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    m = tl.load(m_ptr + bh * n_splits + splits, mask=splits < n_splits, other=float("-inf"))
    l = tl.load(l_ptr + bh * n_splits + splits, mask=splits < n_splits, other=0.0)
    acc = tl.load(acc_ptr + (bh * n_splits + splits[:, None]) * dim + dims[None, :],
                  mask=(splits[:, None] < n_splits) & (dims[None, :] < dim), other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # (BLOCK_S,)
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
    tl.store(out_ptr + (bh // n_heads) * stride_ob + (bh % n_heads) * stride_oh + dims, out, mask=dims < dim)


_decode_split_tuned = triton.autotune(
    _configs([triton.Config({"BLOCK_N": 64})],
             [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
              for bn, w, s in ((64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 4, 3), (32, 4, 3))]),
    key=["chunk_bucket", "BLOCK_D", "FINAL", "HAS_LENGTHS"])(_decode_split_kernel)


@lru_cache(maxsize=None)
def _programs_wanted(device: torch.device) -> int:
    """How many programs fill ``device``: a few per SM on a GPU, a small fixed number in the interpreter
    (enough to exercise the split path; every program costs Python time there)."""
    if env.triton_interpreted() or device.type != "cuda":
        return 8
    return _DECODE_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(rows: int, keys: int, device: torch.device, splits: int | None = None) -> tuple[int, int]:
    """``(splits, chunk)``: how many chunks of ``chunk`` keys each of ``rows`` = B*H rows of ``keys`` keys is
    cut into, so that rows * splits programs fill the device; ``splits`` forces a count."""
    grain = 32 if env.triton_interpreted() else 128  # chunks are whole multiples of a key tile
    if splits is None:
        splits = min(cdiv(_programs_wanted(device), rows), cdiv(keys, 2 * grain), _DECODE_MAX_SPLITS)
    chunk = cdiv(cdiv(keys, max(1, splits)), grain) * grain
    return cdiv(keys, chunk), chunk


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: int | torch.Tensor,
    scale: float,
    *,
    splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Split-K decode attention: q (B, H, D), caches (B, H, T_max, D) -> (B, H, D) in q's dtype.

    ``lengths``: an int (every row sees that many keys; read as a kernel argument, no tensor needed) or a (B,)
    integer tensor on q's device (read by the kernel: no host sync), each in 1..T_max. Tiles are read in the
    caches' dtype and multiplied in float32. ``splits`` / ``block_n`` fix the split count and the key tile
    (default: sized to the device, tile autotuned).
    """
    b, h, t_max, dim = k_cache.shape
    out = torch.empty(b, h, dim, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    q, k_cache, v_cache = _rows(q), _rows(k_cache), _rows(v_cache)
    has_lengths = isinstance(lengths, torch.Tensor)
    n_splits, chunk = decode_splits(b * h, t_max if has_lengths else lengths, q.device, splits)
    # the kernel reads lengths[b] at offset b: a 0-d or strided int32 tensor is not copied by .to, so copy it
    len_arg = lengths.to(device=q.device, dtype=torch.int32).contiguous() if has_lengths else out
    final = n_splits == 1
    if final:
        m_part = l_part = acc_part = out  # not written
    else:
        m_part = torch.empty(b * h, n_splits, device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(b * h, n_splits, dim, device=q.device, dtype=torch.float32)
    args = (q, k_cache, v_cache, len_arg, 0 if has_lengths else lengths, out, m_part, l_part, acc_part,
            scale * LOG2E, chunk, n_splits, dim, h, *q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3],
            *out.stride()[:2], pow2_at_least(chunk))
    meta = {"HAS_LENGTHS": has_lengths, "FINAL": final, "BLOCK_D": _pow2(dim), "EVEN_D": _pow2(dim) == dim}
    if block_n:
        _decode_split_kernel[(b * h, n_splits)](*args, BLOCK_N=block_n, **meta)
    else:
        _decode_split_tuned[(b * h, n_splits)](*args, **meta)
    if not final:
        _decode_reduce_kernel[(b * h,)](m_part, l_part, acc_part, out, n_splits, dim, h, *out.stride()[:2],
                                        BLOCK_S=_pow2(n_splits, 2), BLOCK_D=_pow2(dim))
    return out
