"""Case counts of the fuzz tests, printed in pytest's terminal summary (see conftest.py).

A fuzz test calls ``record("generate CLI", n)`` with the number of cases it ran; the summary then shows
``fuzz: generate CLI: n cases``, so every run says how much was tried."""

COUNTS: dict[str, int] = {}


def record(name: str, cases: int) -> None:
    """Add ``cases`` to the count of fuzz target ``name``."""
    COUNTS[name] = COUNTS.get(name, 0) + cases
