"""Exercise checks, one module per chapter (``checks.ch01.vq_lookup(fn)``, ``checks.ch01.hint("1.1")``), built
on :mod:`.core`; the reference answers the library does not use live in :mod:`.reference`. This package is the
course layer: it imports the library, and no library module imports it."""

from .core import Case, Chapter, CheckFailure, Mistake, NotAttempted, call, compare, compare_cases, explain

__all__ = ["Case", "Chapter", "CheckFailure", "Mistake", "NotAttempted", "call", "compare", "compare_cases",
           "explain"]
