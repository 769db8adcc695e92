"""Post-fork hygiene: what every child of the master undoes of it, right after ``fork``.

Owns ``detach_from_master``, the one call each child makes first (a worker in
``Worker._boot``, the health-check process in ``_CheckerProcess.run``, the
admin process in ``admin.process._child``), on its main thread (a worker and
the admin process are forked with the master's signals blocked, and still
have them blocked here; the health process is forked with none blocked): the
master's wake-up fd and signal dispositions go (``ignore``/``default``), the kernel is
asked for SIGTERM when the master dies (``die_with_parent``:
``PR_SET_PDEATHSIG``), and the master's descriptors are closed
(``after_fork``).  The child then installs its own handlers and restores its
signal mask itself, since when it may do so differs (a worker only once its
relay threads, which inherit the blocked mask, have started).

Principle (a child holds exactly its own sockets): ``fork`` copies every
descriptor of the master, including listening sockets that a reload has
removed and that the master keeps open only until the old generation has
drained.  A child that kept such a copy would keep the port bound, in LISTEN,
for its whole life: clients would get silent SYN drops instead of "connection
refused", other programs EADDRINUSE, and a later re-add of the address would
share its SO_REUSEPORT group with the filtered socket.  So each child closes
every inherited listening socket that is not one of its own, whatever path
put it there, found by scanning ``/proc/self/fd`` rather than trusting a list.

The master also registers here the descriptors only it may use (the locked
pidfile): ``master_only``.  POSIX record locks are not inherited by children,
so a child's copy would not hold the lock, but nothing in a child needs it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import stat
from typing import Iterable, Optional, Set

from prefork_proxy.signals import IGNORED_SIGNALS

_MASTER_ONLY: Set[int] = set()
#: ``prctl`` option: the signal the kernel sends this process when its parent dies.
PR_SET_PDEATHSIG = 1
#: Signals only the master acts on (reload, scaling): every child ignores them.
MASTER_SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
#: What a worker and the health process ignore: the master's signals, SIGUSR2 (the
#: master's upgrade) and the meaningless ones (``signals.IGNORED_SIGNALS``).
CHILD_IGNORED = MASTER_SIGNALS + (signal.SIGUSR2,) + IGNORED_SIGNALS


def detach_from_master(keep: Iterable[int] = (), close: Iterable[int] = (),
                       ignore: Iterable[int] = CHILD_IGNORED, default: Iterable[int] = (),
                       master_pid: Optional[int] = None) -> int:
    """In a freshly forked child, first thing (its main thread): drop the master's
    wake-up fd, ignore ``ignore`` and reset ``default`` to ``SIG_DFL``, ask for
    SIGTERM at the master's death (``die_with_parent(master_pid)``), and close the
    master's descriptors (``after_fork(keep, close)``).  Returns how many
    listening sockets were closed.  Signals the child handles itself are left to
    it (they stay blocked until it restores its mask)."""
    signal.set_wakeup_fd(-1)
    for signum in ignore:
        signal.signal(signum, signal.SIG_IGN)
    for signum in default:
        signal.signal(signum, signal.SIG_DFL)
    die_with_parent(master_pid)
    return after_fork(keep=keep, close=close)


def die_with_parent(master_pid: Optional[int] = None) -> None:
    """Have the kernel send SIGTERM to this process when its parent dies (Linux only;
    every child also polls ``os.getppid()``, which covers other systems).

    With ``master_pid``, a master that died before the request took effect is
    caught too: this process sends itself SIGTERM (delivered once it unblocks).
    Without it, the caller's own ``getppid`` poll notices.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if master_pid is not None and os.getppid() != master_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def master_only(fd: int) -> None:
    """Mark a descriptor of the master that every forked child closes (master process)."""
    _MASTER_ONLY.add(fd)


def forget(fd: int) -> None:
    """The master closed ``fd``: children no longer need to close it."""
    _MASTER_ONLY.discard(fd)


def after_fork(keep: Iterable[int] = (), close: Iterable[int] = ()) -> int:
    """In a freshly forked child: close ``close``, the master-only descriptors, and
    every listening socket whose descriptor is not in ``keep``.  Returns how many
    listening sockets were closed.

    Runs once per child at boot (one ``fstat`` per open descriptor), never on
    the relay's hot path.
    """
    for fd in set(close) | _MASTER_ONLY:
        try:
            os.close(fd)
        except OSError:
            pass
    _MASTER_ONLY.clear()
    kept = set(keep)
    closed = 0
    fd_dir = "/proc/self/fd"
    names = os.listdir(fd_dir) if os.path.isdir(fd_dir) else []
    for name in names:
        fd = int(name)
        if fd in kept:
            continue
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:
            continue  # the directory's own descriptor, or one closed meanwhile
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            listening = 0
        if listening:
            sock.close()
            closed += 1
        else:
            sock.detach()
    return closed
