"""The worker rows: one row of shared memory per live worker, and the totals of dead ones.

Owned by the master: it allocates the table before the first fork (shared
memory cannot grow once children exist), claims a free row for each worker
just before forking it, and, when it reaps that worker, folds the row's
counters into the *retired totals* and frees the row.  No process ever looks
for dead pids: the master knows when a worker is gone because it reaps it.

A row holds everything a worker publishes:

- supervision: ``pid``, ``started`` (master, before the fork), ``heartbeat``,
  ``booted``, ``accepting`` and ``active`` (its open connections, published
  at each accept and heartbeat; read by the master for status and by the
  sibling workers for the accept balance, see ``accept``);
- per listener (indexed by the listener's *slot*, assigned by
  ``SharedState`` and stable across reloads): ``LISTENER_CELLS`` counters,
  ``CONNECTIONS`` (clients accepted) written by the worker's accepting
  thread, ``FAILOVERS`` written under the row lock by relay threads, and
  cells reserved for the relay (bytes, closes) and admission (rejections);
- per backend slot (the ``shared.BackendTable`` slot), written under the row
  lock by the worker's relay threads: ``backend_active``, the backend's open
  connections from this worker (one up at each attempt, one down when it
  ends; least_conn reads it, see ``balancer.Pool.loads``), and ``acquired``,
  its connections (attempts) so far, only ever increasing.

Principle (one writer per cell, no lock another process can hold): a cell
is written by one thread of one process at a time: the accepting thread, or
any thread of the owning worker under that worker's own ``threading.Lock``
(``row_lock``; a process lock, never shared with another process, so a
killed worker can leave nothing held).  Every cell is one aligned 8-byte
value, which the CPU stores whole, so a reader never sees half a value.

Principle (counters never go backwards): a counter's value is the retired
total plus the sum over the live rows.  ``fold`` adds a dead worker's row to
the retired totals and zeroes the row under a sequence counter (odd while a
fold runs), so ``snapshot`` retries rather than count a row twice or not at
all.  Gauges (open connections) are not folded: a dead worker holds nothing.

Capacity: ``rows_for(workers)`` rows, room for a reload (two generations at
once) and scaling up; a spawn that finds every row taken is retried later.
"""

from __future__ import annotations

import mmap
import os
import threading
from bisect import bisect_left as _first_bound  # the histogram bucket of a value
from typing import Dict, Iterable, List, Optional, Sequence

#: Listener slots (distinct listeners over the master's life, reused oldest first).
LISTENER_SLOTS = 256
#: Counters per listener per row, by index.
CONNECTIONS, CLOSED, RECEIVED_BYTES, SENT_BYTES, FAILOVERS = 0, 1, 2, 3, 4
REJECTED = 5  # REJECTED .. REJECTED + REJECT_REASONS - 1, one per reason (admission, later)
REJECT_REASONS = 3
LISTENER_CELLS = REJECTED + REJECT_REASONS
LISTENER_COUNTERS = {"connections_total": CONNECTIONS, "failovers_total": FAILOVERS}

#: Relay loops per worker with their own cells (one writer each: that loop's thread).
MAX_LOOPS = 16
#: Upper bounds of ``prefork_proxy_session_duration_seconds`` (the last one is +Inf).
SESSION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0, 300.0, 1800.0, 3600.0, float("inf"))
#: The ``reason`` label values of ``prefork_proxy_rejected_connections_total``: a
#: bounded set, one cell each per listener per loop.
REJECT_LABELS = ("bad_proxy_header", "bad_tls_hello", "client_timeout", "denied",
                 "no_route", "over_limit", "queue_timeout", "resource_exhausted", "internal",
                 "other")
#: The one table from an admission refusal's reason (``admission.verdicts.REASONS``,
#: and the limits' and queues' as they add some) to its label: exact names first,
#: then prefixes; anything unknown is "other" (tests/unit/test_reject_labels.py
#: holds every known reason to a label that is not).
REJECT_LABEL_OF = {
    "proxy_timeout": "client_timeout", "sni_timeout": "client_timeout",
    "sni_no_server_name": "no_route", "sni_no_route": "no_route",
    "denied": "denied", "not_allowed": "denied", "bad_address": "denied",
    "max_connections": "over_limit", "max_connections_per_source": "over_limit",
    "max_new_connections_per_source": "over_limit",
    "backend_max_connections": "over_limit", "queue_full": "over_limit",
    "queue_timeout": "queue_timeout",
    "source_table_full": "resource_exhausted", "worker_ledger_full": "resource_exhausted",
    "source_share_full": "resource_exhausted",
    "internal_error": "internal",
}
REJECT_PREFIXES = (("proxy_", "bad_proxy_header"), ("sni_", "bad_tls_hello"))


def reject_label(reason: str) -> str:
    """The ``reason`` label of a refusal (``REJECT_LABEL_OF``, then ``REJECT_PREFIXES``)."""
    label = REJECT_LABEL_OF.get(reason)
    if label is None:
        label = next((lab for prefix, lab in REJECT_PREFIXES if reason.startswith(prefix)),
                     "other")
    return label


#: Cells per listener per loop (see ``LoopStats``): closes, client-side bytes, the
#: duration sum in microseconds, one non-cumulative cell per bucket, then one
#: refusal count per ``REJECT_LABELS``.
LOOP_CLOSED, LOOP_RECEIVED, LOOP_SENT, LOOP_DURATION_US, LOOP_BUCKET0 = 0, 1, 2, 3, 4
LOOP_REJECTED0 = LOOP_BUCKET0 + len(SESSION_BUCKETS_S)
LOOP_CELLS = LOOP_REJECTED0 + len(REJECT_LABELS)
#: Upper bounds of ``prefork_proxy_backend_connect_duration_seconds`` (last: +Inf).
CONNECT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, float("inf"))
#: Cells per backend slot per row: the sum in microseconds, then one per bucket.
CONNECT_SUM_US, CONNECT_BUCKET0 = 0, 1
CONNECT_CELLS = CONNECT_BUCKET0 + len(CONNECT_BUCKETS_S)
#: True since the relay calls ``LoopStats`` (its docstring says how): the exporter
#: shows bytes, sessions and per-listener active connections (it left them out
#: while nothing wrote them, rather than show zeros that look like data).
RELAY_HOOKS = True

# The pid of this process, kept current across fork (the row lock is per process).
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


def rows_for(workers: int) -> int:
    """Rows for a master started with ``workers``: a reload doubles them, TTIN adds some."""
    return min(4096, max(64, 4 * workers))


class WorkerRows:
    """Shared rows of worker state and counters, indexed by row number (not by slot or pid)."""

    def __init__(self, capacity: int = 64, backend_slots: int = 1024) -> None:
        self.capacity, self.backend_slots = capacity, backend_slots
        fields = [("pid", "q", capacity), ("started", "d", capacity),
                  ("heartbeat", "d", capacity), ("active", "q", capacity),
                  ("booted", "q", capacity), ("accepting", "q", capacity),
                  ("_used", "q", 1), ("fold_seq", "q", 1), ("_shared_listeners", "q", 1),
                  ("listener", "q", capacity * LISTENER_SLOTS * LISTENER_CELLS),
                  ("acquired", "q", capacity * backend_slots),
                  ("backend_active", "q", capacity * backend_slots),
                  ("retired_listener", "q", LISTENER_SLOTS * LISTENER_CELLS),
                  ("retired_acquired", "q", backend_slots),
                  ("loops_used", "q", capacity),
                  ("loop", "q", capacity * MAX_LOOPS * LISTENER_SLOTS * LOOP_CELLS),
                  ("retired_loop", "q", LISTENER_SLOTS * LOOP_CELLS),
                  ("connect", "q", capacity * backend_slots * CONNECT_CELLS),
                  ("retired_connect", "q", backend_slots * CONNECT_CELLS)]
        # Anonymous and MAP_SHARED: zero-filled, inherited by every child; pages
        # of rows never used are never touched, so they cost no memory.
        self._map = mmap.mmap(-1, sum(8 * count for _, _, count in fields))
        offset = 0
        for name, kind, count in fields:
            setattr(self, name, memoryview(self._map)[offset:offset + 8 * count].cast(kind))
            offset += 8 * count
        self._free: List[int] = list(range(capacity - 1, -1, -1))  # master only
        self._lock_pid = -1
        self._lock = threading.Lock()

    @property
    def shared_listeners(self) -> bool:
        """1 while another master also accepts from these listeners (an upgrade in
        progress): a worker orphaned then must not freeze their queues.  The
        master writes it, workers read it."""
        return bool(self._shared_listeners[0])

    @shared_listeners.setter
    def shared_listeners(self, shared: bool) -> None:
        self._shared_listeners[0] = 1 if shared else 0

    # -- master

    def claim(self, now: float) -> Optional[int]:
        """Reserve a zeroed row for a worker about to be forked; None when all are taken."""
        if not self._free:
            return None
        row = self._free.pop()
        self.pid[row] = 0
        self.started[row] = self.heartbeat[row] = now
        self.active[row] = self.booted[row] = self.accepting[row] = 0
        self._used[0] = max(self._used[0], row + 1)
        return row

    def fold(self, row: int) -> None:
        """The worker of ``row`` is reaped: add its counters to the retired totals, free it.

        Master only, and only once the worker is dead (nothing writes the row).
        """
        self.fold_seq[0] += 1  # odd: a fold is under way
        cells = LISTENER_SLOTS * LISTENER_CELLS
        listener, retired = self.listener, self.retired_listener
        base = row * cells
        for index in range(cells):
            value = listener[base + index]
            if value:
                retired[index] += value
                listener[base + index] = 0
        slots = self.backend_slots
        acquired, backend_active, retired_acquired = self.acquired, self.backend_active, \
            self.retired_acquired
        base = row * slots
        for slot in range(slots):
            value = acquired[base + slot]
            if value:
                retired_acquired[slot] += value
                acquired[base + slot] = 0
            backend_active[base + slot] = 0
        cells = slots * CONNECT_CELLS
        connect, retired_connect = self.connect, self.retired_connect
        base = row * cells
        for index in range(cells):
            value = connect[base + index]
            if value:
                retired_connect[index] += value
                connect[base + index] = 0
        cells = LISTENER_SLOTS * LOOP_CELLS
        loop, retired_loop = self.loop, self.retired_loop
        for index in range(self.loops_used[row]):  # only the loops it had: pages untouched
            base = (row * MAX_LOOPS + index) * cells
            for cell in range(cells):
                value = loop[base + cell]
                if value:
                    retired_loop[cell] += value
                    loop[base + cell] = 0
        self.loops_used[row] = 0
        self.active[row] = self.pid[row] = self.accepting[row] = self.booted[row] = 0
        self.fold_seq[0] += 1
        self._free.append(row)

    def release_unused(self, row: int) -> None:
        """A claimed row whose worker was never forked: free it (nothing to fold)."""
        self.fold(row)

    def reset_listener(self, lslot: int) -> None:
        """Master: a listener slot is reused for another listener; its totals start at 0."""
        for cell in range(LISTENER_CELLS):
            self.retired_listener[lslot * LISTENER_CELLS + cell] = 0
        for cell in range(LOOP_CELLS):
            self.retired_loop[lslot * LOOP_CELLS + cell] = 0

    def reset_backend(self, slot: int) -> None:
        """Master: a backend slot is reused for another backend; its totals start at 0."""
        self.retired_acquired[slot] = 0
        for cell in range(CONNECT_CELLS):
            self.retired_connect[slot * CONNECT_CELLS + cell] = 0

    # -- any process

    @property
    def rows_used(self) -> int:
        """One past the highest row ever claimed: no live row lies beyond (any process)."""
        return self._used[0]

    def live_rows(self) -> List[int]:
        """Rows of workers forked and not reaped (the master fills ``pid`` after fork)."""
        return [row for row in range(self._used[0]) if self.pid[row]]

    def accepting_rows(self, exclude: int) -> List[int]:
        """Rows of the workers accepting now, but ``exclude`` (a worker's siblings)."""
        used = self._used[0]
        return [row for row, accepting in enumerate(self.accepting[:used])
                if accepting and row != exclude]

    def lightest_of(self, rows: List[int]) -> int:
        """The fewest open connections among ``rows`` (at least one; may be a moment old)."""
        active = self.active
        return min([active[row] for row in rows])

    def active_count(self, slot: int) -> int:
        """Open connections to backend ``slot`` from every worker (a sum over used rows)."""
        # Row 0 at least: an unclaimed row holds zeros (and a Balancer built
        # outside a worker, as in tests, writes row 0).
        step = self.backend_slots
        end = max(1, self._used[0]) * step
        return sum(self.backend_active[slot:end:step])

    def accepted(self, row: int) -> int:
        """Clients accepted by the worker of ``row``, every listener together."""
        base = row * LISTENER_SLOTS * LISTENER_CELLS
        return sum(self.listener[base + CONNECTIONS:base + LISTENER_SLOTS * LISTENER_CELLS:
                                 LISTENER_CELLS])

    def snapshot(self, listener_slots: Dict[str, int],
                 backend_slots: Dict[str, Sequence[int]]) -> Dict[str, Dict[str, Dict[str, int]]]:
        """Counter totals, for a metrics collector or ``status`` (pure read; retried
        while a fold runs).

        ``listener_slots`` maps a listener's label to its slot and
        ``backend_slots`` a backend's label to its slots (``SharedState.labels``).
        Returns ``{"listeners": {label: {counter: value}}, "backends": {label:
        {"connections_total": n, "connections_active": n}}}``.
        """
        for _ in range(1000):
            before = self.fold_seq[0]
            if before & 1:
                continue
            result = self._totals(listener_slots, backend_slots)
            if self.fold_seq[0] == before:
                return result
        return self._totals(listener_slots, backend_slots)  # only a dead master could spin

    def _totals(self, listener_slots: Dict[str, int],
                backend_slots: Dict[str, Sequence[int]]) -> Dict[str, Dict[str, Dict[str, int]]]:
        used = max(1, self._used[0])
        stride = LISTENER_SLOTS * LISTENER_CELLS
        listeners: Dict[str, Dict[str, int]] = {}
        for label, lslot in listener_slots.items():
            counts = {}
            for name, cell in LISTENER_COUNTERS.items():
                index = lslot * LISTENER_CELLS + cell
                counts[name] = self.retired_listener[index] + sum(
                    self.listener[index:used * stride:stride])
            if RELAY_HOOKS:
                counts.update(self._loop_totals(lslot, used, counts))
            listeners[label] = counts
        backends: Dict[str, Dict[str, int]] = {}
        step, end = self.backend_slots, used * self.backend_slots
        for label, slots in backend_slots.items():
            total = active = 0
            connect = [0] * CONNECT_CELLS
            stride = self.backend_slots * CONNECT_CELLS
            for slot in slots:
                acquired = sum(self.acquired[slot:end:step])
                total += self.retired_acquired[slot] + acquired
                active += sum(self.backend_active[slot:end:step])
                for cell in range(CONNECT_CELLS):
                    index = slot * CONNECT_CELLS + cell
                    connect[cell] += self.retired_connect[index] + sum(
                        self.connect[index:used * stride:stride])
            backends[label] = {"connections_total": total, "connections_active": active,
                               "connect_duration": {"buckets": connect[CONNECT_BUCKET0:],
                                                    "sum_s": connect[CONNECT_SUM_US] / 1e6}}
        return {"listeners": listeners, "backends": backends}

    def _loop_totals(self, lslot: int, used: int, counts: Dict[str, int]) -> Dict[str, object]:
        """Bytes, closes and the session histogram of listener ``lslot`` (retired + live)."""
        totals = list(self.retired_loop[lslot * LOOP_CELLS:(lslot + 1) * LOOP_CELLS])
        live_closed = 0
        stride = LISTENER_SLOTS * LOOP_CELLS
        for row in range(used):
            if not self.pid[row]:
                continue
            for index in range(self.loops_used[row]):
                base = (row * MAX_LOOPS + index) * stride + lslot * LOOP_CELLS
                cells = self.loop[base:base + LOOP_CELLS]
                live_closed += cells[LOOP_CLOSED]
                for cell in range(LOOP_CELLS):
                    totals[cell] += cells[cell]
        live_accepted = sum(self.listener[lslot * LISTENER_CELLS + CONNECTIONS + row *
                                          LISTENER_SLOTS * LISTENER_CELLS]
                            for row in range(used) if self.pid[row])
        return {"received_bytes_total": totals[LOOP_RECEIVED],
                "sent_bytes_total": totals[LOOP_SENT],
                # A gauge: only live workers hold connections.
                "connections_active": max(0, live_accepted - live_closed),
                "session_duration": {"buckets": totals[LOOP_BUCKET0:LOOP_REJECTED0],
                                     "sum_s": totals[LOOP_DURATION_US] / 1e6},
                "rejected_total": dict(zip(REJECT_LABELS, totals[LOOP_REJECTED0:]))}

    # -- a worker (its own row only)

    def loop_stats(self, row: int, index: int) -> "LoopStats":
        """The cells of relay loop ``index`` of the worker of ``row`` (worker, at boot)."""
        if not 0 <= index < MAX_LOOPS:
            raise ValueError(f"relay loop {index}: at most {MAX_LOOPS} have cells")
        self.loops_used[row] = max(self.loops_used[row], index + 1)
        return LoopStats(self, row, index)

    def row_lock(self) -> threading.Lock:
        """This process's lock for the cells its threads share (fresh after fork)."""
        if self._lock_pid != _PID[0]:
            self._lock = threading.Lock()
            self._lock_pid = _PID[0]
        return self._lock

    def beat(self, row: int, now: float, active: int) -> None:
        self.active[row] = active
        self.heartbeat[row] = now


class LoopStats:
    """One relay loop's counters: its own cells in its worker's row (the relay's hooks).

    Built by the worker, one per relay loop, and handed to that loop; only that
    loop's thread writes its cells (no lock).  The relay adds client-side bytes
    with ``cells[base + RECEIVED] += n`` / ``cells[base + SENT] += n``
    (``base`` from ``base(listener_slot)``, computed once per connection): its
    connections count into their own attributes per system call, and the
    loop adds the differences every ``relay.loop.PUBLISH_S`` and at close, so
    a long stream shows while it runs.  ``on_close`` once per connection, on
    every path.  Folded with the row at reap.
    """

    RECEIVED, SENT, CLOSED = LOOP_RECEIVED, LOOP_SENT, LOOP_CLOSED
    __slots__ = ("cells", "_start")

    def __init__(self, rows: WorkerRows, row: int, index: int) -> None:
        self.cells = rows.loop
        self._start = (row * MAX_LOOPS + index) * LISTENER_SLOTS * LOOP_CELLS

    def base(self, lslot: int) -> int:
        """Index in ``cells`` of listener slot ``lslot``'s cells for this loop."""
        return self._start + lslot * LOOP_CELLS

    def on_close(self, base: int, backend_slot: int, bytes_in: int, bytes_out: int,
                 duration_s: float) -> None:
        """A connection ended (every path, once): a close and its duration.

        ``bytes_in``/``bytes_out`` are the client-side totals, already added as
        they moved; kept in the signature for the access log's record.
        """
        cells = self.cells
        cells[base + LOOP_CLOSED] += 1
        cells[base + LOOP_DURATION_US] += max(0, int(duration_s * 1e6))
        # The first bucket whose bound is >= the duration (the last is +Inf): one C
        # call, whatever the duration, where a loop took a turn per smaller bucket.
        cells[base + LOOP_BUCKET0 + _first_bound(SESSION_BUCKETS_S, duration_s)] += 1

    def on_reject(self, base: int, reason: str) -> None:
        """A client refused by its admission (before its ``on_close``), by ``reject_label``."""
        self.cells[base + LOOP_REJECTED0 + REJECT_LABELS.index(reject_label(reason))] += 1


def observe_connect(rows: WorkerRows, row: int, slot: int, connect_s: float) -> None:
    """A connect to backend ``slot`` took ``connect_s``: one histogram observation.

    Called by the balancer on a relay thread, under this worker's ``row_lock``
    (the worker's relay threads share the row's cells), once per connection.
    """
    base = (row * rows.backend_slots + slot) * CONNECT_CELLS
    cells = rows.connect
    cells[base + CONNECT_SUM_US] += max(0, int(connect_s * 1e6))
    cells[base + CONNECT_BUCKET0 + _first_bound(CONNECT_BUCKETS_S, connect_s)] += 1


def listener_cells(rows: WorkerRows, row: int, lslot: int) -> int:
    """Index of the first counter cell of listener slot ``lslot`` in ``row``."""
    return (row * LISTENER_SLOTS + lslot) * LISTENER_CELLS


__all__: Iterable[str] = ["WorkerRows", "LoopStats", "rows_for", "listener_cells",
                          "LISTENER_SLOTS", "SESSION_BUCKETS_S", "RELAY_HOOKS",
                          "REJECT_LABELS", "reject_label", "CONNECT_BUCKETS_S",
                          "observe_connect",
                          "CONNECTIONS", "FAILOVERS"]
