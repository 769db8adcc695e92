"""The PROXY protocol parser against a real sender: HAProxy ``send-proxy`` / ``send-proxy-v2``.

HAProxy (in front, bound to 127.0.0.1 and ::1) relays real clients to small
Python capture servers; each capture keeps the raw bytes of every connection.
The bytes are fed to ``prefork_proxy.proxy_protocol.parse``, which must report
the real client's address and port (the client's own ``getsockname()``), the
frontend as destination, and leave exactly the client's payload after the
header.  v2 adds HAProxy's CRC32C and unique-id TLVs, and its health checks
(``check-send-proxy``) must parse as LOCAL.

Skipped, with the reason, when ``haproxy`` is not installed.  Loopback only;
HAProxy is stopped at the end of the module (bounded waits).
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Iterator, List

import pytest
from support import accepts, free_port, wait_for

from prefork_proxy.proxy_protocol import (
    ProxyHeader,
    encode_v1,
    encode_v2,
    encode_v2_local,
    parse,
)

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None,
    reason="haproxy is not installed (apt-get install haproxy; .ci/run installs it)")


class Capture:
    """A loopback TCP server keeping the raw bytes of each connection, read to EOF."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: List[bytes] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        chunks = []
        conn.settimeout(10)
        with conn:
            try:
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    if b"\nEND\n" in b"".join(chunks):
                        conn.sendall(b"ok\n")
            except OSError:
                pass  # a health check resets, a timeout ends the read: keep what came
        with self.lock:
            self.received.append(b"".join(chunks))

    def find(self, token: bytes) -> bytes:
        with self.lock:
            return next((raw for raw in self.received if token in raw), b"")

    def all(self) -> List[bytes]:
        with self.lock:
            return list(self.received)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


def host_of(variant: str) -> str:
    return "::1" if variant.endswith("six") else "127.0.0.1"


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected 0x82F63B78): test-only, a byte at a time."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


# "six": frontend and client on ::1; "accept": HAProxy receives our encoders' headers.
VARIANTS = ("v1", "v2", "v2tlv", "v1six", "v2six", "accept")


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory) -> Iterator[dict]:
    """HAProxy with one frontend per variant, each to its own capture server.

    Frontend ``accept`` has ``accept-proxy`` and relays with ``send-proxy-v2``: what
    it relays is what it understood of the header our encoders sent it.
    """
    workdir: Path = tmp_path_factory.mktemp("haproxy")
    captures = {name: Capture() for name in VARIANTS + ("check",)}
    ports = {name: free_port(host_of(name)) for name in VARIANTS}
    server_options = {"v1": "send-proxy", "v2": "send-proxy-v2",
                      "v1six": "send-proxy", "v2six": "send-proxy-v2",
                      "v2tlv": "send-proxy-v2 proxy-v2-options crc32c,unique-id",
                      "accept": "send-proxy-v2"}
    sections = []
    for name in VARIANTS:
        bind = f"[::1]:{ports[name]}" if name.endswith("six") else f"127.0.0.1:{ports[name]}"
        sections.append(f"""
frontend fe_{name}
    bind {bind}{" accept-proxy" if name == "accept" else ""}
    unique-id-format %ci:%cp
    default_backend be_{name}

backend be_{name}
    server s1 127.0.0.1:{captures[name].port} {server_options[name]}
""")
    # A backend only for health checks: HAProxy sends them the v2 LOCAL header.
    sections.append(f"""
backend be_check
    server s1 127.0.0.1:{captures['check'].port} send-proxy-v2 check check-send-proxy inter 200ms
""")
    config = workdir / "haproxy.cfg"
    config.write_text("""
global
    maxconn 100

defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
""" + "".join(sections))
    log = open(workdir / "haproxy.log", "wb")
    process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        def listening() -> bool:
            assert process.poll() is None, (workdir / "haproxy.log").read_text()
            return all(accepts(ports[name], host_of(name)) for name in VARIANTS)

        wait_for(listening, timeout=10, message="haproxy listening")
        yield {"ports": ports, "captures": captures}
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()
        for capture in captures.values():
            capture.stop()


def round_trip(haproxy: dict, name: str, header: bytes = b""):
    """One client through frontend ``name``: (client address, frontend, captured bytes, payload)."""
    host = host_of(name)
    payload = b"hello " + uuid.uuid4().hex.encode() + b"\nEND\n"
    with socket.create_connection((host, haproxy["ports"][name]), timeout=10) as client:
        client_address = client.getsockname()[:2]
        client.sendall(header + payload)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = client.recv(100)
            assert chunk, f"no reply through {name}"
            reply += chunk
        assert reply == b"ok\n"
    capture = haproxy["captures"][name]
    raw = wait_for(lambda: capture.find(payload), timeout=10, message=f"capture of {name}")
    return client_address, (host, haproxy["ports"][name]), raw, payload


@pytest.mark.parametrize("name,version,family", [
    ("v1", 1, "TCP4"), ("v2", 2, "TCP4"), ("v2tlv", 2, "TCP4"), ("v1six", 1, "TCP6"),
    ("v2six", 2, "TCP6")])
def test_haproxy_header_reports_the_real_client(haproxy, name, version, family) -> None:
    client, frontend, raw, payload = round_trip(haproxy, name)
    header = parse(raw, f"v{version}")
    assert isinstance(header, ProxyHeader), header
    assert (header.version, header.command, header.family) == (version, "PROXY", family)
    assert header.client == client
    assert header.destination == frontend
    assert raw[header.length:] == payload  # the stream starts right after the header
    # Any split of what HAProxy sent parses the same.
    for cut in range(header.length):
        assert not isinstance(parse(raw[:cut]), ProxyHeader)
    assert parse(raw[:header.length]) == header


def test_haproxy_v2_tlvs_crc32c_and_unique_id(haproxy) -> None:
    client, _, raw, _ = round_trip(haproxy, "v2tlv")
    header = parse(raw, "v2")
    tlvs = dict(header.tlvs)
    assert tlvs[0x05] == f"{client[0]}:{client[1]}".encode()  # unique-id-format %ci:%cp
    checksum = tlvs[0x03]
    assert len(checksum) == 4
    # The checksum covers the header with its own field zeroed: proves the TLV
    # boundaries and the header length are exactly HAProxy's.
    at = raw.index(b"\x03\x00\x04" + checksum) + 3
    zeroed = raw[:at] + b"\0\0\0\0" + raw[at + 4:header.length]
    assert crc32c(zeroed) == struct.unpack("!I", checksum)[0]


def test_haproxy_v2_health_check_is_local(haproxy) -> None:
    capture = haproxy["captures"]["check"]
    checks = wait_for(lambda: [raw for raw in capture.all() if raw], timeout=10,
                      message="a health check with a header")
    header = parse(checks[0], "v2")
    assert isinstance(header, ProxyHeader), (checks[0], header)
    assert header.command == "LOCAL" and header.client is None


ACCEPTED = [
    ("v1-tcp4", lambda: encode_v1(("192.0.2.7", 1234), ("198.51.100.9", 80)),
     ("192.0.2.7", 1234), ("198.51.100.9", 80)),
    ("v1-tcp6", lambda: encode_v1(("2001:db8::7", 65535), ("2001:db8::9", 0)),
     ("2001:db8::7", 65535), ("2001:db8::9", 0)),
    # Mixed families: the IPv4 side is mapped and spelled in hex groups (::ffff:c000:207).
    ("v1-mixed", lambda: encode_v1(("192.0.2.7", 1), ("::1", 2)),
     ("::ffff:192.0.2.7", 1), ("::1", 2)),
    ("v2-tcp4-tlv", lambda: encode_v2(("192.0.2.7", 1234), ("198.51.100.9", 80),
                                      [(0xE0, b"x" * 10), (0x04, b"")]),
     ("192.0.2.7", 1234), ("198.51.100.9", 80)),
    ("v2-tcp6", lambda: encode_v2(("2001:db8::7", 1), ("2001:db8::9", 2)),
     ("2001:db8::7", 1), ("2001:db8::9", 2)),
    ("v2-local", encode_v2_local, None, None),  # None: the real endpoints
    ("v1-unknown", lambda: encode_v1(None, None), None, None),
]


@pytest.mark.parametrize("make,source,destination", [(m, s, d) for _, m, s, d in ACCEPTED],
                         ids=[i for i, _, _, _ in ACCEPTED])
def test_haproxy_accept_proxy_understands_our_encoders(haproxy, make, source, destination):
    client, frontend, raw, payload = round_trip(haproxy, "accept", make())
    relayed = parse(raw, "v2")
    assert isinstance(relayed, ProxyHeader), relayed
    assert raw[relayed.length:] == payload  # HAProxy consumed exactly our header
    assert relayed.source == (source or client)
    assert relayed.destination == (destination or frontend)
