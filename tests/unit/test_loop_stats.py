"""The relay's metric cells (rows.LoopStats): folded at reap, exported once written."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from prefork_proxy import rows as rows_module
from prefork_proxy.admin.endpoints import _listener_families
from prefork_proxy.rows import CONNECTIONS, WorkerRows, listener_cells


def _listener(rows: WorkerRows) -> dict:
    return rows.snapshot({"a": 2}, {})["listeners"]["a"]


def test_loop_cells_fold_exactly_and_active_drops_with_a_dead_worker(monkeypatch):
    monkeypatch.setattr(rows_module, "RELAY_HOOKS", True)
    rows = WorkerRows(capacity=4, backend_slots=8)
    row = rows.claim(1.0)
    rows.pid[row] = 123
    loops = [rows.loop_stats(row, 0), rows.loop_stats(row, 1)]
    rows.listener[listener_cells(rows, row, 2) + CONNECTIONS] += 5  # five accepted
    for index, (stats, duration) in enumerate(zip(loops, (0.003, 7.0))):
        base = stats.base(2)
        stats.cells[base + stats.RECEIVED] += 100 + index  # as bytes move
        stats.cells[base + stats.SENT] += 1000
        stats.on_close(base, -1, 100 + index, 1000, duration)
    live = _listener(rows)
    assert live["received_bytes_total"] == 201 and live["sent_bytes_total"] == 2000
    assert live["connections_active"] == 3  # 5 accepted, 2 closed
    buckets = live["session_duration"]["buckets"]
    assert buckets[0] == 1 and buckets[rows_module.SESSION_BUCKETS_S.index(10.0)] == 1
    assert sum(buckets) == 2 and abs(live["session_duration"]["sum_s"] - 7.003) < 1e-6

    rows.fold(row)  # SIGKILL: totals kept, its 3 open connections are gone
    dead = _listener(rows)
    assert dead["received_bytes_total"] == 201 and dead["sent_bytes_total"] == 2000
    assert dead["session_duration"] == live["session_duration"]
    assert dead["connections_active"] == 0 and dead["connections_total"] == 5
    assert rows.loops_used[row] == 0 and not any(rows.loop[:8 * 256 * rows_module.LOOP_CELLS])

    families = list(_listener_families({"a": dead}))
    names = {family.name for family in families}
    assert {"prefork_proxy_connections_active", "prefork_proxy_received_bytes",
            "prefork_proxy_sent_bytes", "prefork_proxy_session_duration_seconds"} <= names
    class Registry:
        def collect(self):
            return iter(families)

    body = generate_latest(Registry()).decode()  # type: ignore[arg-type]
    parsed = {s.name: s for f in text_string_to_metric_families(body) for s in f.samples
              if s.name.startswith("prefork_proxy_session_duration_seconds")}
    assert parsed["prefork_proxy_session_duration_seconds_count"].value == 2
    assert 'prefork_proxy_received_bytes_total{listener="a"} 201.0' in body


def test_without_the_relay_hooks_those_families_stay_out(monkeypatch):
    monkeypatch.setattr(rows_module, "RELAY_HOOKS", False)  # a build whose relay wrote none
    rows = WorkerRows(capacity=2, backend_slots=4)
    counts = _listener(rows)
    assert "received_bytes_total" not in counts
    names = {family.name for family in _listener_families({"a": counts})}
    assert "prefork_proxy_received_bytes" not in names
    assert "prefork_proxy_connections_active" not in names
    assert "prefork_proxy_rejected_connections" in names  # present, no samples yet


def test_a_duration_lands_in_the_first_bucket_whose_bound_holds_it(monkeypatch):
    """Prometheus's ``le``: a value equal to a bound is in that bucket; above the last
    finite bound, +Inf; a negative one (never, from a monotonic clock) in the first."""
    monkeypatch.setattr(rows_module, "RELAY_HOOKS", True)
    bounds = rows_module.SESSION_BUCKETS_S
    cases = [(0.0, 0), (-1.0, 0), (bounds[0], 0), (bounds[0] * 1.0001, 1),
             (10.0, bounds.index(10.0)), (bounds[-2] + 1, len(bounds) - 1)]
    for duration, expected in cases:
        rows = WorkerRows(capacity=2, backend_slots=4)
        row = rows.claim(1.0)
        rows.pid[row] = 123  # a worker's row: the snapshot reads only claimed ones
        stats = rows.loop_stats(row, 0)
        stats.on_close(stats.base(0), -1, 0, 0, duration)
        buckets = rows.snapshot({"a": 0}, {})["listeners"]["a"]["session_duration"]["buckets"]
        assert buckets.index(1) == expected and sum(buckets) == 1, duration


def test_a_connect_time_lands_in_the_first_bucket_whose_bound_holds_it():
    bounds = rows_module.CONNECT_BUCKETS_S
    rows = WorkerRows(capacity=2, backend_slots=4)
    row = rows.claim(1.0)
    cells = rows_module.CONNECT_CELLS
    for connect_s, expected in [(0.0001, 0), (bounds[0], 0), (bounds[1], 1),
                                (bounds[1] + 1e-9, 2), (1e9, len(bounds) - 1)]:
        before = list(rows.connect[row * rows.backend_slots * cells:][:cells])
        rows_module.observe_connect(rows, row, 0, connect_s)
        after = list(rows.connect[row * rows.backend_slots * cells:][:cells])
        moved = [i for i in range(rows_module.CONNECT_BUCKET0, cells) if after[i] != before[i]]
        assert moved == [rows_module.CONNECT_BUCKET0 + expected], connect_s
