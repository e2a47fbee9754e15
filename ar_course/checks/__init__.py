"""Exercise checks, one module per chapter (``checks.ch01.vq_lookup(fn)``), built on :mod:`.core`."""

from .core import Case, Chapter, CheckFailure, NotAttempted, call, compare, compare_cases

__all__ = ["Case", "Chapter", "CheckFailure", "NotAttempted", "call", "compare", "compare_cases"]
