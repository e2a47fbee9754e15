"""Row-wise softmax in one read of the row for its statistics: the online softmax, in numba.cuda.

For a row x, softmax needs m = max x and l = sum exp(x - m). Reading the row once, keep a running pair
(m, l); a new value x_j updates it to

    m' = max(m, x_j),    l' = l * exp(m - m') + exp(x_j - m').

Two partial pairs combine the same way, (m1, l1) + (m2, l2) = (m, l1 exp(m1 - m) + l2 exp(m2 - m)) with
m = max(m1, m2), so every thread of a block can summarise its own strided slice of the row and a tree in
shared memory merges the summaries. A second pass writes exp(x - m) / l.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch
from numba import float32

from .env import cuda
from .launch import float32_input, launch

LOWEST = -3.4028234e38
"""Most negative float32: the start value of a running max, so that empty summaries combine without NaN."""


@lru_cache(maxsize=None)
def make_softmax_kernel(threads: int) -> Any:
    """Kernel ``(x, out)``: out = softmax(x) row by row; x (R, C), out (>=R, >=C) float32.

    Launch one block of ``threads`` threads (a power of two) per row: grid (R,), block (threads,).
    """
    if threads < 1 or threads & (threads - 1):
        raise ValueError(f"threads must be a power of two, got {threads}")

    @cuda.jit
    def softmax_kernel(x, out):
        row_max = cuda.shared.array(threads, float32)
        row_sum = cuda.shared.array(threads, float32)
        t = cuda.threadIdx.x
        row = cuda.blockIdx.x
        n_rows, n_cols = x.shape
        m = float32(LOWEST)
        s = float32(0.0)
        if row < n_rows:
            for c in range(t, n_cols, threads):  # this thread's strided slice, read once
                xv = x[row, c]
                if xv > m:
                    s = s * math.exp(m - xv)  # rescale the old sum to the new max
                    m = xv
                s += math.exp(xv - m)
        row_max[t] = m
        row_sum[t] = s
        cuda.syncthreads()
        stride = threads // 2
        while stride > 0:  # tree merge of the (max, sum) pairs
            if t < stride:
                m1 = row_max[t]
                m2 = row_max[t + stride]
                mm = max(m1, m2)
                row_sum[t] = row_sum[t] * math.exp(m1 - mm) + row_sum[t + stride] * math.exp(m2 - mm)
                row_max[t] = mm
            cuda.syncthreads()
            stride //= 2
        m = row_max[0]
        s = row_sum[0]
        if row < n_rows:
            for c in range(t, n_cols, threads):
                out[row, c] = math.exp(x[row, c] - m) / s

    return softmax_kernel


def softmax(x: torch.Tensor, threads: int = 128) -> torch.Tensor:
    """softmax over the last axis of x (R, C) with the online-softmax kernel; returns (R, C) float32."""
    x = float32_input(x, 2, "x")
    out = torch.empty_like(x)
    launch(make_softmax_kernel(threads), (x.shape[0],), (threads,), x, out)
    return out
