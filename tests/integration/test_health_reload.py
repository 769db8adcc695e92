"""A reload that removes health checks removes their verdicts (real CLI, real backends)."""

from __future__ import annotations

import signal

from backend_clients import tag
from support import wait_for, write_config

CONFIG = """
[server]
workers = 2

[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["{a}", "{b}"]
"""
CHECKS = """
[tcp_proxy.health_check]
interval_ms = 100
fall = 1
expect = "A"
"""


def test_a_backend_held_down_by_checks_serves_again_once_a_reload_removes_them(
        backend_factory, proxy_factory, tmp_path):
    """B serves clients but fails the check: down by checks; without the checks, it serves.
    Before the fix its slot kept active_down = 1 forever after the reload."""
    a, b = backend_factory("tag", "A"), backend_factory("tag", "B")  # A passes: it says "A"
    path = tmp_path / "p.toml"
    write_config(path, CONFIG.format(a=a.address, b=b.address) + CHECKS)
    proxy = proxy_factory("start", "--config", str(path))
    wait_for(lambda: f"backend {b.address} down: reply b'B' does not start" in proxy.log,
             message="B marked down by its check")
    assert {tag(proxy.port()) for _ in range(6)} == {"A"}  # B is held down
    write_config(path, CONFIG.format(a=a.address, b=b.address))
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "generation 2 serves" in proxy.log, message="the reload")
    wait_for(lambda: "B" in {tag(proxy.port()) for _ in range(4)}, 10,
             message="B to get traffic again")
    assert "no longer held down by their last verdict" in proxy.log
