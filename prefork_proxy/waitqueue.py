"""The FIFO of clients waiting for a backend slot (``queue_timeout_ms``): per worker, listener.

Who owns what: one ``WaitQueue`` per listener in a worker, shared by that
worker's relay loops (threads).  A loop ``push``es a connection when every
backend is at its ``max_connections`` and keeps the returned ticket on the
connection; whoever frees a slot ``pop``s the oldest waiter and hands it to
its loop; a waiter that times out or goes away is ``cancel``led through its
ticket (lazily: it is skipped when it reaches the head, so a cancel is O(1)).
A waiter that lost the freed slot to another process goes back to the head
with ``push_front``, so the order holds.  See docs/admission-queue.md for the
rest of the design (nothing is read from a waiting client; remote releases).

Used by ``backend_queue.BackendQueue`` (one per listener with a capped
backend, per worker).  Pure bookkeeping: no sockets, no clock.
"""

from __future__ import annotations

import collections
import threading
from typing import Deque, Generic, Optional, TypeVar

T = TypeVar("T")


class Ticket(Generic[T]):
    """A place in the queue: the waiter, and whether it still waits."""

    __slots__ = ("waiter", "waiting")

    def __init__(self, waiter: T) -> None:
        self.waiter = waiter
        self.waiting = True


class WaitQueue(Generic[T]):
    """A bounded FIFO, safe across the threads of one process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: Deque[Ticket[T]] = collections.deque()
        self._waiting = 0  # tickets still waiting (the deque also holds cancelled ones)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._waiting

    def push(self, waiter: T) -> Optional[Ticket[T]]:
        """Join at the tail: a ticket, or None when ``limit`` clients already wait."""
        with self._lock:
            if self._waiting >= self.limit:
                return None
            ticket = Ticket(waiter)
            self._entries.append(ticket)
            self._waiting += 1
            self._trim()
            return ticket

    def push_front(self, ticket: Ticket[T]) -> None:
        """Back to the head (the slot it was woken for went elsewhere); over the limit is fine."""
        with self._lock:
            ticket.waiting = True
            self._entries.appendleft(ticket)
            self._waiting += 1

    def pop(self) -> Optional[Ticket[T]]:
        """The oldest ticket still waiting (now no longer waiting), or None."""
        with self._lock:
            entries = self._entries
            while entries:
                ticket = entries.popleft()
                if ticket.waiting:
                    ticket.waiting = False
                    self._waiting -= 1
                    return ticket
            return None

    def cancel(self, ticket: Ticket[T]) -> bool:
        """It stops waiting (timed out, closed): True if it was waiting."""
        with self._lock:
            if not ticket.waiting:
                return False
            ticket.waiting = False
            self._waiting -= 1
            self._trim()
            return True

    def _trim(self) -> None:
        # Cancelled tickets wait in the deque until they reach the head; drop the
        # ones at the head now, and compact when they outnumber the waiting, so
        # memory stays bounded by about twice the waiters.
        entries = self._entries
        while entries and not entries[0].waiting:
            entries.popleft()
        if len(entries) > 2 * self._waiting + 64:
            self._entries = collections.deque(t for t in entries if t.waiting)
