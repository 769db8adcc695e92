"""Handing listening sockets from one master to the next, across ``exec``.

Owned by the master.  The old master calls ``spawn_successor`` on SIGUSR2 (see
``upgrade``); the new master, a fresh ``exec`` of the program on disk, calls
``take_inherited`` at the very start of ``Master.run``, before it binds
anything.  ``take_systemd_sockets`` is the same idea for sockets that systemd
passes (socket activation, ``LISTEN_FDS``).

The protocol, all in the environment of the new master:

- ``PREFORK_PROXY_INHERITED_FDS``: JSON ``{name: fd}``, the descriptors the new
  master inherits.  A listener's name is ``listener:`` plus its ``ListenerSet``
  key in JSON (the address as the kernel sees it, or its position for a port-0
  listener), so the new master matches them to its config without resolving
  or binding; other names (``admin``, say) are for whoever owns that socket
  in the new master (``Inherited.take``).
- ``PREFORK_PROXY_UPGRADE_FD``: one end of a socket pair whose other end the
  old master keeps.  The new master writes ``ready PID VERSION\\n`` on it once
  its workers serve; it then keeps its end open, and reads EOF there when the
  old master has exited.  The old master reads EOF if the new one dies first.
- ``PREFORK_PROXY_UPGRADE_FROM``: the old master's pid, for the log lines.

Principle (never re-bound): the new master gets the very sockets, so their
accept queues and everything queued in them carry over; no second socket
joins the address, nothing is reset.  Only these descriptors cross ``exec``
(``subprocess`` ``pass_fds``: FD_CLOEXEC is cleared on exactly them, in the
child, and every other descriptor is closed), and the new master marks them
close-on-exec again as soon as it has them, so none leaks into a later
program.  The variables are removed from the environment once read.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger("prefork_proxy.master")

FDS_ENV = "PREFORK_PROXY_INHERITED_FDS"
CHANNEL_ENV = "PREFORK_PROXY_UPGRADE_FD"
FROM_ENV = "PREFORK_PROXY_UPGRADE_FROM"
LISTENER_PREFIX = "listener:"
#: systemd's socket activation (man sd_listen_fds): the first passed descriptor is 3.
SD_LISTEN_FDS_START = 3


def listener_name(key: Tuple[object, ...]) -> str:
    """The hand-over name of a ``ListenerSet`` key."""
    return LISTENER_PREFIX + json.dumps(list(key), separators=(",", ":"))


def listener_key(name: str) -> Optional[Tuple[object, ...]]:
    """The ``ListenerSet`` key of a hand-over name; None when it names something else."""
    if not name.startswith(LISTENER_PREFIX):
        return None
    try:
        value = json.loads(name[len(LISTENER_PREFIX):])
    except ValueError:
        return None
    return tuple(value) if isinstance(value, list) else None


@dataclass
class Inherited:
    """What a new master received from the master that started it (empty otherwise)."""

    sockets: Dict[str, socket.socket] = field(default_factory=dict)
    channel: Optional[socket.socket] = None  # to the old master
    from_pid: int = 0

    def listeners(self) -> Dict[Tuple[object, ...], socket.socket]:
        """The listening sockets, by ``ListenerSet`` key; taken out of ``sockets``."""
        found = {}
        for name in [n for n in self.sockets if listener_key(n) is not None]:
            found[listener_key(name)] = self.sockets.pop(name)  # type: ignore[index]
        return found

    def take(self, name: str) -> Optional[socket.socket]:
        """The inherited socket called ``name`` (e.g. ``admin``), now the caller's."""
        return self.sockets.pop(name, None)

    def close_rest(self) -> None:
        """Close what nobody took (the new config no longer has it)."""
        for name, sock in self.sockets.items():
            log.info("inherited %s is not in this config; closing this master's copy", name)
            sock.close()
        self.sockets.clear()


def _adopt_fd(fd: int, what: str) -> Optional[socket.socket]:
    """A socket object for an inherited descriptor, close-on-exec again; None if unusable."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            log.error("%s: descriptor %d is not a socket; ignoring it", what, fd)
            return None
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        log.error("%s: descriptor %d is unusable (%s); ignoring it", what, fd, exc)
        return None
    sock.set_inheritable(False)
    return sock


def _is_listening(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


def take_inherited(environ: Optional[Mapping[str, str]] = None) -> Inherited:
    """In a new master, at start: the sockets and channel its predecessor passed.

    Reads and removes the variables from ``os.environ`` (or ``environ``, for
    tests).  A malformed entry is logged and skipped: the master then binds
    that listener itself, or fails with the usual "address already in use".
    """
    env = os.environ if environ is None else dict(environ)
    text = env.get(FDS_ENV, "")
    channel_text = env.get(CHANNEL_ENV, "")
    from_text = env.get(FROM_ENV, "")
    if environ is None:
        for name in (FDS_ENV, CHANNEL_ENV, FROM_ENV):
            os.environ.pop(name, None)
    inherited = Inherited()
    if not text and not channel_text:
        return inherited
    try:
        table = json.loads(text) if text else {}
        if not isinstance(table, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        log.error("%s=%r is not a JSON object of descriptors (%s); ignoring it", FDS_ENV, text,
                  exc)
        table = {}
    for name, fd in table.items():
        if not isinstance(fd, int) or fd < 0:
            log.error("%s: %r is not a descriptor; ignoring it", name, fd)
            continue
        sock = _adopt_fd(fd, f"inherited {name}")
        if sock is None:
            continue
        if listener_key(name) is not None and not _is_listening(sock):
            log.error("inherited %s: descriptor %d does not listen; ignoring it", name, fd)
            sock.detach()
            continue
        inherited.sockets[name] = sock
    if channel_text:
        try:
            inherited.channel = _adopt_fd(int(channel_text), "the upgrade channel")
        except ValueError:
            log.error("%s=%r is not a descriptor; ignoring it", CHANNEL_ENV, channel_text)
    try:
        inherited.from_pid = int(from_text) if from_text else 0
    except ValueError:
        inherited.from_pid = 0
    return inherited


def take_systemd_sockets(environ: Optional[Mapping[str, str]] = None) -> List[socket.socket]:
    """The listening sockets systemd passed (``LISTEN_FDS``, for this pid), else [].

    Each is matched to a ``[[tcp_proxy]]`` by the address it is bound to
    (``ListenerSet.adopt``).  The variables are removed, as ``sd_listen_fds``
    does, so no child takes them for its own.
    """
    env = os.environ if environ is None else dict(environ)
    pid_text, count_text = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if environ is None:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not count_text:
        return []
    try:
        if int(pid_text) != os.getpid():
            return []  # meant for another process (our parent's)
        count = int(count_text)
    except ValueError:
        log.error("LISTEN_PID=%r LISTEN_FDS=%r are not numbers; ignoring them", pid_text,
                  count_text)
        return []
    found = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(0, count)):
        sock = _adopt_fd(fd, "a socket from systemd (LISTEN_FDS)")
        if sock is None:
            continue
        if sock.type != socket.SOCK_STREAM or not _is_listening(sock):
            log.error("socket activation: descriptor %d is not a listening TCP socket "
                      "(ListenStream= in the .socket unit); ignoring it", fd)
            sock.close()
            continue
        sock.setblocking(False)
        found.append(sock)
    return found


def spawn_successor(command: Sequence[str], sockets: Mapping[str, socket.socket],
                    old_pid: int) -> Tuple[subprocess.Popen, socket.socket]:
    """Start the new master: ``command`` with ``sockets`` passed by descriptor.

    Returns the process and this master's end of the channel.  ``OSError``
    when it cannot be started (the program is gone, no memory).  The child
    gets default signal dispositions, an empty signal mask (``subprocess``
    restores both) and the old master's environment, working directory,
    stdin/stdout/stderr and rlimits.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fds = {name: sock.fileno() for name, sock in sockets.items()}
        env = dict(os.environ)
        env[FDS_ENV] = json.dumps(fds)
        env[CHANNEL_ENV] = str(theirs.fileno())
        env[FROM_ENV] = str(old_pid)
        process = subprocess.Popen(list(command), env=env, close_fds=True,
                                   pass_fds=sorted(fds.values()) + [theirs.fileno()],
                                   stdin=None, stdout=None, stderr=None)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.setblocking(False)
    return process, ours


def restart_command(argv: Sequence[str]) -> List[str]:
    """The command that starts this program again, from the program on disk now.

    ``sys.orig_argv`` (Python 3.10+) is the command line as the interpreter got
    it, interpreter options and ``-m prefork_proxy`` or the console script
    included; its first word is replaced by ``sys.executable``, an absolute
    path.  ``argv`` is the CLI's own arguments, for the fallback.
    """
    import sys

    original = list(getattr(sys, "orig_argv", None) or [])
    argv = list(argv)
    if original and sys.executable and (not argv or original[-len(argv):] == argv):
        return [sys.executable] + original[1:]
    return [sys.executable or "python3", "-m", "prefork_proxy"] + list(argv)
