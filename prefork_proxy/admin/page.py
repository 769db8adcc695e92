"""The master's bulletin for the admin process: a page of shared memory it writes, one writer.

Created by the master before it forks anything (an anonymous ``MAP_SHARED``
mmap: every child sees the same page, no file, so the admin endpoint works
with or without a pidfile).  The master writes; the admin process only reads:

- ``heartbeat``: ``time.monotonic()`` stamped on every turn of the master's
  loop (``/live``); CLOCK_MONOTONIC is one clock for the whole machine;
- ``stopping``: set once, when a graceful or fast stop begins, *before* the
  listeners stop taking handshakes (``/ready`` turns 503 first);
- the status model (``status.build``) as JSON, republished about once a
  second (``/status``, ``/metrics``).

Principle (a sequence lock, no lock at all for the reader to hold): each
header cell is one aligned 8-byte value, stored atomically.  The writer makes
``seq`` odd, writes the length and the bytes, and makes ``seq`` even again; a
reader copies the bytes and keeps the copy only if ``seq`` was even and
unchanged across it, else tries again.  A reader can never block the master,
and the master writes in well under a millisecond, so a retry is rare.
The page costs only the pages a snapshot touches (anonymous memory is
committed on first write).
"""

from __future__ import annotations

import mmap
import time
from typing import Optional

#: Room for the status JSON: ~200 bytes per worker row and per backend address,
#: for 2,048 workers (a reload of 1,024) and 4,096 addresses, with margin.
CAPACITY = 4 << 20
_HEADER = 64
_SEQ, _LENGTH, _STOPPING = 0, 1, 2  # cells of the 8-byte unsigned view
_HEARTBEAT = 3  # cell of the double view
#: A reader gives up after this many torn reads in a row (the writer died mid-write).
READ_ATTEMPTS = 200


class StatusPage:
    """One shared page: heartbeat, stopping flag and the latest status JSON."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._map = mmap.mmap(-1, _HEADER + capacity, flags=mmap.MAP_SHARED)
        header = memoryview(self._map)[:_HEADER]
        self._cells = header.cast("Q")
        self._floats = header.cast("d")

    # -- the master (the one writer)

    def beat(self, now: float) -> None:
        self._floats[_HEARTBEAT] = now

    def set_stopping(self) -> None:
        self._cells[_STOPPING] = 1

    def publish(self, body: bytes) -> bool:
        """Replace the published JSON; False (and nothing changes) if it does not fit."""
        if len(body) > self.capacity:
            return False
        cells = self._cells
        cells[_SEQ] += 1  # odd: a write is under way
        self._map[_HEADER:_HEADER + len(body)] = body
        cells[_LENGTH] = len(body)
        cells[_SEQ] += 1  # even: consistent again
        return True

    # -- any reader (the admin process)

    @property
    def heartbeat(self) -> float:
        return self._floats[_HEARTBEAT]

    @property
    def stopping(self) -> bool:
        return bool(self._cells[_STOPPING])

    def read(self) -> Optional[bytes]:
        """The latest published JSON, None before the first publish (or if always torn)."""
        cells = self._cells
        for attempt in range(READ_ATTEMPTS):
            before = cells[_SEQ]
            if before and not before & 1:
                length = cells[_LENGTH]
                body = self._map[_HEADER:_HEADER + min(length, self.capacity)]
                if cells[_SEQ] == before:
                    return body
            elif not before:
                return None
            time.sleep(0.0005 if attempt else 0)
        return None
