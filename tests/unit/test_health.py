"""The health-check process's logic, driven directly: names, probes, rise/fall, status lines."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from prefork_proxy import config
from prefork_proxy.balancer import Balancer
from prefork_proxy.health import _CheckerProcess, describe_backends, needs_process
from prefork_proxy.shared import SharedState

NAMED = '''[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["db:5432", "10.0.0.9:5432"]
'''


def _checker(text: str) -> _CheckerProcess:
    return _CheckerProcess(SharedState(config.load_text(text)), os.getppid())


def _v4(*hosts: str, port: int = 5432) -> list:
    return [(socket.AF_INET, (host, port)) for host in hosts]


def test_every_address_of_a_name_is_a_backend_and_keeps_its_slot_and_health():
    checker = _checker(NAMED)
    shared, table = checker.shared, checker.table
    balancer = Balancer(shared.config.listeners[0], shared, 0)
    entry = shared.pool(shared.config.listeners[0], 0)[0]
    # Before the first resolution the name stands for itself (resolved on use).
    assert [m.name for m in balancer.members()] == ["db:5432", "10.0.0.9:5432"]
    checker._apply_addresses(entry, _v4("10.0.0.1", "10.0.0.2"))
    assert table.version[0] % 2 == 0
    assert [m.name for m in balancer.members()] == \
        ["db:5432 (10.0.0.1)", "db:5432 (10.0.0.2)", "10.0.0.9:5432"]
    second = balancer.members()[1].slot
    table.active_down[second] = 1
    checker._apply_addresses(entry, _v4("10.0.0.2", "10.0.0.3"))
    names = {m.name: m.slot for m in balancer.members()}
    assert set(names) == {"db:5432 (10.0.0.2)", "db:5432 (10.0.0.3)", "10.0.0.9:5432"}
    assert names["db:5432 (10.0.0.2)"] == second and table.active_down[second] == 1
    # A failed lookup keeps the last addresses rather than dropping the backend.
    checker._apply_addresses(entry, OSError("Temporary failure in name resolution"))
    assert len(balancer.members()) == 3


def test_rise_and_fall_change_state_once_each_and_clear_passive_marks(caplog):
    checker = _checker(NAMED + "[tcp_proxy.health_check]\ninterval_ms = 100\nrise = 2\n"
                               "fall = 3\n")
    check = checker.shared.config.listeners[0].health_check
    table, slot = checker.table, config.ADDRESSES_PER_NAME  # the IP literal after the name
    caplog.set_level(logging.INFO, logger="prefork_proxy.health")
    for _ in range(2):
        checker._record(slot, "b", check, False, "connect refused")
    assert not table.active_down[slot]
    for _ in range(3):
        checker._record(slot, "b", check, False, "connect refused")
    assert table.active_down[slot] == 1
    assert caplog.text.count("backend b down: connect refused (3/3)") == 1
    checker._record(slot, "b", check, True, "")
    assert table.active_down[slot] == 1  # one pass is not rise
    checker._record(slot, "b", check, True, "")
    assert table.active_down[slot] == 0 and "backend b up: health check passed (2/2)" in caplog.text
    # Marked down by clients' failures: brought back by rise passes counted from the mark.
    table.record_failure(slot, 1, 60.0, time.monotonic())
    checker._record(slot, "b", check, True, "")
    assert table.passive_down[slot] == 1
    checker._record(slot, "b", check, True, "")
    assert table.passive_down[slot] == 0 and table.eligible(slot, time.monotonic())
    assert "since client connects failed" in caplog.text


def test_probes_connect_send_and_compare_the_reply_concurrently():
    """One turn of the loop probes a good, a wrong, a refusing and a silent backend."""
    servers = []

    def serve(reply: bytes) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        servers.append(listener)

        def run() -> None:
            try:
                while True:
                    conn, _ = listener.accept()
                    if reply:
                        conn.recv(64)
                        conn.sendall(reply)
                    servers.append(conn)  # kept open: "silent" never answers
            except OSError:
                pass
        threading.Thread(target=run, daemon=True).start()
        return listener.getsockname()[1]

    good, wrong, silent = serve(b"+PONG\r\n"), serve(b"-ERR\r\n"), serve(b"")
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        refusing = placeholder.getsockname()[1]
    addresses = [f"127.0.0.1:{p}" for p in (good, wrong, refusing, silent)]
    checker = _checker('[[tcp_proxy]]\nbind = "127.0.0.1:0"\nbackends = ['
                       + ", ".join(f'"{a}"' for a in addresses) + ']\n'
                       '[tcp_proxy.health_check]\ninterval_ms = 2000\ntimeout_ms = 300\n'
                       'fall = 1\nsend = "PING\\r\\n"\nexpect = "+PONG"\n')
    results = {}
    checker._record = lambda slot, name, check, passed, reason: results.update(
        {name: (passed, reason)})
    wake_r, _ = os.pipe()
    started = time.monotonic()
    while len(results) < 4 and time.monotonic() - started < 5:
        checker._turn(wake_r)
    assert results[addresses[0]] == (True, "")
    assert results[addresses[1]] == (False, "reply b'-ERR\\r' does not start with b'+PONG'")
    assert results[addresses[2]] == (False, "connect refused")
    assert results[addresses[3]] == (False, "reply timed out after 300 ms")
    assert time.monotonic() - started < 1.5  # one slow backend did not serialise the others
    for sock in servers:
        sock.close()


def test_status_lines_and_when_a_process_is_needed():
    literal = SharedState(config.load_text('[[tcp_proxy]]\nbind = "127.0.0.1:0"\n'
                                           'backends = ["10.0.0.1:1", { address = "10.0.0.2:1", '
                                           'backup = true }]\n'))
    assert not needs_process(literal)
    assert needs_process(_checker(NAMED).shared)
    table = literal.table
    table.acquire(0)
    table.record_failure(1, 1, 30.0, time.monotonic())
    lines = describe_backends(literal)
    assert lines[0].split()[:6] == ["listener", "backend", "state", "active", "fails", "last"]
    assert lines[1].split()[1:5] == ["10.0.0.1:1", "up", "1", "0"]
    assert "down (failures, 30 s left), backup" in lines[2]
    table.release(0)
