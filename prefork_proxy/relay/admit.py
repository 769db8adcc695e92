"""The pre-connect phase on the relay's side: driving a connection's admission.

Owns ``Admitter``: for a connection submitted with an ``admission`` object
(``contract.Admission``; the worker opens one per client from its listener's
pipeline), it reads what the client has already sent (one
speculative ``recv`` at accept), watches the client for reads only while the
verdict still wants bytes, feeds what arrives to ``admission.feed``, arms
the verdict's deadline on the loop's ``TimerHeap`` (``admission.expire``
when it passes), and acts on the verdict: a reject
closes the client (an RST when the verdict says ``abort``) and is told to the
loop's outcome hook; an accept asks the connection's ``choose(verdict)`` for
the targets to try and hands the connection to the connect phase, with the
verdict's ``forward_prefix`` to send first (after the chooser's ``send_first``,
a pool-wide PROXY header, when it set one).  No backend is connected before an
accept.  Only the loop's own thread calls it; a connection without an
admission object never meets it.
"""

from __future__ import annotations

import logging
import select
from typing import TYPE_CHECKING, Optional

from .connection import Connection

if TYPE_CHECKING:  # the loop owns its Admitter; no import at run time
    from .loop import RelayLoop

log = logging.getLogger("prefork_proxy.relay")

#: Bytes read per ``recv`` while admitting: one maximal TLS record and its header
#: (a whole ClientHello), more than any PROXY header (admission.READ_SIZE).
READ_SIZE = 16384 + 5

_IN = select.EPOLLIN


def verdict_kind(verdict: object) -> str:
    """``"accept"``, ``"reject"``, ``"wait"`` or ``"more"``: the verdict's ``kind``, else told
    by its fields (the relay does not import the admission package: see ``contract.Admission``)."""
    kind = getattr(verdict, "kind", None)
    if kind is not None:
        return kind  # type: ignore[no-any-return]
    if hasattr(verdict, "forward_prefix"):
        return "accept"
    if hasattr(verdict, "abort"):
        return "reject"
    if hasattr(verdict, "queue"):
        return "wait"
    return "more"


class Admitter:
    """The admitting phase of one loop's connections (see the module docstring)."""

    def __init__(self, loop: "RelayLoop") -> None:
        self._loop = loop
        self._epoll = loop._epoll
        self._by_fd = loop._by_fd
        self._timers = loop._timers
        # Bound once: connections refer to these same objects.
        self.on_readable = self._on_readable
        self.on_timer = self._on_timer

    def start(self, conn: Connection) -> None:
        """A client just taken in: its first verdict, reading what has arrived already.

        Principle (no epoll round for bytes already here): a client that must
        speak first (a PROXY header, a ClientHello) has usually sent its bytes
        by the time it is accepted (the peer writes as soon as its connect
        completes, and we accept after the handshake), so one ``recv`` before
        watching the client saves registering it, an ``epoll_wait`` round and
        unregistering it again; when nothing is there it costs one ``recv``
        that says EAGAIN.  The bytes go to ``start`` itself (``reads``), so the
        common case decides in one call.  A pipeline that reads nothing (access
        rules, limits) is not read from, decides at ``start`` and never puts
        the client into epoll at all.
        """
        admission = conn.admission
        assert admission is not None
        if admission.reads:
            try:
                data: Optional[bytes] = conn.client.recv(READ_SIZE)
            except BlockingIOError:
                data = None
            except OSError:  # reset already: the client has closed
                data = b""
            if data:
                conn.admitted += len(data)
            verdict = admission.start(conn.started, data)
        else:
            verdict = admission.start(conn.started)
        self._act(conn, verdict)

    def retry(self, conn: Connection) -> None:
        """Woken in the listener's queue after a ``Wait``: the admission once more."""
        self._act(conn, conn.admission.retry())  # type: ignore[union-attr]

    def _watch(self, conn: Connection) -> None:
        conn.handler = self.on_readable
        self._by_fd[conn.client_fd] = conn
        self._epoll.register(conn.client_fd, _IN)
        conn.client_mask = _IN

    def _unwatch(self, conn: Connection) -> None:
        if conn.client_mask:  # only a client whose verdict waited for bytes was watched
            self._epoll.unregister(conn.client_fd)
            conn.client_mask = 0
            self._by_fd.pop(conn.client_fd, None)

    def _on_readable(self, conn: Connection, fd: int, events: int) -> None:
        try:
            data = conn.client.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:  # a reset while we waited: the client has closed
            data = b""
        conn.admitted += len(data)  # bytes from the client, the admission's too
        self._act(conn, conn.admission.feed(data))  # type: ignore[union-attr]

    def _on_timer(self, conn: Connection) -> None:
        self._act(conn, conn.admission.expire())  # type: ignore[union-attr]

    def _act(self, conn: Connection, verdict: object) -> None:
        """Do what the verdict says.  A client is watched (in epoll, for reads) only
        while its verdict wants more bytes: from the first ``more`` on, until the
        verdict changes."""
        kind = verdict_kind(verdict)
        if kind == "more":
            if not conn.client_mask:
                self._watch(conn)
            deadline = verdict.deadline  # type: ignore[attr-defined]
            if deadline is None:
                if conn.deadline:
                    self._timers.cancel(conn)
            elif deadline != conn.deadline:
                self._timers.arm(conn, deadline, self.on_timer)
            return
        if conn.deadline:
            self._timers.cancel(conn)
        if kind == "accept":
            self._accept(conn, verdict)
        elif kind == "wait":
            # Nothing more is read while it waits: its bytes stay in the kernel.
            self._unwatch(conn)
            self._loop._queuer.wait(conn, verdict.queue, None,  # type: ignore[attr-defined]
                                    self.retry)
        else:
            self._reject(conn, verdict)

    def _reject(self, conn: Connection, verdict: object) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("client %s refused: %s %s %s%s", conn.peer or "?",
                     getattr(verdict, "status", "?"), getattr(verdict, "term", "?"),
                     getattr(verdict, "reason", "?"),
                     f" ({verdict.detail})" if getattr(verdict, "detail", "") else "")
        self._loop._report_outcome(conn, verdict)
        self._loop._close(conn, abort=bool(getattr(verdict, "abort", True)))

    def _accept(self, conn: Connection, verdict: object) -> None:
        # The client is not watched while its backend connects: the relay
        # phase registers it again (``RelayLoop._start_relay``).
        self._unwatch(conn)
        choose = conn.choose
        if choose is not None:
            conn.choose = None
            try:
                conn.targets = choose(verdict)
            except Exception as exc:  # a balancer failure while choosing the pool
                log.warning("no backend for client %s: %s", conn.peer or "?", exc)
                self._loop._close(conn)
                return
        # After ``choose``: it may give bytes for whichever backend connects
        # (``send_first``: a pool-wide PROXY header), ahead of the client's own.
        first = getattr(verdict, "send_first", b"")
        prefix = verdict.forward_prefix  # type: ignore[attr-defined]
        conn.prefix = first + prefix if first else prefix
        self._loop._connector.connect_next(conn, None)
