"""What the relay asks of the outside world, and what it tells it.

Owns the types that cross the relay's boundary, so that the worker and the
balancer import these and never the loop's internals:

- ``StreamSocket``: the socket class the relay takes (``_socket.socket``).
- ``SocketOptions``: socket options as data, set on each backend socket.
- ``Target``: one backend address to try, from the balancer's iterator, and
  ``CONNECTED``/``FAILED``/``RELEASED``: the outcomes ``Target.report`` hears.
- ``Acceptor``: what the loop that watches the listeners needs from its worker.
- ``Admission``, ``Chooser``, ``OutcomeHook``: the pre-connect phase's hooks
  (one admission object per client, given to ``RelayLoop.submit`` by the
  worker from its listener's pipeline; see prefork_proxy/admission/pipeline.py,
  which the relay never imports, and ``gate``, which builds them).

The balancer builds ``Target``s on a relay thread (drawn lazily while the loop
connects) and hears their reports on that same thread; the worker's
``Acceptor`` methods run on the accepting loop's thread.  Nothing here blocks
or imports beyond the standard library.
"""

from __future__ import annotations

import socket
from _socket import socket as StreamSocket
from typing import Any, Callable, Iterator, List, Optional, Protocol, Tuple

__all__ = ["StreamSocket", "SocketOptions", "Target", "CONNECTED", "FAILED", "RELEASED",
           "Acceptor", "Admission", "Chooser", "OutcomeHook", "LoopStatsHooks"]

# ``StreamSocket`` is ``_socket.socket``, the C class that ``socket.socket``
# extends with Python-level bookkeeping (``makefile`` reference counts, enum
# conversions).  The relay uses none of it, and making and closing two plain
# C sockets per connection instead saves a few microseconds each.  Anything
# ``socket.socket`` is accepted too: it is a subclass.

#: Socket options as data, ``(level, name, value)`` each, for ``setsockopt``.
SocketOptions = Tuple[Tuple[int, int, int], ...]

#: Outcomes of one connect attempt, passed to ``Target.report``.
CONNECTED, FAILED, RELEASED = "connected", "failed", "released"


class Target:
    """One backend address to try: the resolved socket address and the name to log.

    ``timeout_s``, when set, bounds this attempt instead of the connection's
    timeout (the balancer spends a budget across attempts).  ``report``, when
    set, hears how the attempt went, on the relay thread (it must not block):
    ``CONNECTED`` once connected (``report(CONNECTED, "", connect_s)``: with
    the seconds since ``connect()`` was called), then exactly one of ``FAILED`` with the reason
    (the backend could not be reached) or ``RELEASED`` (the connection ended,
    or the attempt was abandoned for a reason of ours, not the backend's).

    ``sockaddr`` None makes a pause, not an attempt: nothing to connect to
    yet (the balancer's hostnames are not resolved yet).  The loop then waits
    ``timeout_s`` without a socket, on its connect-deadline heap, and asks the
    iterator again; the balancer bounds how long it keeps answering pauses.

    ``slot``: the backend's slot in the shared tables (``shared.BackendTable``),
    -1 when unknown; told to ``LoopStatsHooks.on_close``.

    ``send_prefix``: bytes this backend gets before anything from the client
    (a PROXY header for a ``send_proxy`` backend, built by the balancer per
    backend, so it stays right across failover); sent once connected, ahead
    of an admission verdict's ``forward_prefix``.

    ``queue`` (set only on a target with no ``sockaddr``): not a pause but
    "every backend is full: wait in this queue for at most ``timeout_s``"
    (``queued.Queuer``; the object is a ``backend_queue.BackendQueue``, which
    the relay only calls: push/push_front/cancel/poll and its refusals).

    Immutable by convention; a plain slotted class rather than a dataclass
    because one is made per connection and held for its whole life.
    """

    __slots__ = ("family", "sockaddr", "name", "timeout_s", "report", "send_prefix", "queue",
                 "slot")

    def __init__(self, family: int, sockaddr: Optional[tuple], name: str,
                 timeout_s: Optional[float] = None,
                 report: Optional[Callable[..., None]] = None,
                 send_prefix: bytes = b"", slot: int = -1) -> None:
        self.family = family
        self.sockaddr = sockaddr
        self.name = name
        self.timeout_s = timeout_s
        self.report = report
        self.send_prefix = send_prefix
        self.queue: Any = None
        self.slot = slot

    def __repr__(self) -> str:
        return f"Target({self.name!r}, {self.sockaddr!r}, timeout_s={self.timeout_s!r})"


class Acceptor(Protocol):
    """What a relay loop that accepts needs from its worker (``Worker`` is one)."""

    def listening_sockets(self) -> List[socket.socket]:
        """The listeners to watch; asked once, when the loop starts."""

    def accept_ready(self, sock: socket.socket,
                     force: bool) -> Optional[Tuple[Any, ...]]:
        """Accept what ``sock`` has queued, handing clients to loops with ``submit``.

        Runs on the loop's thread.  Returns None to keep watching, or
        ``(pause_s, force_next)`` to stop watching the listeners for
        ``pause_s`` and then, if ``force_next``, pass ``force=True`` once;
        ``(pause_s, False, True)`` stops watching ``sock`` alone for ``pause_s``
        (a listener at its ``max_connections``: its clients wait in the kernel
        queue while the other listeners go on).
        """



class Admission(Protocol):
    """One connection's pre-connect phase, as the relay drives it (``admit.Admitter``).

    ``prefork_proxy.admission.Admission`` is one.  Every call runs on the
    connection's relay thread and must not block.  A verdict is told apart by
    its fields: an accept has ``forward_prefix`` (and ``route``,
    ``client_address``, ``destination``), a reject has ``abort`` (and
    ``status``, ``term``, ``reason``, ``detail``), anything else is "need
    more", with ``deadline`` (monotonic seconds, or None).
    """

    #: Whether a step may wait for client bytes: the relay then reads once at
    #: accept and passes what came to ``start`` (else it never reads before
    #: the verdict).
    reads: bool

    def start(self, now: Optional[float] = None, first: Optional[bytes] = None) -> Any:
        """The first verdict, at accept; ``first``: bytes read at accept (None: none were
        there; ``b""``: the client closed), passed only when ``reads``."""

    def feed(self, data: bytes) -> Any:
        """Bytes read from the client (``b""``: it closed); the new verdict."""

    def expire(self) -> Any:
        """The deadline passed: a reject."""

    def release(self) -> bool:
        """At close, exactly once per connection: give back what admission holds."""


#: ``choose(accept_verdict)``: the targets to try for an accepted client (the
#: balancer of the verdict's route); runs on the relay thread, never blocks.
Chooser = Callable[[Any], Iterator[Target]]

#: ``on_outcome(peer, admission, verdict)``: a connection refused by its
#: admission (the verdict is the reject), told before its client is closed.
OutcomeHook = Callable[[str, Any, Any], None]


class LoopStatsHooks(Protocol):
    """One relay loop's counters, as the loop writes them (``rows.LoopStats`` is one).

    Given to ``RelayLoop(stats=...)`` by the worker, one per loop; only that
    loop's thread writes them.  ``cells`` is a writable sequence of integers;
    ``base(listener_slot)`` is where a listener's cells start (once per
    connection); bytes are added as they move at ``base + RECEIVED`` (from
    the client) and ``base + SENT`` (to the client); ``on_close`` is called
    once per connection, on every path, and ``on_reject`` before it for a
    client refused by its admission (``reason``: the verdict's).
    """

    cells: Any
    RECEIVED: int
    SENT: int

    def base(self, lslot: int) -> int: ...

    def on_close(self, base: int, backend_slot: int, bytes_in: int, bytes_out: int,
                 duration_s: float) -> None: ...

    def on_reject(self, base: int, reason: str) -> None: ...
