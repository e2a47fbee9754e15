"""Counting forward passes through a transformer (a GPT, a VAR: any module with ``blocks``)."""

from __future__ import annotations

import threading
from typing import Callable

from torch import nn


class PassCounter:
    """Counts forward passes through a transformer (a pre-hook on its first block) until :meth:`remove`: those
    of the thread that made the counter only, so another thread generating with the same model is not counted."""

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        self._thread = threading.get_ident()
        self._handle = model.blocks[0].register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if threading.get_ident() == self._thread:
            self.count += 1

    def remove(self) -> None:
        """Stop counting: remove the hook (``count`` keeps its value)."""
        self._handle.remove()


def count_forward_passes(model: nn.Module, fn: Callable[[], object]) -> int:
    """How many forward passes through ``model``'s transformer ``fn()`` makes in this thread (counted at its
    first block; passes other threads make through the same model meanwhile are not)."""
    counter = PassCounter(model)
    try:
        fn()
    finally:
        counter.remove()
    return counter.count
