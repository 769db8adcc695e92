"""The admin HTTP server: one selector loop in its own thread, bounded against hostile clients.

Who owns what: the caller (the master, later) binds and listens on the socket
and gives it to ``AdminServer`` with a routing table ``{path: handler}``; a
handler gets the parsed ``Request`` and returns ``(status, content_type,
body)``.  ``start()`` runs the loop in a daemon thread named ``admin-http``;
that thread is the only one that touches the admin connections.  It shares
nothing with relay threads (they live in the workers): a handler reads what it
needs (shared memory, the master's model) and must return quickly, since it
runs on the loop.  A handler that raises is answered 500 and logged; the loop
goes on.

Bounded by construction, so a slow or hostile client cannot stall others or
grow memory:

- each connection buffers at most ``head_limit`` bytes of request head (reads
  never ask for more), a head that does not fit is answered 431 at the limit;
- a connection has ``header_timeout`` seconds from accept to send a complete
  head (slowloris), then ``send_timeout`` to take the response, then at most
  ``linger_timeout`` seconds and ``LINGER_BYTES`` of discarded input before the
  socket is closed (reading what the client still sends after the response, so
  the close does not turn into a reset that destroys the response in flight);
- at most ``max_connections`` are open: a new one evicts the oldest connection
  that has not sent a head yet (else the oldest one lingering), so idle attackers
  cannot lock out a scrape; if every slot is busy answering, the new one is
  closed at once;
- every response carries ``Connection: close``: one request per connection.

Only GET and HEAD are served (405 otherwise), unknown paths are 404, a bad head
is 400 (431 too large, 505 bad version).  ``stats`` counts what happened (for
the tests and, later, the admin's own metrics); only the loop thread writes it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import selectors
import socket
import threading
import time
from http import HTTPStatus
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

from prefork_proxy.admin.httphead import (
    DEFAULT_HEAD_LIMIT,
    BadRequest,
    Request,
    parse_request_head,
)

log = logging.getLogger("prefork_proxy.admin")

Response = Tuple[int, str, bytes]
Handler = Callable[[Request], Response]

#: Most input discarded from one connection after its response, before closing.
LINGER_BYTES = 64 * 1024
#: Most connections accepted per wake-up, so a connect flood cannot starve reads.
ACCEPT_BATCH = 64
#: Pause in accepting after accept itself fails (out of descriptors): the listener
#: stays readable, so retrying at once would spin the loop.
ACCEPT_PAUSE_S = 0.1
_READING, _WRITING, _LINGERING = "reading", "writing", "lingering"
_STATUS_OF_REASON = {"too_large": 431, "bad_version": 505}
_TEXT = "text/plain; charset=utf-8"
_FIELD_VALUE = re.compile(r"[\x21-\x7e]([ \x21-\x7e]*[\x21-\x7e])?")


def is_loopback(sockaddr: Union[Tuple, str, bytes]) -> bool:
    """True if ``sockaddr`` (as ``getsockname`` gives it) is reachable only from this host.

    A Unix socket path counts as local; ``0.0.0.0``/``::`` and names that are
    not IP literals do not (the master passes the bound address, not the
    configured name).  IPv4-mapped IPv6 loopback (``::ffff:127.0.0.1``) counts.
    """
    if isinstance(sockaddr, (str, bytes)):
        return True
    host = sockaddr[0]
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


def build_response(status: int, content_type: str, body: bytes, head_only: bool = False,
                   extra: Tuple[Tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 response with ``Connection: close`` (HEAD: the head only)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [f"HTTP/1.1 {status} {phrase}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Cache-Control: no-store", "Connection: close"]
    lines.extend(f"{name}: {value}" for name, value in extra)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


class _Connection:
    __slots__ = ("sock", "state", "buffer", "out", "accepted", "deadline", "linger_left")

    def __init__(self, sock: socket.socket, now: float, deadline: float) -> None:
        self.sock = sock
        self.state = _READING
        self.buffer = bytearray()
        self.out = memoryview(b"")
        self.accepted = now
        self.deadline = deadline
        self.linger_left = LINGER_BYTES


class AdminServer:
    """Serves ``routes`` on the listening socket ``listener`` from one thread."""

    def __init__(self, listener: socket.socket, routes: Mapping[str, Handler], *,
                 head_limit: int = DEFAULT_HEAD_LIMIT, header_timeout: float = 5.0,
                 send_timeout: float = 5.0, linger_timeout: float = 1.0,
                 max_connections: int = 64) -> None:
        self.listener = listener
        #: Replaceable as a whole at any time (one attribute read per request).
        self.routes: Mapping[str, Handler] = routes
        self.head_limit = head_limit
        self.header_timeout = header_timeout
        self.send_timeout = send_timeout
        self.linger_timeout = linger_timeout
        self.max_connections = max_connections
        self.stats: Dict[str, int] = {}
        self._connections: Dict[int, _Connection] = {}
        self._selector: Optional[selectors.BaseSelector] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._accept_paused_until: Optional[float] = None
        self._wake_r, self._wake_w = os.pipe()
        self._wake_fds: Tuple[int, ...] = (self._wake_r, self._wake_w)
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._scratch = bytearray(16384)

    # --- the caller's side -------------------------------------------------------------

    def start(self, warn_exposed: bool = True) -> threading.Thread:
        """Start the loop thread; warns if the socket is reachable from other hosts
        (``warn_exposed=False`` when the caller warned already, e.g. once per master)."""
        address = self.listener.getsockname()
        if warn_exposed and not is_loopback(address):
            log.warning("admin endpoint bound to %s, which is not a loopback address: "
                        "anyone who can reach it can read metrics and status", address)
        self._thread = threading.Thread(target=self.serve_forever, name="admin-http",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and close its connections; the listening socket stays the caller's."""
        self._stopping = True
        if self._wake_fds:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
        self._close_wake()

    def close_after_fork(self) -> None:
        """In a child forked while the server ran: close every descriptor it holds.

        The loop thread does not exist in the child, but its descriptors do; a
        worker that kept the admin listener open would keep the port bound after
        the master is gone.  Closes the listener too (the child's copy).
        """
        self._stopping = True
        for conn in list(self._connections.values()):
            conn.sock.close()
        self._connections.clear()
        if self._selector is not None:
            self._selector.close()
        self._close_wake()
        self.listener.close()

    def _close_wake(self) -> None:
        # Once only: a second close could hit a descriptor number reused meanwhile.
        fds, self._wake_fds = self._wake_fds, ()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def connection_count(self) -> int:
        return len(self._connections)

    # --- the loop thread --------------------------------------------------------------

    def serve_forever(self) -> None:
        self.listener.setblocking(False)
        selector = self._selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ, None)
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                try:
                    self._once(selector)
                except Exception:
                    # A bug here must not end the endpoint; connections have deadlines.
                    log.exception("admin loop failed; going on")
                    time.sleep(0.01)
        finally:
            for conn in list(self._connections.values()):
                self._close(conn)
            if self._accept_paused_until is None:
                selector.unregister(self.listener)
            selector.close()

    def _once(self, selector: selectors.BaseSelector) -> None:
        paused = self._accept_paused_until
        if paused is not None and time.monotonic() >= paused:
            self._accept_paused_until = None
            selector.register(self.listener, selectors.EVENT_READ, None)
        events = selector.select(self._timeout(time.monotonic()))
        for key, mask in events:
            if key.data is None:
                self._accept()
            elif key.data == "wake":
                self._drain_wake()
            else:
                self._guarded(key.data, mask)
        self._expire(time.monotonic())

    def buffered_bytes(self) -> int:
        """Bytes held for open connections (heads being read, responses being sent)."""
        return sum(len(c.buffer) + len(c.out) for c in list(self._connections.values()))

    def _count(self, name: str, amount: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + amount

    def _drain_wake(self) -> None:
        try:
            os.read(self._wake_r, 64)
        except OSError:
            pass

    def _timeout(self, now: float) -> Optional[float]:
        deadlines = [conn.deadline for conn in self._connections.values()]
        if self._accept_paused_until is not None:
            deadlines.append(self._accept_paused_until)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._connections.values() if c.deadline <= now]:
            if conn.state == _READING:
                # Slowloris or a stalled client: say so once, without waiting.
                self._count("header_timeouts")
                try:
                    conn.sock.send(build_response(408, _TEXT, b"request head timeout\n"))
                except OSError:
                    pass
            elif conn.state == _WRITING:
                self._count("send_timeouts")
            self._close(conn)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # that client gave up; the next one may be there
                # EMFILE and friends: the connection stays queued; try again shortly.
                log.warning("admin accept failed (%s); pausing accepts for %.1f s",
                            exc, ACCEPT_PAUSE_S)
                self._count("accept_errors")
                assert self._selector is not None
                self._selector.unregister(self.listener)
                self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S
                return
            self._count("accepted")
            if len(self._connections) >= self.max_connections and not self._evict():
                self._count("refused")
                sock.close()
                continue
            sock.setblocking(False)
            now = time.monotonic()
            conn = _Connection(sock, now, now + self.header_timeout)
            self._connections[sock.fileno()] = conn
            assert self._selector is not None
            self._selector.register(sock, selectors.EVENT_READ, conn)
            # The request is often in already: read it without waiting for a wake-up.
            self._guarded(conn, selectors.EVENT_READ)

    def _evict(self) -> bool:
        """Close the oldest connection still reading its head, else the oldest lingering one.

        A reader that has not finished its head is what an idle attacker holds; a
        lingering one has its response in flight (a close now resets it), so it
        goes second.  One being answered is never cut.
        """
        for state in (_READING, _LINGERING):
            candidates = [c for c in self._connections.values() if c.state == state]
            if candidates:
                self._count("evicted")
                self._close(min(candidates, key=lambda c: c.accepted))
                return True
        return False

    def _guarded(self, conn: _Connection, mask: int) -> None:
        """One event of one connection; a fault closes that connection only."""
        try:
            if conn.state == _READING:
                self._read_head(conn)
            elif conn.state == _WRITING:
                self._send(conn)
            else:
                self._linger(conn)
        except OSError:
            self._close(conn)
        except Exception:
            log.exception("admin connection failed")
            self._close(conn)

    def _read_head(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(self.head_limit - len(conn.buffer))
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self._close(conn)
            return
        conn.buffer += data
        self._count("head_bytes", len(data))
        # The answer can only change when a line end arrives or the buffer is full.
        if b"\n" not in data and len(conn.buffer) < self.head_limit:
            return
        try:
            request = parse_request_head(bytes(conn.buffer), self.head_limit)
        except BadRequest as exc:
            self._count(f"bad_request.{exc.reason}")
            status = _STATUS_OF_REASON.get(exc.reason, 400)
            self._reply(conn, build_response(status, _TEXT, f"{exc.reason}\n".encode()))
            return
        if request is not None:
            self._reply(conn, self._respond(request))

    def _respond(self, request: Request) -> bytes:
        head_only = request.method == "HEAD"
        handler = self.routes.get(request.path)
        if handler is None:
            self._count("not_found")
            return build_response(404, _TEXT, b"not found\n", head_only)
        if request.method not in ("GET", "HEAD"):
            self._count("method_not_allowed")
            return build_response(405, _TEXT, b"method not allowed\n",
                                  extra=(("Allow", "GET, HEAD"),))
        try:
            status, content_type, body = handler(request)
            # What goes on the wire is checked: no header injection, no str body.
            if not (isinstance(status, int) and 100 <= status <= 599):
                raise TypeError(f"status {status!r}")
            if not isinstance(content_type, str) or not _FIELD_VALUE.fullmatch(content_type):
                raise TypeError(f"content type {content_type!r}")
            if not isinstance(body, (bytes, bytearray)):
                raise TypeError(f"body of type {type(body).__name__}")
            response = build_response(status, content_type, bytes(body), head_only)
        except Exception:
            log.exception("admin handler for %s failed", request.path)
            self._count("handler_errors")
            return build_response(500, _TEXT, b"internal error\n", head_only)
        self._count("served")
        return response

    def _reply(self, conn: _Connection, response: bytes) -> None:
        conn.buffer = bytearray()
        conn.out = memoryview(response)
        conn.state = _WRITING
        conn.deadline = time.monotonic() + self.send_timeout
        self._send(conn)

    def _send(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        conn.out = conn.out[sent:]
        assert self._selector is not None
        if conn.out:
            self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
            return
        # Done: half-close, then read and drop what the client still sends, briefly.
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.state = _LINGERING
        conn.deadline = time.monotonic() + self.linger_timeout
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _linger(self, conn: _Connection) -> None:
        try:
            got = conn.sock.recv_into(self._scratch, min(len(self._scratch), conn.linger_left))
        except (BlockingIOError, InterruptedError):
            return
        conn.linger_left -= got
        self._count("discarded_bytes", got)
        if got == 0 or conn.linger_left <= 0:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        if self._connections.pop(fd, None) is None:
            return
        assert self._selector is not None
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
