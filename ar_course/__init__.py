"""ar_course: autoregressive generation from scratch, the tested package behind the course notebooks.

Importing it (or any library module) has no side effects: no environment variable changes, no numba, Triton,
Jupyter or plotting import. The GPU kernels configure themselves when :mod:`ar_course.kernels` is imported
(see :mod:`ar_course.kernels.env`)."""

__version__ = "0.1.0"
