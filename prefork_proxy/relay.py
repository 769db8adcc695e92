"""Moving bytes between two sockets: the one module that owns the relay.

Each worker runs a few ``RelayLoop`` threads; each loop owns an epoll selector
and every connection handed to it, from the backend connect until both sockets
are closed.  The worker's accept thread hands a client over with ``submit``;
after that only the loop's thread touches the connection, so connections need
no locks.  This module knows sockets and addresses, nothing of the config or
of processes.

How a connection is served:

1. ``submit(client, targets, timeout_s)``: the loop connects to the first
   target without blocking, bounded by ``timeout_s``; on refusal or timeout it
   tries the next target, and when none is left it closes the client and logs
   one line naming the backend and the reason.
2. Once connected, two ``Direction``s (client->backend, backend->client) pump
   bytes.  ``choose_mode`` decides once per process how: ``splice`` moves them
   socket -> pipe -> socket inside the kernel, ``copy`` uses
   ``recv_into``/``send`` through a buffer.
3. EOF on one side becomes ``shutdown(SHUT_WR)`` on the other while the other
   direction keeps flowing; when both directions have ended, both sockets are
   closed.  A reset or any other error closes both at once.

Principle (backpressure): a direction reads only when its pipe or buffer is
empty, and while bytes wait for a destination that is not writable it stops
watching the source for reads and watches the destination for writes instead.
So memory per connection is bounded by one pipe or buffer per direction, and
bytes stuck in a pipe never make the loop spin.

Principle (idle connections cost two descriptors): pipes and buffers are lent
from a per-thread pool only while a direction holds bytes, and returned when it
is empty.  10,000 idle connections hold 20,000 socket descriptors and no pipes.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterator, List, Optional, Set, Tuple

from prefork_proxy import splice as splice_module
from prefork_proxy.errors import ProxyError
from prefork_proxy.splice import SPLICE_F_MOVE, SPLICE_F_NONBLOCK, SpliceFunction

log = logging.getLogger("prefork_proxy.relay")

#: Pipe size asked for in splice mode (grown with F_SETPIPE_SZ where allowed).
PIPE_SIZE = 1024 * 1024
#: Buffer size in copy mode.
BUFFER_SIZE = 256 * 1024
#: Idle pipes/buffers a loop keeps for reuse; more are closed or freed.
POOL_KEEP = 8
#: A read this large in splice mode means a bulk stream: move it by splice from then on.
BULK_READ = 64 * 1024
#: Read/write rounds a direction may take per readiness event, so one busy
#: stream cannot starve the others in its loop (epoll is level-triggered, so
#: the rest is picked up on the next turn).
ROUNDS_PER_EVENT = 8

#: A read shorter than this probably emptied the socket (see ``Direction.pump``).
SHORT_READ = 16 * 1024

WANT_READ, WANT_WRITE, DONE = "read", "write", "done"


def choose_mode(requested: str) -> str:
    """Decide how this process moves bytes: ``"splice"`` or ``"copy"``.

    ``auto`` picks splice where it works; asking for ``splice`` where it does
    not work is an error, so an operator who asked for zero-copy gets it or is told.
    """
    if requested == "copy":
        return "copy"
    if splice_module.SPLICE_SUPPORTED:
        return "splice"
    if requested == "splice":
        raise ProxyError("relay = \"splice\" was asked for, but splice(2) on sockets is not "
                         "available here; use relay = \"auto\" or \"copy\"")
    return "copy"


# --------------------------------------------------------------------------- holding areas


class PipePool:
    """Pipes lent to splice directions; owned by one ``RelayLoop`` thread."""

    def __init__(self, size: int = PIPE_SIZE) -> None:
        self.size = size
        self._idle: List[Tuple[int, int, int]] = []

    def take(self) -> Tuple[int, int, int]:
        """A ``(read_fd, write_fd, capacity)`` pipe, empty."""
        if self._idle:
            return self._idle.pop()
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        return read_fd, write_fd, splice_module.set_pipe_size(write_fd, self.size)

    def give_back(self, pipe: Tuple[int, int, int], empty: bool) -> None:
        """Return a pipe; one that still holds bytes is closed, never reused."""
        if empty and len(self._idle) < POOL_KEEP:
            self._idle.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        for pipe in self._idle:
            os.close(pipe[0])
            os.close(pipe[1])
        self._idle.clear()


class BufferPool:
    """Buffers lent to copy directions; owned by one ``RelayLoop`` thread."""

    def __init__(self, size: int = BUFFER_SIZE) -> None:
        self.size = size
        self._idle: List[memoryview] = []

    def take(self) -> memoryview:
        return self._idle.pop() if self._idle else memoryview(bytearray(self.size))

    def give_back(self, buffer: memoryview) -> None:
        if len(self._idle) < POOL_KEEP:
            self._idle.append(buffer)

    def close(self) -> None:
        self._idle.clear()


class SpliceMover:
    """One direction's bytes in flight: in a pipe between two ``splice`` calls for
    bulk streams, in a small buffer (``readv``/``write``) for small bursts.

    Principle (splice where it pays): zero-copy costs two system calls and a
    pipe per burst, which is dearer than copying when a burst is a few hundred
    bytes (a database query, a Redis PING).  A direction starts by copying;
    a read that finds ``BULK_READ`` bytes or more waiting means a bulk stream,
    so it switches to the pipe; a splice that moves less than ``SHORT_READ``
    switches it back.  When no pipe can be had (out of file descriptors) it
    keeps copying: slower, but the stream flows rather than being cut.
    """

    __slots__ = ("pool", "buffers", "splice", "pipe", "buffer", "start", "pending", "bulk",
                 "in_pipe")

    def __init__(self, pool: PipePool, buffers: BufferPool, splice: SpliceFunction) -> None:
        self.pool = pool
        self.buffers = buffers
        self.splice = splice
        self.pipe: Optional[Tuple[int, int, int]] = None
        self.buffer: Optional[memoryview] = None
        self.start = 0
        self.pending = 0  # bytes held: splice counts pipe slots, so we count bytes
        self.bulk = False  # move by splice (True) or by copying (False)
        self.in_pipe = False  # where the pending bytes are

    def fill(self, src: int) -> int:
        """Read what the source has into the (empty) pipe or buffer; 0 means EOF."""
        if self.bulk:
            if self.pipe is None:
                try:
                    self.pipe = self.pool.take()
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
                    self.bulk = False
                    return self.fill(src)
            n = self.splice(src, self.pipe[1], self.pipe[2], SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            self.pending, self.in_pipe = n, True
            if 0 < n < SHORT_READ:
                self.bulk = False
            return n
        if self.buffer is None:
            self.buffer = self.buffers.take()
        n = os.readv(src, (self.buffer,))
        self.start, self.pending, self.in_pipe = 0, n, False
        if n >= BULK_READ:
            self.bulk = True
        return n

    def flush(self, dst: int) -> None:
        """Write pending bytes to the destination, from the pipe or the buffer."""
        if self.in_pipe:
            assert self.pipe is not None
            self.pending -= self.splice(self.pipe[0], dst, self.pending,
                                        SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            return
        assert self.buffer is not None
        written = os.write(dst, self.buffer[self.start:self.start + self.pending])
        self.start += written
        self.pending -= written

    def idle(self) -> None:
        """Called when the direction waits with nothing pending: lend pipe and buffer back."""
        if self.pipe is not None:
            self.pool.give_back(self.pipe, empty=True)
            self.pipe = None
        if self.buffer is not None:
            self.buffers.give_back(self.buffer)
            self.buffer = None

    def release(self) -> None:
        if self.pipe is not None:
            self.pool.give_back(self.pipe, empty=not (self.in_pipe and self.pending))
            self.pipe = None
        if self.buffer is not None:
            self.buffers.give_back(self.buffer)
            self.buffer = None


class CopyMover:
    """One direction's bytes in flight, held in a user-space buffer."""

    __slots__ = ("pool", "buffer", "start", "end")

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self.buffer: Optional[memoryview] = None
        self.start = self.end = 0

    @property
    def pending(self) -> int:
        return self.end - self.start

    def fill(self, src: socket.socket) -> int:
        if self.buffer is None:
            self.buffer = self.pool.take()
        n = src.recv_into(self.buffer)
        self.start, self.end = 0, n
        return n

    def flush(self, dst: socket.socket) -> None:
        assert self.buffer is not None
        self.start += dst.send(self.buffer[self.start:self.end])

    def idle(self) -> None:
        if self.buffer is not None:
            self.pool.give_back(self.buffer)
            self.buffer = None

    def release(self) -> None:
        self.idle()


# --------------------------------------------------------------------------- one connection


class Direction:
    """Bytes flowing one way, from ``src`` to ``dst``; ``state`` says what it waits for."""

    __slots__ = ("src", "dst", "src_io", "dst_io", "mover", "eof", "state")

    def __init__(self, src: socket.socket, dst: socket.socket, mover: object,
                 by_fd: bool) -> None:
        self.src, self.dst = src, dst
        # splice wants file descriptors, copy wants the socket objects
        self.src_io = src.fileno() if by_fd else src
        self.dst_io = dst.fileno() if by_fd else dst
        self.mover = mover
        self.eof = False
        self.state = WANT_READ

    def pump(self) -> str:
        """Move what can move now without blocking; return what to wait for next.

        Raises ``OSError`` (other than ``BlockingIOError``) when either socket fails.

        Principle (no read just to hear EAGAIN): after a short read has been
        written out, the source is almost surely empty, and reading it again
        would only fail with EAGAIN; epoll is level-triggered, so if bytes did
        arrive meanwhile it reports the source again.  For request/response
        traffic this saves one system call in four.
        """
        mover = self.mover
        short_read = False
        for _ in range(ROUNDS_PER_EVENT):
            if mover.pending:
                try:
                    mover.flush(self.dst_io)
                except BlockingIOError:
                    return WANT_WRITE
                continue
            if self.eof:
                mover.release()
                self.dst.shutdown(socket.SHUT_WR)
                return DONE
            if short_read:
                mover.idle()
                return WANT_READ
            try:
                n = mover.fill(self.src_io)
            except BlockingIOError:
                mover.idle()
                return WANT_READ
            if n == 0:
                self.eof = True
            short_read = n < SHORT_READ
        return WANT_WRITE if mover.pending else WANT_READ


#: Outcomes of one connect attempt, passed to ``Target.report``.
CONNECTED, FAILED, RELEASED = "connected", "failed", "released"


@dataclass(frozen=True)
class Target:
    """One backend address to try: the resolved socket address and the name to log.

    ``timeout_s``, when set, bounds this attempt instead of the connection's
    timeout (the balancer spends a budget across attempts).  ``report``, when
    set, hears how the attempt went, on the relay thread (it must not block):
    ``CONNECTED`` once connected, then exactly one of ``FAILED`` with the reason
    (the backend could not be reached) or ``RELEASED`` (the connection ended,
    or the attempt was abandoned for a reason of ours, not the backend's).
    """

    family: int
    sockaddr: tuple
    name: str
    timeout_s: Optional[float] = None
    report: Optional[Callable[[str, str], None]] = field(default=None, compare=False)


class Connection:
    """A client and its backend, owned by one ``RelayLoop``."""

    __slots__ = ("client", "backend", "targets", "target", "timeout_s", "deadline", "upstream",
                 "downstream", "interest", "peer", "closed")

    def __init__(self, client: socket.socket, targets: Iterator[Target], timeout_s: float,
                 peer: str) -> None:
        self.client = client
        self.backend: Optional[socket.socket] = None
        self.targets = targets
        self.target: Optional[Target] = None
        self.timeout_s = timeout_s
        self.deadline = 0.0
        self.upstream: Optional[Direction] = None  # client -> backend
        self.downstream: Optional[Direction] = None  # backend -> client
        self.interest: Dict[int, int] = {}  # fd -> selector events currently registered
        self.peer = peer
        self.closed = False


# --------------------------------------------------------------------------- the loop


class RelayLoop:
    """One relay thread: an epoll loop serving many connections.

    Created and started by the worker; ``submit`` and ``stop`` may be called
    from any thread, everything else runs on the loop's own thread.
    """

    def __init__(self, mode: str, name: str = "relay",
                 splice: Optional[SpliceFunction] = None) -> None:
        if mode not in ("splice", "copy"):
            raise ValueError(f"mode must be 'splice' or 'copy', not {mode!r}")
        self.mode = mode
        self.name = name
        self._splice = splice or splice_module.splice
        if mode == "splice" and self._splice is None:
            raise ProxyError("splice mode asked for, but no splice function is available")
        self._selector = selectors.DefaultSelector()
        self._pipes = PipePool()
        self._buffers = BufferPool()
        self._inbox: Deque[Tuple[socket.socket, Iterator[Target], float, str]] = \
            collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The loop may end (and close the wake pipe) the moment ``stop`` sets
        # ``_stopping``, before ``stop`` writes its wake-up: the lock makes
        # writing and closing exclusive, so a stale write can never land in a
        # descriptor number that another socket has reused.
        self._wake_lock = threading.Lock()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._timeouts: List[Tuple[float, int, Connection]] = []
        self._timeout_sequence = itertools.count()  # ties in the heap never compare Connections
        self._connections: Set[Connection] = set()
        self._stopping = False
        self._drain_deadline = 0.0
        self._thread: Optional[threading.Thread] = None
        # Two counters, each with one writer, so no lock is needed: ``submitted``
        # is written by the submitting thread, ``finished`` by the loop.
        self.submitted = 0
        self.finished = 0
        self.last_tick = time.monotonic()  # written by the loop each turn: its heartbeat

    @property
    def active(self) -> int:
        """Connections this loop owns now (any thread may read it)."""
        return self.submitted - self.finished

    # -- any thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()

    def submit(self, client: socket.socket, targets: Iterator[Target], timeout_s: float,
               peer: str = "") -> None:
        """Hand a freshly accepted client over; the loop owns it from now on."""
        self.submitted += 1
        self._inbox.append((client, targets, timeout_s, peer))
        self._wake()

    def stop(self, drain_timeout_s: Optional[float] = None) -> None:
        """Ask the loop to end: at once, or once its connections end or the drain time passes."""
        self._drain_deadline = time.monotonic() + (drain_timeout_s or 0.0)
        self._stopping = True
        self._wake()

    def join(self, timeout: Optional[float] = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w < 0:
                return  # the loop has ended
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already: the loop will look

    # -- the loop's own thread

    def run(self) -> None:
        try:
            while not (self._stopping and (not self._connections and not self._inbox
                                           or time.monotonic() >= self._drain_deadline)):
                for key, events in self._selector.select(self._poll_timeout()):
                    if key.data is None:
                        self._take_inbox()
                    elif not key.data.closed:
                        self._guarded(key.data, self._on_event, key.data, key.fileobj, events)
                self._expire_timeouts()
                self.last_tick = time.monotonic()
        except BaseException:
            log.exception("relay loop %s crashed; closing its connections", self.name)
            raise
        finally:
            for conn in list(self._connections):
                self._close(conn)
            while self._inbox:
                self._inbox.popleft()[0].close()
                self.finished += 1
            self._pipes.close()
            self._buffers.close()
            self._selector.close()
            with self._wake_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1

    def _poll_timeout(self) -> float:
        timeout = 1.0
        if self._timeouts:
            timeout = min(timeout, max(0.0, self._timeouts[0][0] - time.monotonic()))
        if self._stopping:
            timeout = min(timeout, max(0.0, self._drain_deadline - time.monotonic()))
        return timeout

    def _take_inbox(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        while self._inbox:
            client, targets, timeout_s, peer = self._inbox.popleft()
            conn = Connection(client, targets, timeout_s, peer)
            self._connections.add(conn)
            self._guarded(conn, self._connect_next, conn, None)

    # connect phase

    def _connect_next(self, conn: Connection, reason: Optional[str],
                      backend_failed: bool = True) -> None:
        """Start connecting to the next target, or give up and close the client."""
        if conn.target is not None:
            log.warning("backend %s unreachable for client %s: %s", conn.target.name,
                        conn.peer or "?", reason)
            self._report(conn, FAILED if backend_failed else RELEASED, reason or "")
        if conn.backend is not None:
            self._set_interest(conn, conn.backend, 0)
            conn.backend.close()
            conn.backend = None
        try:
            target = next(conn.targets, None)
        except Exception as exc:  # a resolver failure while choosing the next backend
            log.warning("no backend for client %s: %s", conn.peer or "?", exc)
            target = None
        if target is None:
            self._close(conn)
            return
        conn.target = target
        try:
            backend = socket.socket(target.family, socket.SOCK_STREAM)
        except OSError as exc:  # EMFILE/ENFILE: out of descriptors for this one
            self._connect_next(conn, f"cannot create a socket: {exc.strerror}",
                               backend_failed=False)
            return
        backend.setblocking(False)
        conn.backend = backend
        code = backend.connect_ex(target.sockaddr)
        if code not in (0, errno.EINPROGRESS):
            self._connect_next(conn, os.strerror(code))
            return
        conn.deadline = time.monotonic() + self._attempt_timeout(conn)
        heapq.heappush(self._timeouts, (conn.deadline, next(self._timeout_sequence), conn))
        self._set_interest(conn, backend, selectors.EVENT_WRITE)

    def _on_connect_ready(self, conn: Connection) -> None:
        backend = conn.backend
        assert backend is not None
        code = backend.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._connect_next(conn, os.strerror(code))
            return
        conn.deadline = 0.0
        self._report(conn, CONNECTED)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("client %s connected to backend %s", conn.peer or "?", conn.target.name)
        for sock in (conn.client, backend):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        by_fd = self.mode == "splice"
        conn.upstream = Direction(conn.client, backend, self._mover(), by_fd)
        conn.downstream = Direction(backend, conn.client, self._mover(), by_fd)
        self._update_interest(conn)

    @staticmethod
    def _attempt_timeout(conn: Connection) -> float:
        target = conn.target
        return conn.timeout_s if target is None or target.timeout_s is None else target.timeout_s

    @staticmethod
    def _report(conn: Connection, outcome: str, reason: str = "") -> None:
        """Tell the target's balancer how its attempt went; the final outcome only once."""
        target = conn.target
        if outcome != CONNECTED:
            conn.target = None
        if target is not None and target.report is not None:
            try:
                target.report(outcome, reason)
            except Exception:  # bookkeeping must never cost the connection
                log.exception("reporting %s for backend %s failed", outcome, target.name)

    def _mover(self) -> object:
        if self.mode == "splice":
            assert self._splice is not None
            return SpliceMover(self._pipes, self._buffers, self._splice)
        return CopyMover(self._buffers)

    def _expire_timeouts(self) -> None:
        now = time.monotonic()
        while self._timeouts and self._timeouts[0][0] <= now:
            deadline, _, conn = heapq.heappop(self._timeouts)
            if not conn.closed and conn.deadline == deadline:
                self._guarded(conn, self._connect_next, conn, "connect timed out after "
                              f"{self._attempt_timeout(conn) * 1000:.0f} ms")

    # relay phase

    def _guarded(self, conn: Connection, step: Callable[..., None], *args: object) -> None:
        """Run one step of a connection; whatever goes wrong ends this connection only."""
        try:
            step(*args)
        except Exception:
            log.exception("relay error on the connection from %s; closing it", conn.peer or "?")
            self._close(conn)

    def _on_event(self, conn: Connection, sock: socket.socket, events: int) -> None:
        if conn.upstream is None:
            self._on_connect_ready(conn)
            return
        is_client = sock is conn.client
        reading = conn.upstream if is_client else conn.downstream
        writing = conn.downstream if is_client else conn.upstream
        before = (reading.state, writing.state)
        try:
            if events & selectors.EVENT_READ and reading.state == WANT_READ:
                reading.state = reading.pump()
            if events & selectors.EVENT_WRITE and writing.state == WANT_WRITE:
                writing.state = writing.pump()
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN,
                                 errno.ETIMEDOUT):
                log.info("connection from %s closed on error: %s", conn.peer or "?", exc)
            self._close(conn)
            return
        if conn.upstream.state == DONE and conn.downstream.state == DONE:
            self._close(conn)
        elif (reading.state, writing.state) != before:
            # Most events (request/response traffic) leave both states as they
            # were; then the registered interests are already right.
            self._update_interest(conn)

    def _update_interest(self, conn: Connection) -> None:
        assert conn.upstream is not None and conn.downstream is not None and conn.backend
        up, down = conn.upstream, conn.downstream
        self._set_interest(conn, conn.client,
                           (selectors.EVENT_READ if up.state == WANT_READ else 0)
                           | (selectors.EVENT_WRITE if down.state == WANT_WRITE else 0))
        self._set_interest(conn, conn.backend,
                           (selectors.EVENT_READ if down.state == WANT_READ else 0)
                           | (selectors.EVENT_WRITE if up.state == WANT_WRITE else 0))

    def _set_interest(self, conn: Connection, sock: socket.socket, events: int) -> None:
        fd = sock.fileno()
        current = conn.interest.get(fd, 0)
        if events == current:
            return
        if not current:
            self._selector.register(sock, events, conn)
        elif not events:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, events, conn)
        if events:
            conn.interest[fd] = events
        else:
            conn.interest.pop(fd, None)

    def _close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        for sock in (conn.client, conn.backend):
            if sock is None:
                continue
            if conn.interest.pop(sock.fileno(), 0):
                self._selector.unregister(sock)
        self._connections.discard(conn)
        for direction in (conn.upstream, conn.downstream):
            if direction is not None:
                direction.mover.release()
        conn.client.close()
        if conn.backend is not None:
            conn.backend.close()
        if conn.target is not None:
            self._report(conn, RELEASED)
        self.finished += 1
