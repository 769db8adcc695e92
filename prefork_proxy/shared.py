"""Values shared by the master, the workers and the health-check process, created before fork.

The master creates one ``SharedState`` before the first fork; every child
inherits it.  Each value names its writers.  Shared memory cannot grow once
children exist, so capacities are fixed (``MAX_BACKEND_ADDRESSES`` address
slots; ``rows.WorkerRows`` holds the per-worker rows).

Principle (no lock a dead process can keep): a process-shared semaphore (what
``multiprocessing.Value`` carries) stays taken forever if its holder is killed
with SIGKILL, and every other worker would then block or time out on every
draw.  The locks here are kernel record locks (``fcntl.lockf``, see
``ProcessLock``), which the kernel releases when their holder dies, however
it dies.  Most cells need no lock at all because they have one writer: the
health-check process's check results and the addresses it resolves, and a
worker's own row (``rows``).

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
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Deque, Dict, List, Optional, Tuple

from prefork_proxy.config import ADDRESSES_PER_NAME, MAX_BACKEND_ADDRESSES, Backend, numeric_address
from prefork_proxy.listeners import ListenerKey, listener_key
from prefork_proxy.rows import LISTENER_SLOTS, WorkerRows, rows_for

if TYPE_CHECKING:
    from prefork_proxy.config import Config, ListenerConfig, RoutePool

log = logging.getLogger("prefork_proxy.shared")

#: Reasons of ``prefork_proxy_backend_connect_errors_total`` (issue 11), by index.
ERROR_REASONS = ("refused", "timeout", "unreachable", "other")


def error_reason(reason: str) -> int:
    """Index in ``ERROR_REASONS`` of a failed connect's reason as the relay words it."""
    lowered = reason.lower()
    # A unix backend whose socket file is missing (ENOENT) refuses, as a closed port does.
    if "refused" in lowered or "no such file" in lowered:
        return 0
    if "timed out" in lowered:
        return 1
    if "unreachable" in lowered or "no route" in lowered:
        return 2
    return 3


#: ``BackendTable.admin_state`` values, by name (``prefork-proxy backend``).
ADMIN_READY, ADMIN_DRAIN, ADMIN_DISABLED = 0, 1, 2
ADMIN_STATES = {"ready": ADMIN_READY, "drain": ADMIN_DRAIN, "disabled": ADMIN_DISABLED}
ADMIN_STATE_NAMES = {value: name for name, value in ADMIN_STATES.items()}


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


# -- for ``limits`` only (its own per-worker ledger rows, claimed by pid): to move
# onto ``rows.WorkerRows`` (claimed by the master at spawn) when limits are wired.

#: Ledger rows of ``limits``: live workers of every generation at once.
WORKER_ROWS = 256
# The pid of this process, kept current across fork (``os.getpid`` is a system call).
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
      their previous view while ``version`` is odd or has moved).  A unix
      backend's path does not fit the 16-byte ``ip`` cell: the master keeps it
      in ``unix_paths``, a plain dict of this process, written with the slot
      (a literal, so before the fork of every reader) and inherited by them.
    - ``fails``, ``passive_down``, ``down_until`` (passive health): workers'
      relay threads, under ``lock``; the health-check process clears them when
      checks bring a backend back.
    - ``active_down``, ``last_check``, ``last_check_ok`` (active health): the
      health-check process; the master clears them for backends whose listener
      no longer has checks (``SharedState.clear_unchecked_verdicts``), once no
      health-check process of the old config is left to write them.
    - ``errors`` (connect errors per slot and ``ERROR_REASONS`` reason, only
      ever increasing): workers' relay threads, under ``lock`` (taken on every
      failure anyway).  Connection counts per worker live in ``rows``.
    - ``admin_state`` (``ADMIN_STATES``: the operator's ``prefork-proxy
      backend ... drain|disable|enable``): the master, from its control
      socket (``backend_control``), and when a slot is given to a new
      backend (zeroed); the health-check process ends a drain (drain ->
      ready) when checks bring the address back up after marking it down (a
      plain read-then-write: a disable landing in that instant can be lost,
      and the operator sees it in ``backend list``).  Kept across respawns
      and, for surviving backends, reloads.
      Any state but ``ready`` keeps the slot out of every balancer's choice,
      even as a last resort when everything else is down.
    - ``health_version``: bumped by every write to ``family``, ``active_down``,
      ``down_until`` or ``admin_state`` (see ``_VersionedCells``): balancers
      rebuild their list of up backends only when it moved (or a
      ``down_until`` passed).
    """

    def __init__(self, slots: int = MAX_BACKEND_ADDRESSES) -> None:
        self.slots = slots
        fields = [("family", "i", slots), ("port", "i", slots), ("scope", "I", slots),
                  ("fails", "i", slots), ("passive_down", "i", slots),
                  ("active_down", "i", slots), ("last_check_ok", "i", slots),
                  ("down_until", "d", slots), ("last_check", "d", slots),
                  ("ip", "B", slots * 16), ("version", "Q", 1),
                  ("errors", "Q", slots * len(ERROR_REASONS)), ("admin_state", "i", slots)]
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
        self.admin_raw = self.admin_state  # unversioned reads (a relay thread's one-backend path)
        for name in ("family", "active_down", "down_until", "admin_state"):
            setattr(self, name, _VersionedCells(getattr(self, name), self.health_version))
        self.lock = ProcessLock()
        self.unix_paths: Dict[int, str] = {}  # slot -> path (see the class docstring)

    # -- addresses

    def address(self, slot: int) -> Optional[Tuple[int, tuple]]:
        """``(family, sockaddr)`` of a slot, or None while it holds no address."""
        family = self.family[slot]
        if not family:
            return None
        if family == socket.AF_UNIX:
            return family, self.unix_paths.get(slot, "")  # type: ignore[return-value]
        raw = bytes(self.ip[slot * 16:slot * 16 + 16])
        if family == socket.AF_INET6:
            return family, (socket.inet_ntop(family, raw), self.port[slot], 0, self.scope[slot])
        return family, (socket.inet_ntop(family, raw[:4]), self.port[slot])

    def set_address(self, slot: int, family: int, sockaddr: tuple) -> None:
        """Write a slot's address and start its health afresh (see the class for who may)."""
        if family == socket.AF_UNIX:
            self.unix_paths[slot] = sockaddr  # type: ignore[assignment]
            self.reset_health(slot)
            self.family[slot] = family
            return
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
                and not self.admin_state[slot]
                and self.down_until[slot] <= now)

    def healthy(self, slot: int, now: float) -> bool:
        """``eligible`` but for the operator's state: what ``backend_up`` reports."""
        return (self.family[slot] != 0 and not self.active_down[slot]
                and self.down_until[slot] <= now)

    def record_failure(self, slot: int, fall: int, fail_timeout_s: float,
                       now: float, reason: str = "") -> Tuple[int, bool]:
        """A client's connect failed.  Returns (consecutive failures, newly marked down).

        With ``fall`` > 0, reaching ``fall`` marks the backend down until
        ``now + fail_timeout_s``; a failure while it is still marked (the one
        try after the timeout) marks it down again, without a new state change.
        """
        with self.lock:
            self.errors[slot * len(ERROR_REASONS) + error_reason(reason)] += 1
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

    def error_counts(self, slot: int) -> Dict[str, int]:
        """Connect errors of ``slot`` so far, by reason (never decreasing)."""
        base = slot * len(ERROR_REASONS)
        return {reason: self.errors[base + i] for i, reason in enumerate(ERROR_REASONS)}

    def reset_errors(self, slot: int) -> None:
        """Master: a slot is given to another backend; its error counts start at 0."""
        for i in range(len(ERROR_REASONS)):
            self.errors[slot * len(ERROR_REASONS) + i] = 0


@dataclass(frozen=True)
class PoolEntry:
    """One configured backend of a listener and the slots of its addresses."""

    backend: Backend
    slots: Tuple[int, ...]  # one for an IP literal, ADDRESSES_PER_NAME for a hostname
    literal: bool


#: Who a pool is across reloads: a listener's own pool is keyed by its ``listener_key``;
#: a route's by ``(listener_key, "route", route label)`` (see ``SharedState``).
PoolKey = Tuple[object, ...]


def pool_key(key: ListenerKey, route: Optional["RoutePool"]) -> PoolKey:
    """The pool key of a listener's own pool (``route`` None) or of one of its routes."""
    return key if route is None else (key, "route", route.route_name)


class SharedState:
    """Everything the workers share, created by the master before the first fork.

    The master calls ``reconfigure`` on every reload, before forking the new
    generation: state that belongs to something that still exists (a listener
    with the same bind address, a backend with the same address in it) is kept,
    so a reload restarts neither the rotation nor the health of a backend.
    Only the master calls ``reconfigure``; workers only read and draw.

    Pools: each listener has its own pool (its ``backends``, possibly empty
    when it has routes) and one per SNI route (``[[tcp_proxy.routes]]``,
    ``config.RoutePool``).  A route's pool is a pool like any other: its own
    slots in the backend table (so its own health, admin state, connection
    and error counts, even for an address the listener's pool lists too), its
    own round-robin counter; a route keeps them across a reload while its
    listener and its name (``RouteConfig.label``) stay.
    """

    def __init__(self, config: "Config", rows: Optional[int] = None) -> None:
        self.table = BackendTable()
        # The worker rows (see ``rows``), as many as a reload and some scaling need.
        self.rows = WorkerRows(rows or rows_for(config.server.workers), self.table.slots)
        self.config = config
        self._keys: List[ListenerKey] = []  # listener_key of each listener, in config order
        # Every pool of the config, in order: (listener index, spec, pool key); spec is
        # the ListenerConfig for its own pool, a RoutePool for a route's.
        self._specs: List[Tuple[int, object, PoolKey]] = []
        self._round_robin: Dict[PoolKey, RoundRobinCounter] = {}
        self._listener_slots: Dict[ListenerKey, int] = {}
        self._free_listener_slots: Deque[int] = collections.deque(range(LISTENER_SLOTS))
        self._pools: Dict[PoolKey, Tuple[PoolEntry, ...]] = {}
        self._entry_slots: Dict[Tuple[PoolKey, str, int], Tuple[int, ...]] = {}
        self._next_fresh = 0
        self._retired: Deque[int] = collections.deque()  # freed slots, reused oldest first
        self.reconfigure(config)

    def reconfigure(self, config: "Config") -> None:
        self.config = config
        self._keys = [listener_key(listener, index)
                      for index, listener in enumerate(config.listeners)]
        self._specs = []
        for index, listener in enumerate(config.listeners):
            self._specs.append((index, listener, pool_key(self._keys[index], None)))
            for route in listener.route_pools():
                self._specs.append((index, route, pool_key(self._keys[index], route)))
        wanted: Dict[Tuple[PoolKey, str, int], Backend] = {}
        order: Dict[PoolKey, List[Tuple[PoolKey, str, int]]] = {}
        for key in [k for k in self._listener_slots if k not in self._keys]:
            self._free_listener_slots.append(self._listener_slots.pop(key))
        for index in range(len(config.listeners)):
            key = self._keys[index]
            if key not in self._listener_slots:
                # Oldest freed first: a slot just given up may still be counted
                # in the rows of draining workers for a while.
                lslot = self._listener_slots[key] = self._free_listener_slots.popleft()
                self.rows.reset_listener(lslot)
        for _, spec, pkey in self._specs:
            if pkey not in self._round_robin:
                self._round_robin[pkey] = RoundRobinCounter()
            seen: Dict[str, int] = collections.Counter()
            order[pkey] = []
            for backend in spec.backends:  # type: ignore[attr-defined]
                name = str(backend.address)
                entry_key = (pkey, name, seen[name])
                seen[name] += 1
                wanted[entry_key] = backend
                order[pkey].append(entry_key)
        # Free what is gone first, so a config that fits the capacity always fits.
        for entry_key in [k for k in self._entry_slots if k not in wanted]:
            self._retired.extend(self._entry_slots.pop(entry_key))
        pools: Dict[PoolKey, List[PoolEntry]] = {pkey: [] for pkey in order}
        for pkey, entry_keys in order.items():
            for entry_key in entry_keys:
                backend = wanted[entry_key]
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
                        self.table.reset_errors(slot)  # a fresh backend's counters start at 0
                        self.table.admin_state[slot] = ADMIN_READY  # and it is in rotation
                        self.rows.reset_backend(slot)
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
                pools[pkey].append(PoolEntry(backend, slots, literal))
        self._pools = {key: tuple(entries) for key, entries in pools.items()}
        cleared = self.clear_unchecked_verdicts()
        if cleared:
            log.info("health checks removed: %d backend address(es) no longer held down "
                     "by their last verdict", cleared)

    def clear_unchecked_verdicts(self) -> int:
        """Master: forget the active-check verdicts of backends no check looks at any more.

        A backend marked down by checks would otherwise stay down forever once
        a reload removed its pool's ``health_check`` table: its slot is
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
        return (self.config, list(self._keys), list(self._specs), dict(self._round_robin),
                dict(self._pools), dict(self._entry_slots), self._next_fresh,
                collections.deque(self._retired), dict(self._listener_slots),
                collections.deque(self._free_listener_slots))

    def restore(self, snapshot: Tuple[object, ...]) -> None:
        """Undo every ``reconfigure`` since ``snapshot`` (master; before new workers serve)."""
        (self.config, keys, specs, round_robin, pools, entry_slots, self._next_fresh,
         retired, listener_slots, free_listener_slots) = snapshot  # type: ignore[assignment]
        self._keys = list(keys)  # type: ignore[call-overload]
        self._specs = list(specs)  # type: ignore[call-overload]
        self._listener_slots = dict(listener_slots)  # type: ignore[call-overload]
        self._free_listener_slots = collections.deque(free_listener_slots)  # type: ignore
        self._round_robin = dict(round_robin)  # type: ignore[call-overload]
        self._pools = dict(pools)  # type: ignore[call-overload]
        self._entry_slots = dict(entry_slots)  # type: ignore[call-overload]
        self._retired = collections.deque(retired)  # type: ignore[call-overload]

    def _allocate(self) -> int:
        if self._next_fresh < self.table.slots:
            self._next_fresh += 1
            return self._next_fresh - 1
        return self._retired.popleft()  # config validation guarantees enough are free

    def round_robin(self, listener: "ListenerConfig", index: int,
                    route: Optional["RoutePool"] = None) -> RoundRobinCounter:
        """The counter of the ``index``-th listener of the config the worker serves
        (of its route ``route``, a ``RoutePool``, when given)."""
        return self._round_robin[pool_key(self._keys[index], route)]

    def pool(self, listener: "ListenerConfig", index: int,
             route: Optional["RoutePool"] = None) -> Tuple[PoolEntry, ...]:
        """The backends of the ``index``-th listener (of its ``route``), with their slots."""
        return self._pools[pool_key(self._keys[index], route)]

    def listener_slot(self, index: int) -> int:
        """The counter slot (in ``rows``) of the ``index``-th listener of the config."""
        return self._listener_slots[self._keys[index]]

    def counters(self) -> Dict[str, Dict[str, Dict[str, object]]]:
        """Every counter of the current config's listeners and backends (master; the
        read side a metrics collector uses).  Labels: the listener's label, and
        ``label|backend address`` for a backend of its own pool (``label|route|backend
        address`` for one of a route's; a hostname's addresses together).  A backend
        also has ``connect_errors_total`` ({reason: n}), ``up`` (0/1) and
        ``admin_state`` (a name of ``ADMIN_STATES``); a route's
        backend also ``listener``, ``route`` and ``backend`` (its metric labels).
        """
        listener_slots = {listener.label: self.listener_slot(index)
                          for index, listener, _ in self.pools()}
        keyed = [(_backend_key(spec, entry), spec, entry)
                 for _, spec, entries in self.pools() for entry in entries]
        backend_slots = {key: entry.slots for key, _, entry in keyed}
        totals: Dict[str, Dict[str, Dict[str, object]]] = \
            self.rows.snapshot(listener_slots, backend_slots)  # type: ignore[assignment]
        now = time.monotonic()
        for key, spec, entry in keyed:
            errors: Dict[str, int] = collections.Counter()
            for slot in entry.slots:
                errors.update(self.table.error_counts(slot))
            backend = totals["backends"][key]
            if spec.route_name:  # a route's: its labels spelled out (the key has three parts)
                backend.update(listener=spec.label, route=spec.route_name,
                               backend=str(entry.backend.address))
            backend["connect_errors_total"] = dict(errors)
            # Up: one of its addresses takes new connections (health only:
            # checks and failures, as the balancers see it).
            # (Not ``eligible``, which also says no for a drained backend: up is
            # health, and a drained healthy backend must not look down.)
            backend["up"] = int(any(self.table.healthy(slot, now) for slot in entry.slots))
            # The operator's state (``prefork-proxy backend``), which ``up`` leaves out:
            # the most restrictive of its addresses' (a command sets them all).
            backend["admin_state"] = ADMIN_STATE_NAMES.get(
                max(self.table.admin_state[slot] for slot in entry.slots), "ready")
        return totals

    def pools(self) -> List[Tuple[int, "ListenerConfig", Tuple[PoolEntry, ...]]]:
        """Every pool of the current config, in order: each listener's own (its
        ``ListenerConfig``), then its routes' (``RoutePool``, which reads like one:
        ``label``, ``route_name``, ``health_check``, ``backend_send_proxy``...),
        each as (listener index, spec, entries), for health checks, status, metrics."""
        return [(index, spec, self._pools[pkey])  # type: ignore[misc]
                for index, spec, pkey in self._specs]


def _backend_key(spec: object, entry: PoolEntry) -> str:
    """A backend's key in ``counters()``: unique per pool and configured address."""
    route = spec.route_name  # type: ignore[attr-defined]
    label = spec.label  # type: ignore[attr-defined]
    return (f"{label}|{route}|{entry.backend.address}" if route
            else f"{label}|{entry.backend.address}")
