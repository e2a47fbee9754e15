"""ar_course: autoregressive generation from scratch, the tested package behind the course notebooks."""

from ar_course._env import set_kernel_defaults

__version__ = "0.1.0"

set_kernel_defaults()
