"""Backends fail, clients don't: failover, passive and active health, backups, status.

Real CLI, real backend processes, loopback only.  A "refusing" backend is a
port with nothing listening; a "hanging" one is a listener whose accept queue
is full, so the kernel drops further SYNs and a connect hangs like a dead host.

Loads are small by default.  ``PREFORK_PROXY_FIGURES=1`` runs the issue's
sizes (1,000 connections) and prints the figures (``pytest -s``).
"""

from __future__ import annotations

import re
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Dict, List, Optional

from backend_clients import FIGURES, figure, run_clients, tag
from support import Blackhole, free_port, wait_for, write_config


def proxy_config(path, backends: List[str], *, workers: int = 2, listener: str = "",
                 health: str = "", pidfile: Optional[str] = None) -> str:
    """A config file with one listener; ``listener``/``health`` add keys to it."""
    pid_line = f'pidfile = "{pidfile}"' if pidfile else ""
    text = textwrap.dedent(f"""
        [server]
        workers = {workers}
        {pid_line}

        [[tcp_proxy]]
        bind = "127.0.0.1:0"
        backends = [{", ".join(f'"{b}"' for b in backends)}]
    """) + textwrap.dedent(listener)
    if health:
        text += "\n[tcp_proxy.health_check]\n" + textwrap.dedent(health)
    return str(write_config(path, text))


def log_lines_after(log: str, marker: str) -> str:
    index = log.find(marker)
    assert index >= 0, f"{marker!r} not in the log"
    return log[index:]


# --------------------------------------------------------------------------- passive


def test_refusing_backend_fails_no_client_and_is_marked_down_for_every_worker(
        backend_factory, proxy_factory, tmp_path):
    a, b = backend_factory("tag", "A"), backend_factory("tag", "B")
    dead = f"127.0.0.1:{free_port()}"
    config = proxy_config(tmp_path / "p.toml", [a.address, dead, b.address], workers=4,
                          listener="fall = 3\nfail_timeout_ms = 60000\n")
    proxy = proxy_factory("start", "--config", config, "--log-level", "debug")
    proxy.wait_workers(4)
    total = 1000 if FIGURES else 300
    names, failures, _ = run_clients(proxy.port(), total)
    figure(f"refusing backend: {failures} failed client connections out of {total} "
           f"(3 backends, 4 workers, 4 client threads): {dict(names)}")
    assert failures == 0 and set(names) == {"A", "B"} and sum(names.values()) == total
    down_line = f"backend {dead} down: Connection refused (3/3"
    wait_for(lambda: down_line in proxy.log, message="the mark-down line")
    log = proxy.log
    assert log.count(down_line) == 1, "the state change is logged once"
    attempts = log.count(f"backend {dead} unreachable")
    assert 3 <= attempts <= 3 + 4, attempts  # at most one more in flight per client thread

    # Marked down for every worker at once: no worker tries it again.
    names, failures, _ = run_clients(proxy.port(), 200)
    assert failures == 0 and set(names) == {"A", "B"}
    assert proxy.log.count(f"backend {dead} unreachable") == attempts
    after = log_lines_after(proxy.log, down_line)
    serving = {line.split("[")[1].split("]")[0] for line in after.splitlines()
               if "DEBUG client" in line and " connected to backend" in line}
    assert len(serving) >= 2, "only one worker served after the mark-down; proves nothing"


def test_hanging_backend_fails_no_client_and_costs_latency_only_until_marked_down(
        backend_factory, proxy_factory, tmp_path):
    a, b = backend_factory("tag", "A"), backend_factory("tag", "B")
    hole = Blackhole()
    try:
        config = proxy_config(tmp_path / "p.toml", [a.address, b.address, hole.address],
                              listener="connect_timeout_ms = 500\nfall = 2\n"
                                       "fail_timeout_ms = 60000\n")
        proxy = proxy_factory("start", "--config", config)
        total = 1000 if FIGURES else 60
        latencies, ports, failures = [], [], 0
        for _ in range(total):  # one client at a time: the order of events is exact
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as sock:
                    ports.append(sock.getsockname()[1])
                    if not sock.makefile("rb").readline():
                        failures += 1
            except OSError:
                failures += 1
            latencies.append(time.monotonic() - started)
        assert failures == 0
        # Which clients met the hanging backend first: the proxy logs their ports.
        timed_out = {int(port) for port in re.findall(
            rf"backend {re.escape(hole.address)} unreachable for client 127\.0\.0\.1:(\d+): "
            r"connect timed out after 500 ms", proxy.log)}
        hits = [i for i, port in enumerate(ports) if port in timed_out]
        # Round robin sends every third client to it first; after 2 timeouts it is down.
        assert len(hits) == 2 and hits[-1] < 10, hits
        assert all(latencies[i] >= 0.5 for i in hits)
        assert f"backend {hole.address} down: connect timed out after 500 ms (2/2" in proxy.log
        others_before = [latencies[i] for i in range(hits[-1]) if i not in hits]
        after = latencies[hits[-1] + 1:]
        figure(f"hanging backend (connect_timeout_ms=500, fall=2): {failures} failures out of "
               f"{total}; before mark-down {len(hits)} clients waited "
               f"{statistics.mean(latencies[i] for i in hits) * 1000:.0f} ms (others "
               f"{statistics.median(others_before) * 1000:.1f} ms median); after mark-down "
               f"median {statistics.median(after) * 1000:.1f} ms, max "
               f"{max(after) * 1000:.0f} ms over {len(after)} clients")
        assert statistics.median(after) < 0.1  # no connect timeout in the way any more
    finally:
        hole.close()


def test_backups_serve_only_while_every_primary_is_down(backend_factory, proxy_factory,
                                                        tmp_path):
    a, b, c = backend_factory("tag", "A"), backend_factory("tag", "B"), backend_factory("tag", "C")
    config = str(write_config(tmp_path / "p.toml", f"""
[server]
workers = 2

[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["{a.address}", "{b.address}", {{ address = "{c.address}", backup = true }}]
fall = 1
fail_timeout_ms = 60000
"""))
    proxy = proxy_factory("start", "--config", config)
    assert {tag(proxy.port()) for _ in range(10)} == {"A", "B"}
    a.stop()
    b.stop()
    names, failures, _ = run_clients(proxy.port(), 20, threads=2)
    assert failures == 0 and set(names) == {"C"}


# --------------------------------------------------------------------------- active


def test_health_checks_send_expect_and_status_shows_every_backend(
        backend_factory, proxy_factory, tmp_path):
    good, wrong = backend_factory("pong", "good"), backend_factory("tag", "wrong")
    dead = f"127.0.0.1:{free_port()}"
    pidfile = str(tmp_path / "proxy.pid")
    config = proxy_config(tmp_path / "p.toml", [good.address, wrong.address, dead],
                          pidfile=pidfile,
                          health='interval_ms = 300\nrise = 2\nfall = 2\n'
                                 'send = "PING\\r\\n"\nexpect = "+PONG"\n')
    proxy = proxy_factory("start", "--config", config)
    wait_for(lambda: proxy.log.count(" down: ") >= 2, message="two backends marked down")
    log = proxy.log
    assert f"backend {dead} down: connect refused (2/2)" in log
    assert f"backend {wrong.address} down: reply b'wrong' does not start with b'+PONG' " \
           "(2/2)" in log
    for _ in range(6):  # only the good one serves (the others are down, not merely failing)
        with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.makefile("rb").readline() == b"+PONG\r\n"
    assert "unreachable" not in proxy.log

    def status() -> Optional[Dict[str, str]]:
        result = subprocess.run([sys.executable, "-m", "prefork_proxy", "status", "--pidfile",
                                 pidfile], capture_output=True, text=True, timeout=30)
        rows = {line.split()[1]: line for line in result.stdout.splitlines()
                if line.startswith("127.0.0.1:0 ")}
        # Both checked at least once (their probes finish in any order).
        return rows if len(rows) == 3 and "ago, failed" in rows.get(dead, "") \
            and "ago, ok" in rows.get(good.address, "") else None

    rows = wait_for(status, timeout=15, message="backend rows in prefork-proxy status")
    assert " up " in rows[good.address] and "ago, ok" in rows[good.address]
    assert "down (checks)" in rows[wrong.address] and "down (checks)" in rows[dead]


def test_backend_that_comes_back_gets_traffic_within_interval_times_rise(
        backend_factory, proxy_factory, tmp_path):
    a = backend_factory("tag", "A")
    port = free_port()
    dead = f"127.0.0.1:{port}"
    interval, rise = 200, 2
    config = proxy_config(tmp_path / "p.toml", [a.address, dead],
                          health=f"interval_ms = {interval}\nrise = {rise}\nfall = 2\n")
    proxy = proxy_factory("start", "--config", config)
    wait_for(lambda: f"backend {dead} down: connect refused" in proxy.log,
             message="the dead backend marked down by checks")
    assert {tag(proxy.port()) for _ in range(6)} == {"A"}
    revived = backend_factory("tag", "B", "--port", str(port))
    back_at = time.monotonic()
    wait_for(lambda: tag(proxy.port()) == "B", timeout=10, interval=0.005,
             message="traffic to the revived backend")
    took = time.monotonic() - back_at
    figure(f"recovery: traffic again {took * 1000:.0f} ms after the backend came back "
           f"(interval_ms={interval} x rise={rise} = {interval * rise} ms, +1 interval = "
           f"{interval * (rise + 1)} ms)")
    assert took <= (interval * (rise + 1)) / 1000 + 0.3  # slack for a loaded 2-core box
    assert f"backend {dead} up: health check passed (2/2)" in proxy.log
    assert revived.port == port


def test_hostname_backends_resolve_every_address_off_the_relay(backend_factory,
                                                               proxy_factory, tmp_path):
    a = backend_factory("tag", "A")
    name = f"localhost:{a.port}"
    config = proxy_config(tmp_path / "p.toml", [name], listener="resolve_interval_ms = 200\n")
    proxy = proxy_factory("start", "--config", config)
    wait_for(lambda: f"backend {name} resolves to 127.0.0.1" in proxy.log,
             message="the health process resolving the name")
    # localhost may also be ::1, where nothing listens: failover hides that from clients.
    names, failures, _ = run_clients(proxy.port(), 20, threads=2)
    assert failures == 0 and set(names) == {"A"}
