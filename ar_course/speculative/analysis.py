"""The analytic model of speculative decoding (Leviathan et al., *Fast Inference from Transformers via
Speculative Decoding*, 2023, section 3): what a draft that is accepted with probability ``alpha`` per
token buys.

Use it to choose the number of drafts ``gamma`` from a measured acceptance rate
(:attr:`~ar_course.speculative.SpecStats.acceptance_rate`) and the cost of a draft call relative to a
target call, before running anything; ``benchmarks/bench_speculative.py`` sets it beside measured speedups.

* :func:`expected_tokens_per_call` -- tokens one target call yields on average.
* :func:`expected_speedup` -- the wall-clock speedup over plain decoding.
"""

from __future__ import annotations

from ar_course.utils import check_int, check_number


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """Expected tokens one target call produces with ``gamma`` drafts accepted i.i.d. with prob ``alpha``:
    ``(1 - alpha**(gamma + 1)) / (1 - alpha)``, and ``gamma + 1`` at ``alpha = 1``.

    Raises:
        TypeError: ``alpha`` not a number, ``gamma`` not an integer (``2.5``).
        ValueError: ``alpha`` NaN or outside ``[0, 1]``, ``gamma < 0``."""
    alpha = check_number("alpha", alpha, lo=0, hi=1)
    gamma = check_int("gamma", gamma, lo=0)
    if alpha == 1:
        return float(gamma + 1)
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_speedup(alpha: float, gamma: int, c: float) -> float:
    """Wall-clock speedup over plain decoding when a draft call costs ``c`` target calls:
    ``expected_tokens_per_call(alpha, gamma) / (gamma * c + 1)``.

    Raises:
        TypeError, ValueError: as :func:`expected_tokens_per_call`, or ``c`` not a finite number ``>= 0``."""
    c = check_number("cost ratio c", c, lo=0)
    tokens = expected_tokens_per_call(alpha, gamma)  # checks alpha and gamma
    return tokens / (gamma * c + 1)
