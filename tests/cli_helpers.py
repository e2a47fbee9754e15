"""Running ``python -m ar_course`` in-process for the CLI tests, and the shipped models loaded once."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

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


class Calls(list):
    """The names ``Generator.from_pretrained`` was called with (shown as a count in failure reports)."""

    def __repr__(self) -> str:
        return f"<{len(self)} calls of Generator.from_pretrained>"


def patch_loading(monkeypatch: pytest.MonkeyPatch, generator: Generator) -> Calls:
    """Make ``Generator.from_pretrained`` return ``generator`` and record each call (so a test can see whether
    the models were loaded at all)."""
    calls = Calls()

    def from_pretrained(name: str = "mnist", device: str = "auto", *, ar: str = "base", var: str = "base") -> Generator:
        calls.append(name)
        return generator

    monkeypatch.setattr(Generator, "from_pretrained", staticmethod(from_pretrained))
    return calls


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread: as fast for the tests' tiny batches, and no slower when the shared CPU is busy (two
    threads spin-waiting on each other then made single images take seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
