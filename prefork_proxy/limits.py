"""Connection limits shared by every worker: per listener, per source, new per source per second.

Who owns what.  The master creates one ``ConnectionLimits`` before the first
fork (one anonymous shared ``mmap``, fixed in size, inherited by every
child; ``gate.connection_limits``), calls ``release_process(pid)`` as it reaps
a worker and ``sweep`` from its loop about once a second (rows of processes
that died unseen by reap); workers' relay threads call ``acquire`` when a
connection is admitted (``admission.steps.SourceLimitStep``, after the ACL)
and ``release`` exactly once when it ends; anyone may read ``connections``/``at_capacity``
without a lock (one aligned read; the accept loop can use it to stop
accepting when a listener is full and leave clients in the kernel queue).

A *scope* is a small int naming a listener (the caller maps listeners to
scopes, e.g. in bind-key order as ``SharedState`` does, so a reload that keeps a
listener keeps its counts).  ``acquire(scope, ip, max_connections,
max_per_source, max_new_per_second)`` admits a connection or says which limit
refused it; a limit of 0 is off, and a call with every per-source limit off
never touches the source table.

Why one lock, and which.  The per-source table is an open-addressing hash
table in shared memory: inserting a new source writes several words (key,
hash, counts) that no single atomic instruction covers, and two workers
inserting the same new source must not make two entries.  So the table needs
mutual exclusion anyway; once it is held, the listener count and the rate
window ride along for free, and all three are exact (check and increment
happen under the same lock: ±0 across workers).  The alternatives fall short:
per-worker rows summed on read are exact *counts* but not exact *admission*
(two workers can both read 4,999 of 5,000 and both increment), and a libatomic
compare-and-swap covers one word, not a table insert.  The lock is a
``robust_mutex.RobustMutex`` (a robust, process-shared pthread mutex: no
system call unless another process holds it, and a holder killed with
SIGKILL cannot keep it), or, where libc has none, ``RecordLock`` (a kernel
record lock: two system calls per use, same guarantee).  It is taken once
per acquire and once per release and held for a few microseconds:
``scripts/bench_admission.py`` measures the cost per connection.

Exactly once, and SIGKILL.  Every worker owns a *row* (claimed on its first
acquire, by pid, as ``BackendTable`` rows are) holding a *ledger*: one record
per connection it holds (which scope, which source, whether the source table
was counted).  A token is that record's index plus a generation, so
releasing a token twice, or a stale token whose record was reused, is a no-op
that returns False.  When a worker dies, ``sweep`` (or the next process to
claim its row) undoes every record of its ledger: the source can connect
again.  A worker killed in the middle of an update (while its row's ``dirty``
flag is set, inside the lock) may have left a half-done change; then the
sweep rebuilds every count from the ledgers of the live rows, which are the
truth (rare: a kill inside a critical section of a few microseconds).

Bounded memory.  ``sources`` entries at most (the table has twice as many
slots, so probes stay short); when it is full, a *new* source is refused
(``source_table_full``) while known sources go on, and an entry frees itself
when its last connection ends and its rate window has passed (lazily, by a
bounded scan when a new source finds the table full).  Each worker's ledger
holds ``ledger`` connections; beyond, ``worker_ledger_full``.  A scope may
also have a *share* (``set_shares``, from the master: ``gate.source_shares``):
at most that many *live* sources (with an open connection) at once, so one
listener flooded with new addresses cannot take the whole table from the
others (beyond it, ``source_share_full``); a source already live always gets
in, up to its own limits.  The table's hash is Python's ``hash(bytes)``:
SipHash keyed by the interpreter's random secret, which every process forked
from the master shares, so clients cannot pick addresses that collide.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import socket
import tempfile
import threading
import time
import weakref
from typing import Callable, Dict, List, Optional

from prefork_proxy import robust_mutex
from prefork_proxy.robust_mutex import RobustMutex
from prefork_proxy.shared import _PID, WORKER_ROWS, _pid_alive

log = logging.getLogger("prefork_proxy.limits")

#: Refusals returned by ``acquire`` (a token is >= 0); ``REASONS`` gives their labels.
REFUSED_LISTENER = -1
REFUSED_SOURCE = -2
REFUSED_RATE = -3
REFUSED_TABLE_FULL = -4
REFUSED_LEDGER_FULL = -5
REFUSED_SHARE = -6
REASONS: Dict[int, str] = {
    REFUSED_LISTENER: "max_connections",
    REFUSED_SOURCE: "max_connections_per_source",
    REFUSED_RATE: "max_new_connections_per_source",
    REFUSED_TABLE_FULL: "source_table_full",
    REFUSED_LEDGER_FULL: "worker_ledger_full",
    REFUSED_SHARE: "source_share_full",
}

_KEY = 18  # bytes of a source key: the scope (2) and the address, IPv4 as ::ffff:a.b.c.d (16)
_V4_PREFIX = b"\0" * 10 + b"\xff\xff"
_INDEX_BITS = 20  # a token is (generation << 20) | ledger index
_INDEX_MASK = (1 << _INDEX_BITS) - 1
#: Slots a new source looking at a full table examines for entries to free.
RECLAIM_SCAN = 64
#: Ledger records per worker: a worker's open files (20,000 here) hold half as many connections.
LEDGER_PER_ROW = 10240

_FREE, _SCOPE_ONLY, _WITH_SOURCE = 0, 1, 2  # ledger record states


class RecordLock:
    """A cross-process lock a dead holder cannot keep, for a per-connection path.

    As ``shared.ProcessLock``: a POSIX record lock on one byte of an unlinked
    file (the kernel drops it when its holder dies) behind a per-process
    ``threading.Lock`` (record locks belong to a process, not a thread).  The
    thread lock is replaced in a forked child by an at-fork hook rather than
    by a pid check on every call: fewer calls on the way in, and no window in
    which two threads of a new child could each make their own.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="prefork-proxy-limits-")
        self._fd = self._file.fileno()
        self._threads = threading.Lock()
        _RECORD_LOCKS.add(self)

    def _after_fork(self) -> None:
        self._threads = threading.Lock()

    def acquire(self) -> None:
        threads = self._threads
        threads.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, 0)
        except BaseException:
            threads.release()
            raise

    def release(self) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)
        finally:
            self._threads.release()

    def __enter__(self) -> "RecordLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_RECORD_LOCKS: "weakref.WeakSet[RecordLock]" = weakref.WeakSet()


def _reset_record_locks() -> None:
    for lock in list(_RECORD_LOCKS):
        lock._after_fork()


os.register_at_fork(after_in_child=_reset_record_locks)


def new_lock() -> "RobustMutex | RecordLock":
    """The limits' cross-process lock: a ``RobustMutex`` where libc has one, else a
    ``RecordLock``."""
    if robust_mutex.available():
        try:
            return robust_mutex.RobustMutex()
        except OSError as exc:
            log.warning("no robust mutex (%s): the connection limits use a record lock", exc)
    return RecordLock()


#: Client addresses per scope whose table key a ``ConnectionLimits`` remembers before
#: it starts that scope's memo over.
KEY_MEMO_SIZE = 4096


def source_key(scope: int, ip: str) -> bytes:
    """The table key of a client address (``str``, as the socket gives it) in a scope."""
    if ":" not in ip:
        packed = _V4_PREFIX + socket.inet_pton(socket.AF_INET, ip)
    else:
        packed = socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
    return scope.to_bytes(2, "big") + packed


class ConnectionLimits:
    """Shared counts and the per-source table; see the module docstring for the protocol."""

    def __init__(self, sources: int = 65536, scopes: int = 256, rows: int = WORKER_ROWS,
                 ledger: int = LEDGER_PER_ROW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < ledger <= _INDEX_MASK + 1 or not 0 < scopes <= 1 << 16 or sources < 1:
            raise ValueError("ConnectionLimits: sources >= 1, 1-65536 scopes, 1-2**20 ledger")
        self.capacity, self.scopes, self.rows, self.ledger_size = sources, scopes, rows, ledger
        slots = 2
        while slots < 2 * sources:
            slots *= 2
        self.slots, self._mask = slots, slots - 1
        self._clock = clock
        fields = [("used", "B", slots), ("hashes", "q", slots), ("count", "i", slots),
                  ("window", "q", slots), ("window_count", "i", slots),
                  ("keys", "B", slots * _KEY), ("meta", "q", 3), ("scope_count", "q", scopes),
                  ("scope_live", "q", scopes), ("scope_share", "q", scopes),
                  ("row_owner", "i", rows), ("row_dirty", "i", rows), ("row_high", "i", rows),
                  ("ledger_state", "B", rows * ledger), ("ledger_gen", "I", rows * ledger),
                  ("ledger_key", "B", rows * ledger * _KEY)]
        sizes = {"B": 1, "i": 4, "I": 4, "q": 8}
        self.size = sum((sizes[kind] * count + 7) // 8 * 8 for _, kind, count in fields)
        # Anonymous and MAP_SHARED: zero-filled, inherited through fork; pages cost memory
        # only once touched (the ledgers of rows no worker uses stay untouched).
        self._map = mmap.mmap(-1, self.size)
        offset = 0
        for name, kind, count in fields:
            size = sizes[kind] * count
            setattr(self, name, memoryview(self._map)[offset:offset + size].cast(kind))
            if name == "keys":
                # ``_find`` compares keys by slicing the map itself: a slice of an
                # mmap is bytes, compared in one memcmp (a memoryview slice compares
                # through the buffer protocol, about twice as slow).
                self._keys_at = offset
            offset += (size + 7) // 8 * 8
        # meta: [0] entries in the table, [1] reclaim cursor, [2] rows used (high-water)
        # What ``_find`` probes, in one attribute (one load instead of five per probe).
        self._probe = (self.used, self.hashes, self._map, self._keys_at, self._mask)
        self.lock = new_lock()
        # The lock as the per-connection path calls it: ``_enter()`` returns a true
        # value only when a robust mutex was not taken at once, because another
        # holds it or its holder died (then ``finish_acquire`` takes it).
        if isinstance(self.lock, RobustMutex):
            self._enter, self._exit = self.lock.calls()
        else:
            self._enter, self._exit = self.lock.acquire, self.lock.release
        self._row_pid = -1
        self._row = -1
        self._free: List[int] = []   # this process's released ledger indices (under the lock)
        self._fresh = 0              # this process's next never-used ledger index
        # The key of each of this process's ledger records (its first two bytes name
        # the scope), so a release need not read it back from shared memory (the
        # ledger's copy is for the sweep).
        self._keys: List[Optional[bytes]] = []
        self._scope_keys = [scope.to_bytes(2, "big") for scope in range(scopes)]
        # ``source_key`` per scope and address string, for this process: a source
        # that reconnects is packed once, and its key (the same bytes object each
        # time) keeps its hash, so the per-connection ``hash`` costs no SipHash.
        # Bounded per scope, emptied when full; made on a scope's first use.
        # Single-key dict operations are atomic under the interpreter lock:
        # threads share them.
        self._key_memos: List[Optional[Dict[str, bytes]]] = [None] * scopes

    # -- reads without the lock

    def connections(self, scope: int) -> int:
        """Open connections of a scope, all workers together."""
        return self.scope_count[scope]

    def at_capacity(self, scope: int, max_connections: int) -> bool:
        """For the accept loop: True while a listener with this limit is full."""
        return bool(max_connections) and self.scope_count[scope] >= max_connections

    def live_sources(self, scope: int) -> int:
        """Sources with at least one open connection in a scope, all workers together."""
        return self.scope_live[scope]

    def set_shares(self, shares: Dict[int, int], scopes: range) -> None:
        """Master (at start and every reload): each scope of ``scopes`` may hold at most
        ``shares[scope]`` live sources (absent or 0: no share of its own, only the
        table's capacity bounds it).

        The share of the table one listener may take, so that a flood of new
        addresses on it cannot refuse every new source of the others (beyond
        it: ``REFUSED_SHARE``, ``source_share_full``).  A source that still has
        an open connection always gets in (up to its own limits).
        """
        with self.lock:
            for scope in scopes:
                self.scope_share[scope] = shares.get(scope, 0)

    def source_connections(self, scope: int, ip: str) -> int:
        """Open connections of one source in a scope (0 if the table has no entry)."""
        key = source_key(scope, ip)
        with self.lock:
            slot = self._find(key, hash(key))
            return self.count[slot] if slot >= 0 else 0

    # -- a connection's admission and its end (relay threads of a worker)

    def acquire(self, scope: int, ip: str, max_connections: int = 0, max_per_source: int = 0,
                max_new_per_second: int = 0) -> int:
        """Admit one connection: a token (>= 0) for ``release``, or a ``REFUSED_*`` (< 0).

        ``ip`` is the client address as a ``str`` (OSError if it is not one).
        """
        per_source = max_per_source or max_new_per_second
        if per_source:
            memo = self._key_memos[scope]
            key = memo.get(ip) if memo is not None else None  # type: ignore[assignment]
            if key is None:
                key = self._remember_key(scope, ip)
            digest = hash(key)  # outside the lock: held as briefly as can be
        else:
            key, digest = self._scope_keys[scope], 0
        row = self._row if self._row_pid == _PID[0] else self._claim_row()
        if row < 0:
            return REFUSED_LEDGER_FULL
        code = self._enter()
        if code:  # a robust mutex held by another, or whose holder died (see ``RobustMutex``)
            self.lock.finish_acquire(code)  # type: ignore[union-attr]
        dirty = self.row_dirty
        dirty[row] = 1
        try:
            scope_count = self.scope_count
            if max_connections and scope_count[scope] >= max_connections:
                return REFUSED_LISTENER
            free = self._free
            if not free and self._fresh >= self.ledger_size:
                return REFUSED_LEDGER_FULL
            if per_source:
                slot = self._find(key, digest)  # < 0: not in the table
                count = self.count[slot] if slot >= 0 else 0
                if max_per_source and count >= max_per_source:
                    return REFUSED_SOURCE
                if not count:  # a source with no open connection here: it becomes live
                    share = self.scope_share[scope]
                    if share and self.scope_live[scope] >= share:
                        return REFUSED_SHARE  # the scope's share of the table is taken
                    if slot < 0:
                        slot = self._admit_new(key, digest, -1 - slot)
                        if slot < 0:
                            return slot
                if max_new_per_second and not self._within_rate(slot, max_new_per_second):
                    return REFUSED_RATE
            # Commit: counts, then the ledger record (a kill in between is what
            # ``dirty`` is for: the sweep then recounts from the ledgers).
            scope_count[scope] += 1
            index = free.pop() if free else self._take_fresh(row)
            record = row * self.ledger_size + index
            start = record * _KEY
            if per_source:
                if not count:
                    self.scope_live[scope] += 1
                self.count[slot] = count + 1
                self.ledger_key[start:start + _KEY] = key
                self.ledger_state[record] = _WITH_SOURCE
            else:
                self.ledger_key[start:start + 2] = key
                self.ledger_state[record] = _SCOPE_ONLY
            self._keys[index] = key
            generations = self.ledger_gen
            generation = (generations[record] + 1) & 0xFFFFFFFF
            generations[record] = generation
            return (generation << _INDEX_BITS) | index
        finally:
            dirty[row] = 0
            self._exit()

    def _remember_key(self, scope: int, ip: str) -> bytes:
        """``source_key(scope, ip)``, remembered (a bounded memo per scope, emptied when
        full).  OSError (nothing remembered) if ``ip`` is not an address."""
        key = source_key(scope, ip)
        memo = self._key_memos[scope]
        if memo is None or len(memo) >= KEY_MEMO_SIZE:
            memo = self._key_memos[scope] = {}
        memo[ip] = key
        return key

    def release(self, token: int) -> bool:
        """End the connection of ``token``: True the first time, False (nothing done) after.

        Only the process that acquired a token may release it.
        """
        if token < 0 or self._row_pid != _PID[0]:
            return False
        index = token & _INDEX_MASK
        if index >= self._fresh:
            return False
        row = self._row
        record = row * self.ledger_size + index
        code = self._enter()
        if code:
            self.lock.finish_acquire(code)  # type: ignore[union-attr]
        dirty = self.row_dirty
        try:
            states = self.ledger_state
            state = states[record]
            if not state or self.ledger_gen[record] != token >> _INDEX_BITS:
                return False
            dirty[row] = 1
            keys = self._keys
            self._take_back(keys[index], state, None)  # type: ignore[arg-type]
            keys[index] = None
            states[record] = _FREE
            self._free.append(index)
            return True
        finally:
            dirty[row] = 0
            self._exit()

    # -- the master

    def sweep(self) -> int:
        """Master: release everything dead processes held.  Returns how many rows were freed."""
        freed = 0
        with self.lock:
            for row in range(self.meta[2]):
                owner = self.row_owner[row]
                if owner and not _pid_alive(owner):
                    self._free_row(row)
                    freed += 1
        return freed

    def release_process(self, pid: int) -> bool:
        """Master, as it reaps worker ``pid``: release what it held, now (no liveness guess).

        ``sweep`` finds dead owners by asking the kernel whether their pid is
        alive, which a pid already reused by another process defeats; the
        master knows exactly which child it reaped.  True if it held a row.
        """
        with self.lock:
            for row in range(self.meta[2]):
                if self.row_owner[row] == pid:
                    self._free_row(row)
                    return True
        return False

    # -- internals; everything below runs under ``self.lock``

    def _claim_row(self) -> int:
        pid = _PID[0]
        if self._row_pid == pid:
            return self._row
        with self.lock:  # also orders this process's threads racing to claim
            if self._row_pid != pid:
                self._row = self._claim(pid)
                self._free, self._fresh, self._keys = [], 0, []
                self._row_pid = pid
        if self._row < 0:
            log.error("no free row for process %d's connection limits (%d rows): its "
                      "connections are refused", pid, self.rows)
        return self._row

    def _claim(self, pid: int) -> int:
        # A row already owned by this pid is a dead process's whose pid came back to us:
        # ``sweep`` would take it for alive forever, so it is taken (and undone) first.
        rows = [row for row in range(self.meta[2]) if self.row_owner[row] == pid]
        rows += [row for row in range(self.rows) if self.row_owner[row] != pid]
        for row in rows:
            owner = self.row_owner[row]
            if owner == 0 or owner == pid or not _pid_alive(owner):
                if owner:
                    self._free_row(row)  # what the dead owner held is released first
                self.row_owner[row] = pid
                self.meta[2] = max(self.meta[2], row + 1)
                return row
        return -1

    def _take_fresh(self, row: int) -> int:
        index = self._fresh
        self._fresh += 1
        self.row_high[row] = self._fresh
        self._keys.append(None)
        return index

    def _admit_new(self, key: bytes, digest: int, empty: int) -> int:
        """A source the table does not hold (``empty``: the empty slot ``_find`` ended
        on): its new entry's slot, or ``REFUSED_TABLE_FULL``."""
        if self.meta[0] >= self.capacity:
            self._reclaim(int(self._clock()))
            slot = self._find(key, digest)  # reclaiming may have moved the free slot
            if self.meta[0] >= self.capacity:
                return REFUSED_TABLE_FULL
            empty = -1 - slot
        return self._insert(empty, key, digest)

    def _within_rate(self, slot: int, max_new_per_second: int) -> bool:
        """Count one new connection in the source's window of this second, if it fits."""
        second = int(self._clock())
        if self.window[slot] != second:
            self.window[slot] = second
            self.window_count[slot] = 0
        if self.window_count[slot] >= max_new_per_second:
            return False
        self.window_count[slot] += 1
        return True

    def _find(self, key: bytes, digest: int) -> int:
        """The slot holding ``key``, or ``-1 - slot`` of the empty slot where it would go."""
        used, hashes, table, at, mask = self._probe
        slot = digest & mask
        while used[slot]:  # the table is at most half full: an empty slot ends every probe
            if hashes[slot] == digest:
                start = at + slot * _KEY
                if table[start:start + _KEY] == key:
                    return slot
            slot = (slot + 1) & mask
        return -1 - slot

    def _insert(self, slot: int, key: bytes, digest: int) -> int:
        self.keys[slot * _KEY:(slot + 1) * _KEY] = key
        self.hashes[slot] = digest
        self.count[slot] = self.window_count[slot] = 0
        self.window[slot] = -1  # no rate window yet: free as soon as the count is 0
        self.used[slot] = 1
        self.meta[0] += 1
        return slot

    def _delete(self, slot: int) -> None:
        """Backward-shift deletion: no tombstones, so probes never lengthen with churn."""
        mask, hole, probe = self._mask, slot, slot
        while True:
            probe = (probe + 1) & mask
            if not self.used[probe]:
                break
            home = self.hashes[probe] & mask
            # The entry at ``probe`` may fill the hole unless its home lies in (hole, probe].
            if (hole < probe and hole < home <= probe) or \
                    (hole > probe and (home > hole or home <= probe)):
                continue
            self._move(probe, hole)
            hole = probe
        self.used[hole] = 0
        self.meta[0] -= 1

    def _move(self, source: int, target: int) -> None:
        keys = self.keys
        keys[target * _KEY:(target + 1) * _KEY] = keys[source * _KEY:(source + 1) * _KEY]
        self.hashes[target] = self.hashes[source]
        self.count[target] = self.count[source]
        self.window[target] = self.window[source]
        self.window_count[target] = self.window_count[source]

    def _stale(self, slot: int, second: int) -> bool:
        return not self.count[slot] and self.window[slot] < second

    def _reclaim(self, second: int) -> None:
        """Free stale entries among the next ``RECLAIM_SCAN`` slots (a table found full)."""
        slot = self.meta[1] & self._mask
        for _ in range(min(RECLAIM_SCAN, self.slots)):
            # A deletion may shift the next entry into this slot: look at it again.
            while self.used[slot] and self._stale(slot, second):
                self._delete(slot)
            slot = (slot + 1) & self._mask
        self.meta[1] = slot

    def _undo(self, record: int, second: int) -> None:
        """Take back what another process's ledger record counts (the sweep), and free it.

        ``second``: the clock's whole second.  (A process's own release takes back
        the key it remembers, without reading the record back.)
        """
        key = bytes(self.ledger_key[record * _KEY:(record + 1) * _KEY])
        self._take_back(key, self.ledger_state[record], second)
        self.ledger_state[record] = _FREE

    def _take_back(self, key: bytes, state: int, second: Optional[int]) -> None:
        """What one ledger record (``key``, ``state``) counts, taken back: its scope's
        count, and its source's if the record counted one.

        ``second``: the clock's whole second (None: read it only if the source's
        count reaches 0, the one case that needs it: the common release pays no clock).
        """
        scope = (key[0] << 8) | key[1]
        self.scope_count[scope] -= 1
        if state != _WITH_SOURCE:
            return
        slot = self._find(key, hash(key))
        if slot < 0:
            return
        count = self.count[slot] - 1
        self.count[slot] = count
        if not count:
            self.scope_live[scope] -= 1
            if second is None:
                second = int(self._clock())
            if self._stale(slot, second):
                self._delete(slot)

    def _free_row(self, row: int) -> None:
        base, high = row * self.ledger_size, self.row_high[row]
        dirty = self.row_dirty[row]
        if not dirty:
            second = int(self._clock())
            for record in range(base, base + high):
                if self.ledger_state[record]:
                    self._undo(record, second)
        self.ledger_state[base:base + high] = bytes(high)
        self.row_high[row] = self.row_dirty[row] = self.row_owner[row] = 0
        if dirty:
            log.warning("a worker was killed while it updated the connection limits: "
                        "recounting them from the live workers' records")
            self._rebuild()

    def _rebuild(self) -> None:
        """Recount everything from the live rows' ledgers; keep the rate windows."""
        kept = {}
        for slot in range(self.slots):
            if self.used[slot]:
                key = bytes(self.keys[slot * _KEY:(slot + 1) * _KEY])
                kept.setdefault(key, (self.window[slot], self.window_count[slot]))
        self.used[:] = bytes(self.slots)
        self.meta[0] = 0
        for scope in range(self.scopes):
            self.scope_count[scope] = self.scope_live[scope] = 0
        for key, (window, window_count) in kept.items():
            slot = self._insert(-1 - self._find(key, hash(key)), key, hash(key))
            self.window[slot], self.window_count[slot] = window, window_count
        for row in range(self.meta[2]):
            if not self.row_owner[row]:
                continue
            base = row * self.ledger_size
            for record in range(base, base + self.row_high[row]):
                state = self.ledger_state[record]
                if not state:
                    continue
                key = bytes(self.ledger_key[record * _KEY:(record + 1) * _KEY])
                self.scope_count[int.from_bytes(key[:2], "big")] += 1
                if state == _WITH_SOURCE:
                    slot = self._find(key, hash(key))
                    if slot < 0:
                        if self.meta[0] >= self.slots - 1:
                            continue  # cannot happen with sane sizes; never loop forever
                        slot = self._insert(-1 - slot, key, hash(key))
                    if not self.count[slot]:
                        self.scope_live[int.from_bytes(key[:2], "big")] += 1
                    self.count[slot] += 1
