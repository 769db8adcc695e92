"""Holding areas for bytes in flight, and the loop's budget for them.

Owns ``PipePool`` (pipes lent to splice directions), ``BufferPool`` (copy
buffers, the loop's scratch buffer, and ``left``: what remains of the loop's
budget) and the sizes they work with.  One pool of each per ``RelayLoop``;
only that loop's thread calls them (``Direction`` takes and gives back, the
loop closes them when it ends), so they need no locks.
"""

from __future__ import annotations

import mmap
import os
from typing import List, Tuple

from prefork_proxy import splice as splice_module

#: Pipe size asked for in splice mode (grown with F_SETPIPE_SZ where allowed).
PIPE_SIZE = 1024 * 1024
#: Buffer size in copy mode.
BUFFER_SIZE = 256 * 1024
#: A read shorter than this probably emptied the socket (see ``Direction.pump``).
#: While the budget is spent it is also the most a direction reads at a time.
SHORT_READ = 16 * 1024
#: Size of the buffers that hold what is left of a short burst (see ``BufferPool``).
SMALL_SIZE = SHORT_READ
#: Bytes a loop may hold in buffers and pipes when its worker names no budget.
DEFAULT_BUDGET = 64 * 1024 * 1024
#: Idle pipes/buffers a loop keeps for reuse; more are closed or freed.
POOL_KEEP = 8


class PipePool:
    """Pipes lent to splice directions; owned by one ``RelayLoop`` thread.

    A pipe costs the budget only what it holds: the direction that splices
    into it charges the bytes moved in, and credits them as they move out
    (see ``BufferPool``), so lending one costs nothing here.
    """

    def __init__(self, size: int = PIPE_SIZE) -> None:
        self.size = size
        self._idle: List[Tuple[int, int, int]] = []

    def take(self) -> Tuple[int, int, int]:
        """A ``(read_fd, write_fd, capacity)`` pipe, empty."""
        if self._idle:
            pipe = self._idle.pop()
        else:
            read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            pipe = read_fd, write_fd, splice_module.set_pipe_size(write_fd, self.size)
        return pipe

    def give_back(self, pipe: Tuple[int, int, int], empty: bool) -> None:
        """Return a pipe; one that still holds bytes is closed, never reused."""
        if empty and len(self._idle) < POOL_KEEP:
            self._idle.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        for pipe in self._idle:
            os.close(pipe[0])
            os.close(pipe[1])
        self._idle.clear()


class BufferPool:
    """Buffers for copied bytes, and the loop's budget; owned by one ``RelayLoop`` thread.

    ``scratch`` is the loop's reading buffer.  A direction reads a burst into
    it and writes the burst straight out; only when the destination cannot
    take it all does the direction keep what is left (``keep``), and the
    scratch buffer stays the loop's.  So request/response traffic takes
    nothing from the pool and gives nothing back, burst after burst.

    Principle (a budget that only slow destinations spend): ``left`` is what
    remains of the loop's budget for bytes held on behalf of destinations
    slower than their sources.  A buffer a direction keeps is charged at its
    size; a pipe at the bytes it holds (the direction charges each splice in
    and credits each splice out: no system call of its own).  While ``left``
    is positive a direction may read as much as a buffer or a pipe takes.
    Once it is spent, every direction still reads, but at most ``SHORT_READ``
    bytes at a time, and no new pipe is filled (a bulk stream is copied
    meanwhile): a burst that is written out at once costs nothing, so
    healthy streams and new connections in the loop flow on, and a stuck
    destination leaves its direction holding only that burst's remainder, in
    a ``SMALL_SIZE`` buffer, waiting to write it (it reads no more meanwhile).
    A read that may end up held in full begins only while ``left`` is
    positive, so a loop holds at most its budget, plus one buffer or pipe,
    plus ``SMALL_SIZE`` per stuck direction (bounded by its connections),
    whatever its clients do.  The scratch buffer is never charged: it is the
    loop's, and always empty between events.

    Principle (freed memory goes back to the system): buffers are anonymous
    ``mmap`` regions rather than ``bytearray``s.  glibc keeps freed heap
    blocks of this size for reuse (its mmap threshold rises after the first
    free), so a burst of stalled clients used to leave the worker that much
    larger for good; an unmapped region is returned at once, and only the
    pages a read actually touched ever count.
    """

    def __init__(self, size: int = BUFFER_SIZE, budget: int = DEFAULT_BUDGET,
                 small_size: int = SMALL_SIZE) -> None:
        self.size = size
        self.small_size = small_size
        self.left = budget
        self._idle: List[memoryview] = []
        self._idle_small: List[memoryview] = []
        self.scratch = _new_buffer(size)

    def take(self) -> memoryview:
        return self._idle.pop() if self._idle else _new_buffer(self.size)

    def give_back(self, buffer: memoryview) -> None:
        if buffer is self.scratch:
            return
        if len(buffer) == self.size:
            self.left += self.size
            if len(self._idle) < POOL_KEEP:
                self._idle.append(buffer)
        else:
            self.left += self.small_size
            if len(self._idle_small) < POOL_KEEP:
                self._idle_small.append(buffer)

    def keep(self, start: int, count: int) -> Tuple[memoryview, int]:
        """The scratch buffer holds ``count`` unwritten bytes at ``start``: return a
        buffer of a direction's own that holds them, and where they begin in it.

        Up to ``small_size`` bytes are copied to the start of a small buffer
        (a short burst's remainder: copying at most 16 KiB costs less than a
        fresh scratch buffer's page faults); more, and the scratch buffer
        itself is handed over and the loop gets a fresh one.
        """
        if count <= self.small_size:
            self.left -= self.small_size
            small = self._idle_small.pop() if self._idle_small else _new_buffer(self.small_size)
            small[:count] = self.scratch[start:start + count]
            return small, 0
        self.left -= self.size
        buffer, self.scratch = self.scratch, self.take()
        return buffer, start

    def close(self) -> None:
        self._idle.clear()
        self._idle_small.clear()


def _new_buffer(size: int) -> memoryview:
    """A zeroed buffer of its own pages, returned to the system when the last view dies."""
    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE))


