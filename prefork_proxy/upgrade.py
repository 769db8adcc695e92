"""In-place upgrade (SIGUSR2): the old master's and the new master's side of it.

Owned by the master (``Master.upgrades``); every method runs on the master's
single thread, called from its loop.  The sockets cross ``exec`` through
``handover``; this module is the state machine around that.

The old master, on SIGUSR2 (``request``):

1. renames its pidfile to ``PIDFILE.oldbin`` (the lock is on the inode, so it
   follows: the old master still holds it, and ``PIDFILE`` is free);
2. starts the new master from the program on disk now (``handover
   .spawn_successor``: same command line, same config path), passing every
   serving listener (and any other named socket, ``Master.handover_sockets``)
   by descriptor, and one end of a socket pair, the channel;
3. goes on serving, unchanged, until the new master writes ``ready`` on the
   channel (its workers have booted and accept from the same sockets).  Then
   it tells systemd ``MAINPID=<new>`` (only the main process may move it) and
   stops as on SIGTERM, but without freezing the accept queues (they are the
   new master's now): its workers stop accepting and drain, and it exits 0
   once they are gone, removing only ``PIDFILE.oldbin``.

If the new master exits, closes the channel, or is not ready within
``ready_timeout_s`` (then it is asked to stop, and killed if it must be), the
old master renames ``PIDFILE.oldbin`` back, logs why, and serves on as if
nothing had happened: it never stopped accepting.

The new master (``Predecessor``): it adopts the sockets instead of binding,
takes a fresh ``PIDFILE`` with the usual lock, boots its workers, and once
every one of them serves writes ``ready PID VERSION`` on the channel.  Until
then another master accepts from its sockets, so if it fails it must not
freeze their queues either (``other_master_accepts``).  It keeps its end of
the channel and reads EOF there when the old master has exited.

Principle (one upgrade at a time): a second SIGUSR2 while a new master is
starting, or in a new master that has not reported ready yet, is refused with
a log line.  A master that has handed over and drains is not in the way: the
new one may upgrade again meanwhile (``PIDFILE.oldbin`` then names the most
recent old master).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from prefork_proxy import children, control, handover, hygiene, notify

log = logging.getLogger("prefork_proxy.master")

OLDBIN_SUFFIX = ".oldbin"
#: Time the new master gets to import, load its config and boot its workers,
#: on top of ``worker_timeout_s`` (which bounds a worker's boot in the new master).
READY_MARGIN_S = 30.0
#: A new master that closed the channel but has not exited after this long is stopped.
CHANNEL_CLOSED_GRACE_S = 5.0
#: After asking a new master that timed out to stop: how long before SIGKILL.
ABORT_GRACE_S = 10.0
READY_LINE_MAX = 256


def current_version() -> str:
    """The version of the code this process runs (what it reports on the channel)."""
    import prefork_proxy

    return str(getattr(prefork_proxy, "__version__", "unknown"))


@dataclass
class Successor:
    """The new master this (old) master started, until it is ready or has failed."""

    process: subprocess.Popen
    channel: Optional[socket.socket]
    started: float  # time.monotonic()
    started_at: float  # time.time(), for the status file
    deadline: float
    pidfile_moved: bool
    buffer: bytes = b""
    ready: bool = False
    version: str = ""
    failure: str = ""  # why it failed, once it has
    kill_at: float = 0.0  # set when it was asked to stop

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Predecessor:
    """The old master that started this (new) one, while it is alive."""

    pid: int
    channel: Optional[socket.socket]
    ready_sent: bool = False


@dataclass
class Upgrades:
    """A master's upgrade state: the successor it starts, the predecessor it replaces."""

    # The ``Master`` (by its attributes: only cli and api may import master).
    master: Any
    command: Optional[List[str]] = None  # how to start this program again; None: cannot
    successor: Optional[Successor] = None
    predecessor: Optional[Predecessor] = None
    last: Optional[Dict[str, Any]] = None  # the last upgrade, for the status file
    handed_over: bool = False  # a successor is ready: this master drains
    draining_successor_pids: List[int] = field(default_factory=list)

    # -- both sides

    def fds(self) -> List[int]:
        """Descriptors the master loop waits on besides its signal pipe."""
        found = []
        for holder in (self.successor, self.predecessor):
            if holder is not None and holder.channel is not None:
                found.append(holder.channel.fileno())
        return found

    def other_master_accepts(self) -> bool:
        """Whether another master accepts from our sockets now (then nothing may
        freeze their queues: not our stop, not our orphaned workers)."""
        if self.successor is not None and not self.successor.failure:
            return True  # starting: it may accept already; ready: it does
        return self.predecessor is not None and not self.predecessor.ready_sent

    def status(self) -> Optional[Dict[str, Any]]:
        return self.last

    def close(self) -> None:
        """At exit.  The successor's channel closes with us: it reads EOF, we are gone."""
        for holder in (self.successor, self.predecessor):
            if holder is not None:
                _close_channel(holder)

    def progress(self, now: float) -> None:
        """One turn of the master loop: read the channels, enforce the deadline."""
        if self.predecessor is not None:
            self._predecessor_progress()
        successor = self.successor
        if successor is None:
            return
        if successor.channel is not None:
            self._read_successor(successor)
        if successor.ready or successor.failure:
            if successor.kill_at and now >= successor.kill_at:
                log.warning("upgrade: new master %d still running %.0f s after it was asked "
                            "to stop; killing it", successor.pid, ABORT_GRACE_S)
                _kill(successor.pid, signal.SIGKILL)
                successor.kill_at = 0.0
            return
        if now >= successor.deadline:
            if successor.channel is None:
                why = "closed the upgrade channel before it was ready"
            else:
                why = (f"did not report ready within "
                       f"{successor.deadline - successor.started:.0f} s")
            self._fail(f"the new master (pid {successor.pid}) {why}; asking it to stop")
            _kill(successor.pid, signal.SIGTERM)  # it drains what it took, freezing nothing
            successor.kill_at = now + ABORT_GRACE_S

    # -- the old master

    def request(self) -> None:
        """SIGUSR2: start a new master from the program on disk, unless something forbids it."""
        master = self.master
        refusal = self._refusal()
        if refusal:
            log.warning("SIGUSR2 ignored: %s", refusal)
            return
        assert self.command is not None
        pidfile = master.pidfile
        moved = False
        if pidfile is not None:
            try:
                pidfile.move(pidfile.path + OLDBIN_SUFFIX)
                moved = True
            except OSError as exc:
                log.error("SIGUSR2: upgrade not started: cannot rename the pidfile %s to "
                          "%s%s: %s", pidfile.path, pidfile.path, OLDBIN_SUFFIX,
                          exc.strerror or exc)
                return
        sockets = master.handover_sockets()
        now = time.monotonic()
        master.board_shared(True)  # before the spawn: our orphaned workers must not freeze
        try:
            process, channel = handover.spawn_successor(self.command, sockets, master.pid)
        except (OSError, subprocess.SubprocessError) as exc:
            master.board_shared(False)
            if moved:
                self._restore_pidfile(0)
            self._record("failed", 0, time.time(), f"cannot start {self.command[0]}: {exc}")
            log.error("SIGUSR2: upgrade failed: cannot start %s: %s; this master (pid %d) "
                      "goes on serving", " ".join(self.command), exc, master.pid)
            return
        hygiene.master_only(channel.fileno())  # a worker forked meanwhile must not hold it
        timeout = master.config.server.worker_timeout_s + READY_MARGIN_S
        self.successor = Successor(process, channel, now, time.time(), now + timeout, moved)
        self._record("starting", process.pid, self.successor.started_at, "")
        log.info("SIGUSR2: upgrade: started a new master (pid %d): %s; handing it %d socket(s): "
                 "%s; this master serves until it is ready (at most %.0f s)", process.pid,
                 " ".join(self.command), len(sockets), ", ".join(_describe(sockets)), timeout)

    def _refusal(self) -> str:
        master = self.master
        if master.stopping:
            return "the master is stopping"
        if self.command is None:
            return ("this master was not started by the prefork-proxy command (TcpProxy from "
                    "Python?): there is no program to start again; restart it instead")
        if master.pid == 1:
            return ("this master is PID 1 (a container's init): its exit would end the "
                    "container; roll out the new version as a new container instead")
        if self.successor is not None and not self.successor.failure \
                and not self.successor.ready:
            return f"an upgrade is in progress: new master {self.successor.pid} is starting"
        if self.successor is not None and self.successor.failure and self.successor.kill_at:
            return f"the failed new master {self.successor.pid} has not exited yet"
        if self.predecessor is not None and not self.predecessor.ready_sent:
            return ("this master is itself still starting as an upgrade of master "
                    f"{self.predecessor.pid}")
        if self.handed_over:
            return "this master has already handed over to a new one and drains"
        if master.reload_in_progress():
            return "a reload is in progress; send it again once the new generation serves"
        return ""

    def _read_successor(self, successor: Successor) -> None:
        assert successor.channel is not None
        try:
            data = successor.channel.recv(READY_LINE_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data = b""
            log.debug("upgrade channel: %s", exc)
        if not data:
            _close_channel(successor)
            if not successor.ready and not successor.failure:
                # Most likely it is exiting: reap() says how, soon.  If it lives on
                # without its channel, it cannot report ready: stopped at the grace.
                successor.deadline = min(successor.deadline,
                                         time.monotonic() + CHANNEL_CLOSED_GRACE_S)
            return
        successor.buffer = (successor.buffer + data)[-READY_LINE_MAX:]
        if b"\n" not in successor.buffer or successor.ready or successor.failure:
            return
        line = successor.buffer.split(b"\n", 1)[0].decode("utf-8", "replace").split()
        if len(line) >= 2 and line[0] == "ready" and line[1] == str(successor.pid):
            successor.version = line[2] if len(line) > 2 else "unknown"
            self._commit(successor)
        else:
            self._fail(f"the new master (pid {successor.pid}) sent {line!r} instead of ready")
            _kill(successor.pid, signal.SIGTERM)
            successor.kill_at = time.monotonic() + ABORT_GRACE_S

    def _commit(self, successor: Successor) -> None:
        master = self.master
        successor.ready = True
        self.handed_over = True
        took = time.monotonic() - successor.started
        self._record("ready", successor.pid, successor.started_at, "", successor.version)
        log.info("upgrade: new master %d (version %s) is ready after %.2f s; this master "
                 "(pid %d, version %s) stops accepting and drains", successor.pid,
                 successor.version, took, master.pid, current_version())
        # With NotifyAccess=main only the main process may say who the main process is.
        notify.notify(f"MAINPID={successor.pid}\nREADY=1\nSTATUS=upgraded to version "
                      f"{successor.version} (master {successor.pid})")
        master.hand_over()

    def _fail(self, why: str) -> None:
        successor = self.successor
        assert successor is not None
        successor.failure = why
        self._record("failed", successor.pid, successor.started_at, why)
        log.error("upgrade failed: %s; this master (pid %d) goes on serving", why,
                  self.master.pid)

    def child_exited(self, pid: int, code: int) -> bool:
        """``reap`` collected ``pid``; True when it was our successor (handled here)."""
        successor = self.successor
        if successor is None or pid != successor.pid:
            return False
        successor.process.returncode = code  # reaped by us: Popen must not wait for it
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if successor.ready:
            # Its business now (it may have been upgraded or stopped in turn).
            (log.info if code == 0 else log.warning)(
                "upgrade: the new master %d, which took over, exited with %s", pid, how)
            self.successor = None
            return True
        if not successor.failure:
            self._fail(f"the new master (pid {pid}) exited with {how} before it was ready "
                       "(its log lines above say why)")
        _close_channel(successor)
        if successor.pidfile_moved:
            self._restore_pidfile(pid)
        self.successor = None
        self.master.board_shared(self.other_master_accepts())
        self.master.write_status_now()
        return True

    def _restore_pidfile(self, failed_pid: int) -> None:
        """Take the pidfile's name back from ``PIDFILE.oldbin`` after a failed upgrade."""
        pidfile = self.master.pidfile
        if pidfile is None or not pidfile.path.endswith(OLDBIN_SUFFIX):
            return
        original = pidfile.path[:-len(OLDBIN_SUFFIX)]
        if os.path.exists(original):
            holder = control.pid_in(original)
            if control.is_locked(original) and holder != failed_pid:
                log.error("upgrade: %s is held by another master (pid %s); this master keeps "
                          "%s", original, holder, pidfile.path)
                return
        try:
            pidfile.move(original)
        except OSError as exc:
            log.error("upgrade: cannot rename %s back to %s: %s", pidfile.path, original,
                      exc.strerror or exc)

    def _record(self, state: str, pid: int, started_at: float, error: str,
                version: str = "") -> None:
        self.last = {"state": state, "new_pid": pid, "started_at": started_at,
                     "error": error, "version": version, "at": time.time()}
        self.master.write_status_now()

    # -- the new master

    def adopt_predecessor(self, inherited: handover.Inherited) -> None:
        """At start, in a new master: remember the old one and its channel."""
        if inherited.channel is None:
            return
        self.predecessor = Predecessor(inherited.from_pid, inherited.channel)
        inherited.channel.setblocking(False)

    def report_ready_if_serving(self) -> None:
        """Once every worker of the new master serves: tell the old master so."""
        predecessor = self.predecessor
        if predecessor is None or predecessor.ready_sent or predecessor.channel is None:
            return
        if not self.master.all_workers_booted():
            return
        predecessor.ready_sent = True
        self.master.board_shared(self.other_master_accepts())
        try:
            predecessor.channel.send(f"ready {self.master.pid} {current_version()}\n".encode())
        except OSError as exc:
            log.warning("upgrade: cannot tell the old master %d that this one is ready (%s); "
                        "serving anyway", predecessor.pid, exc.strerror or exc)
            return
        log.info("upgrade: told the old master %d that this master (pid %d, version %s) "
                 "serves; it drains now", predecessor.pid, self.master.pid, current_version())

    def _predecessor_progress(self) -> None:
        predecessor = self.predecessor
        assert predecessor is not None
        self.report_ready_if_serving()
        if predecessor.channel is None:
            return
        try:
            data = predecessor.channel.recv(READY_LINE_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            return  # nothing is expected from the old master; ignore it
        _close_channel(predecessor)
        if predecessor.ready_sent:
            log.info("upgrade: the old master %d has exited", predecessor.pid)
        else:
            log.warning("upgrade: the old master %d went away before this master was ready; "
                        "serving on", predecessor.pid)
            predecessor.ready_sent = True  # nobody waits for it any more
        self.predecessor = None
        self.master.board_shared(self.other_master_accepts())


def _describe(sockets: Dict[str, socket.socket]) -> List[str]:
    """Names for a log line: a listener by the address it listens on."""
    from prefork_proxy.listeners import bound_address

    return [bound_address(sock) if handover.listener_key(name) is not None else name
            for name, sock in sorted(sockets.items())]


def _close_channel(holder: Any) -> None:
    channel = holder.channel
    if channel is not None:
        hygiene.forget(channel.fileno())
        channel.close()
        holder.channel = None


_kill = children.kill_quietly
