"""Helpers for the checks' own tests: a check must accept the reference and reject wrong answers."""

from __future__ import annotations

import contextlib
import io
from typing import Callable

import pytest

from ar_course.checks.core import CheckFailure, NotAttempted


def assert_passes(check: Callable, fn: Callable, capsys=None) -> None:
    """The check accepts ``fn``: its line says 'passed' (a check returns None, so a check cell shows nothing
    but its line)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert check(fn) is None
    print(out.getvalue(), end="")  # as the check printed it, for a caller's capsys
    assert out.getvalue().strip().endswith("passed"), out.getvalue()


def assert_fails(check: Callable, fn: Callable, contains: str | None = None) -> str:
    """The check rejects ``fn`` with a CheckFailure (an AssertionError); return the message."""
    with pytest.raises(CheckFailure) as info:
        check(fn)
    msg = str(info.value)
    assert "failed:" in msg
    if contains is not None:
        assert contains.lower() in msg.lower(), msg
    return msg


def assert_not_attempted(check: Callable, stub: Callable) -> None:
    """A stub raising NotImplementedError is reported as not attempted."""
    with pytest.raises(NotAttempted):
        check(stub)


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise stub")
