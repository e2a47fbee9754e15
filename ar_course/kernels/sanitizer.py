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
Problems are raised as :class:`SanitizerError`. Outside the simulator :func:`sanitize` does nothing.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from .env import CUDA_SIMULATOR


class SanitizerError(Exception):
    """A synchronisation or shared-memory bug found while a kernel ran in the simulator."""


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
        block = threading.current_thread().sanitizer_block
        for element in self._elements(key):
            block.access(self, element, write, atomic)

    def __getitem__(self, key: Any) -> Any:
        self._record(key, write=False)
        return self._a[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._record(key, write=True)
        self._a[key] = value


@contextmanager
def sanitize() -> Iterator[None]:
    """Check every simulated kernel launched inside the ``with`` block (a no-op outside the simulator)."""
    if not CUDA_SIMULATOR:
        yield
        return
    from numba.cuda.simulator import kernel as simk
    from numba.cuda.simulator import kernelapi as api

    skip = (os.path.dirname(simk.__file__), __file__)
    saved = (simk.BlockManager.run, simk.BlockThread.run, simk.BlockThread.syncthreads, api.FakeCUDAShared.array)
    manager_run, thread_run, syncthreads, shared_array = saved

    def block_run(self, grid_point, *args):
        global _block
        _block = _Block(tuple(int(i) for i in grid_point))
        try:
            manager_run(self, grid_point, *args)
            _block.check_barriers()
        finally:
            _block = None

    def thread_start(self):
        self.sanitizer_block = block = _block  # threads of an aborted block may outlive `_block`
        with block.lock:
            block.barriers[self.thread_id] = []
            block.thread_idx[self.thread_id] = tuple(int(i) for i in self.threadIdx)
        try:
            thread_run(self)
        finally:
            block.finished.add(self.thread_id)

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
        return found

    simk.BlockManager.run, simk.BlockThread.run = block_run, thread_start
    simk.BlockThread.syncthreads, api.FakeCUDAShared.array = barrier, allocate
    try:
        yield
    finally:
        simk.BlockManager.run, simk.BlockThread.run, simk.BlockThread.syncthreads, api.FakeCUDAShared.array = saved
