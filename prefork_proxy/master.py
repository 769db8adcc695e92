"""The master process: binds the listeners, forks the workers, and supervises them.

``Master.run`` is called by the CLI (or ``TcpProxy.bind``) in the process that
becomes the master.  It stays single-threaded, so forking is always safe, and
its loop reads like a table of contents: wait for a signal or a timer, handle
what was recorded, reap the dead, converge the worker table, write status.

Signals (the semantics of gunicorn and nginx, which operators know):

- SIGCHLD: reap; a worker that died unexpectedly is respawned in its slot,
  with exponential backoff when it keeps dying young.  A worker that cannot
  boot at first start (before any worker has booted) stops the master with an
  error instead of a respawn storm; later (a respawn) it is retried with the
  same backoff, and the workers that serve are left alone.
- SIGTERM: graceful stop.  New handshakes are stopped, the workers accept
  what is already queued, then let their connections run until they end or
  ``drain_timeout_s`` passes.  A second SIGTERM, SIGINT or SIGQUIT: fast stop.
- SIGHUP: reload, as a transaction.  The config is loaded and validated
  again; if invalid, the error is logged and nothing changes.  If valid,
  listeners are reconciled (an unchanged address keeps its socket) and a new
  generation of workers is forked; the old generation stops accepting and
  drains only once every new worker has booted.  If the new generation cannot
  boot (a worker exits with the boot-failure code, dies before booting, cannot
  be forked, or has not booted within ``worker_timeout_s``), it is stopped and
  everything is rolled back: the old generation keeps serving the old config,
  and ``status`` shows why the reload failed.
- SIGTTIN / SIGTTOU: one worker more / fewer (never below one).
- SIGUSR1: reopen log files, here and in every worker.
- SIGUSR2: in-place upgrade (``upgrade``): a new master is started from the
  program on disk and handed the listening sockets; once it serves, this one
  drains and exits 0; if it fails, this one serves on.
- SIGWINCH, SIGALRM, SIGVTALRM, SIGPROF, SIGPWR, SIGIO, SIGXCPU, SIGXFSZ,
  SIGSTKFLT and the real-time signals (``IGNORED_SIGNALS``): they mean nothing
  here, and their default action would kill the master, so each is logged and
  ignored.  Workers ignore them (and the master's signals) silently.

Principle: the master owns the listening sockets for its whole life (see
``listeners``), so no worker's death, retirement or replacement ever resets
a connection waiting in an accept queue.

Principle (the master never dies of an error): each step of the loop (a
signal's handler, reap, supervision, the worker table, health, status) runs
guarded: an unexpected exception is logged with its traceback and the loop
goes on.  Only an explicit stop ends it; its ``finally`` kills every worker,
so letting an error reach it would cut every connection.

The admin endpoint (``[admin]``, ``admin/process.py``) hangs on a few
clearly marked hooks: bind before any fork, the loop heartbeat and a restart
check each turn, the stopping flag set before handshakes stop, the status
model published with the status file, its process stopped last.  The control
socket (``backend_control``, ``prefork-proxy backend``) likewise: created after
the privilege drop, its fds in the loop's ``select``, one ``control`` step.
``[server] watch_config`` (``config_watch``) is one ``watch_config`` step.

Principle (supervision by heartbeat): every worker stamps its row (``rows``)
at least once a second from its main thread, with the oldest tick of its
relay loops, so a worker whose any thread stops turning is killed and replaced
after ``worker_timeout_s``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import select
import signal
import socket
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from prefork_proxy import (
    backend_control,
    children,
    control,
    faults,
    handover,
    hygiene,
    logsetup,
    notify,
)
from prefork_proxy import status as status_model
from prefork_proxy.admin.process import AdminEndpoint
from prefork_proxy.config import Config
from prefork_proxy.config_watch import ConfigWatch
from prefork_proxy.errors import EXIT_FAILURE, EXIT_OK, ProxyError
from prefork_proxy.gate import connection_limits, source_shares, sources_for
from prefork_proxy.health import HealthChecker
from prefork_proxy.limits import ConnectionLimits
from prefork_proxy.listeners import ListenerSet, bound_address
from prefork_proxy.privileges import drop_privileges, prepare_runtime_dir, serving_ids
from prefork_proxy.proctitle import set_title
from prefork_proxy.relay import choose_mode
from prefork_proxy.rows import LISTENER_SLOTS, WorkerRows
from prefork_proxy.shared import SharedState
from prefork_proxy.signals import IGNORED_SIGNALS, SignalQueue, signal_name
from prefork_proxy.upgrade import Upgrades, current_version
from prefork_proxy.worker import EXIT_BOOT_FAILED, Worker

log = logging.getLogger("prefork_proxy.master")

#: A worker that dies younger than this counts toward a crash loop (respawn backs off).
MIN_HEALTHY_LIFETIME_S = 5.0
MAX_RESPAWN_DELAY_S = 30.0
#: Grace after the drain timeout before a stopping worker is killed.
KILL_GRACE_S = 5.0
STATUS_INTERVAL_S = 1.0
#: How often the loop looks at the worker rows while a new generation boots.
BOOT_POLL_S = 0.05
#: After a loop step failed, the loop waits at least this long (no busy loop of tracebacks).
FAILED_STEP_PAUSE_S = 0.1
#: Shortest wait before retrying a fork that failed (EAGAIN, ENOMEM).
FORK_RETRY_MIN_S = 0.1

#: How often the loop looks at the scoreboard while an upgrade's new master boots.
UPGRADE_POLL_S = 0.05

HANDLED_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2) \
    + IGNORED_SIGNALS


@dataclass
class WorkerProcess:
    """A live worker, as the master tracks it."""

    pid: int
    slot: int
    generation: int
    row: int  # its row in shared.rows
    started: float
    retiring: bool = False
    kill_at: float = 0.0  # when a retiring worker is killed if still alive
    boot_timed_out: bool = False  # killed for not booting within worker_timeout_s
    hung: bool = False  # killed for a silent heartbeat


@dataclass
class SlotHistory:
    """What the master remembers of a slot between respawns (crash-loop backoff)."""

    fast_deaths: int = 0
    respawn_at: float = 0.0


@dataclass
class PendingReload:
    """What a reload replaced, kept until its new generation has booted (or to roll back)."""

    config: Config
    sockets: List[socket.socket]
    mode: str
    desired: int
    generation: int  # the generation that serves until the new one has booted
    new_generation: int
    history: Dict[int, "SlotHistory"]
    shared: object  # SharedState.snapshot()
    deadline: float  # the new generation must have booted by then


#: ``prefork_proxy_worker_restarts_total{reason}``: why a worker died unplanned.
RESTART_REASONS = ("exit", "signal", "hung", "boot_failed")
#: ``prefork_proxy_reloads_total{result}``: invalid (the config or a bind was refused,
#: nothing changed), failed (the new generation could not start: rolled back), ok.
RELOAD_RESULTS = ("ok", "invalid", "failed")


def restart_reason(code: int, boot_failed: bool, hung: bool) -> str:
    """The ``reason`` label of an unplanned worker death (``code``: waitstatus_to_exitcode)."""
    if boot_failed:
        return "boot_failed"
    if hung:
        return "hung"
    return "signal" if code < 0 else "exit"


def crash_loop_delay(fast_deaths: int) -> float:
    """The respawn delay after ``fast_deaths`` quick deaths (or failed forks) in a row."""
    if fast_deaths <= 1:
        return 0.0
    return min(MAX_RESPAWN_DELAY_S, 0.1 * 2 ** (fast_deaths - 1))


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
    """Supervisor of the workers serving the current config."""

    def __init__(self, config: Config, loader: Optional[Callable[[], Config]] = None,
                 command: Optional[List[str]] = None) -> None:
        """``command``: how to start this program again (SIGUSR2); None: no upgrades."""
        self.config = config
        self.loader = loader  # re-reads the config on SIGHUP; None: started without a file
        # [server] watch_config: the file's content, polled from the loop (config_watch)
        self.watch = ConfigWatch(config.source) if loader and config.source else None
        if self.watch is not None and loader is not None:
            self.loader = self.watch.loading(loader)
        self.listeners = ListenerSet()
        self.sockets: List[socket.socket] = []  # in the order of config.listeners
        self.workers: Dict[int, WorkerProcess] = {}  # by pid
        self.history: Dict[int, SlotHistory] = {}  # by slot
        self.desired = config.server.workers
        self.generation = 1
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.mode = "copy"
        self.shared: Optional[SharedState] = None
        #: Shared connection limits (``gate.connection_limits``): created before the first
        #: fork when a listener sets a limit, else on the first reload that sets one, and
        #: kept for the master's life (its size is fixed then), so a reload that keeps a
        #: listener keeps its open counts (scopes are the stable listener slots): the old
        #: generation's connections still count against the new generation's limits, and
        #: release theirs as they end.  A listener a reload removes frees its slot; one
        #: added later in that slot sees the draining ones' counts until they end.
        self.limits: Optional[ConnectionLimits] = None
        self.health: Optional[HealthChecker] = None  # checks and DNS, in their own process
        self.board: Optional[WorkerRows] = None  # shared.rows: one row per worker
        self.admin: Optional[AdminEndpoint] = None  # the HTTP admin endpoint, if configured
        self.control: Optional[backend_control.ControlServer] = None  # `prefork-proxy backend`
        self.admin_handed_over = False  # an upgrade's new master serves it now
        self.signal_queue: Optional[SignalQueue] = None
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.next_status = 0.0
        self.pidfile: Optional[control.PidFile] = None  # locked for the master's life
        self.status_error = ""  # the last failure to write the status file, if any
        self.status_warned_at = 0.0
        self.last_generation = self.generation  # generation numbers are never reused
        self.pending: Optional[PendingReload] = None  # a reload whose generation boots
        self.reload_requested = False  # a SIGHUP that came while a reload was pending
        self.last_reload: Optional[Dict[str, object]] = None  # for the status file
        self.served = False  # a worker has booted: boot failures are retried, not fatal
        self.step_failed = False
        self.spawn_error = ""
        self.upgrades = Upgrades(self, command)
        # Sockets handed over by the master this one upgrades (the listeners are
        # in self.listeners); named others (``take``) are for their owners.
        self.inherited = handover.Inherited()
        # Counters for the master's life (metrics; published in the status model):
        # unplanned worker deaths by reason, and reload results.
        self.worker_restarts: Dict[str, int] = dict.fromkeys(RESTART_REASONS, 0)
        self.reloads: Dict[str, int] = dict.fromkeys(RELOAD_RESULTS, 0)

    # -- lifetime

    def run(self) -> int:
        """Serve until stopped; return the process exit code.

        Raises ``ProxyError`` (``BindError`` included) before anything is forked
        when the listeners cannot be bound or the relay mode is impossible.
        """
        self.pid = os.getpid()
        self.mode = choose_mode(self.config.server.relay)
        file_limit = raise_open_file_limit()
        server = self.config.server
        pidfile = self.pidfile = control.PidFile(server.pidfile) if server.pidfile else None
        # Sockets this master is given instead of binding: by the master it
        # upgrades (SIGUSR2 there), or by systemd (socket activation).
        inherited = self.inherited = handover.take_inherited()
        self.listeners.adopt(inherited.listeners())
        self.listeners.adopt_by_address(handover.take_systemd_sockets())
        self.upgrades.adopt_predecessor(inherited)
        try:
            if pidfile:
                # Locked before binding: a second start on this pidfile is told so.
                owner = prepare_runtime_dir(pidfile.path, server.user, server.group)
                pidfile.acquire(self.pid, owner)
            # Unix listeners' files belong to the serving user (bound while root).
            self.listeners.owner = serving_ids(server.user, server.group)
            self.sockets = self.listeners.open(self.config.listeners)
            for address in self.listeners.close_unadopted():
                log.warning("inherited listener %s is not in the config; this master does not "
                            "serve it", address)
            self._open_admin()
            self.inherited.close_rest()  # a handed-over socket this config has no use for
            # Shared memory first: allocating it may need files only root can create.
            self.shared = SharedState(self.config)
            # Before the first fork, so every worker inherits the same mapping.
            self.limits = connection_limits(self.config)
            self._share_sources()
            self.health = HealthChecker(self.shared)
            self.board = self.shared.rows
            self.board.shared_listeners = self.upgrades.other_master_accepts()
            drop_privileges(self.config.server.user, self.config.server.group)
            self._open_control()  # as the serving user: it owns the socket
            set_title("prefork-proxy: master")
            signals = self.signal_queue = SignalQueue(HANDLED_SIGNALS)
            for fd in signals.fds() + tuple(self.upgrades.fds()):  # the master's alone
                hygiene.master_only(fd)
        except BaseException:
            # A new master failing at start leaves its predecessor's files alone.
            unlink = not self.upgrades.other_master_accepts()
            self.upgrades.close()
            self.listeners.close(unlink=unlink)
            if self.control is not None:
                self.control.close()
            if self.admin is not None:
                self.admin.close()
            if pidfile:
                pidfile.remove()
            raise
        try:
            self._admin_tick(time.monotonic())
            self._step("manage_workers", self.manage_workers)
            log.info("open-file limit %d: room for about %d idle connections per worker",
                     file_limit, max(0, (file_limit - 64) // 2))
            log.info("ready pid=%d listeners=%s workers=%d threads=%d relay=%s version=%s",
                     self.pid, ",".join(bound_address(sock) for sock in self.sockets),
                     self.desired, self.config.server.relay_threads, self.mode,
                     current_version())
            if self.upgrades.predecessor is None:
                # (An upgrade's new master is not systemd's main process yet: the
                # old one sends MAINPID= and READY=1 once this one reports ready.)
                self._notify("ready")
            self._loop(signals)
        finally:
            # Unix socket files stay when another master serves them: the one this
            # master handed over to, or the one whose upgrade failed here.
            unlink = not (self.upgrades.handed_over or self.upgrades.other_master_accepts())
            self.upgrades.close()
            self._signal_all(signal.SIGKILL)
            if self.health is not None:
                self.health.stop()
            signals.close()
            self.listeners.close(unlink=unlink)
            if self.control is not None:
                self.control.close()
            if pidfile:
                pidfile.remove()
            if self.admin is not None:  # last: /live answers until the master exits
                self.admin.stop()
                self.admin.close()
        log.info("master %d exiting with code %d", self.pid, self.exit_code)
        return self.exit_code

    def _loop(self, signals: SignalQueue) -> None:
        while True:
            try:
                if self._turn(signals):
                    return
            except Exception:  # outside any step: still not a reason to cut every connection
                self.step_failed = True
                log.exception("master: unexpected error in its loop; going on")

    def _turn(self, signals: SignalQueue) -> bool:
        """One turn of the loop; True once an explicit stop has finished."""
        control_fds = self.control.fds() if self.control is not None else []
        waited = [signals.read_fd, *control_fds, *self.upgrades.fds()]
        select.select(waited, [], [], self._next_timer())
        self.step_failed = False
        signals.drain_wakeups()
        while signals.pending:
            self._step("signal", self._handle, signals.pending.popleft())
        self._step("reap", self.reap)
        now = time.monotonic()
        self._step("admin", self._admin_tick, now)
        if self.control is not None:
            self._step("control", self.control.serve, now)
        self._step("upgrade", self.upgrades.progress, now)
        if self.stopping:
            if not self.workers:
                return True
            if now >= self.stop_deadline:
                log.warning("%d worker(s) still running at the drain deadline; killing",
                            len(self.workers))
                self._signal_all(signal.SIGKILL)
                self.stop_deadline = now + KILL_GRACE_S
        else:
            self._step("supervise", self.kill_hung_and_overdue, now)
            self._step("reload_progress", self.reload_progress, now)
            self._step("watch_config", self._watch_config, now)
            self._step("manage_workers", self.manage_workers)
            self._step("close_sockets", self.close_unused_sockets)
            if self.health is not None:
                # (re)starts the health-check process as needed
                self._step("health", self.health.tick)
        if now >= self.next_status:
            self.next_status = now + STATUS_INTERVAL_S
            self._step("write_status", self.write_status, now)
            if self.limits is not None:  # rows of processes that died unseen by reap
                self._step("sweep_limits", self.limits.sweep)
        return False

    def _step(self, name: str, action: Callable[..., object], *args: object) -> None:
        """Run one step of the loop; an unexpected error is logged, and the loop goes on."""
        try:
            faults.trip(f"master.{name}")
            action(*args)
        except Exception:
            self.step_failed = True
            log.exception("master: unexpected error in %s; the master goes on", name)

    def _next_timer(self) -> float:
        now = time.monotonic()
        timeout = min(STATUS_INTERVAL_S, self.next_status - now)  # the first one at once
        for history in self.history.values():
            if history.respawn_at > now:
                timeout = min(timeout, history.respawn_at - now)
        if self.pending is not None:  # boots are seen in the worker rows: look often
            timeout = min(timeout, BOOT_POLL_S)
        if self.step_failed:
            timeout = max(timeout, FAILED_STEP_PAUSE_S)
        predecessor = self.upgrades.predecessor
        if predecessor is not None and not predecessor.ready_sent:
            timeout = min(timeout, UPGRADE_POLL_S)  # boots are seen on the scoreboard
        return max(0.0, timeout)

    def _handle(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # reap() runs after every wake-up
        if signum in IGNORED_SIGNALS:
            log.info("%s ignored: it means nothing to prefork-proxy (see the signal table in "
                     "README.md)", signal_name(signum))
            return
        if self.stopping and signum not in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            return
        if signum == signal.SIGHUP:
            self.reload()
        elif signum == signal.SIGTTIN:
            self.desired += 1
            if self.pending is not None:  # a rolled-back reload keeps the change
                self.pending.desired += 1
            log.info("SIGTTIN: workers %d -> %d", self.desired - 1, self.desired)
        elif signum == signal.SIGTTOU:
            if self.desired > 1:
                self.desired -= 1
                if self.pending is not None and self.pending.desired > 1:
                    self.pending.desired -= 1
                log.info("SIGTTOU: workers %d -> %d", self.desired + 1, self.desired)
            else:
                log.info("SIGTTOU ignored: already at one worker")
        elif signum == signal.SIGUSR2:
            self.upgrades.request()
        elif signum == signal.SIGUSR1:
            logsetup.reopen_log_files()  # logs, and never raises, when a file cannot be
            log.info("SIGUSR1: log files reopened; asking workers to do the same")
            self._signal_all(signal.SIGUSR1)
        elif signum == signal.SIGTERM and not self.stopping:
            drain = self.config.server.drain_timeout_s
            log.info("SIGTERM: graceful stop, draining for up to %.1f s", drain)
            self._stop(signal.SIGTERM, drain)
        else:  # SIGINT, SIGQUIT, or a second SIGTERM
            log.info("%s: fast stop", signal.Signals(signum).name)
            self._stop(signal.SIGQUIT, 0.0)

    def _stop(self, worker_signal: int, drain_timeout_s: float) -> None:
        shared = self.upgrades.other_master_accepts()
        if shared and self.exit_code == EXIT_FAILURE and worker_signal == signal.SIGQUIT:
            # A new master failing before it is ready: the clients its workers
            # took are served to the end, the old master takes the next ones.
            worker_signal, drain_timeout_s = signal.SIGTERM, self.config.server.drain_timeout_s
        if not self.stopping:
            if self.admin is not None:  # /ready turns 503 before handshakes stop
                self.admin.set_stopping()
            self.next_status = 0.0  # and /status says so on the next turn
            self._notify("stopping")
            # Freeze the accept queues first: the workers' last accept sweep then
            # empties them, and closing them at exit resets nobody.  Not while
            # another master accepts from them (an upgrade): the filter is on
            # the socket, so it would freeze that master's clients too.
            if shared:
                log.info("not freezing the accept queues: master %s accepts from them too",
                         self._other_master())
            else:
                self.listeners.stop_new_handshakes()
            self.listeners.close_retired()
        self.stopping = True
        self.stop_deadline = time.monotonic() + drain_timeout_s + KILL_GRACE_S
        self._signal_all(worker_signal)

    # -- upgrade (see ``upgrade``)

    def handover_sockets(self) -> Dict[str, socket.socket]:
        """Every socket a new master takes over, by its hand-over name."""
        named = {handover.listener_name(key): sock for key, sock in self.listeners.named().items()}
        named.update(self.extra_handover_sockets())
        return named

    def extra_handover_sockets(self) -> Dict[str, socket.socket]:
        """Named sockets beside the listeners: the admin endpoint's."""
        return {"admin": self.admin.sock} if self.admin is not None else {}

    def hand_over(self) -> None:
        """A new master serves: stop as on SIGTERM, without touching the shared queues."""
        drain = self.config.server.drain_timeout_s
        log.info("handing over: generation %d stops accepting and drains for up to %.1f s",
                 self.generation, drain)
        self.listeners.close_retired()
        if self.admin is not None:
            # The new master's admin process answers on the same socket; this one's
            # would say "not ready" (draining) to the probes that reach it.
            self.admin_handed_over = True
            self.admin.stop()
        self.stopping = True
        self.stop_deadline = time.monotonic() + drain + KILL_GRACE_S
        self._signal_all(signal.SIGTERM)

    def _other_master(self) -> str:
        upgrades = self.upgrades
        if upgrades.successor is not None:
            return str(upgrades.successor.pid)
        return str(upgrades.predecessor.pid) if upgrades.predecessor else "?"

    def board_shared(self, shared: bool) -> None:
        if self.board is not None:
            self.board.shared_listeners = shared

    def all_workers_booted(self) -> bool:
        """Every slot of the current generation has a worker that serves."""
        if self.board is None or self.stopping:
            return False
        booted = {w.slot for w in self.workers.values()
                  if w.generation == self.generation and not w.retiring
                  and self.board.booted[w.row]}
        return len(booted) >= self.desired

    def reload_in_progress(self) -> bool:
        """A reload's new generation is still booting (an upgrade waits for it)."""
        return self.pending is not None

    @property
    def version(self) -> str:
        return current_version()

    @property
    def upgrade_status(self) -> Optional[Dict[str, object]]:
        return self.upgrades.status()

    def write_status_now(self) -> None:
        self.write_status(time.monotonic())

    # -- reload

    def reload(self) -> None:
        """SIGHUP: load the config again and start a new generation for it, or keep the old.

        Only the loading, validating and binding happen here; the old
        generation retires in ``reload_progress`` once the new one has booted,
        or the new one is stopped and everything rolled back.
        """
        if self.loader is None:
            log.warning("SIGHUP: started without --config, so there is nothing to reload")
            return
        if self.pending is not None:
            self.reload_requested = True
            log.info("SIGHUP: generation %d is still booting; reloading again once it serves "
                     "or fails", self.generation)
            return
        self._notify("reloading")
        try:
            config = self.loader()
            mode = choose_mode(config.server.relay)
            sockets = self.listeners.open(config.listeners)
        except ProxyError as exc:
            log.error("reload failed, still serving generation %d: %s", self.generation, exc)
            self._record_reload(False, str(exc), self.generation, "invalid")
            self._notify("ready")
            return
        except Exception as exc:  # a bug while loading must not take the serving proxy down
            log.exception("reload failed, still serving generation %d", self.generation)
            # e.g. EMFILE half-way through binding: what was bound so far is not ours.
            self._retire_unused_listeners()
            self._record_reload(False, f"unexpected error: {exc!r}", self.generation, "failed")
            self._notify("ready")
            return
        try:
            self._start_generation(config, mode, sockets)
        except Exception as exc:  # e.g. shared.reconfigure: roll back, keep serving
            log.exception("reload: unexpected error while starting the new generation")
            self._rollback_reload(f"unexpected error while starting the new generation: "
                                  f"{exc!r}")

    def _watch_config(self, now: float) -> None:
        """``[server] watch_config``: the file's content changed: reload as SIGHUP does."""
        if self.watch is not None and self.config.server.watch_config and self.watch.poll(now):
            self.reload()

    def _start_generation(self, config: Config, mode: str,
                          sockets: List[socket.socket]) -> None:
        assert self.shared is not None
        now = time.monotonic()
        # Recorded first, so that whatever fails from here on is rolled back.
        self.last_generation += 1  # burnt even if the reload fails: numbers never repeat
        self.pending = PendingReload(self.config, self.sockets, self.mode, self.desired,
                                     self.generation, self.last_generation, self.history,
                                     self.shared.snapshot(),
                                     now + config.server.worker_timeout_s)
        self.shared.reconfigure(config)
        if self.limits is None:  # the first config with a limit: the new workers inherit it
            self.limits = connection_limits(config)
        elif sources_for(config) > self.limits.capacity:
            # Fixed at creation (workers map it): more distinct sources than it holds are
            # refused with ``source_table_full`` (known sources go on).  A restart resizes.
            log.warning("reload: the connection limits table holds %d sources; this config "
                        "may need %d: new sources beyond it are refused until a restart",
                        self.limits.capacity, sources_for(config))
        self._share_sources(config)
        faults.trip("master.reload")  # as if reconfigure failed half-way
        self.config, self.sockets, self.mode = config, sockets, mode
        self.desired = config.server.workers
        self.generation = self.pending.new_generation
        self.history = {}
        set_title(f"prefork-proxy: master gen {self.generation}")
        log.info("reload: generation %d starting (listeners=%s workers=%d); generation %d "
                 "serves until it has booted", self.generation,
                 ",".join(bound_address(s) for s in sockets), self.desired,
                 self.pending.generation)
        self.manage_workers()  # the new generation starts; the old one still accepts

    def reload_progress(self, now: float) -> None:
        """Commit a reload whose generation has booted, or roll back one that cannot boot."""
        assert self.board is not None
        booted = self.board.booted
        pending = self.pending
        if pending is None:
            if not self.served:
                self.served = any(booted[w.row] for w in self.workers.values())
            if self.reload_requested:
                self.reload_requested = False
                self.reload()
            return
        new = [w for w in self.workers.values()
               if w.generation == self.generation and not w.retiring]
        if len(new) >= self.desired and all(booted[w.row] for w in new):
            self._commit_reload(now)
        elif now >= pending.deadline:
            waiting = sorted(w.slot for w in new if not booted[w.row])
            self._rollback_reload(
                f"generation {self.generation} did not boot within "
                f"{self.config.server.worker_timeout_s:g} s (worker_timeout_s); "
                f"workers not booted: {waiting or 'not started'}")

    def _commit_reload(self, now: float) -> None:
        pending, self.pending = self.pending, None
        assert pending is not None
        self.served = True
        self._retire_unused_listeners()
        for worker in list(self.workers.values()):
            if worker.generation != self.generation:
                self._retire(worker, now)
        log.info("reloaded: generation %d serves listeners=%s workers=%d; generation %d drains",
                 self.generation, ",".join(bound_address(s) for s in self.sockets),
                 self.desired, pending.generation)
        self._record_reload(True, "", self.generation, "ok")
        self._notify("ready")

    def _rollback_reload(self, reason: str) -> None:
        """Stop the new generation and serve on with everything as it was before the reload."""
        pending, self.pending = self.pending, None
        failed = pending.new_generation if pending is not None else self.generation + 1
        if pending is not None:
            assert self.board is not None and self.shared is not None
            now = time.monotonic()
            for worker in list(self.workers.values()):
                if worker.generation != failed:
                    continue
                if self.board.booted[worker.row]:
                    self._retire(worker, now)  # it may hold clients already: they drain
                else:  # it holds nobody: no reason to wait for it
                    worker.retiring = True
                    worker.kill_at = now + KILL_GRACE_S
                    self._kill(worker.pid, signal.SIGKILL)
            self.config, self.sockets, self.mode = pending.config, pending.sockets, pending.mode
            self.desired, self.generation = pending.desired, pending.generation
            self.history = pending.history
            self.shared.restore(pending.shared)
            self._share_sources()
            set_title(f"prefork-proxy: master gen {self.generation}")
        self._retire_unused_listeners()  # what only the failed config had
        log.error("reload failed, still serving generation %d with the old config: %s",
                  self.generation, reason)
        self._record_reload(False, reason, failed, "failed")
        self._notify("ready")

    def _share_sources(self, config: Optional[Config] = None) -> None:
        """Each listener's share of the per-source table (``gate.source_shares``), by its
        slot, for ``config`` (default: the one served); the other listener slots none."""
        if self.limits is None or self.shared is None:
            return
        config = config or self.config
        shares = {self.shared.listener_slot(index): share for index, share
                  in source_shares(config, self.limits.capacity).items()}
        self.limits.set_shares(shares, range(LISTENER_SLOTS))

    def _retire_unused_listeners(self) -> None:
        """Listeners the current config does not have: no new handshakes, closed later."""
        self.listeners.retain(self.sockets)

    def _record_reload(self, ok: bool, error: str, generation: int, result: str) -> None:
        self.last_reload = {"ok": ok, "generation": generation, "error": error,
                            "at": time.time()}
        self.reloads[result] += 1
        self.next_status = 0.0  # show it at once

    def close_unused_sockets(self) -> None:
        """Close listeners removed by a reload once no worker that accepted from them is left."""
        if self.listeners.has_retired() and all(w.generation == self.generation
                                                for w in self.workers.values()):
            self.listeners.close_retired()

    # -- the worker table

    def manage_workers(self) -> None:
        """Converge: one live worker per slot of the current generation, none beyond."""
        now = time.monotonic()
        current = {w.slot: w for w in self.workers.values()
                   if w.generation == self.generation and not w.retiring}
        for slot in range(self.desired):
            history = self.history.setdefault(slot, SlotHistory())
            if slot not in current and now >= history.respawn_at:
                if not self.spawn(slot) and self.pending is not None:
                    self._rollback_reload(f"cannot start worker {slot} of generation "
                                          f"{self.generation}: {self.spawn_error}")
                    return
        for slot, worker in current.items():
            if slot >= self.desired:
                self._retire(worker, now)

    def spawn(self, slot: int) -> bool:
        """Fork a worker for ``slot`` of the current generation.  The child never returns.

        False when it could not be forked (EAGAIN under a process limit,
        ENOMEM): the slot is retried with the crash-loop backoff, and the
        reason is left in ``spawn_error``.
        """
        assert self.shared is not None and self.board is not None
        now = time.monotonic()
        history = self.history.setdefault(slot, SlotHistory())
        row = self.board.claim(now)
        if row is None:
            log.error("no free worker row for worker %d; will retry", slot)
            history.respawn_at = now + 1.0
            self.spawn_error = "no free worker row"
            return False
        worker = Worker(slot, self.generation, self.config, list(zip(self.config.listeners,
                                                                     self.sockets)),
                        self.shared, self.mode, self.pid, self.board, row, self.limits)
        # Signals stay blocked across fork: a SIGTERM that reached the child before
        # it installed its own handlers would otherwise land in the master's
        # handler, copied into the child, and be lost.  The child unblocks them
        # once its handlers are in place, and then receives whatever came.
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            faults.trip("master.fork", OSError(errno.EAGAIN, "Resource temporarily "
                                               "unavailable (injected)"))
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            self.board.release_unused(row)
            history.fast_deaths += 1
            delay = max(FORK_RETRY_MIN_S, crash_loop_delay(history.fast_deaths))
            history.respawn_at = now + delay
            self.spawn_error = f"fork failed: {exc.strerror or exc}"
            log.error("cannot fork worker %d: %s; retrying in %.1f s", slot, self.spawn_error,
                      delay)
            return False
        if pid == 0:
            assert self.signal_queue is not None
            worker.run(previous_mask, self.signal_queue.fds())  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        self.board.pid[row] = pid
        self.workers[pid] = WorkerProcess(pid, slot, self.generation, row, now)
        return True

    def _retire(self, worker: WorkerProcess, now: float) -> None:
        if worker.retiring:
            return
        worker.retiring = True
        worker.kill_at = now + self.config.server.drain_timeout_s + KILL_GRACE_S
        self._kill(worker.pid, signal.SIGTERM)

    def reap(self) -> None:
        """Collect every exited child (workers, and orphans we adopted as PID 1)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.limits is not None:
                # Whatever it held (a SIGKILLed worker's clients included) is free again.
                self._step("release_limits", self.limits.release_process, pid)
            worker = self.workers.pop(pid, None)
            if worker is None:
                if self.admin is not None:
                    self.admin.reaped(pid, time.monotonic())
                self.upgrades.child_exited(pid, os.waitstatus_to_exitcode(status))
                continue  # else an adopted orphan: reaping it is all we owe it
            assert self.board is not None
            booted = bool(self.board.booted[worker.row])
            self.served = self.served or booted
            # Dead: its counters join the retired totals (they never go back), its row is free.
            self.board.fold(worker.row)
            code = os.waitstatus_to_exitcode(status)
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            lived = time.monotonic() - worker.started
            if self.stopping or worker.retiring or worker.generation != self.generation:
                log.info("worker %d gen %d (pid %d) exited with %s", worker.slot,
                         worker.generation, pid, how)
                continue
            boot_failed = code == EXIT_BOOT_FAILED or worker.boot_timed_out
            self.worker_restarts[restart_reason(code, boot_failed, worker.hung)] += 1
            self.next_status = 0.0  # show it at once
            if self.pending is not None and (boot_failed or not booted):
                self._rollback_reload(f"worker {worker.slot} of generation {worker.generation} "
                                      f"(pid {pid}) could not boot: {how}")
                continue
            if boot_failed and not self.served:
                log.error("worker %d (pid %d) could not boot; stopping: fix the error above",
                          worker.slot, pid)
                self.exit_code = EXIT_FAILURE
                self._stop(signal.SIGQUIT, 0.0)
                continue
            history = self.history.setdefault(worker.slot, SlotHistory())
            # A respawn that cannot boot is retried with backoff, never fatal: the
            # workers that serve are worth more than a clean stop.
            history.fast_deaths = history.fast_deaths + 1 \
                if lived < MIN_HEALTHY_LIFETIME_S or boot_failed else 0
            delay = crash_loop_delay(history.fast_deaths)
            history.respawn_at = time.monotonic() + delay
            log.warning("worker %d (pid %d) %s after %.1f s; respawning%s",
                        worker.slot, pid,
                        f"could not boot ({how})" if boot_failed else f"died with {how}", lived,
                        f" in {delay:.1f} s (crash loop: {history.fast_deaths} quick deaths)"
                        if delay else "")

    def kill_hung_and_overdue(self, now: float) -> None:
        assert self.board is not None
        timeout = self.config.server.worker_timeout_s
        for worker in list(self.workers.values()):
            if worker.retiring:
                if now >= worker.kill_at:
                    log.warning("worker %d gen %d (pid %d) still draining at its deadline; "
                                "killing", worker.slot, worker.generation, worker.pid)
                    self._kill(worker.pid, signal.SIGKILL)
                    worker.kill_at = now + KILL_GRACE_S
                continue
            silent = now - self.board.heartbeat[worker.row]
            if silent > timeout and not self.board.booted[worker.row]:
                if self.pending is not None and worker.generation == self.generation:
                    continue  # reload_progress judges the new generation as a whole
                if not self.served:
                    # Stuck before serving at first start (e.g. a thread that could
                    # not start under a memory limit): the config cannot run here.
                    log.error("worker %d (pid %d) did not finish booting within %.0f s; "
                              "stopping: fix the error above", worker.slot, worker.pid, timeout)
                    self._kill(worker.pid, signal.SIGKILL)
                    self.exit_code = EXIT_FAILURE
                    self._stop(signal.SIGQUIT, 0.0)
                    return
                log.error("worker %d (pid %d) did not finish booting within %.0f s; killing it "
                          "(respawned with backoff)", worker.slot, worker.pid, timeout)
                worker.boot_timed_out = True
                self._kill(worker.pid, signal.SIGKILL)
                self.board.heartbeat[worker.row] = now
                continue
            if silent > timeout:
                log.error("worker %d (pid %d) hung: no heartbeat for %.1f s; killing it",
                          worker.slot, worker.pid, silent)
                worker.hung = True
                self._kill(worker.pid, signal.SIGKILL)
                self.board.heartbeat[worker.row] = now  # one kill per timeout, not per loop

    def _signal_all(self, signum: int) -> None:
        for pid in list(self.workers):
            self._kill(pid, signum)

    _kill = staticmethod(children.kill_quietly)

    # -- reporting

    def write_status(self, now: float) -> None:
        """Rewrite the status file beside the pidfile (read by ``prefork-proxy status``)."""
        if self.board is None:
            return
        status = status_model.build(self, now)
        if self.admin is not None:
            self.admin.publish(status)
        if self.pidfile is None:
            return  # (the pidfile of the start stays: it is locked and cannot move)
        path = control.status_path(self.pidfile.path)
        try:
            control.write_atomically(path, json.dumps(status))
        except OSError as exc:
            # A warning, not a debug line: `status` reports this master stuck
            # until the file is written again.  Once per cause and minute.
            error = f"cannot write the status file {path}: {exc.strerror or exc}"
            if error != self.status_error or now - self.status_warned_at >= 60.0:
                log.warning("%s; `prefork-proxy status` will report this master as stuck",
                            error)
                self.status_error, self.status_warned_at = error, now
            return
        if self.status_error:
            log.info("status file %s written again", path)
            self.status_error = ""

    # -- the admin endpoint (admin/process.py owns it; these are the master's hooks)

    def _open_admin(self) -> None:
        """Bind the admin socket before anything is forked; it is kept for life."""
        if self.config.admin.bind is not None:
            # Handed over by the master this one upgrades: the same socket, never re-bound.
            self.admin = AdminEndpoint.open(self.config.admin.bind,
                                            inherited=self.inherited.take("admin"))

    def _admin_tick(self, now: float) -> None:
        """Every loop turn: the heartbeat /live reads, and the admin process kept running."""
        if self.admin is None or self.board is None or self.admin_handed_over:
            return
        self.admin.beat(now)
        self.admin.tick(now, self.board, self.config.admin.bind)

    # -- the control socket (backend_control owns it; `prefork-proxy backend`)

    def _open_control(self) -> None:
        """The control socket beside the pidfile; none without a pidfile."""
        if self.pidfile is not None and self.shared is not None:
            shared = self.shared
            path = backend_control.socket_path(self.pidfile.path)
            try:
                self.control = backend_control.ControlServer(
                    path, lambda request: backend_control.apply(shared, request))
            except OSError as exc:  # e.g. a path too long for AF_UNIX: serve without it
                log.error("cannot create the control socket %s: %s; `prefork-proxy backend` "
                          "will not work", path, exc.strerror or exc)

    @staticmethod
    def _notify(state: str) -> None:
        """Tell systemd (Type=notify) where we are, when it is listening."""
        getattr(notify, state)()


def serve(config: Config, loader: Optional[Callable[[], Config]] = None,
          command: Optional[List[str]] = None) -> int:
    """Run a master for ``config`` in this process; return its exit code.

    ``command`` starts this program again (an upgrade, SIGUSR2); None: upgrades
    are refused with a log line."""
    try:
        return Master(config, loader, command).run()
    except ProxyError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
