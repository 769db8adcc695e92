"""Choosing the backends to try for each new connection, and hearing how each try went.

A ``Balancer`` per listener lives in every worker.  ``targets(client_address)``
is called once per client: by the accepting relay loop (``accept``), or, for a
listener with a pre-connect phase, by ``gate.Gate.choose`` on the client's
relay thread once admission accepts it; the relay thread that owns the
connection then draws from the iterator one backend per connect attempt, so
everything here runs on relay threads and never blocks: the addresses of
hostnames come resolved from shared memory (see ``health``), and nothing here
ever calls the resolver.  A name without an address yet (at start, after a
reload, while its DNS fails) is skipped like a backend that is down; when no
backend has an address at all, the connection waits for the first answer in
short pauses on its relay loop's timer (``relay.Target`` with no address),
for at most its connect budget (or ``connect_timeout_ms``), while that loop
serves every other connection.

All state is global across workers, in shared memory: whether a backend is
up, its consecutive connect failures and connect errors (``shared.BackendTable``),
its connections from each worker (the worker's row, ``rows.WorkerRows``: a
``Balancer`` writes only the row it was given, under that worker's row lock).
The algorithms (``balance`` in the listener's config):

- ``round_robin``: a smooth weighted rotation (weights 5:1:1 give a a b a c
  a a, spread out, as nginx's smooth weighted round robin does; see
  ``RotationSchedule``) over the backends that are up, indexed by one ticket
  counter shared by every worker, so consecutive connections rotate exactly
  whichever worker accepts them.  A pick costs O(log n), a change of the set
  of up backends O(n).
- ``least_conn``: the fewest active connections per unit of weight, across
  all workers; ties rotate through the shared counter.
- ``random_two``: the power of two choices: two backends drawn at random
  (by weight), the less loaded of the two wins.
- ``source_hash``: rendezvous (highest random weight) hashing of the client's
  IP address: the same address always lands on the same backend, and when a
  backend goes down only its own clients move, each to its second choice.

Cost per pick with 1,000 backends (``scripts/balancer_figures.py``): the list
of up backends is rebuilt only when ``BackendTable.health_version`` moves or a
failure mark expires, so ``round_robin``, ``random_two`` and ``source_hash``
(for a client address seen before) choose in O(1) or O(log n); ``least_conn``
reads every backend's count in every worker row, O(n x rows), by design.

Failover: after the first choice, the iterator yields the next ones in the
algorithm's order (each backend at most once, up to ``retries`` more, within
``connect_budget_ms``), then the backups.  Backups serve first only while
every primary is down.  If every backend is down, all are tried anyway, in
the same order: a stale mark must never be the reason a client is refused.
The one exception: a backend the operator drained or disabled
(``prefork-proxy backend``, ``BackendTable.admin_state``) is never tried, not
even then; a change bumps ``health_version``, so each balancer sees it on its
next pick.

Passive health: every outcome comes back through ``Target.report``.  ``fall``
consecutive failed connects mark a backend down for every worker at once for
``fail_timeout_ms``; a success ends the run.  Each state change is logged once,
by the worker whose report caused it.
"""

from __future__ import annotations

import array
import bisect
import functools
import hashlib
import itertools
import logging
import math
import operator
import random
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from prefork_proxy.backend_queue import BackendQueue
from prefork_proxy.config import Backend, ListenerConfig, RoutePool
from prefork_proxy.limits import ConnectionLimits
from prefork_proxy.relay import CONNECTED, FAILED, RELEASED, Target
from prefork_proxy.rows import (
    FAILOVERS,
    LISTENER_SLOTS,
    WorkerRows,
    listener_cells,
    observe_connect,
)
from prefork_proxy.shared import BackendTable, PoolEntry, RoundRobinCounter, SharedState

log = logging.getLogger("prefork_proxy.balancer")

#: Pools (a set of up backends with its schedule) kept per balancer: a handful of sets occur.
POOL_CACHE = 64
#: Client addresses whose ``source_hash`` first choice a pool remembers.
SOURCE_HASH_CACHE = 4096
#: Cycles up to this many tickets (sum of weights) map residues to backends with a
#: flat table (32 KiB at most); longer ones bisect the running sums.
OWNER_TABLE_MAX = 16384
#: (sqrt(5) - 1) / 2: the golden ratio's fractional part, the most evenly spreading step.
_GOLDEN = (math.sqrt(5) - 1) / 2
#: While no backend has an address yet, a waiting connection looks again this often.
#: Pauses end on multiples of it, so every waiting connection of a loop wakes in one batch.
RESOLVE_WAIT_S = 0.02
#: Scopes of the shared ``limits.ConnectionLimits`` below this are listeners'; backend
#: address slot ``s`` is scope ``BACKEND_SCOPE_BASE + s`` (its ``max_connections``).
BACKEND_SCOPE_BASE = LISTENER_SLOTS
#: At most one "waited for DNS in vain" warning per listener and worker this often.
WAIT_WARNING_INTERVAL_S = 5.0


class RotationSchedule:
    """The weighted rotation of one set of backends: ticket -> backend index, in O(log n).

    ``W`` = sum of the weights; backend ``i`` owns ``weight[i]`` consecutive
    residues of 0..W-1 (in order).  Ticket ``k`` picks the owner of residue
    ``(k mod W + 1) * step mod W``, ``step`` being the integer coprime with
    ``W`` nearest ``0.618 W``.  ``k -> residue`` is a bijection of each cycle
    of ``W`` consecutive tickets, so every backend gets exactly its weight's
    share of every cycle; a near-golden step (see ``_coprime_step``) visits
    each backend's residues at near-even gaps: over 1,500 random weight sets
    the largest gap between two picks of a backend was at most 2.45 times
    ``W / weight`` (nginx's smooth weighted round robin on the same sets:
    1.95 times).  ``5:1:1`` gives ``a a b a c a a``,
    as nginx's does; equal weights give the plain rotation ``a b c``.

    It replaces nginx's algorithm, which had to build the whole cycle
    (``O(W x n)``: 1.6 s for 100 backends of weight 1000) each time the set of
    up backends changed: building this costs ``O(n)`` (a running sum, a
    step search) plus, for cycles up to ``OWNER_TABLE_MAX``, a residue table
    filled in C; a pick is one table lookup, or one ``bisect`` (``O(log n)``,
    in C) for longer cycles.  Built and used by one balancer's relay threads (immutable).
    """

    __slots__ = ("count", "total", "step", "bounds", "owner", "uniform")

    def __init__(self, weights: Sequence[int]) -> None:
        self.count = len(weights)
        self.total = sum(weights)
        self.uniform = len(set(weights)) <= 1
        self.bounds = list(itertools.accumulate(weights))  # exclusive upper residues
        self.step = 1 if self.uniform else _coprime_step(self.total)
        # Small cycles also get residue -> index as a flat array (2 bytes a residue,
        # built in C): one lookup instead of a bisect.
        self.owner: Optional[array.array] = None
        if not self.uniform and self.total <= OWNER_TABLE_MAX:
            self.owner = array.array("H", itertools.chain.from_iterable(
                itertools.repeat(i, w) for i, w in enumerate(weights)))

    def index(self, ticket: int) -> int:
        """The backend (an index into the weights) that ticket ``ticket`` picks."""
        if self.uniform:
            return ticket % self.count
        total = self.total
        residue = (ticket % total + 1) * self.step % total
        owner = self.owner
        return owner[residue] if owner is not None else bisect.bisect_right(self.bounds, residue)

    def order(self, ticket: int) -> Iterator[int]:
        """Every index once: ticket's pick, then the next tickets' new picks (failover).

        Lazy: the first index costs one ``index``; each later one walks the
        following tickets until a backend not yielded yet (at most one cycle
        in all, ``W`` steps, only while connects keep failing).
        """
        count = self.count
        if self.uniform:
            for step in range(count):
                yield (ticket + step) % count
            return
        first = self.index(ticket)
        yield first  # most connections stop here: nothing more is computed for them
        seen = {first}
        for step in range(1, self.total):
            i = self.index(ticket + step)
            if i not in seen:
                seen.add(i)
                yield i
                if len(seen) == count:
                    return


@functools.lru_cache(maxsize=256)
def _coprime_step(total: int) -> int:
    """A step coprime with ``total``, near ``0.618 total``, whose ratio spreads evenly.

    How evenly ``k * step mod total`` spreads each backend's residues depends
    on the continued fraction of ``step / total``: the smaller its partial
    quotients, the closer its gaps to ``W / weight`` (a golden ratio has only
    1s).  The nearest candidates are tried in turn; the first whose partial
    quotients are all at most 3 is taken, else the best of the nearest 64
    each way (about 0.1 ms; cached per total).
    """
    target = max(1, round(total * _GOLDEN))
    best_quotient, best = total + 1, 1
    for distance in range(min(total, 65)):
        for candidate in (target + distance, target - distance):
            if 1 <= candidate < total and math.gcd(candidate, total) == 1:
                quotient = _largest_partial_quotient(candidate, total)
                if quotient <= 3:
                    return candidate
                if quotient < best_quotient:
                    best_quotient, best = quotient, candidate
    return best  # total <= 2: 1, any step is a bijection


def _largest_partial_quotient(numerator: int, denominator: int) -> int:
    """The largest term of the continued fraction of ``numerator / denominator`` (< 1)."""
    largest, x, y = 0, denominator, numerator
    while y:
        largest = max(largest, x // y)
        x, y = y, x % y
    return largest


def smooth_weighted_order(weights: Sequence[int]) -> List[int]:
    """One full cycle of the weighted rotation, as indices (length = sum of weights)."""
    schedule = RotationSchedule(weights)
    return [schedule.index(ticket) for ticket in range(schedule.total)]


def smooth_weighted_schedule(backends: Sequence[Backend]) -> List[Backend]:
    """One full cycle of the weighted rotation over ``backends``."""
    return [backends[i] for i in smooth_weighted_order([b.weight for b in backends])]


def backend_name(backend: Backend, sockaddr: Optional[tuple], literal: bool) -> str:
    """How logs and status name one address: ``db:5432 (10.0.0.7)`` for a hostname's."""
    if literal or sockaddr is None:
        return str(backend.address)
    return f"{backend.address} ({sockaddr[0]})"


@dataclass(frozen=True)
class Member:
    """One backend address a balancer can choose: a slot of the shared table."""

    slot: int
    backend: Backend
    name: str
    target: Optional[Target]  # None: a hostname not resolved yet (skipped until it is)
    hash_key: bytes

    @property
    def weight(self) -> int:
        return self.backend.weight


class Pool:
    """One set of members to choose from, with what the algorithms precompute for it.

    Built when the set of up backends changes (``O(n)``; the schedule and the
    cumulative weights lazily, by the algorithm that uses them), kept by the
    balancer's ``_pools`` cache while the set recurs, read by relay threads.
    """

    __slots__ = ("members", "slots", "weights", "_schedule", "_cum_weights", "_hash_first",
                 "_counts")

    def __init__(self, members: List[Member]) -> None:
        self.members = members
        self.slots = [m.slot for m in members]
        self.weights = [m.weight for m in members]
        self._schedule: Optional[RotationSchedule] = None
        self._cum_weights: Optional[List[int]] = None
        self._hash_first: Dict[str, int] = {}
        # Each member's connection count from one worker row, in one C call.
        self._counts = operator.itemgetter(*self.slots) if len(members) > 1 else None

    def schedule(self) -> RotationSchedule:
        if self._schedule is None:
            self._schedule = RotationSchedule(self.weights)
        return self._schedule

    def cum_weights(self) -> List[int]:
        if self._cum_weights is None:
            self._cum_weights = list(itertools.accumulate(self.weights))
        return self._cum_weights

    def loads(self, table: WorkerRows) -> List[float]:
        """Active connections per unit of weight of every member, across all workers.

        ``O(members x worker rows)``, all of it in C: one ``itemgetter`` over
        each used row (about 30 ns per member and row), ``map`` to add the
        rows and divide by the weights.
        """
        # Row 0 at least: an unclaimed row holds zeros (a Balancer built outside
        # a worker, as in tests, writes row 0).
        rows, slots, active = max(1, table.rows_used), table.backend_slots, \
            table.backend_active
        counts = self._counts
        if counts is None:
            totals: Sequence[int] = [table.active_count(self.slots[0])]
        elif rows == 1:
            totals = counts(active)
        else:
            totals = functools.reduce(
                lambda acc, row: list(map(operator.add, acc, row)),
                (counts(active[row * slots:(row + 1) * slots]) for row in range(rows)))
        return list(map(operator.truediv, totals, self.weights))


@dataclass(frozen=True)
class _View:
    """Which members are up, as of one ``health_version``: the pools to try in order."""

    members: List[Member]   # the members() list it was built from
    health: int             # table.health_version when its scan began
    expires: float          # the earliest down_until still to pass: rebuild then
    pools: Tuple[Pool, ...]  # up primaries, up backups, down primaries, down backups


class Balancer:
    """The backend choice of one pool in one worker; its state lives in shared memory.

    The pool is a listener's own (``listener`` a ``ListenerConfig``) or one of its
    SNI routes' (a ``RoutePool``, which has the same pool keys); ``index`` is the
    listener's index in the config either way.
    """

    def __init__(self, listener: Union[ListenerConfig, RoutePool], shared: SharedState,
                 index: int, row: int = 0, limits: Optional[ConnectionLimits] = None) -> None:
        self.listener = listener
        route = listener if isinstance(listener, RoutePool) else None
        # Backends' ``max_connections``: the shared slots (None: no backend sets it, and
        # no pick pays anything for it) and this worker's queue of clients waiting.
        self.limits = limits if listener.has_backend_limits else None
        self.queue: Optional[BackendQueue] = None
        if listener.has_backend_limits:
            if limits is None:
                raise ValueError(f"listener {listener.label}: backends' max_connections "
                                 "need the shared connection limits")
            self.queue = BackendQueue(listener.label, listener.queue_timeout_ms / 1000.0,
                                      self._slot_free)
        self.table: BackendTable = shared.table
        self.rows = shared.rows
        # This worker's cells: backend slot ``s`` is ``_active[_base + s]``.
        self._active, self._acquired = shared.rows.backend_active, shared.rows.acquired
        self._base = row * shared.rows.backend_slots
        self._row = row
        self._failovers = listener_cells(shared.rows, row, shared.listener_slot(index)) \
            + FAILOVERS
        self._lock = shared.rows.row_lock()
        self.counter: RoundRobinCounter = shared.round_robin(listener, index, route)
        self.entries: Tuple[PoolEntry, ...] = shared.pool(listener, index, route)
        self.timeout_s = listener.connect_timeout_ms / 1000.0
        self.budget_s = (listener.connect_budget_ms / 1000.0
                         if listener.connect_budget_ms is not None else None)
        self.fail_timeout_s = listener.fail_timeout_ms / 1000.0
        self._version = -1
        self._members: List[Member] = []
        self._any_backup = False
        self._view: Optional[_View] = None
        self._pools: Dict[Tuple[int, ...], Pool] = {}
        self._warned_wait = -WAIT_WARNING_INTERVAL_S
        self._order = {"round_robin": self._round_robin, "least_conn": self._least_conn,
                       "random_two": self._random_two,
                       "source_hash": self._source_hash}[listener.balance]

    # -- the accepting relay loop

    def targets(self, client: object = None) -> Iterator[Target]:
        """The backends to try for one client, in order, chosen lazily on the relay thread.

        ``client`` is the accepted address (``source_hash`` hashes its IP).  The
        connect budget starts now, when the client is accepted.
        """
        if self.budget_s is None and self.limits is None:
            members = self.members()
            if len(members) == 1 and members[0].target is not None:
                # One backend: whatever its health, it is the one and only try
                # (see ``_ordered``), so the ordering machinery can be skipped.
                member = members[0]
                if self.table.admin_raw[member.slot]:  # drained or disabled: nothing to try
                    return iter(())
                cell = self._base + member.slot
                with self._lock:
                    self._active[cell] += 1
                    self._acquired[cell] += 1
                return iter((member.target,))
        host = client[0] if isinstance(client, tuple) else str(client or "")
        return self._attempts(host, time.monotonic())

    # -- relay threads

    def members(self) -> List[Member]:
        """Every known backend address, refreshed when the health process re-resolved names."""
        table = self.table
        version = table.version[0]
        if version == self._version or version & 1:
            return self._members  # unchanged, or being rewritten: keep the last view
        members = []
        for entry in self.entries:
            found = False
            for slot in entry.slots:
                address = table.address(slot)
                if address is None:
                    continue
                found = True
                name = backend_name(entry.backend, address[1], entry.literal)
                members.append(self._member(slot, entry.backend, name, address))
            if not found and not entry.literal:
                # Not resolved yet by the health process: its first slot stands for it.
                members.append(self._member(entry.slots[0], entry.backend,
                                            str(entry.backend.address), None))
        if table.version[0] == version:
            self._members, self._version = members, version
            self._any_backup = any(m.backend.backup for m in members)
            self._pools.clear()
            self._view = None
        return members

    def _member(self, slot: int, backend: Backend, name: str,
                address: Optional[Tuple[int, tuple]]) -> Member:
        report = functools.partial(self._report, slot, name)
        target = None
        if address is not None:
            target = Target(address[0], address[1], name, report=report, slot=slot)
        key = f"{backend.address}|{address[1][0] if address else ''}".encode()
        return Member(slot, backend, name, target, key)

    def pick(self, client_host: str = "") -> Member:
        """The first choice for a client (no connection is counted; for tests and tools)."""
        return next(self._ordered(client_host, time.monotonic()))

    def _ordered(self, host: str, now: float) -> Iterator[Member]:
        """Every member in the order to try: up primaries, up backups, then the rest."""
        for pool in self._current_view(now).pools:
            yield from self._order(pool, host)

    def _current_view(self, now: float) -> _View:
        """The pools to try, rebuilt only when health or addresses changed: ``O(1)`` else.

        A rebuild scans every member (``O(n)``) and reuses the ``Pool`` of a
        set seen before.
        """
        members = self.members()
        view = self._view
        version = self.table.health_version.peek()
        if view is not None and view.members is members and view.health == version \
                and now < view.expires:
            return view
        eligible, down_until = self.table.eligible, self.table.down_until
        admin = self.table.admin_raw
        up, down = [], []
        expires = math.inf
        for m in members:
            if admin[m.slot]:
                continue  # drained or disabled by the operator: not even a last resort
            if eligible(m.slot, now):
                up.append(m)
            else:
                down.append(m)
                until = down_until[m.slot]
                if until > now:  # down for failures until then, at most
                    expires = min(expires, until)
        if not down and not self._any_backup:
            groups = [up]  # the common case: every backend up
        else:
            groups = [[m for m in up if not m.backend.backup],
                      [m for m in up if m.backend.backup],
                      # all tried or down: try the down ones rather than none
                      [m for m in down if not m.backend.backup],
                      [m for m in down if m.backend.backup]]
        view = _View(members, version, expires,
                     tuple(self._pool(group) for group in groups if group))
        self._view = view
        return view

    def _pool(self, members: List[Member]) -> Pool:
        key = tuple(m.slot for m in members)
        pool = self._pools.get(key)
        if pool is None:
            if len(self._pools) >= POOL_CACHE:
                self._pools.clear()
            pool = self._pools[key] = Pool(members)
        return pool

    def _resolved(self, members: List[Member]) -> bool:
        return any(member.target is not None for member in members)

    def _attempts(self, host: str, started: float) -> Iterator[Target]:
        members = self.members()
        if not self._resolved(members):
            # Hostnames only, none resolved yet: pause on the relay loop's timer
            # and look again, never longer than this client may wait in all.
            wait_until = started + (self.budget_s if self.budget_s is not None
                                    else self.timeout_s)
            while not self._resolved(members):
                now = time.monotonic()
                if now >= wait_until - 0.001:
                    self._warn_unresolved(host, now - started)
                    return
                pause = min(RESOLVE_WAIT_S - now % RESOLVE_WAIT_S, wait_until - now)
                yield Target(0, None, self.listener.label, max(pause, 0.001))
                members = self.members()
        attempts = len(members) if self.listener.retries is None \
            else min(len(members), 1 + self.listener.retries)
        deadline = started + self.budget_s if self.budget_s is not None else None
        limits = self.limits
        counts = limits.scope_count if limits is not None else None
        queue_deadline = 0.0
        while True:
            tried = 0
            full = False  # a backend was skipped at its max_connections
            for member in self._ordered(host, time.monotonic()):
                if tried >= attempts:
                    return
                timeout = self.timeout_s
                if deadline is not None:
                    timeout = min(timeout, deadline - time.monotonic())
                    if timeout <= 0.001:
                        log.warning("connect budget of %d ms spent for client %s",
                                    self.listener.connect_budget_ms, host or "?")
                        return
                target = member.target
                if target is None:  # a hostname with no address yet: the next backend
                    continue
                token = -1
                if limits is not None:
                    cap = member.backend.max_connections
                    if cap:
                        # A lock-free look first (a full backend costs no lock), then
                        # the exact acquire (+-0 across workers).
                        scope = BACKEND_SCOPE_BASE + member.slot
                        if counts[scope] >= cap:  # type: ignore[index]
                            full = True
                            continue
                        token = limits.acquire(scope, "", cap)
                        if token < 0:
                            full = True
                            continue
                tried += 1
                cell = self._base + member.slot
                with self._lock:
                    self._active[cell] += 1
                    self._acquired[cell] += 1
                    if tried > 1:
                        self.rows.listener[self._failovers] += 1
                if token >= 0:  # its own report: the slot is given back at its end
                    yield Target(target.family, target.sockaddr, target.name,
                                 None if deadline is None else timeout,
                                 functools.partial(self._report, member.slot, member.name,
                                                   token=token), slot=member.slot)
                elif deadline is None:
                    yield target  # no budget: the connection's own timeout applies as it is
                else:
                    yield Target(target.family, target.sockaddr, target.name, timeout,
                                 target.report, slot=target.slot)
            if not full or self.queue is None:
                return
            # Every backend left to try is at its max: wait in this worker's queue
            # (the relay refuses at once when queue_timeout_ms is 0), then look again.
            now = time.monotonic()
            if not queue_deadline:
                queue_deadline = now + self.queue.timeout_s
            yield self.queue.target(queue_deadline - now)
            if self.budget_s is not None:  # the connect budget starts again once woken
                deadline = time.monotonic() + self.budget_s

    def _slot_free(self) -> bool:
        """Whether an address of a capped backend has a free slot (``BackendQueue.poll``).

        A few aligned reads of the shared counts, no lock: a hint, the acquire decides.
        """
        counts = self.limits.scope_count  # type: ignore[union-attr]
        admin = self.table.admin_raw
        for member in self.members():
            cap = member.backend.max_connections
            if cap and member.target is not None and not admin[member.slot] \
                    and counts[BACKEND_SCOPE_BASE + member.slot] < cap:
                return True
        return False

    def _warn_unresolved(self, host: str, waited_s: float) -> None:
        now = time.monotonic()
        if now - self._warned_wait < WAIT_WARNING_INTERVAL_S:
            return
        self._warned_wait = now
        log.warning("listener %s: no backend address known yet (%s not resolved); "
                    "client %s closed after waiting %.0f ms", self.listener.label,
                    ", ".join(str(e.backend.address) for e in self.entries), host or "?",
                    waited_s * 1000)

    def _report(self, slot: int, name: str, outcome: str, reason: str,
                connect_s: float = -1.0, token: int = -1) -> None:
        """How an attempt went (called by the relay thread through ``Target.report``).

        ``token``: the backend slot this attempt holds (its ``max_connections``),
        given back at its end (FAILED or RELEASED come exactly once per attempt),
        which wakes the first client waiting in this worker's queue.
        ``connect_s`` (with CONNECTED): the connect time, one observation of
        ``backend_connect_duration_seconds`` in this worker's row.
        """
        table = self.table
        if outcome == CONNECTED:
            if connect_s >= 0:
                with self._lock:
                    observe_connect(self.rows, self._row, slot, connect_s)
            if table.record_success(slot):
                log.warning("backend %s up: a client connected", name)
            return
        with self._lock:
            self._active[self._base + slot] -= 1
        if token >= 0:
            self.limits.release(token)  # type: ignore[union-attr]
            self.queue.slot_freed()  # type: ignore[union-attr]
        if outcome == FAILED:
            fall = self.listener.fall
            fails, newly_down = table.record_failure(slot, fall, self.fail_timeout_s,
                                                     time.monotonic(), reason)
            if newly_down:
                log.warning("backend %s down: %s (%d/%d connect failures in a row); "
                            "tried again in %.1f s", name, reason, min(fails, fall), fall,
                            self.fail_timeout_s)
        else:
            assert outcome == RELEASED

    # -- the algorithms: each yields every member of the pool once, best first

    def _round_robin(self, pool: Pool, host: str) -> Iterator[Member]:
        members = pool.members
        if len(members) == 1:
            yield members[0]
            return
        for i in pool.schedule().order(self.counter.draw()):
            yield members[i]

    def _least_conn(self, pool: Pool, host: str) -> Iterator[Member]:
        """``O(members x worker rows)`` per pick: every count is read (see ``Pool.loads``)."""
        members = pool.members
        if len(members) == 1:
            yield members[0]
            return
        loads = pool.loads(self.rows)
        best = min(loads)
        ties = loads.count(best)
        if ties == 1:
            first = loads.index(best)
        else:  # the k-th of the tied, found in C: ties rotate through the shared counter
            tied = itertools.compress(range(len(loads)), map(best.__eq__, loads))
            first = next(itertools.islice(tied, self.counter.draw() % ties, None))
        yield members[first]
        for _, i in sorted(zip(loads, range(len(loads)))):
            if i != first:
                yield members[i]

    def _random_two(self, pool: Pool, host: str) -> Iterator[Member]:
        """Two draws by weight (``O(log n)`` each, on the cached cumulative weights)."""
        members = pool.members
        count = len(members)
        if count == 1:
            yield members[0]
            return
        # The module's generator: reseeded in every forked child, unlike an instance.
        cum = pool.cum_weights()
        total = cum[-1]
        a = bisect.bisect_right(cum, random.random() * total)
        b = a
        for _ in range(16):  # the second draw, by weight, among the others: rejection
            b = bisect.bisect_right(cum, random.random() * total)
            if b != a:
                break
        if b == a:  # ``a`` holds nearly all the weight: draw among the rest exactly
            rest = [i for i in range(count) if i != a]
            b = random.choices(rest, [members[i].weight for i in rest])[0]
        load_a = self.rows.active_count(members[a].slot) / members[a].weight
        load_b = self.rows.active_count(members[b].slot) / members[b].weight
        first, second = (a, b) if load_a <= load_b else (b, a)
        yield members[first]
        yield members[second]
        loads = pool.loads(self.rows)
        for _, i in sorted((loads[i], i) for i in range(count) if i != a and i != b):
            yield members[i]

    def _source_hash(self, pool: Pool, host: str) -> Iterator[Member]:
        """Rendezvous hashing: ``O(n)`` hashes for a new client address, then remembered.

        The first choice of up to ``SOURCE_HASH_CACHE`` addresses is kept per
        pool (it depends on nothing else), so a returning client costs one
        dict lookup; failover past it scores every member.
        """
        members = pool.members
        if len(members) == 1:
            yield members[0]
            return
        cache = pool._hash_first
        first = cache.get(host)
        if first is not None:
            yield members[first]
        client = host.encode()
        scored = sorted(((_rendezvous_score(client, m), i) for i, m in enumerate(members)),
                        reverse=True)
        if first is None:
            if len(cache) >= SOURCE_HASH_CACHE:
                cache.clear()
            cache[host] = scored[0][1]
        for _, i in scored:
            if i != first:
                yield members[i]


def _rendezvous_score(client: bytes, member: Member) -> float:
    """Weighted rendezvous hashing: -weight / ln(u), u uniform in (0, 1) from the hash."""
    digest = hashlib.blake2b(client + b"|" + member.hash_key, digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 1) / (2.0 ** 64 + 2)
    return -member.weight / math.log(u)


__all__ = ["BACKEND_SCOPE_BASE", "Balancer", "Member", "Pool", "RotationSchedule", "backend_name",
           "smooth_weighted_order", "smooth_weighted_schedule"]
