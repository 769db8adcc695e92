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
from typing import TYPE_CHECKING, Dict

if TYPE_CHECKING:
    from prefork_proxy.config import Config, ListenerConfig

#: How long a worker waits for the counter's lock before going on without it.
LOCK_WAIT_S = 0.05


class RoundRobinCounter:
    """A global ticket counter: every worker draws the next number.  Writers: all workers."""

    def __init__(self) -> None:
        # The fork context, explicitly: the semaphore is then unlinked at once and no
        # resource-tracker process is started (the default start method may differ).
        self._value = multiprocessing.get_context("fork").Value("Q", 0, lock=True)

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
    """Everything the workers share, created by the master before the first fork.

    The master calls ``reconfigure`` on every reload, before forking the new
    generation: state that belongs to something that still exists (a listener
    with the same bind address) is kept, so a reload does not restart the
    rotation.  Only the master calls ``reconfigure``; workers only read and draw.
    """

    def __init__(self, config: "Config") -> None:
        self._round_robin: Dict[str, RoundRobinCounter] = {}
        self.reconfigure(config)

    def reconfigure(self, config: "Config") -> None:
        for index, listener in enumerate(config.listeners):
            key = self._key(listener, index)
            if key not in self._round_robin:
                self._round_robin[key] = RoundRobinCounter()

    @staticmethod
    def _key(listener: "ListenerConfig", index: int) -> str:
        return str(listener.bind) if listener.bind.port else f"{listener.bind}#{index}"

    def round_robin(self, listener: "ListenerConfig", index: int) -> RoundRobinCounter:
        """The counter of the ``index``-th listener of the config the worker serves."""
        return self._round_robin[self._key(listener, index)]
