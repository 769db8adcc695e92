"""Shared connection limits (prefork_proxy.limits) across real forked processes."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from prefork_proxy import limits as limits_module
from prefork_proxy.limits import (
    REFUSED_LEDGER_FULL,
    REFUSED_LISTENER,
    REFUSED_RATE,
    REFUSED_SHARE,
    REFUSED_SOURCE,
    REFUSED_TABLE_FULL,
    ConnectionLimits,
    source_key,
)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _race(count: int, work) -> list:
    """Fork ``count`` children that start ``work()`` at one signal; return what each returned.

    Each child stays alive (holding what it acquired) until the returned ``finish()``
    is called, so nothing is released by a child's exit during the count.
    """
    start_read, start_write = os.pipe()
    stay_read, stay_write = os.pipe()
    children = []
    for _ in range(count):
        out_read, out_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: wait for the start, work, report, stay until told
            try:
                os.close(start_write)
                os.close(stay_write)
                os.read(start_read, 1)
                os.write(out_write, (work() + "\n").encode())
                os.read(stay_read, 1)
            finally:
                os._exit(0)
        os.close(out_write)
        children.append((pid, out_read))
    os.write(start_write, b"x" * count)
    results = []
    for _, out_read in children:
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(out_read, 4096)
            assert chunk, "a child died before it reported"
            line += chunk
        results.append(line.decode().strip())
    pids = [pid for pid, _ in children]

    def finish() -> None:
        os.close(stay_write)  # every child's read returns EOF: they exit
        for pid, out_read in children:
            os.waitpid(pid, 0)
            os.close(out_read)
        os.close(start_read)
        os.close(start_write)
        os.close(stay_read)

    return results, pids, finish


def _admitted(tokens: str) -> int:
    return sum(int(t) >= 0 for t in tokens.split(",") if t)


def test_three_processes_racing_for_one_source_get_exactly_the_limit():
    limits = ConnectionLimits(sources=64, rows=8)
    results, pids, finish = _race(3, lambda: ",".join(
        str(limits.acquire(0, "192.0.2.7", max_per_source=10)) for _ in range(10)))
    try:
        assert sum(_admitted(r) for r in results) == 10
        refusals = {int(t) for r in results for t in r.split(",") if int(t) < 0}
        assert refusals == {REFUSED_SOURCE}
        assert limits.source_connections(0, "192.0.2.7") == 10
        assert limits.source_connections(0, "::ffff:192.0.2.7") == 10  # one source, two spellings
        assert limits.acquire(0, "192.0.2.7", max_per_source=10) == REFUSED_SOURCE  # the 11th
        assert limits.source_connections(1, "192.0.2.7") == 0  # another listener: its own count
    finally:
        finish()
    # The children exited without releasing: as if killed; the sweep gives it all back.
    assert limits.sweep() == 3
    assert limits.source_connections(0, "192.0.2.7") == 0


def test_closing_one_lets_exactly_one_more_in():
    limits = ConnectionLimits(sources=64, rows=8)
    tokens = [limits.acquire(0, "2001:db8::1", max_per_source=10) for _ in range(10)]
    assert all(t >= 0 for t in tokens)
    assert limits.acquire(0, "2001:db8::1", max_per_source=10) == REFUSED_SOURCE
    assert limits.release(tokens[3]) is True
    again = limits.acquire(0, "2001:db8::1", max_per_source=10)
    assert again >= 0
    assert limits.acquire(0, "2001:db8::1", max_per_source=10) == REFUSED_SOURCE
    assert limits.acquire(0, "2001:db8::2", max_per_source=10) >= 0  # other sources are apart


def test_release_counts_once_even_when_the_record_is_reused():
    limits = ConnectionLimits(sources=8, rows=4)
    first = limits.acquire(0, "192.0.2.1", max_connections=100, max_per_source=5)
    assert limits.release(first) is True
    assert limits.release(first) is False  # twice: nothing
    second = limits.acquire(0, "192.0.2.1", max_connections=100, max_per_source=5)
    assert second & 0xFFFFF == first & 0xFFFFF and second != first  # same record, new generation
    assert limits.release(first) is False  # a stale token does not end the new connection
    assert limits.source_connections(0, "192.0.2.1") == 1 and limits.connections(0) == 1
    assert limits.release(second) is True
    assert limits.connections(0) == 0 and limits.source_connections(0, "192.0.2.1") == 0
    assert limits.release(-1) is False and limits.release(REFUSED_SOURCE) is False


def test_a_token_is_only_released_by_the_process_that_acquired_it():
    limits = ConnectionLimits(sources=8, rows=4)
    token = limits.acquire(0, "192.0.2.1", max_per_source=5)
    results, _, finish = _race(1, lambda: str(limits.release(token)))
    finish()
    assert results == ["False"]
    assert limits.source_connections(0, "192.0.2.1") == 1


def test_sigkill_of_a_worker_holding_five_gives_the_source_five_again_after_the_sweep():
    limits = ConnectionLimits(sources=64, rows=8)
    limits.acquire(0, "192.0.2.9", max_per_source=10)  # the parent holds some too
    limits.acquire(0, "192.0.2.9", max_per_source=10)
    results, pids, finish = _race(1, lambda: ",".join(
        str(limits.acquire(0, "192.0.2.9", max_per_source=7)) for _ in range(5)))
    assert _admitted(results[0]) == 5
    assert limits.acquire(0, "192.0.2.9", max_per_source=7) == REFUSED_SOURCE
    os.kill(pids[0], signal.SIGKILL)
    finish()
    assert limits.acquire(0, "192.0.2.9", max_per_source=7) == REFUSED_SOURCE  # not yet swept
    started = time.monotonic()
    assert limits.sweep() == 1
    assert [limits.acquire(0, "192.0.2.9", max_per_source=7) >= 0 for _ in range(6)] == \
        [True] * 5 + [False]
    assert time.monotonic() - started < 1.0
    assert limits.sweep() == 0  # nothing dead left; the parent's own row is alive


def test_a_worker_killed_inside_an_update_is_recounted_from_the_live_ledgers():
    limits = ConnectionLimits(sources=64, rows=8)
    kept = [limits.acquire(0, "192.0.2.1", max_connections=50, max_per_source=9)
            for _ in range(3)]

    def half_done() -> str:
        # As a worker SIGKILLed in the middle of ``acquire``: counts raised, no record.
        token = limits.acquire(0, "192.0.2.1", max_connections=50, max_per_source=9)
        with limits.lock:
            limits.row_dirty[limits._row] = 1
            limits.scope_count[0] += 1
            slot = limits._find(source_key(0, "192.0.2.1"), hash(source_key(0, "192.0.2.1")))
            limits.count[slot] += 1
            return str(token)  # the child reports from inside the lock, then is killed

    results, pids, finish = _race(1, half_done)
    os.kill(pids[0], signal.SIGKILL)
    finish()
    assert limits.connections(0) == 5 and limits.source_connections(0, "192.0.2.1") == 5
    assert limits.sweep() == 1
    assert limits.connections(0) == 3 and limits.source_connections(0, "192.0.2.1") == 3
    assert limits.live_sources(0) == 1  # recounted too
    assert all(limits.release(t) for t in kept)
    assert limits.connections(0) == 0 and limits.source_connections(0, "192.0.2.1") == 0
    assert limits.live_sources(0) == 0


def test_the_listener_limit_is_exact_across_four_racing_processes():
    limits = ConnectionLimits(sources=64, rows=8)
    # 4 x 300 attempts at once for 700 places: exactly 700 get one.
    results, _, finish = _race(4, lambda: ",".join(
        str(limits.acquire(3, "192.0.2.1", max_connections=700)) for _ in range(300)))
    try:
        assert sum(_admitted(r) for r in results) == limits.connections(3) == 700
        assert limits.at_capacity(3, 700) and not limits.at_capacity(3, 701)
        assert not limits.at_capacity(3, 0)  # 0: no limit
        assert limits.acquire(3, "192.0.2.1", max_connections=700) == REFUSED_LISTENER
    finally:
        finish()
    assert limits.sweep() == 4 and limits.connections(3) == 0

    def churn() -> str:
        # Acquire and release at once with the others: never above 700, and what the
        # processes hold is what the count says.
        held, seen_over = [], 0
        for i in range(400):
            token = limits.acquire(3, "2001:db8::1", max_connections=700)
            if token >= 0:
                held.append(token)
            seen_over += limits.connections(3) > 700
            if i % 3 == 0 and held:
                assert limits.release(held.pop())
        return f"{len(held)},{seen_over}"

    results, _, finish = _race(4, churn)
    try:
        assert sum(int(r.split(",")[1]) for r in results) == 0
        held = sum(int(r.split(",")[0]) for r in results)
        assert limits.connections(3) == held
        topped = sum(limits.acquire(3, "2001:db8::1", max_connections=700) >= 0
                     for _ in range(800))
        assert held + topped == limits.connections(3) == 700
    finally:
        finish()


def test_the_rate_limit_admits_exactly_n_per_second_window():
    clock = Clock(1000.0)
    limits = ConnectionLimits(sources=64, rows=4, clock=clock)
    tokens = [limits.acquire(0, "192.0.2.5", max_new_per_second=3) for _ in range(5)]
    assert [t >= 0 for t in tokens] == [True, True, True, False, False]
    assert tokens[3] == REFUSED_RATE
    limits.release(tokens[0])  # closing does not give back a *new* connection
    clock.now = 1000.999
    assert limits.acquire(0, "192.0.2.5", max_new_per_second=3) == REFUSED_RATE
    assert limits.acquire(0, "192.0.2.6", max_new_per_second=3) >= 0  # per source
    clock.now = 1001.0
    assert [limits.acquire(0, "192.0.2.5", max_new_per_second=3) >= 0 for _ in range(4)] == \
        [True, True, True, False]


def test_the_rate_limit_is_exact_across_racing_processes():
    limits = ConnectionLimits(sources=64, rows=8, clock=Clock(5.5))
    results, _, finish = _race(3, lambda: ",".join(
        str(limits.acquire(0, "2001:db8::5", max_new_per_second=7)) for _ in range(10)))
    finish()
    assert sum(_admitted(r) for r in results) == 7


def test_a_full_table_refuses_new_sources_and_recovers_when_entries_free():
    clock = Clock(50.0)
    limits = ConnectionLimits(sources=4, rows=4, clock=clock)
    held = {ip: limits.acquire(0, ip, max_per_source=2) for ip in
            ["192.0.2.1", "192.0.2.2", "2001:db8::3", "192.0.2.4"]}
    assert all(t >= 0 for t in held.values())
    assert limits.acquire(0, "192.0.2.5", max_per_source=2) == REFUSED_TABLE_FULL
    assert limits.acquire(0, "192.0.2.1", max_per_source=2) >= 0  # known sources go on
    assert limits.release(held["2001:db8::3"])  # its last connection: the entry frees
    assert limits.acquire(0, "192.0.2.5", max_per_source=2) >= 0
    assert limits.acquire(0, "192.0.2.6", max_per_source=2) == REFUSED_TABLE_FULL
    assert limits.meta[0] == 4 and limits.size == len(limits._map)  # bounded, fixed size

    # An entry whose rate window is current stays after its last connection ...
    limits.release(held["192.0.2.4"])
    rated = limits.acquire(0, "192.0.2.4", max_new_per_second=5)  # new entry, rate window now
    limits.release(rated)
    assert limits.acquire(0, "192.0.2.6", max_new_per_second=5) == REFUSED_TABLE_FULL
    clock.now = 51.0  # ... until its window passes: then a new source's scan frees it
    assert limits.acquire(0, "192.0.2.6", max_new_per_second=5) >= 0


def test_the_source_table_matches_a_model_under_random_churn():
    """Many sources through a tiny table (collisions, shifts, wrap-around) vs a dict."""
    clock = Clock(10.0)
    limits = ConnectionLimits(sources=12, rows=4, clock=clock)
    rng = random.Random(7)
    sources = [f"192.0.2.{i}" for i in range(20)] + [f"2001:db8::{i:x}" for i in range(20)]
    model, held = {}, []
    for step in range(4000):
        if held and rng.random() < 0.5:
            token, ip = held.pop(rng.randrange(len(held)))
            assert limits.release(token)
            model[ip] -= 1
        else:
            ip = rng.choice(sources)
            token = limits.acquire(0, ip, max_per_source=3)
            known = sum(1 for n in model.values() if n)
            if model.get(ip, 0) >= 3:
                assert token == REFUSED_SOURCE
            elif not model.get(ip) and known >= 12:
                assert token == REFUSED_TABLE_FULL
            else:
                assert token >= 0, (step, ip, token)
                model[ip] = model.get(ip, 0) + 1
                held.append((token, ip))
        if step % 50 == 0:
            for ip in sources:
                assert limits.source_connections(0, ip) == model.get(ip, 0), (step, ip)
            assert limits.meta[0] == sum(1 for n in model.values() if n)
    assert limits.connections(0) == len(held)


def test_a_workers_ledger_is_bounded():
    limits = ConnectionLimits(sources=8, rows=2, ledger=3)
    tokens = [limits.acquire(0, "192.0.2.1", max_connections=10) for _ in range(4)]
    assert tokens[3] == REFUSED_LEDGER_FULL and all(t >= 0 for t in tokens[:3])
    limits.release(tokens[0])
    assert limits.acquire(0, "192.0.2.1", max_connections=10) >= 0


def test_a_row_left_by_a_dead_pid_is_undone_when_its_pid_comes_back():
    limits = ConnectionLimits(sources=8, rows=4)
    results, pids, finish = _race(1, lambda: str(limits.acquire(0, "192.0.2.1",
                                                                 max_per_source=1)))
    finish()
    assert limits.source_connections(0, "192.0.2.1") == 1
    own = limits_module._PID[0]
    limits_module._PID[0] = pids[0]  # as if this process had been given the dead one's pid
    try:
        assert limits.acquire(0, "192.0.2.2", max_per_source=1) >= 0
    finally:
        limits_module._PID[0] = own
    assert limits.source_connections(0, "192.0.2.1") == 0


def test_bad_addresses_raise_value_error_without_touching_counts():
    limits = ConnectionLimits(sources=8, rows=2)
    for bad in ["", "192.0.2", "not-an-ip", "2001:db8::zz"]:
        with pytest.raises(OSError):
            limits.acquire(0, bad, max_per_source=1)
    assert limits.connections(0) == 0


def test_threads_of_one_worker_share_its_row_exactly():
    import threading
    limits = ConnectionLimits(sources=64, rows=4)
    within_rate = limits._within_rate

    def slow_within_rate(*args):
        fits = within_rate(*args)
        time.sleep(0.0001)  # between check and count: let the other threads run
        return fits

    # The rate check runs after the per-source check and before the counts move.
    limits._within_rate = slow_within_rate
    admitted = []
    barrier = threading.Barrier(4)

    def work() -> None:
        barrier.wait(timeout=10)
        admitted.append(sum(limits.acquire(2, "192.0.2.3", max_connections=500,
                                           max_per_source=50, max_new_per_second=10**9) >= 0
                            for _ in range(100)))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sum(admitted) == limits.source_connections(2, "192.0.2.3") == 50
    assert limits.connections(2) == 50


def test_the_master_releases_a_reaped_workers_holdings_by_pid():
    limits = ConnectionLimits(sources=8, rows=4)
    results, pids, finish = _race(1, lambda: ",".join(
        str(limits.acquire(0, "192.0.2.8", max_connections=9, max_per_source=3))
        for _ in range(3)))
    finish()  # reaped
    assert limits.connections(0) == 3
    assert limits.release_process(pids[0]) is True
    assert limits.connections(0) == 0 and limits.source_connections(0, "192.0.2.8") == 0
    assert limits.release_process(pids[0]) is False  # once
    assert limits.sweep() == 0


@pytest.mark.parametrize("seed", range(4))
def test_per_source_and_rate_limits_match_a_model_as_the_clock_moves(seed):
    """Both per-source limits, a tiny table and a clock that moves: the same answers as a dict.

    The model: an entry lives while it has connections or its rate window is the
    current second; a new source finding the table full frees the stale ones first
    (the table is small enough for one reclaim scan to see all of it).
    """
    clock = Clock(100.0)
    limits = ConnectionLimits(sources=10, rows=4, clock=clock)
    assert limits.slots <= limits_module.RECLAIM_SCAN
    rng = random.Random(seed)
    sources = [f"192.0.2.{i}" for i in range(12)] + [f"2001:db8::{i:x}" for i in range(12)]
    model = {}  # ip -> [count, window, window_count]
    held = []
    for step in range(3000):
        if rng.random() < 0.05:
            clock.now += rng.choice([0.3, 0.7, 1.0, 2.5])
        second = int(clock.now)
        if held and rng.random() < 0.45:
            token, ip = held.pop(rng.randrange(len(held)))
            assert limits.release(token)
            entry = model[ip]
            entry[0] -= 1
            if not entry[0] and entry[1] < second:
                del model[ip]
            continue
        ip = rng.choice(sources)
        token = limits.acquire(0, ip, max_per_source=3, max_new_per_second=4)
        if ip not in model and len(model) >= 10:
            for other in [o for o, e in model.items() if not e[0] and e[1] < second]:
                del model[other]
        if ip not in model and len(model) >= 10:
            expected = REFUSED_TABLE_FULL
        else:
            entry = model.setdefault(ip, [0, -1, 0])
            if entry[0] >= 3:
                expected = REFUSED_SOURCE
            else:
                if entry[1] != second:
                    entry[1], entry[2] = second, 0
                if entry[2] >= 4:
                    expected = REFUSED_RATE
                else:
                    entry[2] += 1
                    entry[0] += 1
                    expected = None
        if expected is None:
            assert token >= 0, (step, ip, token)
            held.append((token, ip))
        else:
            assert token == expected, (step, ip, token, expected)
        if step % 40 == 0:
            for each in sources:
                assert limits.source_connections(0, each) == \
                    (model[each][0] if each in model else 0), (step, each)
    assert limits.connections(0) == len(held)


def test_the_key_memo_is_bounded_per_scope_and_keeps_no_bad_address():
    """The per-scope memo of source keys never outgrows KEY_MEMO_SIZE, gives the same
    counts as the unmemoised key (the same address in another scope is another
    source), and a refused address leaves nothing behind."""
    from prefork_proxy.limits import KEY_MEMO_SIZE, source_key
    limits = ConnectionLimits(sources=KEY_MEMO_SIZE + 200, rows=2,
                              ledger=KEY_MEMO_SIZE + 200)
    tokens = []
    for n in range(KEY_MEMO_SIZE + 100):
        ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        tokens.append(limits.acquire(1, ip, max_per_source=1))
        assert len(limits._key_memos[1]) <= KEY_MEMO_SIZE
    assert all(token >= 0 for token in tokens)
    assert limits._key_memos[0] is None  # a scope never used has no memo
    assert limits.acquire(1, "10.0.0.5", max_per_source=1) == REFUSED_SOURCE
    assert limits.source_connections(1, "10.0.0.5") == 1
    assert limits._key_memos[1]["10.0.0.5"] == source_key(1, "10.0.0.5")
    other = limits.acquire(2, "10.0.0.5", max_per_source=1)  # scope 2: its own count
    assert other >= 0 and limits._key_memos[2]["10.0.0.5"] == source_key(2, "10.0.0.5")
    assert limits.release(other)
    with pytest.raises(OSError):
        limits.acquire(1, "10.0.0", max_per_source=1)
    assert "10.0.0" not in limits._key_memos[1]
    assert all(limits.release(token) for token in tokens)
    assert limits.connections(1) == 0 and limits.source_connections(1, "10.0.0.5") == 0


def test_a_scope_share_bounds_its_live_sources_and_leaves_the_table_to_the_others():
    limits = ConnectionLimits(sources=16, rows=4)
    limits.set_shares({0: 3}, range(4))
    first = [limits.acquire(0, f"192.0.2.{n}", max_per_source=5) for n in (1, 2, 3)]
    assert all(t >= 0 for t in first) and limits.live_sources(0) == 3
    assert limits.acquire(0, "192.0.2.4", max_per_source=5) == REFUSED_SHARE
    again = limits.acquire(0, "192.0.2.1", max_per_source=5)  # a live source goes on
    assert again >= 0 and limits.live_sources(0) == 3
    # The other scopes have the rest of the table: ten new sources of scope 1.
    others = [limits.acquire(1, f"198.51.100.{n}", max_per_source=5) for n in range(10)]
    assert all(t >= 0 for t in others) and limits.live_sources(1) == 10
    # 192.0.2.1 ends both its connections: no longer live, so a new source fits.
    assert limits.release(first[0]) and limits.live_sources(0) == 3
    assert limits.release(again) and limits.live_sources(0) == 2
    assert limits.acquire(0, "192.0.2.4", max_per_source=5) >= 0
    assert limits.acquire(0, "192.0.2.5", max_per_source=5) == REFUSED_SHARE
    limits.set_shares({}, range(4))  # a reload that takes the share away
    assert limits.acquire(0, "192.0.2.5", max_per_source=5) >= 0
    assert limits.live_sources(0) == 4


def test_a_share_holds_exactly_across_racing_processes_and_frees_with_them():
    limits = ConnectionLimits(sources=128, rows=8)
    limits.set_shares({2: 20}, range(4))
    # Three processes with ten sources each race for a share of 20 live sources.
    results, _, finish = _race(3, lambda: ",".join(
        str(limits.acquire(2, f"10.{os.getpid() >> 8 & 255}.{os.getpid() & 255}.{n}",
                           max_per_source=2))
        for n in range(10)))
    try:
        assert sum(_admitted(r) for r in results) == limits.live_sources(2) == 20
    finally:
        finish()
    assert limits.sweep() == 3 and limits.live_sources(2) == 0
    assert limits.acquire(2, "10.1.1.1", max_per_source=2) >= 0
