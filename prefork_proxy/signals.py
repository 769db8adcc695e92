"""Recording signals so a process's main loop can act on them.

Used by the master and by each worker's main thread.  Handlers only record the
signal in a queue and wake the loop through ``signal.set_wakeup_fd``; the loop
does the work, outside signal context, where it may take locks and log.
``IGNORED_SIGNALS`` lists the signals that mean nothing to the proxy.
"""

from __future__ import annotations

import collections
import os
import signal
from typing import Deque, Iterable


class SignalQueue:
    """Signals received and not yet handled, plus a file descriptor to wait on."""

    def __init__(self, signals: Iterable[int]) -> None:
        self.pending: Deque[int] = collections.deque()
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in signals:
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def wake(self) -> None:
        """Wake whoever waits on ``read_fd`` without a signal (any thread may call it)."""
        try:
            os.write(self._write_fd, b"\0")
        except OSError:  # full (a wake-up is pending anyway) or already closed
            pass

    def drain_wakeups(self) -> None:
        """Empty the wake-up pipe (the queue itself is read with ``pending``)."""
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def fds(self) -> tuple:
        """The wake-up pipe's descriptors, for a forked child to close."""
        return (self.read_fd, self._write_fd)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self.read_fd)
        os.close(self._write_fd)


def _ignored_signals() -> tuple:
    """Signals an operator (or a stray ``kill``) may send that mean nothing to the proxy
    and whose default action would end the process: logged and ignored."""
    names = ("SIGWINCH", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGPWR", "SIGIO", "SIGXCPU",
             "SIGXFSZ", "SIGSTKFLT")
    found = [getattr(signal, name) for name in names if hasattr(signal, name)]
    if hasattr(signal, "SIGRTMIN"):
        found.extend(range(signal.SIGRTMIN, signal.SIGRTMAX + 1))
    return tuple(found)


#: Logged and ignored by the master, ignored silently by its children (``hygiene``).
IGNORED_SIGNALS = _ignored_signals()


def signal_name(signum: int) -> str:
    """A signal's name for a log line, real-time signals included."""
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal without a name of its own
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
