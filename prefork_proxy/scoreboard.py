"""The scoreboard: one row of shared memory per live worker, for supervision and status.

Allocated by the master before the first fork with a fixed number of rows
(shared memory cannot grow once children exist).  The master hands a free row
to each worker it spawns and takes it back when the worker is reaped.

Principle (single writer per cell, no locks): a worker writes only its own
row (``heartbeat``, ``active``); the master writes ``pid`` and ``started``
before the fork and only reads afterwards.  Each cell is one aligned 8-byte
value, which the CPU stores atomically, so a reader never sees half a value,
and a worker killed at any instant can never leave a lock held.

Principle (balance by live counts): every worker of a generation accepts from
the same kernel queue, and left alone the first worker the kernel wakes takes
most connections (one worker ends up relaying three times what its sibling
does, on one core).  So each worker publishes its open connections in
``active`` every time it accepts, and before accepting it looks at the other
accepting workers' counts (``accepting_rows``, ``lightest_of``): the worker holding more than
the lightest one lets it take the connection.  Only rows below ``rows_used``
can be live (rows are claimed lowest first), so the scan stays a few cells long.

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
        self.accepting = context.Array("b", capacity, lock=False)  # 1 while it takes clients
        # One past the highest row ever claimed (rows are claimed lowest first).
        self._rows_used = context.Value("q", 0, lock=False)
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
        self.accepting[row] = 0
        self._rows_used.value = max(self._rows_used.value, row + 1)
        return row

    def release(self, row: int) -> None:
        self.pid[row] = 0
        self.accepting[row] = 0
        self._free.append(row)

    @property
    def rows_used(self) -> int:
        """One past the highest row ever claimed: no live row lies beyond (any process)."""
        return self._rows_used.value

    # -- worker (its own row only)

    def accepting_rows(self, exclude: int) -> List[int]:
        """Rows of the workers accepting now, but ``exclude`` (a worker's siblings)."""
        used = self._rows_used.value
        return [row for row, accepting in enumerate(self.accepting[:used])
                if accepting and row != exclude]

    def lightest_of(self, rows: List[int]) -> int:
        """The fewest open connections among ``rows`` (at least one row).

        Called by a worker's accepting relay loop before each accept; it reads cells
        that other processes write, so the answer may be a moment old, which
        only ever makes the balance a little less even.
        """
        active = self.active
        return min([active[row] for row in rows])

    def beat(self, row: int, now: float, active: int, accepted: int) -> None:
        self.active[row] = active
        self.accepted[row] = accepted
        self.heartbeat[row] = now
