"""Who gets in, as whom (issue 12), end to end: the real proxy, real backends, real peers.

- ``accept_proxy`` v1/v2 behind HAProxy (``send-proxy`` / ``send-proxy-v2``): the
  backend (tests/backends.py ``whois``, which reports the PROXY header it was
  told) sees the original client's address and port;
- ``send_proxy`` v1/v2 -> HAProxy ``accept-proxy`` (which relays with
  ``send-proxy-v2`` to a whois backend), and prefork -> prefork: the client's
  real address arrives;
- ``allow``/``deny`` refuse with an RST;
- ``max_connections_per_source`` = 10 across 3 workers: exactly 10 through, the
  11th refused, one closed lets one more in; a SIGKILLed worker's holdings are
  free again within 1 s;
- slowloris on the PROXY header (500 clients, a byte a second): each closed at
  ``proxy_timeout_ms`` ±20% while a normal client's median round trip stays under 20 ms.

Clients use distinct loopback sources (127.0.0.2-127.0.0.9) so "the client's
address" is never the proxy's own.  Needs the relay's pre-connect phase
(``RelayLoop.submit(..., admission=, choose=)``); HAProxy tests skip with the
reason when ``haproxy`` is absent.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
from support import accepts, free_port, transform, wait_for, write_config

from prefork_proxy.gate import relay_supports_admission

pytestmark = pytest.mark.skipif(
    not relay_supports_admission(),
    reason="the relay has no pre-connect phase yet (RelayLoop.submit(..., admission=, "
           "choose=), helper relay-seam)")
needs_haproxy = pytest.mark.skipif(
    shutil.which("haproxy") is None,
    reason="haproxy is not installed (apt-get install haproxy; .ci/run installs it)")

PAYLOAD = b"hello through\n"


def _config(path: Path, listeners: str, workers: int = 2) -> str:
    return str(write_config(path, f"[server]\nworkers = {workers}\n\n{listeners}"))


def _listener(backends: str, keys: str = "") -> str:
    return f'[[tcp_proxy]]\nbind = "127.0.0.1:0"\nbackends = {backends}\n{keys}\n'


def _connect(port: int, source: str = "127.0.0.2", host: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection((host, port), timeout=10, source_address=(source, 0))


def _told(sock: socket.socket, payload: bytes = PAYLOAD) -> bytes:
    """Send ``payload``; the whois backend's first line (what it was told), checking the echo."""
    sock.sendall(payload)
    data = b""
    while b"\n" not in data or len(data.partition(b"\n")[2]) < len(payload):
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"EOF after {data!r}")
        data += chunk
    line, _, rest = data.partition(b"\n")
    assert rest == transform(payload)
    return line


def _expected(sock: socket.socket) -> bytes:
    ip, port = sock.getsockname()[:2]
    return f"FROM {ip} {port}".encode()


def _refused(sock: socket.socket) -> bool:
    """True if the proxy closed ``sock`` with an RST (after we sent a byte), False if echoed."""
    try:
        sock.sendall(b"x")
        data = sock.recv(64)
    except ConnectionResetError:
        return True
    if not data:
        raise AssertionError("closed with a FIN, expected an RST or an echo")
    return False


# --------------------------------------------------------------------------- HAProxy


@pytest.fixture
def haproxy(tmp_path) -> Iterator:
    """``start(sections, ports)``: HAProxy with these sections, up once every port answers."""
    started: List[subprocess.Popen] = []

    def start(sections: str, ports: List[int]) -> None:
        config = tmp_path / f"haproxy-{len(started)}.cfg"
        config.write_text("global\n    maxconn 200\n\ndefaults\n    mode tcp\n"
                          "    timeout connect 5s\n    timeout client 10s\n"
                          "    timeout server 10s\n" + sections)
        log_path = tmp_path / f"haproxy-{len(started)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log,
                                       stderr=subprocess.STDOUT)
        started.append(process)

        def listening() -> bool:
            assert process.poll() is None, log_path.read_text()
            return all(accepts(port) for port in ports)

        wait_for(listening, timeout=10, message="haproxy listening")

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@needs_haproxy
@pytest.mark.parametrize("version, option", [("v1", "send-proxy"), ("v2", "send-proxy-v2")])
def test_accept_proxy_behind_haproxy_gives_the_backend_the_original_client(
        version, option, haproxy, backend_factory, proxy_factory, tmp_path):
    backend = backend_factory("whois")
    proxy = proxy_factory("start", "--config", _config(
        tmp_path / "p.toml", _listener(f'["{backend.address}"]',
                                       f'accept_proxy = "{version}"\nsend_proxy = "v1"')))
    front = free_port()
    haproxy(f"frontend fe\n    bind 127.0.0.1:{front}\n    default_backend be\n"
            f"backend be\n    server s1 127.0.0.1:{proxy.port()} {option}\n", [front])
    for source in ("127.0.0.2", "127.0.0.3"):
        with _connect(front, source) as client:
            assert _told(client) == _expected(client)


@needs_haproxy
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_to_haproxy_accept_proxy_reports_the_real_client(
        version, haproxy, backend_factory, proxy_factory, tmp_path):
    backend = backend_factory("whois")
    port = free_port()
    haproxy(f"frontend fe\n    bind 127.0.0.1:{port} accept-proxy\n    default_backend be\n"
            f"backend be\n    server s1 {backend.address} send-proxy-v2\n", [port])
    proxy = proxy_factory("start", "--config", _config(
        tmp_path / "p.toml", _listener(f'["127.0.0.1:{port}"]', f'send_proxy = "{version}"')))
    for source in ("127.0.0.2", "127.0.0.4"):
        with _connect(proxy.port(), source) as client:
            assert _told(client) == _expected(client)


@pytest.mark.parametrize("first, second", [("v1", "v2"), ("v2", "v1")])
def test_prefork_to_prefork_chain_carries_the_client_address(
        first, second, backend_factory, proxy_factory, tmp_path):
    backend = backend_factory("whois")
    inner = proxy_factory("start", "--config", _config(
        tmp_path / "inner.toml", _listener(f'["{backend.address}"]',
                                           f'accept_proxy = "{first}"\n'
                                           f'trusted_proxies = ["127.0.0.1/32"]\n'
                                           f'send_proxy = "{second}"')))
    outer = proxy_factory("start", "--config", _config(
        tmp_path / "outer.toml", _listener(f'["127.0.0.1:{inner.port()}"]',
                                           f'send_proxy = "{first}"')))
    with _connect(outer.port(), "127.0.0.5") as client:
        assert _told(client) == _expected(client)
    # Straight to the inner one from an untrusted source: a direct client, no header needed.
    with _connect(inner.port(), "127.0.0.6") as client:
        assert _told(client) == _expected(client)


# --------------------------------------------------------------------------- rules and limits


def test_allow_and_deny_refuse_with_an_rst(backend_factory, proxy_factory, tmp_path):
    backend = backend_factory("echo")
    proxy = proxy_factory("start", "--config", _config(
        tmp_path / "p.toml", _listener(f'["{backend.address}"]',
                                       'allow = ["127.0.0.0/29"]\ndeny = ["127.0.0.3/32"]')))
    for source, refused in (("127.0.0.2", False), ("127.0.0.3", True), ("127.0.0.9", True),
                            ("127.0.0.4", False)):
        try:
            client = _connect(proxy.port(), source)
        except ConnectionResetError:
            # On loopback the proxy can accept and reset before connect() returns:
            # the RST then surfaces from connect itself.  It is still an RST.
            assert refused, source
            continue
        with client:
            assert _refused(client) is refused, source


def _server_sockets(proxy_port: int) -> Dict[int, int]:
    """Client port -> inode of the proxy's accepted socket for it (from /proc/net/tcp)."""
    found = {}
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            if state == "01" and int(local.split(":")[1], 16) == proxy_port:
                found[int(remote.split(":")[1], 16)] = inode
    return found


def _holder(pids: List[int], inode: int) -> Optional[int]:
    """The worker holding the socket ``inode``."""
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def _open_through(port: int, source: str, count: int) -> List[socket.socket]:
    """Open ``count`` connections at once; the ones that got through (echoed), in order."""
    clients = []
    for _ in range(count):
        try:
            clients.append(_connect(port, source))
        except ConnectionResetError:
            pass  # reset while connecting (a refused one's RST raced the handshake): refused
    through = []
    for client in clients:
        if _refused(client):
            client.close()
        else:
            through.append(client)
    return through


def test_per_source_limit_is_exact_across_three_workers_and_survives_sigkill(
        backend_factory, proxy_factory, tmp_path):
    backend = backend_factory("echo")
    proxy = proxy_factory("start", "--config", _config(
        tmp_path / "p.toml", _listener(f'["{backend.address}"]',
                                       "max_connections_per_source = 10"), workers=3))
    pids = proxy.wait_workers(3)
    port = proxy.port()
    through = _open_through(port, "127.0.0.7", 30)
    assert len(through) == 10
    # The 11th is refused; another source is not limited by this one.
    assert _open_through(port, "127.0.0.7", 1) == []
    other = _open_through(port, "127.0.0.8", 3)
    assert len(other) == 3
    # Closing one lets exactly one more in (the release is asynchronous: wait for it).
    through.pop().close()
    again = wait_for(lambda: _open_through(port, "127.0.0.7", 1), timeout=5,
                     message="a slot freed by a close")
    through += again
    assert _open_through(port, "127.0.0.7", 1) == []
    # SIGKILL the worker holding the most of them: the source gets that many back within 1 s.
    inodes = _server_sockets(port)
    holders: Dict[int, List[socket.socket]] = {}
    for client in through:
        pid = _holder(pids, inodes[client.getsockname()[1]])
        holders.setdefault(pid, []).append(client)
    victim = max(holders, key=lambda pid: len(holders[pid]))
    held = len(holders[victim])
    assert victim is not None and held >= 1
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    def all_back() -> Optional[List[socket.socket]]:
        got = _open_through(port, "127.0.0.7", held)
        if len(got) == held:
            return got
        for client in got:  # partly: give them back and try again
            client.close()
        return None

    back = wait_for(all_back, timeout=5, message=f"{held} connections back after the SIGKILL")
    assert time.monotonic() - killed_at < 1.0, "the dead worker's holdings took over 1 s"
    assert _open_through(port, "127.0.0.7", 1) == []  # and not one more
    for client in through + back + other:
        client.close()


# --------------------------------------------------------------------------- slowloris


def test_slowloris_on_the_header_is_cut_at_proxy_timeout_and_others_are_served(
        backend_factory, proxy_factory, tmp_path):
    count = 500  # ~6 s: cheap enough for the figure
    timeout_ms = 2000
    backend = backend_factory("whois")
    proxy = proxy_factory("start", "--config", _config(
        tmp_path / "p.toml", _listener(f'["{backend.address}"]',
                                       f'accept_proxy = "v1"\nproxy_timeout_ms = {timeout_ms}'
                                       '\ntrusted_proxies = ["127.0.0.2/32"]\nsend_proxy = "v1"')))
    port = proxy.port()
    header = b"PROXY TCP4 192.0.2.1 127.0.0.1 1234 80\r\n"
    selector = selectors.DefaultSelector()
    opened: Dict[socket.socket, float] = {}
    for _ in range(count):
        sock = _connect(port, "127.0.0.2")
        sock.setblocking(False)
        opened[sock] = time.monotonic()
        selector.register(sock, selectors.EVENT_READ)
    closed: Dict[socket.socket, float] = {}
    sent = 0
    next_byte = time.monotonic()
    trips: List[float] = []
    deadline = time.monotonic() + timeout_ms / 1000 * 2 + 5
    while len(closed) < count and time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_byte:  # one more byte of the header from each live slow client
            for sock in opened:
                if sock not in closed:
                    try:
                        sock.send(header[sent:sent + 1])
                    except OSError:
                        pass
            sent += 1
            next_byte = now + 1.0
        # A normal (untrusted, so no header) client meanwhile.
        started = time.monotonic()
        with _connect(port, "127.0.0.3") as client:
            assert _told(client) == _expected(client)
        trips.append(time.monotonic() - started)
        for key, _ in selector.select(0.05):
            sock = key.fileobj
            try:
                data = sock.recv(64)
            except ConnectionResetError:
                data = b""
            assert data == b"", f"a slow client was served: {data!r}"
            closed[sock] = time.monotonic()
            selector.unregister(sock)
    assert len(closed) == count
    lifetimes = [closed[s] - opened[s] for s in closed]
    low, high = timeout_ms / 1000 * 0.8, timeout_ms / 1000 * 1.2
    assert all(low <= t <= high for t in lifetimes), (min(lifetimes), max(lifetimes))
    assert statistics.median(trips) < 0.020, statistics.median(trips)
    for sock in opened:
        sock.close()


# --------------------------------------------------------------------------- SNI routing
# Served since issue 13's route pools: the real-peer test (openssl s_server/s_client,
# Python ssl, curl) and the slow-hello test live in tests/integration/test_sni.py.
