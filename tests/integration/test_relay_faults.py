"""Faults around the relay, through the real proxy: a relay thread that dies,
TCP keepalive on both sockets of a connection, and the buffer budget under
clients that never read."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import (
    BackendProcess,
    alive,
    cpu_seconds,
    recv_exactly,
    rss_kib,
    transform,
    wait_for,
    write_config,
)

from prefork_proxy.worker import EXIT_RELAY_DIED, TEST_CRASH_ENV


def _round_trip(proxy, payload: bytes = b"hello") -> None:
    with proxy.connect() as sock:
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == transform(payload)


def test_a_dead_relay_thread_stops_its_worker_within_a_second(backend_factory, proxy_factory,
                                                             tmp_path):
    backend = backend_factory("echo")
    trigger = tmp_path / "crash-once"
    trigger.write_text("")
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", backend.address,
                          "--workers", "1", "--threads", "1",
                          env={**os.environ, TEST_CRASH_ENV: str(trigger)})
    (worker,) = proxy.wait_workers(1)
    start = time.monotonic()
    with proxy.connect() as victim:  # the worker's relay loop crashes taking it in
        victim.settimeout(5)
        try:
            victim.recv(10)
        except ConnectionResetError:
            pass
    wait_for(lambda: not alive(worker), 5, interval=0.01, message="the worker to exit")
    elapsed = time.monotonic() - start
    print(f"\ndead relay thread: worker gone {elapsed * 1000:.0f} ms after the client connected")
    assert elapsed < 1.0, f"the worker took {elapsed:.2f} s to exit after its relay thread died"
    assert not trigger.exists()
    log = proxy.log
    assert "relay thread relay-0 died (RuntimeError: injected relay crash (test))" in log
    wait_for(lambda: f"exit code {EXIT_RELAY_DIED}" in proxy.log, 5,
             message="the master to log the worker's exit code")
    # The master respawns the worker, and the proxy serves again.
    (respawned,) = wait_for(lambda: [p for p in proxy.wait_workers(1) if p != worker] or None,
                            10, message="a respawned worker")
    _round_trip(proxy)
    assert alive(respawned)


def _ss_sockets(filter_: str) -> list:
    """Established TCP sockets matching an ``ss`` filter: ``(local, peer, timer or "")``."""
    output = subprocess.run(["ss", "-tnoH", "state", "established", filter_],
                            capture_output=True, text=True, timeout=10, check=True).stdout
    sockets = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            sockets.append((fields[2], fields[3], " ".join(fields[4:])))
    return sockets


def test_tcp_keepalive_is_set_on_the_client_and_the_backend_socket(backend_factory,
                                                                   proxy_factory, tmp_path):
    backend = backend_factory("echo")
    config = write_config(tmp_path / "proxy.toml", f"""
[server]
workers = 1

[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["{backend.address}"]
tcp_keepalive = {{ idle_s = 777, interval_s = 11, count = 3 }}

[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["{backend.address}"]
""")
    proxy = proxy_factory("start", "--config", str(config))
    with proxy.connect(0) as with_keepalive, proxy.connect(1) as without:
        for sock in (with_keepalive, without):
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == transform(b"x")
        # The proxy's side of each client: its local port is the listener's.
        timers = {}
        for index, client in ((0, with_keepalive), (1, without)):
            (found,) = [timer for local, peer, timer
                        in _ss_sockets(f"( sport = :{proxy.port(index)} )")
                        if peer.endswith(f":{client.getsockname()[1]}")]
            timers[index] = found
        # The proxy's sockets to the backend: their remote port is the backend's.
        backend_timers = [timer for _, _, timer in _ss_sockets(f"( dport = :{backend.port} )")]
    assert len(backend_timers) == 2, backend_timers
    assert "keepalive" not in timers[1], timers  # off unless asked
    assert sum("keepalive" in timer for timer in backend_timers) == 1, backend_timers
    # ss shows the time left to the first probe: about idle_s (777 s, 12-13 min),
    # not the kernel's 7200 s: the timings were set, not only SO_KEEPALIVE.
    for timer in [timers[0]] + [t for t in backend_timers if "keepalive" in t]:
        assert re.search(r"timer:\(keepalive,1[23]min", timer), timer


FLOOD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "stalled_readers.py"


@pytest.fixture
def flood_backend():
    """scripts/stalled_readers.py's flood backend: 8 MiB to every client, reads nothing."""
    backend = BackendProcess(command=[sys.executable, str(FLOOD_SCRIPT), "--serve-flood",
                                      str(8 << 20)])
    yield backend.address
    backend.stop()


def _timed_round_trips(sock, count: int) -> list:
    """``count`` request/response exchanges on one kept-alive connection, byte-exact."""
    took = []
    for index in range(count):
        request = f"GET /{index} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        started = time.monotonic()
        sock.sendall(request)
        assert recv_exactly(sock, len(request)) == transform(request)
        took.append(time.monotonic() - started)
    return sorted(took)


@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_clients_that_never_read_hold_the_worker_to_its_buffer_budget(mode, flood_backend,
                                                                      backend_factory,
                                                                      proxy_factory, tmp_path):
    """Stalled readers spend the budget; memory stays bounded, and the same relay
    loop (one worker, one thread) still serves a kept-alive request/response
    connection at once, and new connections."""
    budget_mb, connections = 8, 200
    echo = backend_factory("echo")
    config = write_config(tmp_path / "proxy.toml", f"""
[server]
workers = 1
threads = 1
relay = "{mode}"
buffer_budget_mb = {budget_mb}

[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["{flood_backend}"]

[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["{echo.address}"]
""")
    proxy = proxy_factory("start", "--config", str(config))
    (worker,) = proxy.wait_workers(1)
    start_mib = rss_kib(worker) / 1024
    kept = proxy.connect(1)
    assert len(_timed_round_trips(kept, 5)) == 5
    clients = [proxy.connect() for _ in range(connections)]  # and never read
    try:
        # Wait until nothing moves: RSS and CPU time unchanged for a second.
        samples: list = []

        def settled() -> bool:
            samples.append((time.monotonic(), rss_kib(worker), cpu_seconds(worker)))
            recent = [s for s in samples if s[0] >= samples[-1][0] - 1.0]
            return samples[-1][0] - samples[0][0] >= 1.0 and recent[0][0] <= \
                samples[-1][0] - 0.9 and recent[-1][1] - recent[0][1] <= 64 and \
                recent[-1][2] - recent[0][2] <= 0.01

        wait_for(settled, 30, interval=0.1, message="the stalled relay to settle")
        grown = rss_kib(worker) / 1024 - start_mib
        # The budget, one buffer or pipe past it, a 16 KiB remainder per
        # stalled reader, and the connections' own objects.
        bound = budget_mb + connections * 16 / 1024 + 10
        print(f"{mode}: worker RSS grew by {grown:.1f} MiB (bound {bound:.1f})")
        assert grown < bound, \
            f"worker RSS grew by {grown:.1f} MiB for {connections} stalled readers " \
            f"with a {budget_mb} MiB budget (bound {bound:.1f})"
        cpu, wall = cpu_seconds(worker), time.monotonic()
        wait_for(lambda: time.monotonic() - wall >= 1.0, 2, message="a second")
        used = (cpu_seconds(worker) - cpu) / (time.monotonic() - wall)
        assert used < 0.05, f"the stalled worker used {used:.0%} of a CPU"
        # The same loop still serves: the kept-alive connection answers at
        # once, and a new connection (its first read too) is served.
        took = _timed_round_trips(kept, 100)
        print(f"{mode}: kept-alive round trips while stalled: median "
              f"{took[50] * 1000:.2f} ms, worst {took[-1] * 1000:.2f} ms")
        assert took[50] < 0.010, f"median round trip {took[50] * 1000:.1f} ms"
        with proxy.connect(1) as fresh:
            took = _timed_round_trips(fresh, 20)
            assert took[10] < 0.010, took
        with proxy.connect() as flood:  # a new flood client gets its first bytes
            assert len(recv_exactly(flood, 1 << 20)) == 1 << 20
    finally:
        for sock in clients:
            sock.close()
        kept.close()
    # Once they are gone, the memory goes back to the system.
    wait_for(lambda: rss_kib(worker) / 1024 - start_mib < 6, 10,
             message="the worker's RSS to return near its start")
    _round_trip_flood = proxy.connect()
    assert recv_exactly(_round_trip_flood, 1 << 20)  # still serving
    _round_trip_flood.close()
