"""First numba.cuda kernels: a map, a 2-D map, a shared-memory reduction and a tiled matmul.

Conventions used by every kernel of the course: sizes come from the *input* arrays (an output buffer may
be longer than the data), every thread checks that its index is in range before touching memory, and in a
2-D launch ``x`` (the fastest-varying thread index) runs along the last, contiguous axis, so neighbouring
threads touch neighbouring addresses.

Kernels whose shared arrays need a compile-time size are built by ``make_*_kernel(size)`` factories.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from numba import float32

from .env import cuda
from .launch import cdiv, float32_input, launch


@cuda.jit
def axpy_kernel(alpha, x, y, out):
    """out[i] = alpha * x[i] + y[i] for i < len(x); x, y (N,) float32, 1-D launch covering N."""
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] = alpha * x[i] + y[i]


@cuda.jit
def pairwise_sqdist_kernel(z, codebook, out):
    """out[n, k] = sum_d (z[n, d] - codebook[k, d])^2; z (N, D), codebook (K, D), out (>=N, >=K).

    2-D launch: the x index runs over codes k, the y index over rows n.
    """
    k, n = cuda.grid(2)
    if n < z.shape[0] and k < codebook.shape[0]:
        acc = float32(0.0)
        for d in range(z.shape[1]):
            diff = z[n, d] - codebook[k, d]
            acc += diff * diff
        out[n, k] = acc


@lru_cache(maxsize=None)
def make_block_sum_kernel(threads: int) -> Any:
    """Kernel ``(x, partial)``: block ``b`` writes the sum of ``x[b*threads:(b+1)*threads]`` to ``partial[b]``.

    Launch ``cdiv(N, threads)`` blocks of ``threads`` threads (a power of two). Each thread loads one value
    into shared memory (0 past the end), then a tree halves the number of active threads each step, with a
    barrier between steps that every thread of the block reaches.
    """
    if threads < 1 or threads & (threads - 1):
        raise ValueError(f"threads must be a power of two, got {threads}")

    @cuda.jit
    def block_sum_kernel(x, partial):
        buf = cuda.shared.array(threads, float32)
        t = cuda.threadIdx.x
        i = cuda.blockIdx.x * threads + t
        buf[t] = x[i] if i < x.shape[0] else float32(0.0)
        cuda.syncthreads()
        stride = threads // 2
        while stride > 0:
            if t < stride:
                buf[t] += buf[t + stride]
            cuda.syncthreads()  # outside the `if`: every thread of the block must reach it
            stride //= 2
        if t == 0:
            partial[cuda.blockIdx.x] = buf[0]

    return block_sum_kernel


@lru_cache(maxsize=None)
def make_matmul_kernel(tile: int) -> Any:
    """Kernel ``(a, b, c)``: c = a @ b with a (M, K), b (K, N), c (>=M, >=N), all float32.

    Launch blocks of (tile, tile) threads on a grid of (cdiv(N, tile), cdiv(M, tile)). Each block walks
    along K one (tile x tile) piece of ``a`` and of ``b`` at a time, staged in shared memory, so every
    value loaded from global memory is reused ``tile`` times.
    """

    @cuda.jit
    def matmul_kernel(a, b, c):
        a_tile = cuda.shared.array((tile, tile), float32)
        b_tile = cuda.shared.array((tile, tile), float32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        row = cuda.blockIdx.y * tile + ty
        col = cuda.blockIdx.x * tile + tx
        m, inner = a.shape
        n = b.shape[1]
        acc = float32(0.0)
        for k0 in range(0, inner, tile):
            a_tile[ty, tx] = a[row, k0 + tx] if row < m and k0 + tx < inner else float32(0.0)
            b_tile[ty, tx] = b[k0 + ty, col] if k0 + ty < inner and col < n else float32(0.0)
            cuda.syncthreads()  # the tiles are complete before anyone reads them
            for kk in range(tile):
                acc += a_tile[ty, kk] * b_tile[kk, tx]
            cuda.syncthreads()  # everyone is done reading before the next tiles overwrite them
        if row < m and col < n:
            c[row, col] = acc

    return matmul_kernel


def axpy(alpha: float, x: torch.Tensor, y: torch.Tensor, threads: int = 128) -> torch.Tensor:
    """alpha * x + y for 1-D tensors x, y (N,) with :func:`axpy_kernel`; returns (N,) float32."""
    x, y = float32_input(x, 1, "x"), float32_input(y, 1, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    out = torch.empty_like(x)
    launch(axpy_kernel, (cdiv(x.shape[0], threads),), (threads,), float(alpha), x, y, out)
    return out


def pairwise_sqdist(z: torch.Tensor, codebook: torch.Tensor, block: int = 16) -> torch.Tensor:
    """(N, K) squared distances between z (N, D) and codebook (K, D) with :func:`pairwise_sqdist_kernel`."""
    z, codebook = float32_input(z, 2, "z"), float32_input(codebook, 2, "codebook")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z has D={z.shape[1]} but the codebook has D={codebook.shape[1]}")
    out = torch.empty(z.shape[0], codebook.shape[0], device=z.device)
    grid = (cdiv(codebook.shape[0], block), cdiv(z.shape[0], block))
    launch(pairwise_sqdist_kernel, grid, (block, block), z, codebook, out)
    return out


def block_sum(x: torch.Tensor, threads: int = 128) -> torch.Tensor:
    """Sum of a 1-D tensor (N,) by repeated block reductions; returns a 0-D float32 tensor."""
    x = float32_input(x, 1, "x")
    kernel = make_block_sum_kernel(threads)
    while x.shape[0] > 1:
        partial = torch.empty(cdiv(x.shape[0], threads), device=x.device)
        launch(kernel, (partial.shape[0],), (threads,), x, partial)
        x = partial
    return x.sum()


def matmul(a: torch.Tensor, b: torch.Tensor, tile: int = 16) -> torch.Tensor:
    """a (M, K) @ b (K, N) -> (M, N) float32 with the shared-memory tiled kernel."""
    a, b = float32_input(a, 2, "a"), float32_input(b, 2, "b")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner sizes differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    c = torch.empty(a.shape[0], b.shape[1], device=a.device)
    grid = (cdiv(b.shape[1], tile), cdiv(a.shape[0], tile))
    launch(make_matmul_kernel(tile), grid, (tile, tile), a, b, c)
    return c
