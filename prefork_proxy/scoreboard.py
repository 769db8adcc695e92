"""The scoreboard: one row of shared memory per live worker, for supervision and status.

Allocated by the master before the first fork with a fixed number of rows
(shared memory cannot grow once children exist).  The master hands a free row
to each worker it spawns and takes it back when the worker is reaped.

Principle (single writer per cell, no locks): a worker writes only its own
row (``heartbeat``, ``active``); the master writes ``pid`` and ``started``
before the fork and only reads afterwards.  Each cell is one aligned 8-byte
value, which the CPU stores atomically, so a reader never sees half a value,
and a worker killed at any instant can never leave a lock held.

``heartbeat`` is a ``time.monotonic()`` value: CLOCK_MONOTONIC is one clock for
the whole machine, so the master can compare it with its own ``time.monotonic()``.
"""

from __future__ import annotations

import multiprocessing
from typing import List, Optional

#: Rows available: live workers of every generation at once (a reload briefly doubles them).
CAPACITY = 4096


class Scoreboard:
    """Shared rows of worker state, indexed by row number (not by slot or pid)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        context = multiprocessing.get_context("fork")
        self.capacity = capacity
        self.pid = context.Array("q", capacity, lock=False)
        self.started = context.Array("d", capacity, lock=False)  # time.monotonic() at spawn
        self.heartbeat = context.Array("d", capacity, lock=False)
        self.active = context.Array("q", capacity, lock=False)  # open connections
        self.accepted = context.Array("q", capacity, lock=False)  # connections accepted so far
        self.booted = context.Array("b", capacity, lock=False)  # 1 once the worker serves
        self._free: List[int] = list(range(capacity - 1, -1, -1))

    # -- master

    def claim(self, now: float) -> Optional[int]:
        """Reserve a row for a worker about to be forked; None when every row is taken."""
        if not self._free:
            return None
        row = self._free.pop()
        self.pid[row] = 0
        self.started[row] = now
        self.heartbeat[row] = now
        self.active[row] = 0
        self.accepted[row] = 0
        self.booted[row] = 0
        return row

    def release(self, row: int) -> None:
        self.pid[row] = 0
        self._free.append(row)

    # -- worker (its own row only)

    def beat(self, row: int, now: float, active: int, accepted: int) -> None:
        self.active[row] = active
        self.accepted[row] = accepted
        self.heartbeat[row] = now
