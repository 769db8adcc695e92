"""The connect phase: a non-blocking connect per target, failover, deadlines.

Owns ``Connector``: for each connection of one ``RelayLoop``, it draws targets
from the balancer's iterator, connects without blocking, arms the attempt's
deadline (or a pause's) on the loop's ``TimerHeap``, fails over to the next
target on refusal, error or timeout, reports each attempt's outcome to its
``Target.report``, and hands a connected backend to the loop's relay phase
(``RelayLoop._start_relay``).  Also the helpers for backend socket options.
Only the loop's own thread calls it.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from typing import TYPE_CHECKING, Optional

from .connection import Connection
from .contract import CONNECTED, FAILED, RELEASED, SocketOptions, StreamSocket

if TYPE_CHECKING:  # the loop owns its Connector; no import at run time
    from .loop import RelayLoop

log = logging.getLogger("prefork_proxy.relay")

_OUT = select.EPOLLOUT
_ERROR = select.EPOLLERR | select.EPOLLHUP
_SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
_STREAM_NONBLOCK = int(socket.SOCK_STREAM) | _SOCK_NONBLOCK  # plain ints: no enum arithmetic
_TCP_FAMILIES = frozenset((int(socket.AF_INET), int(socket.AF_INET6)))
#: How a loopback host begins, as ``getaddrinfo`` spells it (127.0.0.0/8, also mapped
#: into IPv6); ``::1`` is the other one.  A plain prefix test: it runs per connection.
_LOOPBACK_PREFIXES = ("127.", "::ffff:127.")
#: ``Connection.connect_s`` of a connected connection when no access log reads it.
CONNECTED_UNTIMED = 0.0


def keepalive_options(idle_s: Optional[int] = None, interval_s: Optional[int] = None,
                      count: Optional[int] = None) -> SocketOptions:
    """SO_KEEPALIVE on, with the timings given (``None``: the kernel's default)."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", interval_s),
                        ("TCP_KEEPCNT", count)):
        if value is not None and hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return tuple(options)


def _established(backend: StreamSocket) -> bool:
    """Whether a non-blocking connect that said EINPROGRESS is done already.

    Asked only of loopback backends.  There the kernel runs the whole
    handshake inside ``connect()`` itself (the SYN, the SYN-ACK and the ACK are
    delivered on the calling CPU before the call returns), so the socket is
    usually established by the time EINPROGRESS comes back; ``getpeername``
    says so in one system call (ENOTCONN while the handshake is still under
    way, or if it failed: then epoll reports it as for any other backend).
    That saves registering the socket for writes, the epoll round that
    reports it and the change to reads: one system call and one event per
    connection.  A remote backend would nearly always answer ENOTCONN: it is
    not asked.
    """
    try:
        backend.getpeername()
    except OSError:
        return False
    return True


def apply_options(sock: StreamSocket, options: SocketOptions) -> None:
    for level, name, value in options:
        sock.setsockopt(level, name, value)


class Connector:
    """The connect phase of one loop's connections (see the module docstring).

    ``connect_next`` starts (or moves on to) an attempt; ``on_ready`` is the
    connection's event handler while its backend socket connects; ``on_timer``
    runs when the attempt's deadline (or a pause) is over.
    """

    def __init__(self, loop: "RelayLoop") -> None:
        self._loop = loop
        self._epoll = loop._epoll
        self._by_fd = loop._by_fd
        self._to_close = loop._to_close
        self._timers = loop._timers
        # Bound once: a connection refers to these, and refers to the same objects.
        self.on_ready = self._on_ready
        self.on_timer = self._on_timer

    def connect_next(self, conn: Connection, reason: Optional[str],
                     backend_failed: bool = True, term: str = "SC") -> None:
        """Start connecting to the next target, or give up and close the client.

        ``term`` says how the attempt that failed ended, for the access log
        (``SC`` refused or an error, ``sC`` timed out).
        """
        if conn.target is not None:
            conn.fail_term = term
            log.warning("backend %s unreachable for client %s: %s", conn.target.name,
                        conn.peer or "?", reason)
            self.report(conn, FAILED if backend_failed else RELEASED, reason or "")
        if conn.backend is not None:
            self._forget_backend(conn)
        try:
            target = next(conn.targets, None) if conn.targets is not None else None
        except Exception as exc:  # a balancer failure while choosing the next backend
            log.warning("no backend for client %s: %s", conn.peer or "?", exc)
            target = None
        if target is None:
            self._loop._close(conn)
            return
        if target.sockaddr is None:  # a pause (see Target): ask again after it
            if target.queue is not None:  # every backend full: wait for a slot
                self._loop._queuer.wait(conn, target.queue, target.timeout_s,
                                        self.connect_again)
                return
            self._timers.arm(conn, time.monotonic() + (target.timeout_s or 0.0),
                             self.on_timer)
            return
        conn.target = target
        conn.attempts += 1
        conn.tried = target.name if conn.tried is None else f"{conn.tried},{target.name}"
        try:
            # Non-blocking from birth where the flag exists: one system call fewer.
            backend = StreamSocket(target.family, _STREAM_NONBLOCK)
        except OSError as exc:  # EMFILE/ENFILE: out of descriptors for this one
            self.connect_next(conn, f"cannot create a socket: {exc.strerror}",
                              backend_failed=False)
            return
        if not _SOCK_NONBLOCK:
            backend.setblocking(False)
        conn.backend = backend
        conn.backend_fd = backend.fileno()
        tcp = target.family in _TCP_FAMILIES
        if tcp:
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if conn.options:
                apply_options(backend, conn.options)
        sockaddr = target.sockaddr
        code = backend.connect_ex(sockaddr)
        if code not in (0, errno.EINPROGRESS):
            self.connect_next(conn, os.strerror(code))
            return
        now = conn.attempt_at = time.monotonic()  # the connect time is measured from here
        self._by_fd[conn.backend_fd] = conn
        if not code or tcp and (sockaddr[0].startswith(_LOOPBACK_PREFIXES)
                                or sockaddr[0] == "::1") and _established(backend):
            # Connected already: no epoll round, no deadline to arm and cancel,
            # and the backend is registered once, for reads, by the relay phase.
            self._connected(conn)
            return
        self._timers.arm(conn, now + self.attempt_timeout(conn), self.on_timer)
        conn.handler = self.on_ready
        self._epoll.register(conn.backend_fd, _OUT)
        conn.backend_mask = _OUT

    def connect_again(self, conn: Connection) -> None:
        """Woken in a backend queue (``queued``): ask the targets again."""
        self.connect_next(conn, None)

    def _forget_backend(self, conn: Connection) -> None:
        """Drop a backend socket that failed to connect (its fd closes after this batch)."""
        backend = conn.backend
        assert backend is not None
        if conn.backend_mask:
            self._epoll.unregister(conn.backend_fd)
            conn.backend_mask = 0
        self._by_fd.pop(conn.backend_fd, None)
        self._to_close.append(backend)
        conn.backend = None
        conn.backend_fd = -1

    def _on_ready(self, conn: Connection, fd: int, events: int) -> None:
        backend = conn.backend
        assert backend is not None
        if events & _ERROR:
            # Only then can the connect have failed: on success epoll reports
            # the socket writable and nothing else, which saves a system call
            # per connection.
            code = backend.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.connect_next(conn, os.strerror(code))
                return
        self._timers.cancel(conn)
        self._connected(conn)

    def _connected(self, conn: Connection) -> None:
        """The backend socket is connected (epoll said so, or it was at once): relay."""
        conn.targets = None  # connected: no failover from here on
        connect_s = time.monotonic() - conn.attempt_at
        self.report(conn, CONNECTED, "", connect_s)
        # What an idle connection keeps holds no float it does not need (24 bytes
        # each): the attempt's start is done with, and the connect time is kept
        # only for the access log, its one reader (else the shared constant:
        # "connected, not timed").
        conn.attempt_at = 0.0
        conn.connect_s = connect_s if self._loop._access is not None else CONNECTED_UNTIMED
        if log.isEnabledFor(logging.DEBUG):
            log.debug("client %s connected to backend %s", conn.peer or "?", conn.target.name)
        # Bytes the backend gets first: a per-backend header, then what the
        # admission read from the client (both b"" without them).
        self._loop._start_relay(conn, conn.target.send_prefix + conn.prefix)

    def _on_timer(self, conn: Connection) -> None:
        """The attempt's deadline passed (or a pause is over): the next target."""
        reason = None
        if conn.target is not None:
            reason = f"connect timed out after {self.attempt_timeout(conn) * 1000:.0f} ms"
        self.connect_next(conn, reason, term="sC")

    @staticmethod
    def attempt_timeout(conn: Connection) -> float:
        target = conn.target
        return conn.timeout_s if target is None or target.timeout_s is None else target.timeout_s

    @staticmethod
    def report(conn: Connection, outcome: str, reason: str = "",
               connect_s: Optional[float] = None) -> None:
        """Tell the target's balancer how its attempt went; the final outcome only once.

        ``CONNECTED`` comes with the connect time (seconds since ``connect()``
        was called): ``report(CONNECTED, "", connect_s)``.
        """
        target = conn.target
        if outcome != CONNECTED:
            conn.target = None
        if target is not None and target.report is not None:
            try:
                if connect_s is None:
                    target.report(outcome, reason)
                else:
                    target.report(outcome, reason, connect_s)
            except Exception:  # bookkeeping must never cost the connection
                log.exception("reporting %s for backend %s failed", outcome, target.name)
