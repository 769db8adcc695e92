"""SNI routes served end to end (issue 13): the real proxy, real backends, real TLS peers.

- Route pools (``[[tcp_proxy.routes]]``): the ClientHello's server name picks the
  route (exact, then the one-label wildcard, case-insensitive, a trailing dot
  ignored; ``alpn`` too), and the route's pool is balanced, health-checked and
  controlled like a listener's: its own rotation, its own health verdicts and
  admin state (``prefork-proxy backend LISTENER ROUTE BACKEND drain``), its own
  ``route`` label in /metrics, all of it kept across a reload.  The backends
  are tests/backends.py ``tag`` servers (they answer their name, then the
  transformed bytes), and the clients send a real ClientHello built by
  Python's ``ssl`` (``client_hello``): a pass proves which pool got the bytes,
  byte for byte.
- Unmatched clients: to the listener's own backends, or refused 403 without
  them; a plain-text client refused 400 either way; each logged with its reason.
- ``sni_timeout_ms``: a hello that does not arrive in time is closed at the
  deadline (±20 %), and 500 clients sending one byte a second are each cut at it
  while a normal client's round trip stays under 20 ms (median).
- Real peers: two ``openssl s_server`` with certificates for ``a.test`` and
  ``b.test`` and a default one; ``openssl s_client -servername``, Python's ``ssl``
  and ``curl --resolve`` through the proxy each see the right certificate, 200
  handshakes through 2 workers.  Skipped, with the reason, without openssl/curl.
"""

from __future__ import annotations

import http.client
import json
import re
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest
from metric_names import METRICS
from prometheus_client.parser import text_string_to_metric_families
from support import accepts, free_port, recv_exactly, transform, wait_for, write_config

from prefork_proxy import config as config_module
from prefork_proxy import control
from prefork_proxy.client_hello import ClientHello, read_client_hello

needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None,
    reason="openssl is not installed (apt-get install openssl; scripts/install-peers does)")
needs_curl = pytest.mark.skipif(
    shutil.which("curl") is None,
    reason="curl is not installed (apt-get install curl; scripts/install-peers does)")

ADMIN_LINE = re.compile(r"admin endpoint listening on (\S+):(\d+)")


def client_hello(server_name: Optional[str], alpn: Sequence[str] = ()) -> bytes:
    """The first flight of a real TLS client (Python's ``ssl``) for ``server_name``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert isinstance(read_client_hello(hello), ClientHello)
    return hello


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def served_by(port: int, hello: bytes, payload: bytes = b"after the hello\n") -> str:
    """Send ``hello`` + ``payload`` through the proxy; the ``tag`` backend's name, after
    checking it got every byte (the hello included) unchanged."""
    with _connect(port) as sock:
        sock.sendall(hello + payload)
        name = b""
        while not name.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                raise AssertionError(f"closed after {name!r}")
            name += chunk
        assert recv_exactly(sock, len(hello) + len(payload)) == transform(hello + payload)
        return name.decode().strip()


def refused(sock: socket.socket) -> bool:
    """True when the proxy closed ``sock`` without sending a byte (FIN or RST)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _proxy(proxy_factory, tmp_path: Path, text: str, workers: int = 2):
    path = write_config(tmp_path / "proxy.toml", f"[server]\nworkers = {workers}\n"
                                                 f'pidfile = "{tmp_path}/proxy.pid"\n\n{text}')
    config_module.load_file(str(path))  # a config the tests mean to be valid
    proxy = proxy_factory("start", "--config", str(path))
    proxy.wait_workers(workers)
    return proxy, path


def _status(pidfile: Path) -> Dict:
    """The master's status file (what ``prefork-proxy status`` reads); {} before it exists."""
    try:
        return json.loads(Path(control.status_path(str(pidfile))).read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-replace
        return {}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefork_proxy", *args], capture_output=True,
                          text=True, timeout=30)


# --------------------------------------------------------------------------- matching


def test_matching_exact_then_wildcard_then_default_case_and_dot_insensitive(
        backend_factory, proxy_factory, tmp_path):
    api, wild, h2, default = (backend_factory("tag", name) for name in
                              ("api", "wild", "h2", "default"))
    proxy, _ = _proxy(proxy_factory, tmp_path, f"""
[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["{default.address}"]

[[tcp_proxy.routes]]
server_names = ["api.example.test", "*.api.example.test"]
backends = ["{wild.address}"]
name = "wildcard"

[[tcp_proxy.routes]]
server_names = ["exact.api.example.test"]
backends = ["{api.address}"]

[[tcp_proxy.routes]]
server_names = ["h2.example.test"]
alpn = ["h2"]
backends = ["{h2.address}"]
""")
    port = proxy.port()
    cases = [("api.example.test", (), "wild"),
             ("a.api.example.test", (), "wild"),        # one label under the wildcard
             ("EXACT.Api.example.test.", (), "api"),     # exact beats the wildcard
             ("a.b.api.example.test", (), "default"),    # two labels: no wildcard match
             ("example.test", (), "default"),
             ("h2.example.test", ("h2", "http/1.1"), "h2"),
             ("h2.example.test", ("http/1.1",), "default"),  # ALPN not offered
             (None, (), "default")]                      # no SNI at all
    for name, alpn, expected in cases:
        assert served_by(port, client_hello(name, alpn)) == expected, (name, alpn)
    with _connect(port) as plain:  # not TLS: refused even with a default pool
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert refused(plain)
    wait_for(lambda: re.search(r"refused: 400 CR sni_not_tls", proxy.log),
             message="the plain-text refusal logged with its status and reason")


def test_without_a_default_pool_unmatched_clients_are_refused_403(
        backend_factory, proxy_factory, tmp_path):
    only = backend_factory("tag", "only")
    proxy, _ = _proxy(proxy_factory, tmp_path, f"""
[[tcp_proxy]]
bind = "127.0.0.1:0"
sni_timeout_ms = 5000

[[tcp_proxy.routes]]
server_names = ["a.test"]
backends = ["{only.address}"]
""", workers=1)
    port = proxy.port()
    assert served_by(port, client_hello("a.test")) == "only"
    for name, reason in (("b.test", "sni_no_route"), (None, "sni_no_server_name")):
        with _connect(port) as sock:
            sock.sendall(client_hello(name))
            assert refused(sock)
        line = f"refused: 403 PR {reason}"
        wait_for(lambda: line in proxy.log, message=reason)  # noqa: B023 (called at once)
    assert "no route for 'b.test'" in proxy.log


# --------------------------------------------------------------------------- route pools


def test_route_pools_rotate_alone_are_checked_drained_counted_and_survive_a_reload(
        backend_factory, proxy_factory, tmp_path):
    r1, r2, default = (backend_factory("tag", n) for n in ("r1", "r2", "default"))
    dead = free_port()  # nothing listens: its checks fail
    text = f"""
[admin]
bind = "127.0.0.1:0"

[[tcp_proxy]]
name = "tls"
bind = "127.0.0.1:0"
backends = ["{default.address}", "{r1.address}"]

[[tcp_proxy.routes]]
server_names = ["a.test"]
backends = ["{r1.address}", "{r2.address}", "127.0.0.1:{dead}"]
health_check = {{ interval_ms = 100, rise = 1, fall = 1 }}
"""
    proxy, path = _proxy(proxy_factory, tmp_path, text)
    pidfile = tmp_path / "proxy.pid"
    port = proxy.port()

    def route_rows() -> Dict[str, Dict]:
        return {row["backend"]: row for row in _status(pidfile).get("backends", [])
                if row.get("route") == "a.test"}

    # The route's health checks mark its dead backend down (and only in its pool).
    wait_for(lambda: route_rows().get(f"127.0.0.1:{dead}", {}).get("state") == "down",
             timeout=20, message="the route's dead backend marked down by its checks")
    # Its own rotation: r1, r2 alternate exactly, whatever the default pool does.
    picks = []
    for _ in range(6):
        picks.append(served_by(port, client_hello("a.test")))
        assert served_by(port, client_hello("other.test")) in ("default", "r1")
    assert picks in (["r1", "r2"] * 3, ["r2", "r1"] * 3), picks
    # The listener's pool lists r1 too, with its own slot: draining r1 in the route
    # leaves it in the default pool.
    result = _cli("backend", "--pidfile", str(pidfile), "tls", "a.test", r1.address, "drain")
    assert result.returncode == 0, result.stderr
    assert f"backend {r1.address} of listener tls route a.test: drain" in result.stdout
    assert [served_by(port, client_hello("a.test")) for _ in range(4)] == ["r2"] * 4
    assert {served_by(port, client_hello("x.test")) for _ in range(4)} == {"default", "r1"}
    listed = _cli("backend", "--pidfile", str(pidfile), "list")
    assert re.search(rf"tls route a\.test\s+{re.escape(r1.address)}\s+drain", listed.stdout)
    bad = _cli("backend", "--pidfile", str(pidfile), "tls", "nope.test", r1.address, "drain")
    assert bad.returncode == 2 and "has no route 'nope.test'" in bad.stderr
    # /metrics: per route (a label), not per name; issue 11's families.
    port_admin = int(wait_for(lambda: ADMIN_LINE.search(proxy.log), message="admin").group(2))

    def metrics() -> str:
        connection = http.client.HTTPConnection("127.0.0.1", port_admin, timeout=5)
        connection.request("GET", "/metrics")
        return connection.getresponse().read().decode()

    route_r2 = (f'prefork_proxy_backend_connections_total{{backend="{r2.address}",'
                f'listener="tls",route="a.test"}} 7.0')
    wait_for(lambda: route_r2 in metrics(), message="r2's route counter in /metrics")
    assert (f'prefork_proxy_backend_up{{backend="127.0.0.1:{dead}",listener="tls",'
            f'route="a.test"}} 0.0') in metrics()
    for family in text_string_to_metric_families(metrics()):  # issue 11's list holds
        for sample in family.samples:
            name = sample.name if sample.name in METRICS else family.name
            if name.startswith("prefork_proxy_backend_"):
                kind, labels, _ = METRICS[name]
                assert set(sample.labels) <= labels | ({"le"} if kind == "histogram"
                                                       else set()), sample
    # The listener's own pool: issue 11's labels, no route label.
    assert (f'prefork_proxy_backend_connections_total{{backend="{default.address}",'
            'listener="tls"}') in metrics()
    # A reload keeps the route's state: r1 stays drained there, the counters go on.
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "generation 2" in proxy.log or _status(pidfile).get("generation") == 2,
             message="the reload")
    proxy.wait_workers(2)
    wait_for(lambda: _status(pidfile).get("generation") == 2 and all(
        w["generation"] == 2 for w in _status(pidfile)["workers"]), timeout=20,
        message="generation 2 alone")
    assert [served_by(port, client_hello("a.test")) for _ in range(3)] == ["r2"] * 3
    assert route_rows()[r1.address]["admin"] == "drain"
    assert route_rows()[f"127.0.0.1:{dead}"]["state"] == "down"
    wait_for(lambda: route_r2.replace(" 7.0", " 10.0") in metrics(),
             message="the route counter going on after the reload")


def test_a_route_backend_max_connections_holds_across_workers(
        backend_factory, proxy_factory, tmp_path):
    capped, default = backend_factory("tag", "capped"), backend_factory("tag", "default")
    proxy, _ = _proxy(proxy_factory, tmp_path, f"""
[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["{default.address}"]

[[tcp_proxy.routes]]
server_names = ["a.test"]
backends = [{{ address = "{capped.address}", max_connections = 1 }}]
""")
    port = proxy.port()
    hello = client_hello("a.test")
    holder = _connect(port)
    try:
        holder.sendall(hello)
        assert recv_exactly(holder, 7) == b"capped\n"
        for _ in range(3):  # whichever worker takes them: the one slot is held
            with _connect(port) as other:
                other.sendall(hello)
                assert refused(other)
        assert served_by(port, client_hello("x.test")) == "default"  # other pools unaffected
        # Counted while the slot is held: a try below may come before the release
        # and be refused (and logged) too.
        wait_for(lambda: proxy.log.count("refused: 503 sQ backend_max_connections") == 3,
                 message="the three 503 refusals logged")
    finally:
        holder.close()
    assert wait_for(lambda: _try_served(port, hello), message="the slot free again") == "capped"


def _try_served(port: int, hello: bytes) -> Optional[str]:
    try:
        return served_by(port, hello)
    except (AssertionError, OSError):
        return None


# --------------------------------------------------------------------------- sni_timeout


def test_a_hello_that_does_not_arrive_in_time_is_closed_at_sni_timeout(
        backend_factory, proxy_factory, tmp_path):
    backend = backend_factory("tag", "only")
    timeout_ms = 1000
    proxy, _ = _proxy(proxy_factory, tmp_path, f"""
[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["{backend.address}"]
sni_timeout_ms = {timeout_ms}

[[tcp_proxy.routes]]
server_names = ["a.test"]
backends = ["{backend.address}"]
""", workers=1)
    port = proxy.port()
    hello = client_hello("a.test")
    for sent in (b"", hello[:3], hello[:-1]):  # nothing, a record header, all but a byte
        with _connect(port) as sock:
            sock.sendall(sent)
            started = time.monotonic()
            assert refused(sock)
            lifetime = time.monotonic() - started
        assert timeout_ms / 1000 * 0.8 <= lifetime <= timeout_ms / 1000 * 1.2, (sent, lifetime)
    wait_for(lambda: proxy.log.count("refused: 400 cR sni_timeout") == 3,
             message="three sni_timeout refusals logged")
    assert served_by(port, client_hello("a.test")) == "only"  # an on-time hello is served


def test_slow_hellos_are_cut_at_sni_timeout_and_others_are_served(
        backend_factory, proxy_factory, tmp_path):
    count = 500
    timeout_ms = 2000
    backend = backend_factory("tag", "only")
    proxy, _ = _proxy(proxy_factory, tmp_path, f"""
[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["{backend.address}"]
sni_timeout_ms = {timeout_ms}

[[tcp_proxy.routes]]
server_names = ["a.test"]
backends = ["{backend.address}"]
""")
    port = proxy.port()
    slow_hello = client_hello("slow.test")
    normal_hello = client_hello("a.test")
    selector = selectors.DefaultSelector()
    opened: Dict[socket.socket, float] = {}
    for _ in range(count):
        sock = _connect(port)
        sock.setblocking(False)
        opened[sock] = time.monotonic()
        selector.register(sock, selectors.EVENT_READ)
    closed: Dict[socket.socket, float] = {}
    sent = 0
    next_byte = time.monotonic()
    trips: List[float] = []
    deadline = time.monotonic() + timeout_ms / 1000 * 2 + 10
    while len(closed) < count and time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_byte:  # one more byte of the hello from each live slow client
            for sock in opened:
                if sock not in closed:
                    try:
                        sock.send(slow_hello[sent:sent + 1])
                    except OSError:
                        pass
            sent += 1
            next_byte = now + 1.0
        started = time.monotonic()  # a normal TLS client's first flight meanwhile
        assert served_by(port, normal_hello, b"") == "only"
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
    print(f"slow hellos: {count} closed after {min(lifetimes):.3f}-{max(lifetimes):.3f} s "
          f"(sni_timeout_ms {timeout_ms}); normal round trips: {len(trips)}, median "
          f"{statistics.median(trips) * 1000:.2f} ms, max {max(trips) * 1000:.2f} ms")
    assert all(low <= t <= high for t in lifetimes), (min(lifetimes), max(lifetimes))
    assert statistics.median(trips) < 0.020, statistics.median(trips)
    for sock in opened:
        sock.close()


# --------------------------------------------------------------------------- real TLS peers


def certificate(directory: Path, name: str) -> Path:
    """A self-signed certificate for ``name``: ``NAME.crt`` (and its key ``NAME.key``)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert


class TlsServer:
    """``openssl s_server -www`` for one certificate on a free loopback port (it serves
    one connection at a time: an HTTP status page, so curl gets an answer too)."""

    def __init__(self, cert: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            ["openssl", "s_server", "-quiet", "-www", "-accept", f"127.0.0.1:{self.port}",
             "-cert", str(cert), "-key", str(cert.with_suffix(".key"))],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: accepts(self.port), timeout=10, message="openssl s_server listening")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(5)


def python_certificate(port: int, server_name: Optional[str]) -> bytes:
    """The DER certificate the server behind ``port`` showed Python's ssl."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            return tls.getpeercert(binary_form=True)


def s_client_subject(port: int, server_name: str) -> str:
    result = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                             "-servername", server_name], input=b"", capture_output=True,
                            timeout=30)
    match = re.search(rb"subject=\s*CN\s*=\s*(\S+)", result.stdout)
    assert match, result.stdout[-2000:]
    return match.group(1).decode()


def curl_subject(port: int, server_name: str) -> str:
    result = subprocess.run(["curl", "-sSkv", "--max-time", "20", "--resolve",
                             f"{server_name}:{port}:127.0.0.1",
                             f"https://{server_name}:{port}/"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"subject:\s*CN\s*=\s*(\S+)", result.stderr)
    assert match, result.stderr[-2000:]
    return match.group(1)


@needs_openssl
@needs_curl
@pytest.mark.timeout(300)
def test_real_tls_clients_get_the_right_certificate_through_two_workers(
        proxy_factory, tmp_path):
    names = ("a.test", "b.test", "default.test")
    pems = {name: certificate(tmp_path, name) for name in names}
    der = {name: ssl.PEM_cert_to_DER_cert(pem.read_text()) for name, pem in pems.items()}
    servers = {name: TlsServer(pem) for name, pem in pems.items()}
    try:
        proxy, _ = _proxy(proxy_factory, tmp_path, f"""
[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["127.0.0.1:{servers['default.test'].port}"]
sni_timeout_ms = 2000

[[tcp_proxy.routes]]
server_names = ["a.test"]
backends = ["127.0.0.1:{servers['a.test'].port}"]

[[tcp_proxy.routes]]
server_names = ["b.test"]
backends = ["127.0.0.1:{servers['b.test'].port}"]
""")
        port = proxy.port()
        started = time.monotonic()
        for round_ in range(100):  # 200 handshakes (Python's ssl) through 2 workers
            for name in ("a.test", "b.test"):
                assert python_certificate(port, name) == der[name], (round_, name)
        elapsed = time.monotonic() - started
        for _ in range(3):  # the slow-to-spawn clients a few times each
            assert s_client_subject(port, "a.test") == "a.test"
            assert s_client_subject(port, "b.test") == "b.test"
            assert curl_subject(port, "a.test") == "a.test"
            assert curl_subject(port, "b.test") == "b.test"
        assert python_certificate(port, "unknown.test") == der["default.test"]
        assert python_certificate(port, None) == der["default.test"]  # no SNI
        assert s_client_subject(port, "unknown.test") == "default.test"
        with _connect(port) as plain:  # a plain-text client: refused, 400
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert refused(plain)
        wait_for(lambda: "refused: 400 CR sni_not_tls" in proxy.log, message="the 400")
        print(f"200 TLS handshakes through the proxy in {elapsed:.2f} s")
    finally:
        for server in servers.values():
            server.stop()
