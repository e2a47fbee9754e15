"""Checks for chapter 06, GPU kernels: ``checks.ch06.axpy_kernel(axpy_kernel)`` etc.

The learner writes a ``@cuda.jit`` kernel; the check launches it itself (grid and block as the exercise
states), on seeded random inputs whose sizes are not multiples of the block size, and compares with torch.
Without a GPU the launch runs in numba's CUDA simulator under :func:`ar_course.kernels.sanitizer.sanitize`,
so out-of-range indices, missing barriers, barriers some threads skip and reads of unwritten shared memory
are reported on every run. Every output buffer is larger than the data and pre-filled with a sentinel, so
a stray write past the end, or an element never written, is named as such (also on a real GPU).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable

import numpy as np
import torch

from ar_course.checks.core import Chapter, CheckFailure, compare
from ar_course.kernels import cuda_attention as ka
from ar_course.kernels import cuda_basic as kb
from ar_course.kernels import cuda_softmax as ks
from ar_course.kernels import cuda_vq as kv
from ar_course.kernels.cuda_softmax import LOWEST  # noqa: F401  (the notebook imports it from here)
from ar_course.kernels.launch import cdiv
from ar_course.kernels.masks import BlockCausal
from ar_course.kernels.sanitizer import SanitizerError, sanitize

chapter = Chapter(6, "GPU kernels")
use = chapter.use

THREADS = 32  # threads per block for the 1-D exercises (the shared arrays of 6.3 and 6.5 have this size)
TILE = 8  # tile side of the matmul (blocks of TILE x TILE threads)
BLOCK_M = 16  # FlashAttention: query rows per block (= threads per block)
BLOCK_N = 16  # FlashAttention: keys per shared-memory tile
HEAD_DIM = 8  # head size of the attention exercises (local arrays need it at compile time)
SENTINEL = -12345.0  # what an output element holds until the kernel writes it
PAD = 3  # every output axis is this much longer than the data

_SIM_PREFIX = re.compile(r"^tid=(\[[^\]]*\]) ctaid=(\[[^\]]*\]):?\s*")


# --------------------------------------------------------------------------------------------------------
# launching a learner's kernel


def _require_kernel(fn: Any) -> None:
    """Raise NotImplementedError for a stub and CheckFailure for something that is not a CUDA kernel."""
    py = getattr(fn, "py_func", None)
    code = getattr(py if py is not None else fn, "__code__", None)
    if code is not None and "NotImplementedError" in code.co_names:
        raise NotImplementedError("the kernel is still a stub")
    if py is None or not hasattr(fn, "__getitem__"):
        raise CheckFailure("expected a kernel: decorate your function with @cuda.jit and pass the kernel itself")


def _launch(fn: Any, grid: tuple, block: tuple, args: tuple, where: str) -> None:
    """``fn[grid, block](*args)`` under the sanitizer; every crash becomes a one-line CheckFailure."""
    _require_kernel(fn)
    try:
        with sanitize(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow in a wrong kernel shows up as a value
            fn[grid, block](*args)
    except NotImplementedError:
        raise
    except Exception as exc:  # noqa: BLE001 - any kernel error becomes a readable message
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        m = _SIM_PREFIX.match(text)
        who = f"thread {m.group(1)} of block {m.group(2)}" if m else "a thread"
        text = text[m.end():] if m else text
        on = f" on input {where!r}"
        if isinstance(exc, SanitizerError):
            raise CheckFailure(f"{text}{on}") from None
        if isinstance(exc, IndexError):
            raise CheckFailure(f"out-of-bounds access{on}: {who} used an index past the end of an array "
                               f"({text}); guard every access with the sizes of the inputs") from None
        raise CheckFailure(f"your kernel raised {type(exc).__name__}{on} ({who}): {text}") from None


def _buffer(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """An output buffer PAD longer on every axis than ``shape``, filled with the sentinel."""
    fill = SENTINEL if np.dtype(dtype).kind == "f" else -1
    return np.full(tuple(s + PAD for s in shape), fill, dtype=dtype)


def _result(buf: np.ndarray, shape: tuple[int, ...], name: str, where: str) -> torch.Tensor:
    """The data part of an output buffer, after checking the padding was not touched (and all was written)."""
    fill = SENTINEL if buf.dtype.kind == "f" else -1
    inside = tuple(slice(0, s) for s in shape)
    outside = np.ones(buf.shape, dtype=bool)
    outside[inside] = False
    stray = np.argwhere(outside & (buf != fill))
    if len(stray):
        raise CheckFailure(f"your kernel wrote {name}{list(map(int, stray[0]))} on input {where!r}, past the "
                           f"data (shape {shape}): a thread outside the data is missing its guard")
    data = buf[inside]
    unwritten = np.argwhere(data == fill)
    if len(unwritten):
        raise CheckFailure(f"{name}{list(map(int, unwritten[0]))} was never written on input {where!r} "
                           f"({len(unwritten)} of {data.size} elements): does every element get a thread?")
    return torch.from_numpy(np.ascontiguousarray(data))


def _rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _expect(t: torch.Tensor) -> torch.Tensor:
    """A float64 reference result as the float32 tensor the kernel should produce."""
    return t.to(torch.float32)


# --------------------------------------------------------------------------------------------------------
# 6.1 map with a guard


@chapter.exercise("6.1", reference=kb.axpy_kernel,
                  hint="i = cuda.grid(1); only threads with i < x.shape[0] may touch memory")
def axpy_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(61)
    for n, alpha in [(300, 2.5), (77, -0.75), (1, 3.0)]:
        where = f"N={n}, alpha={alpha}, {cdiv(n, THREADS)} blocks of {THREADS}"
        x, y = _rand(rng, n), _rand(rng, n)
        out = _buffer((n,))
        _launch(fn, (cdiv(n, THREADS),), (THREADS,), (alpha, x, y, out), where)
        expected = _expect(alpha * torch.from_numpy(x).double() + torch.from_numpy(y).double())
        compare(_result(out, (n,), "out", where), expected, where=where, name="out")


# --------------------------------------------------------------------------------------------------------
# 6.2 a 2-D map: all pairwise squared distances


@chapter.exercise("6.2", reference=kb.pairwise_sqdist_kernel,
                  hint="k, n = cuda.grid(2) (x runs over codes, y over vectors); guard both indices")
def pairwise_sqdist_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(62)
    for n, k, d in [(37, 19, 5), (9, 45, 3)]:
        where = f"z {n}x{d}, codebook {k}x{d}, blocks of 8x8"
        z, c = _rand(rng, n, d), _rand(rng, k, d)
        out = _buffer((n, k))
        _launch(fn, (cdiv(k, 8), cdiv(n, 8)), (8, 8), (z, c, out), where)
        zt, ct = torch.from_numpy(z).double(), torch.from_numpy(c).double()
        expected = _expect(((zt[:, None, :] - ct[None, :, :]) ** 2).sum(-1))
        compare(_result(out, (n, k), "out", where), expected, where=where, name="out", atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# 6.3 block reduction in shared memory


@chapter.exercise("6.3", reference=kb.make_block_sum_kernel(THREADS),
                  hint="load 0 past the end, then halve the active threads each step with a "
                  "cuda.syncthreads() that every thread of the block reaches (not inside the `if`)")
def block_sum_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(63)
    for n in (200, 45, 5):
        blocks = cdiv(n, THREADS)
        where = f"N={n}, {blocks} blocks of {THREADS}"
        x = _rand(rng, n)
        partial = _buffer((blocks,))
        _launch(fn, (blocks,), (THREADS,), (x, partial), where)
        padded = np.zeros(blocks * THREADS)
        padded[:n] = x
        expected = _expect(torch.from_numpy(padded.reshape(blocks, THREADS)).sum(1))
        compare(_result(partial, (blocks,), "partial", where), expected, where=where, name="partial", atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# 6.4 tiled matmul


@chapter.exercise("6.4", reference=kb.make_matmul_kernel(TILE),
                  hint="load zeros for tile elements outside a or b, and put a cuda.syncthreads() both after "
                  "loading the tiles and after using them")
def matmul_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(64)
    for m, inner, n in [(21, 19, 13), (9, 30, 7)]:
        where = f"a {m}x{inner} @ b {inner}x{n}, tiles of {TILE}x{TILE}"
        a, b = _rand(rng, m, inner), _rand(rng, inner, n)
        c = _buffer((m, n))
        _launch(fn, (cdiv(n, TILE), cdiv(m, TILE)), (TILE, TILE), (a, b, c), where)
        expected = _expect(torch.from_numpy(a).double() @ torch.from_numpy(b).double())
        compare(_result(c, (m, n), "c", where), expected, where=where, name="c", atol=1e-4)


# --------------------------------------------------------------------------------------------------------
# 6.5 online softmax, one block per row


@chapter.exercise("6.5", reference=ks.make_softmax_kernel(THREADS),
                  hint="keep a running (max, sum) per thread and rescale the sum by exp(old max - new max); "
                  "merge two pairs with the same rule; start the max at LOWEST, not at 0")
def softmax_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(65)
    for rows, cols, scale in [(7, 45, 3.0), (4, 5, 1.0), (3, 70, 60.0)]:
        where = f"{rows}x{cols} logits of scale {scale:g}, one block of {THREADS} per row"
        x = _rand(rng, rows, cols, scale=scale)
        out = _buffer((rows, cols))
        _launch(fn, (rows,), (THREADS,), (x, out), where)
        expected = _expect(torch.softmax(torch.from_numpy(x).double(), dim=-1))
        compare(_result(out, (rows, cols), "out", where), expected, where=where, name="out", atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# 6.6 fused nearest-code search


def _vq_case(rng: np.random.Generator, n: int, k: int, d: int, dup: bool) -> tuple[np.ndarray, np.ndarray]:
    """Vectors near random codes; with ``dup`` code 4 is repeated at the end, so some rows tie exactly."""
    c = _rand(rng, k, d)
    if dup:
        c[-1] = c[4]
    z = c[rng.integers(0, k, n)] + _rand(rng, n, d, scale=0.3)
    if dup:
        z[::5] = c[4] + _rand(rng, len(z[::5]), d, scale=0.05)
    return z, c


@chapter.exercise("6.6", reference=kv.vq_nearest_kernel,
                  hint="keep (best distance, best index) in registers; replace only when strictly smaller, so "
                  "ties keep the lowest index")
def vq_nearest_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(66)
    for n, k, d, dup in [(100, 37, 6, True), (45, 1, 3, False), (70, 50, 5, False)]:
        where = f"z {n}x{d}, codebook {k}x{d}" + (" (code 4 repeated as the last code)" if dup else "")
        z, c = _vq_case(rng, n, k, d, dup)
        out = _buffer((n,), np.int64)
        _launch(fn, (cdiv(n, THREADS),), (THREADS,), (z, c, out), where)
        dist = ((torch.from_numpy(z).double()[:, None] - torch.from_numpy(c).double()[None]) ** 2).sum(-1)
        compare(_result(out, (n,), "out", where), dist.argmin(1), where=where, name="out")


# --------------------------------------------------------------------------------------------------------
# 6.7 FlashAttention forward


def _attention64(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_len: np.ndarray, scale: float) -> torch.Tensor:
    qt, kt, vt = (torch.from_numpy(a).double() for a in (q, k, v))
    scores = qt @ kt.transpose(-2, -1) * scale  # (BH, T_q, T_k)
    visible = torch.arange(k.shape[1])[None, :] < torch.from_numpy(kv_len).long()[:, None]
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ vt


@chapter.exercise("6.7", reference=ka.make_flash_attention_kernel(BLOCK_M, BLOCK_N, HEAD_DIM),
                  hint="per row keep (m, l, acc); when a score beats m multiply l and acc by exp(m - s) first; "
                  "use only keys j < kv_len[row]; barriers after loading a tile and after using it")
def flash_attention_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(67)
    cases = [
        ("causal", 2, 37, 37, np.arange(1, 38)),
        ("block-causal (1, 4, 9, 15)", 1, 29, 29, BlockCausal((1, 4, 9, 15)).kv_len().numpy()),
        ("no mask", 2, 21, 21, np.full(21, 21)),
        ("7 queries after a 33-token prefix", 1, 7, 40, np.arange(34, 41)),
    ]
    for label, bh, t_q, t_k, kv_len in cases:
        where = f"{label}: BH={bh}, T_q={t_q}, T_k={t_k}, D={HEAD_DIM}"
        q, k, v = _rand(rng, bh, t_q, HEAD_DIM), _rand(rng, bh, t_k, HEAD_DIM), _rand(rng, bh, t_k, HEAD_DIM)
        kv_len = np.ascontiguousarray(kv_len, dtype=np.int32)
        scale = 1.5 / math.sqrt(HEAD_DIM)
        out = _buffer((bh, t_q, HEAD_DIM))
        _launch(fn, (cdiv(t_q, BLOCK_M), bh), (BLOCK_M,), (q, k, v, kv_len, scale, out), where)
        expected = _expect(_attention64(q, k, v, kv_len, scale))
        compare(_result(out, (bh, t_q, HEAD_DIM), "out", where), expected, where=where, name="out", atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# 6.8 and 6.9 decode attention: split the keys, then combine


def _combine64(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """(BH, S), (BH, S), (BH, S, D) split summaries -> (BH, D) attention output, in float64."""
    m, l, acc = m.double(), l.double(), acc.double()
    w = torch.exp(m - m.amax(1, keepdim=True))  # (BH, S)
    return (w[:, :, None] * acc).sum(1) / (w * l).sum(1)[:, None]


@chapter.exercise("6.8", reference=ka.make_decode_partial_kernel(HEAD_DIM),
                  hint="thread (split, bh) reads only keys split*chunk <= j < min((split+1)*chunk, lengths[bh]) "
                  "with the online-softmax update; an empty split writes (LOWEST, 0, 0)")
def decode_partial_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(68)
    for lengths, t_max, chunk in [([50, 23, 1], 50, 8), ([33, 17], 33, 16)]:
        bh, splits = len(lengths), cdiv(t_max, chunk)
        where = f"lengths {lengths}, T_max={t_max}, chunk={chunk} ({splits} splits), D={HEAD_DIM}"
        q = _rand(rng, bh, HEAD_DIM)
        k_cache, v_cache = _rand(rng, bh, t_max, HEAD_DIM, scale=2.0), _rand(rng, bh, t_max, HEAD_DIM)
        for i, n in enumerate(lengths):  # past the end of each sequence the cache holds garbage
            k_cache[i, n:] = np.nan
            v_cache[i, n:] = np.nan
        lens = np.asarray(lengths, dtype=np.int32)
        scale = 1.0 / math.sqrt(HEAD_DIM)
        m_out, l_out, acc_out = _buffer((bh, splits)), _buffer((bh, splits)), _buffer((bh, splits, HEAD_DIM))
        _launch(fn, (cdiv(splits, 8), bh), (8,), (q, k_cache, v_cache, lens, chunk, scale, m_out, l_out, acc_out),
                where)
        m = _result(m_out, (bh, splits), "m_out", where)
        l = _result(l_out, (bh, splits), "l_out", where)
        acc = _result(acc_out, (bh, splits, HEAD_DIM), "acc_out", where)
        qt, kt, vt = (torch.from_numpy(np.nan_to_num(a)).double() for a in (q, k_cache, v_cache))
        scores = (kt @ qt[:, :, None]).squeeze(-1) * scale  # (BH, T_max)
        visible = torch.arange(t_max)[None, :] < torch.from_numpy(lens).long()[:, None]
        expected = _expect(torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)[:, None, :] @ vt).squeeze(1)
        compare(_expect(_combine64(m, l, acc)), expected, where=where, atol=1e-5,
                name="attention combined from your (m_out, l_out, acc_out)")


def _combine_cases(rng: np.random.Generator):
    """Split summaries: one with an empty split (m = -inf), one whose maxima differ by more than 88."""
    bh, splits, d = 3, 5, 6
    m = _rand(rng, bh, splits, scale=2.0)
    m[1, 3] = -np.inf
    l = rng.uniform(0.5, 4.0, (bh, splits)).astype(np.float32)
    l[1, 3] = 0.0
    acc = _rand(rng, bh, splits, d)
    acc[1, 3] = 0.0
    yield "3 heads x 5 splits, split 3 of head 1 empty", m, l, acc
    bh, splits, d = 5, 4, 3
    m = rng.uniform(0.0, 60.0, (bh, splits)).astype(np.float32)
    m[:, 0] = -50.0  # exp(m_s - m_0) overflows float32: only the largest m is a safe reference point
    yield "5 heads x 4 splits, maxima spread over [-50, 60]", m, rng.uniform(0.5, 4.0, (bh, splits)).astype(
        np.float32), _rand(rng, bh, splits, d)


@chapter.exercise("6.9", reference=ka.decode_combine_kernel,
                  hint="weight split s by exp(m_s - M) with M the largest m of the row, for both the numerator "
                  "(acc) and the denominator (l)")
def decode_combine_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(69)
    for label, m, l, acc in _combine_cases(rng):
        bh, _, d = acc.shape
        where = f"{label}, D={d}, blocks of 8x4"
        out = _buffer((bh, d))
        _launch(fn, (cdiv(d, 8), cdiv(bh, 4)), (8, 4), (m, l, acc, out), where)
        expected = _expect(_combine64(*(torch.from_numpy(a) for a in (m, l, acc))))
        compare(_result(out, (bh, d), "out", where), expected, where=where, name="out", atol=1e-5)
