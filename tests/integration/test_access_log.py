"""The access log of the real proxy: one line per connection, exact bytes, status/term.

2 workers; connections of known sizes (some over 64 KiB, so splice runs) and a
mix of endings: normal, a client's reset (SO_LINGER 0), a backend's reset, a
refused backend (502 SC), a client denied by ``deny`` (403 PR), and one still
open at a graceful stop whose drain deadline passes (KD).  Each line is found
by its client's port; its bytes equal what that client counted.  A rename +
SIGUSR1 moves the writing to a new file: no line lost or doubled.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import threading
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from support import closed_port, recv_exactly, transform, wait_for, write_config

SIZES = (1, 100, 1500, 10_000, 70_000, 150_000)
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> Dict[str, object]:
    """A tiny logfmt reader: ``k=v`` or ``k="quoted \\" value"``; numbers as ints/floats."""
    fields: Dict[str, object] = {}
    for key, raw in _PAIR.findall(line):
        value: object = json.loads(raw) if raw.startswith('"') else raw
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
            value = int(value)
        fields[key] = None if value == "-" else value
    return fields


def read_lines(*paths: Path) -> List[str]:
    lines: List[str] = []
    for path in paths:
        if path.exists():
            lines += [line for line in path.read_text().splitlines() if line]
    return lines


def parse(line: str, fmt: str) -> Dict[str, object]:
    return json.loads(line) if fmt == "json" else parse_logfmt(line)


def one(port: int, size: int) -> Tuple[int, int, int]:
    """Send ``size`` bytes, half-close, read the echo to EOF: (client port, sent, received)."""
    message = bytes(range(256)) * (size // 256 + 1)
    message = message[:size]
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        local = sock.getsockname()[1]
        sender = threading.Thread(target=lambda: (sock.sendall(message),
                                                  sock.shutdown(socket.SHUT_WR)))
        sender.start()
        chunks = []
        while True:
            chunk = sock.recv(262144)
            if not chunk:
                break
            chunks.append(chunk)
        sender.join(20)
    assert b"".join(chunks) == transform(message)
    return local, size, size


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_access_log_one_line_per_connection(fmt, backend_factory, proxy_factory, tmp_path):
    echo = backend_factory("echo")
    resetter = backend_factory("reset", "r", "--reset-after", str(128 * 1024))
    access = tmp_path / "access.log"
    with closed_port() as dead_port:
        dead = f"127.0.0.1:{dead_port}"
        text = f"""
[server]
workers = 2
drain_timeout_s = 1
access_log = "{access}"
access_log_format = "{fmt}"

[[tcp_proxy]]
name = "front"
bind = "127.0.0.1:0"
backends = ["{echo.address}"]

[[tcp_proxy]]
name = "dead"
bind = "127.0.0.1:0"
backends = ["{dead}"]

[[tcp_proxy]]
name = "guarded"
bind = "127.0.0.1:0"
backends = ["{echo.address}"]
deny = ["127.0.0.0/8"]

[[tcp_proxy]]
name = "resets"
bind = "127.0.0.1:0"
backends = ["{resetter.address}"]
"""
        path = write_config(tmp_path / "proxy.toml", text)
        proxy = proxy_factory("start", "--config", str(path))
        proxy.wait_workers(2)
        front, dead_l, guarded, resets = (proxy.port(i) for i in range(4))
        # term, status, exact (client_in, client_out) or None, by client port
        expected: Dict[int, Tuple[str, int, object]] = {}

        for index in range(60):  # normal endings, sizes up to 150 KB (splice)
            local, sent, received = one(front, SIZES[index % len(SIZES)])
            expected[local] = ("--", 200, (sent, received))

        # A client that resets mid-stream (SO_LINGER 0 then close: an RST).
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", front), timeout=10)
            sock.sendall(b"x" * 1000)
            assert recv_exactly(sock, 1000) == transform(b"x" * 1000)
            local = sock.getsockname()[1]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            expected[local] = ("CD", 200, (1000, 1000))

        # A backend that resets after 128 KiB.
        sock = socket.create_connection(("127.0.0.1", resets), timeout=10)
        local = sock.getsockname()[1]
        try:
            sock.sendall(b"y" * (512 * 1024))
            while sock.recv(65536):
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.close()
        expected[local] = ("SD", 200, None)

        # A refused backend: 502 SC; a denied client: 403 PR.
        for port, term, status in ((dead_l, "SC", 502), (guarded, "PR", 403)):
            sock = socket.socket()
            sock.settimeout(10)
            sock.bind(("127.0.0.1", 0))  # its port is known even if the connect is reset
            local = sock.getsockname()[1]
            try:
                sock.connect(("127.0.0.1", port))
                assert sock.recv(10) == b""
            except ConnectionResetError:  # the refusal's RST, during or after the handshake
                pass
            sock.close()
            expected[local] = (term, status, (0, 0))

        wait_for(lambda: len(read_lines(access)) >= len(expected), 15,
                 message="one access log line per connection")

        # Rotation: rename, SIGUSR1, both workers reopen; later lines go to the new file.
        rotated = tmp_path / "access.log.1"
        access.rename(rotated)
        proxy.signal(signal.SIGUSR1)
        wait_for(lambda: proxy.log.count("access log ") >= 2 and
                 proxy.log.count(f"access log {access} reopened") >= 2, 10,
                 message="both workers reopened the access log")
        after = []
        for index in range(20):
            local, sent, received = one(front, SIZES[index % len(SIZES)])
            expected[local] = ("--", 200, (sent, received))
            after.append(local)

        # One still open at a graceful stop: cut at the drain deadline (1 s).
        held = socket.create_connection(("127.0.0.1", front), timeout=10)
        held.sendall(b"z" * 500)
        assert recv_exactly(held, 500) == transform(b"z" * 500)
        expected[held.getsockname()[1]] = ("KD", 200, (500, 500))
        proxy.stop()
        held.close()

    lines = read_lines(rotated, access)
    records = [parse(line, fmt) for line in lines]
    by_port = {}
    for record in records:
        by_port.setdefault(int(str(record["client"]).rsplit(":", 1)[1]), []).append(record)
    assert len(lines) == len(expected), (len(lines), len(expected))
    assert len({record["conn"] for record in records}) == len(records)  # ids unique
    assert {record["worker"] for record in records} <= {0, 1}
    new_ports = {int(str(parse(line, fmt)["client"]).rsplit(":", 1)[1])
                 for line in read_lines(access)}
    assert set(after) <= new_ports  # written after the reopen: in the new file
    for port, (term, status, counts) in expected.items():
        assert len(by_port.get(port, [])) == 1, (port, by_port.get(port))
        record = by_port[port][0]
        assert (record["term"], record["status"]) == (term, status), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(record["ts"]))
        if counts is not None:
            assert (record["client_in"], record["client_out"]) == counts, record
        if status == 200 and term in ("--", "KD", "CD"):
            assert record["backend"] == echo.address and record["upstream"] == echo.address
            assert (record["backend_out"], record["backend_in"]) == counts, record
            assert record["attempts"] == 1
        if status == 502:
            assert record["backend"] is None and dead in str(record["upstream"])
            assert record["reason"] == "connect_refused"
        if status == 403:
            assert record["reason"] == "denied" and record["listener"] == "guarded"


@pytest.mark.timeout(60)
def test_access_log_sni_and_proxy_header_client(backend_factory, proxy_factory, tmp_path):
    """``sni=`` from the ClientHello (routed and refused), ``client=`` from a PROXY header."""
    from test_sni import client_hello

    echo = backend_factory("echo")
    access = tmp_path / "access.log"
    path = write_config(tmp_path / "proxy.toml", f"""
[server]
workers = 1
access_log = "{access}"

[[tcp_proxy]]
name = "tls"
bind = "127.0.0.1:0"
sni_timeout_ms = 5000

[[tcp_proxy.routes]]
server_names = ["a.test"]
backends = ["{echo.address}"]

[[tcp_proxy]]
name = "pp"
bind = "127.0.0.1:0"
accept_proxy = "v1"
backends = ["{echo.address}"]
""")
    proxy = proxy_factory("start", "--config", str(path))
    proxy.wait_workers(1)
    hello = client_hello("a.test")
    with socket.create_connection(("127.0.0.1", proxy.port(0)), timeout=10) as sock:
        sock.sendall(hello)
        assert recv_exactly(sock, len(hello)) == transform(hello)
    with socket.create_connection(("127.0.0.1", proxy.port(0)), timeout=10) as sock:
        sock.sendall(client_hello("b.test"))
        try:
            assert sock.recv(10) == b""
        except ConnectionResetError:
            pass
    header, data = b"PROXY TCP4 203.0.113.5 127.0.0.1 4444 80\r\n", b"after the header"
    with socket.create_connection(("127.0.0.1", proxy.port(1)), timeout=10) as sock:
        sock.sendall(header + data)
        assert recv_exactly(sock, len(data)) == transform(data)
    wait_for(lambda: len(read_lines(access)) == 3, 10, message="three access log lines")
    records = [parse_logfmt(line) for line in read_lines(access)]  # in order of ending
    (routed,) = [r for r in records if r["listener"] == "tls" and r["status"] == 200]
    (refused,) = [r for r in records if r["listener"] == "tls" and r["status"] != 200]
    (behind,) = [r for r in records if r["listener"] == "pp"]
    assert (routed["sni"], routed["status"], routed["term"]) == ("a.test", 200, "--")
    assert routed["client_in"] == routed["backend_out"] == len(hello)
    assert (refused["sni"], refused["status"], refused["term"], refused["reason"]) == \
        ("b.test", 403, "PR", "sni_no_route")
    assert behind["client"] == "203.0.113.5:4444" and behind["listener"] == "pp"
    assert behind["client_in"] == len(header) + len(data)
    assert behind["backend_out"] == behind["client_out"] == len(data)
