"""The health-check process's logic, driven directly: names, probes, rise/fall, status lines."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time

from support import free_port

from prefork_proxy import config
from prefork_proxy import health as health_module
from prefork_proxy.balancer import Balancer
from prefork_proxy.health import (
    _CheckerProcess,
    instance_seed,
    needs_process,
    select_addresses,
)
from prefork_proxy.shared import SharedState
from prefork_proxy.status import backend_lines, backend_rows

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
    refusing = free_port()
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
    literal.rows.backend_active[0] += 1  # one connection to slot 0 from the worker of row 0
    table.record_failure(1, 1, 30.0, time.monotonic())
    rows = backend_rows(literal)
    assert [(r["backend"], r["state"], r["down_reason"], r["backup"], r["active"])
            for r in rows] == [("10.0.0.1:1", "up", "", False, 1),
                               ("10.0.0.2:1", "down", "failures", True, 0)]
    lines = backend_lines(rows)
    assert lines[0].split()[:6] == ["listener", "backend", "state", "active", "fails", "last"]
    assert lines[1].split()[1:5] == ["10.0.0.1:1", "up", "1", "0"]
    assert "down (failures, 30 s left), backup" in lines[2]


# --------------------------------------------------------------------------- names


TWO_NAMES = '''[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["bad.test:1", "good.test:1"]
resolve_interval_ms = 100
'''


def _results(checker: _CheckerProcess, count: int, timeout: float = 5.0) -> dict:
    """The next ``count`` resolver results, by name (waits on the resolver's queue)."""
    found = {}
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        try:
            _, (entry, result) = checker.results.get(timeout=0.05)
        except Exception:
            continue
        found[entry.backend.address.host] = result
    return found


def test_a_lookup_failing_with_any_error_is_that_names_result_and_the_thread_lives(monkeypatch):
    """UnicodeError is no OSError: it used to end the resolver thread silently."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "bad.test":
            raise UnicodeError("label empty or too long")
        if host == "good.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port))]
        return real(host, port, *args, **kwargs)

    checker = _checker(TWO_NAMES)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)  # what the resolver thread calls
    checker.getaddrinfo = getaddrinfo
    names = [(0, checker.shared.config.listeners[0], e)
             for e in checker.shared.pool(checker.shared.config.listeners[0], 0)]
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    thread = threading.Thread(target=checker._resolve_forever, args=(names, wake_w), daemon=True)
    thread.start()
    try:
        first, again = _results(checker, 2), _results(checker, 2)  # two rounds
        assert isinstance(first["bad.test"], UnicodeError)
        assert first["good.test"] == [(socket.AF_INET, ("10.0.0.5", 1))]
        assert set(again) == {"bad.test", "good.test"} and thread.is_alive()
    finally:
        checker.stopping.set()
        thread.join(5)


def test_a_dead_resolver_thread_is_noticed_and_replaced(monkeypatch, caplog):
    class Fatal(BaseException):
        """Something no ``except Exception`` catches: the thread dies of it."""

    def getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port))]

    monkeypatch.setattr(health_module, "RESOLVER_RESTART_S", 0.05)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # expected to die
    caplog.set_level(logging.INFO, logger="prefork_proxy.health")
    checker = _checker(TWO_NAMES)
    checker.getaddrinfo = getaddrinfo
    real_start, starts = checker._start_lookup, []

    def start_lookup(*args):
        starts.append(args)
        if len(starts) == 1:
            raise Fatal()  # in the resolver thread itself, outside any lookup
        real_start(*args)

    checker._start_lookup = start_lookup
    listener = checker.shared.config.listeners[0]
    checker._names = [(0, listener, e) for e in checker.shared.pool(listener, 0)]
    wake_r, checker._wake_w = os.pipe2(os.O_NONBLOCK)
    checker.selector.register(wake_r, selectors.EVENT_READ, None)  # as run() does
    try:
        checker._watch_resolver()
        first = checker._resolver
        first.join(5)
        assert not first.is_alive() and "the resolver thread crashed" in caplog.text
        deadline = time.monotonic() + 5
        while checker._resolver is first and time.monotonic() < deadline:
            checker._turn(wake_r)  # what the process's main loop does
        assert "the resolver thread died; starting a new one" in caplog.text
        assert checker._resolver is not first and checker._resolver.is_alive()
        while not checker.table.family[0] and time.monotonic() < deadline:
            checker._turn(wake_r)  # the new thread resolves, the main thread applies
        assert checker.table.address(0) == (socket.AF_INET, ("10.0.0.5", 1))
    finally:
        checker.stopping.set()
        if checker._resolver is not None:
            checker._resolver.join(5)


def _hosts(*last_octets: int, port: int = 5432) -> list:
    return _v4(*(f"10.0.0.{n}" for n in last_octets), port=port)


def test_select_addresses_sorts_numerically_and_keeps_a_per_instance_subset():
    shuffled = _hosts(10, 2, 1, 11, 3)
    assert select_addresses("db", shuffled, 64, b"a") == _hosts(1, 2, 3, 10, 11)
    v6 = [(socket.AF_INET6, ("fe80::a", 1, 0, 0)), (socket.AF_INET6, ("fe80::9", 1, 0, 0))]
    assert select_addresses("db", v6 + _hosts(9), 64, b"a") == _hosts(9) + v6[::-1]
    many = _hosts(*range(1, 101))
    subsets = {seed: select_addresses("db", many, 64, seed) for seed in (b"a", b"b", b"c")}
    for seed, subset in subsets.items():
        assert len(subset) == 64
        assert subset == sorted(subset, key=lambda a: int(a[1][0].rsplit(".", 1)[1]))
        # The order of the answer does not matter.
        assert subset == select_addresses("db", list(reversed(many)), 64, seed)
    assert len({tuple(s) for s in subsets.values()}) == 3  # each proxy its own subset
    # One address more in the answer changes at most one kept address.
    grown = select_addresses("db", many + _hosts(101), 64, b"a")
    assert len(set(grown) - set(subsets[b"a"])) <= 1
    assert instance_seed(123) != instance_seed(124)


def test_more_than_eight_addresses_are_all_held_in_numeric_order(caplog):
    checker = _checker(NAMED)
    shared = checker.shared
    balancer = Balancer(shared.config.listeners[0], shared, 0)
    entry = shared.pool(shared.config.listeners[0], 0)[0]
    assert len(entry.slots) == config.ADDRESSES_PER_NAME >= 64
    caplog.set_level(logging.INFO, logger="prefork_proxy.health")
    checker._apply_addresses(entry, _hosts(*range(12, 0, -1)))  # 12, answered in reverse
    names = [m.name for m in balancer.members()]
    assert names == [f"db:5432 (10.0.0.{n})" for n in range(1, 13)] + ["10.0.0.9:5432"]
    assert "more than" not in caplog.text
    # 100 addresses: a subset of 64, warned once, not on every resolve.
    for _ in range(3):
        checker._apply_addresses(entry, _hosts(*range(1, 101)))
    assert len(balancer.members()) == 64 + 1
    assert caplog.text.count("resolves to 100 addresses, more than the 64") == 1
    checker._apply_addresses(entry, _hosts(*range(1, 102)))  # the answer changed: warn again
    assert caplog.text.count("more than the 64") == 2
    # Failures of any type: warned once per new error, the addresses kept.
    for _ in range(3):
        checker._apply_addresses(entry, UnicodeError("label too long"))
    assert caplog.text.count("cannot resolve: UnicodeError: label too long; keeping") == 1
    assert len(balancer.members()) == 65


# --------------------------------------------------------------------------- reloads


def test_removing_the_checks_by_a_reload_clears_their_verdicts(caplog):
    checked = ('[[tcp_proxy]]\nbind = "127.0.0.1:7000"\nbackends = ["10.0.0.1:1", "10.0.0.2:1"]\n'
               '[tcp_proxy.health_check]\ninterval_ms = 100\n')
    other = '[[tcp_proxy]]\nbind = "127.0.0.1:7001"\nbackends = ["10.0.0.3:1"]\n' \
            'health_check = { interval_ms = 100 }\n'
    shared = SharedState(config.load_text(checked + other))
    table = shared.table
    slots = [entry.slots[0] for _, _, entries in shared.pools() for entry in entries]
    for slot in slots:
        table.active_down[slot], table.last_check[slot] = 1, time.time()
    # Reloaded with the checks kept: the verdicts stay (the checks go on judging).
    shared.reconfigure(config.load_text(checked + other))
    assert [table.active_down[s] for s in slots] == [1, 1, 1]
    caplog.set_level(logging.INFO, logger="prefork_proxy.shared")
    # The first listener's table removed: its backends are no longer held down.
    shared.reconfigure(config.load_text(checked.split("[tcp_proxy.health_check]")[0] + other))
    kept = [entry.slots[0] for entry in shared.pool(shared.config.listeners[0], 0)]
    assert kept == slots[:2]  # the same slots: only the verdicts went
    assert [table.active_down[s] for s in slots] == [0, 0, 1]
    assert table.last_check[slots[0]] == 0.0 and table.last_check[slots[2]] > 0
    assert table.eligible(slots[0], time.monotonic())
    assert "2 backend address(es) no longer held down" in caplog.text
    lines = backend_lines(backend_rows(shared))
    assert " up " in lines[1] and lines[1].rstrip().endswith("-")  # no stale "last check"


def test_a_slow_name_delays_no_other_name():
    """Lookups run concurrently: a name whose DNS takes 1.5 s does not hold the others."""
    def getaddrinfo(host, port, *args, **kwargs):
        if host == "bad.test":
            time.sleep(1.5)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port))]

    checker = _checker(TWO_NAMES)  # resolve_interval_ms = 100
    checker.getaddrinfo = getaddrinfo
    listener = checker.shared.config.listeners[0]
    names = [(0, listener, e) for e in checker.shared.pool(listener, 0)]
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    thread = threading.Thread(target=checker._resolve_forever, args=(names, wake_w), daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        good = 0
        while good < 5 and time.monotonic() - started < 5:
            _, (entry, _) = checker.results.get(timeout=5)
            if entry.backend.address.host == "good.test":
                good += 1
        assert good == 5 and time.monotonic() - started < 1.2  # before the slow one answered
    finally:
        checker.stopping.set()
        thread.join(5)


def test_a_probe_of_a_send_proxy_backend_sends_local_or_unknown_first():
    """v2 LOCAL / v1 UNKNOWN before ``send``, so a backend requiring a header takes the probe
    for the proxy's own connection (real whois backends, tests/backends.py)."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "backends.py"
    procs = [subprocess.Popen([sys.executable, str(script), "whois", "--report"],
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        ports = [int(p.stdout.readline().split()[1]) for p in procs]
        checker = _checker(
            '[[tcp_proxy]]\nbind = "127.0.0.1:0"\nsend_proxy = "v2"\nbackends = ['
            f'"127.0.0.1:{ports[0]}", {{ address = "127.0.0.1:{ports[1]}", send_proxy = "v1" }}]'
            '\n[tcp_proxy.health_check]\ninterval_ms = 2000\ntimeout_ms = 1000\n'
            'send = "PING\\r\\n"\nexpect = "LOCAL"\n'
            '[[tcp_proxy]]\nbind = "127.0.0.1:0"\n'
            f'backends = ["127.0.0.1:{ports[2]}"]\n'
            '[tcp_proxy.health_check]\ninterval_ms = 2000\ntimeout_ms = 1000\n'
            'send = "PING\\r\\n"\nexpect = "NONE"\n')
        results = {}
        checker._record = lambda slot, name, check, passed, reason: results.update(
            {name: (passed, reason)})
        wake_r, _ = os.pipe()
        started = time.monotonic()
        while len(results) < 3 and time.monotonic() - started < 5:
            checker._turn(wake_r)
        assert results == {f"127.0.0.1:{p}": (True, "") for p in ports}
        # What each backend was told: v2 LOCAL and v1 UNKNOWN read as LOCAL; the third none.
        assert [p.stdout.readline().strip() for p in procs] == ["LOCAL", "LOCAL", "NONE"]
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
