"""One worker process: accept connections and hand them to a fixed pool of relay loops.

``Worker`` is built by the master before ``fork`` (cheap: it only records what
the child will need) and ``run`` is called in the child right after ``fork``;
it never returns, the child leaves through ``os._exit``.

Threads in a worker: ``threads`` relay threads each run a ``RelayLoop``; the
first of them also watches the listeners and accepts (``accept_ready``, with
the worker's balancing and limits), handing each client to the loop that
holds the fewest connections, itself included.  The main thread handles
signals, stamps the worker's scoreboard row (heartbeat, open and accepted
connections) at least every ``HEARTBEAT_S``, and runs the stop.  The thread
count is fixed at boot: 10 or 10,000 connections, same threads.

Principle (no hand-off on the hot path): a separate accept thread would
contend with the relay threads for the GIL on every system call of both; a
strace of the earlier design counted some fifty futex calls per connection.
Accepting on a relay loop removes that contention, and with one relay thread
per worker (``threads = "auto"`` with one worker per CPU) a client never
crosses threads.

Stopping: SIGTERM (from the master: a graceful stop, a reload or a scale-down)
makes the worker accept once more everything already queued, stop accepting,
and let its connections finish within ``drain_timeout_s``; SIGINT/SIGQUIT
close them at once.  A worker whose master dies (even by SIGKILL) notices at
once through ``PR_SET_PDEATHSIG``, or within ``HEARTBEAT_S`` by polling its
parent pid, and drains the same way, so no worker outlives the drain deadline.
With no master left to freeze the accept queues, it does so itself first (the
drop filter of ``listeners.stop_new_handshakes``, on the shared sockets): new
clients are held off at once instead of being queued and reset when the last
worker exits, and its last accept sweep serves those already queued.

Principle (accept only what can be served): each connection needs two file
descriptors (client and backend), so a worker computes at boot how many
connections its open-file limit allows (``max_connections``) and stops
accepting at that count.  Accepting a client and then failing to open its
backend socket would drop a client that the kernel had already accepted;
left in the kernel's queue (which the master keeps open), it is served as
soon as another connection ends.

Principle (even load across workers): every worker accepts from the same
kernel queue, so a worker that holds more connections than its lightest
accepting sibling (by more than ``BALANCE_SLACK``, counts from the
scoreboard) leaves a waiting client to that sibling: it stops watching its
listeners for ``DEFER_S``.  The kernel wakes every worker for a new client, so
the sibling is already on its way; if the client is still queued when the
pause ends, the sibling is busy, and this worker takes one client without
looking, so no client waits longer than ``DEFER_S`` for the balance.

Principle (accept never spins): while paused, or when ``accept`` fails
anyway with ``EMFILE``/``ENFILE``, the listener stays readable, and retrying
at once would burn a core.  The worker stops watching its listeners for
``ACCEPT_PAUSE_S`` instead.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import resource
import selectors
import signal
import socket
import time
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from prefork_proxy import faults, hygiene, logsetup
from prefork_proxy.balancer import Balancer
from prefork_proxy.config import Config, ListenerConfig
from prefork_proxy.listeners import stop_new_handshakes
from prefork_proxy.proctitle import set_title
from prefork_proxy.relay import (
    RelayLoop,
    SocketOptions,
    StreamSocket,
    apply_options,
    keepalive_options,
)
from prefork_proxy.scoreboard import Scoreboard
from prefork_proxy.shared import SharedState
from prefork_proxy.signals import SignalQueue

log = logging.getLogger("prefork_proxy.worker")

#: Exit code of a worker that could not boot; the master treats it as fatal.
EXIT_BOOT_FAILED = 3
#: Exit code of a worker that stopped because one of its relay threads died.
EXIT_RELAY_DIED = 4
#: Test-only: a path; when it exists, the first relay loop of a booting worker
#: deletes it and crashes on its next batch (tests/integration/test_relay_faults.py).
TEST_CRASH_ENV = "PREFORK_PROXY_TEST_CRASH_RELAY"
#: Connections accepted per readiness event before looking at other listeners.
ACCEPT_BATCH = 64
#: Outcomes of one accept batch.
QUEUE_EMPTY, BATCH_DONE, PAUSE, DEFER = "queue empty", "batch done", "pause", "defer"
#: A worker holding more than this many connections over its lightest sibling defers to it.
BALANCE_SLACK = 1
#: How often the accepting loop looks up which workers are its accepting siblings.
SIBLINGS_REFRESH_S = 0.1
#: How long a deferring worker leaves the queue to its siblings.
DEFER_S = 0.002
#: How long accepting pauses after running out of file descriptors.
ACCEPT_PAUSE_S = 0.1
#: How often the worker stamps its heartbeat and checks that its master is alive.
HEARTBEAT_S = 0.5
PR_SET_PDEATHSIG = 1
#: Allocations between two young-generation collections (CPython's default is 700).
GC_FIRST_THRESHOLD = 10_000
#: File descriptors kept free for pipes, logs and the like when sizing max_connections.
RESERVED_FDS_PER_THREAD = 8
RESERVED_FDS = 16

_SOCK_STREAM = int(socket.SOCK_STREAM)
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Worker:
    """A worker slot's process: its config, its inherited listeners, its relay loops."""

    def __init__(self, slot: int, generation: int, config: Config,
                 listeners: Sequence[Tuple[ListenerConfig, socket.socket]],
                 shared: SharedState, mode: str, master_pid: int, board: Scoreboard,
                 row: int) -> None:
        self.slot = slot
        self.board = board
        self.row = row
        self.accepted = 0
        self.generation = generation
        self.config = config
        self.listeners = list(listeners)
        self.shared = shared
        self.mode = mode
        self.master_pid = master_pid
        self.loops: List[RelayLoop] = []
        self.accepting: List[Tuple[ListenerConfig, socket.socket, Balancer]] = []
        self.by_listener: Dict[int, Tuple[ListenerConfig, socket.socket, Balancer]] = {}
        self.stopping = False
        self.orphaned = False  # the master died; set once
        self.drain_deadline: Optional[float] = None
        self.max_connections = 0
        self.at_limit = False
        self.families: Dict[int, int] = {}  # listener fd -> address family, as a plain int
        # listener fd -> options set on its clients and their backend sockets (keepalive)
        self.socket_options: Dict[int, SocketOptions] = {}
        self.siblings: List[int] = []  # scoreboard rows of the other accepting workers
        self.siblings_due = 0.0  # when to look them up again
        self.exit_code = 0  # set when the worker stops for a fault of its own
        self.signals: Optional[SignalQueue] = None

    # -- the child, after fork

    def run(self, signal_mask: Iterable[int] = (), inherited_fds: Iterable[int] = ()) -> None:
        """The child's whole life.  Never returns.

        The master forks with its signals blocked; ``signal_mask`` is the mask
        to restore once this worker's handlers are installed, and
        ``inherited_fds`` are the master's descriptors this child must close.
        """
        code = EXIT_BOOT_FAILED
        try:
            signals = self._boot(set(signal_mask), inherited_fds)
            self.board.booted[self.row] = 1
            code = 0
            self._serve(signals)
            code = self.exit_code
        except BaseException:
            log.exception("worker %d crashed", self.slot)
            code = code or 1
        finally:
            logging.shutdown()
            os._exit(code)

    def _boot(self, signal_mask: Set[int], inherited_fds: Iterable[int]) -> SignalQueue:
        set_title(f"prefork-proxy: worker {self.slot} gen {self.generation}")
        faults.trip("worker.boot")
        for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(signum, signal.SIG_IGN)  # the master's business, not ours
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signals = self.signals = SignalQueue((signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                                              signal.SIGUSR1))
        # Exactly this worker's listeners stay open: not the master's wake-up
        # pipe, nor a listener a reload removed (see ``hygiene``).
        hygiene.after_fork(keep={sock.fileno() for _, sock in self.listeners},
                           close=inherited_fds)
        self._ask_for_parent_death_signal()
        self.accepting = [(lst, sock, Balancer(lst, self.shared, index))
                          for index, (lst, sock) in enumerate(self.listeners)]
        self.by_listener = {entry[1].fileno(): entry for entry in self.accepting}
        self.families = {sock.fileno(): int(sock.family) for _, sock in self.listeners}
        self.socket_options = {sock.fileno(): self._socket_options(lst)
                               for lst, sock in self.listeners}
        threads = self.config.server.relay_threads
        # The worker's buffer budget is split evenly: each loop owns its share,
        # so no lock is taken for it on the hot path.
        budget = max(1, self.config.server.buffer_budget_mb * 1024 * 1024 // threads)
        for index in range(threads):
            # The first loop also accepts: with one relay thread per worker (the
            # default with one worker per CPU) no client crosses threads at all.
            loop = RelayLoop(self.mode, name=f"relay-{index}",
                             acceptor=self if index == 0 else None, budget=budget,
                             on_crash=signals.wake)
            if index == 0 and os.environ.get(TEST_CRASH_ENV):
                self._arm_test_crash(loop, os.environ[TEST_CRASH_ENV])
            self.loops.append(loop)
        # The accepting loop starts last: a worker that cannot start all its
        # threads (a memory limit) exits before it has taken a client from the
        # queues it shares with the generation that serves.
        for loop in reversed(self.loops):
            loop.start()  # relay threads inherit the blocked mask: signals go to this thread
        self.board.accepting[self.row] = 1
        signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)
        self.max_connections = self._connection_budget()
        self._tune_garbage_collector()
        log.info("worker %d booted: pid=%d threads=%d relay=%s max_connections=%d", self.slot,
                 os.getpid(), len(self.loops), self.mode, self.max_connections)
        return signals

    @staticmethod
    def _arm_test_crash(loop: RelayLoop, path: str) -> None:
        """Test-only (``TEST_CRASH_ENV``): make ``loop`` raise when it next takes
        in clients, once per existing ``path`` (respawned workers run normally)."""
        take_inbox = loop._take_inbox

        def crashing_take_inbox(woken: bool) -> None:
            try:
                os.unlink(path)
            except OSError:
                return take_inbox(woken)
            raise RuntimeError("injected relay crash (test)")

        loop._take_inbox = crashing_take_inbox  # type: ignore[method-assign]

    @staticmethod
    def _socket_options(listener: ListenerConfig) -> SocketOptions:
        """What ``tcp_keepalive`` asks of a listener's client and backend sockets.

        Set on each accepted client rather than once on the listener (whose
        options accepted sockets would inherit on Linux): the listener socket
        is shared with the other generation during a reload, and each
        generation serves its own config.  Cost: up to four ``setsockopt``
        calls per client, only where keepalive is asked for.
        """
        keepalive = listener.tcp_keepalive
        if keepalive is None:
            return ()
        return keepalive_options(keepalive.idle_s, keepalive.interval_s, keepalive.count)

    @staticmethod
    def _tune_garbage_collector() -> None:
        """Keep the cycle collector off the relay's hot path.

        Principle: connections are freed by reference counting (the relay
        makes no reference cycles), yet every few hundred allocations CPython
        runs a collection that scans young objects, and each new connection
        allocates dozens.  ``gc.freeze`` moves everything alive after boot
        (modules, config) out of the collector's sight for good, and a larger
        first threshold makes collections rarer; they still run, so a cycle
        made by some rare path is still freed.
        """
        gc.freeze()
        _, second, third = gc.get_threshold()
        gc.set_threshold(GC_FIRST_THRESHOLD, second, third)

    def _ask_for_parent_death_signal(self) -> None:
        """Have the kernel send SIGTERM when the master dies (Linux; polling covers the rest)."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        if os.getppid() != self.master_pid:  # it died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    def _connection_budget(self) -> int:
        """How many connections fit in the open-file limit, two descriptors each."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return 1 << 30
        in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 32
        reserved = RESERVED_FDS + RESERVED_FDS_PER_THREAD * len(self.loops)
        return max(1, (soft - in_use - reserved) // 2)

    def active(self) -> int:
        return sum(loop.active for loop in self.loops)

    # -- the first relay loop's thread (see ``RelayLoop``'s ``Acceptor``)

    def listening_sockets(self) -> List[socket.socket]:
        return [sock for _, sock, _ in self.accepting]

    def accept_ready(self, sock: socket.socket, force: bool) -> Optional[Tuple[float, bool]]:
        """A listener is readable: accept a batch; say how long to pause, if at all."""
        outcome = self._accept_batch(*self.by_listener[sock.fileno()], balance=True,
                                     force_first=force)
        if outcome == PAUSE:
            return ACCEPT_PAUSE_S, False
        if outcome == DEFER:
            return DEFER_S, True
        return None

    # -- the main thread

    def _serve(self, signals: SignalQueue) -> None:
        selector = selectors.DefaultSelector()
        selector.register(signals.read_fd, selectors.EVENT_READ, None)
        accepting = self.accepting
        next_beat = 0.0

        while not self.stopping:
            for _ in selector.select(HEARTBEAT_S):
                signals.drain_wakeups()
            while signals.pending:
                signum = signals.pending.popleft()
                try:
                    faults.trip("worker.signal")
                    self._handle_signal(signum, accepting)
                except Exception:  # a failed handler must not cut this worker's connections
                    log.exception("worker %d: unexpected error handling %s; going on",
                                  self.slot, signal.Signals(signum).name)
            if not self.exit_code:
                self._check_relay_threads()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + HEARTBEAT_S
                self._beat(now)
                if os.getppid() != self.master_pid and not self.stopping:
                    self._master_gone()
                    self._begin_stop(self.config.server.drain_timeout_s, accepting)
        selector.close()
        self._finish()

    def _check_relay_threads(self) -> None:
        """A relay thread that died (its loop's ``run`` raised) stops the worker.

        Clients handed to a dead loop would wait, unserved, until the master
        noticed the missing heartbeat (``worker_timeout_s``).  The dead loop
        wakes this thread at once (``on_crash``), so within milliseconds the
        worker stops accepting (leaving the queued clients to its siblings,
        with no last sweep that could hand them to the dead loop), closes the
        clients handed to it since, lets its other loops drain, and exits
        with ``EXIT_RELAY_DIED``; the master then respawns it.
        """
        dead = [loop for loop in self.loops if loop.crashed is not None]
        if not dead:
            return
        self.exit_code = EXIT_RELAY_DIED
        for loop in dead:
            log.error("worker %d: relay thread %s died (%s); stopping accepting and exiting so "
                      "that the other workers and a fresh worker take over", self.slot,
                      loop.name, loop.crashed)
        self._begin_stop(self.config.server.drain_timeout_s, [])
        abandoned = sum(loop.close_abandoned() for loop in dead)
        if abandoned:
            log.warning("worker %d: closed %d client(s) handed to a dead relay thread",
                        self.slot, abandoned)

    def _beat(self, now: float) -> None:
        """Stamp the scoreboard row; the oldest relay-loop tick stands for the whole worker.

        A loop that has ended while the worker serves (its thread crashed) stops
        ticking too, so the master sees a hung worker and replaces it, rather
        than this thread handing clients to a loop that will never serve them.
        """
        ticks = [] if self.stopping else [loop.last_tick for loop in self.loops]
        oldest = min([now] + ticks)
        self.board.beat(self.row, oldest, self.active(), self.accepted)

    def _accept_batch(self, listener: ListenerConfig, sock: socket.socket,
                      balancer: Balancer, balance: bool = False,
                      force_first: bool = False) -> str:
        """Accept what is queued, up to a batch.

        Returns ``QUEUE_EMPTY``, ``BATCH_DONE`` when the batch ran out first
        (epoll reports the rest), ``PAUSE`` to stop accepting for a while, or
        (only when ``balance`` is asked for) ``DEFER`` to leave the queue to a
        lighter sibling for a moment.  ``force_first`` takes the first client
        without looking at the balance (the sibling had its chance).
        """
        timeout_s = listener.connect_timeout_ms / 1000.0
        family = self.families[sock.fileno()]
        options = self.socket_options[sock.fileno()]
        board, row, loops = self.board, self.row, self.loops
        siblings: List[int] = []
        if balance:
            now = time.monotonic()
            if now >= self.siblings_due:
                self.siblings = board.accepting_rows(exclude=row)
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
                if active > board.lightest_of(siblings) + BALANCE_SLACK:
                    return DEFER
            if active >= self.max_connections:
                if not self.at_limit:
                    self.at_limit = True
                    log.warning("worker %d: at its limit of %d connections (open-file limit); "
                                "new clients wait in the accept queue", self.slot,
                                self.max_connections)
                return PAUSE
            self.at_limit = False
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
                                "%.0f ms", self.slot, listener.label, exc.strerror,
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
                              listener.label, exc)
                    client.close()
                    continue
            self.accepted += 1
            board.active[row] = active + 1
            peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
            least.submit(client, balancer.targets(address), timeout_s, peer, options)
            force_first = False
        return BATCH_DONE

    def _handle_signal(self, signum: int, accepting: List[Tuple[ListenerConfig, socket.socket,
                                                                  Balancer]]) -> None:
        if signum == signal.SIGUSR1:
            logsetup.reopen_log_files()  # logs, and never raises, when a file cannot be
        elif signum == signal.SIGTERM:
            if os.getppid() != self.master_pid:  # PR_SET_PDEATHSIG: the master died
                self._master_gone()
            self._begin_stop(self.config.server.drain_timeout_s, accepting)
        else:  # SIGINT, SIGQUIT: fast stop
            self._begin_stop(0.0, [])

    def _master_gone(self) -> None:
        """The master died: freeze the accept queues it can no longer freeze itself.

        Only on the master's death: on a retirement the same sockets keep
        serving the next generation.  The filter is on the shared socket, so
        every orphaned sibling is covered too; attaching it twice is harmless.
        """
        if self.orphaned:
            return
        self.orphaned = True
        frozen = sum(stop_new_handshakes(sock) for _, sock in self.listeners)
        log.warning("worker %d: master %d is gone; draining (new handshakes held off on %d "
                    "of %d listener(s))", self.slot, self.master_pid, frozen,
                    len(self.listeners))

    def _begin_stop(self, drain_timeout_s: float,
                    accepting: List[Tuple[ListenerConfig, socket.socket, Balancer]]) -> None:
        """Stop accepting (after one last sweep of the queues) and start draining."""
        if self.stopping and drain_timeout_s >= self._drain_left():
            return
        self.board.accepting[self.row] = 0
        if not self.stopping:
            # The accepting loop stops first, so that after this sweep nothing
            # more is taken from the queues; whatever the kernel already
            # queued is served, not left to be reset.
            if not self.loops[0].stop_accepting():
                log.warning("worker %d: the accepting relay loop did not confirm that it "
                            "stopped accepting", self.slot)
            for entry in accepting:
                while self._accept_batch(*entry) == BATCH_DONE:
                    pass
        if not self.stopping:
            log.info("worker %d gen %d: stopped accepting; draining %d connection(s) for up to "
                     "%.1f s", self.slot, self.generation, self.active(), drain_timeout_s)
        self.stopping = True
        self.drain_deadline = time.monotonic() + drain_timeout_s
        for loop in self.loops:
            loop.stop(drain_timeout_s)

    def _drain_left(self) -> float:
        return max(0.0, (self.drain_deadline or 0.0) - time.monotonic())

    def _finish(self) -> None:
        """Wait for the relay loops to drain (they close what is left at the deadline)."""
        deadline = time.monotonic() + self._drain_left() + 5.0
        for loop in self.loops:
            while not loop.join(HEARTBEAT_S) and time.monotonic() < deadline:
                self._beat(time.monotonic())  # still alive while draining
        self._beat(time.monotonic())
        log.info("worker %d: stopped", self.slot)
