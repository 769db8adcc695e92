"""The master process: binds the listeners, forks the workers, and supervises them.

``Master.run`` is called by the CLI (or ``TcpProxy.bind``) in the process that
will become the master.  It stays single-threaded, so forking is safe, and its
loop reads like a table of contents: wait for a signal or a timer, handle what
was recorded, converge the worker table on the configured count.

Principle: the master owns the listening sockets for its whole life (see
``listeners``), so no worker's death or exit ever resets a queued connection.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import signal
import socket
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from prefork_proxy.config import Config
from prefork_proxy.errors import EXIT_FAILURE, EXIT_OK, ProxyError
from prefork_proxy.listeners import ListenerSet, bound_address
from prefork_proxy.relay import choose_mode
from prefork_proxy.shared import SharedState
from prefork_proxy.signals import SignalQueue
from prefork_proxy.proctitle import set_title
from prefork_proxy.worker import EXIT_BOOT_FAILED, Worker

log = logging.getLogger("prefork_proxy.master")

#: A worker that dies younger than this counts as a crash loop (respawn backs off).
MIN_HEALTHY_LIFETIME_S = 5.0
MAX_RESPAWN_DELAY_S = 30.0
#: Grace after the drain timeout before a stopping worker is killed.
KILL_GRACE_S = 5.0


@dataclass
class WorkerSlot:
    """A place in the worker table; ``pid`` is 0 while the slot waits for a respawn."""

    slot: int
    pid: int = 0
    started: float = 0.0
    respawn_at: float = 0.0
    fast_deaths: int = 0


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the resulting soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class Master:
    """Supervisor of one set of workers serving one config."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.listeners = ListenerSet()
        self.sockets: List[socket.socket] = []  # in the order of config.listeners
        self.slots: Dict[int, WorkerSlot] = {}
        self.pid = os.getpid()
        self.mode = "copy"
        self.shared: Optional[SharedState] = None
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK

    def run(self) -> int:
        """Serve until stopped; return the process exit code.

        Raises ``ProxyError`` (``BindError`` included) before anything is forked
        when the listeners cannot be bound or the relay mode is impossible.
        """
        self.pid = os.getpid()
        self.mode = choose_mode(self.config.server.relay)
        file_limit = raise_open_file_limit()
        self.sockets = self.listeners.open(self.config.listeners)
        self.shared = SharedState(self.config)
        set_title("prefork-proxy: master")
        signals = SignalQueue((signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                               signal.SIGHUP))
        try:
            for slot in range(self.config.server.workers):
                self.slots[slot] = WorkerSlot(slot)
                self.spawn(self.slots[slot])
            log.info("open-file limit %d: room for about %d idle connections per worker",
                     file_limit, max(0, (file_limit - 64) // 2))
            addresses = ",".join(bound_address(sock) for sock in self.sockets)
            log.info("ready pid=%d listeners=%s workers=%d threads=%d relay=%s", self.pid,
                     addresses, self.config.server.workers, self.config.server.threads,
                     self.mode)
            self._loop(signals)
        finally:
            self._kill_all(signal.SIGKILL)
            signals.close()
            self.listeners.close()
        log.info("master %d exiting with code %d", self.pid, self.exit_code)
        return self.exit_code

    # -- the loop

    def _loop(self, signals: SignalQueue) -> None:
        while True:
            try:
                select.select([signals.read_fd], [], [], self._next_timer())
            except InterruptedError:  # pragma: no cover - PEP 475 retries select
                pass
            signals.drain_wakeups()
            while signals.pending:
                self._handle(signals.pending.popleft())
            self.reap()
            if self.stopping:
                if not any(s.pid for s in self.slots.values()):
                    return
                if time.monotonic() >= self.stop_deadline:
                    log.warning("workers still running at the drain deadline; killing them")
                    self._kill_all(signal.SIGKILL)
            else:
                self.manage_workers()

    def _next_timer(self) -> float:
        now = time.monotonic()
        timeout = 1.0
        for slot in self.slots.values():
            if not slot.pid and slot.respawn_at:
                timeout = min(timeout, max(0.0, slot.respawn_at - now))
        return timeout

    def _handle(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # reap() runs after every wake-up
        if signum == signal.SIGHUP:
            log.warning("SIGHUP received: reloading is not implemented yet; ignoring")
            return
        if signum == signal.SIGTERM and not self.stopping:
            drain = self.config.server.drain_timeout_s
            log.info("SIGTERM: graceful stop, draining for up to %.1f s", drain)
            self._stop(signal.SIGTERM, drain)
        else:  # SIGINT, SIGQUIT, or a second SIGTERM: fast stop
            log.info("%s: fast stop", signal.Signals(signum).name)
            self._stop(signal.SIGQUIT, 0.0)

    def _stop(self, worker_signal: int, drain_timeout_s: float) -> None:
        self.stopping = True
        self.stop_deadline = time.monotonic() + drain_timeout_s + KILL_GRACE_S
        self._kill_all(worker_signal)

    # -- the worker table

    def spawn(self, slot: WorkerSlot) -> None:
        """Fork a worker for ``slot``.  The child never returns from here."""
        assert self.shared is not None
        worker = Worker(slot.slot, 1, self.config,
                        list(zip(self.config.listeners, self.sockets)),
                        self.shared, self.mode, self.pid)
        pid = os.fork()
        if pid == 0:
            worker.run()  # never returns
        slot.pid, slot.started, slot.respawn_at = pid, time.monotonic(), 0.0

    def reap(self) -> None:
        """Collect every exited child; schedule respawns, or stop when a worker cannot boot."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots.values() if s.pid == pid), None)
            if slot is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            slot.pid = 0
            if self.stopping:
                continue
            if code == EXIT_BOOT_FAILED:
                log.error("worker %d could not boot (exit code %d); stopping", slot.slot, code)
                self.exit_code = EXIT_FAILURE
                self._stop(signal.SIGQUIT, 0.0)
                continue
            lived = time.monotonic() - slot.started
            slot.fast_deaths = slot.fast_deaths + 1 if lived < MIN_HEALTHY_LIFETIME_S else 0
            delay = min(MAX_RESPAWN_DELAY_S, 0.1 * (2 ** slot.fast_deaths)) \
                if slot.fast_deaths > 1 else 0.0
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            log.warning("worker %d (pid %d) died with %s after %.1f s; respawning%s",
                        slot.slot, pid, how, lived, f" in {delay:.1f} s" if delay else "")
            slot.respawn_at = time.monotonic() + delay

    def manage_workers(self) -> None:
        """Respawn every empty slot whose backoff has passed."""
        now = time.monotonic()
        for slot in self.slots.values():
            if not slot.pid and now >= slot.respawn_at:
                self.spawn(slot)

    def _kill_all(self, signum: int) -> None:
        for slot in self.slots.values():
            if slot.pid:
                try:
                    os.kill(slot.pid, signum)
                except ProcessLookupError:
                    pass
                except OSError as exc:  # pragma: no cover
                    if exc.errno != errno.ESRCH:
                        raise


def serve(config: Config) -> int:
    """Run a master for ``config`` in this process; return its exit code."""
    try:
        return Master(config).run()
    except ProxyError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE


__all__: List[str] = ["Master", "WorkerSlot", "serve", "raise_open_file_limit"]
