"""Counters in the worker rows: exact under load, and never backwards across a SIGKILL.

The master publishes ``SharedState.counters()`` (the read side a metrics
collector uses) in its status file every second; this test reads it there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

import pytest
from support import free_port, recv_exactly, transform, wait_for, write_config

CLIENTS_PER_ROUND = 1000
THREADS = 4


def _clients(port: int, count: int) -> int:
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
        done.append(ok)

    threads = [threading.Thread(target=run, args=(count // THREADS,)) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(done) == THREADS
    return sum(done)


@pytest.mark.timeout(120)
def test_counters_equal_what_clients_counted_and_survive_a_sigkill(backend_factory,
                                                                   proxy_factory, tmp_path):
    backend = backend_factory("echo")
    refused = f"127.0.0.1:{free_port()}"  # nothing listens there: every connect is refused
    pidfile = tmp_path / "proxy.pid"
    config = write_config(tmp_path / "proxy.toml", f"""
[server]
workers = 2
pidfile = "{pidfile}"

[[tcp_proxy]]
name = "front"
bind = "127.0.0.1:0"
backends = ["{backend.address}"]

[[tcp_proxy]]
name = "dead"
bind = "127.0.0.1:0"
backends = ["{refused}"]
""")
    proxy = proxy_factory("start", "--config", str(config))
    proxy.wait_workers(2)
    status_path = f"{pidfile}.status.json"
    wait_for(lambda: os.path.exists(status_path), 10, message="the status file")
    readings = []

    def counters() -> dict:
        with open(status_path) as file:
            status = json.load(file)
        value = status["counters"]
        front = value["listeners"]["front"]["connections_total"]
        readings.append(front)
        return value

    def settled(expected: int) -> dict:
        return wait_for(lambda: (lambda c: c if c["listeners"]["front"]["connections_total"]
                                 == expected else None)(counters()), 10,
                        message=f"front connections_total == {expected}")

    served = _clients(proxy.port(0), CLIENTS_PER_ROUND)
    first = settled(served)
    victim = proxy.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)  # its row is final now; the master folds it when reaped
    wait_for(lambda: victim not in proxy.worker_pids() and len(proxy.worker_pids()) == 2, 10,
             message="the killed worker reaped and respawned")
    wait_for(lambda: all(w["pid"] != victim for w in json.load(open(status_path))["workers"]),
             10, message="status without the killed worker")
    assert counters()["listeners"]["front"]["connections_total"] == served
    proxy.wait_workers(2)
    served += _clients(proxy.port(0), CLIENTS_PER_ROUND)
    final = settled(served)
    assert served == 2 * CLIENTS_PER_ROUND
    assert readings == sorted(readings), "a counter went backwards"

    key = f"front|{backend.address}"
    assert first["backends"][key]["connections_total"] == CLIENTS_PER_ROUND
    counted = final["backends"][key]
    assert {name: counted[name] for name in ("connections_total", "connections_active",
                                             "connect_errors_total", "up")} == {
        "connections_total": served, "connections_active": 0,
        "connect_errors_total": {"refused": 0, "timeout": 0, "unreachable": 0, "other": 0},
        "up": 1}
    # One connect-duration observation per connection, the SIGKILLed worker's included.
    assert sum(counted["connect_duration"]["buckets"]) == served
    assert counted["admin_state"] == "ready"
    assert final["listeners"]["front"]["failovers_total"] == 0

    # Refused connects: each client is one attempt and one error; nothing stays open.
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", proxy.port(1)), timeout=10) as sock:
            sock.settimeout(10)
            assert sock.recv(1) == b""
    dead = f"dead|{refused}"
    wait_for(lambda: counters()["backends"][dead]["connect_errors_total"]["refused"] == 20,
             10, message="20 refused connects counted")
    assert counters()["backends"][dead]["connections_total"] == 20
    assert counters()["backends"][dead]["connections_active"] == 0
    assert counters()["listeners"]["dead"]["connections_total"] == 20
