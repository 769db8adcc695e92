"""Issue 11's metric names: the one list the deploy files and the collector are held to.

Used by tests/unit/test_deploy_observability.py (every metric, label and label
value that deploy/prometheus/alerts.yaml and deploy/grafana/prefork-proxy.json
name must be here) and tests/integration/test_metrics_names.py (every metric
the real proxy's GET /metrics exports must be here, with these labels).  The
names are fixed by issue 11 so dashboards can rely on them: the admin
endpoint's collector must export exactly these; change the collector, the
deploy files and this list together.
"""

from __future__ import annotations

from typing import Dict, Set, Tuple

from prefork_proxy import status as status_model

#: name -> (type, labels, {label: allowed values}).  The admin endpoint exports them all.
METRICS: Dict[str, Tuple[str, Set[str], Dict[str, Set[str]]]] = {
    # Per listener.
    "prefork_proxy_connections_total": ("counter", {"listener"}, {}),
    "prefork_proxy_connections_active": ("gauge", {"listener"}, {}),
    "prefork_proxy_received_bytes_total": ("counter", {"listener"}, {}),
    "prefork_proxy_sent_bytes_total": ("counter", {"listener"}, {}),
    # Limits and ACLs add reasons: their values are not fixed yet.
    "prefork_proxy_rejected_connections_total": ("counter", {"listener", "reason"}, {}),
    "prefork_proxy_failovers_total": ("counter", {"listener"}, {}),
    "prefork_proxy_session_duration_seconds": ("histogram", {"listener"}, {}),
    # Per backend of a pool: ``route`` (issue 13), the SNI route's name, only on the
    # series of a route's backends (the listener's own keep issue 11's labels).
    "prefork_proxy_backend_connections_total": ("counter", {"listener", "route", "backend"}, {}),
    "prefork_proxy_backend_connections_active": ("gauge", {"listener", "route", "backend"}, {}),
    "prefork_proxy_backend_connect_errors_total": (
        "counter", {"listener", "route", "backend", "reason"},
        {"reason": {"refused", "timeout", "unreachable", "other"}}),
    "prefork_proxy_backend_up": ("gauge", {"listener", "route", "backend"}, {}),
    # Not in issue 11's list: backend_up leaves the operator's state out, this shows it.
    "prefork_proxy_backend_admin_state": (
        "gauge", {"listener", "route", "backend", "state"},
        {"state": {"ready", "drain", "disabled"}}),
    "prefork_proxy_backend_connect_duration_seconds": (
        "histogram", {"listener", "route", "backend"}, {}),
    # Process.
    "prefork_proxy_workers": ("gauge", {"state"}, {"state": set(status_model.WORKER_STATES)}),
    "prefork_proxy_worker_restarts_total": (
        "counter", {"reason"}, {"reason": {"exit", "signal", "hung", "boot_failed"}}),
    "prefork_proxy_reloads_total": ("counter", {"result"}, {"result": {"ok", "invalid", "failed"}}),
    "prefork_proxy_config_generation": ("gauge", set(), {}),
    "prefork_proxy_build_info": ("gauge", {"version"}, {}),
    # prometheus_client's process collector, for the master's pid.
    "process_cpu_seconds_total": ("counter", set(), {}),
    "process_resident_memory_bytes": ("gauge", set(), {}),
    "process_virtual_memory_bytes": ("gauge", set(), {}),
    "process_start_time_seconds": ("gauge", set(), {}),
    "process_open_fds": ("gauge", set(), {}),
    "process_max_fds": ("gauge", set(), {}),
}
