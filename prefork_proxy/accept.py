"""The accept policy of one worker: when to take a client from the kernel, and whose loop gets it.

``AcceptPolicy`` is built by the worker at boot and given to its first relay
loop as that loop's ``relay.Acceptor``: ``accept_ready`` runs on that relay
thread whenever a listener is readable.  The worker's main thread calls
``sweep`` once, when it stops, after the loop confirmed it stopped accepting
(so one thread at a time accepts, and writes the accept counters).

Principle (accept only what can be served): each connection needs two file
descriptors (client and backend), so a worker computes at boot how many
connections its open-file limit allows (``max_connections``) and stops
accepting at that count.  Accepting a client and then failing to open its
backend socket would drop a client that the kernel had already accepted;
left in the kernel's queue (which the master keeps open), it is served as
soon as another connection ends.

Principle (even load across workers): every worker accepts from the same
kernel queue, so a worker that holds more connections than its lightest
accepting sibling (by more than ``BALANCE_SLACK``, counts from the worker
rows) leaves a waiting client to that sibling: it stops watching its
listeners for ``DEFER_S``.  The kernel wakes every worker for a new client, so
the sibling is already on its way; if the client is still queued when the
pause ends, the sibling is busy, and this worker takes one client without
looking, so no client waits longer than ``DEFER_S`` for the balance.

Principle (accept never spins): while paused, or when ``accept`` fails
anyway with ``EMFILE``/``ENFILE``, the listener stays readable, and retrying
at once would burn a core.  The worker stops watching its listeners for
``ACCEPT_PAUSE_S`` instead.

Principle (a full listener waits in the kernel queue): a listener with
``max_connections`` is full when its shared count (``limits.ConnectionLimits``,
all workers together) has reached it.  The policy then stops watching that
listener alone for ``FULL_PAUSE_S`` and looks again, so its clients wait in
the kernel's queue and are taken as slots free, while the other listeners go
on.  The count moves when a client's pipeline takes its slot (on its relay
thread, after this batch), so the check adds the clients this batch took:
conservative within a worker.  Two workers can still both see the last free
slot; the pipeline's ``acquire`` stays the exact bound (±0), and the loser of
that race is refused (503) as before.  A listener without the key pays one
truthiness test of a local per client.

Counting: each accepted client adds one to its listener's ``CONNECTIONS``
cell in the worker's row, and the worker's open connections are published in
the row's ``active`` cell (what the siblings compare).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from typing import Dict, List, Optional, Sequence, Tuple

from prefork_proxy.balancer import Balancer
from prefork_proxy.config import ListenerConfig
from prefork_proxy.gate import Gate
from prefork_proxy.limits import ConnectionLimits
from prefork_proxy.relay import RelayLoop, SocketOptions, StreamSocket, apply_options
from prefork_proxy.rows import CONNECTIONS, WorkerRows, listener_cells

log = logging.getLogger("prefork_proxy.worker")

#: Connections accepted per readiness event before looking at other listeners.
ACCEPT_BATCH = 64
#: A worker holding more than this many connections over its lightest sibling defers to it.
BALANCE_SLACK = 1
#: How often the accepting loop looks up which workers are its accepting siblings.
SIBLINGS_REFRESH_S = 0.1
#: How long a deferring worker leaves the queue to its siblings.
DEFER_S = 0.002
#: How long accepting pauses after running out of file descriptors.
ACCEPT_PAUSE_S = 0.1
#: How long a listener at its ``max_connections`` is left alone before looking again.
FULL_PAUSE_S = 0.01

_SOCK_STREAM = int(socket.SOCK_STREAM)
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Entry:
    """One listener as the accept path needs it: precomputed once at boot."""

    __slots__ = ("listener", "sock", "balancer", "family", "options", "timeout_s", "cell",
                 "gate", "limit", "counts", "scope", "lslot", "local", "idle_s")

    def __init__(self, listener: ListenerConfig, sock: socket.socket, balancer: Balancer,
                 options: SocketOptions, cell: int, gate: Optional[Gate] = None,
                 limits: Optional[ConnectionLimits] = None, scope: int = 0,
                 lslot: int = 0) -> None:
        self.listener, self.sock, self.balancer = listener, sock, balancer
        # The pre-connect phase (``gate``); None: none configured, and the accept
        # path pays one ``is None`` test per client for it.
        self.gate = gate
        self.family = int(sock.family)  # a plain int: no enum conversion per client
        self.options = options  # set on its clients and their backend sockets (keepalive)
        self.timeout_s = listener.connect_timeout_ms / 1000.0
        self.cell = cell + CONNECTIONS  # its connections counter in the worker's row
        # ``max_connections`` (0: none, or no shared limits) and where its shared count is.
        self.limit = listener.max_connections if limits is not None else 0
        self.counts = limits.scope_count if limits is not None else None
        self.scope = scope
        self.lslot = lslot  # its listener slot: whose counters its connections' bytes go to
        self.idle_s = listener.idle_timeout_ms / 1000.0  # 0.0: no idle timeout
        # Every client of a listener bound to one TCP address has that address as
        # its local one: the gated path then skips a ``getsockname`` per client.
        self.local = fixed_local(sock) if gate is not None else None


def fixed_local(sock: socket.socket) -> object:
    """The local address every client accepted on ``sock`` has, or None if it varies.

    A TCP listener bound to one address (not the wildcard) hands out clients whose
    ``getsockname()`` equals its own; a wildcard listener's clients each have the
    address they connected to, so those still cost a ``getsockname`` each.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        local = sock.getsockname()
    except OSError:
        return None
    if local[0] in ("0.0.0.0", "::"):
        return None
    return local


class AcceptPolicy:
    """Accepting for one worker (see the module docstring); ``loops`` are its relay loops."""

    def __init__(self, slot: int, rows: WorkerRows, row: int, entries: Sequence[Entry],
                 loops: List[RelayLoop]) -> None:
        self.slot = slot  # for logs
        self.rows, self.row, self.loops = rows, row, loops
        self.entries = list(entries)
        self.by_fd: Dict[int, Entry] = {entry.sock.fileno(): entry for entry in entries}
        self.max_connections = 0  # set by the worker once its threads run
        self.at_limit = False
        self.siblings: List[int] = []  # rows of the other accepting workers
        self.siblings_due = 0.0  # when to look them up again

    @staticmethod
    def entry(rows: WorkerRows, row: int, lslot: int, listener: ListenerConfig,
              sock: socket.socket, balancer: Balancer, options: SocketOptions,
              gate: Optional[Gate] = None,
              limits: Optional[ConnectionLimits] = None) -> Entry:
        return Entry(listener, sock, balancer, options, listener_cells(rows, row, lslot), gate,
                     limits if gate is not None else None, lslot, lslot)

    # -- the first relay loop's thread (``relay.Acceptor``)

    def listening_sockets(self) -> List[socket.socket]:
        return [entry.sock for entry in self.entries]

    def accept_ready(self, sock: socket.socket,
                     force: bool) -> Optional[Tuple[float, bool, bool]]:
        """A listener is readable: accept a batch; say how long to pause, if at all."""
        outcome = self.accept_batch(self.by_fd[sock.fileno()], balance=True, force_first=force)
        if outcome is FULL:
            return FULL_PAUSE_S, False, True  # this listener only
        if outcome is PAUSE:
            return ACCEPT_PAUSE_S, False
        if outcome is DEFER:
            return DEFER_S, True
        return None

    # -- the worker's main thread, once, when it stops

    def sweep(self) -> None:
        """Accept everything queued on every listener (the last sweep of a graceful stop)."""
        for entry in self.entries:
            while self.accept_batch(entry) is BATCH_DONE:
                pass

    def accept_batch(self, entry: Entry, balance: bool = False,
                     force_first: bool = False) -> "Outcome":
        """Accept what is queued, up to a batch.

        Returns ``QUEUE_EMPTY``, ``BATCH_DONE`` when the batch ran out first
        (epoll reports the rest), ``PAUSE`` to stop accepting for a while,
        ``FULL`` when this listener is at its ``max_connections``, or
        (only when ``balance`` is asked for) ``DEFER`` to leave the queue to a
        lighter sibling for a moment.  ``force_first`` takes the first client
        without looking at the balance (the sibling had its chance).
        """
        sock, family, options = entry.sock, entry.family, entry.options
        rows, row, loops = self.rows, self.row, self.loops
        counts, cell, published = rows.listener, entry.cell, rows.active
        siblings: List[int] = []
        limit, shared, scope = entry.limit, entry.counts, entry.scope
        taken = 0  # clients of this batch: their slots are taken after it
        if balance:
            now = time.monotonic()
            if now >= self.siblings_due:
                self.siblings = rows.accepting_rows(exclude=row)
                self.siblings_due = now + SIBLINGS_REFRESH_S
            siblings = self.siblings
        for _ in range(ACCEPT_BATCH):
            # One pass over the loops: the worker's open connections, and the
            # loop holding the fewest, which gets the client.
            active = 0
            least, least_active = loops[0], -1
            for loop in loops:
                held = loop.submitted - loop.finished
                active += held
                if least_active < 0 or held < least_active:
                    least, least_active = loop, held
            if siblings and active > BALANCE_SLACK and not force_first:
                if active > rows.lightest_of(siblings) + BALANCE_SLACK:
                    return DEFER
            if active >= self.max_connections:
                if not self.at_limit:
                    self.at_limit = True
                    log.warning("worker %d: at its limit of %d connections (open-file limit); "
                                "new clients wait in the accept queue", self.slot,
                                self.max_connections)
                return PAUSE
            self.at_limit = False
            if limit and shared[scope] + taken >= limit:  # type: ignore[index]
                return FULL
            try:
                # ``_accept`` (what ``socket.accept`` wraps) returns the bare
                # descriptor: building the socket object ourselves, with the
                # listener's family known, skips the enum conversions that
                # ``socket.accept`` spends on every client.
                fd, address = sock._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return QUEUE_EMPTY  # or a sibling worker was faster
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    log.warning("worker %d: cannot accept on %s: %s; pausing accept for "
                                "%.0f ms", self.slot, entry.listener.label, exc.strerror,
                                ACCEPT_PAUSE_S * 1000)
                    return PAUSE
                if exc.errno == errno.ECONNABORTED:
                    continue
                raise
            client = StreamSocket(family, _SOCK_STREAM, 0, fd)
            client.setblocking(False)
            if options:
                try:
                    apply_options(client, options)
                except OSError as exc:  # the client is already gone: nothing to serve
                    log.debug("client on %s closed before it was served: %s",
                              entry.listener.label, exc)
                    client.close()
                    continue
            counts[cell] += 1
            published[row] = active + 1
            peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
            gate = entry.gate
            if gate is None:
                least.submit(client, entry.balancer.targets(address), entry.timeout_s, peer,
                             options, listener_slot=entry.lslot, idle_s=entry.idle_s)
            else:
                self._submit_gated(least, client, address, entry, gate, peer)
            force_first = False
            taken += 1
        return BATCH_DONE


    @staticmethod
    def _submit_gated(loop: RelayLoop, client: StreamSocket, address: object, entry: Entry,
                      gate: Gate, peer: str) -> None:
        """A client of a listener with a pre-connect phase: its loop runs the pipeline.

        Costs one ``Admission``, and a ``getsockname`` (the destination a PROXY
        header sends) on a wildcard listener only; no backend is chosen before the
        pipeline's ``Accept``.
        """
        local = entry.local
        if local is None:
            try:
                local = client.getsockname()
            except OSError:  # gone already
                client.close()
                return
        admission = gate.open(address, local)
        loop.submit(client, None, entry.timeout_s, peer, entry.options,  # type: ignore[call-arg]
                    admission=admission, choose=gate.choose, listener_slot=entry.lslot,
                    idle_s=entry.idle_s)


class Outcome:
    """How one accept batch ended (compared by identity)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


QUEUE_EMPTY, BATCH_DONE, PAUSE, DEFER, FULL = (
    Outcome("queue empty"), Outcome("batch done"), Outcome("pause"), Outcome("defer"),
    Outcome("listener full"))
