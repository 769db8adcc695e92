"""What a forked child closes of the master's descriptors, right after ``fork``.

Called by every child of the master (a worker in ``Worker._boot``, the
health-check process in ``_CheckerProcess.run``) before it does anything else.

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

import os
import socket
import stat
from typing import Iterable, Set

_MASTER_ONLY: Set[int] = set()


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
