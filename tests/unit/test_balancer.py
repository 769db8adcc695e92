"""Backend choice: schedules, algorithms, failover order, passive health, shared counts."""

from __future__ import annotations

import collections
import logging
import os
import random
import signal
import socket
import time

import pytest
from support import wait_for

from prefork_proxy import balancer as balancer_module
from prefork_proxy import config
from prefork_proxy.balancer import (
    Balancer,
    RotationSchedule,
    smooth_weighted_order,
    smooth_weighted_schedule,
)
from prefork_proxy.config import Backend, Endpoint
from prefork_proxy.relay import CONNECTED, FAILED, RELEASED
from prefork_proxy.shared import BackendTable, RoundRobinCounter, SharedState


def _backends(*weights: int, backup: int = -1):
    return [Backend(Endpoint(f"b{i}", 1000 + i), weight=w, backup=(i == backup))
            for i, w in enumerate(weights)]


def _balancer(backends: str, **keys: object) -> Balancer:
    """A balancer over ``backends`` (a TOML array) with extra listener keys, fresh state."""
    extra = "".join(f"{key} = {value!r}\n".replace("'", '"') for key, value in keys.items())
    loaded = config.load_text(f'[[tcp_proxy]]\nbind = "127.0.0.1:0"\nbackends = {backends}\n'
                              + extra)
    return Balancer(loaded.listeners[0], SharedState(loaded), 0)


THREE = '["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]'


def _names(targets) -> list:
    return [t.name for t in targets]


def _first(balancer: Balancer, client: object = None, outcome: str = RELEASED) -> str:
    """Choose for one client, connect to the first choice, end the connection at once."""
    target = next(balancer.targets(client))
    target.report(outcome, "")
    return target.name


def test_equal_weights_rotate_in_order():
    a, b, c = _backends(1, 1, 1)
    assert smooth_weighted_schedule([a, b, c]) == [a, b, c]


def test_smooth_weighted_spreads_heavy_backends():
    a, b, c = _backends(5, 1, 1)
    assert smooth_weighted_schedule([a, b, c]) == [a, a, b, a, c, a, a]


def test_weights_1_to_3_split_exactly_25_75():
    balancer = _balancer('["10.0.0.1:1", { address = "10.0.0.2:1", weight = 3 }]')
    counts = collections.Counter(_first(balancer) for _ in range(10_000))
    assert counts == {"10.0.0.1:1": 2500, "10.0.0.2:1": 7500}


def test_failover_tries_every_backend_once_in_rotation_order():
    balancer = _balancer(THREE)
    assert _names(balancer.targets()) == ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]
    assert _names(balancer.targets()) == ["10.0.0.2:1", "10.0.0.3:1", "10.0.0.1:1"]


class _Clock:
    """Stands in for the ``time`` module inside balancer.py: time moves when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_retries_limit_the_attempts_and_the_budget_bounds_each(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(balancer_module, "time", clock)
    balancer = _balancer(THREE, retries=1, connect_timeout_ms=300, connect_budget_ms=500)
    targets = balancer.targets()
    assert next(targets).timeout_s == pytest.approx(0.3)
    clock.now += 0.3  # the first attempt timed out
    assert next(targets).timeout_s == pytest.approx(0.2)  # what is left of the budget
    assert next(targets, None) is None  # retries = 1: two attempts in all
    late = balancer.targets()
    clock.now += 0.5  # the budget counts from the accept: spent before the first attempt
    assert list(late) == []


def test_backups_serve_only_while_every_primary_is_down():
    balancer = _balancer('["10.0.0.1:1", "10.0.0.2:1", { address = "10.0.0.9:1", backup = true }]')
    assert {_first(balancer) for _ in range(6)} == {"10.0.0.1:1", "10.0.0.2:1"}
    # Failover order: the primaries first, the backup after them.
    assert _names(balancer.targets())[-1] == "10.0.0.9:1"
    table = balancer.table
    for member in balancer.members()[:2]:
        table.active_down[member.slot] = 1
    assert {_first(balancer) for _ in range(4)} == {"10.0.0.9:1"}
    table.active_down[balancer.members()[0].slot] = 0
    assert {_first(balancer) for _ in range(4)} == {"10.0.0.1:1"}


def test_everything_down_still_tries_everything():
    balancer = _balancer(THREE)
    for member in balancer.members():
        balancer.table.active_down[member.slot] = 1
    assert sorted(_names(balancer.targets())) == ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]


def test_passive_fall_marks_down_once_for_everyone_and_success_brings_it_back(caplog):
    balancer = _balancer(THREE, fall=2, fail_timeout_ms=60_000)
    other_worker = Balancer(balancer.listener, _shared_of(balancer), 0)
    dead = balancer.members()[1]
    caplog.set_level(logging.INFO, logger="prefork_proxy.balancer")
    for _ in range(2):
        target = next(t for t in balancer.targets() if t.name == dead.name)
        target.report(FAILED, "Connection refused")
    assert caplog.text.count("backend 10.0.0.2:1 down: Connection refused (2/2") == 1
    # Down for every balancer on the table, as for every worker.
    assert dead.name not in {_first(other_worker) for _ in range(9)}
    assert _names(other_worker.targets())[-1] == dead.name  # last resort only
    # One more failure (the try after fail_timeout) logs nothing new.
    next(t for t in balancer.targets() if t.name == dead.name).report(FAILED, "refused")
    assert caplog.text.count("down:") == 1
    # A success ends the run and brings it back, logged once.
    next(t for t in balancer.targets() if t.name == dead.name).report(CONNECTED, "")
    assert "backend 10.0.0.2:1 up" in caplog.text
    assert dead.name in {_first(other_worker) for _ in range(3)}


def test_passive_down_ends_after_fail_timeout():
    # 500 ms: long enough that the first check surely runs inside it, even on
    # a loaded machine; the comeback is then waited for, not slept for.
    balancer = _balancer(THREE, fall=1, fail_timeout_ms=500)
    dead = balancer.members()[0]
    marked = time.monotonic()
    next(balancer.targets()).report(FAILED, "refused")
    assert dead.name not in {_first(balancer) for _ in range(6)}
    wait_for(lambda: dead.name in {_first(balancer) for _ in range(3)}, 5,
             message="the backend to be tried again after fail_timeout")
    assert time.monotonic() - marked >= 0.5


def test_fall_zero_never_marks_down():
    balancer = _balancer(THREE, fall=0)
    for _ in range(5):
        next(balancer.targets()).report(FAILED, "refused")
    assert {_first(balancer) for _ in range(3)} == {m.name for m in balancer.members()}


def test_least_conn_picks_the_fewest_active_per_weight():
    balancer = _balancer('["10.0.0.1:1", "10.0.0.2:1", { address = "10.0.0.3:1", weight = 2 }]',
                         balance="least_conn")
    held = [next(balancer.targets()) for _ in range(8)]  # connected, never released
    counts = collections.Counter(t.name for t in held)
    assert counts == {"10.0.0.1:1": 2, "10.0.0.2:1": 2, "10.0.0.3:1": 4}
    for target in held:
        if target.name == "10.0.0.1:1":
            target.report(RELEASED, "")
    assert [_first(balancer, outcome=CONNECTED) for _ in range(2)] == ["10.0.0.1:1"] * 2


def test_random_two_prefers_the_less_loaded_and_spreads():
    balancer = _balancer(THREE, balance="random_two")
    held = [next(balancer.targets()) for _ in range(300)]
    counts = collections.Counter(t.name for t in held)
    assert max(counts.values()) - min(counts.values()) <= 3, counts


def test_source_hash_is_stable_and_moves_only_the_lost_backends_clients():
    four = '["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1", "10.0.0.4:1"]'
    balancer = _balancer(four, balance="source_hash")
    clients = [(f"127.0.{i // 250}.{i % 250 + 1}", 40000 + i) for i in range(1000)]
    before = {c[0]: _first(balancer, c) for c in clients}
    assert all(_first(balancer, (c[0], 1)) == before[c[0]] for c in clients[:100])  # port ignored
    assert min(collections.Counter(before.values()).values()) > 180  # roughly a quarter each
    lost = balancer.members()[3]
    balancer.table.active_down[lost.slot] = 1
    after = {c[0]: _first(balancer, c) for c in clients}
    moved = {c for c in before if before[c] != after[c]}
    assert moved == {c for c in before if before[c] == lost.name}
    assert 0.18 < len(moved) / len(clients) < 0.32


@pytest.mark.parametrize("atomic", [True, False], ids=["libatomic", "record-lock"])
def test_counter_is_global_across_forked_processes(atomic):
    """8 processes draw 500 tickets each: every ticket is drawn exactly once."""
    counter = RoundRobinCounter(atomic=atomic)
    if atomic and not counter.atomic:
        pytest.skip("libatomic cannot be loaded here")
    assert counter.atomic == atomic
    drawn = []
    for output in _in_children(8, lambda: ",".join(str(counter.draw()) for _ in range(500))):
        drawn.extend(int(t) for t in output.split(","))
    assert sorted(drawn) == list(range(4000))


def test_locks_are_released_when_their_holder_is_killed():
    table = BackendTable(slots=8)
    counter = RoundRobinCounter()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: take the locks, say so, and wait to be killed holding them
        table.lock.__enter__()
        counter._lock.__enter__()
        os.write(write_end, b"x")
        time.sleep(60)
        os._exit(0)
    assert os.read(read_end, 1) == b"x"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read_end)
    os.close(write_end)
    started = time.monotonic()
    assert table.record_failure(0, 3, 1.0, 0.0) == (1, False)
    assert [counter.draw() for _ in range(100)] == list(range(100))
    assert time.monotonic() - started < 1.0


def _shared_of(balancer: Balancer) -> SharedState:
    shared = SharedState.__new__(SharedState)  # the same table and pools, as a forked worker has
    shared.table, shared.rows = balancer.table, balancer.rows
    shared._keys = [("port 0", 0)]
    shared._round_robin = {("port 0", 0): balancer.counter}
    shared._pools = {("port 0", 0): balancer.entries}
    shared._listener_slots = {("port 0", 0): 0}
    return shared


def _in_children(count: int, work) -> list:
    """Run ``work`` in ``count`` forked children at once; return what each returned."""
    readers = []
    for _ in range(count):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: report, then leave without running pytest's teardown
            os.close(read_end)
            try:
                os.write(write_end, work().encode())
            finally:
                os._exit(0)
        os.close(write_end)
        readers.append((pid, read_end))
    outputs = []
    for pid, read_end in readers:
        with os.fdopen(read_end, "rb") as f:
            outputs.append(f.read().decode())
        os.waitpid(pid, 0)
    return outputs


def test_a_reload_keeps_the_state_of_backends_and_listeners_that_stay():
    def load(backends: str) -> config.Config:
        # With checks in both configs: a verdict of checks survives a reload that
        # keeps them (one that removes them clears it, see test_health).
        return config.load_text(f'[[tcp_proxy]]\nbind = "127.0.0.1:7000"\nbackends = {backends}\n'
                                'health_check = { interval_ms = 1000 }\n')

    first = load('["10.0.0.1:1", "10.0.0.2:1", "db:5"]')
    shared = SharedState(first)
    slots = {str(e.backend.address): e.slots for e in shared.pool(first.listeners[0], 0)}
    counter = shared.round_robin(first.listeners[0], 0)
    shared.table.active_down[slots["10.0.0.2:1"][0]] = 1
    shared.table.fails[slots["10.0.0.2:1"][0]] = 7

    second = load('[{ address = "10.0.0.2:1", weight = 2 }, "10.0.0.3:1"]')
    shared.reconfigure(second)
    kept = {str(e.backend.address): e.slots for e in shared.pool(second.listeners[0], 0)}
    assert kept["10.0.0.2:1"] == slots["10.0.0.2:1"]
    assert shared.table.active_down[kept["10.0.0.2:1"][0]] == 1
    assert shared.table.fails[kept["10.0.0.2:1"][0]] == 7
    assert kept["10.0.0.3:1"][0] not in {s for group in slots.values() for s in group}
    assert shared.round_robin(second.listeners[0], 0) is counter
    balancer = Balancer(second.listeners[0], shared, 0)  # a worker of the new generation
    assert [m.name for m in balancer.members()] == ["10.0.0.2:1", "10.0.0.3:1"]
    assert {_first(balancer) for _ in range(3)} == {"10.0.0.3:1"}  # 10.0.0.2 is still down


# --------------------------------------------------------------------------- names


def _no_dns(monkeypatch) -> None:
    """Any resolver call from a balancer is a bug: it would block the relay thread."""
    def forbidden(*args, **kwargs):
        raise AssertionError("getaddrinfo called from a balancer")

    monkeypatch.setattr(socket, "getaddrinfo", forbidden)


def test_an_unresolved_name_is_skipped_without_any_lookup(monkeypatch):
    for balance in ("round_robin", "least_conn", "random_two", "source_hash"):
        balancer = _balancer('["db.invalid:1", "10.0.0.2:1"]', balance=balance)
        _no_dns(monkeypatch)
        for _ in range(4):
            assert _names(balancer.targets(("10.9.9.9", 1))) == ["10.0.0.2:1"]
        monkeypatch.undo()


def test_with_no_name_resolved_a_client_pauses_until_one_is(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(balancer_module, "time", clock)
    balancer = _balancer('["db.invalid:1", "cache.invalid:2"]', connect_timeout_ms=300)
    _no_dns(monkeypatch)
    targets = balancer.targets()
    pause = next(targets)
    assert pause.sockaddr is None and 0 < pause.timeout_s <= balancer_module.RESOLVE_WAIT_S
    clock.now += pause.timeout_s
    assert next(targets).sockaddr is None  # still nothing: another pause
    # The health process writes an address for the second name.
    entry = _shared_of(balancer).pool(balancer.listener, 0)[1]
    table = balancer.table
    table.begin_write()
    table.set_address(entry.slots[0], socket.AF_INET, ("10.0.0.7", 2))
    table.end_write()
    assert [(t.name, t.sockaddr) for t in targets] == [("cache.invalid:2 (10.0.0.7)",
                                                        ("10.0.0.7", 2))]


def test_a_pause_never_outlasts_the_connect_timeout_or_budget(monkeypatch, caplog):
    clock = _Clock()
    monkeypatch.setattr(balancer_module, "time", clock)
    caplog.set_level(logging.INFO, logger="prefork_proxy.balancer")
    for keys, limit in (({"connect_timeout_ms": 300}, 0.3),
                        ({"connect_timeout_ms": 100, "connect_budget_ms": 250}, 0.25)):
        balancer = _balancer('["db.invalid:1"]', **keys)
        waited = 0.0
        for pause in balancer.targets():
            assert pause.sockaddr is None
            waited += pause.timeout_s
            clock.now += pause.timeout_s
        assert waited == pytest.approx(limit, abs=0.002)
    assert caplog.text.count("no backend address known yet (db.invalid:1 not resolved)") == 2


def test_failover_past_a_down_backend_ends_cleanly_for_every_algorithm():
    """least_conn and random_two used to raise at the end of such a failover (an empty
    group of down backups reached min() / random.choices)."""
    for balance in ("round_robin", "least_conn", "random_two", "source_hash"):
        balancer = _balancer(THREE, balance=balance)
        balancer.table.active_down[balancer.members()[0].slot] = 1
        names = _names(balancer.targets(("10.9.9.9", 1)))
        assert sorted(names) == ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"], balance
        assert names[-1] == "10.0.0.1:1"  # the down one last


# -- scale: the rotation schedule and the cached view of up backends


def test_rotation_gives_every_backend_its_weight_per_cycle_spread_evenly():
    """Exact shares in every cycle; each backend's gaps at most 2.5 times W / weight."""
    rng = random.Random(15)
    sets = [[5, 1, 1], [3, 2], [7, 5, 3, 1], [1000] * 3 + [1], [2] * 77 + [1]]
    sets += [[rng.randint(1, rng.choice([3, 10, 50])) for _ in range(rng.randint(2, 30))]
             for _ in range(150)]
    for weights in sets:
        order = smooth_weighted_order(weights)
        total = sum(weights)
        assert collections.Counter(order) == dict(enumerate(weights))
        schedule = RotationSchedule(weights)
        assert [schedule.index(t) for t in range(total, 2 * total)] == order  # periodic
        for i, weight in enumerate(weights):
            hits = [t for t, j in enumerate(order) if j == i]
            gaps = [(hits[(k + 1) % len(hits)] - hit) % total or total
                    for k, hit in enumerate(hits)]
            assert max(gaps) <= 2.5 * total / weight, (weights, i, gaps)


def test_rotation_failover_order_yields_each_backend_once_lazily():
    schedule = RotationSchedule(list(range(1, 301)))
    order = schedule.order(12345)
    assert next(order) == schedule.index(12345)
    rest = list(order)
    assert sorted(rest + [schedule.index(12345)]) == list(range(300))


def test_a_schedule_for_1000_backends_is_recomputed_in_well_under_100_ms():
    """The old schedule (the whole smooth weighted cycle) took seconds here."""
    rng = random.Random(15)
    backends = ", ".join(f'{{ address = "127.0.{i // 250}.{i % 250 + 1}:9", '
                         f'weight = {rng.randint(1, 10)} }}' for i in range(1000))
    balancer = _balancer(f"[{backends}]")
    _first(balancer)
    slowest = 0.0
    for k in range(5):
        slot = balancer.members()[k * 101].slot
        balancer.table.active_down[slot] = 1  # as a health check marks it
        started = time.process_time()
        name = _first(balancer)
        slowest = max(slowest, time.process_time() - started)
        assert name != balancer.members()[k * 101].name
        balancer.table.active_down[slot] = 0
    assert slowest < 0.1, f"{slowest * 1000:.1f} ms"


def test_picks_read_no_health_cell_until_one_changes(monkeypatch):
    """The list of up backends is kept while ``health_version`` stands still."""
    balancer = _balancer(THREE)
    _first(balancer)
    scans = []
    real = balancer.table.eligible
    monkeypatch.setattr(balancer.table, "eligible", lambda slot, now: scans.append(slot)
                        or real(slot, now))
    for _ in range(10):
        _first(balancer)
    assert scans == []
    version = balancer.table.health_version.peek()
    balancer.table.active_down[balancer.members()[1].slot] = 1  # any writer bumps it
    assert balancer.table.health_version.peek() != version
    assert "10.0.0.2:1" not in {_first(balancer) for _ in range(6)}
    assert len(scans) == 3  # one rebuild, then the kept view again


def test_random_two_and_source_hash_scale_to_1000_backends():
    backends = ", ".join(f'"127.0.{i // 250}.{i % 250 + 1}:9"' for i in range(1000))
    spread = _balancer(f"[{backends}]", balance="random_two")
    random.seed(15)  # the draws the balancer makes: the same every run
    held = [next(spread.targets()) for _ in range(3000)]
    counts = collections.Counter(t.name for t in held)
    # 3,000 draws into 1,000 backends: one choice would put ~8 on the busiest
    assert len(counts) > 900 and max(counts.values()) <= 6, max(counts.values())
    hashed = _balancer(f"[{backends}]", balance="source_hash")
    first = {f"10.9.0.{i}": _first(hashed, (f"10.9.0.{i}", 1)) for i in range(1, 200)}
    assert all(_first(hashed, (host, 2)) == name for host, name in first.items())


# -- the operator's drain / disable (BackendTable.admin_state, prefork-proxy backend)


def test_a_drained_backend_is_never_tried_not_even_as_a_last_resort():
    from prefork_proxy.shared import ADMIN_DISABLED, ADMIN_DRAIN, ADMIN_READY

    balancer = _balancer(THREE)
    table = balancer.table
    first, second, third = balancer.members()
    table.admin_state[second.slot] = ADMIN_DRAIN
    assert "10.0.0.2:1" not in {_first(balancer) for _ in range(9)}
    # Every other backend down by checks: the down ones are tried, the drained one not.
    table.active_down[first.slot] = table.active_down[third.slot] = 1
    assert _names(balancer.targets()) in (["10.0.0.1:1", "10.0.0.3:1"],
                                          ["10.0.0.3:1", "10.0.0.1:1"])
    table.admin_state[first.slot] = table.admin_state[third.slot] = ADMIN_DISABLED
    assert _names(balancer.targets()) == []
    table.admin_state[second.slot] = ADMIN_READY  # enable: the next pick sees it
    assert _names(balancer.targets()) == ["10.0.0.2:1"]


def test_a_single_drained_backend_gets_no_connection():
    from prefork_proxy.shared import ADMIN_DRAIN, ADMIN_READY

    balancer = _balancer('["10.0.0.1:1"]')
    slot = balancer.members()[0].slot
    balancer.table.admin_state[slot] = ADMIN_DRAIN
    assert _names(balancer.targets()) == []
    balancer.table.admin_state[slot] = ADMIN_READY
    assert _names(balancer.targets()) == ["10.0.0.1:1"]
