"""One worker process: accept connections and hand them to a fixed pool of relay loops.

``Worker`` is built by the master before ``fork`` (cheap: it only records what
the child will need) and ``run`` is called in the child right after ``fork``;
it never returns, the child leaves through ``os._exit``.

Threads in a worker: ``threads`` relay threads each run a ``RelayLoop``; the
first of them also watches the listeners and accepts (``accept.AcceptPolicy``),
handing each client to the loop that holds the fewest connections, itself
included.  The main thread handles signals, stamps the worker's row
(``rows.WorkerRows``: heartbeat, open connections) at least every
``HEARTBEAT_S``, and runs the stop.  The thread
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

The accept policy (the fd budget, the sibling balance, the EMFILE back-off)
is ``accept.AcceptPolicy``; this module is the process's lifecycle: boot,
signals, heartbeat, stop.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import selectors
import signal
import socket
import time
from typing import Iterable, List, Optional, Sequence, Set, Tuple

from prefork_proxy import faults, hygiene, logsetup
from prefork_proxy.accept import AcceptPolicy
from prefork_proxy.accesslog import FLUSH_S, AccessLog
from prefork_proxy.balancer import Balancer
from prefork_proxy.config import Config, ListenerConfig
from prefork_proxy.errors import ProxyError
from prefork_proxy.gate import listener_gate, relay_supports_admission
from prefork_proxy.limits import ConnectionLimits
from prefork_proxy.listeners import stop_new_handshakes
from prefork_proxy.proctitle import set_title
from prefork_proxy.relay import RelayLoop, SocketOptions, keepalive_options
from prefork_proxy.rows import WorkerRows
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
#: How often the worker stamps its heartbeat and checks that its master is alive.
HEARTBEAT_S = 0.5
#: Allocations between two young-generation collections (CPython's default is 700).
GC_FIRST_THRESHOLD = 10_000
#: File descriptors kept free for pipes, logs and the like when sizing max_connections.
RESERVED_FDS_PER_THREAD = 8
RESERVED_FDS = 16

class Worker:
    """A worker slot's process: its config, its inherited listeners, its relay loops."""

    def __init__(self, slot: int, generation: int, config: Config,
                 listeners: Sequence[Tuple[ListenerConfig, socket.socket]],
                 shared: SharedState, mode: str, master_pid: int, board: WorkerRows,
                 row: int, limits: Optional[ConnectionLimits] = None) -> None:
        self.slot = slot
        self.limits = limits  # the master's shared connection limits (None: no listener sets one)
        self.board = board  # shared.rows; this worker writes only its own ``row``
        self.row = row
        self.generation = generation
        self.config = config
        self.listeners = list(listeners)
        self.shared = shared
        self.mode = mode
        self.master_pid = master_pid
        self.loops: List[RelayLoop] = []
        self.acceptor: Optional[AcceptPolicy] = None  # built at boot, in the child
        self.stopping = False
        self.orphaned = False  # the master died; set once
        self.drain_deadline: Optional[float] = None
        self.exit_code = 0  # set when the worker stops for a fault of its own
        self.signals: Optional[SignalQueue] = None
        self.access_log: Optional[AccessLog] = None  # [server] access_log; opened at boot

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
        # Exactly this worker's listeners stay open: not the master's wake-up
        # pipe, nor a listener a reload removed (see ``hygiene``).  Reload,
        # scaling and upgrade signals are the master's business, not ours, and
        # the meaningless ones are ignored.
        hygiene.detach_from_master(keep={sock.fileno() for _, sock in self.listeners},
                                   close=inherited_fds, default=(signal.SIGCHLD,),
                                   master_pid=self.master_pid)
        signals = self.signals = SignalQueue((signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                                              signal.SIGUSR1))
        rows, row = self.board, self.row
        entries = []
        labels = {}
        for index, (lst, sock) in enumerate(self.listeners):
            lslot = self.shared.listener_slot(index)
            labels[lslot] = lst.label
            balancer = Balancer(lst, self.shared, index, row, self.limits)
            routes = [Balancer(pool, self.shared, index, row, self.limits)
                      for pool in lst.route_pools()]
            # Compiled once per listener; None (no admission key): the seed's accept path.
            gate = listener_gate(lst, balancer, self.limits, lslot, routes)
            if gate is not None and not relay_supports_admission():
                raise ProxyError(f"listener {lst.label}: its admission keys need the relay's "
                                 "pre-connect phase, which this build lacks")
            entries.append(AcceptPolicy.entry(rows, row, lslot, lst, sock, balancer,
                                              self._socket_options(lst), gate,
                                              self.limits))
        server = self.config.server
        if server.access_log is not None:
            # The relay loops append records to its queue; this thread writes them.
            self.access_log = AccessLog(server.access_log, server.access_log_format, self.slot,
                                        labels, lambda: sum(loop.access_appended
                                                            for loop in self.loops))
        access = self.access_log.queue if self.access_log is not None else None
        acceptor = self.acceptor = AcceptPolicy(self.slot, rows, row, entries, self.loops)
        threads = self.config.server.relay_threads
        # The worker's buffer budget is split evenly: each loop owns its share,
        # so no lock is taken for it on the hot path.
        budget = max(1, self.config.server.buffer_budget_mb * 1024 * 1024 // threads)
        for index in range(threads):
            # The first loop also accepts: with one relay thread per worker (the
            # default with one worker per CPU) no client crosses threads at all.
            # Each loop counts into cells of its own in this worker's row
            # (one writer each: no lock); the master folds them at reap.
            loop = RelayLoop(self.mode, name=f"relay-{index}",
                             acceptor=acceptor if index == 0 else None, budget=budget,
                             on_crash=signals.wake, stats=rows.loop_stats(row, index),
                             access=access)
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
        acceptor.max_connections = self._connection_budget()
        self._tune_garbage_collector()
        log.info("worker %d booted: pid=%d threads=%d relay=%s max_connections=%d", self.slot,
                 os.getpid(), len(self.loops), self.mode, acceptor.max_connections)
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

    # -- the main thread

    def _serve(self, signals: SignalQueue) -> None:
        selector = selectors.DefaultSelector()
        selector.register(signals.read_fd, selectors.EVENT_READ, None)
        next_beat = 0.0
        access = self.access_log
        # With an access log, wake often enough to write its queue every FLUSH_S.
        tick = HEARTBEAT_S if access is None else min(HEARTBEAT_S, FLUSH_S)

        while not self.stopping:
            if access is not None:
                access.flush()
            for _ in selector.select(tick):
                signals.drain_wakeups()
            while signals.pending:
                signum = signals.pending.popleft()
                try:
                    faults.trip("worker.signal")
                    self._handle_signal(signum)
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
                    self._begin_stop(self.config.server.drain_timeout_s, sweep=True)
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
        self._begin_stop(self.config.server.drain_timeout_s, sweep=False)
        abandoned = sum(loop.close_abandoned() for loop in dead)
        if abandoned:
            log.warning("worker %d: closed %d client(s) handed to a dead relay thread",
                        self.slot, abandoned)

    def _beat(self, now: float) -> None:
        """Stamp the worker's row; the oldest relay-loop tick stands for the whole worker.

        A loop that has ended while the worker serves (its thread crashed) stops
        ticking too, so the master sees a hung worker and replaces it, rather
        than this thread handing clients to a loop that will never serve them.
        """
        ticks = [] if self.stopping else [loop.last_tick for loop in self.loops]
        oldest = min([now] + ticks)
        self.board.beat(self.row, oldest, self.active())

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGUSR1:
            logsetup.reopen_log_files()  # logs, and never raises, when a file cannot be
            if self.access_log is not None:
                self.access_log.reopen()  # what is queued goes to the old file first
        elif signum == signal.SIGTERM:
            if os.getppid() != self.master_pid:  # PR_SET_PDEATHSIG: the master died
                self._master_gone()
            self._begin_stop(self.config.server.drain_timeout_s, sweep=True)
        else:  # SIGINT, SIGQUIT: fast stop
            self._begin_stop(0.0, sweep=False)

    def _master_gone(self) -> None:
        """The master died: freeze the accept queues it can no longer freeze itself.

        Only on the master's death: on a retirement the same sockets keep
        serving the next generation.  The filter is on the shared socket, so
        every orphaned sibling is covered too; attaching it twice is harmless.
        """
        if self.orphaned:
            return
        self.orphaned = True
        if self.board.shared_listeners:
            # An upgrade is under way: another master accepts from these very
            # sockets, and a filter on them would hold off its clients too.
            log.warning("worker %d: master %d is gone; draining (the queues are left open: "
                        "another master accepts from them)", self.slot, self.master_pid)
            return
        frozen = sum(stop_new_handshakes(sock) for _, sock in self.listeners)
        log.warning("worker %d: master %d is gone; draining (new handshakes held off on %d "
                    "of %d listener(s))", self.slot, self.master_pid, frozen,
                    len(self.listeners))

    def _begin_stop(self, drain_timeout_s: float, sweep: bool) -> None:
        """Stop accepting (after one last sweep of the queues, if ``sweep``) and start draining."""
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
            if sweep and self.acceptor is not None:
                self.acceptor.sweep()
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
        access = self.access_log
        wait_s = HEARTBEAT_S if access is None else min(HEARTBEAT_S, FLUSH_S)
        for loop in self.loops:
            while not loop.join(wait_s) and time.monotonic() < deadline:
                self._beat(time.monotonic())  # still alive while draining
                if access is not None:
                    access.flush()
        self._beat(time.monotonic())
        if access is not None:
            access.close()  # the loops have ended: every record is queued; none is lost
        log.info("worker %d: stopped", self.slot)
