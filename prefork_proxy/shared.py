"""Values shared by the master, the workers and the health-check process, created before fork.

The master creates one ``SharedState`` before the first fork; every child
inherits it.  Each value names its writers.  Shared memory cannot grow once
children exist, so capacities are fixed (``MAX_BACKEND_ADDRESSES`` address
slots, ``WORKER_ROWS`` rows of connection counts).

Principle (no lock a dead process can keep): a process-shared semaphore (what
``multiprocessing.Value`` carries) stays taken forever if its holder is killed
with SIGKILL, and every other worker would then block or time out on every
draw.  The locks here are kernel record locks (``fcntl.lockf``, see
``ProcessLock``), which the kernel releases when their holder dies, however
it dies.  Most cells need no lock at all because they have one writer: a
worker's own row of connection counts, the health-check process's check
results and the addresses it resolves.

Layout of the backend table: one anonymous shared ``mmap``, cut into typed
``memoryview`` arrays indexed by *slot*.  A slot is one backend address of one
listener: an IP literal in the config takes one slot, a hostname reserves
``ADDRESSES_PER_NAME`` slots, filled with the addresses it resolves to.
``SharedState.reconfigure`` (master only) assigns slots to the config's
backends and keeps the slots of backends that survive a reload, so their
health and counts survive it too.
"""

from __future__ import annotations

import collections
import ctypes
import fcntl
import logging
import mmap
import multiprocessing
import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Deque, Dict, List, Optional, Tuple

from prefork_proxy.config import ADDRESSES_PER_NAME, MAX_BACKEND_ADDRESSES, Backend, numeric_address

if TYPE_CHECKING:
    from prefork_proxy.config import Config, ListenerConfig

log = logging.getLogger("prefork_proxy.shared")

#: Rows of per-worker connection counts: live workers of every generation at once.
WORKER_ROWS = 256
#: Orders the threads of one process claiming its row (the master never claims one,
#: so no child inherits this lock held).
_CLAIM_LOCK = threading.Lock()


class ProcessLock:
    """Mutual exclusion across processes and threads that a dead holder cannot keep.

    A POSIX record lock on one byte of an unlinked temporary file: the kernel
    drops it when the holding process exits or is killed.  Record locks belong
    to a process, not a thread, so a per-process ``threading.Lock`` orders the
    threads of one process first.  Not reentrant.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="prefork-proxy-lock-")
        self._pid = -1
        self._threads = threading.Lock()

    def __enter__(self) -> "ProcessLock":
        if self._pid != os.getpid():  # a fresh thread lock in each process, after fork
            self._threads = threading.Lock()
            self._pid = os.getpid()
        self._threads.acquire()
        try:
            fcntl.lockf(self._file.fileno(), fcntl.LOCK_EX, 1, 0)
        except BaseException:
            self._threads.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.lockf(self._file.fileno(), fcntl.LOCK_UN, 1, 0)
        finally:
            self._threads.release()


class RoundRobinCounter:
    """A global ticket counter: every worker draws the next number.  Writers: all workers.

    Drawn on relay threads for every connection.  Where the C runtime's
    ``libatomic`` can be loaded, a draw is one atomic fetch-and-add on the
    shared cell (about 1 µs from Python): nothing to hold, so nothing a killed
    worker could keep.  Elsewhere a ``ProcessLock`` guards a read and a write
    (two ``fcntl`` calls, about 2.5 µs), which a worker killed in the middle of
    a draw still cannot leave held.
    """

    def __init__(self, atomic: bool = True) -> None:
        # The fork context, explicitly: no resource-tracker process is started.
        self._value = multiprocessing.get_context("fork").RawValue("Q", 0)
        self._lock = ProcessLock()
        self._fetch_add = _ATOMIC_FETCH_ADD if atomic else None
        self._address = ctypes.addressof(self._value)

    @property
    def atomic(self) -> bool:
        """True when draws are lock-free atomic additions."""
        return self._fetch_add is not None

    def peek(self) -> int:
        """The next ticket, without drawing it (a plain read of the shared cell)."""
        return self._value.value

    def draw(self) -> int:
        """Return the current ticket and advance it, atomically across processes."""
        if self._fetch_add is not None:
            return self._fetch_add(self._address, 1, _ATOMIC_SEQ_CST)
        with self._lock:
            ticket = self._value.value
            self._value.value = (ticket + 1) % (1 << 64)
            return ticket


_ATOMIC_SEQ_CST = 5  # __ATOMIC_SEQ_CST


def _load_atomic_fetch_add() -> Optional[Callable[[int, int, int], int]]:
    """``__atomic_fetch_add_8`` from libatomic, or None where it cannot be loaded.

    Loaded with ``PyDLL``: the call holds the GIL, which costs less than
    dropping and taking it back around an operation of a few nanoseconds.
    """
    try:
        function = ctypes.PyDLL("libatomic.so.1").__atomic_fetch_add_8
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_uint64
    function.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
    return function


_ATOMIC_FETCH_ADD = _load_atomic_fetch_add()


# The pid of this process, kept current across fork: ``claim_row`` runs twice per
# connection, and ``os.getpid`` is a system call each time.
_PID = [os.getpid()]


def _refresh_pid() -> None:
    _PID[0] = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _VersionedCells:
    """A shared array whose every write bumps a version counter (after the write).

    Wraps the cells ``BackendTable.eligible`` reads, whoever writes them (the
    master, the health-check process, relay threads, tests), so a reader that
    saw version v before reading them knows they are unchanged while the
    version is still v.  The bump is an atomic add: two writers in different
    processes cannot make it move once.  Reads cost one Python call more than
    the raw ``memoryview``; nothing reads these cells per connection any more.
    """

    __slots__ = ("_cells", "_version")

    def __init__(self, cells: memoryview, version: RoundRobinCounter) -> None:
        self._cells, self._version = cells, version

    def __getitem__(self, index):
        return self._cells[index]

    def __setitem__(self, index, value) -> None:
        self._cells[index] = value
        self._version.draw()

    def __len__(self) -> int:
        return len(self._cells)


class BackendTable:
    """Per backend address: where it is, whether it is up, how many connections it holds.

    Writers, cell by cell:

    - ``family``/``port``/``scope``/``ip`` (the address): the master, for IP
      literals, into freshly assigned slots before it forks the workers that
      read them; the health-check process, for resolved hostnames, inside
      ``begin_write``/``end_write`` (a sequence lock: readers retry or keep
      their previous view while ``version`` is odd or has moved).
    - ``fails``, ``passive_down``, ``down_until`` (passive health): workers'
      relay threads, under ``lock``; the health-check process clears them when
      checks bring a backend back.
    - ``active_down``, ``last_check``, ``last_check_ok`` (active health): the
      health-check process; the master clears them for backends whose listener
      no longer has checks (``SharedState.clear_unchecked_verdicts``), once no
      health-check process of the old config is left to write them.
    - ``active`` (connections per worker row and slot): the worker owning the
      row only; ``row_owner`` is claimed and swept under ``lock``.
    - ``health_version``: bumped by every write to ``family``, ``active_down``
      or ``down_until`` (see ``_VersionedCells``): balancers rebuild their list
      of up backends only when it moved (or a ``down_until`` passed).
    """

    def __init__(self, slots: int = MAX_BACKEND_ADDRESSES, rows: int = WORKER_ROWS) -> None:
        self.slots, self.rows = slots, rows
        fields = [("family", "i", slots), ("port", "i", slots), ("scope", "I", slots),
                  ("fails", "i", slots), ("passive_down", "i", slots),
                  ("active_down", "i", slots), ("last_check_ok", "i", slots),
                  ("down_until", "d", slots), ("last_check", "d", slots),
                  ("ip", "B", slots * 16), ("version", "Q", 1), ("rows_used", "i", 1),
                  ("row_owner", "i", rows), ("active", "i", rows * slots)]
        sizes = {"i": 4, "I": 4, "d": 8, "B": 1, "Q": 8}
        total = sum((sizes[kind] * count + 7) // 8 * 8 for _, kind, count in fields)
        # Anonymous and MAP_SHARED: zero-filled, inherited by every child, no file.
        self._map = mmap.mmap(-1, total)
        offset = 0
        for name, kind, count in fields:
            size = sizes[kind] * count
            setattr(self, name, memoryview(self._map)[offset:offset + size].cast(kind))
            offset += (size + 7) // 8 * 8
        # Every write to what ``eligible`` reads bumps ``health_version``, so a
        # balancer keeps its view of which backends are up until it moves.
        self.health_version = RoundRobinCounter()
        for name in ("family", "active_down", "down_until"):
            setattr(self, name, _VersionedCells(getattr(self, name), self.health_version))
        self.lock = ProcessLock()
        self._row_pid = -1
        self._row = -1
        self._private: Dict[int, int] = {}  # counts of a worker that found no free row
        self._row_lock = threading.Lock()

    # -- addresses

    def address(self, slot: int) -> Optional[Tuple[int, tuple]]:
        """``(family, sockaddr)`` of a slot, or None while it holds no address."""
        family = self.family[slot]
        if not family:
            return None
        raw = bytes(self.ip[slot * 16:slot * 16 + 16])
        if family == socket.AF_INET6:
            return family, (socket.inet_ntop(family, raw), self.port[slot], 0, self.scope[slot])
        return family, (socket.inet_ntop(family, raw[:4]), self.port[slot])

    def set_address(self, slot: int, family: int, sockaddr: tuple) -> None:
        """Write a slot's address and start its health afresh (see the class for who may)."""
        packed = socket.inet_pton(family, sockaddr[0].split("%", 1)[0])
        self.ip[slot * 16:slot * 16 + 16] = packed.ljust(16, b"\0")
        self.port[slot] = sockaddr[1]
        self.scope[slot] = sockaddr[3] if family == socket.AF_INET6 else 0
        self.reset_health(slot)
        self.family[slot] = family

    def clear_address(self, slot: int) -> None:
        self.family[slot] = 0
        self.reset_health(slot)

    def reset_health(self, slot: int) -> None:
        self.fails[slot] = self.passive_down[slot] = self.active_down[slot] = 0
        self.last_check_ok[slot] = 0
        self.down_until[slot] = self.last_check[slot] = 0.0

    def begin_write(self) -> None:
        """Health-check process: start changing addresses (readers see an odd version)."""
        self.version[0] += 1

    def end_write(self) -> None:
        self.version[0] += 1

    # -- health, read by the balancers on every pick

    def eligible(self, slot: int, now: float) -> bool:
        """Up for new connections: has an address, not down by checks nor by failures."""
        return (self.family[slot] != 0 and not self.active_down[slot]
                and self.down_until[slot] <= now)

    def record_failure(self, slot: int, fall: int, fail_timeout_s: float,
                       now: float) -> Tuple[int, bool]:
        """A client's connect failed.  Returns (consecutive failures, newly marked down).

        With ``fall`` > 0, reaching ``fall`` marks the backend down until
        ``now + fail_timeout_s``; a failure while it is still marked (the one
        try after the timeout) marks it down again, without a new state change.
        """
        with self.lock:
            fails = self.fails[slot] + 1
            self.fails[slot] = fails
            newly = False
            if fall and fails >= fall:
                self.down_until[slot] = now + fail_timeout_s
                newly = not self.passive_down[slot]
                self.passive_down[slot] = 1
            return fails, newly

    def record_success(self, slot: int) -> bool:
        """A client connected: the failure run ends.  True if that brings it back up."""
        if not self.fails[slot] and not self.passive_down[slot]:
            return False  # the common case costs two reads and no lock
        with self.lock:
            was_down = bool(self.passive_down[slot])
            self.fails[slot] = self.passive_down[slot] = 0
            self.down_until[slot] = 0.0
            return was_down

    # -- connection counts: one row per worker process

    def claim_row(self) -> int:
        """This process's row of connection counts, claimed on first use (after fork)."""
        pid = _PID[0]
        if self._row_pid != pid:
            with _CLAIM_LOCK:  # relay threads of a new worker may race to claim
                if self._row_pid != pid:
                    self._private = {}
                    self._row_lock = threading.Lock()
                    self._row = self._claim_row(pid)
                    self._row_pid = pid
        return self._row

    def _claim_row(self, pid: int) -> int:
        with self.lock:
            for row in range(self.rows):
                if self.row_owner[row] == pid:
                    return row
            for row in range(self.rows):
                owner = self.row_owner[row]
                if owner == 0 or not _pid_alive(owner):
                    self._zero_row(row)
                    self.row_owner[row] = pid
                    self.rows_used[0] = max(self.rows_used[0], row + 1)
                    return row
        log.warning("no free row for process %d's connection counts (%d rows): least_conn and "
                    "status will not see its connections", pid, self.rows)
        return -1

    def _zero_row(self, row: int) -> None:
        self.active[row * self.slots:(row + 1) * self.slots] = \
            memoryview(bytes(4 * self.slots)).cast("i")

    def acquire(self, slot: int) -> None:
        """This process opens a connection to ``slot`` (relay threads; row-local)."""
        row = self.claim_row()
        with self._row_lock:
            if row < 0:
                self._private[slot] = self._private.get(slot, 0) + 1
            else:
                self.active[row * self.slots + slot] += 1

    def release(self, slot: int) -> None:
        row = self.claim_row()
        with self._row_lock:
            if row < 0:
                self._private[slot] = self._private.get(slot, 0) - 1
            else:
                self.active[row * self.slots + slot] -= 1

    def active_count(self, slot: int) -> int:
        """Connections to ``slot`` from every worker (a sum over the used rows)."""
        end = self.rows_used[0] * self.slots
        return sum(self.active[slot:end:self.slots]) if end else 0

    def sweep_rows(self) -> int:
        """Master: free the rows of dead processes, so their counts stop counting."""
        freed = 0
        with self.lock:
            for row in range(self.rows_used[0]):
                owner = self.row_owner[row]
                if owner and not _pid_alive(owner):
                    self._zero_row(row)
                    self.row_owner[row] = 0
                    freed += 1
        return freed


@dataclass(frozen=True)
class PoolEntry:
    """One configured backend of a listener and the slots of its addresses."""

    backend: Backend
    slots: Tuple[int, ...]  # one for an IP literal, ADDRESSES_PER_NAME for a hostname
    literal: bool


class SharedState:
    """Everything the workers share, created by the master before the first fork.

    The master calls ``reconfigure`` on every reload, before forking the new
    generation: state that belongs to something that still exists (a listener
    with the same bind address, a backend with the same address in it) is kept,
    so a reload restarts neither the rotation nor the health of a backend.
    Only the master calls ``reconfigure``; workers only read and draw.
    """

    def __init__(self, config: "Config") -> None:
        self.table = BackendTable()
        self.config = config
        self._round_robin: Dict[str, RoundRobinCounter] = {}
        self._pools: Dict[str, Tuple[PoolEntry, ...]] = {}
        self._entry_slots: Dict[Tuple[str, str, int], Tuple[int, ...]] = {}
        self._next_fresh = 0
        self._retired: Deque[int] = collections.deque()  # freed slots, reused oldest first
        self.reconfigure(config)

    def reconfigure(self, config: "Config") -> None:
        self.config = config
        wanted: Dict[Tuple[str, str, int], Tuple[str, Backend]] = {}
        order: Dict[str, List[Tuple[str, str, int]]] = {}
        for index, listener in enumerate(config.listeners):
            key = self._key(listener, index)
            if key not in self._round_robin:
                self._round_robin[key] = RoundRobinCounter()
            seen: Dict[str, int] = collections.Counter()
            order[key] = []
            for backend in listener.backends:
                name = str(backend.address)
                entry_key = (key, name, seen[name])
                seen[name] += 1
                wanted[entry_key] = (key, backend)
                order[key].append(entry_key)
        # Free what is gone first, so a config that fits the capacity always fits.
        for entry_key in [k for k in self._entry_slots if k not in wanted]:
            self._retired.extend(self._entry_slots.pop(entry_key))
        pools: Dict[str, List[PoolEntry]] = collections.defaultdict(list)
        for key, entry_keys in order.items():
            for entry_key in entry_keys:
                backend = wanted[entry_key][1]
                literal = backend.address.is_ip_literal()
                slots = self._entry_slots.get(entry_key)
                if slots is None or len(slots) != (1 if literal else ADDRESSES_PER_NAME):
                    if slots is not None:
                        self._retired.extend(slots)
                    slots = tuple(self._allocate() for _ in range(1 if literal
                                                                  else ADDRESSES_PER_NAME))
                    self._entry_slots[entry_key] = slots
                    for slot in slots:
                        self.table.clear_address(slot)
                    if literal:  # no DNS: the master writes it before any reader exists
                        try:
                            family, sockaddr = numeric_address(backend.address)
                        except ValueError as exc:
                            # Validated, but the host changed since (an interface
                            # named by a scope id was removed): this one backend
                            # stays unusable; the reload and the others go on.
                            log.error("backend %s has no usable address: %s",
                                      backend.address, exc)
                        else:
                            self.table.set_address(slots[0], family, sockaddr)
                pools[key].append(PoolEntry(backend, slots, literal))
        self._pools = {key: tuple(entries) for key, entries in pools.items()}
        cleared = self.clear_unchecked_verdicts()
        if cleared:
            log.info("health checks removed: %d backend address(es) no longer held down "
                     "by their last verdict", cleared)

    def clear_unchecked_verdicts(self) -> int:
        """Master: forget the active-check verdicts of backends no check looks at any more.

        A backend marked down by checks would otherwise stay down forever once
        a reload removed its listener's ``health_check`` table: its slot is
        kept, and nothing probes it again.  Called by ``reconfigure`` and again
        by the health checker once the old health-check process is gone (it
        could still write a verdict in between).  Returns how many were cleared.
        """
        table, cleared = self.table, 0
        for _, listener, entries in self.pools():
            if listener.health_check is not None:
                continue
            for entry in entries:
                for slot in entry.slots:
                    if table.active_down[slot] or table.last_check[slot]:
                        cleared += bool(table.active_down[slot])
                        table.active_down[slot] = table.last_check_ok[slot] = 0
                        table.last_check[slot] = 0.0
        return cleared

    def snapshot(self) -> Tuple[object, ...]:
        """The master's bookkeeping as it is now, for ``restore`` (a reload's rollback).

        Only the master's own maps are copied: the shared table's slots that a
        later ``reconfigure`` allocates are fresh or retired ones, which the
        workers serving this config do not read, so restoring the maps
        restores what those workers see.
        """
        return (self.config, dict(self._round_robin), dict(self._pools),
                dict(self._entry_slots), self._next_fresh, collections.deque(self._retired))

    def restore(self, snapshot: Tuple[object, ...]) -> None:
        """Undo every ``reconfigure`` since ``snapshot`` (master; before new workers serve)."""
        (self.config, round_robin, pools, entry_slots, self._next_fresh,
         retired) = snapshot  # type: ignore[assignment]
        self._round_robin = dict(round_robin)  # type: ignore[call-overload]
        self._pools = dict(pools)  # type: ignore[call-overload]
        self._entry_slots = dict(entry_slots)  # type: ignore[call-overload]
        self._retired = collections.deque(retired)  # type: ignore[call-overload]

    def _allocate(self) -> int:
        if self._next_fresh < self.table.slots:
            self._next_fresh += 1
            return self._next_fresh - 1
        return self._retired.popleft()  # config validation guarantees enough are free

    @staticmethod
    def _key(listener: "ListenerConfig", index: int) -> str:
        return str(listener.bind) if listener.bind.port else f"{listener.bind}#{index}"

    def round_robin(self, listener: "ListenerConfig", index: int) -> RoundRobinCounter:
        """The counter of the ``index``-th listener of the config the worker serves."""
        return self._round_robin[self._key(listener, index)]

    def pool(self, listener: "ListenerConfig", index: int) -> Tuple[PoolEntry, ...]:
        """The backends of the ``index``-th listener, with their slots."""
        return self._pools[self._key(listener, index)]

    def pools(self) -> List[Tuple[int, "ListenerConfig", Tuple[PoolEntry, ...]]]:
        """Every listener of the current config with its pool (health checks, status)."""
        return [(index, listener, self.pool(listener, index))
                for index, listener in enumerate(self.config.listeners)]
