"""Fused nearest-code search in numba.cuda: distances and argmin without an N x K buffer.

``torch.cdist(z, codebook).argmin(1)`` writes all N x K distances to memory and reads them back. Here each
thread owns one vector, walks the codebook keeping only (best distance, best index) in registers, and
writes one int64. Every thread of a warp reads the same code at the same time, so the hardware serves the
codebook as a broadcast from cache.
"""

from __future__ import annotations

import math

import torch
from numba import float32

from .env import cuda
from .launch import cdiv, float32_input, launch


@cuda.jit
def vq_nearest_kernel(z, codebook, out):
    """out[n] = argmin_k sum_d (z[n, d] - codebook[k, d])^2, ties to the lowest k.

    z (N, D) float32, codebook (K, D) float32, out (>=N,) int64; 1-D launch covering N.
    """
    n = cuda.grid(1)
    if n < z.shape[0]:
        best = float32(math.inf)
        best_k = 0
        for k in range(codebook.shape[0]):
            dist = float32(0.0)
            for d in range(z.shape[1]):
                diff = z[n, d] - codebook[k, d]
                dist += diff * diff
            if dist < best:  # strict: an equal distance later keeps the lower index
                best = dist
                best_k = k
        out[n] = best_k


def vq_nearest_numba(z: torch.Tensor, codebook: torch.Tensor, threads: int = 128) -> torch.Tensor:
    """(N,) int64 nearest-code indices for z (N, D) and codebook (K, D) with :func:`vq_nearest_kernel`."""
    z, codebook = float32_input(z, 2, "z"), float32_input(codebook, 2, "codebook")
    out = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    launch(vq_nearest_kernel, (cdiv(z.shape[0], threads),), (threads,), z, codebook, out)
    return out
