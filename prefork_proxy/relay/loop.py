"""The relay loop: one epoll thread serving many connections (``RelayLoop``).

Owns the epoll instance, the map from file descriptor to connection (each
connection's ``handler`` hears its events: the connect phase's, then the relay
phase's), the cross-thread inbox and its wake pipe, closing sockets only after
a batch (``_to_close``), the one ``TimerHeap`` of the loop (admission and
connect deadlines and pauses now; idle timeouts later), the watch on the
listeners for the loop that accepts (``ListenerWatch``), and the relay phase
of a connection (``_on_event``, interest masks, ``_close``).  The worker
creates and starts it; ``submit``, ``stop_accepting`` and ``stop`` may be
called from any thread, everything else runs on the loop's own thread.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Callable, Deque, Dict, Iterator, List, Optional, Set, Tuple

from prefork_proxy import splice as splice_module
from prefork_proxy.errors import ProxyError
from prefork_proxy.splice import SpliceFunction

from .admit import Admitter
from .buffers import DEFAULT_BUDGET, BufferPool, PipePool
from .connect import Connector
from .connection import Connection
from .contract import (
    RELEASED,
    Acceptor,
    Admission,
    Chooser,
    LoopStatsHooks,
    OutcomeHook,
    SocketOptions,
    StreamSocket,
    Target,
)
from .direction import DONE, WANT_READ, WANT_WRITE, Direction
from .idle import IdleSweep
from .queued import Queuer

log = logging.getLogger("prefork_proxy.relay")

#: Stale timer entries tolerated beyond twice the armed timers.
TIMEOUTS_SLACK = 64
#: The longest a loop sleeps in epoll with nothing due: its heartbeat stays fresh.
IDLE_POLL_S = 1.0
#: How often a loop copies its open connections' client-side bytes into its
#: shared counters (``RelayLoop._publish_all``): what a scrape may lag behind
#: the bytes of a long stream (the master republishes about once a second too).
PUBLISH_S = 0.5
#: How long accepting pauses after an unexpected error from the acceptor.
ACCEPT_ERROR_PAUSE_S = 0.1

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
#: SO_LINGER {on, 0 s}: ``close`` then sends an RST instead of a FIN (see ``RelayLoop._close``).
_LINGER_ABORT = struct.pack("ii", 1, 0)
#: Errors that are simply how TCP connections end; anything else is logged.
_ORDINARY_ENDINGS = frozenset((errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT))

#: One access-log record (``accesslog.RECORD_FIELDS`` says what each item is).
AccessRecord = Tuple[object, ...]

#: ``callback(conn)``: what runs when a connection's armed deadline passes.
TimerCallback = Callable[[Connection], None]


class TimerHeap:
    """The loop's one timer heap: at most one armed deadline per connection.

    Owned by one ``RelayLoop`` thread.  An entry is ``(deadline, sequence,
    connection, callback)``; the connection's ``deadline`` says which entry is
    live, so re-arming or cancelling needs no search: a stale entry (the
    connection moved on, or closed) is skipped when it comes due.  The whole
    heap is dropped whenever nothing is armed, and it is compacted when armed
    timers keep overlapping, so it stays about as long as the timers armed.
    """

    __slots__ = ("heap", "armed", "_sequence")

    def __init__(self) -> None:
        self.heap: List[Tuple[float, int, Connection, TimerCallback]] = []
        self.armed: Set[Connection] = set()
        self._sequence = itertools.count()  # ties in the heap never compare Connections

    def arm(self, conn: Connection, deadline: float, callback: TimerCallback) -> None:
        """Run ``callback(conn)`` at ``deadline`` (monotonic), instead of any armed before."""
        conn.deadline = deadline
        heap = self.heap
        if len(heap) > 2 * len(self.armed) + TIMEOUTS_SLACK:
            # Timers keep overlapping, so the heap was never dropped whole:
            # sift out the stale entries (amortized: at most once per as many
            # pushes as there are live entries).  In place: the loop holds the list.
            heap[:] = [entry for entry in heap
                       if entry[2].deadline == entry[0] and not entry[2].closed]
            heapq.heapify(heap)
        heapq.heappush(heap, (deadline, next(self._sequence), conn, callback))
        self.armed.add(conn)

    def cancel(self, conn: Connection) -> None:
        """Disarm the connection's timer, if any (its entry goes stale)."""
        conn.deadline = 0.0
        armed = self.armed
        armed.discard(conn)
        if not armed:
            self.heap.clear()  # every entry left is stale

    def next_due(self) -> Optional[float]:
        return self.heap[0][0] if self.heap else None

    def expire(self, now: float, run: Callable[..., None]) -> None:
        """Run the callbacks that are due, each through ``run(conn, callback, conn)``."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            deadline, _, conn, callback = heapq.heappop(heap)
            if not conn.closed and conn.deadline == deadline:
                self.cancel(conn)
                run(conn, callback, conn)


class ListenerWatch:
    """The accepting loop's side of accepting: listeners in or out of epoll, pauses.

    Owned by the one ``RelayLoop`` given an ``Acceptor`` (the worker), whose
    accept policy decides; this only watches the listeners, calls
    ``accept_ready`` on the loop's thread, and keeps the pause it asks for.
    ``request_stop`` is the one call from another thread (the worker's main).
    """

    def __init__(self, epoll: select.epoll, acceptor: Acceptor) -> None:
        self._epoll = epoll
        self._acceptor = acceptor
        self.sockets: Dict[int, socket.socket] = {}  # listener fd -> socket
        self._listening = False
        self.resume_at = 0.0  # the earliest pause (all or one listener) ends then (0.0: none)
        self._all_resume_at = 0.0  # a pause of every listener ends then (0.0: none)
        # Listeners paused on their own (a full ``max_connections``): fd -> resume time.
        self._held: Dict[int, float] = {}
        self._force_next = False  # after a deferral: take one client regardless
        self.stop_requested = False
        self.stopped = threading.Event()

    def start(self) -> None:
        for sock in self._acceptor.listening_sockets():
            self.sockets[sock.fileno()] = sock
        self._listen(True)

    def _listen(self, on: bool) -> None:
        """Put the listeners into epoll, or take them out (a pause, or for good).

        A listener held on its own stays out either way until its own pause ends.
        """
        if on == self._listening:
            return
        held = self._held
        for fd in self.sockets:
            if fd in held:
                continue
            if on:
                self._epoll.register(fd, _IN)
            else:
                self._epoll.unregister(fd)
        self._listening = on

    def on_ready(self, sock: socket.socket) -> None:
        if not self._listening:
            return  # taken out of epoll earlier in this batch
        fd = sock.fileno()
        if fd in self._held:
            return  # held on its own earlier in this batch
        force, self._force_next = self._force_next, False
        try:
            pause = self._acceptor.accept_ready(sock, force)
        except Exception:
            log.exception("accepting on %s failed; pausing accept", sock)
            pause = (ACCEPT_ERROR_PAUSE_S, False)
        if pause is not None:
            until = time.monotonic() + pause[0]
            if len(pause) > 2 and pause[2]:  # type: ignore[misc]
                # This listener only (it is full); the others go on accepting.
                self._held[fd] = until
                self._epoll.unregister(fd)
            else:
                self._force_next = pause[1]
                self._all_resume_at = until
                self._listen(False)
            self.resume_at = min(until, self.resume_at or until)

    def review(self) -> None:
        """After each batch: end a pause that is over, or stop accepting when asked."""
        if self.stop_requested:
            if not self.stopped.is_set():
                self._listen(False)
                self.resume_at = self._all_resume_at = 0.0
                self.stopped.set()
            return
        now = time.monotonic()
        if not self.resume_at or now < self.resume_at:
            return
        held = self._held
        for fd, until in list(held.items()):
            if now >= until:
                del held[fd]
                if self._listening:
                    self._epoll.register(fd, _IN)
        if self._all_resume_at and now >= self._all_resume_at:
            self._all_resume_at = 0.0
            self._listen(True)
        pending = list(held.values()) + ([self._all_resume_at] if self._all_resume_at else [])
        self.resume_at = min(pending) if pending else 0.0


class RelayLoop:
    """One relay thread: an epoll loop serving many connections.

    Created and started by the worker; ``submit`` and ``stop`` may be called
    from any thread, everything else runs on the loop's own thread.

    Principle (the hot path is a few lookups): the loop uses ``select.epoll``
    directly, with one dict from file descriptor to connection, rather than
    ``selectors`` (whose per-event key objects cost time on every event and
    memory on every connection).  A relay event is a dict lookup, the
    connection's ``handler``, one or two ``pump`` calls and, only when a
    direction changed what it waits for, an ``epoll_ctl``.

    Principle (no descriptor is reused within one batch of events): sockets
    of connections that end are closed only after the whole batch returned by
    one ``epoll.poll`` has been handled.  Otherwise a later event of the same
    batch, meant for the closed socket, could reach a new backend socket that
    got the same descriptor number during failover.  Freshly submitted
    clients are likewise taken in only between batches.
    """

    def __init__(self, mode: str, name: str = "relay",
                 splice: Optional[SpliceFunction] = None,
                 acceptor: Optional[Acceptor] = None,
                 budget: int = DEFAULT_BUDGET,
                 on_crash: Optional[Callable[[], None]] = None,
                 on_outcome: Optional[OutcomeHook] = None,
                 stats: Optional[LoopStatsHooks] = None,
                 access: Optional[Deque[AccessRecord]] = None) -> None:
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
        self._inbox: Deque[Tuple[StreamSocket, Optional[Iterator[Target]], float, str,
                                 SocketOptions, Optional[Admission],
                                 Optional[Chooser], int, float]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The loop may end (and close the wake pipe) the moment ``stop`` sets
        # ``_stopping``, before ``stop`` writes its wake-up: the lock makes
        # writing and closing exclusive, so a stale write can never land in a
        # descriptor number that another socket has reused.
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._epoll.register(self._wake_r, _IN)
        self._timers = TimerHeap()
        # Idle timeouts: one sweep per idle value (``idle.IdleSweep``), none without.
        self._idle_sweeps: Dict[float, IdleSweep] = {}
        # Every connection this loop owns, from its inbox until its close.  A dict
        # used as a set: about 40 bytes per member where a set took 65 (measured).
        self._connections: Dict[Connection, None] = {}
        self._to_close: List[StreamSocket] = []  # closed after the current batch
        self._stopping = False
        self._drain_deadline = 0.0
        self._thread: Optional[threading.Thread] = None
        self._thread_id = -1
        self._watch = ListenerWatch(self._epoll, acceptor) if acceptor is not None else None
        self._connector = Connector(self)
        self._admitter = Admitter(self)
        self._queuer = Queuer(self)
        # Connections woken in a backend queue (``resume``, any thread), taken in by
        # the loop after each batch.
        self._resumed: Deque[Connection] = collections.deque()
        self._on_outcome = on_outcome  # hears each connection refused by its admission
        # This loop's shared counters (``rows.LoopStats``, see ``LoopStatsHooks``;
        # None: the connections count their own bytes only).
        self._stats = stats
        self._publish_due = 0.0
        if stats is not None:
            self._cells, self._received, self._sent = stats.cells, stats.RECEIVED, stats.SENT
        # The access log's queue (``accesslog``; None: off): one record per
        # connection appended at its close, drained by the worker's main thread.
        # ``access_appended`` (one writer: this loop) lets the reader count drops.
        self._access = access
        self.access_appended = 0
        self._relay_handler = self._on_event  # bound once, shared by every connection
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

    def submit(self, client: StreamSocket, targets: Optional[Iterator[Target]],
               timeout_s: float, peer: str = "", options: SocketOptions = (),
               admission: Optional[Admission] = None,
               choose: Optional[Chooser] = None, listener_slot: int = 0,
               idle_s: float = 0.0) -> None:
        """Hand a freshly accepted, non-blocking client over; the loop owns it from now on.

        ``options`` are set on every backend socket made for it (e.g. TCP
        keepalive, see ``keepalive_options``); the client's own are the caller's.
        ``admission`` (None: none) is the client's pre-connect phase (see
        ``admit``); once it accepts, ``choose(verdict)`` gives the targets to
        try (None: ``targets``).  ``admission.release()`` is called exactly
        once, when the connection closes, whatever ended it.  ``listener_slot``
        says whose counters its bytes and close go to (the loop's ``stats``).
        ``idle_s`` (0.0: off): no byte either way this long while relaying closes it.
        """
        self.submitted += 1
        self._inbox.append((client, targets, timeout_s, peer, options, admission, choose,
                            listener_slot, idle_s))
        if threading.get_ident() == self._thread_id:
            return  # accepted by this loop itself: it looks at its inbox after each batch
        if not self._wake_pending:
            # One wake-up per batch is enough: the loop clears the flag before
            # it empties the inbox, so a client appended after that finds the
            # flag clear and wakes it again.
            self._wake_pending = True
            self._wake()

    def resume(self, conn: Connection) -> None:
        """A backend slot freed for ``conn``, waiting in a queue: the loop takes it back.

        Any thread (whoever freed the slot); the loop picks it up after its batch.
        """
        self._resumed.append(conn)
        if threading.get_ident() != self._thread_id:
            self._wake()

    def stop_accepting(self, timeout_s: float = 1.0) -> bool:
        """Stop taking clients from the listeners; True once the loop has confirmed it.

        Called by the worker's main thread when it begins to stop, before its
        own last sweep of the accept queues.
        """
        if self._watch is None:
            return True
        self._watch.stop_requested = True
        self._wake()
        return self._watch.stopped.wait(timeout_s)

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
        timers = self._timers.heap  # emptied and compacted in place, never replaced
        resumed = self._resumed
        watch = self._watch
        listeners = watch.sockets if watch is not None else {}
        self._thread_id = threading.get_ident()
        try:
            if watch is not None:
                watch.start()
            while not (self._stopping and (not self._connections and not self._inbox
                                           or time.monotonic() >= self._drain_deadline)):
                woken = False
                if timers or self._stopping or (watch is not None and watch.resume_at) \
                        or resumed:
                    timeout = 0.0 if resumed else self._poll_timeout()
                else:
                    timeout = IDLE_POLL_S
                for fd, events in poll(timeout):
                    conn = by_fd.get(fd)
                    if conn is None:
                        if fd in listeners:
                            watch.on_ready(listeners[fd])  # type: ignore[union-attr]
                        else:
                            woken = woken or fd == wake_fd
                        continue  # or a socket closed earlier in this batch
                    try:
                        conn.handler(conn, fd, events)  # type: ignore[misc]
                    except Exception:
                        log.exception("relay error on the connection from %s; closing it",
                                      conn.peer or "?")
                        self._close(conn, abort=True, term="ID")
                while to_close:
                    to_close.pop().close()
                if woken or self._inbox:
                    self._take_inbox(woken)
                if watch is not None and (watch.resume_at or watch.stop_requested):
                    watch.review()
                if timers:
                    self._timers.expire(time.monotonic(), self._guarded)
                while resumed:  # only when a backend queue woke one of ours
                    conn = resumed.popleft()
                    self._guarded(conn, self._queuer.resumed, conn)
                while to_close:
                    to_close.pop().close()
                self.last_tick = now = time.monotonic()
                if now >= self._publish_due and self._stats is not None:
                    self._publish_due = now + PUBLISH_S
                    self._publish_all()
        except BaseException as exc:
            log.exception("relay loop %s crashed; closing its connections", self.name)
            self.crashed = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if watch is not None:
                watch.stopped.set()
            # Whatever is still open here is cut (the drain deadline passed, a
            # fast stop, or this loop crashed): both ends hear a reset.
            for conn in list(self._connections):
                self._close(conn, abort=True, term="KD")
            while self._inbox:
                self._drop_unserved(self._inbox.popleft())
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
            self._drop_unserved(self._inbox.popleft())
            count += 1
        return count

    def _publish(self, conn: Connection) -> None:
        """Add what the connection's client sent and was sent since last time to the
        loop's shared counters (``stats``, not None; its loop's thread only)."""
        client_in, client_out = conn.client_in, conn.client_out
        cells, base = self._cells, conn.base
        if client_in != conn.published_in:
            cells[base + self._received] += client_in - conn.published_in
            conn.published_in = client_in
        if client_out != conn.published_out:
            cells[base + self._sent] += client_out - conn.published_out
            conn.published_out = client_out

    def _publish_all(self) -> None:
        """Every ``PUBLISH_S``: the open connections' new bytes into the shared counters.

        Principle (counting costs the hot path one add per system call): the
        directions count into their own attributes; the shared cells get the
        differences here, so a long stream's bytes show in the metrics while
        it runs, at a cost per open connection per ``PUBLISH_S`` (two compares
        when idle) instead of a shared-memory add per system call.  A close
        publishes the rest (``_close``), so totals are exact.
        """
        try:
            for conn in self._connections:
                self._publish(conn)
        except Exception:  # bookkeeping must never cost the loop its thread
            log.exception("publishing the byte counters of %s failed", self.name)

    def _drop_unserved(self, item: Tuple[object, ...]) -> None:
        """Close a client never taken in (the loop ended first): a close all the same."""
        item[0].close()  # type: ignore[attr-defined]
        self.finished += 1
        if self._access is not None:
            self._access.append((time.monotonic(), item[7], item[3], None, None, 0, 503, "KD",
                                 "unserved", -1.0, 0.0, 0, 0, 0, 0, None))
            self.access_appended += 1
        if self._stats is not None:
            try:
                self._stats.on_close(self._stats.base(item[7]), -1, 0, 0, 0.0)  # type: ignore[arg-type]
            except Exception:
                log.exception("counting the close of an unserved client failed")

    def _poll_timeout(self) -> float:
        timeout = IDLE_POLL_S
        due = self._timers.next_due()
        if due is not None:
            timeout = min(timeout, max(0.0, due - time.monotonic()))
        if self._stopping:
            timeout = min(timeout, max(0.0, self._drain_deadline - time.monotonic()))
        if self._watch is not None and self._watch.resume_at:
            timeout = min(timeout, max(0.0, self._watch.resume_at - time.monotonic()))
        return timeout

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
        connect_next = self._connector.connect_next
        stats = self._stats
        now = time.monotonic()  # one clock per batch: the clients' start, within microseconds
        while inbox:
            conn = Connection(*inbox.popleft())
            conn.started = now
            if stats is not None:
                conn.base = stats.base(conn.listener_slot)
            self._connections[conn] = None
            if conn.admission is None:  # the one test a listener without admission pays
                self._guarded(conn, connect_next, conn, None)
            else:
                self._guarded(conn, self._admitter.start, conn)

    # relay phase

    def _start_relay(self, conn: Connection, prefix: bytes = b"") -> None:
        """The backend is connected (``Connector``): relay from now on.

        ``prefix`` (the target's ``send_prefix`` and the admission's
        ``forward_prefix``) goes to the backend before any other client byte:
        it is held by the client->backend direction as a burst's remainder
        would be (charged to the budget), and written out first.
        """
        backend = conn.backend
        assert backend is not None
        pipes = self._pipes if self.mode == "splice" else None
        conn.upstream = Direction(conn.client, backend, self._buffers, pipes, self._splice)
        conn.downstream = Direction(backend, conn.client, self._buffers, pipes, self._splice)
        conn.handler = self._relay_handler
        self._by_fd[conn.client_fd] = conn
        if prefix:
            conn.prefix = b""
            # Write it now: the backend just connected, so its send buffer is
            # empty and a prefix (a PROXY header, a ClientHello) goes out
            # whole; a remainder is held, as a burst's would be, and written
            # when the backend is writable.
            try:
                sent = backend.send(prefix)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                if exc.errno not in _ORDINARY_ENDINGS:
                    log.info("connection from %s closed on error: %s", conn.peer or "?", exc)
                self._close(conn, abort=True, term="SD" if self._access is not None else None)
                return
            conn.upstream.nwritten += sent
            if sent < len(prefix):
                conn.upstream.hold(prefix[sent:])
        if not conn.admitted:
            # Speculative read: a client that speaks first (HTTP, Redis,
            # PostgreSQL) has usually sent its first bytes while we connected.
            # Moving them now saves a trip through epoll; if nothing is there,
            # it costs one recv.  A client whose admission read it has just
            # been drained (its bytes are in the prefix): reading again would
            # only hear EAGAIN, and epoll reports whatever came since.
            self._on_event(conn, conn.client_fd, _IN)
        if not conn.closed:
            self._update_interest(conn)
            if conn.idle_s:
                self._watch_idle(conn)

    def _watch_idle(self, conn: Connection) -> None:
        """Put a relayed connection under its idle value's sweep (armed with its first)."""
        sweep = self._idle_sweeps.get(conn.idle_s)
        if sweep is None:
            sweep = self._idle_sweeps[conn.idle_s] = IdleSweep(conn.idle_s)
        now = time.monotonic()
        if not sweep.members:
            self._timers.arm(sweep, now + sweep.interval, self._sweep_idle)  # type: ignore[arg-type]
        sweep.add(conn, now)

    def _sweep_idle(self, sweep: IdleSweep) -> None:
        """The sweep's timer: close the idle ones (a FIN both ways), re-arm while any remain."""
        now = time.monotonic()
        try:
            for conn, term in sweep.sweep(now):
                log.debug("connection from %s idle for %.3f s: closed (%s)",
                          conn.peer or "?", sweep.idle_s, term)
                self._close(conn, term=term)  # the access log's status 200, term cD/sD
        except Exception:  # one bad sweep must not stop the next, nor close the loop
            log.exception("idle sweep of %s failed", self.name)
        if sweep.members:
            self._timers.arm(sweep, now + sweep.interval, self._sweep_idle)  # type: ignore[arg-type]

    def _report_outcome(self, conn: Connection, verdict: object) -> None:
        """Count a connection refused before connecting, and tell the outcome hook."""
        conn.refusal = verdict  # its status/term/reason, for the access log
        stats = self._stats
        if stats is not None:
            try:
                stats.on_reject(conn.base, getattr(verdict, "reason", ""))
            except Exception:  # bookkeeping must never cost the loop its thread
                log.exception("counting the refusal of %s failed", conn.peer or "?")
        if self._on_outcome is not None:
            try:
                self._on_outcome(conn.peer, conn.admission, verdict)
            except Exception:  # bookkeeping must never cost the loop its thread
                log.exception("reporting the outcome of %s failed", conn.peer or "?")

    def _guarded(self, conn: Connection, step: Callable[..., None], *args: object) -> None:
        """Run one step of a connection; whatever goes wrong ends this connection only."""
        try:
            step(*args)
        except Exception:
            log.exception("relay error on the connection from %s; closing it", conn.peer or "?")
            self._close(conn, abort=True, term="ID")

    def _on_event(self, conn: Connection, fd: int, events: int) -> None:
        if fd == conn.client_fd:
            reading, writing = conn.upstream, conn.downstream
        else:
            reading, writing = conn.downstream, conn.upstream
        read_state, write_state = reading.state, writing.state
        if events == _IN and read_state == WANT_READ:
            # The event of request/response traffic (a burst to read, written
            # straight out): only the reading direction moves, and when it wants
            # to read again nothing else changed (the other direction was not
            # touched, and an end of either was handled when it happened), so
            # there is nothing to update.
            try:
                state = reading.pump()
            except OSError as exc:
                self._on_error(conn, fd, exc)
                return
            if state == WANT_READ:
                return
            reading.state = state
        else:
            try:
                # As ``selectors`` does: an error or hang-up counts as both readable
                # and writable, so whichever direction waits on this socket hears it.
                if events & ~_OUT and read_state == WANT_READ:
                    reading.state = reading.pump()
                if events & ~_IN and write_state == WANT_WRITE:
                    writing.state = writing.pump()
            except OSError as exc:
                self._on_error(conn, fd, exc)
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

    def _on_error(self, conn: Connection, fd: int, exc: OSError) -> None:
        """A direction's socket failed: an abort both ways (who aborted, for the log)."""
        if exc.errno not in _ORDINARY_ENDINGS:
            log.info("connection from %s closed on error: %s", conn.peer or "?", exc)
        self._close(conn, abort=True,
                    term=None if self._access is None else self._who_aborted(conn, fd))

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

    def _close(self, conn: Connection, abort: bool = False,
               term: Optional[str] = None) -> None:
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

        ``term`` (the access log's): how it ended, when the caller knows (``CD``,
        ``SD``, ``KD``, ``ID``, ``CQ``); None: a clean end, or as the connect
        phase or a refusal recorded it.
        """
        if conn.closed:
            return
        conn.closed = True
        if self._access is not None:  # before the directions go: their counts are the record's
            try:
                self._record(conn, term)
            except Exception:  # bookkeeping must never cost the loop its thread
                log.exception("recording the access log line of %s failed", conn.peer or "?")
        stats = self._stats
        if stats is not None:  # before the directions go: their counts are the connection's
            target = conn.target
            try:
                self._publish(conn)
                stats.on_close(conn.base, target.slot if target is not None else -1,
                               conn.published_in, conn.published_out,
                               time.monotonic() - conn.started)
            except Exception:  # bookkeeping must never cost the loop its thread
                log.exception("counting the close of %s failed", conn.peer or "?")
        by_fd = self._by_fd
        by_fd.pop(conn.client_fd, None)
        if conn.backend is not None:
            by_fd.pop(conn.backend_fd, None)
        self._connections.pop(conn, None)
        if conn.idle_s:
            sweep = self._idle_sweeps.get(conn.idle_s)
            if sweep is not None:
                sweep.remove(conn)
        if conn.deadline:
            self._timers.cancel(conn)
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
            self._connector.report(conn, RELEASED)
        conn.targets = None
        if conn.admission is not None:
            try:
                conn.admission.release()
            except Exception:  # bookkeeping must never cost the loop its thread
                log.exception("releasing the admission of %s failed", conn.peer or "?")
        self.finished += 1

    @staticmethod
    def _who_aborted(conn: Connection, fd: int) -> str:
        """``CD`` or ``SD``: which side reset a relayed connection (for the access log).

        The error may come from either socket of the event's pump (a client
        event also writes to the backend), so ask the kernel, on this error
        path only: a socket that got an RST or an error reports POLLERR/POLLHUP
        (the event's own first, then the other's); else the event's side.
        """
        other = conn.backend_fd if fd == conn.client_fd else conn.client_fd
        poller = select.poll()
        for candidate in (fd, other):
            poller.register(candidate, select.POLLIN)
        hung = {ready for ready, revents in poller.poll(0)
                if revents & (select.POLLERR | select.POLLHUP)}
        culprit = fd if fd in hung or other not in hung else other
        return "CD" if culprit == conn.client_fd else "SD"

    def _record(self, conn: Connection, term: Optional[str]) -> None:
        """Append the connection's access-log record (``accesslog.RECORD_FIELDS``).

        A tuple of what the connection already holds: no formatting and no I/O
        here (the worker's main thread does both); deque appends are atomic.
        """
        refusal = conn.refusal
        reason = ""
        if refusal is not None:  # refused by its admission or a backend queue
            status, term, reason = refusal.status, refusal.term, refusal.reason
        elif conn.connect_s >= 0:  # it was relayed: 200, however it ended
            status, term = 200, term or "--"
        elif term is None:  # no backend reachable
            status, term = 502, conn.fail_term
            reason = "no_backend" if not conn.attempts else \
                "connect_timeout" if term == "sC" else "connect_refused"
        else:  # cut before it connected (drain deadline, its client left, an error)
            status = 400 if term[0] == "C" else 503
        admission = conn.admission
        target = conn.target
        self._access.append((  # type: ignore[union-attr]
            conn.started, conn.listener_slot,
            getattr(admission, "client_address", conn.peer),
            target.name if target is not None and conn.connect_s >= 0 else None,
            conn.tried, conn.attempts, status, term, reason, conn.connect_s,
            time.monotonic() - conn.started, conn.client_in, conn.client_out,
            conn.backend_in, conn.backend_out,
            getattr(admission, "server_name", None)))
        self.access_appended += 1
