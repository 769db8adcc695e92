"""Values shared by the master and every worker, created in the master before fork.

Each value names its one writer.  Workers inherit them through ``fork``; a new
generation of workers (after a reload) gets the values the master created for
that generation.

Principle: ``multiprocessing.Value`` lives in shared memory and carries a
process-shared semaphore.  A worker killed with SIGKILL while it holds that
semaphore would block every other worker forever, so ``RoundRobinCounter``
waits a bounded time for it and, past that, proceeds without it: rotation may
then be off by one once, but no worker ever hangs.
"""

from __future__ import annotations

import multiprocessing
from typing import List

#: How long a worker waits for the counter's lock before going on without it.
LOCK_WAIT_S = 0.05


class RoundRobinCounter:
    """A global ticket counter: every worker draws the next number.  Writers: all workers."""

    def __init__(self) -> None:
        self._value = multiprocessing.Value("Q", 0, lock=True)

    def draw(self) -> int:
        """Return the current ticket and advance it, atomically across processes."""
        lock = self._value.get_lock()
        locked = lock.acquire(timeout=LOCK_WAIT_S)
        try:
            ticket = self._value.value
            self._value.value = (ticket + 1) % (1 << 63)
            return ticket
        finally:
            if locked:
                lock.release()


class SharedState:
    """Everything shared for one generation of workers: one counter per listener."""

    def __init__(self, listener_count: int) -> None:
        self.round_robin: List[RoundRobinCounter] = [RoundRobinCounter()
                                                     for _ in range(listener_count)]
