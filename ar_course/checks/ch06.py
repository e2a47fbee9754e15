"""Checks for chapter 06, GPU kernels: ``checks.ch06.axpy_kernel(axpy_kernel)`` etc.

The learner writes a ``@cuda.jit`` kernel; the check launches it itself (grid and block as the exercise
states), on seeded random inputs whose sizes are not multiples of the block size, and compares with torch.
Without a GPU the launch runs in numba's CUDA simulator under :func:`ar_course.kernels.sanitizer.sanitize`,
so out-of-range indices, missing barriers, barriers some threads skip and reads of unwritten shared memory
are reported on every run. Every output buffer is larger than the data and pre-filled with a sentinel, so
a stray write past the end, an element never written, or a kernel that adds into its output as if it held zeros,
is named as such (also on a real GPU). When the numbers are wrong, the check launches each plausible wrong kernel
of the exercise (its ``*_MISTAKES``: no rescaling when the max grows, a max started at 0, the farthest code...) on
the failing input, and the failure names the mistake whose output is the learner's.

A kernel exercise is about memory traffic as much as about the numbers, so once the numbers are right the
checks count, in the simulator, what each thread did with memory (:class:`~ar_course.kernels.sanitizer.
MemoryTraffic`, as GPU-Puzzles counts reads) and hold it to what the lesson needs:

* 6.3 block sum: each thread reads at most one element of ``x``, and at most ``2 log2(THREADS) + 1`` shared
  values (a tree, not one thread adding the block's values one by one), and the block allocates a shared buffer
  of ``THREADS`` values (atomic additions skip the tree);
* 6.4 tiled matmul: the blocks allocate shared memory for a TILE x TILE tile of ``a`` and one of ``b``, and each
  thread reads at most ``ceil(K / TILE)`` elements of ``a`` and as many of ``b`` (one per tile step; an untiled
  kernel reads ``K`` of each);
* 6.5 online softmax: each thread reads each element of its slice of the row twice at most, once for the
  running (max, sum) and once to write (``2 ceil(C / THREADS)``; three passes read it three times), and at most
  ``8 log2(THREADS) + 2 ceil(C / THREADS)`` shared values (a tree merge, then the row's max and sum for each
  element written; not thread 0 merging every pair);
* 6.6 fused nearest code: each thread writes ``out`` once and keeps no local array as long as the codebook
  (no distance per code: N x K numbers in all);
* 6.7 FlashAttention: the blocks allocate shared memory for a BLOCK_N x D tile of ``k`` and one of ``v``, and
  each thread reads at most ``ceil(T_k / BLOCK_N) * ceil(BLOCK_N * D / BLOCK_M)`` elements of ``k`` and as many
  of ``v``: its share of loading each tile once per block (a thread that reads its row's keys itself reads up
  to ``T_k * D``);
* 6.8 decode partial: each thread reads each key and value of its split once (``chunk * D`` of each).

On a GPU these counts are not available and only the numbers are checked.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable

import numpy as np
import torch

from ar_course.checks.core import Case, Chapter, CheckFailure, Mistake, compare, explain
from ar_course.kernels import cuda_attention as ka
from ar_course.kernels import cuda_basic as kb
from ar_course.kernels import cuda_softmax as ks
from ar_course.kernels import cuda_vq as kv
from ar_course.kernels.cuda_softmax import LOWEST  # the notebook imports it from here too
from ar_course.kernels.env import cuda
from ar_course.kernels.launch import cdiv
from ar_course.kernels.masks import BlockCausal
from ar_course.kernels.sanitizer import LOCAL, READ, SHARED_READ, WRITE, MemoryTraffic, SanitizerError, sanitize
from numba import float32  # after ar_course.kernels, which chooses the CUDA simulator before numba.cuda loads

chapter = Chapter(6, "GPU kernels")
use = chapter.use
hint = chapter.hint

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


def _launch(fn: Any, grid: tuple, block: tuple, args: tuple, where: str) -> MemoryTraffic:
    """``fn[grid, block](*args)`` under the sanitizer; every crash becomes a one-line CheckFailure. Returns what
    each thread did with memory (empty outside the simulator)."""
    _require_kernel(fn)
    try:
        with sanitize() as traffic, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow in a wrong kernel shows up as a value
            fn[grid, block](*args)
        return traffic
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


def _at_most(traffic: MemoryTraffic, kind: str, arg: int | None, bound: int, where: str, lesson: str) -> None:
    """Raise CheckFailure when some thread's count of ``(kind, arg)`` exceeds ``bound``, naming the thread, the
    count and the ``lesson``; nothing outside the simulator."""
    if not traffic.measured:
        return
    n, who = traffic.most(kind, arg)
    if n <= bound:
        return
    did = {READ: f"read {traffic.name(arg) if arg is not None else ''} {n} times from global memory",
           WRITE: f"wrote {traffic.name(arg) if arg is not None else ''} {n} times",
           SHARED_READ: f"read {n} values from shared memory",
           LOCAL: f"allocated local arrays of {n} elements"}[kind]
    raise CheckFailure(f"{traffic.describe(who)} {did} on input {where!r}; at most {bound} will do: {lesson}")


TILED = ("a tiled kernel stages its tiles in cuda.shared.array, loaded once per block and read there by all its "
         "threads")


def _needs_shared(traffic: MemoryTraffic, elements: int, where: str, what: str, lesson: str = TILED) -> None:
    """Raise CheckFailure when the blocks allocate fewer than ``elements`` shared-memory elements, the size of
    ``what``, naming the ``lesson``; nothing outside the simulator."""
    if traffic.measured and traffic.shared_elements() < elements:
        raise CheckFailure(f"your kernel allocates {traffic.shared_elements()} shared-memory elements per block on "
                           f"input {where!r}, fewer than the {elements} of {what}: {lesson}")


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


def _explain(failure: CheckFailure, mistakes: tuple[Mistake, ...], got: Any, rerun: Callable[[Any], Any],
             atol: float = 1e-5) -> CheckFailure:
    """``failure`` completed with the diagnosis of the first of ``mistakes`` (each a kernel with the reference's
    signature) whose output on the failing input, as ``rerun(kernel)`` launches it and reads it back, is ``got``
    (:func:`~ar_course.checks.core.explain`, with the launch as the mistake's function)."""
    runs = [Mistake(lambda kernel=m.fn: rerun(kernel), m.says) for m in mistakes]
    return explain(failure, runs, Case("the failing input"), got, atol=atol)


def _compare_output(got: torch.Tensor, expected: torch.Tensor, where: str, name: str, atol: float = 1e-5,
                    mistakes: tuple[Mistake, ...] = (), rerun: Callable[[Any], Any] | None = None) -> None:
    """:func:`compare` a kernel's float output with the expected one; when the values are off by the sentinel the
    buffer held, the kernel added into the output instead of writing it, and the failure says so; otherwise,
    when one of ``mistakes`` launched by ``rerun`` (see :func:`_explain`) writes ``got``, the failure names it."""
    try:
        compare(got, expected, where=where, name=name, atol=atol)
    except CheckFailure as exc:
        offset = (got.double() - expected.double() - SENTINEL).abs()
        if bool((offset < 0.05).any()):
            raise CheckFailure(f"{exc}; that is the right value plus the {SENTINEL:g} the buffer held before the "
                               f"launch: your kernel adds into {name} (+= or cuda.atomic.add), but an output buffer "
                               "holds whatever was there before, not zeros, so write each element once") from None
        if mistakes and rerun is not None:
            raise _explain(exc, mistakes, got, rerun, atol) from None
        raise


def _rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _expect(t: torch.Tensor) -> torch.Tensor:
    """A float64 reference result as the float32 tensor the kernel should produce."""
    return t.to(torch.float32)


# --------------------------------------------------------------------------------------------------------
# 6.1 map with a guard


@cuda.jit
def _axpy_scales_the_sum(alpha, x, y, out):
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] = alpha * (x[i] + y[i])


@cuda.jit
def _axpy_whole_alpha(alpha, x, y, out):
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] = int(alpha) * x[i] + y[i]


@cuda.jit
def _axpy_scales_y(alpha, x, y, out):
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] = x[i] + alpha * y[i]


AXPY_MISTAKES = (
    Mistake(_axpy_scales_the_sum, "that is alpha * (x + y): alpha scales x alone, and y is added after"),
    Mistake(_axpy_whole_alpha, "that is int(alpha) * x + y: alpha lost its fractional part, as if it were an "
            "integer"),
    Mistake(_axpy_scales_y, "that is x + alpha * y: alpha scales x, not y"),
)


@chapter.exercise("6.1", reference=kb.axpy_kernel, hints=(
    "each thread handles one element, and the grid may hold more threads than there are elements",
    "cuda.grid(1) is this thread's element (block offset included); only threads whose index is inside x may "
    "read or write",
    "i = cuda.grid(1); if i < x.shape[0]: out[i] = alpha * x[i] + y[i]",
))
def axpy_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(61)
    for n, alpha in [(300, 2.5), (77, -0.75), (1, 3.0)]:
        where = f"N={n}, alpha={alpha}, {cdiv(n, THREADS)} blocks of {THREADS}"
        x, y = _rand(rng, n), _rand(rng, n)

        def run(kernel: Any) -> torch.Tensor:
            out = _buffer((n,))
            _launch(kernel, (cdiv(n, THREADS),), (THREADS,), (alpha, x, y, out), where)
            return _result(out, (n,), "out", where)

        expected = _expect(alpha * torch.from_numpy(x).double() + torch.from_numpy(y).double())
        _compare_output(run(fn), expected, where, "out", mistakes=AXPY_MISTAKES, rerun=run)


# --------------------------------------------------------------------------------------------------------
# 6.2 a 2-D map: all pairwise squared distances


@cuda.jit
def _sqdist_with_sqrt(z, codebook, out):
    k, n = cuda.grid(2)
    if n < z.shape[0] and k < codebook.shape[0]:
        acc = float32(0.0)
        for d in range(z.shape[1]):
            acc += (z[n, d] - codebook[k, d]) ** 2
        out[n, k] = math.sqrt(acc)


SQDIST_MISTAKES = (
    Mistake(_sqdist_with_sqrt, "that is the distance itself, the square root of the sum; the exercise asks for "
            "the squared distance"),
)


@chapter.exercise("6.2", reference=kb.pairwise_sqdist_kernel, hints=(
    "a 2-D grid: each thread computes one (vector, code) pair; work out which thread axis runs along which "
    "array axis, and guard both",
    "k, n = cuda.grid(2) (x runs over the codes, y over the vectors); when both are in range, add up the "
    "squared differences over d in a float32 accumulator and write out[n, k]",
    "k, n = cuda.grid(2); if n < z.shape[0] and k < codebook.shape[0]: acc = float32(0.0); for d in "
    "range(z.shape[1]): acc += (z[n, d] - codebook[k, d]) ** 2; out[n, k] = acc",
))
def pairwise_sqdist_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(62)
    for n, k, d in [(37, 19, 5), (9, 45, 3)]:
        where = f"z {n}x{d}, codebook {k}x{d}, blocks of 8x8"
        z, c = _rand(rng, n, d), _rand(rng, k, d)

        def run(kernel: Any) -> torch.Tensor:
            out = _buffer((n, k))
            _launch(kernel, (cdiv(k, 8), cdiv(n, 8)), (8, 8), (z, c, out), where)
            return _result(out, (n, k), "out", where)

        zt, ct = torch.from_numpy(z).double(), torch.from_numpy(c).double()
        expected = _expect(((zt[:, None, :] - ct[None, :, :]) ** 2).sum(-1))
        _compare_output(run(fn), expected, where, "out", atol=1e-5, mistakes=SQDIST_MISTAKES, rerun=run)


# --------------------------------------------------------------------------------------------------------
# 6.3 block reduction in shared memory


@chapter.exercise("6.3", reference=kb.make_block_sum_kernel(THREADS), hints=(
    "the threads of a block cooperate through shared memory: each loads one value, then values are added in "
    "pairs, round after round, with half as many threads busy each round",
    "load 0 for threads past the end of x; in each round the threads t < stride add buf[t + stride] into "
    "buf[t]; separate the rounds with a cuda.syncthreads() that every thread reaches (outside the `if`); thread "
    "0 writes buf[0]",
    "buf[t] = x[i] if i < x.shape[0] else 0; cuda.syncthreads(); stride = THREADS // 2; while stride > 0: (if t "
    "< stride: buf[t] += buf[t + stride]); cuda.syncthreads(); stride //= 2; then if t == 0: "
    "partial[cuda.blockIdx.x] = buf[0]",
))
def block_sum_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(63)
    tree = 2 * int(math.log2(THREADS)) + 1  # two reads per halving step, one for the result
    for n in (200, 45, 5):
        blocks = cdiv(n, THREADS)
        where = f"N={n}, {blocks} blocks of {THREADS}"
        x = _rand(rng, n)
        partial = _buffer((blocks,))
        traffic = _launch(fn, (blocks,), (THREADS,), (x, partial), where)
        padded = np.zeros(blocks * THREADS)
        padded[:n] = x
        expected = _expect(torch.from_numpy(padded.reshape(blocks, THREADS)).sum(1))
        _compare_output(_result(partial, (blocks,), "partial", where), expected, where, "partial", atol=1e-5)
        _at_most(traffic, READ, 0, 1, where, "each thread loads one element of x into shared memory, and the "
                 "block adds the values there together")
        _at_most(traffic, SHARED_READ, None, tree, where, "one thread adding the block's values one after "
                 "another leaves the others idle; a tree adds pairs in parallel, so each thread reads two values "
                 "per round")
        _needs_shared(traffic, THREADS, where, "a buffer of one value per thread", "each thread stores its value "
                      "in cuda.shared.array(THREADS, float32) and the block adds the values there in a tree (atomic "
                      "additions into one place make every thread wait for the others)")


# --------------------------------------------------------------------------------------------------------
# 6.4 tiled matmul


def _matmul_over(terms: str) -> Any:
    """An untiled matmul whose sum over k leaves out the last term (``terms="all but the last"``) or the last,
    partial tile (``terms="full tiles"``)."""

    all_but_last = terms == "all but the last"  # a bool, which a GPU kernel can close over

    @cuda.jit
    def matmul_mistake(a, b, c):
        col, row = cuda.grid(2)
        if row < a.shape[0] and col < b.shape[1]:
            stop = a.shape[1] - 1 if all_but_last else (a.shape[1] // TILE) * TILE
            acc = float32(0.0)
            for kk in range(stop):
                acc += a[row, kk] * b[kk, col]
            c[row, col] = acc

    return matmul_mistake


MATMUL_MISTAKES = (
    Mistake(_matmul_over("all but the last"), "that sum over k leaves out its last term, k = K - 1: the product "
            "runs over all K columns of a"),
    Mistake(_matmul_over("full tiles"), "that sum over k leaves out the last, partial tile (K // TILE tiles): "
            "when TILE does not divide K, the last tile holds the remaining K % TILE terms"),
)


@chapter.exercise("6.4", reference=kb.make_matmul_kernel(TILE), hints=(
    "the block computes a TILE x TILE piece of c; it walks along K one tile at a time, and its threads load each "
    "tile of a and of b once into shared memory and all read it from there",
    "per step each thread loads one element of a's tile and one of b's (0 outside the matrices) into "
    "cuda.shared.array((TILE, TILE), float32) arrays, then a barrier, then TILE multiply-adds from shared memory, "
    "then a barrier again before the next step overwrites the tiles",
    "for k0 in range(0, K, TILE): a_tile[ty, tx] = a[row, k0 + tx] (guarded, else 0); b_tile[ty, tx] = b[k0 + ty, "
    "col] (guarded, else 0); cuda.syncthreads(); for kk in range(TILE): acc += a_tile[ty, kk] * b_tile[kk, tx]; "
    "cuda.syncthreads(); after the loop, if row < M and col < N: c[row, col] = acc",
))
def matmul_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(64)
    for m, inner, n in [(21, 19, 13), (9, 30, 7)]:
        where = f"a {m}x{inner} @ b {inner}x{n}, tiles of {TILE}x{TILE}"
        a, b = _rand(rng, m, inner), _rand(rng, inner, n)
        c = _buffer((m, n))
        traffic = _launch(fn, (cdiv(n, TILE), cdiv(m, TILE)), (TILE, TILE), (a, b, c), where)

        def run(kernel: Any) -> torch.Tensor:
            c = _buffer((m, n))
            _launch(kernel, (cdiv(n, TILE), cdiv(m, TILE)), (TILE, TILE), (a, b, c), where)
            return _result(c, (m, n), "c", where)

        expected = _expect(torch.from_numpy(a).double() @ torch.from_numpy(b).double())
        _compare_output(_result(c, (m, n), "c", where), expected, where, "c", atol=1e-4, mistakes=MATMUL_MISTAKES,
                        rerun=run)
        _needs_shared(traffic, 2 * TILE * TILE, where, "a TILE x TILE tile of a and one of b")
        steps = cdiv(inner, TILE)
        for arg in (0, 1):
            _at_most(traffic, READ, arg, steps, where, "a tiled kernel reads each input element once per tile: "
                     "each thread loads one element per step into a TILE x TILE cuda.shared.array, and the "
                     "block's threads read the tile from there")


# --------------------------------------------------------------------------------------------------------
# 6.5 online softmax, one block per row


def _softmax_mistake(track_max: bool = True, start_m: float = LOWEST, rescale_update: bool = True,
                     rescale_merge: bool = True) -> Any:
    """The online softmax with one thing missing: no running max at all (``track_max``), a max started at
    ``start_m``, a running sum not rescaled when the max grows, or a merge that adds the sums as they are."""
    start = float(start_m)

    @cuda.jit
    def softmax_mistake(x, out):
        row_max = cuda.shared.array(THREADS, float32)
        row_sum = cuda.shared.array(THREADS, float32)
        t = cuda.threadIdx.x
        row = cuda.blockIdx.x
        m = float32(start)
        s = float32(0.0)
        for c in range(t, x.shape[1], THREADS):
            xv = x[row, c]
            if track_max and xv > m:
                if rescale_update:
                    s = s * math.exp(m - xv)
                m = xv
            s += math.exp(xv - m)
        row_max[t] = m
        row_sum[t] = s
        cuda.syncthreads()
        stride = THREADS // 2
        while stride > 0:
            if t < stride:
                m1 = row_max[t]
                m2 = row_max[t + stride]
                mm = max(m1, m2)
                if rescale_merge:
                    row_sum[t] = row_sum[t] * math.exp(m1 - mm) + row_sum[t + stride] * math.exp(m2 - mm)
                else:
                    row_sum[t] = row_sum[t] + row_sum[t + stride]
                row_max[t] = mm
            cuda.syncthreads()
            stride //= 2
        for c in range(t, x.shape[1], THREADS):
            out[row, c] = math.exp(x[row, c] - row_max[0]) / row_sum[0]

    return softmax_mistake


SOFTMAX_MISTAKES = (  # a max started at 0 first: on logits all below 0 it gives what no max at all gives
    Mistake(_softmax_mistake(start_m=0.0), "the running max starts at 0, above every logit of the row, so it "
            "stays 0, every exp(x - 0) underflows to 0 and the row sums to 0 (0 / 0 = nan)"),
    Mistake(_softmax_mistake(track_max=False, start_m=0.0), "that is exp(x) / sum exp(x), with no max subtracted: "
            "exp overflows float32 once a logit passes about 88, and inf / inf = nan"),
    Mistake(_softmax_mistake(rescale_merge=False), "the merge adds two threads' sums as they are: each sum is "
            "relative to its own thread's max, not to the merged max"),
    Mistake(_softmax_mistake(rescale_update=False), "that keeps the running sum unchanged when a value raises "
            "the running max: the terms added before are relative to the old max"),
)


@chapter.exercise("6.5", reference=ks.make_softmax_kernel(THREADS), hints=(
    "each thread summarises its strided slice of the row in a single pass as a (max, sum) pair, and the "
    "block merges the pairs; the max can change while the sum is being built",
    "when a value beats the running max, first rescale the running sum by exp(old max - new max); merge two "
    "pairs with the same rule in a shared-memory tree; start the max at LOWEST, not 0; a second pass writes "
    "exp(x - m) / s",
    "for c in range(t, C, THREADS): v = x[row, c]; if v > m: s *= math.exp(m - v); m = v; s += math.exp(v - m); "
    "then merge (m1, s1), (m2, s2) as mm = max(m1, m2), s = s1 * exp(m1 - mm) + s2 * exp(m2 - mm)",
))
def softmax_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(65)
    for rows, cols, scale, shift in [(7, 45, 3.0, 0.0), (4, 5, 1.0, 0.0), (3, 70, 60.0, 0.0), (2, 40, 2.0, -200.0)]:
        where = f"{rows}x{cols} logits of scale {scale:g}" + (f", all near {shift:g}" if shift else "") + \
            f", one block of {THREADS} per row"
        x = _rand(rng, rows, cols, scale=scale) + np.float32(shift)
        out = _buffer((rows, cols))
        traffic = _launch(fn, (rows,), (THREADS,), (x, out), where)
        # a tree: up to 8 shared reads per round, then the row's (m, s) once per element written
        merge = 8 * int(math.log2(THREADS)) + 2 * cdiv(cols, THREADS)

        def run(kernel: Any) -> torch.Tensor:
            out = _buffer((rows, cols))
            _launch(kernel, (rows,), (THREADS,), (x, out), where)
            return _result(out, (rows, cols), "out", where)

        expected = _expect(torch.softmax(torch.from_numpy(x).double(), dim=-1))
        _compare_output(_result(out, (rows, cols), "out", where), expected, where, "out", atol=1e-6,
                        mistakes=SOFTMAX_MISTAKES, rerun=run)
        _at_most(traffic, READ, 0, 2 * cdiv(cols, THREADS), where, "the online softmax reads each element of "
                 "its slice twice: once to update the running (max, sum) together, once to write the output; a "
                 "separate pass for the max, or a thread reading the whole row, reads more")
        _at_most(traffic, SHARED_READ, None, merge, where, "one thread merging every pair of the block one after "
                 "another leaves the others idle; a tree merges pairs in parallel, as the block sum of 6.3 does "
                 "(a tree that reads more re-reads shared values it could keep in a local variable)")


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


def _vq_mistake(farthest: bool = False, ties_to_last: bool = False, best_start: float = math.inf) -> Any:
    """The fused search keeping the farthest code, the last of equally near codes, or a best distance started at
    ``best_start``."""
    start = -1.0 if farthest else float(best_start)

    @cuda.jit
    def vq_mistake(z, codebook, out):
        n = cuda.grid(1)
        if n < z.shape[0]:
            best = float32(start)
            best_k = 0
            for k in range(codebook.shape[0]):
                dist = float32(0.0)
                for d in range(z.shape[1]):
                    diff = z[n, d] - codebook[k, d]
                    dist += diff * diff
                if (dist > best) if farthest else (dist < best or (ties_to_last and dist == best)):
                    best = dist
                    best_k = k
            out[n] = best_k

    return vq_mistake


VQ_MISTAKES = (
    Mistake(_vq_mistake(ties_to_last=True), "on a tie that keeps the code with the highest index (a <= "
            "comparison); the lowest index should win"),
    Mistake(_vq_mistake(farthest=True), "that is the farthest code (the largest distance), not the nearest"),
    Mistake(_vq_mistake(best_start=0.0), "the best distance starts at 0, and no distance is below 0, so every "
            "vector keeps code 0"),
)


@chapter.exercise("6.6", reference=kv.vq_nearest_kernel, hints=(
    "one thread per vector: it walks the codebook once and remembers only the best code so far, never a "
    "distance per code",
    "keep (best distance, best index) in two local variables, replace them only when a distance is strictly "
    "smaller (so a tie keeps the lower index), and write out[n] once, after the loop",
    "best = float32(math.inf); best_k = 0; for k in range(K): dist = sum over d of (z[n, d] - codebook[k, d]) ** "
    "2; if dist < best: best, best_k = dist, k; then out[n] = best_k",
))
def vq_nearest_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(66)
    for n, k, d, dup in [(100, 37, 6, True), (45, 1, 3, False), (70, 50, 5, False)]:
        where = f"z {n}x{d}, codebook {k}x{d}" + (" (code 4 repeated as the last code)" if dup else "")
        z, c = _vq_case(rng, n, k, d, dup)
        out = _buffer((n,), np.int64)
        traffic = _launch(fn, (cdiv(n, THREADS),), (THREADS,), (z, c, out), where)
        dist = ((torch.from_numpy(z).double()[:, None] - torch.from_numpy(c).double()[None]) ** 2).sum(-1)
        got = _result(out, (n,), "out", where)

        def run(kernel: Any) -> torch.Tensor:
            out = _buffer((n,), np.int64)
            _launch(kernel, (cdiv(n, THREADS),), (THREADS,), (z, c, out), where)
            return _result(out, (n,), "out", where)

        try:
            compare(got, dist.argmin(1), where=where, name="out")
        except CheckFailure as exc:
            raise _explain(exc, VQ_MISTAKES, got, run) from None
        _at_most(traffic, WRITE, 2, 1, where, "keep the best index in a local variable and write it to global "
                 "memory once, after the loop")
        if k > 32:  # a local array as long as this codebook holds a distance per code
            _at_most(traffic, LOCAL, None, k - 1, where, f"that is room for a distance per code ({k} codes), N x K "
                     "numbers over all threads; the fused search keeps only the best distance and its index")


# --------------------------------------------------------------------------------------------------------
# 6.7 FlashAttention forward


def _attention64(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_len: np.ndarray, scale: float) -> torch.Tensor:
    qt, kt, vt = (torch.from_numpy(a).double() for a in (q, k, v))
    scores = qt @ kt.transpose(-2, -1) * scale  # (BH, T_q, T_k)
    visible = torch.arange(k.shape[1])[None, :] < torch.from_numpy(kv_len).long()[:, None]
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ vt


@cuda.jit(device=True)
def _online_update(s, m, l, acc, rescale):
    """One score ``s`` into a row's running (m, l, acc) of the mistake kernels of 6.7 and 6.8: when ``s`` beats
    ``m``, l and acc are rescaled (unless ``rescale`` is False, the mistake) and m becomes ``s``. Returns
    (m, l + p, p) with p = exp(s - m); the caller adds p times the key's value row into acc."""
    if s > m:
        if rescale:
            c = math.exp(m - s)
            l *= c
            for d in range(HEAD_DIM):
                acc[d] *= c
        m = s
    p = math.exp(s - m)
    return m, l + p, p


def _flash_mistake(rescale: bool = True, extra_key: int = 0, start_m: float = LOWEST, causal: bool = False,
                   use_scale: bool = True) -> Any:
    """FlashAttention with one mistake: l and acc not rescaled when the max grows, ``extra_key`` keys past each
    row's mask, a running max started at ``start_m``, a causal mask from the row index instead of kv_len, or
    no scale on the scores."""
    start = float(start_m)

    @cuda.jit
    def flash_mistake(q, k, v, kv_len, scale, out):
        k_tile = cuda.shared.array((BLOCK_N, HEAD_DIM), float32)
        v_tile = cuda.shared.array((BLOCK_N, HEAD_DIM), float32)
        acc = cuda.local.array(HEAD_DIM, float32)
        t = cuda.threadIdx.x
        bh = cuda.blockIdx.y
        first = cuda.blockIdx.x * BLOCK_M
        row = first + t
        t_q = q.shape[1]
        t_k = k.shape[1]
        visible = 0
        if row < t_q:
            visible = (row + t_k - t_q + 1 if causal else kv_len[row]) + extra_key
        for d in range(HEAD_DIM):
            acc[d] = 0.0
        n_keys = t_k if causal else 0
        for r in range(first, min(first + BLOCK_M, t_q)):
            n_keys = max(n_keys, kv_len[r])
        m = float32(start)
        l = float32(0.0)
        for begin in range(0, n_keys, BLOCK_N):
            for e in range(t, BLOCK_N * HEAD_DIM, BLOCK_M):
                j = e // HEAD_DIM
                d = e % HEAD_DIM
                if begin + j < t_k:
                    k_tile[j, d] = k[bh, begin + j, d]
                    v_tile[j, d] = v[bh, begin + j, d]
            cuda.syncthreads()
            for j in range(min(BLOCK_N, visible - begin)):
                s = float32(0.0)
                for d in range(HEAD_DIM):
                    s += q[bh, row, d] * k_tile[j, d]
                if use_scale:
                    s *= scale
                m, l, p = _online_update(s, m, l, acc, rescale)
                for d in range(HEAD_DIM):
                    acc[d] += p * v_tile[j, d]
            cuda.syncthreads()
        if row < t_q:
            for d in range(HEAD_DIM):
                out[bh, row, d] = acc[d] / l

    return flash_mistake


NO_RESCALE = ("that keeps l and acc unchanged when a score raises the running max m: the terms added before are "
              "relative to the old max")
NO_SCALE = "that is attention without the scale: every score is scale * (q . k)"

FLASH_MISTAKES = (
    Mistake(_flash_mistake(rescale=False), NO_RESCALE),
    Mistake(_flash_mistake(extra_key=1), "each row sees one key past its mask, kv_len[row] + 1 keys (j <= "
            "kv_len[row]); row i may see only the keys j < kv_len[i]"),
    Mistake(_flash_mistake(causal=True), "that is a causal mask worked out from the row index (row + T_k - T_q + 1 "
            "keys); the mask is kv_len, whatever its pattern: row i sees the keys j < kv_len[i]"),
    Mistake(_flash_mistake(start_m=0.0), "the running max starts at 0, above every score of the row, so it stays "
            "0, every exp(s - 0) underflows to 0 and l stays 0 (0 / 0 = nan)"),
    Mistake(_flash_mistake(use_scale=False), NO_SCALE),
)


@chapter.exercise("6.7", reference=ka.make_flash_attention_kernel(BLOCK_M, BLOCK_N, HEAD_DIM), hints=(
    "a block of BLOCK_M threads owns BLOCK_M query rows; together they stream K and V through shared memory, "
    "one tile of BLOCK_N keys at a time, and each thread keeps its row's online-softmax state",
    "per row keep (m, l, acc), m starting at LOWEST; when a score beats m, multiply l and acc by exp(m - s) "
    "first; all threads load a tile of k and v together (each a share), barrier, use it for the keys "
    "j < kv_len[row], barrier again before the next tile",
    "for e in range(t, BLOCK_N * D, BLOCK_M): k_tile[e // D, e % D] = k[bh, start + e // D, e % D] (and v; "
    "guarded); cuda.syncthreads(); for j in range(min(BLOCK_N, visible - start)): online-softmax update with "
    "k_tile[j], v_tile[j]; cuda.syncthreads()",
))
def flash_attention_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(67)
    scale = 1.5 / math.sqrt(HEAD_DIM)
    cases = [  # (label, BH, T_q, T_k, kv_len, a constant added to every score)
        ("causal", 2, 37, 37, np.arange(1, 38), 0.0),
        ("block-causal (1, 4, 9, 15)", 1, 29, 29, BlockCausal((1, 4, 9, 15)).kv_len().numpy(), 0.0),
        ("no mask", 2, 21, 21, np.full(21, 21), 0.0),
        ("7 queries after a 33-token prefix", 1, 7, 40, np.arange(34, 41), 0.0),
        # exp(score) underflows to 0 for every key: only a running max that starts below every score survives
        ("no mask, every score near -150", 1, 5, 19, np.full(5, 19), -150.0),
    ]
    for label, bh, t_q, t_k, kv_len, shift in cases:
        where = f"{label}: BH={bh}, T_q={t_q}, T_k={t_k}, D={HEAD_DIM}"
        q, k, v = _rand(rng, bh, t_q, HEAD_DIM), _rand(rng, bh, t_k, HEAD_DIM), _rand(rng, bh, t_k, HEAD_DIM)
        if shift:  # the last channel adds `shift` to every score: q_D * k_D * scale = 10 * (shift / (10 scale))
            q[..., -1], k[..., -1] = 10.0, shift / (10.0 * scale)
        kv_len = np.ascontiguousarray(kv_len, dtype=np.int32)
        out = _buffer((bh, t_q, HEAD_DIM))
        traffic = _launch(fn, (cdiv(t_q, BLOCK_M), bh), (BLOCK_M,), (q, k, v, kv_len, scale, out), where)

        def run(kernel: Any) -> torch.Tensor:
            out = _buffer((bh, t_q, HEAD_DIM))
            _launch(kernel, (cdiv(t_q, BLOCK_M), bh), (BLOCK_M,), (q, k, v, kv_len, scale, out), where)
            return _result(out, (bh, t_q, HEAD_DIM), "out", where)

        expected = _expect(_attention64(q, k, v, kv_len, scale))
        _compare_output(_result(out, (bh, t_q, HEAD_DIM), "out", where), expected, where, "out", atol=1e-5,
                        mistakes=FLASH_MISTAKES, rerun=run)
        _needs_shared(traffic, 2 * BLOCK_N * HEAD_DIM, where, "a BLOCK_N x HEAD_DIM tile of k and one of v")
        share = cdiv(t_k, BLOCK_N) * cdiv(BLOCK_N * HEAD_DIM, BLOCK_M)  # its part of loading every tile once
        for arg in (1, 2):
            _at_most(traffic, READ, arg, share, where, "the block loads each tile of keys and values once into "
                     "cuda.shared.array tiles, every thread a share of it, and each row reads the keys from shared "
                     "memory; when every thread reads its row's keys from global memory, the block reads each key "
                     "BLOCK_M times")


# --------------------------------------------------------------------------------------------------------
# 6.8 and 6.9 decode attention: split the keys, then combine


def _combine64(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """(BH, S), (BH, S), (BH, S, D) split summaries -> (BH, D) attention output, in float64."""
    m, l, acc = m.double(), l.double(), acc.double()
    w = torch.exp(m - m.amax(1, keepdim=True))  # (BH, S)
    return (w[:, :, None] * acc).sum(1) / (w * l).sum(1)[:, None]


def _partial_mistake(rescale: bool = True, scale_scores: bool = True, scale_m: bool = False) -> Any:
    """The split summary with l and acc not rescaled when the max grows, or with unscaled scores (and, with
    ``scale_m``, only m_out scaled)."""

    @cuda.jit
    def partial_mistake(q, k_cache, v_cache, lengths, chunk, scale, m_out, l_out, acc_out):
        split = cuda.grid(1)
        bh = cuda.blockIdx.y
        if split < (k_cache.shape[1] + chunk - 1) // chunk and bh < q.shape[0]:
            acc = cuda.local.array(HEAD_DIM, float32)
            for d in range(HEAD_DIM):
                acc[d] = 0.0
            m = float32(LOWEST)
            l = float32(0.0)
            for j in range(split * chunk, min((split + 1) * chunk, lengths[bh])):
                s = float32(0.0)
                for d in range(HEAD_DIM):
                    s += q[bh, d] * k_cache[bh, j, d]
                if scale_scores:
                    s *= scale
                m, l, p = _online_update(s, m, l, acc, rescale)
                for d in range(HEAD_DIM):
                    acc[d] += p * v_cache[bh, j, d]
            m_out[bh, split] = m * scale if scale_m and l > 0 else m
            l_out[bh, split] = l
            for d in range(HEAD_DIM):
                acc_out[bh, split, d] = acc[d]

    return partial_mistake


PARTIAL_MISTAKES = (
    Mistake(_partial_mistake(rescale=False), NO_RESCALE),
    Mistake(_partial_mistake(scale_scores=False, scale_m=True), "the exponentials use q . k without the scale, "
            "and only m_out is scaled: every score is scale * (q . k), in the max and the exponentials alike"),
    Mistake(_partial_mistake(scale_scores=False), NO_SCALE),
)


@chapter.exercise("6.8", reference=ka.make_decode_partial_kernel(HEAD_DIM), hints=(
    "each thread summarises one chunk of one sequence's keys as (max, sum, weighted values), reading each key "
    "once, and only the keys the sequence has",
    "thread (split, bh) reads the keys split*chunk <= j < min((split+1)*chunk, lengths[bh]) with the "
    "online-softmax update (rescale l and acc when the max grows) and writes (m, l, acc); an empty split writes "
    "(LOWEST, 0, 0)",
    "for j in range(split * chunk, min((split + 1) * chunk, lengths[bh])): s = scale * (sum over d of q[bh, d] * "
    "k_cache[bh, j, d]); if s > m: c = exp(m - s); l *= c; acc[d] *= c for each d; m = s; p = exp(s - m); l += p; "
    "acc[d] += p * v_cache[bh, j, d] for each d",
))
def decode_partial_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(68)
    for lengths, t_max, chunk in [([50, 23, 1], 50, 8), ([33, 17], 33, 16), ([70, 9], 70, 4)]:
        bh, splits = len(lengths), cdiv(t_max, chunk)
        where = f"lengths {lengths}, T_max={t_max}, chunk={chunk} ({splits} splits), D={HEAD_DIM}"
        q = _rand(rng, bh, HEAD_DIM)
        k_cache, v_cache = _rand(rng, bh, t_max, HEAD_DIM, scale=2.0), _rand(rng, bh, t_max, HEAD_DIM)
        for i, n in enumerate(lengths):  # past the end of each sequence the cache holds garbage
            k_cache[i, n:] = np.nan
            v_cache[i, n:] = np.nan
        lens = np.asarray(lengths, dtype=np.int32)
        scale = 1.0 / math.sqrt(HEAD_DIM)
        def run(kernel: Any) -> tuple[MemoryTraffic, torch.Tensor, torch.Tensor, torch.Tensor]:
            """(traffic, m, l, acc) of ``kernel`` on this input."""
            m_out, l_out, acc_out = _buffer((bh, splits)), _buffer((bh, splits)), _buffer((bh, splits, HEAD_DIM))
            traffic = _launch(kernel, (cdiv(splits, 8), bh), (8,),
                              (q, k_cache, v_cache, lens, chunk, scale, m_out, l_out, acc_out), where)
            return (traffic, _result(m_out, (bh, splits), "m_out", where), _result(l_out, (bh, splits), "l_out", where),
                    _result(acc_out, (bh, splits, HEAD_DIM), "acc_out", where))

        traffic, m, l, acc = run(fn)
        _check_empty_splits(m, l, acc, lens, chunk, where)
        qt, kt, vt = (torch.from_numpy(np.nan_to_num(a)).double() for a in (q, k_cache, v_cache))
        scores = (kt @ qt[:, :, None]).squeeze(-1) * scale  # (BH, T_max)
        visible = torch.arange(t_max)[None, :] < torch.from_numpy(lens).long()[:, None]
        expected = _expect(torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)[:, None, :] @ vt).squeeze(1)
        got = _expect(_combine64(m, l, acc))
        try:
            compare(got, expected, where=where, atol=1e-5, name="attention combined from your (m_out, l_out, acc_out)")
        except CheckFailure as exc:
            raise _explain(exc, PARTIAL_MISTAKES, got, lambda kernel: _expect(_combine64(*run(kernel)[1:]))) from None
        for arg in (1, 2):
            _at_most(traffic, READ, arg, chunk * HEAD_DIM, where, "the online-softmax update reads each key and value "
                     "of the split once; a pass for the max and another for the sum read them twice, and keys "
                     "outside the split belong to other threads")


def _check_empty_splits(m: torch.Tensor, sums: torch.Tensor, acc: torch.Tensor, lengths: np.ndarray, chunk: int,
                        where: str) -> None:
    """Raise CheckFailure unless every split past the end of its sequence holds (LOWEST or -inf, 0, 0)."""
    for bh, n in enumerate(lengths.tolist()):
        for split in range(cdiv(n, chunk), m.shape[1]):
            got = (float(m[bh, split]), float(sums[bh, split]), float(acc[bh, split].abs().max()))
            if got[0] > LOWEST or got[1] != 0.0 or got[2] != 0.0:
                raise CheckFailure(f"split {split} of sequence {bh} on input {where!r} holds no keys (length {n}) "
                                   f"but wrote m = {got[0]:g}, l = {got[1]:g}, largest |acc| = {got[2]:g}; an empty "
                                   "split must weigh nothing whatever the other splits hold: m = LOWEST, l = 0, "
                                   "acc = 0 (an m of 0 becomes the combine's reference point when every score is "
                                   "below 0)")


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
    base = np.array([-50.0, 100.0, 97.0, 3.0])  # any reference point but the largest m overflows exp in float32
    m = np.stack([np.roll(base, r) for r in range(bh)]) + rng.uniform(0.0, 2.0, (bh, splits))  # (BH, S)
    yield "5 heads x 4 splits, maxima spread over [-50, 102]", m.astype(np.float32), rng.uniform(
        0.5, 4.0, (bh, splits)).astype(np.float32), _rand(rng, bh, splits, d)


def _combine_mistake(reference: str = "max", weigh_l: bool = True) -> Any:
    """The combine with split s weighed by exp(m_s - reference): ``"max"`` (right), ``"first"`` (the first
    split's m), ``"zero"`` (exp(m_s) itself) or ``"none"`` (every weight 1); without ``weigh_l`` the l values are
    added unweighted."""
    from_first, from_max, shift = reference == "first", reference == "max", reference != "none"

    @cuda.jit
    def combine_mistake(m_part, l_part, acc_part, out):
        d, bh = cuda.grid(2)
        if bh < acc_part.shape[0] and d < acc_part.shape[2]:
            top = float32(0.0)
            if from_first or from_max:
                top = m_part[bh, 0]
            if from_max:
                for s in range(1, m_part.shape[1]):
                    top = max(top, m_part[bh, s])
            num = float32(0.0)
            den = float32(0.0)
            for s in range(m_part.shape[1]):
                w = math.exp(m_part[bh, s] - top) if shift else 1.0
                num += w * acc_part[bh, s, d]
                den += (w if weigh_l else 1.0) * l_part[bh, s]
            out[bh, d] = num / den

    return combine_mistake


COMBINE_MISTAKES = (
    Mistake(_combine_mistake("none"), "that adds the splits' acc and l as they are: each split's sums are "
            "relative to its own max m_s, so the splits need a common reference before they are added"),
    Mistake(_combine_mistake("first"), "that takes the first split's max as the reference point: exp(m_s - m_0) "
            "overflows float32 when another split's max is far above it"),
    Mistake(_combine_mistake("zero"), "that weighs split s by exp(m_s), with no reference point subtracted: exp "
            "overflows float32 once m_s passes about 88"),
    Mistake(_combine_mistake(weigh_l=False), "that weighs the acc values by exp(m_s - M) but adds the l values "
            "unweighted: the denominator needs the same weights"),
)


@chapter.exercise("6.9", reference=ka.decode_combine_kernel, hints=(
    "each split's (l, acc) was computed against its own maximum m_s; bring all splits to one common reference "
    "before adding them, one that cannot overflow",
    "weight split s by exp(m_s - M) with M the largest m_s of the row, in both the numerator (the acc values) "
    "and the denominator (the l values); an empty split (m_s = -inf or LOWEST) then weighs 0",
    "top = max over s of m_part[bh, s]; num = sum_s exp(m_part[bh, s] - top) * acc_part[bh, s, d]; den = "
    "sum_s exp(m_part[bh, s] - top) * l_part[bh, s]; out[bh, d] = num / den",
))
def decode_combine_kernel(fn: Callable, ref: Callable) -> None:
    rng = np.random.default_rng(69)
    for label, m, l, acc in _combine_cases(rng):
        bh, _, d = acc.shape
        where = f"{label}, D={d}, blocks of 8x4"

        def run(kernel: Any) -> torch.Tensor:
            out = _buffer((bh, d))
            _launch(kernel, (cdiv(d, 8), cdiv(bh, 4)), (8, 4), (m, l, acc, out), where)
            return _result(out, (bh, d), "out", where)

        expected = _expect(_combine64(*(torch.from_numpy(a) for a in (m, l, acc))))
        _compare_output(run(fn), expected, where, "out", atol=1e-5, mistakes=COMBINE_MISTAKES, rerun=run)
