"""A smoke run of the benchmark's code path (not its timings), so scripts/bench cannot rot.

Uses no external peer: the real prefork-proxy in front of the benchmark's own
hold backend, driven by the benchmark's idle-connection workload and /proc
readers, then its parsers and report writers on fixed samples.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from bench_lib import procfs, report, workloads  # noqa: E402
from support import wait_for  # noqa: E402


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.timeout(60)
def test_idle_workload_and_proc_readers_against_the_real_proxy(proxy_factory):
    port = _free_port()
    backend = subprocess.Popen([sys.executable, str(SCRIPTS / "bench_lib" / "hold_backend.py"),
                                "--port", str(port)])
    try:
        wait_for(lambda: _accepts(port), message="the hold backend")
        proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend",
                              f"127.0.0.1:{port}", "--workers", "2")
        proxy.wait_workers(2)
        assert set(proxy.worker_pids()) <= set(procfs.tree_pids(proxy.pid))
        assert procfs.tree_cpu_seconds(proxy.pid) >= 0.0
        result = workloads.run_idle(proxy.port(), 50, proxy.pid, settle=0.1)
        assert result["opened"] == 50 and result["alive_after_hold"] == 50, result
        assert result["pss_after_kib"] > 0 and "kib_per_conn" in result
    finally:
        backend.kill()
        backend.wait(5)


def test_redis_benchmark_output_parsers():
    csv_text = ('"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",'
                '"p95_latency_ms","p99_latency_ms","max_latency_ms"\n'
                '"PING_MBULK","51921.00","0.800","0.100","0.759","1.500","2.730","9.000"\n')
    [row] = workloads.parse_redis_csv(csv_text)
    assert row["test"] == "PING_MBULK" and row["rps"] == 51921.0 and row["p99_latency_ms"] == 2.73
    assert workloads.parse_redis_text("PING_INLINE: 42918.46 requests per second, p50=0.695")[0][
        "rps"] == 42918.46


def test_report_medians_ratios_markdown_and_json(tmp_path):
    peers = ["direct", "haproxy", "prefork"]
    samples = [{"repeat": r, "peer": peer, "metric": "keepalive_rps", "value": value}
               for r, values in enumerate([(100.0, 50.0, 40.0), (120.0, 60.0, 45.0),
                                           (110.0, 55.0, 44.0)])
               for peer, value in zip(peers, values)]
    meds = report.medians(samples, peers)
    assert meds["keepalive_rps"]["prefork"] == (44.0, 3)
    assert report.ratio(44.0, 55.0) == pytest.approx(0.8)
    text = report.markdown(meds, peers, {}, {"date": "today", "machine": "test"})
    assert "Keep-alive PING" in text and "0.80×" in text
    path = tmp_path / "results.json"
    report.write_json(path, {"machine": "test"}, samples, [], meds, {})
    assert json.loads(path.read_text())["samples"] == samples
