"""The queued state of the connect phase: a client waiting for a backend slot.

Owns ``Queuer``: when a connection's target iterator yields a ``Target`` with
``queue`` set (every backend is at its ``max_connections``; the balancer's
``backend_queue.BackendQueue``), the connection waits in that queue instead of
connecting; likewise when its admission answers a ``Wait`` (it lost a race
between workers for the listener's last ``max_connections`` slot; then it
retries its admission once woken): its ticket is pushed (at the head again if it had one: it was
woken and lost the slot to another worker), its client socket stays in epoll
with no events (a reset still ends the wait; nothing is read, so the first
byte goes to the backend it finally gets), and one timer is armed: the queue
deadline or the next ``poll`` (slots freed by other workers), whichever is
first.  ``resume`` (any thread: whoever freed a slot) hands the connection back
to its loop, which runs the phase that waited again (``Connector.connect_next``
or ``Admitter.retry``).  When
the deadline passes, or the queue is full, or ``timeout_s`` is 0, the client is
refused with the queue's verdict (503 ``sQ``), told to the loop's outcome hook.

Only the loop's own thread calls it, but ``RelayLoop.resume``.  A connection
that never meets a queue target never meets this.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from .connection import Connection

if TYPE_CHECKING:  # the loop owns its Queuer; no import at run time
    from .loop import RelayLoop

log = logging.getLogger("prefork_proxy.relay")

#: How often a waiting connection's timer lets its queue look for slots freed elsewhere.
POLL_S = 0.015


class Waiting:
    """A connection's place in a queue: the queue, its ticket, its deadline."""

    __slots__ = ("queue", "ticket", "deadline", "wake", "resume")

    def __init__(self, queue: Any, deadline: float, wake: Any,
                 resume: Callable[[Connection], None]) -> None:
        self.queue = queue
        self.ticket: Any = None
        self.deadline = deadline
        self.wake = wake  # what the queue calls (any thread): ``RelayLoop.resume(conn)``
        self.resume = resume  # what the loop runs once woken: the phase that waited


class Queuer:
    """The queued state of one loop's connections (see the module docstring)."""

    def __init__(self, loop: "RelayLoop") -> None:
        self._loop = loop
        self._epoll = loop._epoll
        self._by_fd = loop._by_fd
        self._timers = loop._timers
        self.on_event = self._on_event
        self.on_timer = self._on_timer

    def wait(self, conn: Connection, queue: Any, timeout_s: Optional[float],
             resume: Callable[[Connection], None]) -> None:
        """Wait in ``queue`` for at most ``timeout_s`` (None: the queue's own
        ``timeout_s`` from the first wait, the same deadline after), then ``resume(conn)``.

        The connect phase passes a queue target's (the balancer counts the
        time left); the admission phase None (a ``Wait`` verdict).
        """
        now = time.monotonic()
        waiting: Optional[Waiting] = conn.waiting
        if timeout_s is None:
            timeout_s = waiting.deadline - now if waiting is not None else queue.timeout_s
        if timeout_s <= 0:
            verdict = queue.timed_out if waiting is not None or queue.timeout_s > 0 \
                else queue.none_free
            self.refuse(conn, verdict)
            return
        if waiting is None:
            waiting = conn.waiting = Waiting(queue, now + timeout_s,
                                             functools.partial(self._loop.resume, conn),
                                             resume)
            ticket = queue.push(waiting.wake)
            if ticket is None:
                conn.waiting = None
                self.refuse(conn, queue.full)
                return
            waiting.ticket = ticket
        else:  # woken, and the slot went to another worker: first in line again
            waiting.queue, waiting.resume = queue, resume
            waiting.deadline = now + timeout_s
            queue.push_front(waiting.ticket)
        conn.handler = self.on_event
        self._by_fd[conn.client_fd] = conn
        # No events asked: an error or hang-up of the client is still reported.
        self._epoll.register(conn.client_fd, 0)
        self._arm(conn, waiting, now)

    def _arm(self, conn: Connection, waiting: Waiting, now: float) -> None:
        self._timers.arm(conn, min(waiting.deadline, now + POLL_S), self.on_timer)

    def _leave(self, conn: Connection) -> None:
        """Out of the wait: the client is no longer watched (the relay phase registers it)."""
        self._by_fd.pop(conn.client_fd, None)
        try:
            self._epoll.unregister(conn.client_fd)
        except OSError:
            pass
        if conn.deadline:
            self._timers.cancel(conn)

    def _on_event(self, conn: Connection, fd: int, events: int) -> None:
        """The client reset (or hung up) while it waited: it is gone."""
        waiting = conn.waiting
        if waiting is not None and not waiting.queue.cancel(waiting.ticket):
            waiting.queue.slot_freed()  # it was woken already: the wake-up passes on
        conn.waiting = None
        self._loop._close(conn, abort=True, term="CQ")

    def _on_timer(self, conn: Connection) -> None:
        waiting = conn.waiting
        assert waiting is not None
        now = time.monotonic()
        if now >= waiting.deadline:
            if waiting.queue.cancel(waiting.ticket):
                conn.waiting = None
                self._leave(conn)
                self.refuse(conn, waiting.queue.timed_out)
                return
            # Woken already (its resume is on the way): it gets the slot.
            return
        waiting.queue.poll(now)
        if not conn.closed and conn.waiting is waiting and conn.handler is self.on_event \
                and not conn.deadline:
            self._arm(conn, waiting, now)

    def resumed(self, conn: Connection) -> None:
        """The loop's thread, after ``RelayLoop.resume``: ask the iterator again."""
        waiting = conn.waiting
        if conn.closed or waiting is None:
            if waiting is not None:
                waiting.queue.slot_freed()  # it left meanwhile: the next one gets the slot
            return
        self._leave(conn)
        conn.handler = None
        waiting.resume(conn)
        if conn.waiting is waiting and conn.handler is not self.on_event:
            conn.waiting = None  # it did not queue again: done with the queue

    def refuse(self, conn: Connection, verdict: Any) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("client %s refused: %s %s %s (%s)", conn.peer or "?",
                     getattr(verdict, "status", "?"), getattr(verdict, "term", "?"),
                     getattr(verdict, "reason", "?"), getattr(verdict, "detail", ""))
        conn.waiting = None
        self._loop._report_outcome(conn, verdict)
        self._loop._close(conn, abort=bool(getattr(verdict, "abort", True)))
