"""A smoke run of the benchmark's code path (not its timings), so scripts/bench cannot rot.

Uses no external peer: the real prefork-proxy in front of the benchmark's own
hold backend, driven by the benchmark's idle-connection workload and /proc
readers, then its parsers and report writers on fixed samples.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from bench_lib import growth, procfs, procs, report, workloads  # noqa: E402
from support import accepts, free_port, recv_exactly, transform, wait_for  # noqa: E402


@pytest.mark.timeout(60)
def test_idle_workload_and_proc_readers_against_the_real_proxy(proxy_factory):
    port = free_port()
    backend = subprocess.Popen([sys.executable, str(SCRIPTS / "bench_lib" / "hold_backend.py"),
                                "--port", str(port)])
    try:
        wait_for(lambda: accepts(port), message="the hold backend")
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


@pytest.mark.timeout(90)
def test_growth_instance_holder_and_reload_with_connections_open(tmp_path):
    """The growth workloads' code path (bench_lib/growth.py) with 300 connections, not 9,000.

    The redis listeners point at the hold backend here (no redis needed): the
    1,000-backend listener must still relay, the holder hold, and a reload
    with every connection open bring up a new generation and read the master's CPU.
    """
    reg = procs.Registry(tmp_path)
    try:
        hold_port = reg.free_port()
        backend = reg.start("hold", [sys.executable, str(SCRIPTS / "bench_lib" / "hold_backend.py"),
                                     "--port", str(hold_port)])
        procs.wait_ready(backend, hold_port, procs.probe_echo)
        ports = growth.GrowthPorts(*(reg.free_port() for _ in range(4)))
        config = growth.write_config(tmp_path / "growth.toml", ports, hold_port, hold_port)
        assert config.read_text().count(f'"127.0.0.1:{hold_port}", weight') == 1002
        master = reg.start("prefork-growth", [sys.executable, "-m", "prefork_proxy", "start",
                                              "--config", str(config)])
        for port in (ports.ping, ports.idle, ports.many, ports.two):
            procs.wait_ready(master, port, procs.probe_echo, timeout=30)
        wait_for(lambda: len(growth.booted_pids(master.stderr_path, 0)) == 2, 20,
                 message="both workers to boot")
        holder, held = growth.start_holder(reg, sys.executable, ports.idle, 300, timeout=60)
        assert holder is not None and held["held"] == 300, held
        result = growth.measure_reload(master, workers=2, window_s=0.3)
        assert "error" not in result, result
        assert 0 < result["reload_s"] < 20 and result["window_s"] >= 0.3
        assert 0 <= result["master_cpu_share"] < 2.5
        assert len(growth.booted_pids(master.stderr_path, 0)) == 4  # a second generation
        procs.probe_echo(ports.many)  # the new generation serves the 1,000-backend listener
        assert holder.alive()  # still holding: the old generation drains its connections
    finally:
        reg.stop_all()


def test_growth_figures_get_their_own_table():
    samples = [{"repeat": r, "peer": "prefork", "metric": "growth_keepalive_idle_ratio",
                "value": v} for r, v in enumerate([0.97, 0.93, 1.01])]
    text = report.markdown({}, ["prefork"], {}, {"date": "today"}, samples)
    assert "Growth workloads (prefork-proxy only" in text
    assert "| 0.97 | 0.93–1.01 | 3 |" in text


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


def test_ab_bench_rotation_summary_and_table():
    """scripts/ab_bench.py's pure parts on fixed samples (the run itself needs redis/haproxy)."""
    import ab_bench

    assert [ab_bench.rotated(ab_bench.PEERS, r) for r in (1, 2, 3, 4)] == [
        ["old", "new", "haproxy"], ["new", "haproxy", "old"], ["haproxy", "old", "new"],
        ["old", "new", "haproxy"]]
    values = {"old": [100.0, 110.0, 90.0], "new": [105.0, 99.0, 120.0],
              "haproxy": [200.0, 210.0, 190.0]}
    samples = [{"round": r + 1, "peer": peer, "workload": "newconn", "test": "PING_MBULK",
                "metric": "rps", "value": v}
               for peer, vs in values.items() for r, v in enumerate(vs)]
    (row,) = ab_bench.summary(samples)
    assert row["old"] == {"median": 100.0, "min": 90.0, "max": 110.0, "n": 3}
    assert row["new/old"] == pytest.approx(1.05)
    assert row["new/old per round"] == pytest.approx([0.9, 120 / 90])
    assert row["new/haproxy"] == pytest.approx(105 / 200)
    text = ab_bench.table(samples, {"date": "x"}, ["a note"])
    assert "| newconn | PING_MBULK | req/s | 100 (90–110, n=3) | 105 (99–120, n=3) |" in text
    assert "1.050 [0.900–1.333]" in text and "- a note" in text


def test_variant_specs_merge_into_a_config_prefork_proxy_reads(tmp_path):
    """scripts/bench_lib/variants.py: the spec forms, the tokens, the TOML it writes."""
    from bench_lib import variants as V

    from prefork_proxy import config as proxy_config

    assert V.split_top_level('a=1,b=["x,y"],c={d = "1,2"}') == ['a=1', 'b=["x,y"]',
                                                                  'c={d = "1,2"}']
    assert V.parse_value("v2") == "v2" and V.parse_value("50") == 50
    assert V.parse_value('["127.0.0.0/8"]') == ["127.0.0.0/8"]
    assert V.parse_variant("plain=").fragment == {}
    adm = V.parse_variant('adm=tcp_proxy.accept_proxy=v2,listener.send_proxy=v2,'
                          'tcp_proxy.allow=["127.0.0.0/8"],tcp_proxy.max_connections_per_source=99,'
                          'admin.bind=127.0.0.1:PORT')
    assert adm.fragment == {"tcp_proxy": {"accept_proxy": "v2", "send_proxy": "v2",
                                          "allow": ["127.0.0.0/8"],
                                          "max_connections_per_source": 99},
                            "admin": {"bind": "127.0.0.1:PORT"}}
    fragment = tmp_path / "obs.toml"
    fragment.write_text('[admin]\nbind = "127.0.0.1:PORT"\n[tcp_proxy]\nname = "RUNDIR"\n')
    assert V.parse_variant(f"obs=@{fragment}").fragment == {
        "admin": {"bind": "127.0.0.1:PORT"}, "tcp_proxy": {"name": "RUNDIR"}}
    for bad in ("=x", "noequals", "x=bogus.key=1", "x=server=1", f"x=@{tmp_path}/missing"):
        with pytest.raises(V.VariantError):
            V.parse_variant(bad)
    doc = V.merged(V.base_document(7001, 7002, 2), adm,
                   {"PORT": "7003", "BACKEND": "127.0.0.1:7002", "RUNDIR": str(tmp_path)})
    text = V.to_toml(doc)
    loaded = proxy_config.load_text(text)  # the proxy's own validation accepts it
    [listener] = loaded.listeners
    assert listener.accept_proxy == "v2" and listener.max_connections_per_source == 99
    assert str(loaded.admin.bind).endswith("7003")
    assert V.chain_options(doc["tcp_proxy"][0]) == ("v2", True)
    routed = V.merged(V.base_document(7001, 7002, 2), V.parse_variant(
        'sni=tcp_proxy.backends=!unset,tcp_proxy.routes=[{server_names=["bench.test"], '
        'backends=["BACKEND"]}]'), {"BACKEND": "127.0.0.1:7002"})
    assert "backends" not in routed["tcp_proxy"][0]
    assert routed["tcp_proxy"][0]["routes"] == [{"server_names": ["bench.test"],
                                                 "backends": ["127.0.0.1:7002"]}]
    assert V.chain_options({"accept_proxy": "v1", "backends": [{"send_proxy": "v1"}]}) == (
        "v1", True)
    assert V.chain_options(V.base_document(1, 2, 2)["tcp_proxy"][0]) == (None, False)
    front, back = V.haproxy_chain_configs(1, 2, 3, 4, "v2", True)
    assert "server prefork 127.0.0.1:2 send-proxy-v2" in front
    assert "bind 127.0.0.1:3 accept-proxy" in back and "server backend 127.0.0.1:4" in back
    plain_front, plain_back = V.haproxy_chain_configs(1, 2, 3, 4, None, False)
    assert "send-proxy" not in plain_front and "accept-proxy" not in plain_back


def test_variant_summary_ratios_and_table():
    from bench_lib import variants as V

    samples = [{"round": r + 1, "variant": name, "workload": "newconn", "metric": "rps",
                "value": value}
               for name, values in (("plain", [100.0, 110.0, 90.0]), ("obs", [95.0, 99.0, 99.0]))
               for r, value in enumerate(values)]
    [row] = V.summary(samples, ["plain", "obs"])
    assert row["variants"]["plain"] == {"median": 100.0, "min": 90.0, "max": 110.0, "n": 3}
    assert row["variants"]["obs"]["ratio"] == pytest.approx(0.99)
    assert row["variants"]["obs"]["ratio_per_round"] == pytest.approx([0.9, 1.1])
    text = V.table(samples, ["plain", "obs"], {"date": "x"}, ["a note"],
                   [V.parse_variant("plain="), V.parse_variant("obs=admin.bind=127.0.0.1:PORT")])
    assert "| newconn | req/s | 100 (90–110, n=3) | 99 (95–99, n=3) | 0.990 [0.900–1.100] |" \
        in text
    assert "- a note" in text and "`admin.bind=127.0.0.1:PORT`" in text
    assert V.rotated(["a", "b", "c"], 2) == ["b", "c", "a"]


@pytest.mark.timeout(120)
def test_variants_run_idle_workload_with_a_scraped_admin_variant(tmp_path):
    """variant_run.run end to end on the hold backend (no redis needed): two variants
    of one build, 1 round, 50 idle connections each, the admin one scraped."""
    from bench_lib import variant_run
    from bench_lib.variants import parse_variant

    out = tmp_path / "out"
    opts = variant_run.Options(
        exe=[sys.executable, "-m", "prefork_proxy"],
        variants=[parse_variant("plain="), parse_variant("admin=admin.bind=127.0.0.1:PORT")],
        rounds=1, workloads=("idle",), idle_conns=50, scrape_interval=0.2, out=out,
        log=lambda msg: None)
    assert variant_run.run(opts) == 0
    result = json.loads((out / "variants.json").read_text())
    idle = {s["variant"]: s["value"] for s in result["samples"] if s["metric"] == "kib_per_conn"}
    assert set(idle) == {"plain", "admin"}, result["notes"]
    [seen] = [r for r in result["runs"] if r["workload"] == "idle" and r["variant"] == "admin"]
    assert seen["scrape"]["scrapes"] >= 1 and seen["scrape"]["failures"] == 0, seen
    assert seen["scrape"]["bytes"] > 0
    titles = " ".join(seen["detail_after"])  # PSS per process of the tree, by title
    assert "admin" in titles and titles.count("worker") == 2, seen["detail_after"]
    assert "| idle | PSS KiB/idle conn |" in (out / "variants.md").read_text()


@pytest.mark.timeout(120)
@pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-benchmark")),
                    reason="redis-server / redis-benchmark not installed (scripts/install-peers)")
def test_variants_run_redis_workloads_with_cpu_per_request(tmp_path):
    from bench_lib import variant_run
    from bench_lib.variants import parse_variant

    out = tmp_path / "out"
    opts = variant_run.Options(
        exe=[sys.executable, "-m", "prefork_proxy"],
        variants=[parse_variant("plain="), parse_variant("named=tcp_proxy.name=bench")],
        rounds=1, keepalive_n=300, newconn_n=200, clients=5, scrape_interval=0, out=out,
        log=lambda msg: None)
    assert variant_run.run(opts) == 0
    result = json.loads((out / "variants.json").read_text())
    got = {(s["variant"], s["workload"], s["metric"]) for s in result["samples"]}
    for name in ("plain", "named"):
        for workload in ("keepalive", "newconn"):
            assert {(name, workload, m) for m in ("rps", "worker_cpu_us", "tree_cpu_us")} <= got, \
                result["notes"]


@pytest.mark.timeout(60)
def test_bootstrap_prefers_the_system_python_when_it_can_make_a_venv():
    """scripts/bootstrap's choice (without PYTHON): /usr/bin/python3 if it can make a
    venv, else python3 on PATH; its functions, run by bash on this machine."""
    text = (SCRIPTS / "bootstrap").read_text()
    start, end = text.index("can_make_venv() {"), text.index("if [ ! -x")
    done = subprocess.run(["bash", "-c", text[start:end] + "\npick_python"],
                          capture_output=True, text=True, timeout=50)
    system = Path("/usr/bin/python3")
    can = system.exists() and subprocess.run(
        [str(system), "-c", "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 9))"],
        capture_output=True, timeout=30).returncode == 0
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("/usr/bin/python3" if can else "python3")


@pytest.mark.timeout(60)
def test_the_opcode_tracer_counts_a_real_workers_relay_per_connection(backend_factory,
                                                                        proxy_factory, tmp_path):
    """scripts/relay_opcodes.py's tracer (bench_lib/opcode_trace), loaded through
    PYTHONPATH into a real worker: it counts the relay thread's instructions and its
    closes (one per connection) and writes them where the variable says."""
    import os
    import socket

    backend = backend_factory("echo")
    prefix = tmp_path / "ops"
    tracer = SCRIPTS / "bench_lib" / "opcode_trace"
    env = dict(os.environ, PREFORK_OPCODE_TRACE=str(prefix),
               PYTHONPATH=os.pathsep.join([str(tracer), os.environ.get("PYTHONPATH", "")]))
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", backend.address,
                          "--workers", "1", "--threads", "1", env=env)
    for index in range(120):
        with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as sock:
            request = b"ping %d\n" % index
            sock.sendall(request)
            assert recv_exactly(sock, len(request)) == transform(request)  # the echo's XOR

    def dump() -> dict:
        files = list(tmp_path.glob("ops-*-relay-0.json"))
        return json.loads(files[0].read_text()) if files else {"closes": 0}

    wait_for(lambda: dump()["closes"] >= 120, message="the tracer's count of 120 closes")
    seen_at = time.monotonic()  # the tracer stamps each copy with this system-wide clock

    def copy_after() -> dict:
        copy = dump()
        return copy if copy.get("at", 0.0) > seen_at else {}

    counts = wait_for(copy_after, message="a copy taken after the 120th close")
    assert counts["closes"] == 120  # one per connection: the unit relay_opcodes divides by
    assert counts["opcodes"] > 120 * 500  # hundreds of instructions per connection at least
    assert counts["by_function"]["RelayLoop._close (loop.py)"] > 0


STRACE_SUMMARY = """\
strace: Process 5679 attached with 3 threads
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 63.56    1.865252         369      5047           epoll_wait
 25.70    0.754077           8     85856           sendto
 10.60    0.311195           3     85857        12 recvfrom
  0.13    0.003762          75        50         1 futex
------ ----------- ----------- --------- --------- ----------------
100.00    2.934656          16    176810        13 total
"""


def test_strace_summary_parser_reads_calls_and_errors_by_name():
    from syscall_floor import parse_strace_summary

    counts = parse_strace_summary(STRACE_SUMMARY)
    assert counts.calls == {"epoll_wait": 5047, "sendto": 85856, "recvfrom": 85857, "futex": 50}
    assert counts.errors == {"recvfrom": 12, "futex": 1}  # "total" and the header skipped
    assert parse_strace_summary("") .calls == {}
    # Two summaries in one text (strace -c per process written together) add up.
    doubled = parse_strace_summary(STRACE_SUMMARY + STRACE_SUMMARY)
    assert doubled.calls["sendto"] == 2 * 85856 and doubled.errors["futex"] == 2


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    try:  # ptrace may be forbidden (a container without CAP_SYS_PTRACE)
        return subprocess.run(["strace", "-o", "/dev/null", "true"], timeout=10,
                              capture_output=True).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.timeout(120)
@pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-benchmark")),
                    reason="redis-server / redis-benchmark not installed (scripts/install-peers)")
@pytest.mark.skipif(not _strace_works(), reason="strace missing or ptrace not permitted here")
def test_syscall_floor_counts_the_real_proxys_calls_per_kept_alive_request():
    """scripts/syscall_floor.py against the real proxy: a relayed kept-alive request
    is one recv and one send each way, as the tool must report it."""
    import re

    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "syscall_floor.py"), "--peer", "prefork",
         "--workload", "keepalive", "--seconds", "1",
         "--prefork-cmd", f"{sys.executable} -m prefork_proxy"],
        capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr
    rows = dict(re.findall(r"^\| (\w+) \| ([\d.]+)", out.stdout, re.M))
    assert 1.8 <= float(rows["recvfrom"]) <= 2.2, out.stdout
    assert 1.8 <= float(rows["sendto"]) <= 2.2, out.stdout


def test_an_explicit_prefork_command_runs_without_the_checkout_on_its_path(monkeypatch):
    """--prefork-cmd names an install (an older commit's venv, say): the checkout on
    PYTHONPATH would make it run this checkout's code instead. Only the fallback
    (``python3 -m prefork_proxy`` from the repo) gets it."""
    import os

    from bench_lib.peers import REPO_ROOT, PeerOptions, prefork_env

    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    explicit = prefork_env(PeerOptions(prefork_cmd=["/opt/old/bin/prefork-proxy"],
                                       prefork_relay=None))
    assert explicit["PYTHONPATH"] == "/elsewhere"
    fallback = prefork_env(PeerOptions(prefork_cmd=None, prefork_relay=None))
    assert fallback["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), "/elsewhere"]
