"""Environment defaults that must be in place before numba's CUDA target or Triton is first imported."""

from __future__ import annotations

import os


def set_kernel_defaults() -> bool:
    """Without a CUDA GPU, default ``NUMBA_ENABLE_CUDASIM=1`` and ``TRITON_INTERPRET=1`` (values you set are
    kept). Runs when ``ar_course`` is imported, because Triton reads the variable once, at its own import,
    and torch imports Triton on its own (its optimizers load ``torch._dynamo``, which does), so waiting for
    ``ar_course.kernels`` would be too late after any training step. Returns whether CUDA is available."""
    try:
        import torch
    except ImportError:  # no torch yet: `python -m ar_course doctor` says so
        return False
    available = torch.cuda.is_available()
    if not available:
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return available
