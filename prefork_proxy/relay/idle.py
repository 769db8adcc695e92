"""The idle timeout (``idle_timeout_ms``): one coarse sweep per loop per idle value.

Owned by one ``RelayLoop`` (its thread only).  Principle (no timestamp per
event): the relay's directions already count their bytes (``Direction.nread``/
``nwritten``); a sweep every ``interval_for(idle_s)`` compares each relayed
connection's two direction totals with the values it saw last time.  A
connection whose counts have not changed since the sweep that last saw them
move, for at least ``idle_s``, is idle: the loop closes it (a FIN both ways).
It is never closed early (the last byte came before that sweep), and at most
two intervals late: with ``interval = min(1 s, idle/10)``, within +20%.

Cost: nothing per event; per open connection of such a listener, per sweep,
about six attribute reads and two compares.  A listener without the key has
no sweep and no timer at all.

Term (HAProxy's): ``sD`` when the proxy waits for the server: bytes for the
backend are held unsent (it does not read), or the client was the last to
move bytes (sent a request, no answer).  ``cD`` otherwise: bytes for the client
held unsent, the server answered last, or nothing moved at all (waiting for the
client to speak).  Both moving within one interval counts as the server last.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from .connection import Connection

#: The longest time between two sweeps (a long idle value needs no finer look).
MAX_INTERVAL_S = 1.0


def interval_for(idle_s: float) -> float:
    return min(MAX_INTERVAL_S, idle_s / 10.0)


class Seen:
    """What a sweep last saw of one member: its two direction totals, since when they
    have not moved, and the term if it were closed now (``cD`` or ``sD``).

    Kept by the sweep, not on ``Connection``: a connection of a listener without
    ``idle_timeout_ms`` carries none of it (four slots, 32 bytes per idle connection).
    """

    __slots__ = ("up", "down", "since", "term")

    def __init__(self, up: int, down: int, since: float, term: str) -> None:
        self.up, self.down, self.since, self.term = up, down, since, term


class IdleSweep:
    """The connections of one idle value in one loop, and the sweep's own timer.

    ``members`` maps each connection to what the sweep last saw of it (``Seen``).
    ``deadline``/``closed`` let it sit on the loop's ``TimerHeap`` like a
    connection (one entry, armed while it has connections).
    """

    __slots__ = ("idle_s", "interval", "members", "deadline", "closed", "peer")

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.interval = interval_for(idle_s)
        self.members: Dict[Connection, Seen] = {}
        self.deadline = 0.0
        self.closed = False
        self.peer = "idle sweep"  # what a log line of the loop names it by

    def add(self, conn: Connection, now: float) -> None:
        up, down = conn.upstream, conn.downstream
        u = up.nread + up.nwritten if up is not None else 0
        d = down.nread + down.nwritten if down is not None else 0
        # What moved while it connected (a first request, a PROXY header) counts as moving last.
        self.members[conn] = Seen(u, d, now, "sD" if u and not d else "cD")

    def remove(self, conn: Connection) -> None:
        """The connection closed (a no-op if it was not a member)."""
        self.members.pop(conn, None)

    def sweep(self, now: float) -> List[Tuple[Connection, str]]:
        """The members idle for ``idle_s`` as of ``now``, with their term (pure logic)."""
        due: List[Tuple[Connection, str]] = []
        limit = now - self.idle_s + 1e-6  # float noise must not cost a whole interval
        for conn, seen in self.members.items():
            up, down = conn.upstream, conn.downstream
            if up is None or down is None:
                continue
            u = up.nread + up.nwritten
            d = down.nread + down.nwritten
            moved_up, moved_down = u != seen.up, d != seen.down
            if moved_up or moved_down:
                seen.up, seen.down, seen.since = u, d, now
                # The server's side moved (alone, or with the client's: a request and
                # its answer since the last look): it spoke last.
                seen.term = "cD" if moved_down else "sD"
            elif seen.since <= limit:
                if up.pending:
                    term = "sD"
                elif down.pending:
                    term = "cD"
                else:
                    term = seen.term
                due.append((conn, term))
        return due
