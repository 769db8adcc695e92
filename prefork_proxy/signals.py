"""Recording signals so a process's main loop can act on them.

Used by the master and by each worker's main thread.  Handlers only record the
signal in a queue and wake the loop through ``signal.set_wakeup_fd``; the loop
does the work, outside signal context, where it may take locks and log.
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
