"""CUDA-graph capture of a decode step: record a pass's kernels once, then replay them with one launch.

A decode step at small batch sizes is bound by kernel launches (hundreds per pass, each a few microseconds of
host work). :class:`CUDAGraphStep` wraps a step that never waits for the host
(:meth:`~ar_course.transformer.model.GPT.decode_step`, VAR's per-scale pass over a
:class:`~ar_course.transformer.model.StaticKVCache`) and replays it from a ``torch.cuda.CUDAGraph``: the tensor
arguments are copied into the graph's static input buffers, the graph is replayed, and its static output buffers
are returned. The plain path beside it is the wrapped function itself, run eagerly (tests check that both agree).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

from ar_course.cli import exception_line
from ar_course.transformer.model import _ATTENTION, StaticKVCache


@dataclass
class _Captured:
    """One captured graph: its static input tensors (in argument order), the call's arguments built on them,
    its output, and the objects it must keep alive (the caches whose buffers it writes)."""

    graph: Any  # torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: Any
    keep: list[Any]
    dispatched: Any  # the kernels.DispatchRecord of the capture pass: what every replay runs

    def replay(self, tensors: list[torch.Tensor]) -> Any:
        from ar_course.kernels.ops import note_dispatch  # only here, on a CUDA machine: no environment defaults

        for static, new in zip(self.inputs, tensors):
            static.copy_(new)
        self.graph.replay()
        note_dispatch(self.dispatched)  # the replay runs no entry point: report what the capture recorded
        return self.output


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor arguments of a call, positional first then keywords in name order."""
    return [a for a in (*args, *(kwargs[k] for k in sorted(kwargs))) if isinstance(a, torch.Tensor)]


def _signature(args: tuple, kwargs: dict) -> tuple[Hashable, ...]:
    """What a graph is specialised to: every tensor argument's shape, dtype and device, every other argument
    (a cache by identity), the autocast state and the attention function in effect
    (:func:`~ar_course.transformer.model.use_attention`)."""

    def key(a: object) -> Hashable:
        if isinstance(a, torch.Tensor):
            return ("tensor", tuple(a.shape), a.dtype, a.device)
        if a is None or isinstance(a, (bool, int, float, str)):
            return a
        return ("object", id(a))

    autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    # the attention function by value: KernelAttention is a frozen dataclass, made afresh by every Generator call
    return (tuple(key(a) for a in args), tuple((k, key(kwargs[k])) for k in sorted(kwargs)), autocast,
            _ATTENTION.get())


def _replace_tensors(args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
    """``args, kwargs`` with their tensors replaced, in :func:`_tensors`'s order, by ``tensors``."""
    it = iter(tensors)
    new_args = tuple(next(it) if isinstance(a, torch.Tensor) else a for a in args)
    new_kwargs = {k: next(it) if isinstance(kwargs[k], torch.Tensor) else kwargs[k] for k in sorted(kwargs)}
    return new_args, new_kwargs


class CUDAGraphStep:
    """``fn`` replayed from CUDA graphs, one per signature of its arguments (shapes, dtypes, other arguments, the
    caches it writes, autocast, the attention in effect), captured at the first call with that signature.

    ``fn`` must not synchronise with the host, and every state it changes must live in tensors (a
    :class:`~ar_course.transformer.model.StaticKVCache`: its buffers are fixed, so the caches passed must be
    the same objects call after call; a new cache means a new capture). Before capturing, ``fn`` runs
    ``warmup`` times on a side stream (the caches' positions are restored afterwards). Autocast runs without
    its weight cache inside the graph, so that no cast weight is freed under it.

    The output of a call is the graph's buffer: the next replay of the same graph overwrites it (clone it to
    keep it). If a capture fails (e.g. a kernel that synchronises or launches on its own stream), the step
    warns once, records why in :attr:`failure`, and runs ``fn`` eagerly from then on. :attr:`capture_seconds`
    sums the time spent warming up and capturing. Not thread-safe: one caller at a time.
    """

    def __init__(self, fn: Callable[..., Any], warmup: int = 2) -> None:
        self.fn, self.warmup = fn, warmup
        self.capture_seconds = 0.0
        self.failure: str | None = None
        self._graphs: dict[tuple, _Captured] = {}

    @property
    def graphs(self) -> int:
        """How many graphs have been captured."""
        return len(self._graphs)

    def forget(self, obj: object) -> int:
        """Drop the graphs captured over ``obj`` (an argument such as a cache, by identity), freeing their memory,
        before ``obj`` itself is dropped (a later object could take its id). Returns how many were dropped."""
        tag = ("object", id(obj))
        stale = [k for k in self._graphs if tag in k[0] or any(v == tag for _, v in k[1])]
        for k in stale:
            del self._graphs[k]
        return len(stale)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` by replaying the graph captured for this call's signature (shapes, dtypes,
        devices, other arguments, autocast and attention in effect: :func:`_signature`), captured at its first call."""
        if self.failure is not None:
            return self.fn(*args, **kwargs)
        key = _signature(args, kwargs)
        captured = self._graphs.get(key)
        if captured is None:
            try:
                captured = self._capture(args, kwargs)
            except Exception as exc:  # noqa: BLE001 -- any failed capture (torch's, a kernel library's) runs eagerly
                self.failure = exception_line(exc)
                warnings.warn(f"CUDA graph capture failed, running eagerly: {self.failure}", RuntimeWarning,
                              stacklevel=2)
                return self.fn(*args, **kwargs)
            self._graphs[key] = captured
        return captured.replay(_tensors(args, kwargs))

    def _capture(self, args: tuple, kwargs: dict) -> _Captured:
        """Warm ``fn`` up on static copies of the tensor arguments, restore the caches, capture one graph. What
        the kernel entry points report is kept from the capture pass only (the warm-up passes are not steps)."""
        from ar_course.kernels.ops import record_dispatch

        start = time.perf_counter()
        caches = [a for a in (*args, *kwargs.values()) if isinstance(a, StaticKVCache)]
        saved = [c.pos.clone() for c in caches]
        inputs = [t.clone() for t in _tensors(args, kwargs)]
        s_args, s_kwargs = _replace_tensors(args, kwargs, inputs)
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast, record_dispatch():
            for _ in range(self.warmup):
                self.fn(*s_args, **s_kwargs)
        torch.cuda.current_stream().wait_stream(side)
        for cache, pos in zip(caches, saved):
            cache.rollback(pos)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), autocast, record_dispatch() as dispatched:
            output = self.fn(*s_args, **s_kwargs)
        for cache, pos in zip(caches, saved):  # capturing records the kernels without running them
            cache.rollback(pos)
        torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - start
        return _Captured(graph, inputs, output, caches, dispatched)
