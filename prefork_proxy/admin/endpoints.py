"""The admin endpoint's routes: ``/live``, ``/ready``, ``/status``, ``/metrics``.

Built and called in the admin process, on the ``AdminServer`` thread (one call
per request; each one only reads shared memory, so it returns in microseconds
to a millisecond).  The data:

- ``StatusPage`` (written by the master): its loop heartbeat, the stopping
  flag, the status model as JSON;
- the worker rows (``rows``, written by the workers): which workers accept right now.

``/live`` is 200 while the master's loop turns (heartbeat younger than
``LIVE_AFTER_S``); ``/ready`` is 200 while at least one worker accepts and
no stop has begun; ``/status`` is the status model (``status.py``, the same
dict the status file holds) with ``stale_s``; ``/metrics`` is the Prometheus
exposition of ``ModelCollector`` (from the same model) plus
``prometheus_client``'s process collector for the master's pid.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, Iterator, Optional

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample

import prefork_proxy
from prefork_proxy import status as status_model
from prefork_proxy.admin.exposition import metrics_handler
from prefork_proxy.admin.httphead import Request
from prefork_proxy.admin.page import StatusPage
from prefork_proxy.admin.server import Handler, Response
from prefork_proxy.rows import CONNECT_BUCKETS_S, SESSION_BUCKETS_S, WorkerRows
from prefork_proxy.shared import ADMIN_STATES

#: The master loop turns at least once a second; this long without a turn is not live.
LIVE_AFTER_S = status_model.STALE_AFTER_S
#: A worker stamps its row every 0.5 s; one silent this long is not counted as serving.
WORKER_SILENT_S = 3.0
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"


def serving_workers(board: WorkerRows, now: float) -> int:
    """Workers accepting now: a live row, booted, accepting, heartbeat fresh."""
    used = board.rows_used
    pid, booted, accepting, heartbeat = board.pid, board.booted, board.accepting, board.heartbeat
    return sum(1 for row in range(used)
               if pid[row] and booted[row] and accepting[row]
               and now - heartbeat[row] < WORKER_SILENT_S)


def latest_status(page: StatusPage) -> Optional[Dict[str, Any]]:
    """The model the master published last (with ``stale_s``), None before the first."""
    body = page.read()
    if body is None:
        return None
    return status_model.with_age(json.loads(body))


class ModelCollector:
    """Every ``prefork_proxy_*`` family, from the status model the master published last.

    The model (``status.build``, republished at least once a second and at
    once after a reap or a reload) carries ``SharedState.counters()`` (the
    worker rows' totals: retired rows folded in, so they never go backwards),
    the backends' health, and the master's own counters (worker restarts,
    reloads), which live as long as the master.  A scrape may be up to a
    second behind the rows; it is never ahead of them and never backwards.

    Per listener connections_active, received/sent bytes and
    session_duration_seconds come from ``rows.LoopStats``, which the relay
    loops write (left out of a build whose relay does not: ``rows.RELAY_HOOKS``);
    backend_connect_duration_seconds from the worker rows' connect cells
    (observed by the balancer once per connection).
    """

    def __init__(self, page: StatusPage) -> None:
        self.page = page

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("prefork_proxy_build_info",
                                 "Always 1; the version label says which build runs.",
                                 labels=["version"])
        info.add_metric([prefork_proxy.__version__], 1)  # read late: no import cycle
        yield info
        status = latest_status(self.page)
        if status is None:
            return
        yield from _process_families(status)
        counters = status.get("counters") or {}
        yield from _listener_families(counters.get("listeners", {}))
        yield from _backend_families(counters.get("backends", {}))


def _process_families(status: Dict[str, Any]) -> Iterator[Metric]:
    generation = GaugeMetricFamily("prefork_proxy_config_generation",
                                   "The config generation the master serves (1 at start, "
                                   "+1 per reload).")
    generation.add_metric([], status["generation"])
    yield generation
    workers = GaugeMetricFamily("prefork_proxy_workers", "Worker processes by state.",
                                labels=["state"])
    counts = dict.fromkeys(status_model.WORKER_STATES, 0)
    for worker in status["workers"]:
        counts[worker["state"]] = counts.get(worker["state"], 0) + 1
    for state, count in counts.items():
        workers.add_metric([state], count)
    yield workers
    restarts = CounterMetricFamily(
        "prefork_proxy_worker_restarts", "Workers that died unplanned and were replaced, by "
        "reason (exit code, signal, killed as hung, could not boot).", labels=["reason"])
    for reason, count in (status.get("worker_restarts") or {}).items():
        restarts.add_metric([reason], count)
    yield restarts
    reloads = CounterMetricFamily(
        "prefork_proxy_reloads", "Reloads by result: ok, invalid (config or bind refused, "
        "nothing changed), failed (the new generation could not start; rolled back).",
        labels=["result"])
    for result, count in (status.get("reloads") or {}).items():
        reloads.add_metric([result], count)
    yield reloads


def _listener_families(listeners: Dict[str, Dict[str, int]]) -> Iterator[Metric]:
    connections = CounterMetricFamily("prefork_proxy_connections",
                                      "Client connections accepted.", labels=["listener"])
    failovers = CounterMetricFamily("prefork_proxy_failovers",
                                    "Connects retried on another backend after a failure.",
                                    labels=["listener"])
    # Admission (limits, ACLs, PROXY, SNI) will add samples, one per reason it counted.
    rejected = CounterMetricFamily("prefork_proxy_rejected_connections",
                                   "Client connections refused before any backend, by reason.",
                                   labels=["listener", "reason"])
    # Written by the relay's hooks (rows.LoopStats); absent from the model until it calls them.
    active = GaugeMetricFamily("prefork_proxy_connections_active",
                               "Client connections open now.", labels=["listener"])
    received = CounterMetricFamily("prefork_proxy_received_bytes",
                                   "Bytes received from clients, counted as they move.",
                                   labels=["listener"])
    sent = CounterMetricFamily("prefork_proxy_sent_bytes",
                               "Bytes sent to clients, counted as they move.",
                               labels=["listener"])
    sessions = HistogramMetricFamily("prefork_proxy_session_duration_seconds",
                                     "Client connections by duration, observed at close.",
                                     labels=["listener"])
    hooked = False
    for label, counts in listeners.items():
        connections.add_metric([label], counts.get("connections_total", 0))
        failovers.add_metric([label], counts.get("failovers_total", 0))
        for reason, count in (counts.get("rejected_total") or {}).items():
            rejected.add_metric([label, reason], count)
        if "received_bytes_total" in counts:
            hooked = True
            active.add_metric([label], counts["connections_active"])
            received.add_metric([label], counts["received_bytes_total"])
            sent.add_metric([label], counts["sent_bytes_total"])
            histogram = counts["session_duration"]
            sessions.add_metric([label], _cumulative(SESSION_BUCKETS_S, histogram["buckets"]),
                                histogram["sum_s"])
    yield connections
    yield failovers
    yield rejected
    if hooked:
        yield active
        yield received
        yield sent
        yield sessions


def _cumulative(bounds: Any, counts: Any) -> list:
    """Non-cumulative bucket cells -> the exposition's cumulative ``(le, count)`` pairs."""
    cumulative, buckets = 0, []
    for bound, count in zip(bounds, counts):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return buckets


def _backend_families(backends: Dict[str, Dict[str, Any]]) -> Iterator[Metric]:
    # ``route`` (issue 13): the SNI route's name (its first server name unless named),
    # on a route pool's series only; the listener's own backends keep exactly issue
    # 11's labels (listener, backend), so no existing series changes.
    labels = ["listener", "backend"]
    total = CounterMetricFamily("prefork_proxy_backend_connections",
                                "Connects attempted to the backend (failed ones too).",
                                labels=labels)
    active = GaugeMetricFamily("prefork_proxy_backend_connections_active",
                               "Open connections to the backend (attempts in progress too).",
                               labels=labels)
    errors = CounterMetricFamily("prefork_proxy_backend_connect_errors",
                                 "Failed connects to the backend, by reason.",
                                 labels=labels + ["reason"])
    up = GaugeMetricFamily("prefork_proxy_backend_up",
                           "1 while an address of the backend takes new connections (not "
                           "down by checks or by failures), else 0.", labels=labels)
    admin = GaugeMetricFamily("prefork_proxy_backend_admin_state",
                              "The operator's state of the backend (prefork-proxy backend "
                              "... drain|disable|enable), one-hot: 1 for the state it is in.",
                              labels=labels + ["state"])
    connect = HistogramMetricFamily("prefork_proxy_backend_connect_duration_seconds",
                                    "Connects to the backend that succeeded, by the time "
                                    "from connect() to connected.", labels=labels)
    for key, counts in backends.items():
        listener, _, backend = key.rpartition("|")  # an address never holds a "|"
        # The model names its labels (``SharedState.counters``); the key is the fallback.
        values = {"listener": counts.get("listener", listener),
                  "backend": counts.get("backend", backend)}
        if counts.get("route"):
            values["route"] = counts["route"]
        _add(total, "_total", values, counts.get("connections_total", 0))
        _add(active, "", values, counts.get("connections_active", 0))
        if "admin_state" in counts:
            for state in ADMIN_STATES:
                _add(admin, "", {**values, "state": state},
                     int(counts["admin_state"] == state))
        if "connect_duration" in counts:
            histogram = counts["connect_duration"]
            _add_histogram(connect, values,
                           _cumulative(CONNECT_BUCKETS_S, histogram["buckets"]),
                           histogram["sum_s"])
        for reason, count in (counts.get("connect_errors_total") or {}).items():
            _add(errors, "_total", {**values, "reason": reason}, count)
        if "up" in counts:
            _add(up, "", values, counts["up"])
    yield total
    yield active
    yield errors
    yield up
    yield admin
    yield connect


def _add(family: Metric, suffix: str, labels: Dict[str, str], value: float) -> None:
    """One sample with these labels (``add_metric`` takes the family's fixed label names
    only; a route pool's series have one label more)."""
    family.samples.append(Sample(family.name + suffix, labels, value))


def _add_histogram(family: Metric, labels: Dict[str, str], buckets: list,
                   sum_value: float) -> None:
    """A histogram's samples with these labels (see ``_add``): cumulative buckets, count, sum."""
    for bound, count in buckets:
        family.samples.append(Sample(family.name + "_bucket", {**labels, "le": bound}, count))
    family.samples.append(Sample(family.name + "_count", labels, buckets[-1][1]))
    family.samples.append(Sample(family.name + "_sum", labels, sum_value))


def build_routes(page: StatusPage, board: WorkerRows, master_pid: int) -> Dict[str, Handler]:
    """The routing table for ``AdminServer`` (admin process)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ModelCollector(page))
    ProcessCollector(pid=lambda: master_pid, registry=registry)

    def live(request: Request) -> Response:
        silent = time.monotonic() - page.heartbeat
        if silent < LIVE_AFTER_S:
            return 200, _TEXT, b"live\n"
        return 503, _TEXT, f"master loop silent for {silent:.1f} s\n".encode()

    def ready(request: Request) -> Response:
        if page.stopping:
            return 503, _TEXT, b"stopping\n"
        serving = serving_workers(board, time.monotonic())
        if not serving:
            return 503, _TEXT, b"no worker is serving\n"
        return 200, _TEXT, f"ready: {serving} worker(s) serving\n".encode()

    def status(request: Request) -> Response:
        model = latest_status(page)
        if model is None:
            return 503, _TEXT, b"no status published yet\n"
        return 200, _JSON, json.dumps(model, indent=1).encode() + b"\n"

    return {"/live": live, "/ready": ready, "/status": status,
            "/metrics": metrics_handler(registry)}
