"""Measured dispatch: does a chapter 06 kernel beat torch for this kind of call on this device?

``backend="auto"`` on a GPU asks a :class:`Calibrator` before it runs a kernel. The first call of each kind
(an op, the kernel family, the device's name and a bucket of sizes and dtypes, see ``ops``) times the
kernel and the torch path on that call's own inputs, a few warm repetitions each between CUDA events, and
keeps the kernel only if it took at most ``margin`` times torch's time. The decision is kept in memory
and in a JSON file (default ``~/.cache/ar_course/kernel_choices.json``, or under ``$XDG_CACHE_HOME``) in a
section named after the torch and Triton versions and a digest of the kernels' source, so a new process on
the same machine, with the same software, never measures again and a changed kernel is measured afresh.

On a CPU nothing is measured: the simulator and the interpreter are teaching tools, always slower than
torch, so ``"auto"`` there follows a fixed rule (see ``ops.select_backend``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import threading
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from ar_course.files import atomic_write_text

from . import env

Timer = Callable[[Callable[[], object]], float]
"""Seconds per call of a function (the function is called several times; its first calls warm it up)."""


def cuda_event_timer(fn: Callable[[], object], warmup: int = 2, repeats: int = 5) -> float:
    """Mean seconds per call of ``fn`` on the current CUDA stream, after ``warmup`` calls (which absorb
    compilation and autotuning). Back-to-back calls between two events measure what a caller gets: the GPU
    time, or the launch overhead when that is larger."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def default_cache_path() -> Path:
    """Where decisions are kept between processes: ``$XDG_CACHE_HOME/ar_course/kernel_choices.json``, with
    ``$XDG_CACHE_HOME`` defaulting to ``~/.cache``."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "ar_course" / "kernel_choices.json"


@lru_cache(maxsize=1)
def software_section() -> str:
    """The cache file's section for this software: torch, Triton and numba-cuda versions, kernels' source digest."""
    sources = sorted(Path(__file__).parent.glob("*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    triton = "none"
    if env.TRITON_INSTALLED:
        import triton as _triton

        triton = _triton.__version__
    try:
        numba_cuda = importlib.metadata.version("numba-cuda")
    except importlib.metadata.PackageNotFoundError:
        numba_cuda = "none"
    return f"torch {torch.__version__}, triton {triton}, numba-cuda {numba_cuda}, kernels {digest}"


class Calibrator:
    """Kernel-or-torch decisions per kind of call, measured once and remembered.

    Args:
        timer: seconds per call of a function (:func:`cuda_event_timer`; tests pass a fake).
        path: the JSON file that keeps decisions between processes; ``None`` keeps them in memory only.
        margin: the kernel is chosen when its time is at most ``margin`` x torch's (below 1: a kernel must
            win clearly, not by timing noise).
        device_types: the device types whose calls are measured (``("cuda",)``; a test may add ``"cpu"``).
    """

    def __init__(self, timer: Timer = cuda_event_timer, path: Path | None = None, margin: float = 0.95,
                 device_types: tuple[str, ...] = ("cuda",)) -> None:
        self.timer, self.path, self.margin, self.device_types = timer, path, margin, device_types
        self._choices: dict[str, dict] | None = None  # key -> {"backend": ..., "seconds": {...}}
        self._lock = threading.Lock()

    def measures(self, device: torch.device) -> bool:
        """True when calls on ``device`` are decided by measurement."""
        return device.type in self.device_types

    def lookup(self, key: str) -> str | None:
        """The back-end decided for ``key`` (this process or an earlier one), or None if not measured yet."""
        with self._lock:
            choice = self._loaded().get(key)
        return None if choice is None else choice["backend"]

    def decide(self, key: str, kernel: str, kernel_seconds: float, torch_seconds: float) -> str:
        """Record and return the decision for ``key`` from the two measured times."""
        backend = kernel if kernel_seconds <= self.margin * torch_seconds else "torch"
        with self._lock:
            self._loaded()[key] = {"backend": backend, "seconds": {kernel: kernel_seconds, "torch": torch_seconds}}
            self._save()
        return backend

    def choices(self) -> dict[str, dict]:
        """A copy of every decision known: key -> ``{"backend": ..., "seconds": {backend: seconds}}``."""
        with self._lock:
            return json.loads(json.dumps(self._loaded()))

    def _loaded(self) -> dict[str, dict]:
        if self._choices is None:
            self._choices = _valid_choices(self._read().get(software_section()))
        return self._choices

    def _read(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # unreadable or half-written by an older version: measure again
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self) -> None:
        if self.path is None:
            return
        data = self._read()
        data[software_section()] = {**_valid_choices(data.get(software_section())), **self._choices}
        try:
            atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")
        except (OSError, ValueError) as exc:  # ValueError: the path names a folder
            # stacklevel: _save <- decide <- auto_choice <- _dispatch <- the op <- its caller
            warnings.warn(f"cannot keep kernel choices in {self.path} ({type(exc).__name__}: {exc}); they last for "
                          "this process only (free that path, or set XDG_CACHE_HOME to a writable folder)",
                          RuntimeWarning, stacklevel=6)
            self.path = None


def _valid_choices(section: object) -> dict[str, dict]:
    """The well-formed decisions of a cache file's section (``key -> {"backend": str, "seconds": {...}}``, the
    back-end one of the two measured); any other entry, or a section that is not a mapping (a file edited by hand
    or by another version), is dropped, so its kind of call is measured again."""
    if not isinstance(section, dict):
        return {}
    return {key: choice for key, choice in section.items()
            if isinstance(choice, dict) and isinstance(choice.get("seconds"), dict)
            and isinstance(choice.get("backend"), str) and choice["backend"] in choice["seconds"]}
