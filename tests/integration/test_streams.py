"""Bytes through the real proxy: exact, both ways at once, half-closed, for splice and copy."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest
from support import recv_exactly, recv_until_eof, sha256, transform

MODES = ["splice", "copy"]
PAYLOAD_BYTES = 32 << 20
CONNECTIONS = 20


def _stream_both_ways(port: int, payload: memoryview) -> str:
    """Send ``payload`` while reading its echo; return the sha256 of what came back."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    errors: list = []

    def send() -> None:
        try:
            for offset in range(0, len(payload), 1 << 20):
                sock.sendall(payload[offset:offset + (1 << 20)])
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    digest, received = hashlib.sha256(), 0
    buffer = bytearray(1 << 20)
    while True:
        n = sock.recv_into(buffer)
        if not n:
            break
        digest.update(memoryview(buffer)[:n])
        received += n
    sender.join(60)
    sock.close()
    assert not errors, errors
    assert received == len(payload), f"received {received} of {len(payload)} bytes"
    return digest.hexdigest()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_32mib_both_directions_20_connections_byte_exact(mode, backend_factory, proxy_factory):
    backend = backend_factory("echo")
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", backend.address,
                          "--workers", "2", "--relay", mode)
    assert f"relay={mode}" in proxy.log
    base = os.urandom(PAYLOAD_BYTES)
    # Each connection sends a different rotation of the same random bytes, so
    # two connections whose streams got swapped or mixed would fail.
    payloads = [memoryview(base[i * 4099:] + base[:i * 4099]) for i in range(CONNECTIONS)]
    expected = [sha256(transform(bytes(p))) for p in payloads]
    results: dict = {}

    def run(index: int) -> None:
        try:
            results[index] = _stream_both_ways(proxy.port(), payloads[index])
        except Exception as exc:  # pragma: no cover - reported by the assert below
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    assert [results.get(i) for i in range(CONNECTIONS)] == expected


@pytest.mark.parametrize("mode", MODES)
def test_half_close_backend_answers_after_eof(mode, backend_factory, proxy_factory):
    reply_bytes = 3 << 20
    backend = backend_factory("reply-after-eof", "b", "--reply-bytes", str(reply_bytes))
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", backend.address,
                          "--workers", "1", "--relay", mode)
    request = os.urandom(200_000)
    with proxy.connect() as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)  # the backend answers only after it sees this EOF
        reply = recv_until_eof(sock)
    digest, _, body = reply.partition(b"\n")
    assert digest.decode() == sha256(request)
    assert len(body) == reply_bytes
    prefix = request[:65536]
    expected_body = (prefix * (reply_bytes // len(prefix) + 1))[:reply_bytes]
    assert body == transform(expected_body)


@pytest.mark.parametrize("mode", MODES)
def test_small_exchanges_keep_order(mode, backend_factory, proxy_factory):
    """Many small request/reply turns on one connection (a database client's pattern)."""
    backend = backend_factory("echo")
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", backend.address,
                          "--workers", "1", "--relay", mode)
    with proxy.connect() as sock:
        for turn in range(500):
            message = f"query {turn}\n".encode() * (turn % 7 + 1)
            sock.sendall(message)
            assert recv_exactly(sock, len(message)) == transform(message)
