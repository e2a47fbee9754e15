"""A small compute-sanitizer for numba's CUDA simulator.

On a GPU, a missing ``cuda.syncthreads()`` or a barrier that only some threads reach gives wrong answers
*sometimes*, or hangs. The simulator runs threads in a friendlier order, so such a kernel often passes by
luck. Inside :func:`sanitize` the simulator is instrumented so that these bugs are found on every run,
whatever order the threads happen to run in (in the spirit of NVIDIA's ``compute-sanitizer`` tools):

* **barrier divergence** (synccheck): all threads of a block must pass the same sequence of
  ``cuda.syncthreads()`` calls; a barrier inside an ``if`` that only some threads enter, or after an early
  ``return``, is reported when the block ends;
* **shared-memory races** (racecheck): every thread counts the barriers it has passed (its *epoch*). Thread
  B reading an element that thread A wrote in the same epoch, or A overwriting an element that B read in
  the same epoch, or two threads writing it in the same epoch, is a race: no barrier orders the two
  accesses. Each of the two possible orders of the accesses is caught, so the report does not depend on
  scheduling;
* **uninitialised shared memory** (initcheck): reading an element no thread of the block has written;
* **out-of-bounds shared-memory indices**, negative ones included.

Out-of-range reads and writes of global (device) arrays already raise ``IndexError`` in the simulator.
Problems are raised as :class:`SanitizerError`.

:func:`sanitize` also yields a :class:`MemoryTraffic` that counts, for every thread, what the kernel did with
memory, in the spirit of GPU-Puzzles' read counters: the elements it read from and wrote to each global array
argument, the shared-memory elements it read, and the local-array elements it allocated, plus the shared
memory each block allocated. The course's checks use it to tell a tiled kernel from an untiled one that
computes the same numbers. Outside the simulator :func:`sanitize` checks nothing and its traffic is empty
(``measured`` is False).
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .env import CUDA_SIMULATOR


class SanitizerError(Exception):
    """A synchronisation or shared-memory bug found while a kernel ran in the simulator."""


READ, WRITE, SHARED_READ, LOCAL = "read", "write", "shared read", "local"
"""What a thread's counters count: global elements read and written (per argument), shared elements read,
local-array elements allocated."""

Where = tuple[tuple[int, ...], tuple[int, ...]]
"""(block index, thread index) of one simulated thread."""


@dataclass
class MemoryTraffic:
    """Per-thread memory traffic of the kernels launched inside one :func:`sanitize` block.

    ``threads`` maps (block index, thread index) to a counter keyed by ``(READ, argument position)``,
    ``(WRITE, argument position)``, ``(SHARED_READ, None)`` and ``(LOCAL, None)``; a thread launched twice
    adds up. ``shared`` maps a block index to the shared-memory elements its static allocations hold.
    ``names`` are the kernel's argument names (``argument i`` when it takes ``*args``)."""

    measured: bool
    threads: dict[Where, Counter] = field(default_factory=dict)
    shared: dict[tuple[int, ...], int] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    grid: tuple[int, ...] = (1, 1, 1)
    block: tuple[int, ...] = (1, 1, 1)

    def describe(self, who: Where) -> str:
        """``thread (3, 1) of block (0, 2)``, with as many axes as the launch used."""

        def axes(index: tuple[int, ...], shape: tuple[int, ...]) -> str:
            n = max([1] + [i + 1 for i, size in enumerate(shape) if size > 1])
            return str(tuple(index[:n]))

        return f"thread {axes(who[1], self.block)} of block {axes(who[0], self.grid)}"

    def name(self, arg: int) -> str:
        """The kernel's name for argument ``arg``."""
        return self.names[arg] if arg < len(self.names) else f"argument {arg}"

    def most(self, kind: str, arg: int | None = None) -> tuple[int, Where | None]:
        """The largest count of ``(kind, arg)`` over all threads and the first thread that reached it."""
        best, where = 0, None
        for who in sorted(self.threads):
            n = self.threads[who][(kind, arg)]
            if n > best:
                best, where = n, who
        return best, where

    def shared_elements(self) -> int:
        """The most shared-memory elements any block allocated (0: no shared memory)."""
        return max(self.shared.values(), default=0)


def _kernel_line(skip_dirs: tuple[str, ...]) -> tuple[str, int]:
    """(file, line) of the innermost frame outside the simulator and this module: the kernel's code."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skip_dirs):
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("?", 0)


class _Block:
    """What one block did: barrier calls per thread, and per shared element its last writer and readers."""

    def __init__(self, block_idx: tuple[int, ...]):
        self.block_idx = block_idx
        self.lock = threading.Lock()
        self.barriers: dict[int, list[int]] = {}  # thread id -> line of each syncthreads passed
        self.thread_idx: dict[int, tuple[int, ...]] = {}
        self.finished: set[int] = set()
        self.shared: list[TrackedShared] = []  # the block's static shared arrays
        self.writes: dict[tuple, tuple[int, int]] = {}  # (array, element) -> (thread id, epoch)
        self.reads: dict[tuple, dict[int, int]] = {}  # (array, element) -> {thread id: epoch}

    def who(self, tid: int) -> str:
        return f"thread {self.thread_idx[tid]}"

    def divergence(self, a: int, b: int, finished: bool = False) -> str | None:
        """Why threads ``a`` and ``b`` took different barriers, or None if they did not.

        While running, one thread may be a barrier ahead of another; only different lines count. At the
        end of the block (``finished``) the two sequences must be equal."""
        la, lb = self.barriers[a], self.barriers[b]
        n = min(len(la), len(lb))
        if la == lb or (not finished and la[:n] == lb[:n]):
            return None
        return (f"barrier divergence in block {self.block_idx}: {self.who(a)} passed {len(la)} "
                f"cuda.syncthreads() calls (lines {la}) but {self.who(b)} passed {len(lb)} (lines {lb}); every "
                "thread of a block must reach the same barriers, so a syncthreads inside an `if` that only "
                "some threads enter, or after an early `return`, hangs or misbehaves on a GPU")

    def early_exit(self, me: int) -> str | None:
        """A message if some thread returned before a barrier that thread ``me`` has passed."""
        gone = [t for t in self.finished if len(self.barriers[t]) < len(self.barriers[me])]
        if not gone:
            return None
        t = min(gone)
        return (f"barrier divergence in block {self.block_idx}: {self.who(t)} returned after "
                f"{len(self.barriers[t])} cuda.syncthreads() calls while {self.who(me)} went on past "
                f"{len(self.barriers[me])}; a `return` before a barrier leaves its shared-memory slots unwritten "
                "and hangs or misbehaves on a GPU: keep every thread until the last barrier and guard only the "
                "memory accesses")

    def check_barriers(self) -> None:
        tids = sorted(self.barriers)
        for tid in tids[1:]:
            msg = self.divergence(tids[0], tid, finished=True)
            if msg:
                raise SanitizerError(msg)

    def access(self, arr: "TrackedShared", element: tuple, write: bool, atomic: bool) -> None:
        me = threading.current_thread().thread_id
        with self.lock:
            epoch = len(self.barriers[me])
            key = (id(arr), element)
            where = f"{arr.label}{list(element)}"
            last = self.writes.get(key)
            if write:
                if not atomic:
                    for reader, r_epoch in self.reads.get(key, {}).items():
                        if reader != me and r_epoch == epoch:
                            self._race(me, reader, f"{self.who(me)} overwrote {where} while {self.who(reader)} "
                                       "may still read it (a missing cuda.syncthreads() before the overwrite)")
                    if last is not None and last[0] != me and last[1] == epoch:
                        self._race(me, last[0], f"{self.who(me)} and {self.who(last[0])} both wrote {where} (a missing "
                                   "cuda.syncthreads() between the writes, or two threads given one index)")
                self.writes[key] = (me, epoch)
                self.reads[key] = {}
            else:
                if last is None:
                    raise SanitizerError(self.early_exit(me) or (
                        f"read of {where} before any thread of block {self.block_idx} wrote it (uninitialised "
                        "shared memory, or a race: a missing cuda.syncthreads() between the write and this read)"))
                if last[0] != me and last[1] == epoch and not atomic:
                    self._race(me, last[0], f"{self.who(me)} read {where}, which {self.who(last[0])} wrote "
                               "(a missing cuda.syncthreads() between the write and the read)")
                self.reads.setdefault(key, {})[me] = epoch

    def _race(self, a: int, b: int, what: str) -> None:
        raise SanitizerError(self.divergence(a, b) or self.early_exit(a) or
                             f"shared-memory race in block {self.block_idx}: {what}; no barrier orders the two "
                             "accesses, so the result depends on which thread runs first")


_block: _Block | None = None


class TrackedShared:
    """A shared array whose element reads and writes are checked by the current :class:`_Block`."""

    def __init__(self, array: np.ndarray, label: str, atomic_file: str):
        self._a = array
        self.label = label
        self._atomic_file = atomic_file
        self.shape, self.dtype, self.size, self.ndim = array.shape, array.dtype, array.size, array.ndim

    def __len__(self) -> int:
        return len(self._a)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._a if dtype is None else self._a.astype(dtype)

    def _elements(self, key: Any) -> list[tuple]:
        parts = key if isinstance(key, tuple) else (key,)
        if len(parts) == self.ndim and all(isinstance(p, (int, np.integer)) for p in parts):
            for p, n in zip(parts, self.shape):
                if not 0 <= p < n:
                    raise IndexError(f"index {list(map(int, parts))} is out of bounds for {self.label} "
                                     f"of shape {self.shape}")
            return [tuple(int(p) for p in parts)]
        flat = np.atleast_1d(np.arange(self.size).reshape(self.shape)[key]).ravel()  # slices and the like
        return [tuple(int(i) for i in np.unravel_index(f, self.shape)) for f in flat]

    def _record(self, key: Any, write: bool) -> None:
        atomic = sys._getframe(2).f_code.co_filename == self._atomic_file
        thread = threading.current_thread()
        elements = self._elements(key)
        for element in elements:
            thread.sanitizer_block.access(self, element, write, atomic)
        if not write:
            thread.traffic[(SHARED_READ, None)] += len(elements)

    def __getitem__(self, key: Any) -> Any:
        self._record(key, write=False)
        return self._a[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._record(key, write=True)
        self._a[key] = value


def _argument_names(kernel: Any) -> list[str]:
    """The positional parameter names of a kernel's Python function ([] when it takes ``*args``)."""
    try:
        params = inspect.signature(kernel).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@contextmanager
def sanitize() -> Iterator[MemoryTraffic]:
    """Check every simulated kernel launched inside the ``with`` block and count its memory traffic (see the
    module docstring); outside the simulator nothing is checked or counted."""
    traffic = MemoryTraffic(measured=CUDA_SIMULATOR)
    if not CUDA_SIMULATOR:
        yield traffic
        return
    from numba.cuda.simulator import kernel as simk
    from numba.cuda.simulator import kernelapi as api
    from numba.cuda.simulator.cudadrv.devicearray import FakeWithinKernelCUDAArray as GlobalArray

    skip = (os.path.dirname(simk.__file__), __file__)
    saved = (simk.BlockManager.run, simk.BlockThread.run, simk.BlockThread.syncthreads, api.FakeCUDAShared.array,
             api.FakeCUDALocal.array, GlobalArray.__getitem__, GlobalArray.__setitem__)
    manager_run, thread_run, syncthreads, shared_array, local_array, global_get, global_set = saved
    argument_of: dict[int, int] = {}  # id of a global array (or a view of one) -> its argument position
    views: list[Any] = []  # keeps the views registered in argument_of alive, so their ids stay unique

    def block_run(self, grid_point, *args):
        global _block
        _block = block = _Block(tuple(int(i) for i in grid_point))
        traffic.names = _argument_names(self._f)
        traffic.grid, traffic.block = tuple(self._grid_dim), tuple(self._block_dim)
        for i, a in enumerate(args):
            if isinstance(a, GlobalArray):
                argument_of[id(a._item)] = i
        try:
            manager_run(self, grid_point, *args)
            _block.check_barriers()
        finally:
            _block = None
            traffic.shared[block.block_idx] = sum(a.size for a in block.shared)

    def thread_start(self):
        self.sanitizer_block = block = _block  # threads of an aborted block may outlive `_block`
        self.traffic = Counter()
        with block.lock:
            block.barriers[self.thread_id] = []
            block.thread_idx[self.thread_id] = tuple(int(i) for i in self.threadIdx)
        try:
            thread_run(self)
        finally:
            block.finished.add(self.thread_id)
            where = (block.block_idx, block.thread_idx[self.thread_id])
            with block.lock:
                traffic.threads.setdefault(where, Counter()).update(self.traffic)

    def count(array: Any, kind: str, n: int) -> None:
        thread = threading.current_thread()
        arg = argument_of.get(id(array._item))
        if arg is not None and hasattr(thread, "traffic"):
            thread.traffic[(kind, arg)] += n

    def read_global(self, idx):
        value = global_get(self, idx)
        if isinstance(value, GlobalArray):  # a view: its elements count when they are read
            if id(self._item) in argument_of:
                argument_of[id(value._item)] = argument_of[id(self._item)]
                views.append(value)
        else:
            count(self, READ, 1)
        return value

    def write_global(self, idx, value):
        global_set(self, idx, value)
        count(self, WRITE, int(np.size(self._item._ary[idx])))

    def allocate_local(self, shape, dtype, alignment=None):
        out = local_array(self, shape, dtype, alignment)
        thread = threading.current_thread()
        if hasattr(thread, "traffic"):
            thread.traffic[(LOCAL, None)] += out.size
        return out

    def barrier(self):
        self.sanitizer_block.barriers[self.thread_id].append(_kernel_line(skip)[1])
        syncthreads(self)

    def allocate(self, shape, dtype, alignment=None):
        if shape == 0:  # dynamic shared memory: one buffer for the whole launch
            return TrackedShared(shared_array(self, shape, dtype, alignment), "dynamic shared array", api.__file__)
        where = _kernel_line(skip)
        found = self._allocations.get(where)
        if found is None:  # like the simulator: one array per allocating line and launch
            dtype = api.numpy_support.as_dtype(dtype) if isinstance(dtype, api.types.Type) else dtype
            found = TrackedShared(np.empty(shape, dtype), f"shared array (line {where[1]})", api.__file__)
            self._allocations[where] = found
        block = threading.current_thread().sanitizer_block
        with block.lock:
            if all(a is not found for a in block.shared):  # the simulator reuses one array for every block
                block.shared.append(found)
        return found

    simk.BlockManager.run, simk.BlockThread.run = block_run, thread_start
    simk.BlockThread.syncthreads, api.FakeCUDAShared.array = barrier, allocate
    api.FakeCUDALocal.array = allocate_local
    GlobalArray.__getitem__, GlobalArray.__setitem__ = read_global, write_global
    try:
        yield traffic
    finally:
        (simk.BlockManager.run, simk.BlockThread.run, simk.BlockThread.syncthreads, api.FakeCUDAShared.array,
         api.FakeCUDALocal.array, GlobalArray.__getitem__, GlobalArray.__setitem__) = saved
