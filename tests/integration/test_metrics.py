"""/metrics of the real proxy under load: exact counters that never go backwards.

The real CLI with 2 workers and ``[admin] bind`` on port 0, real backends on
loopback; every reading goes through the admin endpoint's HTTP port and is
parsed with ``prometheus_client.parser``.  Between the two rounds of load a
worker is SIGKILLed and an invalid reload is refused; a valid reload runs
during the second round.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import statistics
import threading
import time
from typing import Dict, List, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import recv_exactly, transform, wait_for, write_config
from test_admin import admin_port

CLIENTS_PER_ROUND = 1000
THREADS = 4
Sample = Tuple[str, Tuple[Tuple[str, str], ...]]


def _refused_address() -> str:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there: every connect is refused
    return f"127.0.0.1:{port}"


def scrape(port: int) -> Dict[Sample, float]:
    """Every sample of one GET /metrics, by (name, sorted labels)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        body = response.read().decode()
    finally:
        conn.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def counter_samples(port: int) -> Dict[Sample, float]:
    return {key: value for key, value in scrape(port).items() if key[0].endswith("_total")}


def value(samples: Dict[Sample, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _clients(port: int, count: int, progress: List[int]) -> int:
    """``count`` connections, each one message echoed exactly; returns how many succeeded."""
    done = []

    def run(share: int) -> None:
        ok = 0
        for index in range(share):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                message = index.to_bytes(4, "big") * 8
                sock.sendall(message)
                assert recv_exactly(sock, len(message)) == transform(message)
                ok += 1
                progress.append(1)
        done.append(ok)

    threads = [threading.Thread(target=run, args=(count // THREADS,)) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(done) == THREADS
    return sum(done)


class Scraper:
    """Scrapes /metrics every ``interval`` s in a thread while load runs; keeps every reading."""

    def __init__(self, port: int, interval: float = 0.05) -> None:
        self.port, self.interval = port, interval
        self.readings: List[Dict[Sample, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.readings.append(counter_samples(self.port))
            self._stop.wait(self.interval)

    def __enter__(self) -> "Scraper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def assert_never_backwards(readings: List[Dict[Sample, float]]) -> None:
    for before, after in zip(readings, readings[1:]):
        for key, old in before.items():
            if key in after:
                assert after[key] >= old, f"{key} went backwards: {old} -> {after[key]}"


@pytest.mark.timeout(150)
def test_metrics_exact_and_monotonic_across_a_sigkill_and_reloads(backend_factory,
                                                                 proxy_factory, tmp_path):
    echo = backend_factory("echo")
    good, bad = backend_factory("tag", "A"), backend_factory("tag", "B")
    refused = _refused_address()
    path = tmp_path / "proxy.toml"
    text = f"""
[server]
workers = 2

[admin]
bind = "127.0.0.1:0"

[[tcp_proxy]]
name = "front"
bind = "127.0.0.1:0"
backends = ["{echo.address}"]

[[tcp_proxy]]
name = "dead"
bind = "127.0.0.1:0"
backends = ["{refused}"]

[[tcp_proxy]]
name = "checked"
bind = "127.0.0.1:0"
backends = ["{good.address}", "{bad.address}"]

[tcp_proxy.health_check]
interval_ms = 100
fall = 1
expect = "A"
"""
    write_config(path, text)
    proxy = proxy_factory("start", "--config", str(path))
    proxy.wait_workers(2)
    port = admin_port(proxy)
    wait_for(lambda: ("prefork_proxy_connections_total", (("listener", "front"),))
             in counter_samples(port), message="listener counters in /metrics")
    readings = [counter_samples(port)]
    front = proxy.port(0)

    def connections() -> float:
        return value(counter_samples(port), "prefork_proxy_connections_total", listener="front")

    def settled(expected: int) -> None:
        wait_for(lambda: connections() == expected, 10,
                 message=f"front connections_total == {expected}")

    def restarts(reason: str) -> float:
        return value(counter_samples(port), "prefork_proxy_worker_restarts_total", reason=reason)

    def reloads(result: str) -> float:
        return value(counter_samples(port), "prefork_proxy_reloads_total", result=result)

    # Round 1 under scrapes.
    progress: List[int] = []
    with Scraper(port) as scraper:
        served = _clients(front, CLIENTS_PER_ROUND, progress)
    readings += scraper.readings
    settled(served)
    readings.append(counter_samples(port))

    # SIGKILL one worker between scrapes: its row is folded when the master reaps it.
    assert restarts("signal") == 0
    victim = proxy.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: restarts("signal") == 1, 10, message="restarts{reason=signal} == 1")
    readings.append(counter_samples(port))
    assert connections() == served
    assert {r: restarts(r) for r in ("exit", "hung", "boot_failed")} == \
        {"exit": 0, "hung": 0, "boot_failed": 0}
    wait_for(lambda: victim not in proxy.worker_pids() and len(proxy.worker_pids()) == 2, 10,
             message="the killed worker respawned")

    # An invalid reload changes nothing but its counter.
    path.write_text(text.replace("workers = 2", "workers = 0"))
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: reloads("invalid") == 1, 10, message="reloads{result=invalid} == 1")
    assert reloads("ok") == 0 and reloads("failed") == 0
    path.write_text(text)
    proxy.wait_workers(2)

    # Round 2 under scrapes, with a valid reload in the middle of it.
    progress = []
    with Scraper(port) as scraper:
        reloader = threading.Thread(target=lambda: (
            wait_for(lambda: len(progress) >= CLIENTS_PER_ROUND // 3, 30),
            proxy.signal(signal.SIGHUP)))
        reloader.start()
        served += _clients(front, CLIENTS_PER_ROUND, progress)
        reloader.join(30)
    readings += scraper.readings
    wait_for(lambda: reloads("ok") == 1, 10, message="reloads{result=ok} == 1")
    settled(served)
    readings.append(counter_samples(port))
    assert served == 2 * CLIENTS_PER_ROUND
    assert len(readings) >= 10, len(readings)
    assert_never_backwards(readings)

    final = scrape(port)
    backend = {"listener": "front", "backend": echo.address}
    assert value(final, "prefork_proxy_backend_connections_total", **backend) == served
    assert value(final, "prefork_proxy_backend_connections_active", **backend) == 0
    assert value(final, "prefork_proxy_backend_up", **backend) == 1
    assert value(final, "prefork_proxy_failovers_total", listener="front") == 0
    for reason in ("refused", "timeout", "unreachable", "other"):
        assert value(final, "prefork_proxy_backend_connect_errors_total", reason=reason,
                     **backend) == 0
    assert value(final, "prefork_proxy_reloads_total", result="failed") == 0
    assert value(final, "prefork_proxy_config_generation") == 2
    assert value(final, "prefork_proxy_workers", state="serving") >= 2
    assert any(key[0] == "process_cpu_seconds_total" for key in final)

    # Refused connects, counted exactly: each client is one attempt and one error.
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", proxy.port(1)), timeout=10) as sock:
            sock.settimeout(10)
            assert sock.recv(1) == b""
    dead = {"listener": "dead", "backend": refused}
    wait_for(lambda: value(counter_samples(port), "prefork_proxy_backend_connect_errors_total",
                           reason="refused", **dead) == 20, 10,
             message="20 refused connects counted")
    after = scrape(port)
    assert value(after, "prefork_proxy_backend_connections_total", **dead) == 20
    assert value(after, "prefork_proxy_backend_connections_active", **dead) == 0
    assert value(after, "prefork_proxy_connections_total", listener="dead") == 20
    for reason in ("timeout", "unreachable", "other"):
        assert value(after, "prefork_proxy_backend_connect_errors_total", reason=reason,
                     **dead) == 0

    # Down by checks: B fails its check (it answers "B", the check expects "A").
    wait_for(lambda: value(scrape(port), "prefork_proxy_backend_up", listener="checked",
                           backend=bad.address) == 0, 10, message="backend_up of B == 0")
    assert value(scrape(port), "prefork_proxy_backend_up", listener="checked",
                 backend=good.address) == 1

    # Scrape latency with 2 workers (reported, not asserted beyond a sanity bound).
    times = []
    for _ in range(50):
        started = time.perf_counter()
        scrape(port)
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    print(f"scrape latency, median of 50: {median * 1000:.2f} ms "
          f"(max {max(times) * 1000:.2f} ms)")
    assert median < 0.1
