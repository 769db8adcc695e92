"""Clients waiting for a backend slot: one listener's queue in one worker (``queue_timeout_ms``).

Who owns what.  A ``Balancer`` whose listener has a backend with
``max_connections`` builds one ``BackendQueue`` at worker boot.  When every
backend it could try is at its max, its target iterator yields
``BackendQueue.target(remaining_s)``: a ``relay.Target`` with no address and
``queue`` set, which the relay's connect phase (``relay.queued.Queuer``) takes
as "wait here": it joins the FIFO (``push``; ``push_front`` for a waiter that
was woken and lost the slot to another worker, so the order holds), arms the
connection's deadline, and leaves the client socket unread.  A waiter is
woken through the callable it queued (``RelayLoop.resume``), which hands it
back to its own loop; it then asks the same iterator again.

Who wakes whom:

- a slot freed *in this worker* (the balancer's report of an attempt's end,
  on any relay thread of the worker) calls ``slot_freed``: the head is woken
  at once;
- a slot freed *in another worker* is not signalled across processes: each
  waiting connection's timer calls ``poll`` every ``POLL_S`` (the relay arms
  it), and ``poll`` looks, at most once per ``POLL_S`` whoever calls it, at the
  shared counts of the listener's capped addresses (``free``, given by the
  balancer: a few aligned reads, no lock); any below its max wakes the head.

The same class is the listener's own queue (``gate.listener_gate``): a client
that lost a race between workers for the listener's last ``max_connections``
slot (the accept loop stops accepting at the limit, so only such a race gets
past it) waits here, as it would have in the kernel's queue, for up to
``LISTENER_WAIT_S`` (or ``queue_timeout_ms`` when longer), polled only (a
release of a listener slot does not wake it: within ``POLL_S``), and is then
refused 503 ``PR`` ``max_connections`` as before.

FIFO is per worker and listener (SO_REUSEPORT already splits clients between
workers), as HAProxy's queues are per process.  Bounded: ``limit`` waiters
(``QUEUE_LIMIT``); beyond it a client is refused at once.  Refusals are
``admission.verdicts.Reject``s the relay reports through its outcome hook:
503, term ``sQ`` (HAProxy's 's' server side, 'Q' queue phase: refused while
waiting for, or for want of, a server slot), with the reasons
``queue_timeout`` (waited ``queue_timeout_ms``), ``backend_max_connections``
(all full and ``queue_timeout_ms`` 0) or ``queue_full``.
"""

from __future__ import annotations

from typing import Callable, Optional

from prefork_proxy.admission.verdicts import (
    BACKENDS_FULL,
    OVER_LIMIT,
    QUEUE_FULL,
    QUEUE_TERM,
    QUEUE_TIMEOUT,
    Reject,
)
from prefork_proxy.relay import Target
from prefork_proxy.waitqueue import Ticket, WaitQueue

#: How often waiting connections look for slots freed by other workers.
POLL_S = 0.015
#: How long a client that lost the race for the listener's last slot waits at least.
LISTENER_WAIT_S = 10.0
#: Waiters per worker and listener; more are refused at once (``queue_full``).
QUEUE_LIMIT = 10_000


Waker = Callable[[], None]


class BackendQueue:
    """The FIFO of one listener's clients waiting for a backend slot, in one worker."""

    __slots__ = ("label", "timeout_s", "_queue", "_free", "_polled", "timed_out", "full",
                 "none_free")

    def __init__(self, label: str, timeout_s: float, free: Callable[[], bool],
                 limit: int = QUEUE_LIMIT, timed_out: Optional[Reject] = None) -> None:
        self.label = label
        self.timeout_s = timeout_s
        self._queue: WaitQueue[Waker] = WaitQueue(limit)
        self._free = free  # True when some capped address of the listener has a free slot
        self._polled = 0.0
        self.timed_out = timed_out or Reject(OVER_LIMIT, QUEUE_TERM, QUEUE_TIMEOUT,
                                             f"no backend slot within "
                                             f"{timeout_s * 1000:.0f} ms")
        self.full = Reject(OVER_LIMIT, QUEUE_TERM, QUEUE_FULL, f"{limit} clients wait already")
        self.none_free = Reject(OVER_LIMIT, QUEUE_TERM, BACKENDS_FULL,
                                "every backend is at its max_connections")

    def __len__(self) -> int:
        return len(self._queue)

    def target(self, remaining_s: float) -> Target:
        """What the balancer yields when all are full: wait up to ``remaining_s`` here."""
        target = Target(0, None, self.label, max(0.0, remaining_s))
        target.queue = self
        return target

    # -- relay threads of the worker

    def push(self, wake: Waker) -> Optional[Ticket[Waker]]:
        return self._queue.push(wake)

    def push_front(self, ticket: Ticket[Waker]) -> None:
        self._queue.push_front(ticket)

    def cancel(self, ticket: Ticket[Waker]) -> bool:
        return self._queue.cancel(ticket)

    def slot_freed(self) -> None:
        """A slot of one of this listener's backends was freed here: wake the head."""
        if len(self._queue):
            ticket = self._queue.pop()
            if ticket is not None:
                ticket.waiter()

    def poll(self, now: float) -> None:
        """A waiter's timer: at most once per ``POLL_S``, wake the head if a slot is free."""
        if now - self._polled < POLL_S * 0.9 or not len(self._queue):
            return
        self._polled = now
        if self._free():
            self.slot_freed()


__all__ = ["BackendQueue", "LISTENER_WAIT_S", "POLL_S", "QUEUE_LIMIT"]
