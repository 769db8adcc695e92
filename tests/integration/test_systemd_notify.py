"""The master's systemd notifications (Type=notify), with a test socket standing in for systemd.

The proxy runs as a real process with ``$NOTIFY_SOCKET`` naming a datagram
socket bound in tmp_path.  ``SO_PASSCRED`` makes the kernel attach the
sender's pid to every datagram, as systemd has it: ``NotifyAccess=main`` only
accepts the main process's, so every message must come from the master.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import textwrap
from pathlib import Path
from typing import Iterator, Tuple

import pytest
from support import recv_exactly, transform, write_config


class FakeSystemd:
    """The notification socket: each datagram with the pid of the process that sent it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)

    def receive(self, timeout: float = 10.0) -> Tuple[int, bytes]:
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("3i", payload[:12])
                return pid, data
        raise AssertionError(f"no sender credentials on {data!r}")

    def pending(self) -> bytes:
        """Whatever is queued now, without waiting (b"" when nothing)."""
        self.sock.setblocking(False)
        try:
            return self.sock.recv(65536)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    yield fake
    fake.close()


def _config(path: Path, backend_address: str) -> Path:
    return write_config(path, textwrap.dedent(f"""
        [server]
        workers = 2
        # Bounded even if a stray client (another test run, a benchmark) holds a connection.
        drain_timeout_s = 3
        [[tcp_proxy]]
        bind = "127.0.0.1:0"
        backends = ["{backend_address}"]
    """))


def test_ready_reloading_ready_stopping_all_from_the_master(
        backend_factory, proxy_factory, systemd, tmp_path):
    backend = backend_factory("echo")
    config = _config(tmp_path / "proxy.toml", backend.address)
    proxy = proxy_factory("start", "--config", str(config),
                          env=dict(os.environ, NOTIFY_SOCKET=systemd.path))

    assert systemd.receive() == (proxy.pid, b"READY=1")
    with proxy.connect() as sock:  # READY=1 came once the listener accepts
        sock.sendall(b"ready")
        assert recv_exactly(sock, 5) == transform(b"ready")

    proxy.signal(signal.SIGHUP)
    pid, message = systemd.receive()
    assert pid == proxy.pid
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", message), message
    assert systemd.receive() == (proxy.pid, b"READY=1")

    # An invalid file: the reload fails, the old generation serves on, so READY=1 again.
    config.write_text('[[tcp_proxy]]\nbind = "127.0.0.1:0"\nbackends = []\n')
    proxy.signal(signal.SIGHUP)
    assert systemd.receive()[1].startswith(b"RELOADING=1\n")
    assert systemd.receive() == (proxy.pid, b"READY=1")

    proxy.signal(signal.SIGTERM)
    assert systemd.receive() == (proxy.pid, b"STOPPING=1")
    assert proxy.process.wait(30) == 0
    assert systemd.pending() == b"", "nothing else (no worker) may notify"



def test_upgrade_moves_mainpid_to_the_new_master(backend_factory, proxy_factory, systemd,
                                                  tmp_path):
    """SIGUSR2: the old master, still systemd's main process (NotifyAccess=main), names the
    new one with MAINPID= and READY=1; afterwards the new master notifies on its own."""
    backend = backend_factory("echo")
    config = _config(tmp_path / "proxy.toml", backend.address)
    pidfile = tmp_path / "proxy.pid"
    proxy = proxy_factory("start", "--config", str(config), "--pidfile", str(pidfile),
                          env=dict(os.environ, NOTIFY_SOCKET=systemd.path))
    assert systemd.receive() == (proxy.pid, b"READY=1")
    proxy.signal(signal.SIGUSR2)
    pid, message = systemd.receive(20)
    match = re.fullmatch(rb"MAINPID=(\d+)\nREADY=1\nSTATUS=upgraded to version \S+ "
                         rb"\(master (\d+)\)", message)
    assert pid == proxy.pid and match, (pid, message)
    new = int(match.group(1))
    assert new != proxy.pid and int(match.group(2)) == new
    assert proxy.process.wait(30) == 0  # the old master drained and left
    try:
        with socket.create_connection(("127.0.0.1", proxy.port()), timeout=5) as sock:
            sock.sendall(b"after")
            assert recv_exactly(sock, 5) == transform(b"after")
        os.kill(new, signal.SIGHUP)  # the new main process reloads and says so itself
        pid, message = systemd.receive()
        assert pid == new and message.startswith(b"RELOADING=1\n")
        assert systemd.receive() == (new, b"READY=1")
    finally:
        os.kill(new, signal.SIGTERM)
    assert systemd.receive() == (new, b"STOPPING=1")
