"""The worker rows: claimed and folded by the master, counters that never go backwards."""

from __future__ import annotations

import os

import pytest

from prefork_proxy import rows as rows_module
from prefork_proxy.rows import (
    CONNECTIONS,
    FAILOVERS,
    WorkerRows,
    listener_cells,
    observe_connect,
)


def _totals(rows: WorkerRows) -> dict:
    """The row counters (the connect histogram: test_connect_duration_is_folded)."""
    totals = rows.snapshot({"a": 0, "b": 1}, {"x": (3,), "y": (4, 5)})
    for backend in totals["backends"].values():
        backend.pop("connect_duration")
    return totals


def test_connect_duration_is_observed_per_backend_and_folded():
    rows = WorkerRows(capacity=4, backend_slots=8)
    first, second = rows.claim(0.0), rows.claim(0.0)
    rows.pid[first], rows.pid[second] = 100, 101
    for row, seconds in ((first, 0.0004), (first, 0.003), (second, 20.0)):
        observe_connect(rows, row, 4, seconds)
    observe_connect(rows, second, 3, 0.001)  # another backend
    before = rows.snapshot({}, {"y": (4, 5)})["backends"]["y"]["connect_duration"]
    assert sum(before["buckets"]) == 3 and before["buckets"][0] == 1
    assert before["buckets"][-1] == 1  # +Inf
    assert before["sum_s"] == pytest.approx(20.0034)
    rows.fold(first)
    assert rows.snapshot({}, {"y": (4, 5)})["backends"]["y"]["connect_duration"] == before
    rows.reset_backend(4)  # the slot reused for another backend: its retired part goes
    after = rows.snapshot({}, {"y": (4, 5)})["backends"]["y"]["connect_duration"]
    assert sum(after["buckets"]) == 1


def test_a_reaped_workers_counters_are_folded_and_its_open_connections_dropped(monkeypatch):
    # The row cells only (the relay loops' cells: tests/unit/test_loop_stats.py).
    monkeypatch.setattr(rows_module, "RELAY_HOOKS", False)
    rows = WorkerRows(capacity=4, backend_slots=8)
    first, second = rows.claim(1.0), rows.claim(1.0)
    assert (first, second) == (0, 1)
    for row, accepted in ((first, 5), (second, 7)):
        rows.pid[row] = 100 + row
        rows.listener[listener_cells(rows, row, 0) + CONNECTIONS] += accepted
        rows.listener[listener_cells(rows, row, 1) + FAILOVERS] += 1
        rows.acquired[row * 8 + 3] += accepted  # every client went to slot 3 ...
        rows.backend_active[row * 8 + 3] += 2  # ... and two of each are still open
    before = _totals(rows)
    assert before["listeners"]["a"] == {"connections_total": 12, "failovers_total": 0}
    assert before["listeners"]["b"]["failovers_total"] == 2
    assert before["backends"]["x"] == {"connections_total": 12, "connections_active": 4}
    assert rows.active_count(3) == 4
    assert rows.accepted(first) == 5 and rows.live_rows() == [0, 1]

    rows.fold(first)  # as after a SIGKILL: the row is final, its connections are gone
    after = _totals(rows)
    assert after["listeners"] == before["listeners"]  # totals kept exactly
    assert after["backends"]["x"] == {"connections_total": 12, "connections_active": 2}
    assert rows.active_count(3) == 2 and rows.live_rows() == [1]
    assert rows.accepted(first) == 0

    again = rows.claim(2.0)  # the freed row is reused, zeroed: nothing counts twice
    assert again == first
    rows.pid[again] = 200
    rows.listener[listener_cells(rows, again, 0) + CONNECTIONS] += 1
    assert _totals(rows)["listeners"]["a"]["connections_total"] == 13
    rows.fold(second)
    rows.fold(again)
    final = _totals(rows)
    assert final["listeners"]["a"]["connections_total"] == 13
    assert final["backends"]["x"] == {"connections_total": 12, "connections_active": 0}
    assert rows.fold_seq[0] % 2 == 0


def test_reused_slots_start_from_zero_and_a_full_table_says_so():
    rows = WorkerRows(capacity=2, backend_slots=8)
    row = rows.claim(0.0)
    rows.listener[listener_cells(rows, row, 1) + CONNECTIONS] += 3
    rows.acquired[row * 8 + 4] += 2
    rows.fold(row)
    assert _totals(rows)["listeners"]["b"]["connections_total"] == 3
    rows.reset_listener(1)
    rows.reset_backend(4)
    assert _totals(rows)["listeners"]["b"]["connections_total"] == 0
    assert _totals(rows)["backends"]["y"]["connections_total"] == 0
    assert rows.claim(0.0) is not None and rows.claim(0.0) is not None
    assert rows.claim(0.0) is None


def test_a_row_written_by_a_child_process_is_seen_by_the_parent_and_folded():
    rows = WorkerRows(capacity=4, backend_slots=8)
    row = rows.claim(0.0)
    pid = os.fork()
    if pid == 0:  # the "worker": counts in its own row, then dies without cleaning up
        with rows.row_lock():
            rows.acquired[row * 8 + 5] += 9
            rows.backend_active[row * 8 + 5] += 9
        rows.listener[listener_cells(rows, row, 0) + CONNECTIONS] += 9
        os._exit(0)
    rows.pid[row] = pid
    os.waitpid(pid, 0)
    assert _totals(rows)["backends"]["y"] == {"connections_total": 9, "connections_active": 9}
    rows.fold(row)
    assert _totals(rows)["backends"]["y"] == {"connections_total": 9, "connections_active": 0}
    assert _totals(rows)["listeners"]["a"]["connections_total"] == 9
