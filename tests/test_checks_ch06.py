"""Chapter 06 checks: each accepts the reference kernel, reports a stub as not attempted, and rejects
plausible wrong kernels (missing guards, missing or divergent barriers, broken online-softmax rescaling...),
including kernels that compute the right numbers without what the exercise teaches (no tiles, extra passes,
a distance per code), which the simulator's per-thread memory counts catch."""

import math

import pytest

from ar_course.checks import ch06
# the check's own mistake kernels (what it diagnoses a failure with) are the wrong answers whose diagnosis is asserted
from ar_course.checks.ch06 import (BLOCK_M, BLOCK_N, HEAD_DIM, LOWEST, THREADS, TILE, _axpy_scales_the_sum,
                                   _axpy_scales_y, _axpy_whole_alpha, _combine_mistake, _flash_mistake, _matmul_over,
                                   _online_update, _partial_mistake, _softmax_mistake, _sqdist_with_sqrt, _vq_mistake)
from ar_course.kernels.env import CUDA_SIMULATOR
from checks_helpers import assert_fails, assert_not_attempted, assert_passes
from numba import cuda, float32, float64  # after ar_course.kernels: the simulator is already chosen


@cuda.jit
def stub_kernel(*args):
    raise NotImplementedError("Exercise stub")


# 6.1 ------------------------------------------------------------------------------------------------------


@cuda.jit
def axpy_no_guard(alpha, x, y, out):
    i = cuda.grid(1)
    out[i] = alpha * x[i] + y[i]


@cuda.jit
def axpy_thread_index_only(alpha, x, y, out):
    i = cuda.threadIdx.x  # forgets the block offset
    if i < x.shape[0]:
        out[i] = alpha * x[i] + y[i]


def axpy_plain_python(alpha, x, y, out):
    out[:] = alpha * x + y


# 6.2 ------------------------------------------------------------------------------------------------------


@cuda.jit
def sqdist_guard_one_axis(z, codebook, out):
    k, n = cuda.grid(2)
    if n < z.shape[0]:
        acc = float32(0.0)
        for d in range(z.shape[1]):
            acc += (z[n, d] - codebook[k, d]) ** 2
        out[n, k] = acc


# 6.3 ------------------------------------------------------------------------------------------------------


@cuda.jit
def sum_missing_barrier(x, partial):
    buf = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    i = cuda.grid(1)
    buf[t] = x[i] if i < x.shape[0] else float32(0.0)
    cuda.syncthreads()
    stride = THREADS // 2
    while stride > 0:
        if t < stride:
            buf[t] += buf[t + stride]
        stride //= 2
    if t == 0:
        partial[cuda.blockIdx.x] = buf[0]


@cuda.jit
def sum_barrier_in_branch(x, partial):
    buf = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    i = cuda.grid(1)
    buf[t] = x[i] if i < x.shape[0] else float32(0.0)
    cuda.syncthreads()
    stride = THREADS // 2
    while stride > 0:
        if t < stride:
            buf[t] += buf[t + stride]
            cuda.syncthreads()
        stride //= 2
    if t == 0:
        partial[cuda.blockIdx.x] = buf[0]


@cuda.jit
def sum_early_return(x, partial):
    buf = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    i = cuda.grid(1)
    if i >= x.shape[0]:
        return
    buf[t] = x[i]
    cuda.syncthreads()
    stride = THREADS // 2
    while stride > 0:
        if t < stride:
            buf[t] += buf[t + stride]
        cuda.syncthreads()
        stride //= 2
    if t == 0:
        partial[cuda.blockIdx.x] = buf[0]


@cuda.jit
def sum_no_guard(x, partial):
    buf = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    buf[t] = x[cuda.grid(1)]
    cuda.syncthreads()
    stride = THREADS // 2
    while stride > 0:
        if t < stride:
            buf[t] += buf[t + stride]
        cuda.syncthreads()
        stride //= 2
    if t == 0:
        partial[cuda.blockIdx.x] = buf[0]


@cuda.jit
def sum_one_thread_reads_all(x, partial):  # right numbers, no cooperation: thread 0 reads the block's slice
    if cuda.threadIdx.x == 0:
        acc = float32(0.0)
        start = cuda.blockIdx.x * THREADS
        for i in range(start, min(start + THREADS, x.shape[0])):
            acc += x[i]
        partial[cuda.blockIdx.x] = acc


@cuda.jit
def sum_serial_in_shared(x, partial):  # loads cooperatively, then thread 0 adds the values one by one
    buf = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    i = cuda.grid(1)
    buf[t] = x[i] if i < x.shape[0] else float32(0.0)
    cuda.syncthreads()
    if t == 0:
        acc = float32(0.0)
        for j in range(THREADS):
            acc += buf[j]
        partial[cuda.blockIdx.x] = acc


@cuda.jit
def sum_atomics_into_partial(x, partial):  # right numbers, no shared memory: every thread adds into partial[b]
    i = cuda.grid(1)
    if cuda.threadIdx.x == 0:
        partial[cuda.blockIdx.x] = 0.0
    cuda.syncthreads()
    if i < x.shape[0]:
        cuda.atomic.add(partial, cuda.blockIdx.x, x[i])


@cuda.jit
def sum_atomics_into_shared(x, partial):  # right numbers: one shared accumulator, atomics instead of a tree
    total = cuda.shared.array(1, float32)
    t = cuda.threadIdx.x
    i = cuda.grid(1)
    if t == 0:
        total[0] = 0.0
    cuda.syncthreads()
    if i < x.shape[0]:
        cuda.atomic.add(total, 0, x[i])
    cuda.syncthreads()
    if t == 0:
        partial[cuda.blockIdx.x] = total[0]


@cuda.jit
def sum_interleaved_right(x, partial):  # a correct tree with interleaved pairs (t % (2 s) == 0)
    buf = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    i = cuda.grid(1)
    buf[t] = x[i] if i < x.shape[0] else float32(0.0)
    cuda.syncthreads()
    stride = 1
    while stride < THREADS:
        if t % (2 * stride) == 0:
            buf[t] += buf[t + stride]
        cuda.syncthreads()
        stride *= 2
    if t == 0:
        partial[cuda.blockIdx.x] = buf[0]


# 6.4 ------------------------------------------------------------------------------------------------------


def _matmul_variant(second_barrier: bool, zero_fill: bool):
    @cuda.jit
    def matmul_variant(a, b, c):
        a_tile = cuda.shared.array((TILE, TILE), float32)
        b_tile = cuda.shared.array((TILE, TILE), float32)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        row = cuda.blockIdx.y * TILE + ty
        col = cuda.blockIdx.x * TILE + tx
        acc = float32(0.0)
        for k0 in range(0, a.shape[1], TILE):
            if zero_fill:
                a_tile[ty, tx] = a[row, k0 + tx] if row < a.shape[0] and k0 + tx < a.shape[1] else float32(0.0)
                b_tile[ty, tx] = b[k0 + ty, col] if k0 + ty < b.shape[0] and col < b.shape[1] else float32(0.0)
            else:
                a_tile[ty, tx] = a[row, k0 + tx]
                b_tile[ty, tx] = b[k0 + ty, col]
            cuda.syncthreads()
            for kk in range(TILE):
                acc += a_tile[ty, kk] * b_tile[kk, tx]
            if second_barrier:
                cuda.syncthreads()
        if row < a.shape[0] and col < b.shape[1]:
            c[row, col] = acc

    return matmul_variant


@cuda.jit
def matmul_untiled(a, b, c):  # right numbers, every operand read from global memory
    col, row = cuda.grid(2)
    if row < a.shape[0] and col < b.shape[1]:
        acc = float32(0.0)
        for kk in range(a.shape[1]):
            acc += a[row, kk] * b[kk, col]
        c[row, col] = acc


def _matmul_reading_global(a_from_tile: bool):
    """Loads both tiles into shared memory, then reads b (and, unless ``a_from_tile``, a) from global memory."""

    @cuda.jit
    def matmul_reading_global(a, b, c):
        a_tile = cuda.shared.array((TILE, TILE), float32)
        b_tile = cuda.shared.array((TILE, TILE), float32)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        row = cuda.blockIdx.y * TILE + ty
        col = cuda.blockIdx.x * TILE + tx
        acc = float32(0.0)
        for k0 in range(0, a.shape[1], TILE):
            a_tile[ty, tx] = a[row, k0 + tx] if row < a.shape[0] and k0 + tx < a.shape[1] else float32(0.0)
            b_tile[ty, tx] = b[k0 + ty, col] if k0 + ty < b.shape[0] and col < b.shape[1] else float32(0.0)
            cuda.syncthreads()
            for kk in range(min(TILE, a.shape[1] - k0)):
                left = a_tile[ty, kk] if a_from_tile else (a[row, k0 + kk] if row < a.shape[0] else float32(0.0))
                acc += left * (b[k0 + kk, col] if col < b.shape[1] else float32(0.0))
            cuda.syncthreads()
        if row < a.shape[0] and col < b.shape[1]:
            c[row, col] = acc

    return matmul_reading_global


# 6.5 ------------------------------------------------------------------------------------------------------


@cuda.jit
def softmax_three_passes(x, out):  # right numbers: a pass for the max, one for the sum, one to write
    row_max = cuda.shared.array(THREADS, float32)
    row_sum = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    row = cuda.blockIdx.x
    m = float32(LOWEST)
    for c in range(t, x.shape[1], THREADS):
        m = max(m, x[row, c])
    row_max[t] = m
    cuda.syncthreads()
    stride = THREADS // 2
    while stride > 0:
        if t < stride:
            row_max[t] = max(row_max[t], row_max[t + stride])
        cuda.syncthreads()
        stride //= 2
    m = row_max[0]
    s = float32(0.0)
    for c in range(t, x.shape[1], THREADS):
        s += math.exp(x[row, c] - m)
    row_sum[t] = s
    cuda.syncthreads()
    stride = THREADS // 2
    while stride > 0:
        if t < stride:
            row_sum[t] += row_sum[t + stride]
        cuda.syncthreads()
        stride //= 2
    for c in range(t, x.shape[1], THREADS):
        out[row, c] = math.exp(x[row, c] - m) / row_sum[0]


def _softmax_tree_variant(branch: bool):
    """Right, and a tree, written as learners do (audit 29): the merge reads both maxima twice
    (``branch=False``: ``mm = max(a, b)`` then ``exp(a - mm)``, 6 shared reads a round, the row's (m, s) read for
    each element written) or branches on the larger one (up to 7 a round); 6 log2(32) + 2 shared reads were too few."""

    @cuda.jit
    def kernel(x, out):
        row_max = cuda.shared.array(THREADS, float32)
        row_sum = cuda.shared.array(THREADS, float32)
        t = cuda.threadIdx.x
        row = cuda.blockIdx.x
        m = float32(LOWEST)
        s = float32(0.0)
        for c in range(t, x.shape[1], THREADS):
            v = x[row, c]
            if v > m:
                s = s * math.exp(m - v)
                m = v
            s += math.exp(v - m)
        row_max[t] = m
        row_sum[t] = s
        cuda.syncthreads()
        stride = THREADS // 2
        while stride > 0:
            if t < stride:
                if branch:
                    if row_max[t + stride] > row_max[t]:
                        row_sum[t] = row_sum[t] * math.exp(row_max[t] - row_max[t + stride]) + row_sum[t + stride]
                        row_max[t] = row_max[t + stride]
                    else:
                        row_sum[t] = row_sum[t] + row_sum[t + stride] * math.exp(row_max[t + stride] - row_max[t])
                else:
                    mm = max(row_max[t], row_max[t + stride])
                    row_sum[t] = (row_sum[t] * math.exp(row_max[t] - mm)
                                  + row_sum[t + stride] * math.exp(row_max[t + stride] - mm))
                    row_max[t] = mm
            cuda.syncthreads()
            stride //= 2
        for c in range(t, x.shape[1], THREADS):
            out[row, c] = math.exp(x[row, c] - row_max[0]) / row_sum[0]

    return kernel


@cuda.jit
def softmax_serial_merge(x, out):  # right numbers: thread 0 merges the 32 pairs one after another
    row_max = cuda.shared.array(THREADS, float32)
    row_sum = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    row = cuda.blockIdx.x
    m = float32(LOWEST)
    s = float32(0.0)
    for c in range(t, x.shape[1], THREADS):
        xv = x[row, c]
        if xv > m:
            s = s * math.exp(m - xv)
            m = xv
        s += math.exp(xv - m)
    row_max[t] = m
    row_sum[t] = s
    cuda.syncthreads()
    if t == 0:
        for u in range(1, THREADS):
            m2 = row_max[u]
            mm = max(m, m2)
            s = s * math.exp(m - mm) + row_sum[u] * math.exp(m2 - mm)
            m = mm
        row_max[0] = m
        row_sum[0] = s
    cuda.syncthreads()
    for c in range(t, x.shape[1], THREADS):
        out[row, c] = math.exp(x[row, c] - row_max[0]) / row_sum[0]


@cuda.jit
def softmax_whole_row_per_thread(x, out):  # right numbers, but every thread reads the whole row
    t = cuda.threadIdx.x
    row = cuda.blockIdx.x
    m = float32(LOWEST)
    s = float32(0.0)
    for c in range(x.shape[1]):
        xv = x[row, c]
        if xv > m:
            s = s * math.exp(m - xv)
            m = xv
        s += math.exp(xv - m)
    for c in range(t, x.shape[1], THREADS):
        out[row, c] = math.exp(x[row, c] - m) / s


# 6.6 ------------------------------------------------------------------------------------------------------


@cuda.jit
def vq_no_guard(z, codebook, out):  # the threads past the last vector search too
    n = cuda.grid(1)
    best, best_k = float32(math.inf), 0
    for k in range(codebook.shape[0]):
        dist = float32(0.0)
        for d in range(z.shape[1]):
            dist += (z[n, d] - codebook[k, d]) ** 2
        if dist < best:
            best, best_k = dist, k
    out[n] = best_k


@cuda.jit
def vq_distance_per_code(z, codebook, out):  # right numbers, but a distance per code: N x K in all
    n = cuda.grid(1)
    if n < z.shape[0]:
        dist = cuda.local.array(64, float32)
        for k in range(codebook.shape[0]):
            acc = float32(0.0)
            for d in range(z.shape[1]):
                acc += (z[n, d] - codebook[k, d]) ** 2
            dist[k] = acc
        best_k = 0
        for k in range(1, codebook.shape[0]):
            if dist[k] < dist[best_k]:
                best_k = k
        out[n] = best_k


@cuda.jit
def vq_writes_every_improvement(z, codebook, out):  # right numbers, a global write per improvement
    n = cuda.grid(1)
    if n < z.shape[0]:
        best = float32(math.inf)
        for k in range(codebook.shape[0]):
            dist = float32(0.0)
            for d in range(z.shape[1]):
                dist += (z[n, d] - codebook[k, d]) ** 2
            if dist < best:
                best = dist
                out[n] = k


# 6.7 ------------------------------------------------------------------------------------------------------


@cuda.jit
def flash_untiled(q, k, v, kv_len, scale, out):  # right numbers: per-thread online softmax, no shared tiles
    row = cuda.blockIdx.x * BLOCK_M + cuda.threadIdx.x
    bh = cuda.blockIdx.y
    if row < q.shape[1]:
        acc = cuda.local.array(HEAD_DIM, float32)
        for d in range(HEAD_DIM):
            acc[d] = 0.0
        m = float32(LOWEST)
        l = float32(0.0)
        for j in range(kv_len[row]):
            s = float32(0.0)
            for d in range(HEAD_DIM):
                s += q[bh, row, d] * scale * k[bh, j, d]
            m, l, p = _online_update(s, m, l, acc, True)
            for d in range(HEAD_DIM):
                acc[d] += p * v[bh, j, d]
        for d in range(HEAD_DIM):
            out[bh, row, d] = acc[d] / l


def _flash_loads(v_from_global: bool = False, thread_zero_loads: bool = False, second_barrier: bool = True):
    """Tiled FlashAttention that reads v from global memory instead of a tile, whose tiles thread 0 loads
    alone, or that loads the next tile without a barrier after using this one (a race)."""

    @cuda.jit
    def flash_loads(q, k, v, kv_len, scale, out):
        k_tile = cuda.shared.array((BLOCK_N, HEAD_DIM), float32)
        v_tile = cuda.shared.array((BLOCK_N, HEAD_DIM), float32)
        acc = cuda.local.array(HEAD_DIM, float32)
        t = cuda.threadIdx.x
        bh = cuda.blockIdx.y
        first = cuda.blockIdx.x * BLOCK_M
        row = first + t
        visible = kv_len[row] if row < q.shape[1] else 0
        for d in range(HEAD_DIM):
            acc[d] = 0.0
        n_keys = 0
        for r in range(first, min(first + BLOCK_M, q.shape[1])):
            n_keys = max(n_keys, kv_len[r])
        m = float32(LOWEST)
        l = float32(0.0)
        for start in range(0, n_keys, BLOCK_N):
            if thread_zero_loads:
                if t == 0:
                    for j in range(min(BLOCK_N, k.shape[1] - start)):
                        for d in range(HEAD_DIM):
                            k_tile[j, d] = k[bh, start + j, d]
                            v_tile[j, d] = v[bh, start + j, d]
            else:
                for e in range(t, BLOCK_N * HEAD_DIM, BLOCK_M):
                    j, d = e // HEAD_DIM, e % HEAD_DIM
                    if start + j < k.shape[1]:
                        k_tile[j, d] = k[bh, start + j, d]
                        v_tile[j, d] = v[bh, start + j, d]
            cuda.syncthreads()
            for j in range(min(BLOCK_N, visible - start)):
                s = float32(0.0)
                for d in range(HEAD_DIM):
                    s += q[bh, row, d] * scale * k_tile[j, d]
                m, l, p = _online_update(s, m, l, acc, True)
                for d in range(HEAD_DIM):
                    acc[d] += p * (v[bh, start + j, d] if v_from_global else v_tile[j, d])
            if second_barrier:
                cuda.syncthreads()
        if row < q.shape[1]:
            for d in range(HEAD_DIM):
                out[bh, row, d] = acc[d] / l

    return flash_loads


# 6.8 ------------------------------------------------------------------------------------------------------


def _partial_variant(respect_length: bool = True, block_offset: bool = True, start_m: float = LOWEST):
    """The split summary (right with the defaults) reading the keys past lengths[bh] too, with the split index
    missing the block offset, or with the max started at ``start_m``."""

    @cuda.jit
    def partial_variant(q, k_cache, v_cache, lengths, chunk, scale, m_out, l_out, acc_out):
        split = cuda.grid(1) if block_offset else cuda.threadIdx.x
        bh = cuda.blockIdx.y
        if split * chunk < k_cache.shape[1]:
            acc = cuda.local.array(HEAD_DIM, float32)
            for d in range(HEAD_DIM):
                acc[d] = 0.0
            m = float32(start_m)
            l = float32(0.0)
            stop = lengths[bh] if respect_length else k_cache.shape[1]
            for j in range(split * chunk, min(split * chunk + chunk, stop)):
                s = float32(0.0)
                for d in range(HEAD_DIM):
                    s += q[bh, d] * k_cache[bh, j, d] * scale
                m, l, p = _online_update(s, m, l, acc, True)
                for d in range(HEAD_DIM):
                    acc[d] += p * v_cache[bh, j, d]
            m_out[bh, split] = m
            l_out[bh, split] = l
            for d in range(HEAD_DIM):
                acc_out[bh, split, d] = acc[d]

    return partial_variant


@cuda.jit
def partial_skips_empty_splits(q, k_cache, v_cache, lengths, chunk, scale, m_out, l_out, acc_out):
    split = cuda.grid(1)
    bh = cuda.blockIdx.y
    if split * chunk < lengths[bh]:  # empty splits are left unwritten
        m = float32(LOWEST)
        l = float32(0.0)
        acc = cuda.local.array(HEAD_DIM, float32)
        for d in range(HEAD_DIM):
            acc[d] = 0.0
        for j in range(split * chunk, min(split * chunk + chunk, lengths[bh])):
            s = float32(0.0)
            for d in range(HEAD_DIM):
                s += q[bh, d] * k_cache[bh, j, d] * scale
            m_new = max(m, s)
            c = math.exp(m - m_new)
            p = math.exp(s - m_new)
            l = l * c + p
            for d in range(HEAD_DIM):
                acc[d] = acc[d] * c + p * v_cache[bh, j, d]
            m = m_new
        m_out[bh, split] = m
        l_out[bh, split] = l
        for d in range(HEAD_DIM):
            acc_out[bh, split, d] = acc[d]


def _partial_two_passes(max_over_sequence: bool):
    """Right numbers in two passes over the keys: one for the max (of the split, or of the whole sequence),
    one for the sums."""

    @cuda.jit
    def partial_two_passes(q, k_cache, v_cache, lengths, chunk, scale, m_out, l_out, acc_out):
        split = cuda.grid(1)
        bh = cuda.blockIdx.y
        if split * chunk < k_cache.shape[1]:
            lo, hi = split * chunk, min(split * chunk + chunk, lengths[bh])
            m = float32(LOWEST)
            for j in range(0 if max_over_sequence else lo, lengths[bh] if max_over_sequence else hi):
                s = float32(0.0)
                for d in range(HEAD_DIM):
                    s += q[bh, d] * k_cache[bh, j, d] * scale
                m = max(m, s)
            acc = cuda.local.array(HEAD_DIM, float32)
            for d in range(HEAD_DIM):
                acc[d] = 0.0
            l = float32(0.0)
            for j in range(lo, hi):
                s = float32(0.0)
                for d in range(HEAD_DIM):
                    s += q[bh, d] * k_cache[bh, j, d] * scale
                p = math.exp(s - m)
                l += p
                for d in range(HEAD_DIM):
                    acc[d] += p * v_cache[bh, j, d]
            m_out[bh, split] = m if hi > lo else LOWEST
            l_out[bh, split] = l
            for d in range(HEAD_DIM):
                acc_out[bh, split, d] = acc[d]

    return partial_two_passes


# 6.9 ------------------------------------------------------------------------------------------------------


@cuda.jit
def combine_no_guard(m_part, l_part, acc_part, out):
    d, bh = cuda.grid(2)
    top = m_part[bh, 0]
    for s in range(1, m_part.shape[1]):
        top = max(top, m_part[bh, s])
    num = float32(0.0)
    den = float32(0.0)
    for s in range(m_part.shape[1]):
        w = math.exp(m_part[bh, s] - top)
        num += w * acc_part[bh, s, d]
        den += w * l_part[bh, s]
    out[bh, d] = num / den


# Right kernels written other ways (each must pass), and wrong ones of other kinds ---------------------------


@cuda.jit
def axpy_grid_stride(alpha, x, y, out):
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        out[i] = alpha * x[i] + y[i]


@cuda.jit
def axpy_early_return_f64(alpha, x, y, out):
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i >= x.size:
        return
    out[i] = float32(float64(alpha) * float64(x[i]) + float64(y[i]))


@cuda.jit
def axpy_fma_style(alpha, x, y, out):
    i = cuda.grid(1)
    n = len(x)
    if i < n:
        v = y[i]
        v += alpha * x[i]
        out[i] = v


@cuda.jit
def sqdist_explicit_index(z, codebook, out):
    n = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    k = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if n >= z.shape[0] or k >= codebook.shape[0]:
        return
    acc = 0.0
    for d in range(z.shape[1]):
        acc += (z[n, d] - codebook[k, d]) ** 2
    out[n, k] = acc


@cuda.jit
def sqdist_expanded(z, codebook, out):  # |z|^2 - 2 z.c + |c|^2
    k, n = cuda.grid(2)
    if n < z.shape[0] and k < codebook.shape[0]:
        zz = float32(0.0)
        cc = float32(0.0)
        zc = float32(0.0)
        for d in range(z.shape[1]):
            zz += z[n, d] * z[n, d]
            cc += codebook[k, d] * codebook[k, d]
            zc += z[n, d] * codebook[k, d]
        out[n, k] = zz - 2 * zc + cc


@cuda.jit
def sum_register_acc(x, partial):
    buf = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    i = cuda.grid(1)
    acc = float32(0.0)
    if i < x.shape[0]:
        acc = x[i]
    buf[t] = acc
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if t < stride:
            acc += buf[t + stride]
            buf[t] = acc
        cuda.syncthreads()
        stride //= 2
    if t == 0:
        partial[cuda.blockIdx.x] = acc


@cuda.jit
def sum_for_loop_levels(x, partial):
    buf = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    i = cuda.blockIdx.x * THREADS + t
    buf[t] = 0
    if i < x.shape[0]:
        buf[t] = x[i]
    cuda.syncthreads()
    for level in range(int(math.log2(THREADS))):
        stride = THREADS >> (level + 1)
        if t < stride:
            buf[t] = buf[t] + buf[t + stride]
        cuda.syncthreads()
    if t == 0:
        partial[cuda.blockIdx.x] = buf[0]


@cuda.jit
def sum_last_thread_writes(x, partial):  # the sum lands in buf[0]; the last thread writes it
    buf = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    i = cuda.grid(1)
    buf[t] = x[i] if i < x.shape[0] else 0.0
    cuda.syncthreads()
    s = 1
    while s < THREADS:
        if t % (2 * s) == 0:
            buf[t] += buf[t + s]
        cuda.syncthreads()
        s *= 2
    if t == THREADS - 1:
        partial[cuda.blockIdx.x] = buf[0]


@cuda.jit
def matmul_grid_steps(a, b, c):
    sa = cuda.shared.array((TILE, TILE), float32)
    sb = cuda.shared.array((TILE, TILE), float32)
    col, row = cuda.grid(2)
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    acc = 0.0
    for step in range((a.shape[1] + TILE - 1) // TILE):
        ka = step * TILE + tx
        kb = step * TILE + ty
        if row < a.shape[0] and ka < a.shape[1]:
            sa[ty, tx] = a[row, ka]
        else:
            sa[ty, tx] = 0.0
        if kb < b.shape[0] and col < b.shape[1]:
            sb[ty, tx] = b[kb, col]
        else:
            sb[ty, tx] = 0.0
        cuda.syncthreads()
        for kk in range(TILE):
            acc += sa[ty, kk] * sb[kk, tx]
        cuda.syncthreads()
    if row < a.shape[0] and col < b.shape[1]:
        c[row, col] = acc


@cuda.jit
def matmul_transposed_b_tile(a, b, c):  # b's tile stored transposed
    sa = cuda.shared.array((TILE, TILE), float32)
    sbt = cuda.shared.array((TILE, TILE), float32)
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    row = cuda.blockIdx.y * cuda.blockDim.y + ty
    col = cuda.blockIdx.x * cuda.blockDim.x + tx
    m, inner = a.shape
    n = b.shape[1]
    acc = float32(0.0)
    k0 = 0
    while k0 < inner:
        sa[ty, tx] = a[row, k0 + tx] if (row < m and k0 + tx < inner) else 0.0
        sbt[tx, ty] = b[k0 + ty, col] if (k0 + ty < inner and col < n) else 0.0
        cuda.syncthreads()
        for kk in range(TILE):
            acc += sa[ty, kk] * sbt[tx, kk]
        cuda.syncthreads()
        k0 += TILE
    if row < m and col < n:
        c[row, col] = acc


@cuda.jit
def softmax_neg_inf_guarded(x, out):  # running max starts at -inf; merges skip empty pairs
    mx = cuda.shared.array(THREADS, float32)
    sm = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    row = cuda.blockIdx.x
    m = -math.inf
    s = 0.0
    for c in range(t, x.shape[1], THREADS):
        v = x[row, c]
        m_new = max(m, v)
        s = s * math.exp(m - m_new) + math.exp(v - m_new)
        m = m_new
    mx[t] = m
    sm[t] = s
    cuda.syncthreads()
    stride = THREADS // 2
    while stride > 0:
        if t < stride:
            m1 = mx[t]
            s1 = sm[t]
            m2 = mx[t + stride]
            s2 = sm[t + stride]
            if s2 > 0:
                if s1 == 0:
                    mx[t] = m2
                    sm[t] = s2
                elif m1 >= m2:
                    sm[t] = s1 + s2 * math.exp(m2 - m1)
                else:
                    mx[t] = m2
                    sm[t] = s1 * math.exp(m1 - m2) + s2
        cuda.syncthreads()
        stride //= 2
    m = mx[0]
    inv = 1.0 / sm[0]
    for c in range(t, x.shape[1], THREADS):
        out[row, c] = math.exp(x[row, c] - m) * inv


@cuda.jit
def softmax_interleaved_tree(x, out):
    mx = cuda.shared.array(THREADS, float32)
    sm = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    row = cuda.blockIdx.x
    m = float32(LOWEST)
    s = float32(0.0)
    c = t
    while c < x.shape[1]:
        v = x[row, c]
        if v > m:
            s = s * math.exp(m - v) + 1.0
            m = v
        else:
            s += math.exp(v - m)
        c += THREADS
    mx[t] = m
    sm[t] = s
    cuda.syncthreads()
    step = 1
    while step < THREADS:
        if t % (2 * step) == 0:
            m1, m2 = mx[t], mx[t + step]
            top = m1 if m1 > m2 else m2
            sm[t] = sm[t] * math.exp(m1 - top) + sm[t + step] * math.exp(m2 - top)
            mx[t] = top
        cuda.syncthreads()
        step *= 2
    total = sm[0]
    top = mx[0]
    for c in range(t, x.shape[1], THREADS):
        out[row, c] = math.exp(x[row, c] - top) / total


@cuda.jit
def vq_first_code_start(z, codebook, out):
    n = cuda.grid(1)
    if n >= z.shape[0]:
        return
    best = 0.0
    for d in range(z.shape[1]):
        best += (z[n, d] - codebook[0, d]) ** 2
    best_k = 0
    for k in range(1, codebook.shape[0]):
        dist = 0.0
        for d in range(z.shape[1]):
            dist += (z[n, d] - codebook[k, d]) ** 2
        if dist < best:
            best = dist
            best_k = k
    out[n] = best_k


@cuda.jit
def vq_big_start_float64(z, codebook, out):
    n = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if n < z.shape[0]:
        best = 3.4e38
        best_k = -1
        for k in range(codebook.shape[0]):
            dist = float64(0.0)
            for d in range(z.shape[1]):
                diff = float64(z[n, d]) - float64(codebook[k, d])
                dist += diff * diff
            if best_k < 0 or dist < best:
                best = dist
                best_k = k
        out[n] = best_k


@cuda.jit
def vq_cached_row(z, codebook, out):  # z's row copied to a local array of D (8 here at most)
    n = cuda.grid(1)
    if n < z.shape[0]:
        zr = cuda.local.array(8, float32)
        for d in range(z.shape[1]):
            zr[d] = z[n, d]
        best = math.inf
        best_k = 0
        for k in range(codebook.shape[0]):
            dist = float32(0.0)
            for d in range(z.shape[1]):
                diff = zr[d] - codebook[k, d]
                dist += diff * diff
            if dist < best:
                best = dist
                best_k = k
        out[n] = best_k


@cuda.jit
def flash_all_tiles_neg_inf(q, k, v, kv_len, scale, out):  # every tile of T_k; m from -inf; scale on the score
    k_tile = cuda.shared.array((BLOCK_N, HEAD_DIM), float32)
    v_tile = cuda.shared.array((BLOCK_N, HEAD_DIM), float32)
    acc = cuda.local.array(HEAD_DIM, float32)
    t = cuda.threadIdx.x
    bh = cuda.blockIdx.y
    row = cuda.blockIdx.x * BLOCK_M + t
    t_q, t_k = q.shape[1], k.shape[1]
    visible = kv_len[row] if row < t_q else 0
    for d in range(HEAD_DIM):
        acc[d] = 0.0
    m = -math.inf
    total = 0.0
    for start in range(0, t_k, BLOCK_N):
        for e in range(t, BLOCK_N * HEAD_DIM, BLOCK_M):
            j = e // HEAD_DIM
            d = e % HEAD_DIM
            if start + j < t_k:
                k_tile[j, d] = k[bh, start + j, d]
                v_tile[j, d] = v[bh, start + j, d]
            else:
                k_tile[j, d] = 0.0
                v_tile[j, d] = 0.0
        cuda.syncthreads()
        for j in range(BLOCK_N):
            if start + j < visible:
                s = 0.0
                for d in range(HEAD_DIM):
                    s += q[bh, row, d] * k_tile[j, d]
                s *= scale
                m_new = max(m, s)
                c = math.exp(m - m_new)
                p = math.exp(s - m_new)
                total = total * c + p
                for d in range(HEAD_DIM):
                    acc[d] = acc[d] * c + p * v_tile[j, d]
                m = m_new
        cuda.syncthreads()
    if row < t_q:
        for d in range(HEAD_DIM):
            out[bh, row, d] = acc[d] / total


@cuda.jit
def flash_row_loads(q, k, v, kv_len, scale, out):  # each thread loads whole key rows of the tile; q in a local array
    k_tile = cuda.shared.array((BLOCK_N, HEAD_DIM), float32)
    v_tile = cuda.shared.array((BLOCK_N, HEAD_DIM), float32)
    qr = cuda.local.array(HEAD_DIM, float32)
    acc = cuda.local.array(HEAD_DIM, float32)
    t = cuda.threadIdx.x
    bh = cuda.blockIdx.y
    first = cuda.blockIdx.x * BLOCK_M
    row = first + t
    t_q, t_k = q.shape[1], k.shape[1]
    visible = 0
    if row < t_q:
        visible = kv_len[row]
        for d in range(HEAD_DIM):
            qr[d] = q[bh, row, d]
    for d in range(HEAD_DIM):
        acc[d] = 0.0
    last = min(first + BLOCK_M, t_q)
    n_keys = 0
    for r in range(first, last):
        if kv_len[r] > n_keys:
            n_keys = kv_len[r]
    m = float32(LOWEST)
    total = float32(0.0)
    for start in range(0, n_keys, BLOCK_N):
        for j in range(t, BLOCK_N, BLOCK_M):
            if start + j < t_k:
                for d in range(HEAD_DIM):
                    k_tile[j, d] = k[bh, start + j, d]
                    v_tile[j, d] = v[bh, start + j, d]
        cuda.syncthreads()
        stop = min(BLOCK_N, visible - start)
        for j in range(stop):
            s = float32(0.0)
            for d in range(HEAD_DIM):
                s += qr[d] * k_tile[j, d]
            s = s * scale
            if s > m:
                c = math.exp(m - s)
                total *= c
                for d in range(HEAD_DIM):
                    acc[d] *= c
                m = s
            p = math.exp(s - m)
            total += p
            for d in range(HEAD_DIM):
                acc[d] += p * v_tile[j, d]
        cuda.syncthreads()
    if row < t_q:
        inv = 1.0 / total
        for d in range(HEAD_DIM):
            out[bh, row, d] = acc[d] * inv


@cuda.jit
def partial_grid2_neg_inf(q, k_cache, v_cache, lengths, chunk, scale, m_out, l_out, acc_out):
    split, bh = cuda.grid(2)
    n_splits = (k_cache.shape[1] + chunk - 1) // chunk
    if split >= n_splits or bh >= q.shape[0]:
        return
    acc = cuda.local.array(HEAD_DIM, float32)
    qs = cuda.local.array(HEAD_DIM, float32)
    for d in range(HEAD_DIM):
        acc[d] = 0.0
        qs[d] = q[bh, d] * scale
    m = -math.inf
    total = 0.0
    lo = split * chunk
    hi = min(lo + chunk, lengths[bh])
    for j in range(lo, hi):
        s = 0.0
        for d in range(HEAD_DIM):
            s += qs[d] * k_cache[bh, j, d]
        m_new = max(m, s)
        c = math.exp(m - m_new)
        p = math.exp(s - m_new)
        total = total * c + p
        for d in range(HEAD_DIM):
            acc[d] = acc[d] * c + p * v_cache[bh, j, d]
        m = m_new
    m_out[bh, split] = m
    l_out[bh, split] = total
    for d in range(HEAD_DIM):
        acc_out[bh, split, d] = acc[d]


@cuda.jit
def partial_empty_branch(q, k_cache, v_cache, lengths, chunk, scale, m_out, l_out, acc_out):
    split = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    bh = cuda.blockIdx.y
    if split * chunk >= k_cache.shape[1]:
        return
    if split * chunk >= lengths[bh]:  # an empty split: nothing to read
        m_out[bh, split] = LOWEST
        l_out[bh, split] = 0.0
        for d in range(HEAD_DIM):
            acc_out[bh, split, d] = 0.0
        return
    acc = cuda.local.array(HEAD_DIM, float32)
    for d in range(HEAD_DIM):
        acc[d] = 0.0
    m = float32(LOWEST)
    total = float32(0.0)
    j = split * chunk
    end = min(j + chunk, lengths[bh])
    while j < end:
        s = float32(0.0)
        for d in range(HEAD_DIM):
            s += q[bh, d] * k_cache[bh, j, d]
        s = s * scale
        if s > m:
            c = math.exp(m - s)
            total *= c
            for d in range(HEAD_DIM):
                acc[d] *= c
            m = s
        p = math.exp(s - m)
        total += p
        for d in range(HEAD_DIM):
            acc[d] += p * v_cache[bh, j, d]
        j += 1
    m_out[bh, split] = m
    l_out[bh, split] = total
    for d in range(HEAD_DIM):
        acc_out[bh, split, d] = acc[d]


@cuda.jit
def combine_neg_inf_start(m_part, l_part, acc_part, out):
    d, bh = cuda.grid(2)
    if bh >= acc_part.shape[0] or d >= acc_part.shape[2]:
        return
    top = -math.inf
    for s in range(m_part.shape[1]):
        if m_part[bh, s] > top:
            top = m_part[bh, s]
    num = 0.0
    den = 0.0
    for s in range(m_part.shape[1]):
        w = math.exp(m_part[bh, s] - top)
        num += w * acc_part[bh, s, d]
        den += w * l_part[bh, s]
    out[bh, d] = num / den


@cuda.jit
def combine_skip_empty(m_part, l_part, acc_part, out):
    d = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    bh = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    if bh < acc_part.shape[0] and d < acc_part.shape[2]:
        top = LOWEST
        for s in range(m_part.shape[1]):
            top = max(top, m_part[bh, s])
        num = float32(0.0)
        den = float32(0.0)
        for s in range(m_part.shape[1]):
            if l_part[bh, s] > 0:
                w = math.exp(m_part[bh, s] - top)
                num += w * acc_part[bh, s, d]
                den += w * l_part[bh, s]
        out[bh, d] = num / den


@cuda.jit
def combine_running(m_part, l_part, acc_part, out):  # one pass: online rescaling over the splits
    d, bh = cuda.grid(2)
    if bh < acc_part.shape[0] and d < acc_part.shape[2]:
        top = LOWEST
        num = 0.0
        den = 0.0
        for s in range(m_part.shape[1]):
            ms = m_part[bh, s]
            if ms > top:
                c = math.exp(top - ms)
                num *= c
                den *= c
                top = ms
            w = math.exp(ms - top)
            num += w * acc_part[bh, s, d]
            den += w * l_part[bh, s]
        out[bh, d] = num / den


@cuda.jit
def sqdist_swapped_axes(z, codebook, out):  # n along x, k along y
    n, k = cuda.grid(2)
    if n < z.shape[0] and k < codebook.shape[0]:
        acc = float32(0.0)
        for d in range(z.shape[1]):
            acc += (z[n, d] - codebook[k, d]) ** 2
        out[n, k] = acc


@cuda.jit
def sum_atomic_into_output(x, partial):  # a tree, then adds into partial as if it held 0
    buf = cuda.shared.array(THREADS, float32)
    t = cuda.threadIdx.x
    i = cuda.grid(1)
    buf[t] = x[i] if i < x.shape[0] else 0.0
    cuda.syncthreads()
    stride = THREADS // 2
    while stride > 0:
        if t < stride:
            buf[t] += buf[t + stride]
        cuda.syncthreads()
        stride //= 2
    if t == 0:
        cuda.atomic.add(partial, cuda.blockIdx.x, buf[0])


@cuda.jit
def axpy_adds_into_out(alpha, x, y, out):  # adds into out as if the buffer held zeros
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] += alpha * x[i] + y[i]


# ----------------------------------------------------------------------------------------------------------

CASES = {
    "axpy_kernel": [
        (axpy_no_guard, "out-of-bounds"),
        (axpy_thread_index_only, "never written"),
        (_axpy_scales_the_sum, "that is alpha * (x + y)"),
        (axpy_plain_python, "@cuda.jit"),
        (_axpy_whole_alpha, "that is int(alpha) * x + y: alpha lost its fractional part"),
        (axpy_adds_into_out, "adds into out"),
        (_axpy_scales_y, "that is x + alpha * y: alpha scales x, not y"),
    ],
    "pairwise_sqdist_kernel": [
        (sqdist_guard_one_axis, "out-of-bounds"),
        (_sqdist_with_sqrt, "that is the distance itself, the square root of the sum"),
        (sqdist_swapped_axes, "never written"),
    ],
    "block_sum_kernel": [
        (sum_missing_barrier, "race"),
        (sum_barrier_in_branch, "barrier divergence"),
        (sum_early_return, "barrier"),
        (sum_no_guard, "out-of-bounds"),
        (sum_atomic_into_output, "adds into partial"),
    ],
    "matmul_kernel": [
        (_matmul_variant(second_barrier=False, zero_fill=True), "race"),
        (_matmul_variant(second_barrier=True, zero_fill=False), "out-of-bounds"),
        (_matmul_over("all but the last"), "leaves out its last term, k = K - 1"),
        (_matmul_over("full tiles"), "leaves out the last, partial tile (K // TILE tiles)"),
    ],
    "softmax_kernel": [
        (_softmax_mistake(track_max=False, start_m=0.0), ("scale 60", "that is exp(x) / sum exp(x), with no max "
                                                                   "subtracted")),
        (_softmax_mistake(rescale_merge=False), "the merge adds two threads' sums as they are"),
        (_softmax_mistake(start_m=0.0), ("all near -200", "the running max starts at 0, above every logit of the row")),
        (_softmax_mistake(rescale_update=False), "that keeps the running sum unchanged when a value raises the "
                                                 "running max"),
    ],
    "vq_nearest_kernel": [
        (_vq_mistake(ties_to_last=True), ("repeated", "on a tie that keeps the code with the highest index")),
        (vq_no_guard, "out-of-bounds"),
        (_vq_mistake(farthest=True), "that is the farthest code"),
        (_vq_mistake(best_start=0.0), "the best distance starts at 0, and no distance is below 0"),
    ],
    "flash_attention_kernel": [
        (_flash_mistake(rescale=False), "that keeps l and acc unchanged when a score raises the running max"),
        (_flash_mistake(extra_key=1), "each row sees one key past its mask"),
        (_flash_loads(second_barrier=False), "race"),
        (_flash_mistake(causal=True), ("block-causal (1, 4, 9, 15)", "that is a causal mask worked out from the row "
                                                                     "index")),
        (_flash_mistake(start_m=0.0), ("every score near -150", "the running max starts at 0, above every score")),
        (_flash_mistake(use_scale=False), "that is attention without the scale"),
    ],
    "decode_partial_kernel": [
        (_partial_variant(respect_length=False), "nan"),
        (_partial_mistake(rescale=False), "that keeps l and acc unchanged when a score raises the running max"),
        (partial_skips_empty_splits, "never written"),
        (_partial_variant(block_offset=False), "m_out[0, 8] was never written on input 'lengths [70, 9]"),
        (_partial_variant(start_m=0.0), "holds no keys (length 23) but wrote m = 0"),
        (_partial_mistake(scale_scores=False, scale_m=True), "the exponentials use q . k without the scale, and "
                                                             "only m_out is scaled"),
        (_partial_mistake(scale_scores=False), "that is attention without the scale"),
    ],
    "decode_combine_kernel": [
        (_combine_mistake("none"), "that adds the splits' acc and l as they are"),
        (_combine_mistake("first"), ("spread", "that takes the first split's max as the reference point")),
        (_combine_mistake("zero"), ("maxima spread over [-50, 102]", "that weighs split s by exp(m_s), with no "
                                                                      "reference point subtracted")),
        (combine_no_guard, "out-of-bounds"),
        (_combine_mistake(weigh_l=False), "but adds the l values unweighted"),
    ],
}


# Kernels that compute the right numbers without what the exercise teaches: only the simulator's memory
# counts reject them (on a GPU the checks compare the numbers only).
TRAFFIC = {
    "block_sum_kernel": [
        (sum_one_thread_reads_all, "thread (0,) of block (0,) read x 32 times from global memory"),
        (sum_serial_in_shared, "read 32 values from shared memory"),
        (sum_atomics_into_partial, "allocates 0 shared-memory elements per block"),
        (sum_atomics_into_shared, "allocates 1 shared-memory elements per block"),
    ],
    "matmul_kernel": [
        (matmul_untiled, "allocates 0 shared-memory elements per block"),
        (_matmul_reading_global(a_from_tile=False), "read a 22 times from global memory"),
        (_matmul_reading_global(a_from_tile=True), "read b 22 times from global memory"),
    ],
    "softmax_kernel": [
        (softmax_three_passes, "read x 6 times from global memory"),
        (softmax_whole_row_per_thread, "read x 47 times from global memory"),
        (softmax_serial_merge, "thread (0,) of block (0,) read 66 values from shared memory"),
    ],
    "vq_nearest_kernel": [
        (vq_distance_per_code, "allocated local arrays of 64 elements"),
        (vq_writes_every_improvement, "wrote out"),
    ],
    "flash_attention_kernel": [
        (flash_untiled, "allocates 0 shared-memory elements per block"),
        (_flash_loads(v_from_global=True), "read v"),
        (_flash_loads(thread_zero_loads=True), "thread (0,) of block (2, 0) read k 296 times"),
    ],
    "decode_partial_kernel": [
        (_partial_two_passes(max_over_sequence=False), "read k_cache 128 times"),
        (_partial_two_passes(max_over_sequence=True), "read k_cache"),
    ],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_passes(name):
    check = getattr(ch06, name)
    assert_passes(check, check.exercise.reference)


@pytest.mark.parametrize("name, right", [
    ("block_sum_kernel", sum_interleaved_right),
    ("decode_partial_kernel", _partial_variant(start_m=-math.inf)),  # -inf weighs nothing, as LOWEST does
    ("axpy_kernel", axpy_grid_stride),
    ("axpy_kernel", axpy_early_return_f64),
    ("axpy_kernel", axpy_fma_style),
    ("pairwise_sqdist_kernel", sqdist_explicit_index),
    ("pairwise_sqdist_kernel", sqdist_expanded),
    ("block_sum_kernel", sum_register_acc),
    ("block_sum_kernel", sum_for_loop_levels),
    ("block_sum_kernel", sum_last_thread_writes),
    ("matmul_kernel", matmul_grid_steps),
    ("matmul_kernel", matmul_transposed_b_tile),
    ("softmax_kernel", softmax_neg_inf_guarded),
    ("softmax_kernel", softmax_interleaved_tree),
    ("softmax_kernel", _softmax_tree_variant(branch=False)),
    ("softmax_kernel", _softmax_tree_variant(branch=True)),
    ("vq_nearest_kernel", vq_first_code_start),
    ("vq_nearest_kernel", vq_big_start_float64),
    ("vq_nearest_kernel", vq_cached_row),
    ("flash_attention_kernel", flash_all_tiles_neg_inf),
    ("flash_attention_kernel", flash_row_loads),
    ("decode_partial_kernel", partial_grid2_neg_inf),
    ("decode_partial_kernel", partial_empty_branch),
    ("decode_combine_kernel", combine_neg_inf_start),
    ("decode_combine_kernel", combine_skip_empty),
    ("decode_combine_kernel", combine_running),
])
def test_another_correct_kernel_passes(name, right):
    assert_passes(getattr(ch06, name), right)


@pytest.mark.parametrize("name", sorted(CASES))
def test_stub_is_not_attempted(name):
    assert_not_attempted(getattr(ch06, name), stub_kernel)


@pytest.mark.parametrize(
    "name, wrong, fragment",
    [(name, wrong, fragment) for name, wrongs in CASES.items() for wrong, fragment in wrongs],
    ids=[f"{name}-{i}" for name, wrongs in CASES.items() for i in range(len(wrongs))],
)
def test_wrong_kernel_fails(name, wrong, fragment):
    """``fragment``: what the failure must say, or a tuple of such (the input it fails on, then its diagnosis)."""
    fragments = fragment if isinstance(fragment, tuple) else (fragment,)
    msg = assert_fails(getattr(ch06, name), wrong, contains=fragments[0])
    for more in fragments[1:]:
        assert more.lower() in msg.lower(), msg


@pytest.mark.skipif(not CUDA_SIMULATOR, reason="memory traffic is counted in the CUDA simulator")
@pytest.mark.parametrize(
    "name, wrong, fragment",
    [(name, wrong, fragment) for name, wrongs in TRAFFIC.items() for wrong, fragment in wrongs],
    ids=[f"{name}-{wrong.__name__}-{i}" for name, wrongs in TRAFFIC.items() for i, (wrong, _) in enumerate(wrongs)],
)
def test_kernel_without_the_lesson_fails(name, wrong, fragment):
    assert_fails(getattr(ch06, name), wrong, contains=fragment)


@pytest.mark.skipif(not CUDA_SIMULATOR, reason="memory traffic is counted in the CUDA simulator")
def test_memory_rules_name_the_thread_the_count_and_the_lesson():
    msg = assert_fails(ch06.matmul_kernel, _matmul_reading_global(a_from_tile=False))
    assert "thread (0, 0) of block (0, 0) read a 22 times from global memory on input 'a 21x19 @ b 19x13" in msg
    assert "; at most 3 will do: a tiled kernel reads each input element once per tile" in msg
    assert "fewer than the 128 of a TILE x TILE tile of a and one of b" in assert_fails(ch06.matmul_kernel,
                                                                                     matmul_untiled)
    assert "cuda.shared.array" in msg
    assert "a_tile[ty, tx]" not in msg  # the lesson, not the code


def test_nine_exercises_and_use_falls_back_to_the_reference(capsys):
    assert len(ch06.chapter.exercises) == 9

    @cuda.jit
    def axpy_kernel(alpha, x, y, out):  # never checked: `use` must hand back the reference
        pass

    assert ch06.use(axpy_kernel) is ch06.chapter.exercises["axpy_kernel"].reference
    assert "using the reference" in capsys.readouterr().out
