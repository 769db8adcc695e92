"""Issue 12's ``max_connections``: above it the proxy stops accepting from that listener.

Real proxy (2 workers), a real backend on loopback that counts its concurrent
connections.  Clients over the limit wait in the kernel's accept queue (their
handshake completes, nothing serves them) and are served, byte-exact, as soon
as a slot frees; the backend never sees more than the limit at once.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator, List

import pytest
from support import CountingEcho, wait_for, write_config

from prefork_proxy.gate import relay_supports_admission

pytestmark = pytest.mark.skipif(not relay_supports_admission(),
                                reason="the relay has no pre-connect phase")


@pytest.fixture
def counting_echo() -> Iterator[CountingEcho]:
    server = CountingEcho()
    yield server
    server.stop()


def _round_trip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    data = b""
    while len(data) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_client_over_max_connections_waits_in_the_kernel_queue_then_is_served(
        counting_echo, proxy_factory, tmp_path: Path):
    limit = 5
    config = write_config(tmp_path / "p.toml", (
        "[server]\nworkers = 2\n\n[[tcp_proxy]]\nbind = \"127.0.0.1:0\"\n"
        f"backends = [\"127.0.0.1:{counting_echo.port}\"]\nmax_connections = {limit}\n"))
    proxy = proxy_factory("start", "--config", str(config))
    proxy.wait_workers(2)
    port = proxy.port()
    held: List[socket.socket] = []
    for index in range(limit):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.append(client)
        payload = f"held {index}\n".encode()
        assert _round_trip(client, payload) == payload
    wait_for(lambda: counting_echo.active == limit, timeout=5, message="5 backend connections")

    # The 6th: the kernel completes its handshake (the queue), nobody serves it.
    waiting = socket.create_connection(("127.0.0.1", port), timeout=10)
    payload = bytes(range(256)) * 64 + b"the sixth\n"
    waiting.sendall(payload)
    waiting.settimeout(0.5)  # a bounded look for service that must not come
    with pytest.raises(socket.timeout):
        waiting.recv(1)
    assert counting_echo.accepted == limit and counting_echo.active == limit

    # One of the five ends: the 6th is taken from the queue and served byte-exact.
    held.pop(0).close()
    waiting.settimeout(10)
    data = b""
    while len(data) < len(payload):
        chunk = waiting.recv(65536)
        assert chunk, f"EOF after {len(data)} bytes"
        data += chunk
    assert data == payload
    # The others were never disturbed, and the backend never held more than the limit.
    for index, client in enumerate(held):
        assert _round_trip(client, b"still %d\n" % index) == b"still %d\n" % index
    assert counting_echo.accepted == limit + 1
    assert counting_echo.peak == limit
    for client in held + [waiting]:
        client.close()
    assert "refused" not in proxy.log  # no client was turned away


def test_a_full_listener_pauses_alone_and_the_others_go_on(counting_echo, proxy_factory,
                                                           tmp_path: Path):
    listener = ("[[tcp_proxy]]\nbind = \"127.0.0.1:0\"\n"
                f"backends = [\"127.0.0.1:{counting_echo.port}\"]\n")
    config = write_config(tmp_path / "p.toml", (
        "[server]\nworkers = 2\n\n" + listener + "max_connections = 1\n\n" + listener))
    proxy = proxy_factory("start", "--config", str(config))
    proxy.wait_workers(2)
    full, free = proxy.port(0), proxy.port(1)
    holder = socket.create_connection(("127.0.0.1", full), timeout=10)
    assert _round_trip(holder, b"one\n") == b"one\n"
    waiting = socket.create_connection(("127.0.0.1", full), timeout=10)
    waiting.sendall(b"two\n")
    # While the first listener is full (and paused), the second serves at once, many times.
    for index in range(20):
        with socket.create_connection(("127.0.0.1", free), timeout=10) as other:
            assert _round_trip(other, b"free %d\n" % index) == b"free %d\n" % index
    waiting.settimeout(0.2)
    with pytest.raises(socket.timeout):
        waiting.recv(1)
    holder.close()
    waiting.settimeout(10)
    assert waiting.recv(64) == b"two\n"
    waiting.close()
