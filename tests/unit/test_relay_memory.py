"""What an idle relayed connection costs in Python objects (issue 15: <= 1.1 KiB PSS each).

A real ``RelayLoop`` on loopback sockets: connections relayed with a one-byte
round trip each, then held idle, as ``scripts/bench``'s idle workload does.
tracemalloc counts what the relay's own code allocated and still holds, per
connection: deterministic (no clock), unlike a PSS reading.  Measured when this
test was written: 887 bytes per connection, against 1,156 before the directions
dropped their descriptor numbers, the two floats went and the idle fields moved
to the sweep (see issue 15's note for the PSS figures).
"""
from __future__ import annotations

import gc
import os
import socket
import tracemalloc

import pytest
from support import close_loop_rig, wait_for

from prefork_proxy.relay import RelayLoop, Target
from prefork_proxy.relay.connect import CONNECTED_UNTIMED

#: Bytes per idle connection the relay may hold (Connection, two Directions, the
#: backend socket, its share of the loop's dicts); 1,156 before, 887 after.
BUDGET_PER_CONNECTION = 1024
CONNECTIONS = 500


class _IdleRig:
    """A loop, a listener for the clients and one for the backend, and the held pairs."""

    def __init__(self) -> None:
        # Descriptors above 256, as a busy worker's are: CPython caches the ints
        # below that, so only there does a second int object per copy show.
        self.spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(300)]
        self.loop = RelayLoop("copy")
        self.loop.start()
        self.backend_listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.front = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.target = Target(socket.AF_INET, self.backend_listener.getsockname(), "b")
        self.pairs: list = []

    def relay_one(self) -> None:
        client = socket.create_connection(self.front.getsockname(), timeout=10)
        accepted, address = self.front.accept()
        accepted.setblocking(False)
        self.loop.submit(accepted, iter([self.target]), 5.0, f"{address[0]}:{address[1]}")
        backend, _ = self.backend_listener.accept()
        backend.settimeout(10)
        client.sendall(b"x")
        assert backend.recv(1) == b"x"
        backend.sendall(b"y")
        assert client.recv(1) == b"y"
        self.pairs.append((client, backend))

    def close(self) -> None:
        close_loop_rig(self.loop, self.pairs, self.front, self.backend_listener)
        for fd in self.spare:
            os.close(fd)


@pytest.fixture
def idle_rig():
    rig = _IdleRig()
    yield rig
    rig.close()


def _relay_bytes(snapshot: tracemalloc.Snapshot) -> int:
    relay = snapshot.filter_traces([tracemalloc.Filter(True, "*prefork_proxy*relay*")])
    return sum(stat.size for stat in relay.statistics("filename"))


def test_an_idle_relayed_connection_holds_at_most_its_budget(idle_rig):
    for _ in range(20):  # the loop's own first-use allocations, outside the count
        idle_rig.relay_one()
    gc.collect()
    tracemalloc.start()
    try:
        before = _relay_bytes(tracemalloc.take_snapshot())
        for _ in range(CONNECTIONS):
            idle_rig.relay_one()
        wait_for(lambda: len(idle_rig.loop._connections) == CONNECTIONS + 20, 10,
                 message="every connection to be relayed")
        gc.collect()
        per_connection = (_relay_bytes(tracemalloc.take_snapshot()) - before) / CONNECTIONS
    finally:
        tracemalloc.stop()
    assert per_connection <= BUDGET_PER_CONNECTION, per_connection


def test_an_idle_connection_keeps_no_copies_and_no_floats_it_does_not_need(idle_rig):
    """The savings one by one: the directions keep no descriptor numbers, the
    attempt's start time is dropped, and without an access log the connect time is
    the shared constant; no idle-sweep state without the key."""
    idle_rig.relay_one()
    (conn,) = list(idle_rig.loop._connections)
    for direction in (conn.upstream, conn.downstream):
        assert not hasattr(direction, "src_fd") and not hasattr(direction, "dst_fd")
    assert conn.attempt_at == 0.0
    assert conn.connect_s is CONNECTED_UNTIMED
    assert not any(name.startswith("idle_") and name != "idle_s"
                   for name in type(conn).__slots__)
