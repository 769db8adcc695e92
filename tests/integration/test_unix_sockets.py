"""Unix-socket listeners and backends (``unix:/path``), with the real proxy.

Listeners: the file's mode and owner before serving; a stale file removed only
when nothing accepts on it, a live one (or a non-socket) refusing the start;
the same socket kept across a reload (a client connected before SIGHUP and one
queued during it are both served), its file removed when a reload drops it
and back when one adds it, removed at the final stop.  Backends: relays,
failover from a missing path (counted as ``refused``), health probes, and
PROXY headers: a unix backend still gets the client's address, a unix client
sends v2 LOCAL / v1 UNKNOWN, and a v2 header carrying UNIX addresses is taken.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

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

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _start_fails(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefork_proxy", "start", "--config",
                           str(config)], capture_output=True, text=True, timeout=30)


def _echo_once(address: str, payload: bytes = b"hello unix\n") -> None:
    with connect_address(address) as sock:
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == transform(payload)


@pytest.mark.timeout(60)
def test_unix_listener_file_mode_owner_stale_file_and_final_removal(backend_factory,
                                                                    proxy_factory, tmp_path,
                                                                    request):
    backend = backend_factory("echo")
    user = ""
    if os.geteuid() == 0:
        # Root: the file must belong to the serving user, who removes it at the stop,
        # so it needs a directory of its own (as /run/prefork-proxy would be).
        user = 'user = "nobody"\n'
        runtime = Path(tempfile.mkdtemp(prefix="unixv6-"))
        os.chown(runtime, pwd.getpwnam("nobody").pw_uid, -1)
        request.addfinalizer(lambda: shutil.rmtree(runtime, ignore_errors=True))
        path = runtime / "front.sock"
    else:
        path = tmp_path / "front.sock"
    # A crash's leftover: a socket file nothing listens on (bound, closed, never unlinked).
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(path))
    leftover.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    config = write_config(tmp_path / "proxy.toml", f"""
[server]
workers = 2
{user}
[[tcp_proxy]]
bind = "unix:{path}"
mode = "0640"
backends = ["{backend.address}"]
""")
    proxy = proxy_factory("start", "--config", str(config))
    assert proxy.listeners == [f"unix:{path}"]
    assert "removed a stale socket file" in proxy.log
    info = os.lstat(path)
    assert stat.S_IMODE(info.st_mode) == 0o640
    owner = pwd.getpwnam("nobody").pw_uid if user else os.geteuid()
    assert info.st_uid == owner
    for _ in range(10):
        _echo_once(f"unix:{path}")
    assert proxy.stop() == 0
    assert not path.exists(), "the final stop removes the socket file"


@pytest.mark.timeout(60)
def test_a_live_socket_file_or_a_plain_file_at_the_path_refuses_the_start(backend_factory,
                                                                         tmp_path):
    backend = backend_factory("echo")
    path = tmp_path / "taken.sock"
    config = write_config(tmp_path / "proxy.toml", f"""
[[tcp_proxy]]
bind = "unix:{path}"
backends = ["{backend.address}"]
""")
    with socket.socket(socket.AF_UNIX) as other:  # another process's live listener
        other.bind(str(path))
        other.listen(1)
        result = _start_fails(config)
        assert result.returncode == 1, result.stderr
        assert f"cannot bind unix:{path}: address already in use" in result.stderr
        assert path.exists(), "a live socket's file is never removed"
        other.settimeout(5)
        while True:  # the in-use probe connected once; nothing else arrives
            try:
                other.setblocking(False)
                other.accept()[0].close()
            except BlockingIOError:
                break
    path.unlink()
    path.write_text("not a socket")
    result = _start_fails(config)
    assert result.returncode == 1
    assert "the path exists and is not a socket" in result.stderr
    assert path.read_text() == "not a socket"


@pytest.mark.timeout(90)
def test_reload_keeps_the_unix_socket_and_drops_or_adds_its_file(backend_factory,
                                                                  proxy_factory, tmp_path):
    backend = backend_factory("echo")
    path = tmp_path / "front.sock"
    other = tmp_path / "other.sock"
    config_path = tmp_path / "proxy.toml"

    def write(*paths: Path) -> None:
        sections = "".join(f"""
[[tcp_proxy]]
bind = "unix:{p}"
backends = ["{backend.address}"]
""" for p in paths)
        write_config(config_path, "[server]\nworkers = 2\n" + sections)

    write(path, other)
    proxy = proxy_factory("start", "--config", str(config_path))
    inode = os.lstat(path).st_ino
    before = connect_address(f"unix:{path}")
    before.sendall(b"one")
    assert recv_exactly(before, 3) == transform(b"one")
    reloads = proxy.log.count("reloaded: generation")
    write(path)  # other.sock removed
    proxy.signal(signal.SIGHUP)
    during = connect_address(f"unix:{path}")  # queued while the generations change
    during.sendall(b"two")
    wait_for(lambda: not other.exists(), 20, message="the removed listener's file unlinked")
    wait_for(lambda: proxy.log.count("reloaded: generation") > reloads, 20,
             message="reload done")
    assert recv_exactly(during, 3) == transform(b"two")
    before.sendall(b"three")  # the pre-reload client still relays through the old worker
    assert recv_exactly(before, 5) == transform(b"three")
    before.close()
    during.close()
    assert os.lstat(path).st_ino == inode, "same path, same socket: its file was not recreated"
    _echo_once(f"unix:{path}")
    with pytest.raises(FileNotFoundError):
        connect_address(f"unix:{other}")

    write(path, other)  # added back: bound afresh, served
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: other.exists(), 20, message="the re-added listener's file")
    wait_for(lambda: _serves(f"unix:{other}"), 20, message="the re-added listener serves")
    assert proxy.stop() == 0
    assert not path.exists() and not other.exists()


def _serves(address: str) -> bool:
    try:
        _echo_once(address)
        return True
    except OSError:
        return False


@pytest.mark.timeout(60)
def test_unix_backends_fail_over_count_refused_and_are_health_checked(backend_factory,
                                                                      proxy_factory, tmp_path):
    live = backend_factory("echo", "live", "--unix", str(tmp_path / "live.sock"))
    missing = f"unix:{tmp_path / 'missing.sock'}"
    pidfile = tmp_path / "proxy.pid"
    config = write_config(tmp_path / "proxy.toml", f"""
[server]
workers = 1
pidfile = "{pidfile}"

[[tcp_proxy]]
name = "front"
bind = "127.0.0.1:0"
fall = 0
backends = ["{missing}", "{live.address}"]

[[tcp_proxy]]
name = "checked"
bind = "127.0.0.1:0"
backends = ["{missing}", "{live.address}"]
health_check = {{ interval_ms = 100, timeout_ms = 100, fall = 1, rise = 1 }}
""")
    proxy = proxy_factory("start", "--config", str(config))
    for _ in range(6):  # round robin: every other client tries the missing path first
        _echo_once(proxy.listeners[0])
    status_path = f"{pidfile}.status.json"

    def counters() -> dict:
        with open(status_path) as file:
            return json.load(file)["counters"]["backends"]

    # The master writes the status file (by rename) on its first status tick.
    wait_for(lambda: os.path.exists(status_path), 10, message="the status file")
    wait_for(lambda: counters()[f"front|{missing}"]["connect_errors_total"]["refused"] == 3,
             10, message="3 connects to the missing path counted as refused")
    assert counters()[f"front|{live.address}"]["connections_total"] == 6
    assert counters()[f"front|{missing}"]["connect_errors_total"]["other"] == 0
    wait_for(lambda: f"backend {missing} down" in proxy.log, 10,
             message="the health check marks the missing path down")
    wait_for(lambda: counters()[f"checked|{missing}"]["up"] == 0
             and counters()[f"checked|{live.address}"]["up"] == 1, 10,
             message="health as status shows it")
    for _ in range(4):  # the down one is skipped: no error, no failover
        _echo_once(proxy.listeners[1])
    assert counters()[f"checked|{missing}"]["connect_errors_total"]["refused"] == 0


def _capture_server(path: Path) -> "tuple[socket.socket, list]":
    """A unix backend in this process that records the first bytes of each connection."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(8)
    server.settimeout(10)
    got: list = []

    def serve() -> None:
        try:
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(10)
                    data = b""
                    while not data.endswith(b"end"):
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    got.append(data)
                    conn.sendall(b"ok")
        except OSError:
            return

    threading.Thread(target=serve, daemon=True).start()
    return server, got


@pytest.mark.timeout(60)
def test_proxy_headers_to_from_and_about_unix_sockets(backend_factory, proxy_factory, tmp_path):
    whois = backend_factory("whois", "whois", "--unix", str(tmp_path / "whois.sock"))
    server, got = _capture_server(tmp_path / "capture.sock")
    config = write_config(tmp_path / "proxy.toml", f"""
[server]
workers = 1

[[tcp_proxy]]
bind = "127.0.0.1:0"
send_proxy = "v1"
backends = ["{whois.address}"]

[[tcp_proxy]]
bind = "unix:{tmp_path / 'v2.sock'}"
send_proxy = "v2"
backends = ["unix:{tmp_path / 'capture.sock'}"]

[[tcp_proxy]]
bind = "unix:{tmp_path / 'v1.sock'}"
send_proxy = "v1"
backends = ["unix:{tmp_path / 'capture.sock'}"]

[[tcp_proxy]]
bind = "127.0.0.1:0"
accept_proxy = "v2"
backends = ["{whois.address}"]
""")
    proxy = proxy_factory("start", "--config", str(config))
    try:
        # A TCP client to a unix backend: the header carries the client's address.
        with connect_address(proxy.listeners[0]) as sock:
            port = sock.getsockname()[1]
            assert recv_exactly(sock, len(f"FROM 127.0.0.1 {port}\n")) == \
                f"FROM 127.0.0.1 {port}\n".encode()
        # A unix client has no address: v2 LOCAL (command 0, family UNSPEC, no block) ...
        for address, header in ((proxy.listeners[1], V2_SIGNATURE + b"\x20\x00\x00\x00"),
                                (proxy.listeners[2], b"PROXY UNKNOWN\r\n")):
            with connect_address(address) as sock:
                sock.sendall(b"payload end")
                assert recv_exactly(sock, 2) == b"ok"
            assert got.pop(0) == header + b"payload end"
        # A v2 header with UNIX addresses is accepted; the real ends stand (no IP in it).
        block = struct.pack("!108s108s", b"/run/client.sock", b"/run/server.sock")
        header = V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", len(block)) + block
        with connect_address(proxy.listeners[3]) as sock:
            sock.sendall(header + b"after")
            assert recv_exactly(sock, 5) == b"NONE\n"
            assert recv_exactly(sock, 5) == transform(b"after")
    finally:
        server.close()


@pytest.mark.skipif(not ipv6_loopback(), reason="::1 cannot be bound on this host")
@pytest.mark.timeout(60)
def test_a_reload_applies_a_new_mode_and_refuses_to_flip_v6only(backend_factory,
                                                                 proxy_factory, tmp_path):
    backend = backend_factory("echo")
    path = tmp_path / "front.sock"
    port = free_port()
    config_path = tmp_path / "proxy.toml"

    def write(mode: str, v6only: str) -> None:
        write_config(config_path, f"""
[server]
workers = 1

[[tcp_proxy]]
bind = "unix:{path}"
mode = "{mode}"
backends = ["{backend.address}"]

[[tcp_proxy]]
bind = "[::]:{port}"
v6only = {v6only}
backends = ["{backend.address}"]
""")

    write("0660", "true")
    proxy = proxy_factory("start", "--config", str(config_path))
    inode = os.lstat(path).st_ino
    write("0600", "true")
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded: generation 2" in proxy.log, 20, message="reload 2")
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert os.lstat(path).st_ino == inode  # the same socket, its mode changed
    write("0600", "false")
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed, still serving generation 2" in proxy.log, 20,
             message="the v6only flip refused")
    assert "cannot change v6only of [::]:" in proxy.log
    _echo_once(f"unix:{path}")


def _tls_client_hello(server_name: str) -> bytes:
    """The first flight of Python's TLS client for ``server_name`` (no server needed)."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


@pytest.mark.timeout(60)
def test_sni_routes_on_a_unix_listener_reach_unix_and_tcp_backends(backend_factory,
                                                                    proxy_factory, tmp_path):
    db = backend_factory("tag", "db", "--unix", str(tmp_path / "db.sock"))
    api = backend_factory("tag", "api")
    fallback = backend_factory("tag", "fallback", "--unix", str(tmp_path / "fallback.sock"))
    config = write_config(tmp_path / "proxy.toml", f"""
[server]
workers = 2

[[tcp_proxy]]
bind = "unix:{tmp_path / 'front.sock'}"
backends = ["{fallback.address}"]

[[tcp_proxy.routes]]
server_names = ["db.internal"]
backends = ["{db.address}"]

[[tcp_proxy.routes]]
server_names = ["*.api.test"]
backends = ["{api.address}"]
""")
    proxy = proxy_factory("start", "--config", str(config))
    for name, tag in (("db.internal", b"db\n"), ("a.api.test", b"api\n"),
                      ("other.test", b"fallback\n")):
        hello = _tls_client_hello(name)
        with connect_address(proxy.listeners[0]) as sock:
            sock.sendall(hello + b"rest")
            assert recv_exactly(sock, len(tag)) == tag
            assert recv_exactly(sock, len(hello) + 4) == transform(hello + b"rest")
