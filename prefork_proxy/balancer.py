"""Choosing the backend for each new connection.

A ``Balancer`` per listener lives in every worker and is called from the
worker's accept thread.  Its state is global, not per worker: the position in
the rotation is a ``RoundRobinCounter`` in shared memory, so 100 connections
arriving one after the other through 8 workers alternate exactly between 2
backends, whichever worker accepts each.

Weights: the rotation follows a fixed schedule built with nginx's smooth
weighted round robin (weights 5:1:1 give a b a c a a a, spread out, not
a a a a a b c), and the shared counter indexes that schedule.  Backup
backends are not in the schedule: they serve only when every primary is down,
which health checking (a later module) decides.
"""

from __future__ import annotations

from typing import Iterator, List, Sequence

from prefork_proxy.config import Backend, ListenerConfig
from prefork_proxy.relay import Target
from prefork_proxy.resolver import resolve
from prefork_proxy.shared import RoundRobinCounter


def smooth_weighted_schedule(backends: Sequence[Backend]) -> List[Backend]:
    """One full cycle of smooth weighted round robin (length = sum of weights)."""
    current = [0] * len(backends)
    total = sum(b.weight for b in backends)
    schedule: List[Backend] = []
    for _ in range(total):
        for i, backend in enumerate(backends):
            current[i] += backend.weight
        best = max(range(len(backends)), key=lambda i: current[i])
        current[best] -= total
        schedule.append(backends[best])
    return schedule


class Balancer:
    """Round robin over a listener's primary backends, global across workers."""

    def __init__(self, listener: ListenerConfig, counter: RoundRobinCounter) -> None:
        primaries = [b for b in listener.backends if not b.backup] or list(listener.backends)
        self.schedule = smooth_weighted_schedule(primaries)
        self.counter = counter

    def pick(self) -> Backend:
        return self.schedule[self.counter.draw() % len(self.schedule)]

    def targets(self) -> Iterator[Target]:
        """The backends to try for one connection, in order; resolved only when needed.

        Today that is the one picked backend: failing over to the next one is a
        later issue's, and plugs in here.
        """
        yield resolve(self.pick().address)
