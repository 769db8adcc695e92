"""/metrics bytes, sessions and open connections of the real proxy: exact, live, monotonic.

The relay writes ``rows.LoopStats`` (bytes as they move, a close per
connection): 2 workers, 2,000 clients of known, varied sizes (some over 64 KiB,
so splice runs), scraped all along, a worker SIGKILLed between the two rounds
and a reload during the second: received/sent bytes per listener equal what
the clients sent and received, exactly, and no counter goes backwards.  A
long stream's bytes show while it runs, before it closes.  /metrics is
published by the master about once a second: every check waits on its
condition, bounded.  The access log (json) is on: exactly one line per
connection, with the client's own byte counts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from support import transform, wait_for, write_config
from test_admin import admin_port
from test_metrics import Scraper, assert_never_backwards, counter_samples, scrape, value

CLIENTS_PER_ROUND = 1000
THREADS = 4
#: Client message sizes, in turn: small bursts (copied) to bulk (> 64 KiB: spliced).
SIZES = (1, 7, 100, 512, 1500, 4096, 10_000, 33_000, 70_000, 150_000)


def _front_records(path: Path) -> List[Dict[str, object]]:
    """The access log's json records of listener ``front`` (whole lines only)."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # the last piece may be a line being written
    return [r for r in map(json.loads, lines) if r["listener"] == "front"]


def _one(port: int, size: int, index: int) -> Tuple[int, int]:
    """One client: send ``size`` bytes, half-close, read the echo to EOF; (sent, received)."""
    message = (index.to_bytes(4, "big") * (size // 4 + 1))[:size]
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
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
    got = b"".join(chunks)
    assert got == transform(message), (size, len(got))
    return size, len(got)


def _round(port: int, count: int, progress: List[int],
           pairs: Optional[List[Tuple[int, int]]] = None) -> Tuple[int, int, int]:
    """``count`` clients over ``THREADS`` threads: (clients served, bytes sent, received);
    each client's (sent, received) is appended to ``pairs`` (for the access log check)."""
    results: List[Tuple[int, int, int]] = []

    def run(worker: int) -> None:
        served = sent = received = 0
        for index in range(worker, count, THREADS):
            out, back = _one(port, SIZES[index % len(SIZES)], index)
            if pairs is not None:
                pairs.append((out, back))
            served, sent, received = served + 1, sent + out, received + back
            progress.append(1)
        results.append((served, sent, received))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == THREADS
    return tuple(sum(column) for column in zip(*results))  # type: ignore[return-value]


@pytest.mark.timeout(240)
def test_bytes_and_sessions_exact_live_and_monotonic(backend_factory, proxy_factory,
                                                    tmp_path):
    echo = backend_factory("echo")
    path = tmp_path / "proxy.toml"
    text = f"""
[server]
workers = 2
access_log = "{tmp_path / 'access.log'}"
access_log_format = "json"

[admin]
bind = "127.0.0.1:0"

[[tcp_proxy]]
name = "front"
bind = "127.0.0.1:0"
backends = ["{echo.address}"]

[[tcp_proxy]]
name = "long"
bind = "127.0.0.1:0"
backends = ["{echo.address}"]

[[tcp_proxy]]
name = "guarded"
bind = "127.0.0.1:0"
backends = ["{echo.address}"]
deny = ["127.0.0.0/8"]
"""
    write_config(path, text)
    proxy = proxy_factory("start", "--config", str(path))
    proxy.wait_workers(2)
    port = admin_port(proxy)
    front, long_port = proxy.port(0), proxy.port(1)
    wait_for(lambda: ("prefork_proxy_received_bytes_total", (("listener", "front"),))
             in counter_samples(port), 10, message="byte counters in /metrics")

    def counts(listener: str) -> Tuple[float, float, float]:
        samples = scrape(port)
        return (value(samples, "prefork_proxy_received_bytes_total", listener=listener),
                value(samples, "prefork_proxy_sent_bytes_total", listener=listener),
                value(samples, "prefork_proxy_session_duration_seconds_count",
                      listener=listener))

    # A long stream: its bytes show while it runs, and it is counted open.
    with socket.create_connection(("127.0.0.1", long_port), timeout=20) as stream:
        chunk = b"L" * 65536
        for _ in range(8):
            stream.sendall(chunk)
            got = 0
            while got < len(chunk):
                got += len(stream.recv(len(chunk) - got))
        wait_for(lambda: counts("long")[:2] == (8 * 65536, 8 * 65536), 10,
                 message="the open stream's 512 KiB in received/sent_bytes_total")
        assert counts("long")[2] == 0  # not closed yet: no session observed
        assert value(scrape(port), "prefork_proxy_connections_active", listener="long") == 1
    wait_for(lambda: counts("long")[2] == 1, 10, message="the stream's session observed")
    assert value(scrape(port), "prefork_proxy_connections_active", listener="long") == 0

    readings = [counter_samples(port)]
    progress: List[int] = []
    pairs: List[Tuple[int, int]] = []
    with Scraper(port, interval=0.1) as scraper:
        served, sent, received = _round(front, CLIENTS_PER_ROUND, progress, pairs)
    readings += scraper.readings
    wait_for(lambda: counts("front") == (sent, received, served), 10,
             message=f"front: received {sent}, sent {received}, {served} sessions")
    readings.append(counter_samples(port))
    # The access log is written in batches by each worker's main thread: wait for round 1's
    # lines before the SIGKILL (a killed worker cannot write what it has not written yet).
    wait_for(lambda: len(_front_records(tmp_path / "access.log")) == served, 10,
             message=f"{served} front lines in the access log")

    # SIGKILL a worker between scrapes: its row (loop cells too) is folded at reap.
    victim = proxy.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: value(counter_samples(port), "prefork_proxy_worker_restarts_total",
                           reason="signal") == 1, 10, message="the SIGKILL counted")
    readings.append(counter_samples(port))
    assert counts("front") == (sent, received, served)
    wait_for(lambda: victim not in proxy.worker_pids() and len(proxy.worker_pids()) == 2, 10,
             message="the killed worker respawned")

    # Round 2 with a reload in the middle of it (the old generation drains, is folded).
    progress = []
    with Scraper(port, interval=0.1) as scraper:
        reloader = threading.Thread(target=lambda: (
            wait_for(lambda: len(progress) >= CLIENTS_PER_ROUND // 3, 60),
            proxy.signal(signal.SIGHUP)))
        reloader.start()
        more = _round(front, CLIENTS_PER_ROUND, progress, pairs)
        reloader.join(60)
    readings += scraper.readings
    served, sent, received = served + more[0], sent + more[1], received + more[2]
    wait_for(lambda: value(counter_samples(port), "prefork_proxy_reloads_total",
                           result="ok") == 1, 10, message="the reload counted")
    wait_for(lambda: counts("front") == (sent, received, served), 15,
             message=f"front: received {sent}, sent {received}, {served} sessions")
    readings.append(counter_samples(port))
    assert served == 2 * CLIENTS_PER_ROUND
    assert len(readings) >= 10, len(readings)
    # Exactly one access-log line per connection, its client-side bytes the client's own.
    records = wait_for(lambda: (lambda r: r if len(r) == served else None)(
        _front_records(tmp_path / "access.log")), 10,
        message=f"{served} front lines in the access log")
    assert len({r["conn"] for r in records}) == served  # one line each, none doubled
    assert sorted((r["client_in"], r["client_out"]) for r in records) == sorted(pairs)
    assert all(r["status"] == 200 and r["term"] == "--" for r in records)
    assert all(r["backend_out"] == r["client_in"] and r["backend_in"] == r["client_out"]
               for r in records)
    assert_never_backwards(readings)

    final = scrape(port)
    assert value(final, "prefork_proxy_connections_active", listener="front") == 0
    assert value(final, "prefork_proxy_connections_total", listener="front") == served
    # Every session in some bucket: +Inf holds them all, the sum is positive.
    assert value(final, "prefork_proxy_session_duration_seconds_bucket", listener="front",
                 le="+Inf") == served
    assert value(final, "prefork_proxy_session_duration_seconds_sum", listener="front") > 0
    # One connect-time observation per connection that reached the backend.
    backend = {"listener": "front", "backend": echo.address}
    assert value(final, "prefork_proxy_backend_connect_duration_seconds_count",
                 **backend) == served
    assert value(final, "prefork_proxy_backend_connect_duration_seconds_bucket", le="+Inf",
                 **backend) == served
    assert 0 < value(final, "prefork_proxy_backend_connect_duration_seconds_sum",
                     **backend) < served  # loopback: well under a second each

    # Refused by deny: counted by reason, once each, and their sessions too.
    for _ in range(15):
        try:  # the refusal's RST may even reach connect() on loopback
            with socket.create_connection(("127.0.0.1", proxy.port(2)), timeout=10) as sock:
                sock.settimeout(10)
                assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
    wait_for(lambda: value(counter_samples(port), "prefork_proxy_rejected_connections_total",
                           listener="guarded", reason="denied") == 15, 10,
             message="15 refusals counted with reason=denied")
    after = scrape(port)
    assert value(after, "prefork_proxy_rejected_connections_total", listener="front",
                 reason="denied") == 0
    assert value(after, "prefork_proxy_session_duration_seconds_count",
                 listener="guarded") == 15
    assert value(after, "prefork_proxy_connections_active", listener="guarded") == 0
    print(f"front: {served} clients, {sent} bytes sent, {received} received; "
          f"{len(readings)} readings")
