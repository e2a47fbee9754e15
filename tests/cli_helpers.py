"""Running ``python -m ar_course`` in-process for the CLI tests, and the shipped models loaded once."""

from __future__ import annotations

import pytest

from ar_course import cli
from ar_course.system import Generator


def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    """``cli.main(argv)``: (exit status, stdout, stderr). Any exception escaping ``main`` fails the test."""
    capsys.readouterr()  # drop what earlier calls printed
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def error_line(err: str) -> str:
    """The single ``error: ...`` line that is all of ``err``; fails when there is anything else."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, repr(err)
    return lines[0]


def grid_size(n_classes: int, per_class: int, zoom: int) -> tuple[int, int]:
    """(width, height) of generate's PNG: a column per class, a row per sample, 32-px images, 2-px padding."""
    return (n_classes * 34 + 2) * zoom, (per_class * 34 + 2) * zoom


def patch_loading(monkeypatch: pytest.MonkeyPatch, generator: Generator) -> list[str]:
    """Make ``Generator.from_pretrained`` return ``generator`` and record each call (so a test can see whether
    the models were loaded at all)."""
    calls: list[str] = []

    def from_pretrained(name: str = "mnist", device: str = "auto") -> Generator:
        calls.append(name)
        return generator

    monkeypatch.setattr(Generator, "from_pretrained", staticmethod(from_pretrained))
    return calls
