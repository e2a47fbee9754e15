"""ar_course: autoregressive generation from scratch, the tested package behind the course notebooks.

Importing it (or any library module but :mod:`ar_course.kernels`) has no side effects: no environment variable
changes, no numba, Triton, Jupyter or plotting import. Importing :mod:`ar_course.kernels` is how the GPU kernels
are configured: without a CUDA GPU it sets ``NUMBA_ENABLE_CUDASIM`` and ``TRITON_INTERPRET`` unless you set
them (see :mod:`ar_course.kernels.env`)."""

__version__ = "0.1.0"
