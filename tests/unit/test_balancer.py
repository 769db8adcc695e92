"""Backend choice: the weighted schedule and the counter shared across processes."""

from __future__ import annotations

import os

from prefork_proxy.balancer import Balancer, smooth_weighted_schedule
from prefork_proxy.config import Backend, Endpoint, ListenerConfig
from prefork_proxy.shared import RoundRobinCounter


def _backends(*weights: int, backup: int = -1):
    return [Backend(Endpoint(f"b{i}", 1000 + i), weight=w, backup=(i == backup))
            for i, w in enumerate(weights)]


def test_equal_weights_rotate_in_order():
    a, b, c = _backends(1, 1, 1)
    assert smooth_weighted_schedule([a, b, c]) == [a, b, c]


def test_smooth_weighted_spreads_heavy_backends():
    a, b, c = _backends(5, 1, 1)
    assert smooth_weighted_schedule([a, b, c]) == [a, a, b, a, c, a, a]


def test_backups_are_left_out_of_the_rotation():
    backends = _backends(1, 1, 1, backup=2)
    listener = ListenerConfig(Endpoint("127.0.0.1", 1), tuple(backends))
    balancer = Balancer(listener, RoundRobinCounter())
    assert [balancer.pick() for _ in range(4)] == [backends[0], backends[1]] * 2


def test_counter_is_global_across_forked_processes():
    """8 processes draw 500 tickets each: every ticket is drawn exactly once."""
    counter = RoundRobinCounter()
    readers = []
    for _ in range(8):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: draw and report, then leave without running pytest's teardown
            os.close(read_end)
            tickets = ",".join(str(counter.draw()) for _ in range(500))
            os.write(write_end, tickets.encode())
            os._exit(0)
        os.close(write_end)
        readers.append((pid, read_end))
    drawn = []
    for pid, read_end in readers:
        with os.fdopen(read_end, "rb") as f:
            drawn.extend(int(t) for t in f.read().decode().split(","))
        os.waitpid(pid, 0)
    assert sorted(drawn) == list(range(4000))
