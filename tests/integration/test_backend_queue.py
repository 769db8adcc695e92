"""Issue 12: backends' ``max_connections`` and the queue of ``queue_timeout_ms``.

Real proxy, real echo backends on loopback that record their concurrency.  A
backend at its max is skipped by every balance mode, exactly across workers;
when all are full a client waits (its bytes unread) in its worker's FIFO and is
admitted as a slot frees, or refused (RST, logged 503 sQ) at the deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest
from support import CountingEcho, wait_for, write_config


@pytest.fixture
def echoes() -> Iterator[List[CountingEcho]]:
    servers = [CountingEcho(), CountingEcho()]
    yield servers
    for server in servers:
        server.stop()


def _served(sock: socket.socket, payload: bytes, timeout: float = 10.0) -> Optional[bytes]:
    """The echo of ``payload``, or None if the proxy closed or reset the client."""
    sock.settimeout(timeout)
    data = b""
    try:
        while len(data) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
    except ConnectionResetError:
        return None
    return data


def _served_again(client: socket.socket) -> bool:
    try:
        client.sendall(b"p")
    except OSError:
        return False
    return _served(client, b"p") == b"p"


def _refused(port: int, payload: bytes) -> bool:
    """A client the proxy refuses: an RST (it may come before ``connect`` even returns)."""
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
    except (ConnectionResetError, ConnectionRefusedError):  # an RST during the handshake
        return True
    with client:
        try:
            client.sendall(payload)
        except (ConnectionResetError, BrokenPipeError):
            return True
        return _served(client, payload) is None


def _admitted(port: int, payload: bytes) -> Optional[socket.socket]:
    """A client the proxy serves (its echo came back), or None if it was refused
    (a refusal's RST may come before ``connect`` even returns)."""
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(payload)
    except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
        return None
    if _served(client, payload) == payload:
        return client
    client.close()
    return None


def _config(tmp_path: Path, echoes: List[CountingEcho], caps: List[int], workers: int,
            extra: str = "") -> Path:
    backends = ", ".join(f'{{ address = "127.0.0.1:{e.port}", max_connections = {cap} }}'
                         for e, cap in zip(echoes, caps))
    return write_config(tmp_path / "p.toml", (
        f"[server]\nworkers = {workers}\nthreads = 1\n\n[[tcp_proxy]]\n"
        f"bind = \"127.0.0.1:0\"\nbackends = [{backends}]\n{extra}"))


@pytest.mark.parametrize("balance", ["round_robin", "least_conn", "random_two",
                                     "source_hash"])
def test_a_backend_at_its_max_is_skipped_exactly_across_workers(echoes, proxy_factory,
                                                                tmp_path: Path, balance: str):
    """Caps 3 and 4 over 2 workers: 7 clients are served (3 + 4 exactly), the 8th is
    refused at once (queue_timeout_ms 0), and a close lets exactly one more in."""
    config = _config(tmp_path, echoes, [3, 4], workers=2, extra=f'balance = "{balance}"\n')
    proxy = proxy_factory("start", "--config", str(config))
    proxy.wait_workers(2)
    held = []
    for index in range(7):
        client = socket.create_connection(("127.0.0.1", proxy.port()), timeout=10)
        payload = b"held %d\n" % index
        client.sendall(payload)
        assert _served(client, payload) == payload, f"client {index} not served"
        held.append(client)
    assert [e.active for e in echoes] == [3, 4]
    assert _refused(proxy.port(), b"eighth\n")
    wait_for(lambda: "503 sQ backend_max_connections" in proxy.log, timeout=5,
             message="the refusal logged")
    held.pop(0).close()
    wait_for(lambda: sum(e.active for e in echoes) == 6, timeout=5, message="a slot freed")
    # The echo saw the close before the proxy did: until the proxy has released
    # the slot a new client is still refused, so try until one is served.
    again = wait_for(lambda: _admitted(proxy.port(), b"again\n"), timeout=5,
                     interval=0.05, message="the freed slot to admit a client")
    assert _refused(proxy.port(), b"ninth\n"), "exactly one more after one close"
    assert [e.peak for e in echoes] == [3, 4]
    for client in held + [again]:
        client.close()


def test_a_sigkilled_workers_backend_slots_are_given_back(echoes, proxy_factory,
                                                          tmp_path: Path):
    config = _config(tmp_path, echoes, [2, 2], workers=2)
    proxy = proxy_factory("start", "--config", str(config))
    pids = proxy.wait_workers(2)
    held = []
    for _ in range(4):
        client = socket.create_connection(("127.0.0.1", proxy.port()), timeout=10)
        client.sendall(b"x")
        assert _served(client, b"x") == b"x"
        held.append(client)
    os.kill(pids[0], signal.SIGKILL)
    # Its clients are cut; the master releases its slots as it reaps it.
    # Its clients are cut (a reset); the others still round-trip.
    survivors = sum(1 for client in held if _served_again(client))
    assert survivors < 4
    wait_for(lambda: sum(e.active for e in echoes) == survivors, timeout=10,
             message="the backends saw the cut connections end")
    proxy.wait_workers(2)
    fresh = []
    started = time.monotonic()
    while len(fresh) < 4 - survivors:
        assert time.monotonic() - started < 10, "the dead worker's slots were not given back"
        client = _admitted(proxy.port(), b"y")  # None: refused, the slots not released yet
        if client is not None:
            fresh.append(client)
    assert sum(e.active for e in echoes) == 4
    assert _refused(proxy.port(), b"z"), "the caps hold again after the release"
    for client in held + fresh:
        client.close()


def test_clients_wait_in_fifo_order_for_a_slot_then_are_refused_at_the_deadline(
        echoes, proxy_factory, tmp_path: Path):
    """The issue's queue test: 2 backends at 5, 20 clients: 10 served, 10 wait;
    each close admits exactly the oldest waiter; the rest are refused at
    queue_timeout_ms (+-20 %)."""
    timeout_ms = 3000
    config = _config(tmp_path, echoes, [5, 5], workers=1,
                     extra=f"queue_timeout_ms = {timeout_ms}\n")
    proxy = proxy_factory("start", "--config", str(config))
    proxy.wait_workers(1)
    served, waiters, connected_at = [], [], []
    for index in range(20):
        client = socket.create_connection(("127.0.0.1", proxy.port()), timeout=10)
        connected_at.append(time.monotonic())
        payload = b"client %02d\n" % index
        client.sendall(payload)
        if index < 10:
            assert _served(client, payload) == payload, f"client {index} not served"
            served.append(client)
        else:
            waiters.append(client)
    wait_for(lambda: [e.active for e in echoes] == [5, 5], timeout=5, message="10 served")
    for client in waiters:  # nothing read from them, nothing sent to them
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(1)
    # Each close admits exactly one waiter, the oldest.
    for turn in range(5):
        served.pop(0).close()
        payload = b"client %02d\n" % (10 + turn)
        assert _served(waiters[turn], payload) == payload, f"waiter {turn} not admitted"
        wait_for(lambda want=11 + turn: sum(e.accepted for e in echoes) == want, timeout=5,
                 message="one admission")
        for later in waiters[turn + 1:]:
            later.setblocking(False)
            with pytest.raises(BlockingIOError):
                later.recv(1)
    assert time.monotonic() - connected_at[-1] < timeout_ms / 1000 * 0.8, "too slow a host"
    # The other five are refused near their deadline.
    for index, client in enumerate(waiters[5:], start=15):
        assert _served(client, b"client %02d\n" % index, timeout=10) is None
        waited = time.monotonic() - connected_at[index]
        assert timeout_ms / 1000 * 0.8 <= waited <= timeout_ms / 1000 * 1.2, waited
    assert sum(e.accepted for e in echoes) == 15
    assert [e.peak for e in echoes] == [5, 5]
    wait_for(lambda: proxy.log.count("503 sQ queue_timeout") == 5, timeout=5,
             message="5 refusals logged")
    for client in served + waiters:
        client.close()
