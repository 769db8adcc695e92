"""Moving bytes between two sockets: the one module that owns the relay.

Each worker runs a few ``RelayLoop`` threads; each loop owns an epoll instance
and every connection handed to it, from the backend connect until both sockets
are closed.  One loop per worker also watches the listeners and lets its
``Acceptor`` (the worker) accept, which hands each client to a loop with
``submit``; after that only the loop's thread touches the connection, so
connections need no locks.  This module knows sockets and addresses, nothing
of the config or of processes.

How a connection is served:

1. ``submit(client, targets, timeout_s)``: the loop connects to the first
   target without blocking, bounded by ``timeout_s``; on refusal or timeout it
   tries the next target, and when none is left it closes the client and logs
   one line naming the backend and the reason.
2. Once connected, two ``Direction``s (client->backend, backend->client) pump
   bytes, starting with whatever the client already sent.  ``choose_mode``
   decides once per process whether bulk streams may be spliced (socket ->
   pipe -> socket inside the kernel); small bursts are always copied with
   ``recv_into``/``send``, and in ``copy`` mode everything is.
3. EOF on one side becomes ``shutdown(SHUT_WR)`` on the other while the other
   direction keeps flowing; when both directions have ended, both sockets are
   closed.  A reset or any other error, on either side or in our own code,
   and the drain deadline, abort both at once: each socket is closed with
   SO_LINGER 0, so each peer hears a reset, never a clean end (``_close``).

Principle (backpressure): a direction reads only when its pipe or buffer is
empty, and while bytes wait for a destination that is not writable it stops
watching the source for reads and watches the destination for writes instead.
So memory per connection is bounded by one pipe or buffer per direction, and
bytes stuck in a pipe never make the loop spin.  Across connections, a loop's
budget (``BufferPool``) caps what all of them hold together: when it is spent,
a direction reads at most a short burst (``SHORT_READ``) at a time, so one
that writes what it reads holds nothing and flows on, and one whose
destination is stuck holds only that burst's remainder, in a small buffer.

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
import mmap
import os
import select
import socket
import struct
import threading
import time
from _socket import socket as StreamSocket
from typing import Callable, Deque, Dict, Iterator, List, Optional, Protocol, Set, Tuple

from prefork_proxy import splice as splice_module
from prefork_proxy.errors import ProxyError
from prefork_proxy.splice import SPLICE_F_MOVE, SPLICE_F_NONBLOCK, SpliceFunction

log = logging.getLogger("prefork_proxy.relay")

# ``StreamSocket`` is ``_socket.socket``, the C class that ``socket.socket``
# extends with Python-level bookkeeping (``makefile`` reference counts, enum
# conversions).  The relay uses none of it, and making and closing two plain
# C sockets per connection instead saves a few microseconds each.  Anything
# ``socket.socket`` is accepted too: it is a subclass.

#: Pipe size asked for in splice mode (grown with F_SETPIPE_SZ where allowed).
PIPE_SIZE = 1024 * 1024
#: Buffer size in copy mode.
BUFFER_SIZE = 256 * 1024
#: A read shorter than this probably emptied the socket (see ``Direction.pump``).
#: While the budget is spent it is also the most a direction reads at a time.
SHORT_READ = 16 * 1024
#: Size of the buffers that hold what is left of a short burst (see ``BufferPool``).
SMALL_SIZE = SHORT_READ
#: Bytes a loop may hold in buffers and pipes when its worker names no budget.
DEFAULT_BUDGET = 64 * 1024 * 1024
#: Idle pipes/buffers a loop keeps for reuse; more are closed or freed.
POOL_KEEP = 8
#: A read this large in splice mode means a bulk stream: move it by splice from then on.
BULK_READ = 64 * 1024
#: Read/write rounds a direction may take per readiness event, so one busy
#: stream cannot starve the others in its loop (epoll is level-triggered, so
#: the rest is picked up on the next turn).
ROUNDS_PER_EVENT = 8

#: What a direction waits for: its source, its destination, or nothing (ended).
WANT_READ, WANT_WRITE, DONE = "read", "write", "done"

#: Socket options as data, ``(level, name, value)`` each, for ``setsockopt``.
SocketOptions = Tuple[Tuple[int, int, int], ...]


def keepalive_options(idle_s: Optional[int] = None, interval_s: Optional[int] = None,
                      count: Optional[int] = None) -> SocketOptions:
    """SO_KEEPALIVE on, with the timings given (``None``: the kernel's default)."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", interval_s),
                        ("TCP_KEEPCNT", count)):
        if value is not None and hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return tuple(options)


def apply_options(sock: StreamSocket, options: SocketOptions) -> None:
    for level, name, value in options:
        sock.setsockopt(level, name, value)


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
    """Pipes lent to splice directions; owned by one ``RelayLoop`` thread.

    A pipe costs the budget only what it holds: the direction that splices
    into it charges the bytes moved in, and credits them as they move out
    (see ``BufferPool``), so lending one costs nothing here.
    """

    def __init__(self, size: int = PIPE_SIZE) -> None:
        self.size = size
        self._idle: List[Tuple[int, int, int]] = []

    def take(self) -> Tuple[int, int, int]:
        """A ``(read_fd, write_fd, capacity)`` pipe, empty."""
        if self._idle:
            pipe = self._idle.pop()
        else:
            read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            pipe = read_fd, write_fd, splice_module.set_pipe_size(write_fd, self.size)
        return pipe

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
    """Buffers for copied bytes, and the loop's budget; owned by one ``RelayLoop`` thread.

    ``scratch`` is the loop's reading buffer.  A direction reads a burst into
    it and writes the burst straight out; only when the destination cannot
    take it all does the direction keep what is left (``keep``), and the
    scratch buffer stays the loop's.  So request/response traffic takes
    nothing from the pool and gives nothing back, burst after burst.

    Principle (a budget that only slow destinations spend): ``left`` is what
    remains of the loop's budget for bytes held on behalf of destinations
    slower than their sources.  A buffer a direction keeps is charged at its
    size; a pipe at the bytes it holds (the direction charges each splice in
    and credits each splice out: no system call of its own).  While ``left``
    is positive a direction may read as much as a buffer or a pipe takes.
    Once it is spent, every direction still reads, but at most ``SHORT_READ``
    bytes at a time, and no new pipe is filled (a bulk stream is copied
    meanwhile): a burst that is written out at once costs nothing, so
    healthy streams and new connections in the loop flow on, and a stuck
    destination leaves its direction holding only that burst's remainder, in
    a ``SMALL_SIZE`` buffer, waiting to write it (it reads no more meanwhile).
    A read that may end up held in full begins only while ``left`` is
    positive, so a loop holds at most its budget, plus one buffer or pipe,
    plus ``SMALL_SIZE`` per stuck direction (bounded by its connections),
    whatever its clients do.  The scratch buffer is never charged: it is the
    loop's, and always empty between events.

    Principle (freed memory goes back to the system): buffers are anonymous
    ``mmap`` regions rather than ``bytearray``s.  glibc keeps freed heap
    blocks of this size for reuse (its mmap threshold rises after the first
    free), so a burst of stalled clients used to leave the worker that much
    larger for good; an unmapped region is returned at once, and only the
    pages a read actually touched ever count.
    """

    def __init__(self, size: int = BUFFER_SIZE, budget: int = DEFAULT_BUDGET,
                 small_size: int = SMALL_SIZE) -> None:
        self.size = size
        self.small_size = small_size
        self.left = budget
        self._idle: List[memoryview] = []
        self._idle_small: List[memoryview] = []
        self.scratch = _new_buffer(size)

    def take(self) -> memoryview:
        return self._idle.pop() if self._idle else _new_buffer(self.size)

    def give_back(self, buffer: memoryview) -> None:
        if buffer is self.scratch:
            return
        if len(buffer) == self.size:
            self.left += self.size
            if len(self._idle) < POOL_KEEP:
                self._idle.append(buffer)
        else:
            self.left += self.small_size
            if len(self._idle_small) < POOL_KEEP:
                self._idle_small.append(buffer)

    def keep(self, start: int, count: int) -> Tuple[memoryview, int]:
        """The scratch buffer holds ``count`` unwritten bytes at ``start``: return a
        buffer of a direction's own that holds them, and where they begin in it.

        Up to ``small_size`` bytes are copied to the start of a small buffer
        (a short burst's remainder: copying at most 16 KiB costs less than a
        fresh scratch buffer's page faults); more, and the scratch buffer
        itself is handed over and the loop gets a fresh one.
        """
        if count <= self.small_size:
            self.left -= self.small_size
            small = self._idle_small.pop() if self._idle_small else _new_buffer(self.small_size)
            small[:count] = self.scratch[start:start + count]
            return small, 0
        self.left -= self.size
        buffer, self.scratch = self.scratch, self.take()
        return buffer, start

    def close(self) -> None:
        self._idle.clear()
        self._idle_small.clear()


def _new_buffer(size: int) -> memoryview:
    """A zeroed buffer of its own pages, returned to the system when the last view dies."""
    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE))


# --------------------------------------------------------------------------- one direction


class Direction:
    """Bytes flowing one way, from ``src`` to ``dst``; ``state`` says what it waits for.

    Owned by one ``RelayLoop`` thread.  Bytes in flight are held either in a
    buffer (``held``, from ``start``, ``pending`` bytes) or in a pipe
    (``in_pipe``: between two ``splice`` calls).  Within ``pump`` a burst may
    sit in the loop's scratch buffer; ``pump`` never returns still holding it.

    Principle (splice where it pays): zero-copy costs two system calls and a
    pipe per burst, which is dearer than copying when a burst is a few hundred
    bytes (a database query, a Redis PING).  A direction starts by copying
    (``recv_into``/``send``); when ``splice`` is given (splice mode), a read
    that finds ``BULK_READ`` bytes or more waiting means a bulk stream, so it
    switches to the pipe; a splice that moves less than ``SHORT_READ``
    switches it back.  When no pipe can be had (out of file descriptors) it
    keeps copying: slower, but the stream flows rather than being cut.

    Principle (no read just to hear EAGAIN): after a short read has been
    written out, the source is almost surely empty, and reading it again
    would only fail with EAGAIN; epoll is level-triggered, so if bytes did
    arrive meanwhile it reports the source again.  For request/response
    traffic this saves one system call in four.

    Principle (a spent budget slows only the stuck): while the loop's budget
    is spent (see ``BufferPool``), a direction reads at most ``SHORT_READ``
    bytes at a time and fills no pipe; what it writes out at once costs
    nothing, and only the remainder of a partial write is kept, in a small
    buffer, until the destination takes it.
    """

    __slots__ = ("src", "dst", "src_fd", "dst_fd", "buffers", "pipes", "splice", "state",
                 "eof", "held", "start", "pending", "pipe", "in_pipe", "bulk", "last")

    def __init__(self, src: StreamSocket, dst: StreamSocket, buffers: BufferPool,
                 pipes: Optional[PipePool] = None,
                 splice: Optional[SpliceFunction] = None) -> None:
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.buffers = buffers
        self.pipes = pipes
        self.splice = splice if pipes is not None else None  # None: copy only
        self.state = WANT_READ
        self.eof = False
        self.held: Optional[memoryview] = None
        self.start = 0
        self.pending = 0  # bytes held: splice counts pipe slots, so we count bytes
        self.pipe: Optional[Tuple[int, int, int]] = None
        self.in_pipe = False
        self.bulk = False
        # Set by the loop once the other direction is done: this one's end is
        # then the connection's end, and closing the socket sends the FIN that
        # ``shutdown`` would have sent, one system call sooner.
        self.last = False

    def pump(self) -> str:
        """Move what can move now without blocking; return what to wait for next.

        Raises ``OSError`` (other than ``BlockingIOError``) when either socket fails.
        A direction that returns with nothing pending holds no buffer and no
        pipe, so one that starts with nothing pending holds none either.
        """
        short_read = False
        buffers = self.buffers
        if not self.pending and not self.bulk and not self.eof:
            # The common case, spelled out because it runs once per request of
            # request/response traffic: a burst arrived; read it into the
            # scratch buffer and write it straight out.  While the budget is
            # spent, read a short burst only: one that is written out costs
            # nothing, and one that is not leaves little to hold.
            buffer = buffers.scratch
            try:
                if buffers.left > 0:
                    n = self.src.recv_into(buffer)
                else:
                    n = self.src.recv_into(buffer, SHORT_READ)
            except BlockingIOError:
                return WANT_READ
            if 0 < n < SHORT_READ:
                try:
                    written = self.dst.send(buffer[:n])
                except BlockingIOError:
                    written = 0
                if written == n:
                    return WANT_READ
                self.pending, self.in_pipe = n - written, False
                self.held, self.start = buffers.keep(written, n - written)
                return WANT_WRITE
            # End of stream or a big read: the general rounds below carry on.
            self.held = buffer
            self.start, self.pending, self.in_pipe = 0, n, False
            if n == 0:
                self.eof = True
            elif n >= BULK_READ and self.splice is not None:
                self.bulk = True
            short_read = n < SHORT_READ
        for _ in range(ROUNDS_PER_EVENT):
            if self.pending:
                try:
                    if self.in_pipe:
                        moved = self.splice(self.pipe[0], self.dst_fd, self.pending,
                                            SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                        self.pending -= moved
                        buffers.left += moved  # a pipe is charged what it holds
                    else:
                        start = self.start
                        written = self.dst.send(self.held[start:start + self.pending])
                        self.start = start + written
                        self.pending -= written
                except BlockingIOError:
                    if self.held is buffers.scratch:
                        self.held, self.start = buffers.keep(self.start, self.pending)
                    return WANT_WRITE
                continue
            if self.eof:
                self.release()
                if not self.last:
                    self.dst.shutdown(socket.SHUT_WR)
                return DONE
            if short_read:
                self.idle()
                return WANT_READ
            try:
                # A bulk stream fills a pipe only while the budget has room;
                # meanwhile it is copied, a short burst at a time.
                if self.bulk and buffers.left > 0:
                    n = self._fill_pipe()
                else:
                    n = self._fill_buffer()
            except BlockingIOError:
                self.idle()
                return WANT_READ
            if n == 0:
                self.eof = True
            short_read = n < SHORT_READ
        # Rounds used up.  Whatever this direction returns with, it never
        # keeps pointing at the loop's scratch buffer, which the next event
        # of any connection reads into; and with nothing pending it holds
        # nothing: its source may stay quiet for good, and a buffer or pipe
        # kept by a quiet direction would be budget lost to every other.
        if not self.pending:
            self.idle()
            return WANT_READ
        if self.held is buffers.scratch:
            self.held, self.start = buffers.keep(self.start, self.pending)
        return WANT_WRITE

    def _fill_buffer(self) -> int:
        buffers = self.buffers
        held = self.held
        if self.pipe is not None:  # a bulk stream copied while the budget is spent
            self.pipes.give_back(self.pipe, empty=True)
            self.pipe = None
        if held is not None and held is not buffers.scratch and len(held) == buffers.size:
            # A buffer of its own, charged in full already: fill it.
            n = self.src.recv_into(held)
        else:
            if held is not None:  # a small remainder, written out now: give it back
                buffers.give_back(held)
            held = self.held = buffers.scratch
            if buffers.left > 0:
                n = self.src.recv_into(held)
            else:
                n = self.src.recv_into(held, SHORT_READ)
        self.start, self.pending, self.in_pipe = 0, n, False
        if n >= BULK_READ and self.splice is not None:
            self.bulk = True
        return n

    def _fill_pipe(self) -> int:
        if self.pipe is None:
            assert self.pipes is not None
            try:
                self.pipe = self.pipes.take()
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                self.bulk = False
                return self._fill_buffer()
        if self.held is not None:  # switching from copying: no buffer needed now
            self.buffers.give_back(self.held)
            self.held = None
        n = self.splice(self.src_fd, self.pipe[1], self.pipe[2],
                        SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        self.pending, self.in_pipe = n, True
        self.buffers.left -= n
        if 0 < n < SHORT_READ:
            self.bulk = False
        return n

    def idle(self) -> None:
        """Nothing pending: lend the pipe and the buffer back (an idle direction holds none)."""
        if self.pipe is not None:
            self.pipes.give_back(self.pipe, empty=True)
            self.pipe = None
        if self.held is not None:
            self.buffers.give_back(self.held)
            self.held = None

    def release(self) -> None:
        """The direction ends: give back what it holds (a pipe with bytes in it is closed)."""
        if self.pipe is not None:
            in_pipe = self.pending if self.in_pipe else 0
            self.buffers.left += in_pipe
            self.pipes.give_back(self.pipe, empty=not in_pipe)
            self.pipe = None
        if self.held is not None:
            self.buffers.give_back(self.held)
            self.held = None


#: Outcomes of one connect attempt, passed to ``Target.report``.
CONNECTED, FAILED, RELEASED = "connected", "failed", "released"


class Target:
    """One backend address to try: the resolved socket address and the name to log.

    ``timeout_s``, when set, bounds this attempt instead of the connection's
    timeout (the balancer spends a budget across attempts).  ``report``, when
    set, hears how the attempt went, on the relay thread (it must not block):
    ``CONNECTED`` once connected, then exactly one of ``FAILED`` with the reason
    (the backend could not be reached) or ``RELEASED`` (the connection ended,
    or the attempt was abandoned for a reason of ours, not the backend's).

    ``sockaddr`` None makes a pause, not an attempt: nothing to connect to
    yet (the balancer's hostnames are not resolved yet).  The loop then waits
    ``timeout_s`` without a socket, on its connect-deadline heap, and asks the
    iterator again; the balancer bounds how long it keeps answering pauses.

    Immutable by convention; a plain slotted class rather than a dataclass
    because one is made per connection and held for its whole life.
    """

    __slots__ = ("family", "sockaddr", "name", "timeout_s", "report")

    def __init__(self, family: int, sockaddr: Optional[tuple], name: str,
                 timeout_s: Optional[float] = None,
                 report: Optional[Callable[[str, str], None]] = None) -> None:
        self.family = family
        self.sockaddr = sockaddr
        self.name = name
        self.timeout_s = timeout_s
        self.report = report

    def __repr__(self) -> str:
        return f"Target({self.name!r}, {self.sockaddr!r}, timeout_s={self.timeout_s!r})"


class Connection:
    """A client and its backend, owned by one ``RelayLoop``.

    ``client_mask``/``backend_mask`` are the epoll events registered for each
    socket (0: not registered).  ``targets`` is dropped once connected: the
    balancer's generators behind it are only needed to fail over, and an idle
    connection should hold as little as possible.
    """

    __slots__ = ("client", "backend", "client_fd", "backend_fd", "targets", "target",
                 "timeout_s", "deadline", "upstream", "downstream", "client_mask",
                 "backend_mask", "peer", "closed", "options")

    def __init__(self, client: StreamSocket, targets: Optional[Iterator[Target]],
                 timeout_s: float, peer: str, options: SocketOptions = ()) -> None:
        self.client = client
        self.options = options  # set on each backend socket before it connects
        self.client_fd = client.fileno()
        self.backend: Optional[StreamSocket] = None
        self.backend_fd = -1
        self.targets = targets
        self.target: Optional[Target] = None
        self.timeout_s = timeout_s
        self.deadline = 0.0
        self.upstream: Optional[Direction] = None  # client -> backend
        self.downstream: Optional[Direction] = None  # backend -> client
        self.client_mask = 0
        self.backend_mask = 0
        self.peer = peer
        self.closed = False


# --------------------------------------------------------------------------- the loop

#: Stale connect-deadline entries tolerated beyond twice the pending connects.
TIMEOUTS_SLACK = 64
#: The longest a loop sleeps in epoll with nothing due: its heartbeat stays fresh.
IDLE_POLL_S = 1.0
#: How long accepting pauses after an unexpected error from the acceptor.
ACCEPT_ERROR_PAUSE_S = 0.1


class Acceptor(Protocol):
    """What a relay loop that accepts needs from its worker (``Worker`` is one)."""

    def listening_sockets(self) -> List[socket.socket]:
        """The listeners to watch; asked once, when the loop starts."""

    def accept_ready(self, sock: socket.socket,
                     force: bool) -> Optional[Tuple[float, bool]]:
        """Accept what ``sock`` has queued, handing clients to loops with ``submit``.

        Runs on the loop's thread.  Returns None to keep watching, or
        ``(pause_s, force_next)`` to stop watching the listeners for
        ``pause_s`` and then, if ``force_next``, pass ``force=True`` once.
        """

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_ERROR = select.EPOLLERR | select.EPOLLHUP
_SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
_STREAM_NONBLOCK = int(socket.SOCK_STREAM) | _SOCK_NONBLOCK  # plain ints: no enum arithmetic
_TCP_FAMILIES = frozenset((int(socket.AF_INET), int(socket.AF_INET6)))
#: SO_LINGER {on, 0 s}: ``close`` then sends an RST instead of a FIN (see ``RelayLoop._close``).
_LINGER_ABORT = struct.pack("ii", 1, 0)
#: Errors that are simply how TCP connections end; anything else is logged.
_ORDINARY_ENDINGS = frozenset((errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT))


class RelayLoop:
    """One relay thread: an epoll loop serving many connections.

    Created and started by the worker; ``submit`` and ``stop`` may be called
    from any thread, everything else runs on the loop's own thread.

    Principle (the hot path is a few lookups): the loop uses ``select.epoll``
    directly, with one dict from file descriptor to connection, rather than
    ``selectors`` (whose per-event key objects cost time on every event and
    memory on every connection).  A relay event is a dict lookup, one or two
    ``pump`` calls and, only when a direction changed what it waits for, an
    ``epoll_ctl``.

    Principle (no descriptor is reused within one batch of events): sockets
    of connections that end are closed only after the whole batch returned by
    one ``epoll.poll`` has been handled.  Otherwise a later event of the same
    batch, meant for the closed socket, could reach a new backend socket that
    got the same descriptor number during failover.  Freshly submitted
    clients are likewise taken in only between batches.
    """

    def __init__(self, mode: str, name: str = "relay",
                 splice: Optional[SpliceFunction] = None,
                 acceptor: Optional["Acceptor"] = None,
                 budget: int = DEFAULT_BUDGET,
                 on_crash: Optional[Callable[[], None]] = None) -> None:
        if mode not in ("splice", "copy"):
            raise ValueError(f"mode must be 'splice' or 'copy', not {mode!r}")
        self.mode = mode
        self.name = name
        self._splice = splice or splice_module.splice
        if mode == "splice" and self._splice is None:
            raise ProxyError("splice mode asked for, but no splice function is available")
        self._epoll = select.epoll()
        self._by_fd: Dict[int, Connection] = {}
        # ``budget``: bytes this loop may hold in buffers and pipes (see BufferPool).
        self._buffers = BufferPool(budget=budget)
        self._pipes = PipePool()
        self._inbox: Deque[Tuple[StreamSocket, Iterator[Target], float, str,
                                 SocketOptions]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The loop may end (and close the wake pipe) the moment ``stop`` sets
        # ``_stopping``, before ``stop`` writes its wake-up: the lock makes
        # writing and closing exclusive, so a stale write can never land in a
        # descriptor number that another socket has reused.
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._epoll.register(self._wake_r, _IN)
        # Connect deadlines: a heap of (deadline, sequence, connection).  An
        # entry goes stale when its connect ends; stale entries are skipped,
        # the whole heap is dropped whenever no connect is in progress, and it
        # is compacted when connects keep overlapping, so it stays about as
        # long as the connects in progress.
        self._timeouts: List[Tuple[float, int, Connection]] = []
        self._connecting: Set[Connection] = set()
        self._timeout_sequence = itertools.count()  # ties in the heap never compare Connections
        self._connections: Set[Connection] = set()
        self._to_close: List[StreamSocket] = []  # closed after the current batch
        self._stopping = False
        self._drain_deadline = 0.0
        self._thread: Optional[threading.Thread] = None
        self._thread_id = -1
        # Accepting (only the loop given an ``acceptor``): listener fd -> socket,
        # whether they are in epoll, and a pause (``_accept_resume_at``).
        self._acceptor = acceptor
        self._listeners: Dict[int, socket.socket] = {}
        self._listening = False
        self._accept_resume_at = 0.0
        self._accept_force_next = False  # after a deferral: take one client regardless
        self._accept_stop_requested = False
        self._accept_stopped = threading.Event()
        # Two counters, each with one writer, so no lock is needed: ``submitted``
        # is written by the submitting thread, ``finished`` by the loop.
        self.submitted = 0
        self.finished = 0
        self.last_tick = time.monotonic()  # written by the loop each turn: its heartbeat
        # Set once, by the loop's thread, when ``run`` raised: what killed it.
        # ``on_crash`` is then called from that thread (the worker wakes up).
        self.crashed: Optional[str] = None
        self._on_crash = on_crash

    @property
    def active(self) -> int:
        """Connections this loop owns now (any thread may read it)."""
        return self.submitted - self.finished

    # -- any thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()

    def submit(self, client: StreamSocket, targets: Iterator[Target], timeout_s: float,
               peer: str = "", options: SocketOptions = ()) -> None:
        """Hand a freshly accepted, non-blocking client over; the loop owns it from now on.

        ``options`` are set on every backend socket made for it (e.g. TCP
        keepalive, see ``keepalive_options``); the client's own are the caller's.
        """
        self.submitted += 1
        self._inbox.append((client, targets, timeout_s, peer, options))
        if threading.get_ident() == self._thread_id:
            return  # accepted by this loop itself: it looks at its inbox after each batch
        if not self._wake_pending:
            # One wake-up per batch is enough: the loop clears the flag before
            # it empties the inbox, so a client appended after that finds the
            # flag clear and wakes it again.
            self._wake_pending = True
            self._wake()

    def stop_accepting(self, timeout_s: float = 1.0) -> bool:
        """Stop taking clients from the listeners; True once the loop has confirmed it.

        Called by the worker's main thread when it begins to stop, before its
        own last sweep of the accept queues.
        """
        if self._acceptor is None:
            return True
        self._accept_stop_requested = True
        self._wake()
        return self._accept_stopped.wait(timeout_s)

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
        poll = self._epoll.poll
        by_fd = self._by_fd
        wake_fd = self._wake_r
        to_close = self._to_close
        listeners = self._listeners
        on_event, on_connect_ready = self._on_event, self._on_connect_ready
        self._thread_id = threading.get_ident()
        try:
            if self._acceptor is not None:
                for sock in self._acceptor.listening_sockets():
                    listeners[sock.fileno()] = sock
                self._listen(True)
            while not (self._stopping and (not self._connections and not self._inbox
                                           or time.monotonic() >= self._drain_deadline)):
                woken = False
                if self._timeouts or self._stopping or self._accept_resume_at:
                    timeout = self._poll_timeout()
                else:
                    timeout = IDLE_POLL_S
                for fd, events in poll(timeout):
                    conn = by_fd.get(fd)
                    if conn is None:
                        if fd in listeners:
                            self._on_listener(listeners[fd])
                        else:
                            woken = woken or fd == wake_fd
                        continue  # or a socket closed earlier in this batch
                    try:
                        if conn.upstream is None:
                            on_connect_ready(conn, events)
                        else:
                            on_event(conn, fd, events)
                    except Exception:
                        log.exception("relay error on the connection from %s; closing it",
                                      conn.peer or "?")
                        self._close(conn, abort=True)
                while to_close:
                    to_close.pop().close()
                if woken or self._inbox:
                    self._take_inbox(woken)
                if self._accept_resume_at or self._accept_stop_requested:
                    self._review_accepting()
                if self._timeouts:
                    self._expire_timeouts()
                while to_close:
                    to_close.pop().close()
                self.last_tick = time.monotonic()
        except BaseException as exc:
            log.exception("relay loop %s crashed; closing its connections", self.name)
            self.crashed = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._accept_stopped.set()
            # Whatever is still open here is cut (the drain deadline passed, a
            # fast stop, or this loop crashed): both ends hear a reset.
            for conn in list(self._connections):
                self._close(conn, abort=True)
            while self._inbox:
                self._inbox.popleft()[0].close()
                self.finished += 1
            for sock in to_close:
                sock.close()
            to_close.clear()
            self._pipes.close()
            self._buffers.close()
            self._epoll.close()
            with self._wake_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1
            if self.crashed is not None and self._on_crash is not None:
                self._on_crash()

    def close_abandoned(self) -> int:
        """Close clients submitted after this loop's thread ended; return how many.

        Only for a loop whose thread is gone (``crashed``), called by the
        worker once nothing submits to it any more.
        """
        count = 0
        while self._inbox:
            self._inbox.popleft()[0].close()
            self.finished += 1
            count += 1
        return count

    def _poll_timeout(self) -> float:
        timeout = IDLE_POLL_S
        if self._timeouts:
            timeout = min(timeout, max(0.0, self._timeouts[0][0] - time.monotonic()))
        if self._stopping:
            timeout = min(timeout, max(0.0, self._drain_deadline - time.monotonic()))
        if self._accept_resume_at:
            timeout = min(timeout, max(0.0, self._accept_resume_at - time.monotonic()))
        return timeout

    # accepting (the loop with an acceptor only)

    def _listen(self, on: bool) -> None:
        """Put the listeners into epoll, or take them out (a pause, or for good)."""
        if on == self._listening:
            return
        for fd in self._listeners:
            if on:
                self._epoll.register(fd, _IN)
            else:
                self._epoll.unregister(fd)
        self._listening = on

    def _on_listener(self, sock: socket.socket) -> None:
        if not self._listening:
            return  # taken out of epoll earlier in this batch
        assert self._acceptor is not None
        force, self._accept_force_next = self._accept_force_next, False
        try:
            pause = self._acceptor.accept_ready(sock, force)
        except Exception:
            log.exception("accepting on %s failed; pausing accept", sock)
            pause = (ACCEPT_ERROR_PAUSE_S, False)
        if pause is not None:
            pause_s, self._accept_force_next = pause
            self._accept_resume_at = time.monotonic() + pause_s
            self._listen(False)

    def _review_accepting(self) -> None:
        """After each batch: end a pause that is over, or stop accepting when asked."""
        if self._accept_stop_requested:
            if not self._accept_stopped.is_set():
                self._listen(False)
                self._accept_resume_at = 0.0
                self._accept_stopped.set()
        elif self._accept_resume_at and time.monotonic() >= self._accept_resume_at:
            self._accept_resume_at = 0.0
            self._listen(True)

    def _take_inbox(self, woken: bool) -> None:
        """Take in submitted clients; ``woken``: the wake pipe was reported readable.

        Clients this loop accepted itself arrive without a wake-up, so the
        pipe is read only when it has something to read.  Order matters:
        empty the wake pipe, then clear the flag, then take the clients.  A
        client submitted after the flag is cleared writes a new wake-up;
        clearing the flag before reading the pipe could swallow that wake-up
        and leave a later client waiting with the flag still set.
        """
        if woken:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
            self._wake_pending = False
        inbox = self._inbox
        while inbox:
            conn = Connection(*inbox.popleft())
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
            self._forget_backend(conn)
        try:
            target = next(conn.targets, None) if conn.targets is not None else None
        except Exception as exc:  # a balancer failure while choosing the next backend
            log.warning("no backend for client %s: %s", conn.peer or "?", exc)
            target = None
        if target is None:
            self._close(conn)
            return
        if target.sockaddr is None:  # a pause (see Target): ask again after it
            self._arm_deadline(conn, time.monotonic() + (target.timeout_s or 0.0))
            return
        conn.target = target
        try:
            # Non-blocking from birth where the flag exists: one system call fewer.
            backend = StreamSocket(target.family, _STREAM_NONBLOCK)
        except OSError as exc:  # EMFILE/ENFILE: out of descriptors for this one
            self._connect_next(conn, f"cannot create a socket: {exc.strerror}",
                               backend_failed=False)
            return
        if not _SOCK_NONBLOCK:
            backend.setblocking(False)
        conn.backend = backend
        conn.backend_fd = backend.fileno()
        if target.family in _TCP_FAMILIES:
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if conn.options:
                apply_options(backend, conn.options)
        code = backend.connect_ex(target.sockaddr)
        if code not in (0, errno.EINPROGRESS):
            self._connect_next(conn, os.strerror(code))
            return
        self._arm_deadline(conn, time.monotonic() + self._attempt_timeout(conn))
        self._by_fd[conn.backend_fd] = conn
        self._epoll.register(conn.backend_fd, _OUT)
        conn.backend_mask = _OUT

    def _arm_deadline(self, conn: Connection, deadline: float) -> None:
        """When the connect in progress (or the pause) ends: ``_expire_timeouts`` moves on."""
        conn.deadline = deadline
        timeouts = self._timeouts
        if len(timeouts) > 2 * len(self._connecting) + TIMEOUTS_SLACK:
            # Connects keep overlapping, so the heap was never dropped whole:
            # sift out the stale entries (amortized: at most once per as many
            # pushes as there are live entries).
            self._timeouts = timeouts = [entry for entry in timeouts
                                         if entry[2].deadline == entry[0]
                                         and not entry[2].closed]
            heapq.heapify(timeouts)
        heapq.heappush(timeouts, (conn.deadline, next(self._timeout_sequence), conn))
        self._connecting.add(conn)

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

    def _on_connect_ready(self, conn: Connection, events: int) -> None:
        backend = conn.backend
        assert backend is not None
        if events & _ERROR:
            # Only then can the connect have failed: on success epoll reports
            # the socket writable and nothing else, which saves a system call
            # per connection.
            code = backend.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._connect_next(conn, os.strerror(code))
                return
        conn.deadline = 0.0
        self._connect_ended(conn)
        conn.targets = None  # connected: no failover from here on
        self._report(conn, CONNECTED)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("client %s connected to backend %s", conn.peer or "?", conn.target.name)
        pipes = self._pipes if self.mode == "splice" else None
        conn.upstream = Direction(conn.client, backend, self._buffers, pipes, self._splice)
        conn.downstream = Direction(backend, conn.client, self._buffers, pipes, self._splice)
        self._by_fd[conn.client_fd] = conn
        # Speculative read: a client that speaks first (HTTP, Redis, PostgreSQL)
        # has usually sent its first bytes while we connected.  Moving them now
        # saves a trip through epoll; if nothing is there, it costs one recv.
        self._on_event(conn, conn.client_fd, _IN)
        if not conn.closed:
            self._update_interest(conn)

    def _connect_ended(self, conn: Connection) -> None:
        self._connecting.discard(conn)
        if not self._connecting:
            self._timeouts.clear()  # every entry left is stale

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
            self._close(conn, abort=True)

    def _on_event(self, conn: Connection, fd: int, events: int) -> None:
        if fd == conn.client_fd:
            reading, writing = conn.upstream, conn.downstream
        else:
            reading, writing = conn.downstream, conn.upstream
        read_state, write_state = reading.state, writing.state
        try:
            # As ``selectors`` does: an error or hang-up counts as both readable
            # and writable, so whichever direction waits on this socket hears it.
            if events & ~_OUT and read_state == WANT_READ:
                reading.state = reading.pump()
            if events & ~_IN and write_state == WANT_WRITE:
                writing.state = writing.pump()
        except OSError as exc:
            if exc.errno not in _ORDINARY_ENDINGS:
                log.info("connection from %s closed on error: %s", conn.peer or "?", exc)
            self._close(conn, abort=True)
            return
        if reading.state == DONE:
            if writing.state == DONE:
                self._close(conn)
                return
            writing.last = True
        elif writing.state == DONE:
            reading.last = True
        if reading.state != read_state or writing.state != write_state:
            # Most events (request/response traffic) leave both states as they
            # were; then the registered interests are already right.
            self._update_interest(conn)

    def _update_interest(self, conn: Connection) -> None:
        up, down = conn.upstream, conn.downstream
        assert up is not None and down is not None
        client_mask = (_IN if up.state == WANT_READ else 0) | \
            (_OUT if down.state == WANT_WRITE else 0)
        backend_mask = (_IN if down.state == WANT_READ else 0) | \
            (_OUT if up.state == WANT_WRITE else 0)
        if client_mask != conn.client_mask:
            self._set_mask(conn.client_fd, conn.client_mask, client_mask)
            conn.client_mask = client_mask
        if backend_mask != conn.backend_mask:
            self._set_mask(conn.backend_fd, conn.backend_mask, backend_mask)
            conn.backend_mask = backend_mask

    def _set_mask(self, fd: int, current: int, wanted: int) -> None:
        """Register, modify or unregister: a socket nobody waits on is not left in epoll,
        where a hang-up would be reported on every turn."""
        if not current:
            self._epoll.register(fd, wanted)
        elif not wanted:
            self._epoll.unregister(fd)
        else:
            self._epoll.modify(fd, wanted)

    def _close(self, conn: Connection, abort: bool = False) -> None:
        """End a connection: forget its sockets now, close them after the current batch.

        Closing a socket also takes it out of epoll, so no ``unregister`` is needed.

        Principle (a cut stream is never passed off as a clean end): ``abort``
        is for every ending that is not both sides' clean FIN: a reset or any
        other socket error on either side, an unexpected error in our own
        code, the drain deadline.  Both sockets then get SO_LINGER {on, 0}, so
        closing them sends an RST: a peer reading to EOF (an HTTP/1.0 body, a
        dump, ``nc > file``) gets ECONNRESET instead of a truncated "complete"
        stream, as it would without a proxy in between (HAProxy does the
        same).  A clean ending costs nothing extra: the option is set only here.
        """
        if conn.closed:
            return
        conn.closed = True
        by_fd = self._by_fd
        by_fd.pop(conn.client_fd, None)
        if conn.backend is not None:
            by_fd.pop(conn.backend_fd, None)
        self._connections.discard(conn)
        if conn.deadline:
            self._connect_ended(conn)
        for direction in (conn.upstream, conn.downstream):
            if direction is not None:
                direction.release()
        conn.upstream = conn.downstream = None  # a stale timeout entry may outlive it
        if abort:
            for sock in (conn.client, conn.backend):
                if sock is not None:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
                    except OSError:  # already gone, or not a socket that lingers
                        pass
        self._to_close.append(conn.client)
        if conn.backend is not None:
            self._to_close.append(conn.backend)
        if conn.target is not None:
            self._report(conn, RELEASED)
        conn.targets = None
        self.finished += 1
