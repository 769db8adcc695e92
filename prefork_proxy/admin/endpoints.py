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

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

import prefork_proxy
from prefork_proxy import status as status_model
from prefork_proxy.admin.exposition import metrics_handler
from prefork_proxy.admin.httphead import Request
from prefork_proxy.admin.page import StatusPage
from prefork_proxy.admin.server import Handler, Response
from prefork_proxy.rows import WorkerRows

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
    """Gauges from the status model: build info, config generation, workers by state."""

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
