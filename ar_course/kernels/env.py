"""Decide once, at import, how this machine runs GPU kernels.

Without a CUDA GPU (``torch.cuda.is_available()`` is false) two environment variables get a default
before numba's CUDA target or Triton is imported:

* ``NUMBA_ENABLE_CUDASIM=1``: ``@cuda.jit`` kernels run in numba's CUDA simulator, one Python thread per
  CUDA thread (correct but slow: keep launches to a few thousand threads);
* ``TRITON_INTERPRET=1``: ``@triton.jit`` kernels run in Triton's interpreter on CPU tensors, one program
  instance at a time with NumPy doing each block operation.

A value you set yourself is kept (``os.environ.setdefault``), so ``NUMBA_ENABLE_CUDASIM=0`` on a CPU-only
machine is honoured (the numba kernels are then reported as unusable and the wrappers fall back to
torch). On a CUDA machine nothing is set and the kernels compile for the GPU. The variables are read when
``numba.cuda`` / the kernels' Triton module are first imported, so set them before that if you want
something else.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from ar_course._env import set_kernel_defaults

CUDA_AVAILABLE: bool = set_kernel_defaults()  # already applied when ar_course was imported

from numba import cuda  # noqa: E402  (after the environment variables are set)
from numba.cuda.core import config as _numba_cuda_config  # noqa: E402

CUDA_SIMULATOR: bool = bool(_numba_cuda_config.ENABLE_CUDASIM)
"""True when ``@cuda.jit`` kernels run in numba's CUDA simulator."""

NUMBA_CUDA_USABLE: bool = CUDA_SIMULATOR or (CUDA_AVAILABLE and cuda.is_available())
"""True when ``@cuda.jit`` kernels can be launched here (on a GPU or in the simulator)."""

if not NUMBA_CUDA_USABLE and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    warnings.warn("numba.cuda was imported before ar_course.kernels without NUMBA_ENABLE_CUDASIM=1, so the "
                  "CUDA simulator is off; set the variable before importing numba to use the kernels.",
                  stacklevel=2)


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # blocked (sys.modules["triton"] = None) or broken
        return False


TRITON_INSTALLED: bool = _triton_installed()


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET`` is set)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def describe() -> str:
    """One line: where the numba and Triton kernels run on this machine."""
    gpu = torch.cuda.get_device_name(0) if CUDA_AVAILABLE else "no CUDA GPU"
    numba_where = "simulator" if CUDA_SIMULATOR else ("GPU" if NUMBA_CUDA_USABLE else "unusable")
    if not TRITON_INSTALLED:
        triton_where = "not installed"
    else:
        triton_where = "interpreter" if triton_interpreted() else "GPU"
    return f"{gpu}; numba.cuda kernels: {numba_where}; Triton kernels: {triton_where}"
