"""Every address family on both sides: IPv4, IPv6 and unix-socket listeners and backends.

The real proxy relays byte-exact for every combination of listener family and
backend family (small and > 64 KiB payloads); IPv6 listeners with ``v6only``
(the default lets a separate 0.0.0.0 listener share the port; false takes IPv4
clients too, and then refuses a 0.0.0.0 listener beside it); a backend
hostname resolving to both families (the test DNS hook) reaches both; CIDR
rules and ``source_hash`` work on IPv6 clients.  IPv6 cases skip with the
reason where ::1 cannot be bound.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict

import pytest
from support import (
    connect_address,
    free_port,
    ipv6_loopback,
    recv_exactly,
    transform,
    wait_for,
    write_config,
)

HAS_V6 = ipv6_loopback()
needs_v6 = pytest.mark.skipif(not HAS_V6, reason="::1 cannot be bound on this host")
FAMILIES = ["v4", "v6", "unix"]
LISTEN = {"v4": "127.0.0.1:0", "v6": "[::1]:0"}


def _backend(backend_factory, family: str, tmp_path: Path, mode: str = "echo",
             name: str = "backend"):
    if family == "unix":
        return backend_factory(mode, name, "--unix", str(tmp_path / f"{name}.sock"))
    if family == "v6":
        return backend_factory(mode, name, "--host", "::1")
    return backend_factory(mode, name)


def _round_trip(address: str, payload: bytes) -> bytes:
    """Send ``payload`` (from a thread, so a large one cannot deadlock) and read the echo."""
    with connect_address(address, timeout=20) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        echoed = recv_exactly(sock, len(payload))
        sender.join(20)
        return echoed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend_family", FAMILIES)
@pytest.mark.parametrize("listener_family", FAMILIES)
def test_every_listener_family_relays_to_every_backend_family_byte_exact(
        listener_family, backend_family, backend_factory, proxy_factory, tmp_path):
    if "v6" in (listener_family, backend_family) and not HAS_V6:
        pytest.skip("::1 cannot be bound on this host")
    backend = _backend(backend_factory, backend_family, tmp_path)
    bind = LISTEN.get(listener_family) or f"unix:{tmp_path / 'front.sock'}"
    config = write_config(tmp_path / "proxy.toml", f"""
[server]
workers = 2

[[tcp_proxy]]
bind = "{bind}"
backends = ["{backend.address}"]
""")
    proxy = proxy_factory("start", "--config", str(config))
    address = proxy.listeners[0]
    assert address.startswith({"v4": "127.0.0.1:", "v6": "[::1]:", "unix": "unix:/"}[
        listener_family])
    small = b"ping across families\n"
    large = os.urandom(300 * 1024)  # > 64 KiB: several splice/recv rounds each way
    for payload in (small, large, small):
        assert _round_trip(address, payload) == transform(payload)


@needs_v6
@pytest.mark.timeout(60)
def test_v6only_lets_a_v4_listener_share_the_port_and_false_takes_v4_clients(
        backend_factory, proxy_factory, tmp_path):
    four = backend_factory("tag", "four")
    six = backend_factory("tag", "six")
    port = free_port()
    config = write_config(tmp_path / "both.toml", f"""
[server]
workers = 1

[[tcp_proxy]]
bind = "0.0.0.0:{port}"
backends = ["{four.address}"]

[[tcp_proxy]]
bind = "[::]:{port}"
backends = ["{six.address}"]
""")
    proxy = proxy_factory("start", "--config", str(config))
    for host, tag in (("127.0.0.1", b"four\n"), ("::1", b"six\n")):
        with socket.create_connection((host, port), timeout=10) as sock:
            assert recv_exactly(sock, len(tag)) == tag
    proxy.stop()

    # v6only = false: one socket takes both families ...
    dual_port = free_port()
    config = write_config(tmp_path / "dual.toml", f"""
[server]
workers = 1

[[tcp_proxy]]
bind = "[::]:{dual_port}"
v6only = false
backends = ["{six.address}"]
""")
    proxy = proxy_factory("start", "--config", str(config))
    for host in ("127.0.0.1", "::1"):
        with socket.create_connection((host, dual_port), timeout=10) as sock:
            assert recv_exactly(sock, 4) == b"six\n"
    proxy.stop()

    # ... so a 0.0.0.0 listener beside it on that port is a clear error, not a split.
    config = write_config(tmp_path / "clash.toml", f"""
[[tcp_proxy]]
bind = "[::]:{dual_port}"
v6only = false
backends = ["{six.address}"]

[[tcp_proxy]]
bind = "0.0.0.0:{dual_port}"
backends = ["{four.address}"]
""")
    result = subprocess.run([sys.executable, "-m", "prefork_proxy", "start", "--config",
                             str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    assert "v6only = false takes IPv4 clients" in result.stderr + result.stdout


@needs_v6
@pytest.mark.timeout(60)
def test_a_hostname_resolving_to_both_families_reaches_both(backend_factory, proxy_factory,
                                                            tmp_path):
    # One port number free on both loopbacks: a v4 and a v6 backend behind one name.
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", port))
            break
        except OSError:
            continue
    four = backend_factory("tag", "four", "--port", str(port))
    six = backend_factory("tag", "six", "--host", "::1", "--port", str(port))
    assert (four.port, six.port) == (port, port)
    env = dict(os.environ, PREFORK_PROXY_TEST_DNS=json.dumps(
        {"both.test": {"addresses": ["127.0.0.1", "::1"]}}))
    config = write_config(tmp_path / "proxy.toml", f"""
[server]
workers = 1

[[tcp_proxy]]
bind = "[::1]:0"
backends = ["both.test:{port}"]
resolve_interval_ms = 200
""")
    proxy = proxy_factory("start", "--config", str(config), env=env)
    seen: Dict[bytes, int] = {}

    def both_seen() -> bool:
        with connect_address(proxy.listeners[0]) as sock:
            line = sock.recv(16)
            seen[line] = seen.get(line, 0) + 1
        return {b"four\n", b"six\n"} <= set(seen)

    wait_for(both_seen, 20, message="both addresses of both.test served")


@needs_v6
@pytest.mark.timeout(60)
def test_cidr_rules_and_source_hash_on_ipv6_clients(backend_factory, proxy_factory, tmp_path):
    tags = [backend_factory("tag", f"b{i}") for i in range(3)]
    config = write_config(tmp_path / "proxy.toml", f"""
[server]
workers = 2

[[tcp_proxy]]
bind = "[::1]:0"
allow = ["::1/128"]
balance = "source_hash"
backends = [{", ".join(f'"{b.address}"' for b in tags)}]

[[tcp_proxy]]
bind = "[::1]:0"
deny = ["::/0"]
backends = ["{tags[0].address}"]

[[tcp_proxy]]
bind = "[::1]:0"
allow = ["2001:db8::/32"]
backends = ["{tags[0].address}"]
""")
    proxy = proxy_factory("start", "--config", str(config))
    allowed, denied, not_listed = proxy.listeners
    answers = set()
    for _ in range(30):  # one client address: always the same backend
        with connect_address(allowed) as sock:
            answers.add(sock.recv(16))
    assert len(answers) == 1 and answers <= {b"b0\n", b"b1\n", b"b2\n"}, answers
    for address in (denied, not_listed):
        # Refused: reset (the RST can beat connect()'s return on loopback) or closed,
        # before any backend byte.
        try:
            with connect_address(address) as sock:
                assert sock.recv(16) == b""
        except ConnectionError:
            pass
    wait_for(lambda: proxy.log.count("denied") >= 2 or proxy.log.count("403") >= 2, 10,
             message="both refusals logged")
