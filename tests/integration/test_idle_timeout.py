"""idle_timeout_ms through the real proxy: fires within +-20%, never on a moving stream,
never on a listener without it.  The backend is a plain socket server in a thread
(each accepted socket kept), so the test sees the backend side's close too."""
from __future__ import annotations

import socket
import threading
import time
from typing import List

import pytest
from support import wait_for, write_config

IDLE_MS = 1500


class KeepingBackend:
    """Echoes on loopback and keeps every accepted socket (to watch it close)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: List[socket.socket] = []
        self.closed_at: List[float] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        self.closed_at.append(time.monotonic())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def keeping_backend():
    backend = KeepingBackend()
    yield backend
    backend.close()


def _proxy(proxy_factory, tmp_path, port: int, idle_ms: int):
    extra = f"idle_timeout_ms = {idle_ms}\n" if idle_ms else ""
    config = write_config(tmp_path / "p.toml", (
        f"[server]\nworkers = 1\nthreads = 1\naccess_log = \"{tmp_path / 'access.log'}\"\n"
        "\n[[tcp_proxy]]\n"
        f"bind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:{port}\"]\n{extra}"))
    return proxy_factory("start", "--config", str(config))


def _round_trip(client: socket.socket, data: bytes) -> None:
    client.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = client.recv(65536)
        assert chunk, "closed before the echo came back"
        got += chunk
    assert got == data


@pytest.mark.timeout(60)
def test_an_idle_connection_is_closed_both_sides_within_20_percent(
        keeping_backend, proxy_factory, tmp_path):
    proxy = _proxy(proxy_factory, tmp_path, keeping_backend.port, IDLE_MS)
    client = socket.create_connection(("127.0.0.1", proxy.port()), timeout=10)
    _round_trip(client, b"hello")
    last_byte = time.monotonic()
    assert client.recv(1) == b""  # the proxy closed it (a FIN, not a reset)
    elapsed = time.monotonic() - last_byte
    assert 0.8 * IDLE_MS / 1000 <= elapsed <= 1.2 * IDLE_MS / 1000, elapsed
    wait_for(lambda: keeping_backend.closed_at, timeout=5)  # the backend saw the close too
    assert keeping_backend.closed_at[0] - last_byte <= 1.2 * IDLE_MS / 1000 + 0.2
    # The access log says why: relayed (200), the client side idle (the server answered last).
    access = tmp_path / "access.log"
    line = wait_for(lambda: access.exists() and access.read_text().strip(), timeout=10)
    assert "status=200" in line and "term=cD" in line, line
    client.close()


@pytest.mark.timeout(60)
def test_a_connection_moving_a_byte_every_100_ms_is_never_closed(
        keeping_backend, proxy_factory, tmp_path):
    proxy = _proxy(proxy_factory, tmp_path, keeping_backend.port, IDLE_MS)
    client = socket.create_connection(("127.0.0.1", proxy.port()), timeout=10)
    end = time.monotonic() + 3 * IDLE_MS / 1000
    sent = 0
    while time.monotonic() < end and sent < 100:  # bounded in count and time
        _round_trip(client, b"x")
        sent += 1
        time.sleep(0.1)  # the traffic pattern under test, not a wait for an event
    _round_trip(client, b"still open")
    assert not keeping_backend.closed_at
    client.close()


@pytest.mark.timeout(60)
def test_a_listener_without_the_key_never_closes_an_idle_connection(
        keeping_backend, proxy_factory, tmp_path):
    proxy = _proxy(proxy_factory, tmp_path, keeping_backend.port, 0)
    client = socket.create_connection(("127.0.0.1", proxy.port()), timeout=10)
    _round_trip(client, b"hello")
    client.settimeout(3.0)  # the test's own bound on the wait
    with pytest.raises(socket.timeout):
        client.recv(1)
    client.settimeout(10)
    _round_trip(client, b"after 3 s idle")
    assert not keeping_backend.closed_at
    client.close()
