"""deploy/ turns the admin endpoint on: the example configs validate, k8s probes use it."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from prefork_proxy import config
from prefork_proxy.config import Endpoint

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _configmap_toml(manifest: str) -> str:
    """The ConfigMap's proxy.toml block (indented under ``proxy.toml: |``)."""
    block = manifest.split("proxy.toml: |\n", 1)[1].split("\n---", 1)[0]
    return textwrap.dedent(block)


def test_the_image_config_serves_admin_on_loopback():
    loaded = config.load_file(str(DEPLOY / "proxy.toml"))
    assert loaded.admin.bind == Endpoint("127.0.0.1", 9901)


def test_kubernetes_probes_and_scrapes_the_admin_port():
    # The manifests are split by kind (tests/integration/test_kubernetes_manifests.py
    # validates them and checks the same facts on the parsed YAML).
    configmap = (DEPLOY / "kubernetes" / "configmap.yaml").read_text()
    deployment = (DEPLOY / "kubernetes" / "deployment.yaml").read_text()
    loaded = config.load_text(_configmap_toml(configmap), source="configmap")
    assert loaded.admin.bind == Endpoint("0.0.0.0", 9901)  # the kubelet probes the pod IP
    assert re.search(r"- name: admin\n\s+containerPort: 9901", deployment)
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/live")):
        section = deployment.split(f"{probe}:", 1)[1]
        assert re.match(rf"\s+httpGet:\n\s+path: {path}\n\s+port: admin\n", section), probe
    for key, value in (("scrape", '"true"'), ("port", '"9901"'), ("path", "/metrics")):
        assert f"prometheus.io/{key}: {value}" in deployment
    service = "\n".join(line for line in
                        (DEPLOY / "kubernetes" / "service.yaml").read_text().splitlines()
                        if not line.lstrip().startswith("#"))
    assert "9901" not in service and "admin" not in service  # not exposed beyond the pods
