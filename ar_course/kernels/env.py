"""Decide once, when :mod:`ar_course.kernels` is imported, how this machine runs GPU kernels.

Importing ``ar_course`` (or any library module: ``ar_course.system``, ``.var``...) changes no environment
variable and imports neither numba nor Triton. Importing ``ar_course.kernels`` runs this module first, which,
without a CUDA GPU (``torch.cuda.is_available()`` is false), gives two environment variables a default
(:func:`set_kernel_defaults`) before it imports ``numba.cuda``:

* ``NUMBA_ENABLE_CUDASIM=1``: ``@cuda.jit`` kernels run in numba's CUDA simulator, one Python thread per
  CUDA thread (correct but slow: keep launches to a few thousand threads);
* ``TRITON_INTERPRET=1``: ``@triton.jit`` kernels run in Triton's interpreter on CPU tensors, one program
  instance at a time with NumPy doing each block operation.

A value you set yourself is kept (``os.environ.setdefault``), so ``NUMBA_ENABLE_CUDASIM=0`` on a CPU-only
machine is honoured (the numba kernels are then reported as unusable and the wrappers fall back to torch). On
a CUDA machine nothing is set and the kernels compile for the GPU.

When each variable is read: numba reads ``NUMBA_ENABLE_CUDASIM`` once, when ``numba.cuda`` is first imported,
so import ``ar_course.kernels`` (or set the variable) before importing ``numba.cuda`` yourself; if numba.cuda
came first with the simulator off, a warning says so. Triton (3.7) reads ``TRITON_INTERPRET`` whenever
``@triton.jit`` decorates a function: the course's kernels are decorated when
:mod:`ar_course.kernels.triton_kernels` is imported (on first use), but Triton's own language functions
(``tl.zeros``, ``tl.max``, ``tl.sum``...) are decorated when Triton itself is imported, and torch imports Triton
early (an optimizer step loads ``torch._dynamo``, which does). So when Triton was imported before the interpreter
was switched on, :func:`interpret_triton_language` rebuilds those functions as Triton would have built them
under ``TRITON_INTERPRET=1``; if that fails, a warning says to set the variable before importing torch.

numba and Triton are optional (``pip install ar-course[kernels]`` / ``[triton]``): without them this module
still imports, and the kernel entry points answer with torch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import torch


def set_kernel_defaults() -> bool:
    """Without a CUDA GPU, default ``NUMBA_ENABLE_CUDASIM=1`` and ``TRITON_INTERPRET=1`` (values you set are
    kept). Runs when :mod:`ar_course.kernels` is imported; call it yourself to configure the process before
    importing numba.cuda or defining Triton kernels of your own. Returns whether CUDA is available."""
    available = torch.cuda.is_available()
    if not available:
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return available


CUDA_AVAILABLE: bool = set_kernel_defaults()


def restore_numpy_row_stack() -> bool:
    """Give numpy back ``row_stack`` (as ``numpy.vstack``, which it was) when it lacks it: numba-cuda 0.30
    overloads ``numpy.row_stack`` at its CUDA target's first compile and fails on numpy 2.5, which removed it
    (the GPU machine's numpy; ``pip install 'numpy<2.5'`` is the other fix). Runs when :mod:`ar_course.kernels`
    is imported, before numba. Returns whether it was missing."""
    import numpy

    missing = not hasattr(numpy, "row_stack")
    if missing:
        numpy.row_stack = numpy.vstack
    return missing


restore_numpy_row_stack()

try:  # after the environment variables are set
    from numba import cuda
    from numba.cuda.core import config as _numba_cuda_config
except ImportError:  # numba / numba-cuda not installed: the `kernels` extra
    cuda = None
    _numba_cuda_config = None

NUMBA_INSTALLED: bool = cuda is not None
"""True when numba and numba-cuda can be imported (the numba.cuda kernels)."""

CUDA_SIMULATOR: bool = NUMBA_INSTALLED and bool(_numba_cuda_config.ENABLE_CUDASIM)
"""True when ``@cuda.jit`` kernels run in numba's CUDA simulator."""

NUMBA_CUDA_USABLE: bool = CUDA_SIMULATOR or (NUMBA_INSTALLED and CUDA_AVAILABLE and cuda.is_available())
"""True when ``@cuda.jit`` kernels can be launched here (on a GPU or in the simulator)."""

if NUMBA_INSTALLED and not NUMBA_CUDA_USABLE and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    warnings.warn("numba.cuda was imported before ar_course.kernels without NUMBA_ENABLE_CUDASIM=1, so the "
                  "CUDA simulator is off; set the variable before importing numba to use the kernels.",
                  stacklevel=3)  # the line importing ar_course.kernels (import machinery frames are skipped)


def _installed(package: str) -> bool:
    """True when the top-level ``package`` can be found (without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # blocked (sys.modules[package] = None) or broken
        return False


NUMBA_CPU_INSTALLED: bool = _installed("numba")
"""True when numba itself can be found: enough for the CPU kernel (``vq_nearest``'s ``"numba_cpu"``), which
needs no numba-cuda."""

TRITON_INSTALLED: bool = _installed("triton")


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET`` is set)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


AUTOTUNE_ENV = "AR_COURSE_TRITON_AUTOTUNE"
"""``AR_COURSE_TRITON_AUTOTUNE=0`` (read when :mod:`ar_course.kernels.triton_kernels` is imported): on a GPU, each
Triton kernel runs its first configuration instead of autotuning over all of them. For correctness runs (the
GPU tests of ``make gpu-report``), where compiling every configuration for every kind of call is most of the
time; the measurements keep autotuning."""


def triton_autotuned() -> bool:
    """Whether compiled Triton kernels autotune over their configurations (unless ``AR_COURSE_TRITON_AUTOTUNE=0``)."""
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


def interpret_triton_language() -> int:
    """Make an already imported Triton language usable inside interpreted kernels; returns how many functions
    were rebuilt (0 when Triton is not imported yet, not interpreted, or was imported interpreted).

    Every ``@triton.jit`` function of ``triton.language`` (and its sub-modules and ``tl.tensor``'s methods)
    built for the compiler becomes the ``InterpretedFunction`` that ``TRITON_INTERPRET=1`` at import would have
    given; calling a compiler one inside an interpreted kernel fails ("Cannot call @triton.jit'd outside of the
    scope of a kernel")."""
    if "triton.language" not in sys.modules or not triton_interpreted():
        return 0
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    rebuilt: dict[int, InterpretedFunction] = {}

    def interpreted(fn: JITFunction) -> InterpretedFunction:
        return rebuilt.setdefault(id(fn), InterpretedFunction(fn.fn))

    def member(fn: InterpretedFunction):  # a plain function binds the tensor as the first argument
        def method(*args, **kwargs):
            return fn(*args, **kwargs)

        return method

    modules = [m for name, m in list(sys.modules.items())
               if m is not None and (name == "triton.language" or name.startswith("triton.language."))]
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                setattr(module, name, interpreted(value))
    tensor = sys.modules["triton.language"].tensor
    for name, value in list(vars(tensor).items()):
        if isinstance(value, JITFunction):
            setattr(tensor, name, member(interpreted(value)))
    return len(rebuilt)


if TRITON_INSTALLED:
    try:
        interpret_triton_language()
    except Exception as exc:  # noqa: BLE001 - Triton's internals changed: say what to do instead
        warnings.warn(f"Triton was imported before ar_course.kernels without TRITON_INTERPRET=1 and its language "
                      f"could not be switched to the interpreter ({type(exc).__name__}: {exc}); set "
                      "TRITON_INTERPRET=1 before importing torch to run the Triton kernels on CPU.", stacklevel=3)


def describe() -> str:
    """One line: where the numba and Triton kernels run on this machine."""
    gpu = torch.cuda.get_device_name(0) if CUDA_AVAILABLE else "no CUDA GPU"
    if not NUMBA_INSTALLED:
        numba_where = "not installed"
    else:
        numba_where = "simulator" if CUDA_SIMULATOR else ("GPU" if NUMBA_CUDA_USABLE else "unusable")
    if not TRITON_INSTALLED:
        triton_where = "not installed"
    else:
        triton_where = "interpreter" if triton_interpreted() else "GPU"
    return f"{gpu}; numba.cuda kernels: {numba_where}; Triton kernels: {triton_where}"
