"""Nearest-code search on the CPU with numba: the fused kernel's idea on cores instead of threads.

Rows of z are shared among the cores (``prange``); for each row the codebook is scanned keeping only the
best (distance, index). ``||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2`` and ``||z||^2`` is the same for every
code of a row, so the scan ranks codes by ``||c||^2 - 2 z.c``: one dot product per pair, which LLVM
vectorises. Extra memory: the K code norms and the N indices, never an N x K matrix.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from numba import njit, prange


def _jit(fn: Callable) -> Callable:
    """``fn`` compiled once and cached on disk beside the package (or in numba's cache folder); where numba finds
    nowhere to write (a read-only install and home) it compiles in each process instead of failing to import."""
    try:
        return njit(parallel=True, fastmath=True, cache=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(parallel=True, fastmath=True)(fn)


@_jit
def _nearest(z: np.ndarray, codebook: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    n, dim = z.shape
    k = codebook.shape[0]
    norms = np.empty(k, dtype=np.float32)
    for j in range(k):
        acc = np.float32(0.0)
        for d in range(dim):
            acc += codebook[j, d] * codebook[j, d]
        norms[j] = acc
    for i in prange(n):
        best = np.inf
        best_j = 0
        for j in range(k):
            dot = np.float32(0.0)
            for d in range(dim):
                dot += z[i, d] * codebook[j, d]
            score = norms[j] - 2.0 * dot
            if score < best:  # strict: ties keep the lowest index
                best = score
                best_j = j
        out[i] = best_j


def vq_nearest_cpu(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N,) int64 index of the nearest code for z (N, D) and codebook (K, D), both on the CPU.

    Compiled on first use (about a second; cached on disk afterwards). Uses numba's thread pool.
    """
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"need z (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if z.is_cuda or codebook.is_cuda:
        raise ValueError("vq_nearest_cpu needs CPU tensors")
    if codebook.shape[0] == 0:
        raise ValueError("the codebook is empty")
    z_np = z.detach().to(torch.float32).contiguous().numpy()
    c_np = codebook.detach().to(torch.float32).contiguous().numpy()
    out = np.empty(z_np.shape[0], dtype=np.int64)
    _nearest(z_np, c_np, out)
    return torch.from_numpy(out)
