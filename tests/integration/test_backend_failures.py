"""A backend that resets, refuses or never answers: the client is closed cleanly and promptly."""

from __future__ import annotations

import os
import socket
import time

import pytest
from support import Blackhole, closed_port, recv_exactly, transform


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Read until the proxy closes the client; return how long that took."""
    sock.settimeout(seconds)
    start = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_backend_reset_mid_stream_closes_client_within_1s(mode, backend_factory, proxy_factory):
    backend = backend_factory("reset", "r", "--reset-after", str(256 * 1024))
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", backend.address,
                          "--workers", "1", "--relay", mode)
    with proxy.connect() as sock:
        first = os.urandom(1000)
        sock.sendall(first)
        assert recv_exactly(sock, len(first)) == transform(first)  # the stream really flows
        try:
            sock.sendall(os.urandom(512 * 1024))  # crosses the backend's reset threshold
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert _closed_within(sock, 5.0) < 1.0
    # The proxy keeps serving other connections.
    with proxy.connect() as other:
        other.sendall(b"still there")
        assert recv_exactly(other, 11) == transform(b"still there")


def test_refused_backend_closes_client_within_1s_and_logs_it(proxy_factory):
    with closed_port() as port:  # reserve a port with nothing listening on it
        dead = f"127.0.0.1:{port}"
        proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", dead,
                              "--workers", "1")
        with proxy.connect() as sock:
            assert _closed_within(sock, 5.0) < 1.0
    assert f"backend {dead} unreachable" in proxy.log
    assert "Connection refused" in proxy.log


def test_backend_that_never_accepts_closes_client_at_connect_timeout(proxy_factory):
    # A listener whose accept queue is full: the kernel drops further SYNs, so a
    # connect to it hangs, exactly like a dead host, while staying on loopback.
    with Blackhole() as blackhole:
        proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", blackhole.address,
                              "--workers", "1", "--connect-timeout-ms", "800")
        with proxy.connect() as sock:
            elapsed = _closed_within(sock, 5.0)
        assert 0.8 * 0.8 <= elapsed <= 0.8 * 1.2, elapsed
        assert "connect timed out after 800 ms" in proxy.log


@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_backend_reset_reaches_the_client_as_a_reset(mode, backend_factory, proxy_factory):
    """A backend that resets mid-stream: the client hears a reset, never a clean EOF.

    The client sends exactly what makes the backend reset and nothing more, so
    the proxy holds none of the client's bytes unread: only the relay's
    SO_LINGER abort (not the kernel's reset for unread data) can tell the
    client that its stream was cut.
    """
    size = 256 * 1024
    backend = backend_factory("reset", "r", "--reset-after", str(size))
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", backend.address,
                          "--workers", "1", "--relay", mode)
    for _ in range(3):
        with proxy.connect() as sock:
            payload = os.urandom(size)
            sock.sendall(payload)
            sock.settimeout(5.0)
            received = bytearray()
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise AssertionError(f"clean EOF after {len(received)} of {size} "
                                             "bytes: a cut stream passed off as complete")
                    received += chunk
            except ConnectionResetError:
                pass
            assert transform(payload).startswith(bytes(received))
    with proxy.connect() as other:  # the proxy keeps serving
        other.sendall(b"still there")
        assert recv_exactly(other, 11) == transform(b"still there")
