"""One direction of a relayed connection: ``Direction.pump``, the relay's fast path.

Owns the per-direction state machine (what it waits for: ``WANT_READ``,
``WANT_WRITE``, ``DONE``), the splice-or-copy decision per burst and the
unrolled request/response path at the top of ``pump``.  Called only by the
thread of the ``RelayLoop`` that owns the connection; ``choose_mode`` is called
once per process (the master, at start), to decide whether splice is used at all.
"""

from __future__ import annotations

import errno
import socket
from typing import Optional, Tuple

from prefork_proxy import splice as splice_module
from prefork_proxy.errors import ProxyError
from prefork_proxy.splice import SPLICE_F_MOVE, SPLICE_F_NONBLOCK, SpliceFunction

from .buffers import SHORT_READ, BufferPool, PipePool
from .contract import StreamSocket

#: A read this large in splice mode means a bulk stream: move it by splice from then on.
BULK_READ = 64 * 1024
#: Read/write rounds a direction may take per readiness event, so one busy
#: stream cannot starve the others in its loop (epoll is level-triggered, so
#: the rest is picked up on the next turn).
ROUNDS_PER_EVENT = 8

#: What a direction waits for: its source, its destination, or nothing (ended).
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

    Counting (issue 11): ``nread`` and ``nwritten`` are this direction's bytes
    read from ``src`` and written to ``dst`` so far (pipes included): one
    attribute add per system call and nothing else.  The connection's byte
    counters are made of them (see ``Connection``), and the loop copies the
    client side's into its shared counters (``RelayLoop._publish``).

    Principle (a spent budget slows only the stuck): while the loop's budget
    is spent (see ``BufferPool``), a direction reads at most ``SHORT_READ``
    bytes at a time and fills no pipe; what it writes out at once costs
    nothing, and only the remainder of a partial write is kept, in a small
    buffer, until the destination takes it.
    """

    __slots__ = ("src", "dst", "buffers", "pipes", "splice", "state",
                 "eof", "held", "start", "pending", "pipe", "in_pipe", "bulk", "last",
                 "nread", "nwritten")

    def __init__(self, src: StreamSocket, dst: StreamSocket, buffers: BufferPool,
                 pipes: Optional[PipePool] = None,
                 splice: Optional[SpliceFunction] = None) -> None:
        # No descriptor numbers are kept: only the splice calls need them, and ask
        # the sockets (a method call beside a system call that moves up to a pipe's
        # worth).  Kept, they cost an idle connection two slots per direction and,
        # above fd 256, an int object each (tracemalloc: 127 + 32 bytes per connection).
        self.src, self.dst = src, dst
        self.nread = self.nwritten = 0
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
            self.nread += n
            if 0 < n < SHORT_READ:
                try:
                    written = self.dst.send(buffer[:n])
                except BlockingIOError:
                    written = 0
                self.nwritten += written
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
                        moved = self.splice(self.pipe[0], self.dst.fileno(), self.pending,
                                            SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                        self.nwritten += moved
                        self.pending -= moved
                        buffers.left += moved  # a pipe is charged what it holds
                    else:
                        start = self.start
                        written = self.dst.send(self.held[start:start + self.pending])
                        self.nwritten += written
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
        self.nread += n
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
        n = self.splice(self.src.fileno(), self.pipe[1], self.pipe[2],
                        SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        self.nread += n
        self.pending, self.in_pipe = n, True
        self.buffers.left -= n
        if 0 < n < SHORT_READ:
            self.bulk = False
        return n

    def hold(self, data: bytes) -> None:
        """Bytes the destination must get first (a pre-connect prefix, before any
        ``pump``): held as a burst's remainder is, charged to the budget."""
        buffers = self.buffers
        count = len(data)
        if count > len(buffers.scratch):
            raise ValueError(f"a prefix of {count} bytes is larger than a buffer")
        buffers.scratch[:count] = data
        self.held, self.start = buffers.keep(0, count)
        self.pending, self.in_pipe = count, False
        self.state = WANT_WRITE

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


