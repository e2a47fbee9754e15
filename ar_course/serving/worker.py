"""An :class:`~ar_course.serving.Engine` on its own thread, fed by other threads (an HTTP server's event loop).

Only the worker thread touches the engine. :meth:`EngineWorker.submit` queues a request and returns a
:class:`Ticket` whose ``events`` queue receives ``("token", id)`` for every new token and exactly one final
``("end", reason)``: ``"length"`` (all tokens made), ``"timeout"`` (the request ran past its deadline),
``"cancelled"`` (the client went away, or the server shut down before the request finished). Instead of the
``"end"``, a request the engine refuses when it is added (a bad prompt, seed or length: the client's fault) gets
``("error", message)``, and a request in flight when an engine step fails (the server's fault) gets
``("failed", message)``. So no request is ever dropped silently. The number of requests in flight is bounded:
:class:`QueueFull` past ``max_pending``.

The worker can run for as long as a server does: it releases each request from the engine once its final event
is sent, and keeps the engine's step history to the newest :data:`HISTORY` steps (unless the engine was built with
a ``max_history`` of its own).

One client's request cannot break the others: :meth:`~ar_course.serving.Engine.add_request` checks everything a
request brings to a step (its tokens, lengths, seed and :class:`~ar_course.sampling.SamplingConfig`, and the
sampler works for every config that can be made), so a step fails only for reasons of the whole batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ar_course.sampling import SamplingConfig
from ar_course.serving.engine import Engine
from ar_course.utils import check_int, check_number

HISTORY = 1024
"""Step records a worker's engine keeps when it was built without ``max_history``."""


class QueueFull(RuntimeError):
    """The worker already holds ``max_pending`` requests."""


class ShuttingDown(RuntimeError):
    """The worker no longer accepts requests."""


@dataclass
class Ticket:
    """A submitted request as its submitter sees it: ``events`` receives ``(kind, value)`` pairs (see the module
    docstring); ``deliver`` (default: ``events.put``) is how the worker thread hands them over, e.g. through an
    event loop's ``call_soon_threadsafe``."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    seed: int | None
    deadline: float
    events: queue.Queue = field(default_factory=queue.Queue)
    deliver: Callable[[tuple[str, object]], None] | None = None
    cancelled: bool = False
    request_id: int | None = None

    def send(self, kind: str, value: object) -> None:
        """Hand ``(kind, value)`` to the submitter through ``deliver``, else ``events.put``."""
        (self.deliver or self.events.put)((kind, value))


def check_engine(engine: object) -> Engine:
    """``engine`` if it is an :class:`~ar_course.serving.Engine` (which checked its model when built); else a
    ``TypeError`` (e.g. a model passed where its engine belongs)."""
    if not isinstance(engine, Engine):
        raise TypeError(f"engine must be an Engine (Engine(model, config)), got {type(engine).__name__}")
    return engine


class EngineWorker:
    """Runs ``engine`` on a daemon thread; :meth:`submit` from any thread, :meth:`shutdown` to stop.

    Raises:
        TypeError: ``engine`` is not an :class:`~ar_course.serving.Engine` (build one from the model: the engine
            checks that it is a text model), or ``max_pending`` / ``timeout_s`` is not a number of its kind.
        ValueError: ``max_pending < 1`` or ``timeout_s`` not a finite number ``> 0``."""

    def __init__(self, engine: Engine, max_pending: int = 64, timeout_s: float = 60.0):
        self.engine = check_engine(engine)
        if engine.history.maxlen is None:
            engine.history = deque(engine.history, maxlen=HISTORY)
        self.max_pending = check_int("max_pending", max_pending, lo=1)
        self.timeout_s = check_number("timeout_s", timeout_s, lo=0, lo_open=True)
        self._inbox: queue.Queue[Ticket] = queue.Queue()
        self._live: dict[int, Ticket] = {}
        self._pending = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._accepting, self._stop = True, False
        self.completed: dict[str, int] = {"length": 0, "timeout": 0, "cancelled": 0}
        self._thread = threading.Thread(target=self._run, name="ar-course-engine", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Requests submitted and not ended yet (queued or in the engine); :class:`QueueFull` at ``max_pending``."""
        return self._pending

    def submit(self, prompt: list[int], max_new_tokens: int, *,
               sampling: SamplingConfig = SamplingConfig(temperature=0.0), seed: int | None = None,
               timeout_s: float | None = None, deliver: Callable | None = None) -> Ticket:
        """Queue a request, greedy by default like :meth:`Engine.add_request` (checked by the engine when the worker
        adds it: an invalid one ends at once with ``("error", message)``; :meth:`Engine.check_request` checks it
        beforehand). ``timeout_s``: this request's deadline in seconds (None: the worker's; 0: already due).

        Raises:
            QueueFull, ShuttingDown: see their names.
            TypeError, ValueError: ``timeout_s`` is not a finite number ``>= 0``."""
        timeout_s = self.timeout_s if timeout_s is None else check_number("timeout_s", timeout_s, lo=0)
        ticket = Ticket(prompt, max_new_tokens, sampling, seed, time.monotonic() + timeout_s, deliver=deliver)
        with self._lock:  # the slot is taken last: nothing above can leave it taken
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if self._pending >= self.max_pending:
                raise QueueFull(f"{self._pending} requests in flight (max {self.max_pending})")
            self._pending += 1
        self._inbox.put(ticket)
        self._wake.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Ask the worker to stop ``ticket`` (a client that went away); it ends with ``"cancelled"``."""
        ticket.cancelled = True
        self._wake.set()

    def shutdown(self, drain_s: float = 10.0) -> dict[str, int]:
        """Stop accepting, let requests in flight finish for up to ``drain_s`` seconds, cancel the rest (each
        gets its ``("end", "cancelled")``), stop the thread. Returns a copy of :attr:`completed`."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + drain_s
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        return dict(self.completed)

    # -------------------------------------------------------------------------------------- the worker thread

    def _end(self, ticket: Ticket, kind: str, reason: str) -> None:
        """Send ``ticket``'s final event; its engine request (cancelled by the caller if it had not ended) is
        released."""
        if ticket.request_id is not None:
            self._live.pop(ticket.request_id, None)
            self.engine.release(ticket.request_id)
        if kind == "end":
            self.completed[reason] += 1
        ticket.send(kind, reason)
        with self._lock:
            self._pending -= 1

    def _admit_inbox(self) -> None:
        while True:
            try:
                ticket = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                rid = self.engine.add_request(ticket.prompt, ticket.max_new_tokens, sampling=ticket.sampling,
                                              seed=ticket.seed)
            except (ValueError, TypeError) as exc:
                self._end(ticket, "error", str(exc))
                continue
            ticket.request_id = rid
            self._live[rid] = ticket
            if self.engine.requests[rid].status == "finished":  # max_new_tokens == 0
                self._end(ticket, "end", "length")

    def _expire(self, stop_all: bool) -> None:
        now = time.monotonic()
        for rid, ticket in list(self._live.items()):
            reason = "cancelled" if ticket.cancelled or stop_all else "timeout" if now > ticket.deadline else None
            if reason is not None:
                self.engine.cancel(rid)
                self._end(ticket, "end", reason)

    def _run(self) -> None:
        while True:
            self._admit_inbox()
            self._expire(stop_all=self._stop)
            if self._stop:
                while not self._inbox.empty():  # submitted before shutdown, never admitted
                    self._end(self._inbox.get_nowait(), "end", "cancelled")
                return
            if not self.engine.has_work:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - the worker goes on
                # A step runs every scheduled request in one forward pass, and each request was checked when it
                # was added (the module docstring): a failure here (out of memory, a device error) is the batch's,
                # not one request's, and it may have left any of them half-advanced. So all of them end.
                for rid, ticket in list(self._live.items()):
                    self.engine.cancel(rid)
                    self._end(ticket, "failed", f"engine error: {exc}")
                continue
            for rid, token in events:
                ticket = self._live.get(rid)
                if ticket is None:
                    continue
                ticket.send("token", token)
                if self.engine.requests[rid].status == "finished":
                    self._end(ticket, "end", "length")
