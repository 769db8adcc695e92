"""Choosing the backends to try for each new connection, and hearing how each try went.

A ``Balancer`` per listener lives in every worker.  The accepting relay loop calls
``targets(client_address)`` for each client; the relay thread that owns the
connection then draws from the iterator one backend per connect attempt, so
everything here runs on relay threads and never blocks: the addresses of
hostnames come resolved from shared memory (see ``health``), and nothing here
ever calls the resolver.  A name without an address yet (at start, after a
reload, while its DNS fails) is skipped like a backend that is down; when no
backend has an address at all, the connection waits for the first answer in
short pauses on its relay loop's timer (``relay.Target`` with no address),
for at most its connect budget (or ``connect_timeout_ms``), while that loop
serves every other connection.

All state is global across workers, in ``shared.BackendTable``: whether a
backend is up, its consecutive connect failures, its active connections.
The algorithms (``balance`` in the listener's config):

- ``round_robin``: nginx's smooth weighted round robin (weights 5:1:1 give
  a a b a c a a, spread out) over the backends that are up, indexed by one
  ticket counter shared by every worker, so consecutive connections rotate
  exactly whichever worker accepts them.
- ``least_conn``: the fewest active connections per unit of weight, across
  all workers; ties rotate through the shared counter.
- ``random_two``: the power of two choices: two backends drawn at random
  (by weight), the less loaded of the two wins.
- ``source_hash``: rendezvous (highest random weight) hashing of the client's
  IP address: the same address always lands on the same backend, and when a
  backend goes down only its own clients move, each to its second choice.

Failover: after the first choice, the iterator yields the next ones in the
algorithm's order (each backend at most once, up to ``retries`` more, within
``connect_budget_ms``), then the backups.  Backups serve first only while
every primary is down.  If every backend is down, all are tried anyway, in
the same order: a stale mark must never be the reason a client is refused.

Passive health: every outcome comes back through ``Target.report``.  ``fall``
consecutive failed connects mark a backend down for every worker at once for
``fail_timeout_ms``; a success ends the run.  Each state change is logged once,
by the worker whose report caused it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from prefork_proxy.config import Backend, ListenerConfig
from prefork_proxy.relay import CONNECTED, FAILED, RELEASED, Target
from prefork_proxy.shared import BackendTable, PoolEntry, RoundRobinCounter, SharedState

log = logging.getLogger("prefork_proxy.balancer")

#: Round-robin schedules kept per set of up backends (a handful of sets ever occur).
SCHEDULE_CACHE = 64
#: While no backend has an address yet, a waiting connection looks again this often.
#: Pauses end on multiples of it, so every waiting connection of a loop wakes in one batch.
RESOLVE_WAIT_S = 0.02
#: At most one "waited for DNS in vain" warning per listener and worker this often.
WAIT_WARNING_INTERVAL_S = 5.0


def smooth_weighted_order(weights: Sequence[int]) -> List[int]:
    """One full cycle of smooth weighted round robin, as indices (length = sum of weights)."""
    current = [0] * len(weights)
    total = sum(weights)
    order: List[int] = []
    for _ in range(total):
        for i, weight in enumerate(weights):
            current[i] += weight
        best = max(range(len(weights)), key=lambda i: current[i])
        current[best] -= total
        order.append(best)
    return order


def smooth_weighted_schedule(backends: Sequence[Backend]) -> List[Backend]:
    """One full cycle of smooth weighted round robin over ``backends``."""
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


class Balancer:
    """The backend choice of one listener in one worker; its state lives in shared memory."""

    def __init__(self, listener: ListenerConfig, shared: SharedState, index: int) -> None:
        self.listener = listener
        self.table: BackendTable = shared.table
        self.counter: RoundRobinCounter = shared.round_robin(listener, index)
        self.entries: Tuple[PoolEntry, ...] = shared.pool(listener, index)
        self.timeout_s = listener.connect_timeout_ms / 1000.0
        self.budget_s = (listener.connect_budget_ms / 1000.0
                         if listener.connect_budget_ms is not None else None)
        self.fail_timeout_s = listener.fail_timeout_ms / 1000.0
        self._version = -1
        self._members: List[Member] = []
        self._any_backup = False
        self._schedules: Dict[Tuple[int, ...], List[Member]] = {}
        self._warned_wait = -WAIT_WARNING_INTERVAL_S
        self._order = {"round_robin": self._round_robin, "least_conn": self._least_conn,
                       "random_two": self._random_two,
                       "source_hash": self._source_hash}[listener.balance]
        self.table.claim_row()  # now, in the worker's main thread, before relay threads count

    # -- the accepting relay loop

    def targets(self, client: object = None) -> Iterator[Target]:
        """The backends to try for one client, in order, chosen lazily on the relay thread.

        ``client`` is the accepted address (``source_hash`` hashes its IP).  The
        connect budget starts now, when the client is accepted.
        """
        if self.budget_s is None:
            members = self.members()
            if len(members) == 1 and members[0].target is not None:
                # One backend: whatever its health, it is the one and only try
                # (see ``_ordered``), so the ordering machinery can be skipped.
                member = members[0]
                self.table.acquire(member.slot)
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
            self._schedules.clear()
        return members

    def _member(self, slot: int, backend: Backend, name: str,
                address: Optional[Tuple[int, tuple]]) -> Member:
        report = functools.partial(self._report, slot, name)
        target = None
        if address is not None:
            target = Target(address[0], address[1], name, report=report)
        key = f"{backend.address}|{address[1][0] if address else ''}".encode()
        return Member(slot, backend, name, target, key)

    def pick(self, client_host: str = "") -> Member:
        """The first choice for a client (no connection is counted; for tests and tools)."""
        return next(self._ordered(client_host, time.monotonic()))

    def _ordered(self, host: str, now: float) -> Iterator[Member]:
        """Every member in the order to try: up primaries, up backups, then the rest."""
        members = self.members()
        eligible = self.table.eligible
        up = [m for m in members if eligible(m.slot, now)]
        if len(up) == len(members) and not self._any_backup:
            yield from self._order(members, host)  # the common case: every backend up
            return
        primaries = [m for m in up if not m.backend.backup]
        backups = [m for m in up if m.backend.backup]
        if primaries:
            yield from self._order(primaries, host)
        if backups:
            yield from self._order(backups, host)
        if len(up) < len(members):  # all tried or down: try the down ones rather than none
            up_slots = {m.slot for m in up}
            down = [m for m in members if m.slot not in up_slots]
            # An algorithm is never given an empty group (least_conn's min() and
            # random_two's draw would raise at the end of the failover).
            for group in ([m for m in down if not m.backend.backup],
                          [m for m in down if m.backend.backup]):
                if group:
                    yield from self._order(group, host)

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
        tried = 0
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
            tried += 1
            self.table.acquire(member.slot)
            if deadline is None:
                yield target  # no budget: the connection's own timeout applies as it is
            else:
                yield Target(target.family, target.sockaddr, target.name, timeout,
                             target.report)

    def _warn_unresolved(self, host: str, waited_s: float) -> None:
        now = time.monotonic()
        if now - self._warned_wait < WAIT_WARNING_INTERVAL_S:
            return
        self._warned_wait = now
        log.warning("listener %s: no backend address known yet (%s not resolved); "
                    "client %s closed after waiting %.0f ms", self.listener.label,
                    ", ".join(str(e.backend.address) for e in self.entries), host or "?",
                    waited_s * 1000)

    def _report(self, slot: int, name: str, outcome: str, reason: str) -> None:
        """How an attempt went (called by the relay thread through ``Target.report``)."""
        table = self.table
        if outcome == CONNECTED:
            if table.record_success(slot):
                log.warning("backend %s up: a client connected", name)
            return
        table.release(slot)
        if outcome == FAILED:
            fall = self.listener.fall
            fails, newly_down = table.record_failure(slot, fall, self.fail_timeout_s,
                                                     time.monotonic())
            if newly_down:
                log.warning("backend %s down: %s (%d/%d connect failures in a row); "
                            "tried again in %.1f s", name, reason, min(fails, fall), fall,
                            self.fail_timeout_s)
        else:
            assert outcome == RELEASED

    # -- the algorithms: each yields every given member once, best first

    def _schedule(self, members: List[Member]) -> List[Member]:
        key = tuple(m.slot for m in members)
        schedule = self._schedules.get(key)
        if schedule is None:
            if len(self._schedules) >= SCHEDULE_CACHE:
                self._schedules.clear()
            schedule = [members[i] for i in smooth_weighted_order([m.weight for m in members])]
            self._schedules[key] = schedule
        return schedule

    def _round_robin(self, members: List[Member], host: str) -> Iterator[Member]:
        if len(members) == 1:
            yield members[0]
            return
        schedule = self._schedule(members)
        start = self.counter.draw()
        seen = set()
        for step in range(len(schedule)):
            member = schedule[(start + step) % len(schedule)]
            if member.slot not in seen:
                seen.add(member.slot)
                yield member
                if len(seen) == len(members):
                    return

    def _load(self, member: Member) -> float:
        return self.table.active_count(member.slot) / member.weight

    def _least_conn(self, members: List[Member], host: str) -> Iterator[Member]:
        if len(members) == 1:
            yield members[0]
            return
        loads = [(self._load(m), i) for i, m in enumerate(members)]
        best = min(load for load, _ in loads)
        tied = [i for load, i in loads if load == best]
        first = tied[self.counter.draw() % len(tied)] if len(tied) > 1 else tied[0]
        yield members[first]
        for _, i in sorted(loads):
            if i != first:
                yield members[i]

    def _random_two(self, members: List[Member], host: str) -> Iterator[Member]:
        if len(members) == 1:
            yield members[0]
            return
        # The module's generator: reseeded in every forked child, unlike an instance.
        a = random.choices(range(len(members)), [m.weight for m in members])[0]
        rest = [i for i in range(len(members)) if i != a]
        b = random.choices(rest, [members[i].weight for i in rest])[0]
        first, second = (a, b) if self._load(members[a]) <= self._load(members[b]) else (b, a)
        yield members[first]
        yield members[second]
        for _, i in sorted((self._load(members[i]), i) for i in rest if i != b):
            yield members[i]

    def _source_hash(self, members: List[Member], host: str) -> Iterator[Member]:
        if len(members) == 1:
            yield members[0]
            return
        client = host.encode()
        scored = sorted(((_rendezvous_score(client, m), i) for i, m in enumerate(members)),
                        reverse=True)
        for _, i in scored:
            yield members[i]


def _rendezvous_score(client: bytes, member: Member) -> float:
    """Weighted rendezvous hashing: -weight / ln(u), u uniform in (0, 1) from the hash."""
    digest = hashlib.blake2b(client + b"|" + member.hash_key, digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 1) / (2.0 ** 64 + 2)
    return -member.weight / math.log(u)


__all__ = ["Balancer", "Member", "backend_name", "smooth_weighted_order",
           "smooth_weighted_schedule"]
