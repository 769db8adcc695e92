"""The real proxy's GET /metrics against issue 11's list (tests/metric_names.py).

deploy/prometheus/alerts.yaml and deploy/grafana/prefork-proxy.json are held to
that list by tests/unit/test_deploy_observability.py; this holds the proxy to
it from the other side: every series the admin endpoint serves, after a
connection relayed and a reload, has a listed name, listed labels only (no
client address) and listed label values.  A metric the collector renames or
invents fails here before a dashboard goes blank.  promtool, when installed,
lints the exposition as Prometheus would see it.
"""

from __future__ import annotations

import http.client
import re
import shutil
import signal
import subprocess
import textwrap
from typing import Dict, Set, Tuple

import pytest
from metric_names import METRICS
from prometheus_client.parser import text_string_to_metric_families
from support import ProxyProcess, recv_exactly, transform, wait_for, write_config

TARGET_ONLY = {"job", "instance"}  # Prometheus adds these; the proxy must not
ADMIN_LINE = re.compile(r"admin endpoint listening on (\S+):(\d+)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def scrape(port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
        return body
    finally:
        connection.close()


def listed_name(sample: str) -> str:
    """The METRICS key of a sample name (a histogram's series carry a suffix)."""
    for suffix in HISTOGRAM_SUFFIXES:
        stem = sample[:-len(suffix)]
        if sample.endswith(suffix) and METRICS.get(stem, ("",))[0] == "histogram":
            return stem
    return sample


def started_proxy(proxy_factory, backend_factory, tmp_path) -> Tuple[ProxyProcess, int]:
    backend = backend_factory("echo")
    path = write_config(tmp_path / "proxy.toml", textwrap.dedent(f"""
        [server]
        workers = 2

        [admin]
        bind = "127.0.0.1:0"

        [[tcp_proxy]]
        name = "front"
        bind = "127.0.0.1:0"
        backends = ["{backend.address}"]
    """))
    proxy = proxy_factory("start", "--config", str(path))
    proxy.wait_workers(2)
    port = int(wait_for(lambda: ADMIN_LINE.search(proxy.log), message="the admin line").group(2))
    with proxy.connect() as client:  # one relayed connection, so per-listener rows exist
        client.sendall(b"metrics")
        assert recv_exactly(client, 7) == transform(b"metrics")
    proxy.signal(signal.SIGHUP)  # one reload, so reload rows exist
    wait_for(lambda: "prefork_proxy_config_generation 2.0" in scrape(port),
             message="generation 2 in /metrics")
    return proxy, port


def test_every_exported_series_is_in_issue_11s_list(proxy_factory, backend_factory, tmp_path):
    _, port = started_proxy(proxy_factory, backend_factory, tmp_path)
    body = scrape(port)
    problems = []
    exported: Dict[str, Set[str]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            name = listed_name(sample.name)
            exported.setdefault(name, set()).update(sample.labels)
            if name not in METRICS:
                problems.append(f"{sample.name} is not one of issue 11's metrics")
                continue
            kind, labels, values = METRICS[name]
            extra = set(sample.labels) - labels - ({"le"} if kind == "histogram" else set())
            if extra:
                problems.append(f"{sample.name} has labels {sorted(extra)} the list does not")
            for label, allowed in values.items():
                if label in sample.labels and sample.labels[label] not in allowed:
                    problems.append(f"{sample.name}{{{label}={sample.labels[label]!r}}}")
    assert problems == []
    assert not TARGET_ONLY & {label for labels in exported.values() for label in labels}
    # What the proxy exports today: at least these (the rest of the list is being added).
    assert {"prefork_proxy_build_info", "prefork_proxy_config_generation",
            "prefork_proxy_workers", "process_cpu_seconds_total",
            "prefork_proxy_connections_active", "prefork_proxy_received_bytes_total",
            "prefork_proxy_sent_bytes_total",
            "prefork_proxy_session_duration_seconds",
            "prefork_proxy_backend_connect_duration_seconds"} <= set(exported)


def test_promtool_lints_the_exposition(proxy_factory, backend_factory, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    _, port = started_proxy(proxy_factory, backend_factory, tmp_path)
    result = subprocess.run([promtool, "check", "metrics"], input=scrape(port),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
