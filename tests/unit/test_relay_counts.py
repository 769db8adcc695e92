"""The relay's counters: bytes as they move into its stats cells, one close per connection.

A real ``RelayLoop`` over loopback TCP with a recording stand-in for
``rows.LoopStats`` (pure bookkeeping: the loop only indexes its ``cells``
and calls ``base``/``on_close``); the real ``LoopStats`` and its fold are
tested in test_loop_stats.py, the whole path in
tests/integration/test_metrics_bytes.py.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from array import array

import pytest
from support import closed_port, recv_exactly, wait_for

from prefork_proxy import splice as splice_module
from prefork_proxy.relay import RelayLoop, Target

_RST = struct.pack("ii", 1, 0)


class RecordingStats:
    """Cells like ``LoopStats``' (8 per listener slot) and every ``on_close`` call."""

    RECEIVED, SENT, CLOSED = 1, 2, 0

    def __init__(self) -> None:
        self.cells = array("q", [0] * 64)
        self.closes: list = []

    def base(self, lslot: int) -> int:
        return lslot * 8

    def on_close(self, base, backend_slot, bytes_in, bytes_out, duration_s) -> None:
        self.closes.append((base // 8, backend_slot, bytes_in, bytes_out, duration_s))

    def received(self, lslot: int) -> int:
        return self.cells[lslot * 8 + self.RECEIVED]

    def sent(self, lslot: int) -> int:
        return self.cells[lslot * 8 + self.SENT]


@pytest.fixture(params=["splice", "copy"])
def counted(request):
    if request.param == "splice" and not splice_module.SPLICE_SUPPORTED:
        pytest.skip("splice is not available here")
    stats = RecordingStats()
    loop = RelayLoop(request.param, stats=stats)
    loop.start()
    backend_listener = socket.create_server(("127.0.0.1", 0))
    front_listener = socket.create_server(("127.0.0.1", 0))
    target = Target(socket.AF_INET, backend_listener.getsockname(), "b", slot=5)

    def open_pair(lslot: int = 3, targets=None):
        client = socket.create_connection(front_listener.getsockname(), timeout=10)
        accepted, address = front_listener.accept()
        accepted.setblocking(False)
        loop.submit(accepted, iter(targets or [target]), 5.0, f"{address[0]}:{address[1]}",
                    listener_slot=lslot)
        if targets is not None:
            return client, None
        backend, _ = backend_listener.accept()
        backend.settimeout(10)
        return client, backend

    yield loop, stats, open_pair
    loop.stop()
    loop.join(5)
    backend_listener.close()
    front_listener.close()


def _drain(sock: socket.socket) -> int:
    got = 0
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return got
            got += len(chunk)
    except ConnectionResetError:
        return got


def test_bytes_count_as_they_move_and_a_clean_close_is_counted_once(counted):
    loop, stats, open_pair = counted
    client, backend = open_pair(lslot=3)
    request, reply = os.urandom(300_000), os.urandom(700_001)  # bulk: spliced in splice mode
    sender = threading.Thread(target=backend.sendall, args=(reply,))
    sender.start()
    client.sendall(request)
    assert recv_exactly(backend, len(request)) == request
    assert recv_exactly(client, len(reply)) == reply
    sender.join(10)
    # Open still, and every byte reaches the cells (within ``PUBLISH_S``).
    wait_for(lambda: (stats.received(3), stats.sent(3)) == (len(request), len(reply)), 5,
             message="the open connection's bytes in the cells")
    assert stats.closes == []
    client.shutdown(socket.SHUT_WR)
    backend.shutdown(socket.SHUT_WR)
    assert _drain(backend) == 0 and _drain(client) == 0
    wait_for(lambda: len(stats.closes) == 1, 5, message="one close counted")
    lslot, backend_slot, bytes_in, bytes_out, duration = stats.closes[0]
    assert (lslot, backend_slot, bytes_in, bytes_out) == (3, 5, len(request), len(reply))
    assert 0 < duration < 10
    assert stats.received(0) == stats.sent(0) == 0  # other listeners untouched
    client.close()
    backend.close()


def test_every_ending_is_counted_exactly_once(counted):
    loop, stats, open_pair = counted
    # A client reset mid-stream.
    client, backend = open_pair(lslot=1)
    client.sendall(b"x" * 1000)
    assert recv_exactly(backend, 1000) == b"x" * 1000
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    client.close()
    _drain(backend)
    backend.close()
    wait_for(lambda: len(stats.closes) == 1, 5, message="the reset counted")
    assert stats.closes[0][:3] == (1, 5, 1000)
    # A backend reset.
    client, backend = open_pair(lslot=1)
    backend.sendall(b"y" * 10)
    assert recv_exactly(client, 10) == b"y" * 10
    backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    backend.close()
    _drain(client)
    client.close()
    wait_for(lambda: len(stats.closes) == 2, 5, message="the backend reset counted")
    assert stats.closes[1][:4] == (1, 5, 0, 10)
    # Every backend refused: no backend slot, no bytes.
    with closed_port() as port:
        refused = Target(socket.AF_INET, ("127.0.0.1", port), "gone", slot=7)
        client, _ = open_pair(lslot=2, targets=[refused])
        assert _drain(client) == 0
        client.close()
    wait_for(lambda: len(stats.closes) == 3, 5, message="the refused client counted")
    assert stats.closes[2][:4] == (2, -1, 0, 0)
    # Cut at the drain deadline.
    client, backend = open_pair(lslot=1)
    client.sendall(b"z" * 5)
    assert recv_exactly(backend, 5) == b"z" * 5
    loop.stop(drain_timeout_s=0.1)
    assert loop.join(5)
    assert len(stats.closes) == 4 and stats.closes[3][:3] == (1, 5, 5)
    assert stats.received(1) == 1000 + 5 and stats.sent(1) == 10
    client.close()
    backend.close()
