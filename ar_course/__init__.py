"""ar_course: autoregressive generation from scratch, the tested package behind the course notebooks."""

__version__ = "0.1.0"
