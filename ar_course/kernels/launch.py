"""Launching numba.cuda kernels on torch tensors, on a GPU or in the simulator."""

from __future__ import annotations

from typing import Any

import torch

from .env import CUDA_SIMULATOR, NUMBA_CUDA_USABLE, cuda


def cdiv(a: int, b: int) -> int:
    """Ceiling division: how many blocks of ``b`` cover ``a`` items."""
    return -(-a // b)


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``): block sizes, and size buckets that share one
    autotuning or one measurement."""
    return 1 << max(0, n - 1).bit_length()


def float32_input(x: torch.Tensor, ndim: int, name: str) -> torch.Tensor:
    """``x`` as a contiguous float32 tensor, after checking that it has ``ndim`` axes."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x.detach().to(torch.float32).contiguous()


def as_kernel_array(t: torch.Tensor) -> Any:
    """A view of a contiguous tensor that a numba.cuda kernel can read and write.

    A CUDA tensor becomes a numba device array sharing its memory; a CPU tensor (simulator) becomes a
    NumPy array sharing its memory, which the simulator copies in and back around the launch.
    """
    if not t.is_contiguous():
        raise ValueError("kernel arguments must be contiguous tensors (call .contiguous())")
    if t.is_cuda:
        if CUDA_SIMULATOR:
            raise ValueError("the CUDA simulator runs on CPU tensors; move the inputs with .cpu()")
        return cuda.as_cuda_array(t.detach())
    return t.detach().numpy()


def launch(kernel: Any, grid: tuple[int, ...], block: tuple[int, ...], *args: Any) -> None:
    """Run ``kernel[grid, block](*args)``; tensors are passed as :func:`as_kernel_array` views.

    On a GPU the launch goes to torch's current stream, so it is ordered with the surrounding torch work.
    """
    if not NUMBA_CUDA_USABLE:
        raise RuntimeError("numba.cuda kernels cannot run here: no CUDA GPU and the simulator is off "
                           "(NUMBA_ENABLE_CUDASIM must be 1 before numba is imported)")
    if min(grid) < 1:  # nothing to do (an empty input)
        return
    converted = [as_kernel_array(a) if isinstance(a, torch.Tensor) else a for a in args]
    if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
        stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
        kernel[grid, block, stream](*converted)
    else:
        kernel[grid, block](*converted)
