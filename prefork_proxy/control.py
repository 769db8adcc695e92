"""Talking to a running master through its pidfile: ``reload``, ``stop``, ``status``.

The master (``master.py``) writes the pidfile once it serves and removes it
when it exits, and rewrites a status file beside it (``PIDFILE.status.json``)
about once a second with what only it can see: its generation and the
workers' rows from shared memory (``rows``; the model of ``status.py``, also
served by the admin endpoint's ``/status``).  The CLI's ``reload``/``stop``/
``status`` commands run in a separate process and only read these files and
send signals.  A file is written to a temporary name and renamed, so a reader
never sees half of one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from prefork_proxy import hygiene
from prefork_proxy import status as status_model
from prefork_proxy.errors import ProxyError


def status_path(pidfile: str) -> str:
    return pidfile + ".status.json"


def write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


class PidFile:
    """The master's pidfile, locked (``fcntl`` record lock) for the master's whole life.

    Owned by the master (``Master.run``).  Principle (one master per pidfile):
    the lock says "a master serves", the pid inside says which one.  A second
    ``start`` on the same pidfile finds it locked and exits with a clear
    message instead of overwriting it; ``read_pid`` in the CLI treats an
    unlocked pidfile as stale, whatever process now has its pid.  The kernel
    drops the lock when the master dies, even by SIGKILL.

    The file is written in place, never renamed over: the lock belongs to the
    inode.  POSIX record locks are released by closing *any* descriptor of the
    file in the locking process, so the master never opens the pidfile again
    (``remove`` works from this descriptor); children do not inherit the lock,
    and close their copy at fork (``hygiene``).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def acquire(self, pid: int, owner: Optional[Tuple[int, int]] = None) -> None:
        """Lock the pidfile and write ``pid`` into it; ``ProxyError`` if a master holds it.

        ``owner`` (uid, gid): the user the master will serve as, who must be
        able to remove the file at exit (a sticky directory such as /tmp only
        lets a file's owner remove it).
        """
        for _ in range(10):  # another master may remove the file between open and lock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise ProxyError(f"{self.path}: cannot open the pidfile: "
                                 f"{exc.strerror or exc}") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise ProxyError(f"{self.path}: cannot lock the pidfile: "
                                     f"{exc.strerror or exc}") from None
                holder = pid_in(self.path)
                raise ProxyError(f"{self.path}: another prefork-proxy master "
                                 f"{f'(pid {holder}) ' if holder else ''}is running with this "
                                 "pidfile: stop it first, or give this one another pidfile"
                                 ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except OSError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file that was removed meanwhile: lock the new one
        else:
            raise ProxyError(f"{self.path}: the pidfile keeps being replaced; is another "
                             "master starting?")
        self.fd = fd
        hygiene.master_only(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{pid}\n".encode(), 0)
        if owner is not None:
            os.fchown(fd, *owner)
        try:
            os.unlink(status_path(self.path))  # a crashed predecessor's, written as another user
        except OSError:
            pass

    def move(self, path: str) -> None:
        """Rename the pidfile (and its status file) to ``path``; the lock goes with it.

        Used by an upgrade: ``PIDFILE`` becomes ``PIDFILE.oldbin`` so that the
        new master can create and lock a fresh ``PIDFILE``, and back if the
        new master fails.  ``OSError`` when the rename fails (nothing moved).
        A file at ``path`` is replaced: callers check that it is stale.
        """
        if os.fstat(self.fd).st_ino != os.stat(self.path).st_ino:
            raise OSError(errno.ESTALE, "the pidfile was replaced by another file")
        os.replace(self.path, path)
        old_status, self.path = status_path(self.path), path
        try:
            os.replace(old_status, status_path(path))
        except OSError:
            pass  # not written yet; the next status write creates it

    def remove(self) -> None:
        """Remove the pidfile and the status file (if still ours), then release the lock."""
        if self.fd < 0:
            return
        try:
            ours = os.fstat(self.fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            ours = False
        if ours:
            for path in (status_path(self.path), self.path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    logging.getLogger("prefork_proxy.master").warning(
                        "cannot remove %s: %s", path, exc.strerror or exc)
        hygiene.forget(self.fd)
        os.close(self.fd)  # releases the lock
        self.fd = -1


def pid_in(pidfile: str) -> Optional[int]:
    """The pid written in ``pidfile``, None if it cannot be read (no lock check)."""
    try:
        with open(pidfile, encoding="utf-8") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def is_locked(pidfile: str) -> bool:
    """Whether some process holds the pidfile's lock (a live master); CLI processes.

    Tested with a non-blocking shared lock, which needs only read access and
    is refused while the master holds its exclusive lock.  Taking it means no
    master holds the file; it is released when the descriptor closes.  Never
    called in the master: closing a descriptor of the file there would release
    the master's own lock.
    """
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)


def _looks_like_master(pid: int) -> Optional[bool]:
    """Whether process ``pid`` is a prefork-proxy (its title, or its command line
    where ``setproctitle`` is missing); None where there is no /proc to tell."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return False
    except OSError:
        return None
    if cmdline.startswith("prefork-proxy: "):  # titled: a master, a worker, the health process
        return cmdline.startswith("prefork-proxy: master")
    return "prefork_proxy" in cmdline or "prefork-proxy" in cmdline


def read_pid(pidfile: str) -> int:
    """The master's pid from ``pidfile``; ``ProxyError`` unless a live master holds it.

    Principle (never signal a stranger): after a crash the pid in a pidfile
    can belong to any process that reused it.  The pid counts only if the
    pidfile is locked (the master holds the lock for its life, see
    ``PidFile``) and the process looks like a prefork-proxy (its title or
    command line), so ``reload``/``stop`` never signal an unrelated process.
    """
    pid = pid_in(pidfile)
    if pid is None:
        try:
            with open(pidfile, encoding="utf-8") as f:
                f.read()
            problem = "it holds no pid"
        except OSError as exc:
            problem = str(exc)
        raise ProxyError(f"{pidfile}: cannot read a pid: {problem}")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ProxyError(f"{pidfile}: no process {pid} is running (stale pidfile)") from None
    except PermissionError:
        pass  # it exists, under another user
    if not is_locked(pidfile):
        raise ProxyError(f"{pidfile}: stale pidfile: no prefork-proxy master holds its lock, "
                         f"so process {pid} is not this proxy's master (its pid was reused); "
                         "not signalling it")
    if _looks_like_master(pid) is False:
        raise ProxyError(f"{pidfile}: process {pid} is not a prefork-proxy master (its command "
                         "line says otherwise); not signalling it")
    return pid


def signal_master(pidfile: str, signum: int) -> int:
    pid = read_pid(pidfile)
    os.kill(pid, signum)
    return pid


def stop_master(pidfile: str, timeout_s: float, fast: bool = False) -> int:
    """Ask the master to stop and wait (bounded) until it has exited."""
    pid = signal_master(pidfile, signal.SIGINT if fast else signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _running(pid):
            return pid
        time.sleep(0.05)  # polling another process's exit: there is nothing to wait on
    raise ProxyError(f"master {pid} still running after {timeout_s:.0f} s")


@dataclass
class UpgradeOutcome:
    ok: bool
    message: str


def upgrade_master(pidfile: str, timeout_s: float) -> UpgradeOutcome:
    """SIGUSR2 to the master, then wait (bounded) for what its status file says.

    The old master records the upgrade in its status file (``upgrade``:
    starting, ready or failed), which is at ``PIDFILE.oldbin.status.json``
    while the pidfile is moved and back at ``PIDFILE.status.json`` after a
    failure; whichever holds the old master's pid is read.
    """
    sent_at = time.time()
    pid = signal_master(pidfile, signal.SIGUSR2)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in (status_path(pidfile + ".oldbin"), status_path(pidfile)):
            try:
                with open(path, encoding="utf-8") as f:
                    status = json.load(f)
            except (OSError, ValueError):
                continue
            upgrade = status.get("upgrade") or {}
            if status.get("pid") != pid or upgrade.get("started_at", 0.0) < sent_at - 1.0:
                continue
            if upgrade.get("state") == "ready":
                return UpgradeOutcome(True, f"master {pid} (version {status.get('version')}) "
                                            f"handed over to master {upgrade['new_pid']} "
                                            f"(version {upgrade.get('version')}), which serves; "
                                            f"{pid} drains its connections and exits")
            if upgrade.get("state") == "failed":
                return UpgradeOutcome(False, f"upgrade failed: {upgrade.get('error')}; master "
                                             f"{pid} goes on serving")
        if not _running(pid):  # it may have handed over and drained between two looks
            try:
                new_pid = read_pid(pidfile)
            except ProxyError:
                new_pid = pid
            if new_pid != pid:
                return UpgradeOutcome(True, f"master {pid} handed over to master {new_pid}, "
                                            f"which serves; {pid} has drained and exited")
            return UpgradeOutcome(False, f"master {pid} exited during the upgrade")
        time.sleep(0.05)  # another process's state: there is nothing to wait on
    return UpgradeOutcome(False, f"no outcome within {timeout_s:.0f} s: see the master's log "
                                 f"(sent SIGUSR2 to master {pid})")


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited master whose parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to signal 0
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def read_status(pidfile: str) -> Dict[str, Any]:
    pid = read_pid(pidfile)
    try:
        with open(status_path(pidfile), encoding="utf-8") as f:
            status = json.load(f)
    except (OSError, ValueError) as exc:
        raise ProxyError(f"master {pid} is running, but its status file cannot be read: "
                         f"{exc}") from None
    return status_model.with_age(status)
